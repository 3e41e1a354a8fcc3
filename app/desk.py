"""Who holds what on the Recordings side: the live recordings (afnext.live.Live, by conversation
id: its limits are fair to every client address, and one it lets go of is reopened from the store
when next asked about), the upload files they and API calls use (`Files`), and giving freed memory
back. Gradio-free.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import os
import threading
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from afnext.live import Live

from .recordings import Recording

log = logging.getLogger(__name__)


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


def claimed(files: Files, recording: Recording) -> Recording:
    """`recording` with its files claimed, released when the Live registry lets go of it."""
    files.claim(recording.files)
    recording.on_close = lambda r: files.release(r.files)
    return recording


def hold(live: Live, files: Files, address: str, recording: Recording) -> None:
    """Hold `recording` live as its conversation `recording.cid` of `recording.owner`."""
    live.put(recording.cid, recording.owner, address, claimed(files, recording))


LIVE_PER_ADDRESS = 8  # conversations one client address holds live: a few tabs' recordings and voice chats
LIVE_MOST = 64  # conversations live in all (app/realtime.py allows as many voice sockets at once)


def live_conversations(**limits) -> Live:
    """The app's one registry of live conversations, recordings and voice chats alike, under one memory
    budget; freed memory goes back to the system as they are let go."""
    return Live(on_release=release_memory, **{"per_group": LIVE_PER_ADDRESS, "most": LIVE_MOST, **limits})


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
