"""The Talk channel's wire (app/talk.py): what a page may send, parsed once at the edge, strictly.

Rates are finite JSON numbers in 8-192 kHz (rounded to whole Hz), flags are JSON true or false, every
message is a JSON object within the byte limits below; anything else is a `ValueError` with one
sentence (`MessageTooBig` for a message over the limits). A socket whose Origin names another site
than its Host (and than AFNEXT_ALLOWED_ORIGINS) is refused, so other web sites' pages cannot use it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from starlette.websockets import WebSocket, WebSocketDisconnect

from afnext import strict_json

MAX_AUDIO_MESSAGE_BYTES = 64 << 10  # one microphone message: a 20 ms block at 192 kHz is 7.7 kB
MAX_TEXT_BYTES = 4 << 10  # one text message: the page's largest is under 100 bytes
MIN_RATE_HZ, MAX_RATE_HZ = 8000, 192000
# More sites whose pages may connect, comma-separated: "a.example", "https://b.example:8443", "*.hf.space".
ORIGINS_ENV = "AFNEXT_ALLOWED_ORIGINS"
_CLIENT_ID = re.compile(r"[A-Za-z0-9-]{8,64}")
_DEFAULT_PORTS = {"http": (80,), "ws": (80,), "https": (443,), "wss": (443,), "": (80, 443)}


@dataclass(frozen=True)
class Hello:
    """The page's first message."""
    rate: int  # Hz of the microphone PCM the page sends
    play_rate: int  # Hz the page plays reply speech at
    half_duplex: bool  # deaf while the reply plays (no barge-in), for this connection
    think: bool  # reason before answering, for this connection


@dataclass(frozen=True)
class Ptt:
    down: bool  # the push-to-talk button was pressed (True) or released


@dataclass(frozen=True)
class Mode:
    ptt: bool  # push-to-talk on (the button makes turns) or off (voice detection does)


class MessageTooBig(ValueError):
    """A message over the channel's byte limits (closes with 1009); the message says so in one sentence."""


def parse_hello(text: str, client: str) -> Hello:
    """The page's first message, and the client id from its URL; ValueError with one sentence."""
    if not _CLIENT_ID.fullmatch(client):
        raise ValueError("The page did not name a valid client id; reload the page.")
    hello = _object(text)
    if hello.get("type") != "hello":
        raise ValueError("The voice channel expected a hello message first; reload the page.")
    if "sample_rate" not in hello:
        raise ValueError("The page's hello did not give its sample_rate; reload the page.")
    rate = _rate(hello, "sample_rate")
    return Hello(rate, _rate(hello, "play_rate", rate), _flag(hello, "half_duplex"), _flag(hello, "think"))


def parse_control(text: str) -> Ptt | Mode | None:
    """A text message after the hello: Ptt or Mode, None for a type this server does not know (a newer
    page's, ignored); ValueError with one sentence for anything else."""
    message = _object(text)
    kind = message.get("type")
    if kind == "ptt":
        return Ptt(_flag(message, "down", None))
    if kind == "mode":
        return Mode(_flag(message, "ptt", None))
    if not isinstance(kind, str):
        raise ValueError("A message from the page had no type; reload the page.")
    return None


def _object(text: str) -> dict:
    try:  # NaN and Infinity are not JSON, though Python's parser takes them
        value = strict_json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: arrays nested thousands deep
        raise ValueError("The voice channel could not read a message from the page as JSON; reload the page.") from None
    if not isinstance(value, dict):
        raise ValueError("A message from the page was not a JSON object; reload the page.")
    return value


def _rate(message: dict, key: str, default: int | None = None) -> int:
    value = message.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            isinstance(value, float) and not math.isfinite(value)):
        raise ValueError(f"The voice channel could not read the hello's {key}; it must be a number of Hz.")
    if not MIN_RATE_HZ <= value <= MAX_RATE_HZ:  # exact for ints of any size
        shown = f"{value:g} Hz" if abs(value) < 1e9 else "that size"
        raise ValueError(f"A sample rate of {shown} is not supported (8-192 kHz).")
    return round(value)  # an AudioContext's rate is a float, whole in practice


def _flag(message: dict, key: str, default: bool | None = False) -> bool:
    value = message.get(key, default)
    if not isinstance(value, bool):  # bool("false") is True: only JSON's true and false will do
        raise ValueError(f"The page's {key} must be true or false; reload the page.")
    return value


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


async def receive(ws: WebSocket) -> str | bytes:
    """The page's next message, within the byte limits; WebSocketDisconnect once it has gone."""
    message = await ws.receive()
    if message["type"] == "websocket.disconnect":
        raise WebSocketDisconnect(message.get("code", 1000))
    if (text := message.get("text")) is not None:
        if len(text) > MAX_TEXT_BYTES or len(text.encode(errors="surrogatepass")) > MAX_TEXT_BYTES:
            raise MessageTooBig(f"A text message from the page was over the {MAX_TEXT_BYTES >> 10} KiB limit; "
                                "reload the page.")
        return text
    data = message.get("bytes") or b""
    if len(data) > MAX_AUDIO_MESSAGE_BYTES:
        raise MessageTooBig(f"An audio message from the page was over the {MAX_AUDIO_MESSAGE_BYTES >> 10} KiB "
                            "limit; send about 20 ms per message.")
    return data
