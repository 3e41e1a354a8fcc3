"""Who holds what on the Recordings side: the open recordings by browser session (`Desk`), the
upload files they and API calls use (`Files`), and giving freed memory back. Gradio-free.

Limits are fair to every client address: each holds at most `per_address` recordings (its least
recently used goes first), all together at most `most` (the least recently used goes first), and a
recording nobody has asked about for `idle_s` is closed, by a sweep that runs whether or not anyone
asks. A page whose recording was closed is told why.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import os
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .recordings import Recording

log = logging.getLogger(__name__)

RECORDINGS_PER_ADDRESS = 3  # held at once for one client address (a few tabs); its oldest goes first
MAX_RECORDINGS = 32  # held at once in all: up to 32 × 115 MB of 30-minute audio, plus KV caches
RECORDING_IDLE_S = 1800.0  # a recording nobody has asked about for 30 minutes is closed
SWEEP_EVERY_S = 60.0  # how often idle recordings are looked for
GONE_REMEMBERED = 4096  # sessions whose recording was closed, remembered to tell them why


class Files:
    """Files in use, counted. Identical uploads share one path (Gradio names an upload's folder after
    its content), so two pages, or a page and an API call, may use one file: each user claims it and
    releases it, and the last release deletes it. `keep` is Gradio's keep_in_cache set: a claimed
    file is in it, so Gradio's own cache sweep leaves it alone."""

    def __init__(self, keep: set[str] | None = None) -> None:
        self.keep = keep if keep is not None else set()
        self._uses: Counter[str] = Counter()
        self._lock = threading.Lock()

    def claim(self, paths: Iterable[Path | str]) -> None:
        with self._lock:
            for path in map(str, paths):
                self._uses[path] += 1
                self.keep.add(path)

    def release(self, paths: Iterable[Path | str]) -> None:
        """Let go of `paths`; a file nobody else uses is deleted."""
        with self._lock:
            last = []
            for path in map(str, paths):
                self._uses[path] -= 1
                if self._uses[path] <= 0:
                    del self._uses[path]
                    self.keep.discard(path)
                    last.append(path)
        for path in last:
            delete_file(Path(path))

    def in_use(self, path: Path | str) -> bool:
        with self._lock:
            return self._uses[str(path)] > 0


@dataclass
class _Held:
    recording: Recording
    address: str  # the client address that opened it
    used: float  # time.monotonic() of its opening or latest question


class Desk:
    """Every browser session's open recording, by session id, within the limits above."""

    def __init__(self, files: Files | None = None, *, per_address: int = RECORDINGS_PER_ADDRESS,
                 most: int = MAX_RECORDINGS, idle_s: float = RECORDING_IDLE_S) -> None:
        self.files = files if files is not None else Files()
        self.per_address, self.most, self.idle_s = per_address, most, idle_s
        self._held: dict[str, _Held] = {}
        self._gone: OrderedDict[str, str] = OrderedDict()  # session → why its recording was closed
        self._lock = threading.Lock()

    def get(self, session: str) -> Recording | None:
        """The session's recording, now counted as used; None if it has none (see `why_gone`)."""
        with self._lock:
            held = self._held.get(session)
            if held is None:
                return None
            held.used = time.monotonic()
            return held.recording

    def put(self, session: str, address: str, recording: Recording) -> None:
        """Hold `recording` (and claim its files) for `session`, in place of the one it had; makes room."""
        self.files.claim(recording.files)
        with self._lock:
            dropped = [(s, None) for s in [session] if s in self._held]
            mine = sorted((h.used, s) for s, h in self._held.items() if h.address == address and s != session)
            dropped += [(s, "it was closed to make room for a newer recording from your address")
                        for _, s in mine[: max(0, len(mine) - self.per_address + 1)]]
            others = sorted((h.used, s) for s, h in self._held.items() if s not in dict(dropped) and s != session)
            dropped += [(s, "the server was full and closed the recording nobody had asked about longest")
                        for _, s in others[: max(0, len(others) + 1 - self.most)]]
            released = self._pop(dropped)
            self._held[session] = _Held(recording, address, time.monotonic())
        self._release(released)

    def drop(self, session: str) -> None:
        """The session ended (its tab closed): free its recording."""
        with self._lock:
            released = self._pop([(session, None)] if session in self._held else [])
        self._release(released)

    def why_gone(self, session: str) -> str | None:
        """Why the session's recording was closed, if the server closed it (None: it never had one here,
        or the server restarted since)."""
        with self._lock:
            return self._gone.get(session)

    def sweep(self) -> None:
        """Close the recordings nobody has asked about for `idle_s`."""
        now = time.monotonic()
        with self._lock:
            idle = [(s, f"nobody had asked about it for {self.idle_s / 60:.0f} minutes")
                    for s, h in self._held.items() if now - h.used > self.idle_s]
            released = self._pop(idle)
        self._release(released)

    def sweep_every(self, interval_s: float = SWEEP_EVERY_S, stop: threading.Event | None = None) -> None:
        """Sweep until `stop` is set (run on a daemon thread)."""
        stop = stop or threading.Event()
        while not stop.wait(interval_s):
            self.sweep()

    def __len__(self) -> int:
        return len(self._held)

    def _pop(self, sessions: list[tuple[str, str | None]]) -> list[Recording]:
        """Take the sessions' recordings off the desk (lock held), remembering why for the page."""
        released = []
        for session, why in sessions:
            released.append(self._held.pop(session).recording)
            if why is not None:
                self._gone[session] = why
                while len(self._gone) > GONE_REMEMBERED:
                    self._gone.popitem(last=False)
        return released

    def _release(self, dropped: list[Recording]) -> None:
        """Release the dropped recordings' files, then free their memory; empties `dropped`, which
        must hold the last references to them."""
        for recording in dropped:
            self.files.release(recording.files)
            log.info("closed %s and its conversation", recording.name)
        if dropped:
            recording = None  # noqa: F841 (the loop variable's reference)
            dropped.clear()
            release_memory()


def release_memory() -> None:
    """Collect garbage, then ask glibc to return freed heap pages to the system: after a 30-minute
    recording is dropped its buffers are free, but glibc keeps them unless trimmed (measured: 816 MB
    held after 30 closed 5-minute recordings, 53 MB with the trim; bench/recordings_memory.py)."""
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _find_libc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None  # glibc only (not musl, macOS)


_LIBC = _find_libc()


def delete_file(path: Path) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("could not delete %s: %s", path, exc)
