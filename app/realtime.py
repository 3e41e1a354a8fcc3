"""The Realtime voice WebSocket, `/v1/realtime?model=…`: OpenAI's Realtime protocol around afnext's
`Assistant` (endpointer → session → speech, with barge-in).

One socket is one conversation: app/realtime_link.py takes its client events to the assistant,
app/realtime_replies.py turns the assistant's events into server events, and app/realtime_wire.py holds
their shapes. This module is the route (`RealtimeServer`): it checks access, caps the sockets (in all
and per client address), finds where the socket's conversation is kept, and runs one link per socket,
sending its server events in order; a socket that sends nothing for too long, or too much, is closed
with an `error` event saying why.

A socket that names its owner (the page's `afnext-owner.TOKEN` subprotocol, or the API key) keeps its
conversation in the store, turn by turn; `?conversation=ID` goes on with one of the owner's kept
conversations (session.created's extra `conversation` field names the socket's conversation and the
turns it holds). Its session stays live in the server's `Live` registry after the socket closes, so a
page that reloads goes on without rebuilding it; one the registry let go of is rebuilt from the store.
"""

from __future__ import annotations

import asyncio
import json
import threading
import uuid

from starlette.websockets import WebSocket, WebSocketDisconnect

from afnext.live import Live
from afnext.store import Store, StoreError, check_id

from . import realtime_wire as wire
from .access import KEY_PROTOCOL, PAGE_PROTOCOL, Access, client_group
from .backend import BackendLoader, BackendUnavailable
from .realtime_link import Kept, RealtimeLink

ROUTE = wire.ROUTE
MAX_SESSIONS = 64  # sockets at once; more are refused with 1013 (try again later)
MAX_PER_ADDRESS = 8  # sockets from one client address: a fair share of MAX_SESSIONS
IDLE_TIMEOUT_S = 600.0  # a socket whose client sends nothing this long is closed: it holds a session slot
# One client event: a 30 s clip in one conversation.item.create or append is 1.9 MB of base64. Uvicorn
# buffers up to WS_MAX_QUEUE of them per socket before the handler reads one, so the worst case is
# MAX_SESSIONS × (WS_MAX_QUEUE + 1) × MAX_MESSAGE_BYTES (800 MiB), and 1/8 of it per address.
MAX_MESSAGE_BYTES = 5 << 19  # 2.5 MiB
WS_MAX_QUEUE = 4


