"""The Talk tab's voice channel: a WebSocket route next to the Gradio app.

Gradio's own streamed audio is served as HLS and adds seconds before the first sound, so the page
talks to the assistant over one WebSocket instead:

page → server   text  {"type": "hello", "sample_rate": 16000}   first message: the microphone's rate;
                      optional: "play_rate" (Hz the page plays at; default sample_rate), "half_duplex",
                      "think" (true or false, for this connection); then any of
                      {"type": "ptt", "down": true|false}        push-to-talk pressed / released
                      {"type": "mode", "ptt": true|false}        push-to-talk on (no voice detection) or off
                binary int16 mono PCM at the hello's rate, ~20 ms per message
server → page   text  {"type": "ready"|"state"|"speech_started"|"user_turn"|"text"|"reasoning"|
                       "interrupted"|"turn_done"|"notice"|"error", ...}
                binary HEADER + int16 PCM, HEADER = <u8 kind, 3 pad bytes, u32 turn id, u32 sample rate>,
                       kind 1: reply speech, at the hello's play_rate (the page's own: gapless, sample-exact),
                       kind 2: the user's turn as the server heard it, 16 kHz (for replay)

The channel is public, so it is strict (app/talk_wire.py): rates are finite JSON numbers
in 8-192 kHz (rounded to whole Hz), flags are JSON true or false, every message is a JSON object. A page
that breaks the protocol gets one {"type": "error"} sentence and the socket closes: 1008, or 1009 for
a message over the byte limits below; 1013 when the server is full or has no model. Message types this
server does not know are ignored (a newer page). A socket whose Origin header names another site than
its Host header (and than AFNEXT_ALLOWED_ORIGINS) is refused, so other web sites' pages cannot use it;
clients that send no Origin (the desktop loop, app/remote.py) are not browsers and are served.

Capacity heals itself: a conversation is made only when its socket is ready (the model loaded), one
that never had a turn goes when its socket does, and a full server (or an address at its own cap)
gives up its least recently seen idle conversation before it refuses anyone.

Threads per connection: the event loop only moves messages; a feeder thread pushes microphone audio
into the `Assistant` (a push may wait up to one decoding step on a barge-in), and a reader thread
turns the assistant's events into messages.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from functools import partial

from starlette.websockets import WebSocket, WebSocketDisconnect

from afnext.assistant import Assistant, AssistantOptions
from afnext.session import Session

from .backend import BackendLoader, BackendUnavailable
from .talk_link import HEADER, MAX_PENDING_CONTROLS, REPLY_AUDIO, USER_AUDIO, Link  # noqa: F401 (the protocol's names)
from .talk_wire import (ORIGINS_ENV, Hello, MessageTooBig, Mode, allowed_sites, origin_allowed, parse_control,
                        parse_hello, receive)

log = logging.getLogger(__name__)

ROUTE = "/afnext/talk"
IDLE_S = 600.0  # a conversation nobody has been connected to for 10 minutes is dropped (its KV cache freed)
MAX_CONVERSATIONS = 64  # held at once; when full, the least recently seen idle one makes room for a new page
# Live and kept conversations per client address (ws.client.host: behind a reverse proxy, every page has
# the proxy's address, so raise it there). Over it, the address's own oldest idle conversation goes.
MAX_CONVERSATIONS_PER_IP = 8
# Open sockets per address, said hello or not: each may hold a WebSocket frame in uvicorn's buffers and
# waits HELLO_TIMEOUT_S, so sockets that never speak are capped too (a page uses one).
MAX_SOCKETS_PER_IP = 16
HELLO_TIMEOUT_S = 10.0  # a socket that has not said hello by then is closed
LOAD_POLL_S = 0.25  # how often a socket waiting for the model to load checks on it


# ---- conversations ----

@dataclass
class _Conversation:
    session: Session
    ip: str  # the address of its latest connection
    last_seen: float  # time.monotonic() of the last disconnection (or the creation)
    turns: int = 0  # user turns so far: turn ids go on across reconnections
    link: Link | None = None  # the latest connection's link, until it has closed
    connected: bool = False  # that connection is live
    opening: bool = False  # a connection is attaching (its older link closing first)

    @property
    def idle(self) -> bool:
        return not self.connected and not self.opening


class TalkBusy(RuntimeError):
    """Too many conversations are held; the message says so in one sentence."""


class TalkRegistry:
    """The Talk conversations, one per page: the page names its own random client id, so a page
    that stops and starts the microphone keeps its conversation and never sees another page's.

    A conversation has at most one live connection (a new one closes the old). One nobody is connected
    to is kept `idle_s` for its page to come back, if it had a turn; under pressure (`max_conversations`,
    or `max_per_ip` for one address) the least recently seen idle one goes first. Dropped, its Session
    and KV cache are garbage: nothing else holds them.
    """

    def __init__(self, loader: BackendLoader, options: AssistantOptions = AssistantOptions(), *,
                 idle_s: float = IDLE_S, max_conversations: int = MAX_CONVERSATIONS,
                 max_per_ip: int = MAX_CONVERSATIONS_PER_IP, hello_timeout_s: float = HELLO_TIMEOUT_S,
                 allowed_origins: Iterable[str] = (), max_sockets_per_ip: int = MAX_SOCKETS_PER_IP) -> None:
        self.loader, self.options = loader, options
        self.idle_s, self.max_conversations, self.max_per_ip = idle_s, max_conversations, max_per_ip
        self.hello_timeout_s = hello_timeout_s
        # Sites besides the server's own whose pages may connect (a proxy that rewrites Host, say).
        self.allowed_origins = allowed_sites([*allowed_origins, *os.environ.get(ORIGINS_ENV, "").split(",")])
        self._conversations: dict[str, _Conversation] = {}
        self._closing: set[threading.Thread] = set()  # links of ended connections, still closing
        self.max_sockets_per_ip = max_sockets_per_ip
        self._sockets: Counter[str] = Counter()  # open sockets by address
        self._lock = threading.Lock()

    def socket_opened(self, ip: str) -> bool:
        """Count a new socket from `ip`; False (not counted) if the address is at its cap."""
        with self._lock:
            if self._sockets[ip] >= self.max_sockets_per_ip:
                return False
            self._sockets[ip] += 1
            return True

    def socket_closed(self, ip: str) -> None:
        with self._lock:
            self._sockets[ip] -= 1
            if self._sockets[ip] <= 0:
                del self._sockets[ip]

    def origin_allowed(self, headers: Mapping[str, str]) -> bool:
        """Whether a socket with these request headers may talk (see `talk_wire.origin_allowed`)."""
        return origin_allowed(headers, self.allowed_origins)

    def claim(self, client: str, ip: str) -> tuple[_Conversation, Link | None]:
        """`client`'s conversation (kept, or new once there is room) for a connection from `ip`, and its
        older link, which the caller closes before `attach`. Raises TalkBusy, BackendUnavailable."""
        backend = self.loader.wait()
        with self._lock:
            self._expire()
            conv = self._conversations.get(client)
            if conv is not None and conv.opening:
                raise TalkBusy("This conversation is already opening in another connection; reload the page.")
            if conv is None or conv.ip != ip:
                self._make_room(client, ip)
            if conv is None:
                conv = self._conversations[client] = _Conversation(Session(backend.main), ip, time.monotonic())
            conv.ip, conv.opening, conv.connected = ip, True, False  # an older connection is over
            old, conv.link = conv.link, None
        return conv, old

    def attach(self, conv: _Conversation, hello: Hello, send: Callable[[object], None]) -> Link:
        """A live link into the claimed `conv` (its older link closed by now)."""
        options = replace(self.options, half_duplex=hello.half_duplex, think=hello.think)
        assistant = Assistant(conv.session, self.loader.wait().synthesizer, options)
        link = Link(conv, assistant, hello.rate, send, hello.play_rate)
        with self._lock:
            conv.link, conv.connected, conv.opening = link, True, False
        return link

    def release(self, client: str, conv: _Conversation) -> None:
        """A claim that never came to `attach` (the page left meanwhile)."""
        with self._lock:
            conv.opening = False
            self._left(client, conv)

    def retire(self, client: str, link: Link) -> None:
        """`link`'s connection ended: its conversation is idle at once (dropped if it never had a turn),
        and the link closes on a thread of its own (`detach`): closing waits for the turn (one decoding
        step), and must happen even when the connection's coroutine is being cancelled (server shutdown)."""
        thread = threading.Thread(target=self.detach, args=(link,), name="afnext-talk-close", daemon=True)
        with self._lock:
            conv = link.conversation
            if conv.link is link and conv.connected:
                conv.connected = False
                self._left(client, conv)
            self._closing = {t for t in self._closing if t.is_alive()} | {thread}
        thread.start()

    def wait_closed(self, timeout: float = 30.0) -> bool:
        """Wait for connections that ended to finish closing (their turns cancelled); False on timeout."""
        with self._lock:
            closing = list(self._closing)
        for thread in closing:
            thread.join(timeout)
        return not any(t.is_alive() for t in closing)

    def shutdown(self, timeout: float = 30.0) -> None:
        """Close every live connection's link (the server is stopping)."""
        with self._lock:
            links = [(client, conv.link) for client, conv in self._conversations.items() if conv.connected]
        for client, link in links:
            self.retire(client, link)
        self.wait_closed(timeout)

    def detach(self, link: Link) -> None:
        """Close a retired link; its conversation then holds no reference to it (nor it to its Session)."""
        link.close()
        with self._lock:
            if link.conversation.link is link:
                link.conversation.link = None
            self._expire()

    def __len__(self) -> int:
        return len(self._conversations)

    def _left(self, client: str, conv: _Conversation) -> None:
        conv.last_seen = time.monotonic()
        if conv.idle and conv.turns == 0 and self._conversations.get(client) is conv:
            del self._conversations[client]  # nothing said yet: nothing to come back to

    def _make_room(self, client: str, ip: str) -> None:
        """Room for `client`'s conversation from `ip`, dropping the oldest idle one of the address, then of
        anyone; TalkBusy when only live ones are left."""
        others = [c for c in self._conversations if c != client]
        mine = [c for c in others if self._conversations[c].ip == ip]
        if len(mine) >= self.max_per_ip and not self._drop_oldest_idle(mine):
            raise TalkBusy(f"This address already has {self.max_per_ip} voice conversations open; close one of "
                           "its pages first.")
        if len(others) >= self.max_conversations and not self._drop_oldest_idle(others):
            raise TalkBusy("The server is holding as many voice conversations as it can; try again in a few "
                           "minutes.")

    def _drop_oldest_idle(self, clients: list[str]) -> bool:
        idle = [(self._conversations[c].last_seen, c) for c in clients if self._conversations[c].idle]
        if not idle:
            return False
        del self._conversations[min(idle)[1]]
        log.info("talk: dropped the least recently seen idle conversation to make room")
        return True

    def _expire(self) -> None:
        now = time.monotonic()
        for client, conv in list(self._conversations.items()):
            if conv.idle and now - conv.last_seen > self.idle_s:
                del self._conversations[client]


