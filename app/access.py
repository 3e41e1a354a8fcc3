"""Who may use the server's sockets and API: the API key, the page's own short-lived tokens, and
which sites' pages may open a socket.

- `--api-key` clients send `Authorization: Bearer KEY`; browsers, which cannot set headers on a
  WebSocket, offer it as the subprotocol `openai-insecure-api-key.KEY`, as OpenAI's browser clients do.
- The app's own page never sees the key. It asks `GET /afnext/token` (same origin: other sites'
  pages cannot read the answer) for a token that opens Realtime sockets for `TOKEN_TTL_S`, and offers
  it as the subprotocol `afnext-page-token.TOKEN`, like OpenAI's ephemeral client secrets. The page
  is open to anyone who can load it, so a token grants what the page does and no more: a `page`
  session (the instruct model, microphone audio in, speech out; see app/realtime.py and
  app/realtime_link.py), from a socket that names its page's Origin. The key alone opens everything else.
- A socket whose Origin names another site than its Host (and than `AFNEXT_ALLOWED_ORIGINS`) is
  refused unless it holds the key, so other web sites' pages cannot drive a visitor's local server.
- Whose conversations a client sees (app/history.py): each browser keeps an owner token of its own,
  made by the page and kept in its localStorage, and sends it as the `X-AFNext-Owner` header (or the
  subprotocol `afnext-owner.TOKEN` on a socket). The store keeps only a hash of it. With `--api-key`,
  a client holding the key and no owner token owns the key's conversations. An id never grants access.
- A server bound to this computer only (127.0.0.1) answers the token route and sockets only for a
  Host that names this computer (or a gradio.live share link, or an allowed site): a web site that
  points its own name at 127.0.0.1 (DNS rebinding) is same-origin with itself, not with us.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import secrets
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

# More sites whose pages may connect, comma-separated: "a.example", "https://b.example:8443", "*.hf.space".
ORIGINS_ENV = "AFNEXT_ALLOWED_ORIGINS"
KEY_PROTOCOL = "openai-insecure-api-key."  # how OpenAI's browser clients send the key
PAGE_PROTOCOL = "afnext-page-token."  # how the app's page sends its token
OWNER_PROTOCOL = "afnext-owner."  # how a socket names whose conversations it may keep and resume
OWNER_HEADER = "x-afnext-owner"  # how an HTTP request does
OWNER_CHARS = frozenset("0123456789abcdefABCDEF")  # an owner token: 32-128 hex digits (the page makes 64)
TOKEN_ROUTE = "/afnext/token"
TOKEN_TTL_S = 600  # a page token opens sockets for this long (the page fetches one per connection)
_DEFAULT_PORTS = {"http": (80,), "ws": (80,), "https": (443,), "wss": (443,), "": (80, 443)}


EMPTY_KEY = ("The API key is empty, which would let anyone in; give a key, or none (unset $AFNEXT_API_KEY) "
             "to serve without one.")
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1", "*.gradio.live")  # what a loopback-bound server answers to
HOST_REFUSAL = (f"This server answers only to its own address; open it as http://localhost:PORT (behind a proxy "
                f"that sends its own Host, add that name to {ORIGINS_ENV}).")


def bearer(headers: Mapping[str, str]) -> str:
    """The key of an `Authorization: Bearer KEY` header (the scheme in any case, as HTTP has it)."""
    value = headers.get("authorization", "").strip()
    return value[7:].strip() if value[:7].lower() == "bearer " else value


@dataclass(frozen=True)
class Grant:
    """Whether a socket may open: `refusal` (one sentence) or None, and whether it is a `page` session."""

    refusal: str | None = None
    page: bool = False
    owner: str | None = None  # whose conversations the socket keeps and resumes (None: it keeps none)


class Access:
    """The server's rules: `key` (None: open to anyone who can reach it), the allowed sites, and
    whether the server is bound to this computer only (`local`: the Host check)."""

    def __init__(self, key: str | None = None, allowed_origins: Iterable[str] = (), *, local: bool = False,
                 secret: bytes | None = None) -> None:
        if key is not None and not key.strip():  # "" would match a request that sends no key
            raise ValueError(EMPTY_KEY)
        self.key, self.local = key, local
        self.allowed = allowed_sites([*allowed_origins, *os.environ.get(ORIGINS_ENV, "").split(",")])
        self._hosts = (*LOCAL_HOSTS, *(a if a.startswith("*") else _hostname(a) or a for a in self.allowed))
        # Signs page tokens: made here, they die with the process; replicas share one (app/replica.py),
        # so a token from one opens a socket on another.
        self._secret = secret or secrets.token_bytes(32)

    def host_ok(self, headers: Mapping[str, str]) -> bool:
        """The request names this computer (or an allowed site), or the server is not bound to it only."""
        if not self.local:
            return True
        name = _hostname(headers.get("host", ""))
        return bool(name) and any(h == "*" or h == name or (h.startswith("*.") and name.endswith(h[1:]))
                                  for h in self._hosts)

    def key_ok(self, given: str) -> bool:
        """`given` is the API key (constant time), or no key is needed."""
        return self.key is None or hmac.compare_digest(given.encode(), self.key.encode())

    def page_token(self, now: float | None = None) -> tuple[str, int]:
        """A fresh token for the page, and when it expires (Unix seconds)."""
        expires = int(now if now is not None else time.time()) + TOKEN_TTL_S
        return f"{expires}-{self._sign(expires)}", expires

    def token_ok(self, token: str, now: float | None = None) -> bool:
        expires, _, signature = token.partition("-")
        if not (expires.isascii() and expires.isdigit()) or len(expires) > 12:  # "²".isdigit() is True
            return False
        return (int(expires) >= (now if now is not None else time.time())
                and hmac.compare_digest(signature.encode(), self._sign(int(expires)).encode()))

    def socket(self, headers: Mapping[str, str], offered: list[str]) -> Grant:
        """Whether a WebSocket with these handshake headers and offered subprotocols may open."""
        key = bearer(headers) or next((p[len(KEY_PROTOCOL):] for p in offered if p.startswith(KEY_PROTOCOL)), "")
        has_key = self.key is not None and bool(key) and self.key_ok(key)
        if key and not has_key and self.key is not None:
            return Grant("Incorrect API key.")
        if not has_key and not self.host_ok(headers):
            return Grant(HOST_REFUSAL)
        if not has_key and not origin_allowed(headers, self.allowed):
            return Grant("This socket serves only the pages of its own site; open the app's own page, or send "
                         "the API key.")
        named = next((p[len(OWNER_PROTOCOL):] for p in offered if p.startswith(OWNER_PROTOCOL)), None)
        owner = owner_of(named) if named is not None else (key_owner(key) if has_key else None)
        if named is not None and owner is None:
            return Grant(OWNER_REFUSAL)
        if self.key is None or has_key:
            return Grant(owner=owner)
        token = next((p[len(PAGE_PROTOCOL):] for p in offered if p.startswith(PAGE_PROTOCOL)), None)
        if token is None:
            return Grant("Missing API key: send it as a Bearer token.")
        if headers.get("origin") is None:
            return Grant("A page token opens sockets for the app's own page only; other clients send the API key.")
        return (Grant(page=True, owner=owner) if self.token_ok(token)
                else Grant("The page's token has expired; reload the page."))

    def owner(self, headers: Mapping[str, str]) -> str | None:
        """Whose conversations an HTTP request may see: its owner token's, else the API key's; None: nobody's."""
        named = headers.get(OWNER_HEADER)
        if named is not None:
            return owner_of(named)
        key = bearer(headers)
        return key_owner(key) if self.key is not None and key and self.key_ok(key) else None

    def _sign(self, expires: int) -> str:
        return hmac.new(self._secret, str(expires).encode(), hashlib.sha256).hexdigest()[:32]