class RealtimeServer:
    """The route: checks access, caps the sockets, runs one link per socket."""

    def __init__(self, loader: BackendLoader, access: Access | None = None, store: Store | None = None,
                 live: Live | None = None) -> None:
        self.loader, self.access, self.store = loader, access or Access(), store
        # Kept conversations' sessions, live past their socket (a reload goes on without a rebuild); the
        # app shares one registry between its tabs.
        self.live = live if live is not None else Live(per_group=MAX_PER_ADDRESS, most=MAX_SESSIONS)
        self._open: dict[str, int] = {}  # client address → open sockets (touched on the event loop only)
        self._links: set[RealtimeLink] = set()
        self._lock = threading.Lock()  # _links: the server's thread shuts them down

    def shutdown(self) -> None:
        """Close every live conversation (the server is stopping): their turns are cancelled."""
        with self._lock:
            links, self._links = list(self._links), set()
        for link in links:
            link.close()

    async def __call__(self, ws: WebSocket) -> None:
        offered = [p.strip() for p in ws.headers.get("sec-websocket-protocol", "").split(",") if p.strip()]
        model = ws.query_params.get("model", "instruct")
        address = client_group(ws.client.host if ws.client else None)
        grant = self.access.socket(ws.headers, offered)
        refusal, code = grant.refusal, 1008
        if refusal is None and model not in ("instruct", "think"):
            refusal = f"Unknown model {model[:40]!r}; use instruct or think."
        if refusal is None and grant.page and model != "instruct":
            refusal = "The page's token opens the instruct model only; other clients send the API key."
        if refusal is None and (sum(self._open.values()) >= MAX_SESSIONS or self._open.get(address, 0) >= MAX_PER_ADDRESS):
            refusal, code = "Too many voice sessions are open; try again later.", 1013
        # Counted from the check on, before the first await: a burst of handshakes cannot all pass it.
        counted = refusal is None
        if counted:
            self._open[address] = self._open.get(address, 0) + 1
        try:
            kept = None
            if refusal is None:
                try:
                    kept = await asyncio.to_thread(self._kept, grant, ws.query_params.get("conversation"), address)
                except StoreError as exc:
                    refusal = str(exc)
            if refusal is None:
                try:
                    backend = self.loader.wait(0)
                except BackendUnavailable as exc:
                    refusal, code = str(exc), 1013
            # Accepted even to refuse: a browser sees neither an HTTP status nor a reason given before the
            # handshake, and the page must be able to say why. A browser that offered subprotocols needs
            # one of them chosen back: "realtime" as OpenAI's clients offer it, a key or token only if
            # nothing else was offered (the response header would carry it).
            plain = [p for p in offered if not p.startswith((KEY_PROTOCOL, PAGE_PROTOCOL))]
            await ws.accept(subprotocol="realtime" if "realtime" in offered else (plain or offered or [None])[0])
            if refusal is not None:
                await _refuse(ws, refusal, code)
                return
            await self._serve(ws, backend.think if model == "think" else backend.main, backend.synthesizer, model,
                              grant.page, kept)
        finally:
            if counted:
                self._open[address] -= 1
                if not self._open[address]:
                    del self._open[address]

    def _kept(self, grant, cid: str | None, address: str) -> Kept | None:
        """Where the socket's conversation is kept: nowhere without an owner (or a store); a new
        conversation, or the owner's conversation `cid`. StoreError (one sentence) for a `cid` the
        owner does not have."""
        if cid is not None and (grant.owner is None or self.store is None):
            raise StoreError("Going on with a kept conversation needs an owner token (the page's) or the API key.")
        if grant.owner is None or self.store is None:
            return None
        kind = "talk" if grant.page or grant.owner.startswith("owner:") else "api"
        if cid is None:
            return Kept(self.store, self.live, grant.owner, uuid.uuid4().hex, kind, address)
        found = self.store.get(check_id(cid), owner=grant.owner)
        if found is None or found.kind not in ("talk", "api"):
            raise StoreError(f"There is no voice conversation {cid[:64]!r} of yours here.")
        return Kept(self.store, self.live, grant.owner, cid, found.kind, address, found.turns, found.system,
                    self.store.instructions_in_force(cid))

    async def _serve(self, ws: WebSocket, engine, synthesizer, model: str, page: bool, kept: Kept | None) -> None:
        loop, outbox = asyncio.get_running_loop(), asyncio.Queue()
        def send(event: dict) -> None:  # from the link's threads
            try:
                loop.call_soon_threadsafe(outbox.put_nowait, event)
            except RuntimeError:  # the event loop has closed (the server stopped): nobody is listening
                pass

        link = await asyncio.to_thread(RealtimeLink, engine, synthesizer, model, send, page, kept)
        sender = asyncio.create_task(_send_all(ws, outbox))
        with self._lock:
            self._links.add(link)
        refusal = None
        try:
            while True:
                try:
                    message = await asyncio.wait_for(ws.receive(), IDLE_TIMEOUT_S)
                except TimeoutError:
                    refusal = (f"The session closed after {IDLE_TIMEOUT_S / 60:g} minutes without a message.", 1000)
                    break
                if message["type"] == "websocket.disconnect":
                    break
                data = message.get("text") if message.get("text") is not None else message.get("bytes")
                if len(data or "") > MAX_MESSAGE_BYTES:  # uvicorn refuses these first; other servers may not
                    refusal = (f"A client event was over the {MAX_MESSAGE_BYTES / (1 << 20):g} MiB limit; send audio "
                               "in smaller appends.", 1009)
                    break
                try:
                    link.receive(wire.parse(data))
                except wire.ProtocolError as exc:
                    outbox.put_nowait(wire.error(exc))
        except OverflowError as exc:
            refusal = (str(exc), 1008)
        except WebSocketDisconnect:
            pass
        finally:
            sender.cancel()
            with self._lock:
                self._links.discard(link)
            await asyncio.to_thread(link.close)
        if refusal is not None:
            await asyncio.wait({sender})  # one writer at a time on the socket
            await _refuse(ws, *refusal)


async def _refuse(ws: WebSocket, message: str, code: int) -> None:
    """An `error` event with the sentence, then the close (its reason repeats it, cut to the protocol's limit)."""
    try:
        await ws.send_text(json.dumps(wire.error(wire.ProtocolError(message, "session_refused"))))
        await ws.close(code=code, reason=message.encode()[:120].decode(errors="ignore"))
    except (WebSocketDisconnect, RuntimeError, OSError):
        pass  # the client has gone already


async def _send_all(ws: WebSocket, outbox: asyncio.Queue) -> None:
    while True:
        event = await outbox.get()
        try:
            await ws.send_text(json.dumps(event))
        except (WebSocketDisconnect, RuntimeError):
            return
