"""The Talk tab's voice channel: a WebSocket route next to the Gradio app.

Gradio's own streamed audio is served as HLS and adds seconds before the first sound, so the page
talks to the assistant over one WebSocket instead:

page → server   text  {"type": "hello", "sample_rate": 16000}   first message: the microphone's rate;
                      optional: "play_rate" (Hz the page plays at; default sample_rate), "half_duplex",
                      "think" (bool, for this connection); then any of
                      {"type": "ptt", "down": true|false}        push-to-talk pressed / released
                      {"type": "mode", "ptt": true|false}        push-to-talk on (no voice detection) or off
                binary int16 mono PCM at the hello's rate, ~20 ms per message
server → page   text  {"type": "ready"|"state"|"speech_started"|"user_turn"|"text"|"reasoning"|
                       "interrupted"|"turn_done"|"notice"|"error", ...}
                binary HEADER + int16 PCM, HEADER = <u8 kind, 3 pad bytes, u32 turn id, u32 sample rate>,
                       kind 1: reply speech, at the hello's play_rate (the page's own: gapless, sample-exact),
                       kind 2: the user's turn as the server heard it, 16 kHz (for replay)

Threads per connection: the event loop only moves messages; a feeder thread pushes microphone audio
into the `Assistant` (a push may wait up to one decoding step on a barge-in), and a reader thread
turns the assistant's events into messages.
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import re
import struct
import threading
import time
from dataclasses import dataclass, replace
from functools import partial

import numpy as np
from starlette.websockets import WebSocket, WebSocketDisconnect

from afnext.assistant import Assistant, AssistantOptions, Stamped, StateChanged, UserTurn, VoiceTurnDone
from afnext.audio import SAMPLE_RATE, to_mono_16k
from afnext.events import AudioChunk, Error, Interrupted, ReasoningDelta, TextDelta
from afnext.session import Session
from afnext.tts import SpeechResampler
from afnext.vad import SpeechStarted

from .backend import BackendLoader, BackendUnavailable, int16

log = logging.getLogger(__name__)

ROUTE = "/afnext/talk"
HEADER = struct.Struct("<BxxxII")  # kind, turn id, sample rate: 12 bytes, so the PCM after it is 2-byte aligned
REPLY_AUDIO, USER_AUDIO = 1, 2
IDLE_S = 600.0  # a conversation nobody has been connected to for 10 minutes is dropped (its KV cache freed)
MAX_CONVERSATIONS = 64  # held at once; a new page beyond that is told to come back later
MIC_BACKLOG_BLOCKS = 500  # ~10 s of 20 ms blocks: the feeder is never that far behind unless the server is stuck
MIN_PTT_S = 0.25  # a push-to-talk press shorter than this is a slip, not a turn (the endpointer's min speech)
_CLIENT_ID = re.compile(r"[A-Za-z0-9-]{8,64}")


@dataclass
class _Conversation:
    session: Session
    last_seen: float  # time.monotonic() of the last disconnection (or the creation)
    turns: int = 0  # user turns so far: turn ids go on across reconnections
    link: _Link | None = None  # the one live connection


class TalkBusy(RuntimeError):
    """Too many conversations are held; the message says so in one sentence."""


class TalkRegistry:
    """The Talk conversations, one per page: the page names its own random client id, so a page
    that stops and starts the microphone keeps its conversation and never sees another page's.

    A conversation has at most one live connection (a new one closes the old); one nobody has been
    connected to for `idle_s` is dropped, and with it its KV cache.
    """

    def __init__(self, loader: BackendLoader, options: AssistantOptions = AssistantOptions(), *,
                 idle_s: float = IDLE_S, max_conversations: int = MAX_CONVERSATIONS) -> None:
        self.loader, self.options = loader, options
        self.idle_s, self.max_conversations = idle_s, max_conversations
        self._conversations: dict[str, _Conversation] = {}
        self._closing: set[threading.Thread] = set()  # links of ended connections, still closing
        self._lock = threading.Lock()

    def attach(self, client: str, rate: int, send, options: AssistantOptions | None = None,
               play_rate: int | None = None) -> _Link:
        """A live link into `client`'s conversation (kept or new). Blocks while an older link of the
        same conversation shuts down (at most one decoding step). Raises TalkBusy."""
        backend = self.loader.wait()
        with self._lock:
            self._expire()
            conv = self._conversations.get(client)
            if conv is None:
                if len(self._conversations) >= self.max_conversations:
                    raise TalkBusy("The server is holding as many voice conversations as it can; try again in a few "
                                   "minutes.")
                conv = self._conversations[client] = _Conversation(Session(backend.main), time.monotonic())
            old, conv.link = conv.link, None
        if old is not None:
            old.close()
        link = _Link(conv, Assistant(conv.session, backend.synthesizer, options or self.options), rate, send,
                     play_rate or rate)
        with self._lock:
            conv.link = link
        return link

    def retire(self, client: str, link: _Link) -> None:
        """`detach` on a thread of its own: closing waits for the turn (one decoding step), and must
        happen even when the connection's coroutine is being cancelled (server shutdown)."""
        thread = threading.Thread(target=self.detach, args=(client, link), name="afnext-talk-close", daemon=True)
        with self._lock:
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
            links = [(client, conv.link) for client, conv in self._conversations.items() if conv.link is not None]
        for client, link in links:
            self.retire(client, link)
        self.wait_closed(timeout)

    def detach(self, client: str, link: _Link) -> None:
        """`link`'s connection ended: close it; the conversation waits `idle_s` for the page to come back."""
        link.close()
        with self._lock:
            conv = self._conversations.get(client)
            if conv is not None and conv.link is link:
                conv.link, conv.last_seen = None, time.monotonic()
            self._expire()

    def __len__(self) -> int:
        return len(self._conversations)

    def _expire(self) -> None:
        now = time.monotonic()
        for client, conv in list(self._conversations.items()):
            if conv.link is None and now - conv.last_seen > self.idle_s:
                del self._conversations[client]


