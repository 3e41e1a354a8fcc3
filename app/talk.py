"""The Talk tab's voice channel: a WebSocket route next to the Gradio app.

Gradio's own streamed audio is served as HLS and adds seconds before the first sound, so the page
talks to the assistant over one WebSocket instead:

page → server   text  {"type": "hello", "sample_rate": 48000}   first message; then any of
                      {"type": "ptt", "down": true|false}        push-to-talk pressed / released
                      {"type": "mode", "ptt": true|false}        push-to-talk on (no voice detection) or off
                binary int16 mono PCM at the hello's rate, ~20 ms per message
server → page   text  {"type": "ready"|"state"|"speech_started"|"user_turn"|"text"|"reasoning"|
                       "interrupted"|"turn_done"|"error", ...}
                binary HEADER + int16 PCM, HEADER = <u8 kind, 3 pad bytes, u32 turn id, u32 sample rate>,
                       kind 1: reply speech, kind 2: the user's turn as the server heard it (for replay)

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
from dataclasses import dataclass

import numpy as np
from starlette.websockets import WebSocket, WebSocketDisconnect

from afnext.assistant import Assistant, AssistantOptions, Stamped, StateChanged, UserTurn, VoiceTurnDone
from afnext.audio import SAMPLE_RATE, to_mono_16k
from afnext.events import AudioChunk, Error, Interrupted, ReasoningDelta, TextDelta
from afnext.session import Session
from afnext.vad import SpeechStarted

from .backend import BackendLoader, int16

log = logging.getLogger(__name__)

ROUTE = "/afnext/talk"
HEADER = struct.Struct("<BxxxII")  # kind, turn id, sample rate: 12 bytes, so the PCM after it is 2-byte aligned
REPLY_AUDIO, USER_AUDIO = 1, 2
IDLE_S = 3600.0  # a conversation nobody has connected to for an hour is dropped (its KV cache freed)
MIC_QUEUE_BLOCKS = 500  # ~10 s of 20 ms blocks: the feeder is never that far behind unless the server is stuck
_CLIENT_ID = re.compile(r"[A-Za-z0-9-]{8,64}")


@dataclass
class _Conversation:
    session: Session
    last_seen: float
    connected: int = 0


class TalkRegistry:
    """The Talk conversations, one per page: the page names its own random client id, so a page
    that stops and starts the microphone keeps its conversation and never sees another page's."""

    def __init__(self, loader: BackendLoader, options: AssistantOptions = AssistantOptions()) -> None:
        self.loader, self.options = loader, options
        self._conversations: dict[str, _Conversation] = {}
        self._lock = threading.Lock()

    def open(self, client: str) -> Session:
        with self._lock:
            self._expire()
            conv = self._conversations.get(client)
            if conv is None:
                conv = self._conversations[client] = _Conversation(Session(self.loader.wait().main), time.monotonic())
            conv.connected += 1
            return conv.session

    def close(self, client: str) -> None:
        with self._lock:
            conv = self._conversations.get(client)
            if conv is not None:
                conv.connected -= 1
                conv.last_seen = time.monotonic()

    def __len__(self) -> int:
        return len(self._conversations)

    def _expire(self) -> None:
        now = time.monotonic()
        for client, conv in list(self._conversations.items()):
            if not conv.connected and now - conv.last_seen > IDLE_S:
                del self._conversations[client]


