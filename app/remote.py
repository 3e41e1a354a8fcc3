"""A `VoiceBrain` on another machine: the desktop loop as a client of a server's `/v1/realtime`.

    python -m app.desktop --server http://gpu-box:7860/ [--api-key KEY]

The microphone goes up as OpenAI Realtime `input_audio_buffer.append` events (pcm16 at 24 kHz, the
server's VAD ends the turns); the server's events come back as the events a local `Assistant`
gives, so the desktop loop cannot tell the difference. Speech over a reply stops its playback at
once and tells the server how much of it was heard (`conversation.item.truncate`). Imports neither
torch nor transformers: a laptop without them can be the microphone of a GPU box.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from urllib.parse import urlencode, urlsplit, urlunsplit

import numpy as np
from websockets.exceptions import ConnectionClosed, WebSocketException
from websockets.sync.client import connect

from afnext.audio import MonoResampler
from afnext.events import (END_OF_EVENTS, AudioChunk, Error, Interrupted, ReasoningDelta, Stamped, StateChanged,
                           TextDelta, UserTurn, VoiceTimings, VoiceTurnDone, drain)

from . import realtime_wire as wire

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 10.0
# How long quitting waits for the server to answer the closing handshake (milliseconds when it is there):
# on a stalled network websockets' own 10 s, and the reader's join after it, kept Ctrl-C waiting 15 s.
CLOSE_TIMEOUT_S = 2.0
MAX_SERVER_MESSAGE_BYTES = 16 << 20  # a server event: audio deltas are a few hundred ms each


class RemoteError(RuntimeError):
    """The server cannot be reached or refused the conversation; the message says why."""


class RemoteBrain:
    """Push microphone audio with `push`; read events with `events()`, as from a local `Assistant`."""

    def __init__(self, server: str, sample_rate: int, *, half_duplex: bool = False, think: bool = False,
                 api_key: str | None = None, semantic: bool = True) -> None:
        self.sample_rate, self.interrupts = sample_rate, not half_duplex
        self.url = realtime_url(server, "think" if think else "instruct")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
        self._ws = None
        try:
            self._ws = connect(self.url, open_timeout=CONNECT_TIMEOUT_S, close_timeout=CLOSE_TIMEOUT_S,
                               max_size=MAX_SERVER_MESSAGE_BYTES, additional_headers=headers,
                               legacy=True)  # held, not a with-block
            first = wire.server_event(self._ws.recv(timeout=CONNECT_TIMEOUT_S))
        except (OSError, WebSocketException, TimeoutError, wire.ProtocolError) as exc:
            if self._ws is not None:  # opened, then silent or garbled: the server is told it is left
                self._ws.close()
            raise RemoteError(f"Could not open a Realtime session at {self.url} ({_why(exc)}); is `python -m app` "
                              "running there, and reachable from here?") from exc
        if first["type"] != "session.created":
            self._ws.close()
            message = first.get("error", {}).get("message") if isinstance(first.get("error"), dict) else None
            raise RemoteError(message or f"The server answered {first['type']!r} instead of session.created.")
        self._send_lock = threading.Lock()  # the feeder appends while the reader truncates
        config = replace(wire.Config.for_model("think" if think else "instruct"), interrupt=self.interrupts,
                         semantic=semantic)
        self._send(wire.session_update(config))
        self._mic = MonoResampler(sample_rate, wire.AUDIO_RATE)
        self._out: queue.Queue = queue.Queue()
        self._ended = threading.Event()  # set once the reader has put its last event
        self._turns = _Turns(self.interrupts, self._out.put, self._send)
        self._reader = threading.Thread(target=self._read, name="afnext-remote", daemon=True)
        self._reader.start()

    def push(self, pcm: np.ndarray, sample_rate: int) -> None:
        """Microphone audio at the rate given when connecting (float in [-1, 1] or int16)."""
        if sample_rate != self.sample_rate:
            raise ValueError(f"The session was opened for {self.sample_rate} Hz, not {sample_rate} Hz.")
        samples = self._mic.push(pcm)
        if len(samples):
            self._send(wire.append(samples))

    def respond(self, *, instructions: str | None = None) -> None:
        """A reply with no turn of the user's (the assistant speaks first), `instructions` for it alone."""
        self._send({"type": "response.create", **({"response": {"instructions": instructions}} if instructions else {})})

    def events(self, timeout: float | None = None) -> Iterator[object]:
        """Events as they arrive; ends when the connection closes or after `timeout` s without one."""
        return drain(self._out, timeout)

    @property
    def ended(self) -> bool:
        """The connection is gone: `events()` gives what is left, then ends at once."""
        return self._ended.is_set()

    def close(self) -> None:
        self._ws.close()
        self._reader.join(5.0)
        self._mic = MonoResampler(self.sample_rate, self.sample_rate)  # lets go of the soxr stream now, not at exit

    def _send(self, event: dict) -> None:
        try:
            with self._send_lock:
                self._ws.send(json.dumps(event))
        except ConnectionClosed:
            pass  # the reader reports the lost connection

    def _read(self) -> None:
        told = False
        try:
            for message in self._ws:
                try:
                    self._turns.on(wire.server_event(message))
                except Exception:  # one odd event must not end the conversation: logged, said once, read on
                    log.exception("could not read a server event")
                    if not told:
                        told = True
                        self._out.put(Stamped(0.0, Error("The server sent an event this client could not read "
                                                          "(details in the log); the conversation goes on.")))
        except ConnectionClosed as exc:
            if exc.rcvd is None or exc.rcvd.code not in (1000, 1001):
                self._out.put(Stamped(0.0, Error(f"The connection to the server was lost ({_why(exc)}).")))
        finally:
            self._out.put(END_OF_EVENTS)
            self._ended.set()  # after the mark: a reader that saw `ended` first then drains all there is