# ---- one connection ----

async def serve(ws: WebSocket, registry: TalkRegistry) -> None:
    """One page's voice channel, until the page goes away."""
    await ws.accept()
    ip = ws.client.host if ws.client else "unknown"
    if not registry.socket_opened(ip):
        await _refuse(ws, f"This address already has {registry.max_sockets_per_ip} voice connections open; "
                          "close some of its pages first.", 1013)
        return
    try:
        await _serve(ws, registry)
    finally:
        registry.socket_closed(ip)


async def _serve(ws: WebSocket, registry: TalkRegistry) -> None:
    client = ws.query_params.get("client", "")
    outbox: asyncio.Queue = asyncio.Queue()
    send = partial(asyncio.get_running_loop().call_soon_threadsafe, outbox.put_nowait)
    try:
        link, mode = await _open(ws, registry, client, send)
    except WebSocketDisconnect:
        return  # the page left before its conversation began: nothing was made for it
    except (ValueError, TalkBusy, BackendUnavailable) as exc:  # our own sentences
        await _refuse(ws, str(exc), _close_code(exc))
        return
    await _talk(ws, registry, client, link, mode, outbox)


async def _open(ws: WebSocket, registry: TalkRegistry, client: str, send) -> tuple[Link, Mode | None]:
    """Origin, hello, the model, then the conversation, in that order: a socket that leaves (or is
    cancelled) before the end holds no conversation. Also the page's mode message sent meanwhile."""
    if not registry.origin_allowed(ws.headers):
        raise ValueError("This voice channel serves only the pages of its own site; open the app's own page.")
    try:
        first = await asyncio.wait_for(receive(ws), registry.hello_timeout_s)
    except TimeoutError:
        raise ValueError(f"The page sent no hello within {registry.hello_timeout_s:g} s; reload the page.") from None
    if isinstance(first, bytes):
        raise ValueError("The voice channel expected a hello message first; reload the page.")
    hello = parse_hello(first, client)
    mode = await _while_loading(ws, registry.loader)
    conv, old = registry.claim(client, ws.client.host if ws.client else "unknown")
    try:
        if old is not None:
            await asyncio.to_thread(old.close)  # the same page again: its older link ends its turn first
        return registry.attach(conv, hello, send), mode
    except BaseException:
        registry.release(client, conv)
        raise