async def serve(ws: WebSocket, registry: TalkRegistry) -> None:
    """One page's voice channel, until the page goes away."""
    await ws.accept()
    client = ws.query_params.get("client", "")
    try:
        rate = _hello(await ws.receive_text(), client)
    except (ValueError, KeyError, TypeError) as exc:
        await ws.send_text(json.dumps({"type": "error", "message": str(exc)}))
        await ws.close(code=1008)
        return
    except WebSocketDisconnect:
        return
    if not registry.loader.ready:
        await ws.send_text(json.dumps({"type": "state", "state": "loading", "waiting": 0}))
    try:
        backend = await asyncio.to_thread(registry.loader.wait)
    except RuntimeError as exc:
        await ws.send_text(json.dumps({"type": "error", "message": str(exc)}))
        await ws.close(code=1011)
        return
    loop, outbox = asyncio.get_running_loop(), asyncio.Queue()
    session = registry.open(client)
    link = _Link(Assistant(session, backend.synthesizer, registry.options), rate,
                 lambda message: loop.call_soon_threadsafe(outbox.put_nowait, message))
    sender = asyncio.create_task(_send_all(ws, outbox))
    try:
        await ws.send_text(json.dumps({"type": "ready", "turns": len(session.messages) // 2}))
        while (message := await ws.receive())["type"] != "websocket.disconnect":
            if message.get("bytes"):
                link.audio(message["bytes"])
            elif message.get("text"):
                link.control(json.loads(message["text"]))
    except (WebSocketDisconnect, RuntimeError, ValueError) as exc:
        log.info("talk channel %s… ended: %s", client[:8], exc)
    finally:
        await asyncio.to_thread(link.close)
        sender.cancel()
        registry.close(client)


def _hello(text: str, client: str) -> int:
    if not _CLIENT_ID.fullmatch(client):
        raise ValueError("The page did not name a valid client id; reload the page.")
    hello = json.loads(text)
    if hello.get("type") != "hello":
        raise ValueError("The voice channel expected a hello message first; reload the page.")
    rate = int(hello["sample_rate"])
    if not 8000 <= rate <= 192000:
        raise ValueError(f"A microphone rate of {rate} Hz is not supported (8-192 kHz).")
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

    def __init__(self, assistant: Assistant, rate: int, send) -> None:
        self.assistant, self.rate, self.send = assistant, rate, send
        self._inbox: queue.Queue = queue.Queue(MIC_QUEUE_BLOCKS)
        self._ptt = False  # push-to-talk mode: the endpointer hears silence, the button makes turns
        self._held: list[np.ndarray] | None = None  # audio while the button is down
        self._turn = 0
        self._threads = [threading.Thread(target=self._feed, name="afnext-talk-feed", daemon=True),
                         threading.Thread(target=self._read, name="afnext-talk-read", daemon=True)]
        for thread in self._threads:
            thread.start()

    def audio(self, data: bytes) -> None:
        pcm = np.frombuffer(data[: len(data) // 2 * 2], np.int16)
        try:
            self._inbox.put_nowait(pcm)
        except queue.Full:  # keep the newest audio: the user's latest words matter most
            log.warning("talk channel: the feeder is behind; dropping old microphone audio")
            self._inbox.get_nowait()
            self._inbox.put_nowait(pcm)

    def control(self, message: dict) -> None:
        self._inbox.put(message)  # in order with the audio around it

    def close(self) -> None:
        self._inbox.put(None)
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
        elif kind == "ptt" and self._ptt:
            if message.get("down"):
                self._held = []
                self.assistant.interrupt()
            elif self._held is not None:
                held, self._held = self._held, None
                if held:
                    self.assistant.say(to_mono_16k(np.concatenate(held), self.rate))

    def _read(self) -> None:
        for event in self.assistant.events():
            try:
                for message in self._messages(event):
                    self.send(message)
            except Exception:
                log.exception("talk channel: could not send %s", type(event).__name__)

    def _messages(self, event) -> list:
        t = event.t if isinstance(event, Stamped) else None
        inner = event.event if isinstance(event, Stamped) else event
        if isinstance(inner, AudioChunk):
            return [HEADER.pack(REPLY_AUDIO, self._turn, inner.sample_rate) + int16(inner.samples).tobytes()]
        if isinstance(inner, UserTurn):
            self._turn += 1
            return [{"type": "user_turn", "id": self._turn, "start": inner.start, "end": inner.end, "t": inner.t},
                    HEADER.pack(USER_AUDIO, self._turn, SAMPLE_RATE) + int16(inner.audio).tobytes()]
        if isinstance(inner, (TextDelta, ReasoningDelta)):
            kind = "text" if isinstance(inner, TextDelta) else "reasoning"
            return [{"type": kind, "id": self._turn, "text": inner.text}]
        if isinstance(inner, StateChanged):
            return [{"type": "state", "state": inner.state, "t": inner.t,
                     "waiting": self.assistant.session.engine.waiting}]
        if isinstance(inner, SpeechStarted):
            return [{"type": "speech_started", "t": inner.t}]
        if isinstance(inner, Interrupted):
            return [{"type": "interrupted", "id": self._turn, "reason": inner.reason, "t": t}]
        if isinstance(inner, Error):
            return [{"type": "error", "message": inner.message}]
        if isinstance(inner, VoiceTurnDone):
            timings = inner.timings
            return [{"type": "turn_done", "id": self._turn, "endpoint_s": timings.endpoint_s,
                     "ttft_s": timings.ttft_s, "first_audio_s": timings.first_audio_s}]
        return []
