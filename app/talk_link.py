"""One Talk connection's link (app/talk.py): microphone audio and control messages into an `Assistant`,
its events out as the page's messages (the protocol is at the top of app/talk.py).

Two threads per link: a feeder pushes audio and controls into the assistant in order (a push may wait
up to one decoding step on a barge-in), a reader turns the assistant's events into messages. Every
inbound buffer is bounded in bytes or count; the event loop never blocks on either thread.
"""

from __future__ import annotations

import logging
import queue
import struct
import threading
from typing import TYPE_CHECKING

import numpy as np

from afnext.assistant import Assistant, Stamped, StateChanged, UserTurn, VoiceTurnDone
from afnext.audio import SAMPLE_RATE, to_mono_16k
from afnext.events import AudioChunk, Error, Interrupted, ReasoningDelta, TextDelta
from afnext.tts import SpeechResampler
from afnext.vad import SpeechStarted

from .backend import int16
from .talk_wire import Mode, Ptt

if TYPE_CHECKING:
    from .talk import _Conversation

log = logging.getLogger(__name__)

HEADER = struct.Struct("<BxxxII")  # kind, turn id, sample rate: 12 bytes, so the PCM after it is 2-byte aligned
REPLY_AUDIO, USER_AUDIO = 1, 2
MIC_BACKLOG_S = 10.0  # microphone audio waiting for the feeder; beyond it is dropped (the server is stuck)
MAX_PENDING_CONTROLS = 64  # control messages waiting for the feeder; beyond, the page is flooding and let go
MAX_PTT_S = 30.0  # seconds of one push-to-talk press that are heard (the endpointer's limit on an utterance)
MIN_PTT_S = 0.25  # a push-to-talk press shorter than this is a slip, not a turn (the endpointer's min speech)


class Link:
    """Moves one connection's audio into the assistant and its events out as messages."""

    def __init__(self, conversation: _Conversation, assistant: Assistant, rate: int, send, play_rate: int) -> None:
        self.conversation, self.assistant, self.send = conversation, assistant, send
        self.rate, self.play_rate = rate, play_rate  # Hz of the microphone; Hz the page plays reply speech at
        # Audio arrays and controls. Unbounded, so the event loop never blocks on it; audio() and control()
        # bound it instead, counting under _counts what the feeder has not taken yet.
        self._inbox: queue.Queue = queue.Queue()
        self._counts = threading.Lock()
        self._backlog_bytes, self._controls = 0, 0
        self._max_backlog_bytes = round(MIC_BACKLOG_S * rate) * 2  # int16 at the hello's rate
        self._dropping = False  # dropping microphone audio (logged once, not per message)
        self._ptt = False  # push-to-talk mode: the endpointer hears silence, the button makes turns
        self._held: list[np.ndarray] | None = None  # audio while the button is down
        self._held_samples, self._max_held_samples = 0, round(MAX_PTT_S * rate)
        self._closed = threading.Event()
        self._closing = threading.Lock()  # a second close() waits until the first has finished
        self._orphaned = False  # the connection's event loop is gone (server shutting down)
        self._voice = SpeechResampler(play_rate)  # the reply's speech → the page's rate, one stream per turn
        self._threads = [threading.Thread(target=self._feed, name="afnext-talk-feed", daemon=True),
                         threading.Thread(target=self._read, name="afnext-talk-read", daemon=True)]
        for thread in self._threads:
            thread.start()

    def audio(self, data: bytes) -> None:
        """Microphone PCM from the page (event loop: never blocks). Dropped while MIC_BACKLOG_S of it wait
        for the feeder: the server is stuck, and the page must not fill its memory meanwhile."""
        pcm = np.frombuffer(data[: len(data) // 2 * 2], np.int16)
        with self._counts:
            full = self._backlog_bytes + pcm.nbytes > self._max_backlog_bytes
            self._backlog_bytes += 0 if full else pcm.nbytes
        if full and not self._dropping:
            log.warning("talk channel: the feeder is %.0f s behind; dropping microphone audio", MIC_BACKLOG_S)
        self._dropping = full
        if not full and len(pcm):
            self._inbox.put_nowait(pcm)

    def control(self, message: Ptt | Mode) -> None:
        """A control message, kept in order with the audio around it (never blocks). ValueError with one
        sentence when MAX_PENDING_CONTROLS wait already: controls cannot be dropped, so a flood ends it."""
        with self._counts:
            if self._controls >= MAX_PENDING_CONTROLS:
                raise ValueError("The page sent control messages faster than the server could act on them; "
                                 "reload the page.")
            self._controls += 1
        self._inbox.put_nowait(message)

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def close(self) -> None:
        """Stop feeding, cancel any turn, end the event stream; joins both threads. Idempotent; returns
        only once closed, so a newer link never starts on a half-closed one."""
        with self._closing:
            if self._closed.is_set():
                return
            self._closed.set()
            self._inbox.put_nowait(None)
            self._threads[0].join(5.0)
            self.assistant.close()
            self._threads[1].join(5.0)

    def _feed(self) -> None:
        while (item := self._inbox.get()) is not None:
            with self._counts:
                if isinstance(item, np.ndarray):
                    self._backlog_bytes -= item.nbytes
                else:
                    self._controls -= 1
            try:
                if isinstance(item, np.ndarray):
                    self._on_audio(item)
                else:
                    self._on_control(item)
            except Exception:  # a bad message must not end the conversation
                log.exception("talk channel: could not handle %s", type(item).__name__)

    def _on_audio(self, pcm: np.ndarray) -> None:
        if not self._ptt:
            self.assistant.push(pcm, self.rate)
            return
        room = self._max_held_samples - self._held_samples
        if self._held is not None and room > 0:  # the first MAX_PTT_S of the press
            kept = pcm if len(pcm) <= room else pcm[:room].copy()  # a copy: a view would keep the whole message
            self._held.append(kept)
            self._held_samples += len(kept)
        self.assistant.push(np.zeros(len(pcm), np.int16), self.rate)  # keep the clock

    def _on_control(self, message: Ptt | Mode) -> None:
        if isinstance(message, Mode):
            self._ptt, self._held = message.ptt, None
            if self._ptt:  # speech the endpointer was in the middle of is not a turn any more
                self.assistant.forget_speech()
        elif self._ptt and message.down:
            self._held, self._held_samples = [], 0
            self.assistant.interrupt()
        elif self._ptt and self._held is not None:
            held, self._held = self._held, None
            audio = to_mono_16k(np.concatenate(held), self.rate) if held else np.zeros(0, np.float32)
            if len(audio) < MIN_PTT_S * SAMPLE_RATE:
                self.send({"type": "notice", "message": "Hold the button down while you speak; that press "
                                                        "was too short to hear."})
                return
            if self._held_samples >= self._max_held_samples:
                self.send({"type": "notice", "message": f"Only the first {MAX_PTT_S:g} s of that press were heard."})
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
