"""Who may use the server's sockets and API: the API key, the page's own short-lived tokens, and
which sites' pages may open a socket.

- `--api-key` clients send `Authorization: Bearer KEY`; browsers, which cannot set headers on a
  WebSocket, offer it as the subprotocol `openai-insecure-api-key.KEY`, as OpenAI's browser clients do.
- The app's own page never sees the key. It asks `GET /afnext/token` (same origin: other sites'
  pages cannot read the answer) for a token that opens Realtime sockets for `TOKEN_TTL_S`, and offers
  it as the subprotocol `afnext-page-token.TOKEN`, like OpenAI's ephemeral client secrets.
- A socket whose Origin names another site than its Host (and than `AFNEXT_ALLOWED_ORIGINS`) is
  refused unless it holds the key, so other web sites' pages cannot drive a visitor's local server.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
from collections.abc import Iterable, Mapping
from urllib.parse import urlsplit

# More sites whose pages may connect, comma-separated: "a.example", "https://b.example:8443", "*.hf.space".
ORIGINS_ENV = "AFNEXT_ALLOWED_ORIGINS"
KEY_PROTOCOL = "openai-insecure-api-key."  # how OpenAI's browser clients send the key
PAGE_PROTOCOL = "afnext-page-token."  # how the app's page sends its token
TOKEN_ROUTE = "/afnext/token"
TOKEN_TTL_S = 600  # a page token opens sockets for this long (the page fetches one per connection)
_DEFAULT_PORTS = {"http": (80,), "ws": (80,), "https": (443,), "wss": (443,), "": (80, 443)}


class Access:
    """The server's rules: `key` (None: open to anyone who can reach it) and the allowed sites."""

    def __init__(self, key: str | None = None, allowed_origins: Iterable[str] = ()) -> None:
        self.key = key
        self.allowed = allowed_sites([*allowed_origins, *os.environ.get(ORIGINS_ENV, "").split(",")])
        self._secret = secrets.token_bytes(32)  # tokens die with the process

    def key_ok(self, given: str) -> bool:
        """`given` is the API key (constant time), or no key is needed."""
        return self.key is None or hmac.compare_digest(given.encode(), self.key.encode())

    def page_token(self, now: float | None = None) -> tuple[str, int]:
        """A fresh token for the page, and when it expires (Unix seconds)."""
        expires = int(now if now is not None else time.time()) + TOKEN_TTL_S
        return f"{expires}-{self._sign(expires)}", expires

    def token_ok(self, token: str, now: float | None = None) -> bool:
        expires, _, signature = token.partition("-")
        if not expires.isdigit() or len(expires) > 12:
            return False
        return (int(expires) >= (now if now is not None else time.time())
                and hmac.compare_digest(signature.encode(), self._sign(int(expires)).encode()))

    def socket(self, headers: Mapping[str, str], offered: list[str]) -> str | None:
        """Why a WebSocket with these handshake headers and offered subprotocols may not open (one
        sentence), or None when it may."""
        bearer = headers.get("authorization", "").removeprefix("Bearer ").strip()
        key = bearer or next((p[len(KEY_PROTOCOL):] for p in offered if p.startswith(KEY_PROTOCOL)), "")
        has_key = self.key is not None and bool(key) and self.key_ok(key)
        if key and not has_key and self.key is not None:
            return "Incorrect API key."
        if not has_key and not origin_allowed(headers, self.allowed):
            return "This socket serves only the pages of its own site; open the app's own page, or send the API key."
        if self.key is None or has_key:
            return None
        token = next((p[len(PAGE_PROTOCOL):] for p in offered if p.startswith(PAGE_PROTOCOL)), None)
        if token is not None:
            return None if self.token_ok(token) else "The page's token has expired; reload the page."
        return "Missing API key: send it as a Bearer token."

    def _sign(self, expires: int) -> str:
        return hmac.new(self._secret, str(expires).encode(), hashlib.sha256).hexdigest()[:32]


def _site(url: str) -> str | None:
    """'scheme://host[:port]' or '//host[:port]' → 'host' or 'host:port', lower case, without a default port."""
    parts = urlsplit(url)
    try:
        host, port = parts.hostname, parts.port
    except ValueError:  # a port that is no number or out of range
        return None
    if not host:
        return None
    return host if port is None or port in _DEFAULT_PORTS.get(parts.scheme, ()) else f"{host}:{port}"


def allowed_sites(entries: Iterable[str]) -> tuple[str, ...]:
    """Allow-list entries ("*", "*.domain", "host[:port]", "https://host[:port]") → sites or patterns."""
    sites = []
    for entry in (e.strip().lower() for e in entries):
        if entry == "*" or entry.startswith("*."):
            sites.append(entry)
        elif entry:
            sites.append(_site(entry if "://" in entry else f"//{entry}") or entry)
    return tuple(sites)


def origin_allowed(headers: Mapping[str, str], allowed: tuple[str, ...]) -> bool:
    """Whether a socket with these request headers may talk: no Origin (not a browser, such as the
    desktop loop), or one naming the Host it connected to, or one of `allowed` (from `allowed_sites`).
    The gradio.live share link passes Host on unchanged, so its pages are same-site."""
    origin = headers.get("origin")
    if origin is None:  # a browser always sends one: this is not another site's page
        return True
    site = _site(origin) if "://" in origin else None  # "null": a sandboxed or file:// page
    if site is None:
        return False
    return site == _site(f"//{headers.get('host', '')}") or any(
        a == "*" or a == site or (a.startswith("*.") and site.endswith(a[1:])) for a in allowed)
