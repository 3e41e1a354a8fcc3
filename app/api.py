"""The OpenAI-compatible API on the app's port: `GET /v1/models`, `POST /v1/chat/completions`.

A request goes, in order: its key and body checked here, the body parsed once (app/openai_wire.py) and
translated into afnext terms (app/api_turn.py), a kept session leased for it here and its turn started,
and its reply (app/api_reply.py) streamed as server-sent events or gathered whole.

Every refusal is OpenAI's error shape with one sentence and the right status (400 bad request, 401
key, 404 model, 413 body, 429 busy, 503 loading), and the server goes on serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from afnext import strict_json
from afnext.audio import AudioError
from afnext.engine import Engine
from afnext.conversation import ONE_RECORDING
from afnext.pool import PartedPool, SessionPool
from afnext.session import ContextFullError
from afnext.tts import Mute
from app import openai_wire as wire
from app.access import HOST_REFUSAL, Access, bearer
from app.api_reply import EventStream, Reply, pump
from app.api_turn import Target, turn_of
from app.backend import BackendLoader, BackendUnavailable

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 96 << 20  # a 30-minute 16 kHz WAV is 58 MB, 77 MB in base64; compressed audio far less
# Bytes of request bodies read and not yet turned into a turn, in all: a body of 96 MiB takes about 3.5
# times that while it is parsed and its audio decoded, so sixteen at once grew a process by 2.5 GB.
# Beyond this, a request is refused while it is read (503), and the others go on.
BODIES_MAX_BYTES = 3 * MAX_BODY_BYTES
RETRY_AFTER_S = 2  # seconds a refused (429) client is told to wait
MAX_WAITING = 64  # turns waiting for the engine; beyond, 429 at once rather than a wait of minutes
# Requests being answered at once through the API. A streamed text reply is read on the event loop; the
# others each hold a thread of the API's own (not one of the 40 Starlette shares with the page).
MAX_TURNS = 128
DISCONNECT_POLL_S = 0.5  # how often a whole (unstreamed) reply checks that its client is still there
# Kept threads, not one new thread per call: a request takes one to prepare it, which goes on to gather a
# whole reply or to read a spoken one (a reply whose client left runs on for at most a decoding step).
_WORKERS = ThreadPoolExecutor(max_workers=2 * MAX_TURNS + 16, thread_name_prefix="afnext-api")
# A streamed request of text alone, this small and this short, is planned and started on the event loop
# (about a millisecond: tokenizing it is most of it) rather than on a worker: the two hops between
# threads it saves are two wake-ups, a few tenths of a millisecond on an idle CPU. Larger ones would
# hold the loop, and every other stream with it, for longer (a regenerated answer's lease copies the kept
# conversation's KV cache: these bounds bound that copy too).
INLINE_BODY_BYTES = 16 << 10
INLINE_MESSAGES = 8


class Api:
    """The /v1 routes around the backend the page uses."""

    def __init__(self, loader: BackendLoader, access: Access | None = None) -> None:
        self.loader = loader
        self.access = access or Access()  # the API key, and the Host check of a server on 127.0.0.1 (DNS rebinding)
        self._pools: dict[int, tuple[SessionPool, SessionPool]] = {}
        self._parted: dict[int, tuple[PartedPool, PartedPool]] = {}
        self._lock = threading.Lock()
        self._turns = 0  # requests being answered (touched on the event loop only)
        self._reading = 0  # bytes of bodies held until their turn has started (event loop only)

    def routes(self) -> list[Route]:
        """The endpoints, and OpenAI-shaped answers for every other path or method under /v1."""
        return [Route("/v1/models", _only("GET", self.models), methods=ANY_METHOD),
                Route("/v1/models/{model:path}", _only("GET", self.model), methods=ANY_METHOD),
                Route("/v1/chat/completions", _only("POST", self.chat), methods=ANY_METHOD),
                Route("/v1/{rest:path}", _unknown, methods=ANY_METHOD)]

    async def models(self, request: Request) -> JSONResponse:
        try:
            listed = self._models(request)
        except wire.WireError as exc:
            return _error(exc)
        return JSONResponse({"object": "list", "data": listed})

    async def model(self, request: Request) -> JSONResponse:
        """`GET /v1/models/{id}` (the SDK's `models.retrieve`): one of the listed models, by its id."""
        name = request.path_params["model"]
        try:
            found = [m for m in self._models(request) if m["id"] == name]
        except wire.WireError as exc:
            return _error(exc)
        if not found:
            return _error(wire.WireError(404, f"The model {name[:80]!r} does not exist here; GET /v1/models lists them "
                                              "(instruct, think).", code="model_not_found", param="model"))
        return JSONResponse(found[0])

    def _models(self, request: Request) -> list[dict]:
        self._authorize(request)
        try:
            backend = self.loader.wait(0)
        except BackendUnavailable as exc:
            raise wire.WireError(503, str(exc), kind="service_unavailable") from None
        roots = {"instruct": backend.main.loaded.name, "think": backend.think.loaded.name}
        return [{"id": name, "object": "model", "created": 0, "owned_by": "nvidia", "root": root}
                for name, root in roots.items()]

    async def chat(self, request: Request):
        if self._turns >= MAX_TURNS:
            return _error(wire.WireError(429, "The server is answering as many requests as it can; try again in a "
                                              "few seconds.", kind="rate_limit_exceeded", code="rate_limit_exceeded"))
        self._turns += 1
        streaming = False
        try:
            self._authorize(request)
            async with self._body(request) as raw:
                body, reply = await self._started(raw)
            if body.stream:
                include_usage = bool(body.stream_options and body.stream_options.include_usage)
                streaming = True
                return EventStream(self._counted(reply.sse(include_usage)), media_type="text/event-stream",
                                   headers={"Cache-Control": "no-cache"})
            return JSONResponse(await _answered(request, reply))
        except _Left:  # the client hung up on a whole reply: its turn was stopped, nothing failed
            log.info("a client left before its reply was done")
            return Response(status_code=400)
        except wire.WireError as exc:
            return _error(exc)
        except (AudioError, ContextFullError, ValueError, TypeError) as exc:
            return _error(wire.WireError(400, str(exc)))
        except ClientDisconnect:  # the client left while sending its body: nothing failed, nobody to tell
            log.info("a client left while sending its request")
            return Response(status_code=400)
        except Exception as exc:  # the engine failed this turn; it goes on serving others
            log.exception("chat completion failed")
            return _error(wire.WireError(500, f"The model failed on this request ({type(exc).__name__}).",
                                         kind="server_error"))
        finally:
            if not streaming:
                self._turns -= 1

    @contextlib.asynccontextmanager
    async def _body(self, request: Request):
        """The request's body, counted with every other body read and not yet turned into a turn, within
        BODIES_MAX_BYTES (a 503 beyond it) until the `async with` ends."""
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            raise wire.WireError(413, f"The request body is over {MAX_BODY_BYTES >> 20} MiB; send shorter or "
                                      "compressed audio (mp3, ogg, flac).")
        body, held = bytearray(), 0
        try:
            async for piece in request.stream():
                body += piece
                held += len(piece)
                self._reading += len(piece)
                if len(body) > MAX_BODY_BYTES:
                    raise wire.WireError(413, f"The request body is over {MAX_BODY_BYTES >> 20} MiB.")
                if self._reading > BODIES_MAX_BYTES:
                    raise wire.WireError(503, "The server is reading other large requests; try again in a few "
                                              "seconds.", kind="service_unavailable")
            yield bytes(body)
        finally:
            self._reading -= held

    async def _started(self, raw: bytes) -> tuple[wire.ChatRequest, Reply]:
        """The request parsed and its turn begun (`_begin`). A small body is parsed here, and a short
        streamed text request begun here too (`_inline`); the rest goes to a worker thread (90 MB of
        JSON take a second to parse, a clip's decoding more), which goes straight on with the turn: a
        whole reply is gathered there; a streamed one is handed to the engine there and then read on
        the event loop (`Reply.woken`), or, when it is spoken, its events come from that thread
        (`Reply.items`). Every hop between threads left out is a wake-up on the way to the first
        token, which costs a fraction of a millisecond on an idle CPU."""
        loop = asyncio.get_running_loop()
        parsed = wire.parse_chat(_parse_json(raw)) if len(raw) <= INLINE_BODY_BYTES else None
        if parsed is not None and _inline(parsed):  # a question in a short conversation: cheaper here
            return parsed, self._begin(parsed, loop)
        ready, whole, items = loop.create_future(), loop.create_future(), asyncio.Queue()

        def work() -> None:
            try:
                body = parsed if parsed is not None else wire.parse_chat(_parse_json(raw))
                reply = self._begin(body, loop)
            except BaseException as exc:
                loop.call_soon_threadsafe(_settle, ready, None, exc)
                return
            loop.call_soon_threadsafe(_settle, ready, (body, reply), None)
            if not body.stream:
                try:
                    loop.call_soon_threadsafe(_settle, whole, reply.whole(), None)
                except BaseException as exc:
                    loop.call_soon_threadsafe(_settle, whole, None, exc)
            elif reply.woken is None:
                pump(loop, items, reply.events())

        _WORKERS.submit(work)
        body, reply = await ready
        reply.items, reply.whole_reply = items, whole
        return body, reply

    def _begin(self, body: wire.ChatRequest, loop: asyncio.AbstractEventLoop) -> Reply:
        """Plan the turn, lease a session and start the turn. The new turn's own mistakes raise here,
        before any reply. A streamed reply that is not spoken is read on `loop` (`Reply.woken`); its
        turn is handed to the engine here."""
        target = self._target(body.model)
        turn = turn_of(body, target)
        if turn.audio is not None and isinstance(target.synthesizer, Mute):
            raise wire.WireError(400, f"This server has no voice ({target.synthesizer.reason.rstrip('.')}), so it answers "
                                      "in text only; leave \"audio\" out of modalities.", param="modalities")
        if target.engine.waiting >= MAX_WAITING:
            raise wire.WireError(429, "The server is busy; try again in a few seconds.", kind="rate_limit_exceeded",
                                 code="rate_limit_exceeded")
        pool, parted = target.pools[turn.think], self._parted_of(target.engine)[turn.think]
        lease = parted.lease(turn.history, turn.asked)  # a recording over 30 minutes: heard in parts
        if lease is None:
            if turn.asked.audio_key and turn.asked.clip is None:  # over the limit, and not the first clip
                raise wire.WireError(400, "A recording over 30 minutes must be the conversation's first clip; "
                                          "start a new conversation for it.", param="messages")
            lease = pool.lease(turn.history)
        else:
            pool = parted
            if turn.asked.audio_key and any(m.audio_key for m in turn.history):
                parted.give_back(lease)
                raise wire.WireError(400, ONE_RECORDING, param="messages")
        reply = Reply(target, pool, lease, turn, wire.new_id())
        try:
            if body.stream and turn.audio is None and pool is target.pools[turn.think]:
                reply.start(loop)
            else:  # spoken (synthesis takes milliseconds a sentence) or heard in parts: read on a worker
                reply.start()
        except BaseException:  # the new turn's own mistake: the session it was lent stays kept
            pool.give_back(reply.lease)
            raise
        return reply

    async def _counted(self, chunks):
        """A streamed reply's chunks, counted among the requests being answered until it ends."""
        try:
            async for chunk in chunks:
                yield chunk
        finally:
            self._turns -= 1

    def _authorize(self, request: Request) -> None:
        if self.access.key is None and not self.access.host_ok(request.headers):
            raise wire.WireError(403, HOST_REFUSAL, kind="permission_error", code="host_not_allowed")
        if not self.access.key_ok(bearer(request.headers)):
            raise wire.WireError(401, "Incorrect or missing API key; send it as 'Authorization: Bearer KEY'.",
                                 code="invalid_api_key")

    def _target(self, model: str) -> Target:
        try:
            backend = self.loader.wait(0)
        except BackendUnavailable as exc:
            raise wire.WireError(503, str(exc), kind="service_unavailable") from None
        if model in ("instruct", backend.main.loaded.name):
            return Target("instruct", backend.main, self._pools_of(backend.main), False, backend.synthesizer)
        if model in ("think", backend.think.loaded.name):
            return Target("think", backend.think, self._pools_of(backend.think), True, backend.synthesizer)
        raise wire.WireError(404, f"The model {model[:80]!r} does not exist here; GET /v1/models lists them "
                                  "(instruct, think).", code="model_not_found", param="model")

    def _parted_of(self, engine: Engine) -> tuple[PartedPool, PartedPool]:
        """An engine's kept conversations about recordings over its limit, plain and Think apart."""
        with self._lock:
            if id(engine) not in self._parted:
                self._parted[id(engine)] = (PartedPool(engine), PartedPool(engine))
            return self._parted[id(engine)]

    def _pools_of(self, engine: Engine) -> tuple[SessionPool, SessionPool]:
        """An engine's kept sessions, apart for Think turns: their replies hold reasoning the client
        never sees, so the same visible history is a different conversation."""
        with self._lock:
            if id(engine) not in self._pools:
                self._pools[id(engine)] = (SessionPool(engine), SessionPool(engine))
            return self._pools[id(engine)]


def _inline(body: wire.ChatRequest) -> bool:
    """Whether `_begin` may run on the event loop: a streamed reply, text only in and out, few messages."""
    return (body.stream and "audio" not in (body.modalities or []) and len(body.messages) <= INLINE_MESSAGES
            and all(not isinstance(m.content, list) or all(isinstance(p, wire.TextPart) for p in m.content)
                    for m in body.messages))


async def _answered(request: Request, reply: Reply) -> dict:
    """A whole reply (`whole()`, on the worker that prepared it); a client that hangs up meanwhile stops
    it (the engine frees its slot)."""
    done = reply.whole_reply
    while not done.done():
        await asyncio.wait({done}, timeout=DISCONNECT_POLL_S)
        if not done.done() and await request.is_disconnected():
            reply.abandon()
    if reply.gone.is_set():  # what the stopped turn ended with (cut off before it began: an error) has no reader
        done.exception()  # (looked at: asyncio does not log it as never retrieved)
        raise _Left
    return done.result()


class _Left(Exception):
    """The client of a whole reply hung up before it was done."""


def _settle(future: asyncio.Future, result, error) -> None:
    if not future.done():
        future.set_exception(error) if error is not None else future.set_result(result)


def _parse_json(body: bytes) -> object:
    try:
        return strict_json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise wire.WireError(400, "The request body is not valid JSON.") from None


def _error(exc: wire.WireError, headers: dict | None = None) -> JSONResponse:
    if exc.status == 429:  # clients (the openai SDK among them) wait this long before trying again
        headers = {"Retry-After": str(RETRY_AFTER_S), **(headers or {})}
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


ANY_METHOD = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
ENDPOINTS = "GET /v1/models, POST /v1/chat/completions and the WebSocket /v1/realtime"


def _only(method: str, handler):
    """`handler` for `method`; any other method gets OpenAI's error shape, with the one to use."""
    async def endpoint(request: Request):
        if request.method != method and not (method == "GET" and request.method == "HEAD"):
            answer = _error(wire.WireError(405, f"{request.url.path} takes {method} requests, not {request.method}.",
                                           code="method_not_allowed"), headers={"Allow": method})
        else:
            answer = await handler(request)
        answer.headers["x-request-id"] = f"req_{uuid.uuid4().hex}"  # the id clients log (the SDK's `_request_id`)
        return answer
    return endpoint


async def _unknown(request: Request) -> JSONResponse:
    path = request.url.path[:80]
    if path == "/v1/realtime":
        return _error(wire.WireError(400, "/v1/realtime is a WebSocket; connect to it with ws:// or wss://.",
                                     code="websocket_required"))
    return _error(wire.WireError(404, f"This server has no {request.method} {path}; it offers {ENDPOINTS}.",
                                 code="unknown_url"))