async def serve(ws: WebSocket, registry: TalkRegistry) -> None:
    """One page's voice channel, until the page goes away."""
    await ws.accept()
    client = ws.query_params.get("client", "")
    try:
        rate, hello = _hello(await ws.receive_text(), client)
        play_rate = _rate(hello.get("play_rate", rate))
    except ValueError as exc:  # our own sentences
        await _refuse(ws, str(exc), 1008)
        return
    except (KeyError, TypeError, AttributeError):
        await _refuse(ws, "The voice channel could not read the page's hello message; reload the page.", 1008)
        return
    except WebSocketDisconnect:
        return
    if not registry.loader.ready:
        await ws.send_text(json.dumps({"type": "state", "state": "loading", "waiting": 0}))
    loop, outbox = asyncio.get_running_loop(), asyncio.Queue()
    try:
        options = replace(registry.options, half_duplex=bool(hello.get("half_duplex")), think=bool(hello.get("think")))
        link = await asyncio.to_thread(registry.attach, client, rate, partial(loop.call_soon_threadsafe, outbox.put_nowait),
                                       options, play_rate)
    except (BackendUnavailable, TalkBusy) as exc:
        await _refuse(ws, str(exc), 1013)
        return
    sender = asyncio.create_task(_send_all(ws, outbox))
    try:
        await ws.send_text(json.dumps({"type": "ready", "turns": link.conversation.turns}))
        while (message := await ws.receive())["type"] != "websocket.disconnect":
            if link.closed:  # the same page connected again: this older connection is over
                await _refuse(ws, "This conversation went on in a newer connection.", 1000)
                break
            if message.get("bytes"):
                link.audio(message["bytes"])
            elif message.get("text"):
                link.control(json.loads(message["text"]))
    except (WebSocketDisconnect, RuntimeError, ValueError) as exc:
        log.info("talk channel %s… ended: %s", client[:8], exc)
    finally:
        sender.cancel()
        registry.retire(client, link)


async def _refuse(ws: WebSocket, message: str, code: int) -> None:
    """One sentence to the page, then close (the close reason repeats it, cut to the protocol's limit)."""
    await ws.send_text(json.dumps({"type": "error", "message": message}))
    await ws.close(code=code, reason=message.encode()[:120].decode(errors="ignore"))


def _hello(text: str, client: str) -> tuple[int, dict]:
    if not _CLIENT_ID.fullmatch(client):
        raise ValueError("The page did not name a valid client id; reload the page.")
    hello = json.loads(text)
    if hello.get("type") != "hello":
        raise ValueError("The voice channel expected a hello message first; reload the page.")
    return _rate(hello["sample_rate"]), hello


def _rate(value) -> int:
    try:
        rate = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"The voice channel could not read the sample rate {value!r}; reload the page.") from None
    if not 8000 <= rate <= 192000:
        raise ValueError(f"A sample rate of {rate} Hz is not supported (8-192 kHz).")
    return rate


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


