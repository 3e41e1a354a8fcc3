"""The OpenAI-compatible API on the app's port: `GET /v1/models`, `POST /v1/chat/completions`.

Each request is translated once (app/openai_wire.py) into afnext terms: the messages before the last
user turn are the history, which the engine's `SessionPool` finds in a kept session (only the new
turn is prefilled; `usage.prompt_tokens_details.cached_tokens` says how much was not), and the last
user turn is asked on it. Replies stream as server-sent events or come whole. Think mode puts the
reasoning in `reasoning_content` and the timestamped steps in `think_steps`.

Every refusal is OpenAI's error shape with one sentence and the right status (400 bad request, 401
key, 404 model, 413 body, 429 busy, 503 loading), and the server goes on serving.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import itertools
import json
import logging
import queue
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

import numpy as np

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from afnext import strict_json
from afnext.audio import AudioError, AudioTooLong
from afnext.clip import prepare_clip
from afnext.engine import Engine
from afnext.events import ReasoningDelta, TextDelta, TurnDone
from afnext import split
from afnext.conversation import ONE_RECORDING
from afnext.pool import Lease, Message, PartedPool, SessionPool, audio_key
from afnext.sampling import GenerationOptions
from afnext.session import PENDING, ContextFullError
from afnext.tts import Mute, SpeechResampler
from afnext.tts.chunker import SpeechChunker
from app import openai_wire as wire
from app.access import HOST_REFUSAL, Access, bearer
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
MAX_CLIPS = 32  # audio clips in one request: 131,072 tokens of context hold about 87 minutes of audio anyway


@dataclass(frozen=True)
class Target:
    """What a model id names: an engine, its kept sessions, whether it reasons by default."""

    name: str
    engine: Engine
    pools: tuple[SessionPool, SessionPool]  # kept sessions of plain turns, and of Think turns
    think: bool
    synthesizer: object  # the voice, for replies asked for with audio


@dataclass
class Turn:
    """A request in afnext terms."""

    history: list[Message]
    asked: Message
    options: GenerationOptions
    think: bool
    stops: list[str]
    audio: wire.AudioOut | None  # speak the reply too, in this format


class Api:
    """The /v1 routes around the backend the page uses."""

    def __init__(self, loader: BackendLoader, api_key: str | None = None, access: Access | None = None) -> None:
        self.loader, self.api_key = loader, api_key
        self.access = access or Access(api_key)  # the Host check of a server on 127.0.0.1 (DNS rebinding)
        self._pools: dict[int, tuple[SessionPool, SessionPool]] = {}
        self._parted: dict[int, tuple[PartedPool, PartedPool]] = {}
        self._lock = threading.Lock()
        self._turns = 0  # requests being answered (touched on the event loop only)
        self._reading = 0  # bytes of bodies held until their turn has started (event loop only)

    def routes(self) -> list[Route]:
        """The endpoints, and OpenAI-shaped answers for every other path or method under /v1."""
        return [Route("/v1/models", _only("GET", self.models), methods=ANY_METHOD),
                Route("/v1/chat/completions", _only("POST", self.chat), methods=ANY_METHOD),
                Route("/v1/{rest:path}", _unknown, methods=ANY_METHOD)]

    async def models(self, request: Request) -> JSONResponse:
        try:
            self._authorize(request)
            backend = self.loader.wait(0)
        except wire.WireError as exc:
            return _error(exc)
        except BackendUnavailable as exc:
            return _error(wire.WireError(503, str(exc), kind="service_unavailable"))
        roots = {"instruct": backend.main.loaded.name, "think": backend.think.loaded.name}
        return JSONResponse({"object": "list", "data": [{"id": name, "object": "model", "created": 0,
                                                         "owned_by": "nvidia", "root": root}
                                                        for name, root in roots.items()]})

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
                _pump(loop, items, reply.events())

        _WORKERS.submit(work)
        body, reply = await ready
        reply.items, reply.whole_reply = items, whole
        return body, reply

    def _begin(self, body: wire.ChatRequest, loop: asyncio.AbstractEventLoop) -> Reply:
        """Plan the turn, lease a session and start the turn. The new turn's own mistakes raise here,
        before any reply. A streamed reply that is not spoken is read on `loop` (`Reply.woken`); its
        turn is handed to the engine here."""
        target = self._target(body.model)
        turn = _turn(body, target)
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
        given = bearer(request.headers)
        if self.api_key is None and not self.access.host_ok(request.headers):
            raise wire.WireError(403, HOST_REFUSAL, kind="permission_error", code="host_not_allowed")
        if self.api_key is not None and not hmac.compare_digest(given.encode(), self.api_key.encode()):
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


class Reply:
    """One request's reply: streamed as chunks or gathered whole; keeps the session afterwards."""

    def __init__(self, target: Target, pool: SessionPool, lease: Lease, turn: Turn, cid: str) -> None:
        self.target, self.pool, self.lease, self.turn, self.cid = target, pool, lease, turn, cid
        self.stream = None
        self.items: asyncio.Queue | None = None  # a streamed reply's events, as the worker makes them
        self.woken: asyncio.Event | None = None  # set on the loop when the engine has more: a stream read there
        self.whole_reply: asyncio.Future | None = None  # `whole()`, made on the worker for an unstreamed reply
        self.cancel = threading.Event()  # the engine stops the turn (a stop sequence, or `abandon`)
        self.gone = threading.Event()  # the client left: nothing more is spoken either
        self.audio_id = wire.new_id("audio")
        self._voice = Voice(target.synthesizer, self.gone) if turn.audio is not None else None

    def abandon(self) -> None:
        """The client hung up: the turn stops before the engine's next step, and its speech at once."""
        self.gone.set()
        self.cancel.set()

    def whole(self) -> dict:
        content, reasoning, speech, done = [], [], [], None
        for kind, value in self.events():
            if kind == "content":
                content.append(value)
            elif kind == "reasoning":
                reasoning.append(value)
            elif kind == "audio":
                speech.append(value)
            else:
                done = value
        if done is None:
            raise RuntimeError("the turn was cancelled before its reply began")
        finish, reply = done
        message = {"content": "".join(content)}
        if self.turn.audio is not None:  # OpenAI's shape: the text is the audio's transcript
            data = wire.encode_audio(np.concatenate(speech) if speech else np.zeros(0, np.float32),
                                     self.turn.audio.format)
            message = {"content": None, "audio": {"id": self.audio_id, "data": base64.b64encode(data).decode(),
                                                  "expires_at": int(time.time()) + wire.AUDIO_KEPT_S,
                                                  "transcript": message["content"]}}
        if self.turn.think:
            message.update(reasoning_content="".join(reasoning), think_steps=_steps(reply))
        return wire.completion(self.cid, self.target.name, message, finish, self._usage(reply))

    async def sse(self, include_usage: bool):
        """The reply as server-sent events, as (text, more) pieces for `EventStream`. Events ready
        together go out in one write (each write is a wake-up of the client, and costs the server a
        system call): the opening chunk with the first event, the last ones with the end of the body;
        each event is still a chunk of its own."""
        created = int(time.time())

        def chunk(delta: dict | None, finish: str | None = None, use: dict | None = None) -> str:
            return _event(wire.chunk(self.cid, self.target.name, delta, finish, use, created=created, usage=include_usage))
        held = [chunk({"role": "assistant", "content": ""})]
        opening = True  # `held` holds the opening chunk alone: it waits for the first event
        try:
            async for kind, value in (_drain(self.items) if self.woken is None else self._read_on_loop()):
                if kind == "pending":  # nothing more for now: send what is held
                    if held and not opening:
                        yield "".join(held), True
                        held.clear()
                    continue
                opening = False
                if kind == "content" and self.turn.audio is not None:
                    held.append(chunk({"audio": {"id": self.audio_id, "transcript": value}}))
                elif kind == "audio":
                    held.append(chunk({"audio": {"id": self.audio_id, "data": wire.pcm16_b64(value),
                                                 "expires_at": int(time.time()) + wire.AUDIO_KEPT_S}}))
                elif kind == "content":
                    held.append(chunk({"content": value}))
                elif kind == "reasoning":
                    held.append(chunk({"reasoning_content": value}))
                else:
                    finish, reply = value
                    extra = {"think_steps": _steps(reply)} if self.turn.think else {}
                    held.append(chunk(extra, finish))
                    if include_usage:
                        held.append(chunk(None, use=self._usage(reply)))
        except Exception as exc:  # the headers are gone: say it in the stream, as vLLM does
            log.exception("streamed chat completion failed")
            held.append(_event(wire.WireError(500, f"The model failed on this request ({type(exc).__name__}).",
                                              kind="server_error").body()))
        finally:
            self.abandon()  # a client that hung up stops the turn before the engine's next step
        yield "".join(held) + "data: [DONE]\n\n", False

    async def _read_on_loop(self):
        """`events()` read on the event loop, never blocking it: ("pending", None) while the engine has
        nothing new, then the wait for its wake-up. A reader that stops early (a client gone) leaves the
        rest to a task that reads on, so the turn ends as it would have (stopped by `cancel`)."""
        events, ended = self.events(), False
        try:
            for item in events:
                if item[0] == "pending":
                    yield item
                    await self.woken.wait()
                    self.woken.clear()  # before the next read: a wake-up after it is not lost
                else:
                    yield item
            ended = True
        finally:
            if not ended:
                self.abandon()
                _READERS.add(task := asyncio.get_running_loop().create_task(_read_out(events, self.woken)))
                task.add_done_callback(_READERS.discard)

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Ask the new turn: raises for its own bad input. Without `loop`, nothing runs until `events()`
        is read (and reading blocks). With it, the turn is handed to the engine now, and `events()`,
        read on `loop`, never blocks: it yields ("pending", None) until `woken` is set there."""
        turn, read_on = self.turn, {}
        if loop is not None:
            self.woken = asyncio.Event()
            read_on["wake"] = partial(_call_on, loop, self.woken.set)
        self.stream = self.lease.session.ask(turn.asked.text, turn.asked.clip, think=turn.think,
                                             options=turn.options, cancel=self.cancel, **read_on)
        if loop is not None:  # the turn goes to the engine from this thread, at once
            self.stream = itertools.chain([next(self.stream)], self.stream)

    def events(self) -> Iterator[tuple[str, object]]:
        """("reasoning" | "content", text) as generated, then ("done", (finish_reason, Reply))."""
        turn, stop = self.turn, _StopScan(self.turn.stops)
        reply = None
        for event in self.stream:
            if event is PENDING:
                yield "pending", None
            elif isinstance(event, ReasoningDelta):
                yield "reasoning", event.text
            elif isinstance(event, TextDelta) and not stop.hit:
                if text := stop.feed(event.text):
                    yield "content", text
                    yield from self._speak(text)
                if stop.hit:
                    self.cancel.set()  # the engine stops; the answer up to the stop is still spoken
            elif isinstance(event, TurnDone):
                reply = event.reply
        if reply is None:  # cancelled before the reply began: the session is as it was
            self.pool.give_back(self.lease)
            return
        if tail := stop.flush():
            yield "content", tail
            yield from self._speak(tail)
        yield from self._speak(None)
        full = reply.prompt_tokens + len(reply.token_ids) >= self.target.engine.loaded.context_tokens
        finish = "length" if not stop.hit and (len(reply.token_ids) >= turn.options.max_new_tokens or full) else "stop"
        if not reply.interrupted:  # the session holds exactly what the client was sent: keep it
            self.pool.keep(self.lease, turn.asked, reply.answer)
        yield "done", (finish, reply)

    def _speak(self, text: str | None) -> Iterator[tuple[str, object]]:
        """Speech for the answer's text as its sentences complete (None: the answer is over)."""
        if self._voice is not None:
            for samples in self._voice.say(text):
                yield "audio", samples

    def _usage(self, reply) -> dict:
        return wire.usage(reply.prompt_tokens, len(reply.token_ids), self.lease.cached_tokens)