OWNER_REFUSAL = "The owner token must be 32 to 128 hexadecimal digits (the page makes its own)."


def client_group(host: str | None) -> str:
    """Whose share of the per-address limits a client's connection counts against: its IPv4 address, or
    its IPv6 /64 (one home or host is given a /64 and may use any of its 2^64 addresses, each of which
    would otherwise get a fresh share); "?" when unknown."""
    if not host:
        return "?"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:  # not an address (a test client's name): itself
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:  # an IPv4 client on a dual-stack socket
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


def owner_of(token: str) -> str | None:
    """The store's name for an owner token's holder (a hash: the store never holds the token), or None
    for a token that is not 32-128 hex digits."""
    if not 32 <= len(token) <= 128 or not OWNER_CHARS.issuperset(token):
        return None
    return "owner:" + hashlib.sha256(token.lower().encode()).hexdigest()[:40]


def key_owner(key: str) -> str:
    """The store's name for the API key's holder."""
    return "key:" + hashlib.sha256(key.encode()).hexdigest()[:40]


def _hostname(value: str) -> str | None:
    """'host[:port]' or a URL → its host name, lower case (an IPv6 address without brackets)."""
    try:
        return urlsplit(value if "://" in value else f"//{value}").hostname
    except ValueError:
        return None


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
