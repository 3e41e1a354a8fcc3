"""The CPU's cores belong to the engine's thread; torch work in any other thread runs on one.

Why. PyTorch on Linux runs its intra-op parallelism on GNU OpenMP, which keeps a team of worker
threads for every thread that has run a parallel op, parked between parallel regions. While the
process holds no more such threads than there are cores, a parked worker spins a little and picks up
the next region at once; once it holds more, libgomp makes every worker sleep as soon as a region
ends, and each region pays a wake-up. A decoding step is hundreds of small regions, so one idle team
beside the engine's made an 8-row step on `mid` 1.4× as long (2 cores: 20.0 ms against 14.1 ms,
alternating in one process; one row 1.1×: bench/results/cpu-cores.json). The teams came from the
callers' threads: each turn's log-mel features (`clip.prepare_clip`) and each fork's cache copy ran
in the thread that asked, on all cores, and left a team there; so did loading the model.

Two engines in one process (a Think model beside the Instruct one) keep a team each, so on a CPU
each takes its share of the threads (`app.backend.cpu_threads`). TTS speaks on a thread per reply,
whose team ends with it.

So the engine's worker sets its own thread count when it starts (`claim`), and work done for it in
other threads runs inside `one_core()`: one thread, no team. That work is small beside the engine's
(a 30-minute recording's features take 0.4 s on one core, 0.25 s on two). One-off work that wants
every core, such as loading a model, runs `in_own_thread`: its team ends with that thread.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch

T = TypeVar("T")


@contextlib.contextmanager
def one_core() -> Iterator[None]:
    """Torch ops inside run on one thread of the calling thread; its count is put back after.

    `torch.set_num_threads` sets the calling thread's OpenMP and MKL counts (and the default a thread
    takes at its first parallel op: the engine's worker sets its own, `claim`)."""
    before = torch.get_num_threads()
    if before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def claim(threads: int) -> None:
    """The calling thread (the engine's worker) computes on `threads` threads, whatever the default
    is when it starts (another thread may be inside `one_core` at that moment), and for good.

    ATen sets a thread's count up at its first parallel op (or `get_num_threads`), to the count any
    thread set last, and `set_num_threads` does not count as that first use: a worker that only set
    its count took, at its first step, whatever `one_core` in an asking thread had just put back."""
    torch.get_num_threads()  # this thread's first use: its lazy setup is done, not waiting for a step
    torch.set_num_threads(threads)


def in_own_thread(fn: Callable[..., T], *args, **kwargs) -> T:
    """`fn(*args, **kwargs)` on all cores, in a thread that ends when it returns (or raises): the
    OpenMP team its ops start ends with it, where the caller's thread would keep one for its life."""
    result: list = []

    def run() -> None:
        try:
            result.append((True, fn(*args, **kwargs)))
        except BaseException as exc:  # handed to the caller as it is
            result.append((False, exc))

    thread = threading.Thread(target=run, name=f"afnext-{getattr(fn, '__name__', 'work')}", daemon=True)
    thread.start()
    thread.join()
    ok, value = result[0]
    if not ok:
        raise value
    return value