class EventStream(StreamingResponse):
    """A StreamingResponse of (text, more) pieces: the last one (more False) ends the body in the same
    write as its text, where StreamingResponse writes the end on its own."""

    async def stream_response(self, send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        more = True
        async for text, more in self.body_iterator:
            await send({"type": "http.response.body", "body": text.encode(), "more_body": more})
        if more:  # the pieces stopped short of the last one
            await send({"type": "http.response.body", "body": b"", "more_body": False})


class Voice:
    """An answer's text → 24 kHz speech, a sentence at a time, on a stage of its own (as the voice
    loop's): a slow voice (Pocket TTS) never holds the text deltas back. `say` hands the new text's
    complete pieces to the stage and returns the speech made so far; `say(None)` ends the answer and
    returns the rest once it is made. `cancel` (the client left) ends the stage."""

    def __init__(self, synthesizer, cancel: threading.Event) -> None:
        self.synthesizer, self.cancel = synthesizer, cancel
        self.chunker, self.resampler = SpeechChunker(), SpeechResampler(wire.AUDIO_OUT_RATE)
        self._pieces: queue.SimpleQueue = queue.SimpleQueue()  # text pieces, then None
        self._made: queue.SimpleQueue = queue.SimpleQueue()  # speech, an error, then _END
        self._stage: threading.Thread | None = None

    def say(self, text: str | None) -> Iterator[np.ndarray]:
        pieces = self.chunker.flush() if text is None else self.chunker.feed(TextDelta(text))
        if self._stage is None and (pieces or text is None):
            self._stage = threading.Thread(target=self._speak, name="afnext-api-voice", daemon=True)
            self._stage.start()
        for piece in pieces:
            self._pieces.put(piece)
        if text is None:
            self._pieces.put(None)
        while self._stage is not None:
            try:  # the answer's end waits for the rest of its speech; a delta takes what is ready
                made = self._made.get(timeout=None) if text is None else self._made.get_nowait()
            except queue.Empty:
                return
            if made is _END:
                return
            if isinstance(made, BaseException):
                raise made
            yield made

    def _speak(self) -> None:
        try:
            while not self.cancel.is_set():
                try:
                    piece = self._pieces.get(timeout=CANCEL_POLL_S)
                except queue.Empty:
                    continue
                if piece is None:
                    if len(tail := self.resampler.end()):
                        self._made.put(tail)
                    break
                for chunk in self.synthesizer.stream(piece, cancel=self.cancel):
                    if len(samples := self.resampler.push(chunk)):
                        self._made.put(samples)
        except Exception as exc:  # said by the reader, as the reply's failure
            self._made.put(exc)
        self._made.put(_END)


CANCEL_POLL_S = 0.1  # how often an idle voice stage looks at its cancel


class _StopScan:
    """Cuts the answer at the first stop sequence, holding back text that may begin one."""

    def __init__(self, stops: list[str]) -> None:
        self.stops, self.held, self.hit = stops, "", False

    def feed(self, text: str) -> str:
        self.held += text
        found = [i for i in (self.held.find(s) for s in self.stops) if i >= 0]
        if found:
            out, self.held, self.hit = self.held[:min(found)], "", True
            return out
        keep = max((n for s in self.stops for n in range(len(s) - 1, 0, -1) if self.held.endswith(s[:n])), default=0)
        out, self.held = self.held[:len(self.held) - keep], self.held[len(self.held) - keep:]
        return out

    def flush(self) -> str:
        out, self.held = ("" if self.hit else self.held), ""
        return out


def _inline(body: wire.ChatRequest) -> bool:
    """Whether `_begin` may run on the event loop: a streamed reply, text only in and out, few messages."""
    return (body.stream and "audio" not in (body.modalities or []) and len(body.messages) <= INLINE_MESSAGES
            and all(not isinstance(m.content, list) or all(isinstance(p, wire.TextPart) for p in m.content)
                    for m in body.messages))


def _turn(body: wire.ChatRequest, target: Target) -> Turn:
    """The request's messages and options in afnext terms (decodes the audio: run off the event loop)."""
    if body.n != 1:
        raise wire.WireError(400, "n must be 1: one reply per request.", param="n")
    if (refused := body.refused()) is not None:
        raise wire.WireError(400, refused[1], param=refused[0])
    audio = _audio_out(body)
    clips = sum(1 for m in body.messages if isinstance(m.content, list)
                for p in m.content if not isinstance(p, wire.TextPart))
    if clips > MAX_CLIPS:
        raise wire.WireError(400, f"The request holds {clips} audio clips; the limit is {MAX_CLIPS}.",
                             param="messages")
    last = len(body.messages) - 1
    messages = [_message(m, i, target.engine, now=i == last) for i, m in enumerate(body.messages)]
    if messages[-1].role != "user":
        raise wire.WireError(400, "The last message must be the user's.", param="messages")
    if any(m.role == "system" for m in messages[1:]):
        raise wire.WireError(400, "A system (or developer) message may only come first.", param="messages")
    limit = body.max_completion_tokens or body.max_tokens or GenerationOptions().max_new_tokens
    options = GenerationOptions(
        max_new_tokens=limit, min_new_tokens=limit if body.ignore_eos else min(body.min_tokens, limit),
        temperature=0.0 if body.temperature is None else body.temperature, top_p=1.0 if body.top_p is None else body.top_p,
        repetition_penalty=body.repetition_penalty, seed=body.seed)
    think = target.think if body.think is None else body.think
    return Turn(messages[:-1], messages[-1], options, think, body.stops(), audio)


def _audio_out(body: wire.ChatRequest) -> wire.AudioOut | None:
    """How the reply is to be spoken, if at all; streamed speech is pcm16, as OpenAI streams it."""
    if "audio" not in (body.modalities or []):
        return None
    audio = body.audio or wire.AudioOut(format="pcm16" if body.stream else "wav")
    if body.stream and audio.format != "pcm16":
        raise wire.WireError(400, "Streamed audio output is pcm16 (24 kHz); set audio.format to pcm16, or do not "
                                  "stream.", param="audio.format")
    return audio


def _message(message: wire.ChatMessage, index: int, engine: Engine, now: bool) -> Message:
    """A request's message in afnext terms. A clip is keyed by its base64 text and decoded `now` (the
    new turn) or only if no kept session holds it already: a follow-up resending a 30-minute
    recording would otherwise pay its decoding and features again (measured 1.5 s of a 1.65 s TTFT)."""
    role = "system" if message.role == "developer" else message.role
    parts = [wire.TextPart(type="text", text=message.content)] if isinstance(message.content, str) else (message.content or [])
    text = "\n".join(p.text for p in parts if isinstance(p, wire.TextPart))
    audio = [p for p in parts if not isinstance(p, wire.TextPart)]
    if len(audio) > 1:
        raise wire.WireError(400, f"messages.{index}: one audio clip per message; send the next one in another "
                                  "user message.", param=f"messages.{index}.content")
    if audio and role != "user":
        raise wire.WireError(400, f"messages.{index}: only user messages may hold audio.",
                             param=f"messages.{index}.content")
    if not audio:
        return Message(role, text)
    data = wire.audio_base64(audio[0])
    loaded = engine.loaded

    def clip():
        return prepare_clip(wire.decode_base64(data), loaded.mel_filters, max_seconds=loaded.max_audio_s)

    def recording():  # the bytes of a clip over the limit (heard in parts), else None
        raw = wire.decode_base64(data)
        return raw if split.longer_than(raw, loaded.max_audio_s) else None

    key = audio_key(data.encode("ascii", "replace"))
    if not now:
        return Message(role, text, None, key, clip, recording)
    raw = wire.decode_base64(data)
    try:
        made = prepare_clip(raw, loaded.mel_filters, max_seconds=loaded.max_audio_s)
    except AudioTooLong:  # over the limit: heard in parts. Known without decoding it again (an MP3 that
        # states no length was decoded up to the limit already); over 4 hours by its header is refused now.
        split.split_recording(raw).close()
        return Message(role, text, None, key, clip, lambda: raw)
    return Message(role, text, made, key, clip, lambda: None)


def _steps(reply) -> list[dict]:
    """Think steps as the response carries them; a recording heard in parts names each step's part."""
    return [{"start": s.start, "end": s.end, "text": s.text, **({"part": s.part} if s.part else {})}
            for s in reply.steps]


async def _answered(request: Request, reply: Reply) -> dict:
    """A whole reply (`whole()`, on the worker that prepared it); a client that hangs up meanwhile stops
    it (the engine frees its slot)."""
    done = reply.whole_reply
    while not done.done():
        await asyncio.wait({done}, timeout=DISCONNECT_POLL_S)
        if not done.done() and await request.is_disconnected():
            reply.abandon()
    return done.result()


def _call_on(loop: asyncio.AbstractEventLoop, fn) -> None:
    """`fn()` on `loop`, from any thread; nothing if the loop has closed (no one reads any more)."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(fn)


_READERS: set[asyncio.Task] = set()  # `_read_out` tasks: held, or the loop may drop them before they end


async def _read_out(events: Iterator, woken: asyncio.Event) -> None:
    """Read a stream its reader left (see `Reply._read_on_loop`) to its end: the turn, cancelled, stops
    within a step, and its session goes back to its pool as it would have."""
    try:
        for kind, _ in events:
            if kind == "pending":
                await woken.wait()
                woken.clear()
    except Exception:
        log.exception("a streamed chat completion failed after its client left")


def _settle(future: asyncio.Future, result, error) -> None:
    if not future.done():
        future.set_exception(error) if error is not None else future.set_result(result)


def _pump(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, items: Iterator) -> None:
    """A blocking iterator's items into `queue` on `loop`, then an end mark (with the error, if it
    failed). Runs until the iterator ends: a reply stops within a step once its cancel is set."""
    try:
        for item in items:
            loop.call_soon_threadsafe(queue.put_nowait, (item, None))
        loop.call_soon_threadsafe(queue.put_nowait, (_END, None))
    except BaseException as exc:
        loop.call_soon_threadsafe(queue.put_nowait, (_END, exc))


async def _drain(queue: asyncio.Queue):
    """What `_pump` puts in `queue`, as it comes; ("pending", None) before each wait for more."""
    while True:
        if queue.empty():
            yield "pending", None
        item, error = await queue.get()
        if error is not None:
            raise error
        if item is _END:
            return
        yield item


_END = object()


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


def _event(body: dict) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"
