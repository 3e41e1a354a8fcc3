"""Conversations held in memory, by conversation id: the one owner of their lifetime.

A live conversation is whatever a shell keeps for one: a Talk session, a recording with its sessions.
It is what makes a follow-up cheap (its KV cache), and it is only that: every completed turn is in the
store (afnext/store.py), so a conversation this registry lets go of is rebuilt from there when it is
used again (its clips encoded, its tokens prefilled once). That is why the limits can be plain:

- each client group (an address) holds at most `per_group` conversations, its least recently used going first;
- all together at most `most`, and at most `max_bytes` of memory (what `held_bytes` reports: KV caches
  wherever the engine's `CacheKeeper` has put them, GPU or CPU memory, and a recording's samples), the
  least recently used going first;
- one nobody has used for `idle_s` is let go by `sweep`, which a daemon thread runs every minute.

Access is by id and owner together: `get` with another owner's token finds nothing, exactly as a
missing id does. A value may have `close()` (called once it is let go, outside the lock) and
`held_bytes` (counted against `max_bytes`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
PER_GROUP = 3  # held at once for one client address (a few tabs); its least recently used goes first
MOST = 32  # held at once in all: up to 32 × 115 MB of 30-minute audio, plus KV caches
MAX_BYTES = 8 << 30  # held in all: three 30-minute recordings' KV caches on AF-Next in bf16 and their samples
IDLE_S = 1800.0  # one nobody has used for 30 minutes is let go
SWEEP_EVERY_S = 60.0
GONE_REMEMBERED = 4096  # conversations let go, remembered to say why


@dataclass
class _Held(Generic[T]):
    value: T
    owner: str
    group: str  # whose share it counts against (a client address)
    used: float  # time.monotonic() of its latest use


def matches_store(value: object) -> bool:
    """`Live.open`'s `current` for a conversation kept in the store (afnext/store.py): the value's own
    `current()` if it has one, else its journal's — false when the journal is broken or the store holds
    turns the value does not (another process went on with the conversation: a replica it moved to and
    back from)."""
    own = getattr(value, "current", None)
    if callable(own):
        return own()
    journal = getattr(value, "journal", None)
    return journal is None or journal.current()


class Live(Generic[T]):
    """Live conversations by id, within the limits above. Thread-safe."""

    def __init__(self, *, per_group: int = PER_GROUP, most: int = MOST, max_bytes: int = MAX_BYTES,
                 idle_s: float = IDLE_S, on_release: Callable[[], None] | None = None) -> None:
        self.per_group, self.most, self.max_bytes, self.idle_s = per_group, most, max_bytes, idle_s
        self.on_release = on_release  # called after values are let go (e.g. to give their memory back)
        self._held: OrderedDict[str, _Held[T]] = OrderedDict()  # least recently used first
        self._gone: OrderedDict[str, str] = OrderedDict()  # id → why it was let go
        self._opening: dict[str, list] = {}  # id → [its lock, how many are at it]
        self._lock = threading.Lock()

    def get(self, cid: str, owner: str) -> T | None:
        """`owner`'s live conversation `cid`, now counted as used; None if it is not held (or not theirs)."""
        with self._lock:
            held = self._held.get(cid)
            if held is None or held.owner != owner:
                return None
            held.used = time.monotonic()
            self._held.move_to_end(cid)
            return held.value

    def open(self, cid: str, owner: str, group: str, make: Callable[[], T],
             current: Callable[[T], bool] | None = None) -> T:
        """`owner`'s live conversation `cid`, made by `make()` if it is not held, or if what is held is
        not `current` (it differs from what the store holds: another process went on with it): one
        `make` at a time per id, so two tabs reopening one conversation rebuild it once. Raises what
        `make` raises."""
        with self._lock:  # one gate per id while anyone waits at it
            gate = self._opening.setdefault(cid, [threading.Lock(), 0])
            gate[1] += 1
        try:
            with gate[0]:
                value = self.get(cid, owner)
                if value is not None and current is not None and not current(value):
                    log.info("conversation %s differs from the store: rebuilt from it", cid)
                    self.drop(cid, owner)
                    value = None
                if value is None:
                    value = make()
                    self.put(cid, owner, group, value)
                return value
        finally:
            with self._lock:
                gate[1] -= 1
                if not gate[1]:
                    del self._opening[cid]

    def put(self, cid: str, owner: str, group: str, value: T) -> None:
        """Hold `value` as conversation `cid` (in place of what was held as it), making room."""
        with self._lock:
            released = [self._held.pop(cid).value] if cid in self._held else []
            self._held[cid] = _Held(value, owner, group, time.monotonic())
            self._gone.pop(cid, None)
            mine = [c for c, h in self._held.items() if h.group == group and c != cid]
            released += self._pop(mine[: max(0, len(mine) - self.per_group + 1)],
                                  "it was let go to make room for a newer one from your address")
            others = [c for c in self._held if c != cid]
            released += self._pop(others[: max(0, len(others) + 1 - self.most)],
                                  "the server was full and let go of the one unused longest")
            while len(self._held) > 1 and self._bytes() > self.max_bytes:
                released += self._pop([next(iter(self._held))], "the server needed its memory")
        self._release(released)

    def drop(self, cid: str, owner: str | None = None) -> bool:
        """Let go of `cid` (if `owner` is given, only theirs); False if it was not held."""
        with self._lock:
            held = self._held.get(cid)
            if held is None or (owner is not None and held.owner != owner):
                return False
            released = self._pop([cid], None)
        self._release(released)
        return True

    def why_gone(self, cid: str) -> str | None:
        """Why `cid` was let go, if the registry let go of it on its own (None: never held here, or
        dropped by its owner)."""
        with self._lock:
            return self._gone.get(cid)

    def sweep(self) -> None:
        """Let go of the conversations nobody has used for `idle_s`."""
        now = time.monotonic()
        with self._lock:
            idle = [c for c, h in self._held.items() if now - h.used > self.idle_s]
            released = self._pop(idle, f"nobody had used it for {self.idle_s / 60:.0f} minutes")
        self._release(released)

    def sweep_every(self, interval_s: float = SWEEP_EVERY_S, stop: threading.Event | None = None) -> None:
        """Sweep until `stop` is set (run on a daemon thread)."""
        stop = stop or threading.Event()
        while not stop.wait(interval_s):
            self.sweep()

    def __len__(self) -> int:
        return len(self._held)

    def _bytes(self) -> int:
        return sum(getattr(h.value, "held_bytes", 0) for h in self._held.values())

    def _pop(self, cids: list[str], why: str | None) -> list[T]:
        released = []
        for cid in cids:
            released.append(self._held.pop(cid).value)
            if why is not None:
                self._gone[cid] = why
                while len(self._gone) > GONE_REMEMBERED:
                    self._gone.popitem(last=False)
        return released

    def _release(self, values: list[T]) -> None:
        """Close the values let go of; empties `values`, which must hold the last references to them."""
        for value in values:
            close = getattr(value, "close", None)
            if close is not None:
                try:
                    close()
                except Exception:  # one value's failure must not keep the others' memory
                    log.exception("could not close a live conversation")
        if values:
            value = None  # noqa: F841 (the loop variable's reference)
            values.clear()
            if self.on_release is not None:
                self.on_release()