async def _while_loading(ws: WebSocket, loader: BackendLoader) -> Mode | None:
    """Wait for the model while listening to the page, which may leave (WebSocketDisconnect); the last
    mode message it sent meanwhile. Audio is dropped: the page sends none before "ready"."""
    if loader.ready:
        return None
    await ws.send_text(json.dumps({"type": "state", "state": "loading", "waiting": 0}))
    mode = None
    while not loader.ready:
        try:
            message = await asyncio.wait_for(receive(ws), LOAD_POLL_S)
        except TimeoutError:
            continue
        if isinstance(message, str) and isinstance(control := parse_control(message), Mode):
            mode = control
    return mode


async def _talk(ws: WebSocket, registry: TalkRegistry, client: str, link: Link, mode: Mode | None,
                outbox: asyncio.Queue) -> None:
    """The conversation: messages both ways until the page leaves or breaks the protocol."""
    sender, refusal = None, None
    try:
        await ws.send_text(json.dumps({"type": "ready", "turns": link.conversation.turns}))
        sender = asyncio.create_task(_send_all(ws, outbox))
        if mode is not None:
            link.control(mode)
        while True:
            message = await receive(ws)
            if link.closed:  # the same page connected again: this older connection is over
                refusal = ("This conversation went on in a newer connection.", 1000)
                break
            if isinstance(message, bytes):
                link.audio(message)
            elif (control := parse_control(message)) is not None:
                link.control(control)
    except WebSocketDisconnect:
        pass
    except ValueError as exc:  # our own sentence: the page broke the protocol
        refusal = (str(exc), _close_code(exc))
    except RuntimeError as exc:
        log.info("talk channel %s… ended: %s", client[:8], exc)
    finally:
        if sender is not None:
            sender.cancel()
        registry.retire(client, link)
    if refusal is not None:
        if sender is not None:
            await asyncio.wait({sender})  # one writer at a time on the socket
        await _refuse(ws, *refusal)


def _close_code(exc: Exception) -> int:
    """1009 for a message too big, 1013 (try again later) for a full or modelless server, else 1008."""
    if isinstance(exc, MessageTooBig):
        return 1009
    return 1013 if isinstance(exc, (TalkBusy, BackendUnavailable)) else 1008


async def _refuse(ws: WebSocket, message: str, code: int) -> None:
    """One sentence to the page, then close (the close reason repeats it, cut to the protocol's limit)."""
    try:
        await ws.send_text(json.dumps({"type": "error", "message": message}))
        await ws.close(code=code, reason=message.encode()[:120].decode(errors="ignore"))
    except (WebSocketDisconnect, RuntimeError, OSError):
        pass  # the page has gone already


async def _send_all(ws: WebSocket, outbox: asyncio.Queue) -> None:
    while True:
        message = await outbox.get()
        try:
            if isinstance(message, bytes):
                await ws.send_bytes(message)
            else:
                await ws.send_text(json.dumps(message))
        except (WebSocketDisconnect, RuntimeError):
            return  # the page went away; the receive loop ends the link