class _Turns:
    """Server events → the local loop's events, keeping what a turn needs across them."""

    def __init__(self, interrupts: bool, emit, send) -> None:
        self.interrupts, self.emit, self.send = interrupts, emit, send
        self._speech_ms = (0, 0)  # the user's turn being heard: audio_start_ms, audio_end_ms
        self._reply: dict | None = None  # the response being made: id, item, whether it was cut off
        # The last reply whose audio reached us: its item and pieces (start, seconds) on the monotonic
        # clock, each playing from its arrival or the end of the one before, whichever is later.
        self._heard: dict | None = None
        self._idle: threading.Timer | None = None  # says "listening" when the last reply has played

    def on(self, event: dict) -> None:
        kind = event["type"]
        t = self._speech_ms[1] / 1000
        # What the server had in flight when the user cut its reply off: as after a local Interrupted,
        # not one more word or sample of it reaches the user.
        cut = self._reply is not None and self._reply["cut"]
        if kind == "input_audio_buffer.speech_started":
            self._speech_ms = (event.get("audio_start_ms", 0), 0)
            self._barge_in()
        elif kind == "input_audio_buffer.speech_stopped":
            self._speech_ms = (self._speech_ms[0], event.get("audio_end_ms", 0))
        elif kind == "input_audio_buffer.committed":
            start, end = self._speech_ms
            self.emit(UserTurn(end / 1000, start / 1000, end / 1000, np.zeros(0, np.float32)))
            self.emit(StateChanged(end / 1000, "thinking"))
        elif kind == "response.created":
            self._reply = {"id": event["response"]["id"], "item": None, "cut": False}
        elif kind == "response.output_item.added" and self._reply is not None:
            self._reply["item"] = event["item"]["id"]
        elif kind in ("response.output_audio_transcript.delta", "response.output_text.delta") and not cut:
            self.emit(Stamped(t, TextDelta(event["delta"])))
        elif kind == "response.reasoning_text.delta" and not cut:
            self.emit(Stamped(t, ReasoningDelta(event["delta"])))
        elif kind == "response.output_audio.delta" and self._reply is not None and not cut:
            self._audio(wire.pcm16(event["delta"]), t)
        elif kind == "response.done":
            self._done(event, t)
        elif kind == "error":
            error = event.get("error") if isinstance(event.get("error"), dict) else {}
            self.emit(Stamped(t, Error(str(error.get("message") or "The server reported an error."))))

    def _audio(self, pcm: np.ndarray, t: float) -> None:
        reply, now = self._reply, time.monotonic()
        if self._heard is None or self._heard["id"] != reply["id"]:
            self._heard = {"id": reply["id"], "item": reply["item"], "pieces": []}
            self.emit(StateChanged(t, "speaking"))
        pieces = self._heard["pieces"]
        start = max(now, pieces[-1][0] + pieces[-1][1]) if pieces else now
        pieces.append((start, len(pcm) / wire.AUDIO_RATE))
        self.emit(Stamped(t, AudioChunk(wire.AUDIO_RATE, pcm.astype(np.float32) / 32768.0)))

    def _barge_in(self) -> None:
        """Speech began: with interrupting on, a reply being made or still playing stops here at once
        (the server cancels the making; what it still sends of it is dropped), and the server learns
        how much of it was heard."""
        heard, now = self._heard, time.monotonic()
        playing = heard is not None and now < heard["pieces"][-1][0] + heard["pieces"][-1][1]
        if not self.interrupts or not (playing or self._reply is not None):
            return
        self.emit(Stamped(self._speech_ms[0] / 1000, Interrupted("barge-in")))
        if playing and heard["item"] is not None:
            played = sum(max(0.0, min(seconds, now - start)) for start, seconds in heard["pieces"])
            self.send(wire.truncate(heard["item"], int(1000 * played)))
        if self._reply is not None:
            self._reply["cut"] = True  # listening again comes with its response.done
        else:  # a finished reply was still playing: nothing more will come from the server for it
            self.emit(StateChanged(self._speech_ms[0] / 1000, "listening"))
        self._heard = None

    def _done(self, event: dict, t: float) -> None:
        response = event.get("response") if isinstance(event.get("response"), dict) else {}
        reply = self._reply
        if response.get("status") == "cancelled" and reply is not None and not reply["cut"]:
            self.emit(Stamped(t, Interrupted("cancelled")))  # cut off by the server, not by our barge-in
        timings = event.get("timings") if isinstance(event.get("timings"), dict) else {}
        self.emit(VoiceTurnDone(t, VoiceTimings(timings.get("endpoint_s"), timings.get("ttft_s"),
                                                timings.get("first_audio_s")), None))
        self._reply = None
        heard = self._heard
        left = heard["pieces"][-1][0] + heard["pieces"][-1][1] - time.monotonic() if heard else 0.0
        if left <= 0:
            self.emit(StateChanged(t, "listening"))
            return
        # Listening again once the reply has played (its audio came faster than it plays), as a local
        # Assistant says; speech or a new reply before then makes the timer moot.
        self._idle = threading.Timer(left, self._listening, (t, heard))
        self._idle.daemon = True
        self._idle.start()

    def _listening(self, t: float, heard: dict) -> None:
        if self._heard is heard and self._reply is None:
            self.emit(StateChanged(t, "listening"))


def realtime_url(server: str, model: str) -> str:
    """http(s)://host:port/… → ws(s)://host:port/…/v1/realtime?model=…"""
    parts = urlsplit(server if "://" in server else f"http://{server}")
    scheme = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}.get(parts.scheme)
    if scheme is None:
        raise RemoteError(f"{server} is not an http(s) address of the web app.")
    path = parts.path.rstrip("/").removesuffix("/v1/realtime").removesuffix("/v1") + wire.ROUTE
    return urlunsplit((scheme, parts.netloc, path, urlencode({"model": model}), ""))


def _why(exc: BaseException) -> str:
    """A closed connection's own reason (the server's sentence), else the exception's words."""
    rcvd = getattr(exc, "rcvd", None)
    return rcvd.reason if rcvd is not None and rcvd.reason else str(exc) or type(exc).__name__
