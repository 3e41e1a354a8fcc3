"""The scheduler: which requests the next engine step advances.

A request is one turn of one session: encode its clips, prefill its new tokens into the session's
KV cache, then decode its reply. Every step advances every decoding request by one token (batched in
one forward pass) and shares two budgets among the requests not decoding yet: audio frames through
the encoder and prompt tokens into the caches. So a 30-minute ingest (45,000 tokens) delays everyone
else's next token by one step's budget, never by the whole ingest, and many voice turns arriving
together are encoded and prefilled together instead of one per step.

Who gets the budgets first: interactive turns (a voice turn or a short question adds at most
INTERACTIVE_TOKENS), then the rest, each class first come first served (`candidates`). A long prefill
that is overtaken keeps what it has prefilled and goes on with what the others leave, and one
overtaken for a few steps in a row goes first for a step (planner.py), so a steady stream of voice
turns never starves it. The queue is observable (`ahead`), cancels of waiting requests take effect at once, and the policy here touches
no tensor: the engine executes what it picks and reports back.
"""

from __future__ import annotations

import functools
import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

INTERACTIVE_TOKENS = 2048  # new tokens of an interactive turn: 80 s of audio, or a long typed question
MAX_BATCH = 64  # decoding requests per step; more wait their turn to start

WAITING, PREFILLING, DECODING, DONE = "waiting", "prefilling", "decoding", "done"
_arrivals = itertools.count()


class Cancel:
    """A request's stop flag: set by `set()` (the stream was closed) or by the caller's own event."""

    def __init__(self, external: threading.Event | None = None) -> None:
        self._own, self.external = threading.Event(), external

    def set(self) -> None:
        self._own.set()

    def is_set(self) -> bool:
        return self._own.is_set() or (self.external is not None and self.external.is_set())


@dataclass(eq=False)
class Request:
    """One turn to run: what the session built, and how far the engine has got with it."""

    turn: int  # the session's turn id, carried by every event of the turn
    cache: object  # the session's SessionCache; the prefill appends to it
    ids: list[int]  # tokens to run into the cache before the reply
    clips: list  # Clips whose audio fills the `<sound>` slots of `ids`, in order
    options: object  # GenerationOptions
    budget: int  # reply tokens allowed
    seen: list[int]  # the conversation's tokens before the reply (repetition penalty)
    cancel: Cancel  # set by the caller; honoured before the next step
    emit: Callable[[object], None]  # hands a generated id or the outcome to the caller
    kept: bool = True  # the cache outlives the turn (False: the no-cache reference path's throwaway cache)
    t0: float = field(default_factory=time.perf_counter)  # when the turn was asked for
    arrival: int = field(default_factory=lambda: next(_arrivals))
    state: str = WAITING
    # progress, kept by the engine
    audio: dict = field(default_factory=dict)  # encoded windows' embeddings so far, by window number
    windows_done: int = 0  # windows handed to the encoder (encoded by the end of the step)
    embeds: object = None  # [len(ids), hidden] once every clip is encoded
    fed: int = 0  # of `ids`, how many are in the cache
    encoding: object = None  # an EncoderPass over its next window, part-way through the layers
    step_windows: int = 0  # this step's share: whole windows to encode,
    step_layers: int = 0  # or encoder layers of a window going through a few at a time,
    step_tokens: int = 0  # and prompt tokens to prefill (the engine's plan)
    generated: list[int] = field(default_factory=list)
    picker: object = None
    start_len: int | None = None  # cache length when the request started: a rollback crops back to it
    t_end: float | None = None  # when the engine finished it
    waited_for_memory: bool = False  # its admission was put off for want of KV memory (logged once)
    passed_over: int = 0  # steps in a row it got no work because interactive turns' went first (planner.py)
    encode_s: float = 0.0
    prefill_s: float = 0.0
    t_first: float | None = None

    @property
    def interactive(self) -> bool:
        return len(self.ids) <= INTERACTIVE_TOKENS

    @functools.cached_property
    def windows(self) -> list[tuple[object, int]]:
        """Every window of its clips, in prompt order: (clip, index in the clip)."""
        return [(c, w) for c in self.clips for w in range(len(c.frames))]