class _Link:
    """Moves one connection's audio into the assistant and its events out as messages."""

    def __init__(self, conversation: _Conversation, assistant: Assistant, rate: int, send, play_rate: int) -> None:
        self.conversation, self.assistant, self.send = conversation, assistant, send
        self.rate, self.play_rate = rate, play_rate  # Hz of the microphone; Hz the page plays reply speech at
        # Unbounded, so the event loop never blocks on it; audio() keeps the backlog bounded instead.
        self._inbox: queue.Queue = queue.Queue()
        self._ptt = False  # push-to-talk mode: the endpointer hears silence, the button makes turns
        self._held: list[np.ndarray] | None = None  # audio while the button is down
        self._closed = threading.Event()
        self._orphaned = False  # the connection's event loop is gone (server shutting down)
        self._voice = SpeechResampler(play_rate)  # the reply's speech → the page's rate, one stream per turn
        self._threads = [threading.Thread(target=self._feed, name="afnext-talk-feed", daemon=True),
                         threading.Thread(target=self._read, name="afnext-talk-read", daemon=True)]
        for thread in self._threads:
            thread.start()

    def audio(self, data: bytes) -> None:
        """Microphone PCM from the page (event loop: never blocks)."""
        if self._inbox.qsize() > MIC_BACKLOG_BLOCKS:
            log.warning("talk channel: the feeder is %d blocks behind; dropping microphone audio", MIC_BACKLOG_BLOCKS)
            return
        self._inbox.put_nowait(np.frombuffer(data[: len(data) // 2 * 2], np.int16))

    def control(self, message: dict) -> None:
        """A control message from the page, kept in order with the audio around it (never blocks)."""
        self._inbox.put_nowait(message)

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def close(self) -> None:
        """Stop feeding, cancel any turn, end the event stream; joins both threads. Idempotent."""
        if self._closed.is_set():
            return
        self._closed.set()
        self._inbox.put_nowait(None)
        self._threads[0].join(5.0)
        self.assistant.close()
        self._threads[1].join(5.0)

    def _feed(self) -> None:
        while (item := self._inbox.get()) is not None:
            try:
                if isinstance(item, dict):
                    self._on_control(item)
                elif self._ptt:
                    if self._held is not None:
                        self._held.append(item)
                    self.assistant.push(np.zeros(len(item), np.int16), self.rate)  # keep the clock
                else:
                    self.assistant.push(item, self.rate)
            except Exception:  # a bad message must not end the conversation
                log.exception("talk channel: could not handle %s", type(item).__name__)

    def _on_control(self, message: dict) -> None:
        kind = message.get("type")
        if kind == "mode":
            self._ptt, self._held = bool(message.get("ptt")), None
            if self._ptt:  # speech the endpointer was in the middle of is not a turn any more
                self.assistant.forget_speech()
        elif kind == "ptt" and self._ptt:
            if message.get("down"):
                self._held = []
                self.assistant.interrupt()
            elif self._held is not None:
                held, self._held = self._held, None
                audio = to_mono_16k(np.concatenate(held), self.rate) if held else np.zeros(0, np.float32)
                if len(audio) < MIN_PTT_S * SAMPLE_RATE:
                    self.send({"type": "notice", "message": "Hold the button down while you speak; that press "
                                                            "was too short to hear."})
                    return
                self.assistant.say(audio)

    def _read(self) -> None:
        for event in self.assistant.events():
            if self.closed or self._orphaned:  # what a closing assistant says is for nobody
                continue
            try:
                for message in self._messages(event):
                    self.send(message)
            except RuntimeError:  # the connection's event loop is gone: nobody is listening
                self._orphaned = True
            except Exception:
                log.exception("talk channel: could not send %s", type(event).__name__)

    def _speech(self, turn: int, chunk: AudioChunk) -> list:
        """Reply audio at the page's own rate, resampled as one stream per turn: the page then plays
        the chunks back to back, sample-exact, with no resampling of its own at chunk edges."""
        samples = self._voice.push(chunk)
        return [self._pcm(REPLY_AUDIO, turn, samples)] if len(samples) else []

    def _pcm(self, kind: int, turn: int, samples: np.ndarray) -> bytes:
        return HEADER.pack(kind, turn, self.play_rate) + int16(samples).tobytes()

    def _messages(self, event) -> list:
        t = event.t if isinstance(event, Stamped) else None
        inner = event.event if isinstance(event, Stamped) else event
        turn = self.conversation.turns
        if isinstance(inner, AudioChunk):
            return self._speech(turn, inner)
        if isinstance(inner, UserTurn):
            turn = self.conversation.turns = turn + 1  # only this link's reader thread counts
            return [{"type": "user_turn", "id": turn, "start": inner.start, "end": inner.end, "t": inner.t},
                    HEADER.pack(USER_AUDIO, turn, SAMPLE_RATE) + int16(inner.audio).tobytes()]
        if isinstance(inner, (TextDelta, ReasoningDelta)):
            kind = "text" if isinstance(inner, TextDelta) else "reasoning"
            return [{"type": kind, "id": turn, "text": inner.text}]
        if isinstance(inner, StateChanged):
            return [{"type": "state", "state": inner.state, "t": inner.t,
                     "waiting": self.assistant.session.engine.waiting}]
        if isinstance(inner, SpeechStarted):
            return [{"type": "speech_started", "t": inner.t}]
        if isinstance(inner, Interrupted):
            self._voice.drop()  # what the filter still holds is not to be heard
            return [{"type": "interrupted", "id": turn, "reason": inner.reason, "t": t}]
        if isinstance(inner, Error):
            return [{"type": "error", "message": inner.message}]
        if isinstance(inner, VoiceTurnDone):
            tail = self._voice.end()
            timings = inner.timings
            done = {"type": "turn_done", "id": turn, "endpoint_s": timings.endpoint_s,
                    "ttft_s": timings.ttft_s, "first_audio_s": timings.first_audio_s}
            return ([self._pcm(REPLY_AUDIO, turn, tail)] if len(tail) else []) + [done]
        return []
