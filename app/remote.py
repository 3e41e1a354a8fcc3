"""A `VoiceBrain` on another machine: the desktop loop talks to a web app's voice channel.

    python -m app.desktop --server http://gpu-box:7860/

The microphone's PCM goes up the same WebSocket the browser's Talk tab uses (app/talk.py documents
the protocol); the server's messages come back as the same events a local `Assistant` gives, so
the desktop loop cannot tell the difference.
"""

from __future__ import annotations

import json
import logging
import queue
import secrets
import threading
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from afnext.assistant import Stamped, StateChanged, UserTurn, VoiceTimings, VoiceTurnDone
from afnext.events import END_OF_EVENTS, AudioChunk, Error, Interrupted, ReasoningDelta, TextDelta, drain

from .talk import HEADER, REPLY_AUDIO, ROUTE

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 10.0


class RemoteError(RuntimeError):
    """The server cannot be reached or refused the conversation; the message says why."""


class RemoteBrain:
    """Push microphone audio with `push`; read events with `events()`, as from a local `Assistant`."""

    def __init__(self, server: str, sample_rate: int, *, half_duplex: bool = False, think: bool = False) -> None:
        from websockets.exceptions import WebSocketException
        from websockets.sync.client import connect

        self.sample_rate = sample_rate
        self.url = channel_url(server, secrets.token_hex(16))
        try:
            self._ws = connect(self.url, open_timeout=CONNECT_TIMEOUT_S, max_size=None, legacy=True)  # held, not a with-block
            self._ws.send(json.dumps({"type": "hello", "sample_rate": sample_rate, "half_duplex": half_duplex,
                                      "think": think}))
            while (first := json.loads(self._ws.recv(timeout=None)))["type"] == "state":
                log.info("the server is loading its model")
        except (OSError, WebSocketException, TimeoutError) as exc:
            raise RemoteError(f"Could not open the voice channel at {self.url} ({exc}); is `python -m app` "
                              "running there, and reachable from here?") from exc
        if first["type"] != "ready":
            self._ws.close()
            raise RemoteError(first.get("message", f"The server answered {first!r} instead of ready."))
        self._out: queue.Queue = queue.Queue()
        self._reader = threading.Thread(target=self._read, name="afnext-remote", daemon=True)
        self._reader.start()

    def push(self, pcm: np.ndarray, sample_rate: int) -> None:
        """Microphone audio at the rate given when connecting (float in [-1, 1] or int16)."""
        if sample_rate != self.sample_rate:
            raise ValueError(f"The channel was opened at {self.sample_rate} Hz, not {sample_rate} Hz.")
        if pcm.dtype != np.int16:
            pcm = (np.clip(pcm, -1.0, 1.0) * 32767).astype(np.int16)
        self._ws.send(pcm.tobytes())

    def events(self, timeout: float | None = None) -> Iterator[object]:
        """Events as they arrive; ends when the connection closes or after `timeout` s without one."""
        return drain(self._out, timeout)

    def close(self) -> None:
        self._ws.close()
        self._reader.join(5.0)

    def _read(self) -> None:
        from websockets.exceptions import ConnectionClosed

        try:
            for message in self._ws:
                for event in _events(message):
                    self._out.put(event)
        except ConnectionClosed as exc:
            if exc.rcvd is None or exc.rcvd.code not in (1000, 1001):
                self._out.put(Stamped(0.0, Error(f"The connection to the server was lost ({exc}).")))
        finally:
            self._out.put(END_OF_EVENTS)


def channel_url(server: str, client: str) -> str:
    """http(s)://host:port/… → ws(s)://host:port/…/afnext/talk?client=…"""
    parts = urlsplit(server if "://" in server else f"http://{server}")
    scheme = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}.get(parts.scheme)
    if scheme is None:
        raise RemoteError(f"{server} is not an http(s) address of the web app.")
    path = parts.path.rstrip("/") + ROUTE
    return urlunsplit((scheme, parts.netloc, path, f"client={client}", ""))


def _events(message: str | bytes) -> list:
    """One server message → the events a local Assistant would have emitted."""
    if isinstance(message, bytes):
        kind, _, rate = HEADER.unpack_from(message)
        if kind != REPLY_AUDIO:
            return []  # the user's own turn, for the page's replay button
        samples = np.frombuffer(message, np.int16, offset=HEADER.size).astype(np.float32) / 32768.0
        return [Stamped(0.0, AudioChunk(rate, samples))]
    m = json.loads(message)
    kind, t = m.get("type"), m.get("t") or 0.0
    if kind == "state":
        return [StateChanged(t, m["state"])]
    if kind == "user_turn":
        return [UserTurn(t, m["start"], m["end"], np.zeros(0, np.float32))]
    if kind in ("text", "reasoning"):
        return [Stamped(t, (TextDelta if kind == "text" else ReasoningDelta)(m["text"]))]
    if kind == "interrupted":
        return [Stamped(t, Interrupted(m.get("reason", "cancelled")))]
    if kind in ("error", "notice"):
        return [Stamped(t, Error(m["message"]))]
    if kind == "turn_done":
        return [VoiceTurnDone(t, VoiceTimings(m["endpoint_s"], m["ttft_s"], m["first_audio_s"]), None)]
    return []