class Scheduler:
    """Holds the requests in flight. `add`, `cancel` and `ahead` may be called from any thread;
    the rest from the engine's worker only."""

    def __init__(self, max_batch: int = MAX_BATCH) -> None:
        self.max_batch = max_batch
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self.waiting: list[Request] = []  # not started, in the order they will start
        self.prefilling: list[Request] = []  # started, prefill not finished (one is overtaken at most)
        self.decoding: list[Request] = []
        self.closed = False

    def add(self, request: Request) -> None:
        with self._lock:
            if self.closed:
                raise RuntimeError("The engine has been closed.")
            self.waiting.append(request)
            self.waiting.sort(key=_priority)
            self._work.notify()

    def cancel(self, request: Request) -> bool:
        """Take a request out if it has not started: True if so (it will never run)."""
        with self._lock:
            if request.state == WAITING and request in self.waiting:
                self.waiting.remove(request)
                request.state = DONE
                return True
            self._work.notify()  # a running one is stopped by the worker before its next step
            return False

    def ahead(self, request: Request) -> int | None:
        """Requests that will start before this one; None once it has started."""
        with self._lock:
            return self.waiting.index(request) if request in self.waiting else None

    def cancelled_waiting(self) -> list[Request]:
        """The waiting requests whose cancel is set."""
        with self._lock:
            return [r for r in self.waiting if r.cancel.is_set()]

    @property
    def n_waiting(self) -> int:
        return len(self.waiting)

    def running(self) -> list[Request]:
        return self.prefilling + self.decoding

    def wait_for_work(self, timeout: float) -> None:
        with self._lock:
            if not (self.waiting or self.prefilling or self.decoding):
                self._work.wait(timeout)

    def candidates(self) -> list[Request]:
        """The requests not decoding yet, most urgent first: started ones, and waiting ones while the
        batch has room for them (waiting ones are in the order they would start)."""
        with self._lock:
            room = max(0, self.max_batch - len(self.decoding) - len(self.prefilling))
            return sorted(self.prefilling + self.waiting[:room], key=_priority)

    def start(self, request: Request) -> bool:
        """Start a waiting request: from here on only the engine ends it (a caller's cancel sets its
        flag). The engine starts it before making room for its KV cache, so that a cancel can never
        settle a session whose cache the engine is still working on. False if it was cancelled first."""
        with self._lock:
            if request.state != WAITING or request not in self.waiting:
                return False
            self.waiting.remove(request)
            request.state = PREFILLING
            self.prefilling.append(request)
            return True

    def put_back(self, request: Request) -> None:
        """A request just started goes back to its place among the waiting ones (no room for it yet)."""
        with self._lock:
            self.prefilling.remove(request)
            request.state = WAITING
            self.waiting.append(request)
            self.waiting.sort(key=_priority)

    def close(self) -> list[Request]:
        """Refuse new requests; the waiting ones, taken out (they will never run)."""
        with self._lock:
            self.closed, waiting, self.waiting = True, self.waiting, []
            for request in waiting:
                request.state = DONE
            return waiting

    def prefilled(self, request: Request) -> None:
        with self._lock:
            self.prefilling.remove(request)
            request.state = DECODING
            self.decoding.append(request)

    def finish(self, request: Request) -> bool:
        """Take a request out for good: True if this call did (so its caller is told exactly once)."""
        with self._lock:
            if request.state == DONE:
                return False
            for queue in (self.waiting, self.prefilling, self.decoding):
                if request in queue:
                    queue.remove(request)
            request.state = DONE
            return True


def _priority(request: Request) -> tuple[int, int]:
    return (0 if request.interactive else 1, request.arrival)
