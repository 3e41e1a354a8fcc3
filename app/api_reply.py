"""A turn's reply (`Reply`): its events streamed as server-sent events (`EventStream`) or gathered
whole, and spoken too when the request asks for audio (`Voice`, 24 kHz). Think mode puts the reasoning
in `reasoning_content` and the timestamped steps in `think_steps`; a stop sequence cuts the answer
(`_StopScan`). `_call_on`, `_read_out`, `pump` and `_drain` carry a reply's events between the API's
worker threads and the event loop.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import logging
import queue
import threading
import time
from collections.abc import Iterator
from functools import partial

import numpy as np

from starlette.responses import StreamingResponse

from afnext.events import PartsUsage, ReasoningDelta, TextDelta, TurnDone
from afnext.pool import Lease, SessionPool
from afnext.session import PENDING, Session
from afnext.tts import SpeechResampler
from afnext.tts.chunker import SpeechChunker
from app import openai_wire as wire
from app.api_turn import SPOKEN, Target, Turn

log = logging.getLogger(__name__)


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
        reply, said = None, []  # `said`: the answer the client gets
        for event in self.stream:
            if event is PENDING:
                yield "pending", None
            elif isinstance(event, ReasoningDelta):
                yield "reasoning", event.text
            elif isinstance(event, TextDelta) and not stop.hit:
                if text := stop.feed(event.text):
                    said.append(text)
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
            said.append(tail)
            yield "content", tail
            yield from self._speak(tail)
        yield from self._speak(None)
        if turn.audio is not None:  # a later request may name this reply by its audio id alone
            SPOKEN.keep(self.audio_id, "".join(said))
        full = reply.prompt_tokens + len(reply.token_ids) >= self.target.engine.loaded.context_tokens
        finish = "length" if not stop.hit and (len(reply.token_ids) >= turn.options.max_new_tokens or full) else "stop"
        if (kept := self._kept_as(reply, "".join(said))) is not None:
            self.pool.keep(self.lease, turn.asked, kept)
        yield "done", (finish, reply)

    def _kept_as(self, reply, sent: str) -> str | None:
        """The answer the turn's session is kept under (its next request resends it), or None: not kept.
        An answer stopped early (a stop sequence, a client that left) is kept too, its reply rewritten to
        the text the client was sent: the lease took the session out of the pool, and dropped, every
        later turn would prefill the whole conversation (recordings and all) again."""
        if not isinstance(self.lease.session, Session):  # a parted conversation: kept whole, or not at all
            return None if reply.interrupted else reply.answer
        if sent != reply.answer:
            try:
                self.lease.session.rewrite_reply(sent)
            except ValueError:  # text the session refuses (ContextFullError is one): not kept
                return None
        return sent  # the session holds exactly what the client was sent

    def _speak(self, text: str | None) -> Iterator[tuple[str, object]]:
        """Speech for the answer's text as its sentences complete (None: the answer is over)."""
        if self._voice is not None:
            for samples in self._voice.say(text):
                yield "audio", samples

    def _usage(self, reply) -> dict:
        """The merge's (or the one turn's) tokens, and about a recording heard in parts every part's too:
        what the server read and wrote for the request."""
        parts = reply.parts or PartsUsage(0, 0, 0)
        return wire.usage(reply.prompt_tokens + parts.prompt_tokens, len(reply.token_ids) + parts.completion_tokens,
                          self.lease.cached_tokens + parts.cached_tokens)


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


def _steps(reply) -> list[dict]:
    """Think steps as the response carries them; a recording heard in parts names each step's part."""
    return [{"start": s.start, "end": s.end, "text": s.text, **({"part": s.part} if s.part else {})}
            for s in reply.steps]


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


def pump(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, items: Iterator) -> None:
    """A blocking iterator's items into `queue` on `loop`, then an end mark (with the error, if it
    failed). Runs until the iterator ends: a reply stops within a step once its cancel is set."""
    try:
        for item in items:
            loop.call_soon_threadsafe(queue.put_nowait, (item, None))
        loop.call_soon_threadsafe(queue.put_nowait, (_END, None))
    except BaseException as exc:
        loop.call_soon_threadsafe(queue.put_nowait, (_END, exc))


async def _drain(queue: asyncio.Queue):
    """What `pump` puts in `queue`, as it comes; ("pending", None) before each wait for more."""
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


def _event(body: dict) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"
