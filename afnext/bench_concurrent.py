"""Benchmark: many conversations on one engine, one at a time vs all at once; prints JSON.

    python -m afnext.bench_concurrent [--size mid] [--device cpu] [--conversations 8] [--tokens 32]
                                      [--repeats 3] [--long-seconds 600] [--out FILE]

On a random-weight AF-Next-shaped model (speed does not depend on weight values), one Engine, it measures:
- batching: N conversations, each a 5 s voice clip and a short question answered with exactly
  `--tokens` tokens; first one session after another, then all N at once (N threads released together).
  Per mode: p50/p95 time to first token, whole-run tokens/s (every new token / first ask → last reply
  done) and aggregate decode tokens/s (below), and the concurrent/sequential ratio of the latter;
- ingest: a short voice turn's time to first token on an idle engine (median of 3) vs while another
  session's `--long-seconds` recording is being ingested (the recording is featurized beforehand, so
  only encoding and prefill are on the engine), and the long turn's own time to first token
  (`--long-seconds 0` leaves it out: "ingest" is null).

Aggregate decode tokens/s = the tokens every reply made after its first (the first comes out of the
prefill) / the time during which at least one reply was decoding (the union of each reply's
first-token → done span). One at a time, that is the sum of the replies' decode spans; all at once,
about last done − first first token. All at once, that span also holds the N clips' encoder and
prefill steps (as many per step as its budgets hold, so the first replies decode beside the later
ones' admission); the steady figure leaves them out: N × the engine steps run while all N replies were decoding (last
first token → first done) / that time, ±1 step at each end. One at a time, the steady figure is the
decode figure (one reply per step). Tokens per step is every new token / every engine step of the mode.
"""

from __future__ import annotations

import argparse
import bisect
import dataclasses
import datetime
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Self

import numpy as np
import torch

from .bench import machine, write_json
from .clip import prepare_clip
from .engine import Engine
from .events import TurnDone
from .sampling import GenerationOptions
from .session import Session

SAMPLE_RATE = 16_000
VOICE_S = 5.0  # a voice turn's clip
QUESTION = "What is said in this clip?"
LONG_QUESTION = "Summarize this recording."
IDLE_REPEATS = 3  # short turns per ingest figure: the median evens out a step boundary's luck
POLL_S = 0.001  # how often the ingest bench looks at the scheduler (a few ms, before the short turns)
CLOCK_POLL_S = 0.005  # the step clock's look at the engine: a fifth of a mid CPU step, and a side
# thread waking every millisecond measurably slowed the 2-core CPU's steps


def voice_clip(seconds: float, seed: int = 0) -> np.ndarray:
    """16 kHz float32 tones over quiet noise; a random-weight model times any audio the same."""
    rng = np.random.default_rng(seed)
    t = np.arange(round(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    pitch = 150 + 100 * rng.random()  # a different voice per seed, so no two clips are alike
    tone = 0.2 * np.sin(2 * np.pi * pitch * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t))
    return (tone + 0.05 * rng.standard_normal(len(t))).astype(np.float32)


@dataclass(frozen=True)
class Turn:
    """One timed turn, on the perf_counter clock."""

    asked: float
    first: float  # the first token
    done: float  # the TurnDone event
    new_tokens: int
    prefill_s: float
    encode_s: float

    @property
    def ttft_s(self) -> float:
        return self.first - self.asked


def timed_turn(session: Session, text: str, audio, options: GenerationOptions) -> Turn:
    """Ask and drain the stream; the first token's time comes from the reply's own TTFT."""
    asked, reply = time.perf_counter(), None
    for event in session.ask(text, audio, options=options):
        if isinstance(event, TurnDone):
            reply = event.reply
    done = time.perf_counter()
    t = reply.timings
    return Turn(asked, asked + t.ttft_s, done, t.new_tokens, t.prefill_s, t.encode_s)


class StepClock:
    """Notes when `engine.steps` changes, from a side thread: how many steps began between two instants.
    (The engine keeps no per-step timestamps.)"""

    def __init__(self, engine: Engine) -> None:
        self.engine, self.times, self.counts = engine, [time.perf_counter()], [engine.steps]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _watch(self) -> None:
        while not self._stop.wait(CLOCK_POLL_S):
            if self.engine.steps != self.counts[-1]:
                self.times.append(time.perf_counter())
                self.counts.append(self.engine.steps)

    def steps_between(self, start: float, end: float) -> int:
        at = [self.counts[max(0, bisect.bisect_right(self.times, t) - 1)] for t in (start, end)]
        return at[1] - at[0]


def run_sequential(engine: Engine, clips: list[np.ndarray], options: GenerationOptions) -> list[Turn]:
    return [timed_turn(Session(engine), QUESTION, clip, options) for clip in clips]


def run_concurrent(engine: Engine, clips: list[np.ndarray], options: GenerationOptions) -> list[Turn]:
    """Every clip in its own session on its own thread, all asked at the same moment."""
    barrier = threading.Barrier(len(clips))
    turns: list[Turn | None] = [None] * len(clips)
    errors: list[BaseException] = []

    def converse(i: int) -> None:
        session = Session(engine)
        barrier.wait()
        try:
            turns[i] = timed_turn(session, QUESTION, clips[i], options)
        except Exception as exc:  # re-raised on the main thread: a failed turn must fail the bench
            errors.append(exc)

    threads = [threading.Thread(target=converse, args=(i,)) for i in range(len(clips))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return turns


def busy_time(spans: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end] spans: time during which at least one was running."""
    total, end = 0.0, -float("inf")
    for start, stop in sorted(spans):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


def summarize(turns: list[Turn], steps: int) -> dict:
    """One mode's figures (see the module's docstring for the definitions)."""
    new = sum(t.new_tokens for t in turns)
    decode_tokens = sum(t.new_tokens - 1 for t in turns)
    decode_s = busy_time([(t.first, t.done) for t in turns])
    wall = max(t.done for t in turns) - min(t.asked for t in turns)
    ttft = [t.ttft_s for t in turns]
    return {"ttft_p50_s": float(np.percentile(ttft, 50)), "ttft_p95_s": float(np.percentile(ttft, 95)),
            "decode_tok_s": decode_tokens / decode_s, "decode_s": decode_s, "decode_tokens": decode_tokens,
            "run_tok_s": new / wall, "run_s": wall, "new_tokens": new,
            "steps": steps, "tokens_per_step": new / steps}


def steady(turns: list[Turn], clock: StepClock) -> dict:
    """Decode speed while every reply was decoding: N tokens per step; None if no such moment."""
    start, end = max(t.first for t in turns), min(t.done for t in turns)
    steps = clock.steps_between(start, end) if end > start else 0
    if steps < 2:  # replies too short to overlap: no steady state to speak of
        return {"steady_decode_tok_s": None, "steady_steps": steps, "step_ms": None}
    return {"steady_decode_tok_s": len(turns) * steps / (end - start), "steady_steps": steps,
            "step_ms": 1e3 * (end - start) / steps}


def measured(engine: Engine, run: Callable[..., list[Turn]], *args) -> tuple[list[Turn], int, StepClock]:
    """`run(engine, *args)`'s turns, the engine steps it took, and their clock."""
    before = engine.steps
    with StepClock(engine) as clock:
        turns = run(engine, *args)
    return turns, engine.steps - before, clock


def bench_batching(engine: Engine, conversations: int, tokens: int) -> dict:
    clips = [voice_clip(VOICE_S, seed=i) for i in range(conversations)]
    options = GenerationOptions(max_new_tokens=tokens, min_new_tokens=tokens, repetition_penalty=1.0)
    turns, steps, _ = measured(engine, run_sequential, clips, options)
    one = summarize(turns, steps)
    one.update(steady_decode_tok_s=one["decode_tok_s"], step_ms=1e3 * one["decode_s"] / one["decode_tokens"])
    turns, steps, clock = measured(engine, run_concurrent, clips, options)
    together = {**summarize(turns, steps), **steady(turns, clock)}
    gain = together["steady_decode_tok_s"]
    return {"conversations": conversations, "tokens": tokens, "clip_s": VOICE_S,
            "sequential": one, "concurrent": together,
            "decode_speedup": together["decode_tok_s"] / one["decode_tok_s"],
            "steady_decode_speedup": gain / one["decode_tok_s"] if gain else None,
            "run_speedup": together["run_tok_s"] / one["run_tok_s"]}


def bench_rounds(engine: Engine, conversations: int, tokens: int, repeats: int) -> dict:
    """`bench_batching` `repeats` times over, one at a time and at once alternating: on a shared
    machine a step's time drifts by 2-3x over a minute, so one pair of runs can mislead; the median
    of the per-round ratios (each pair measured back to back) is the figure to quote."""
    rounds = [bench_batching(engine, conversations, tokens) for _ in range(repeats)]
    medians = {f"median_{key}": float(np.median([r[key] for r in rounds if r[key] is not None]))
               for key in ("decode_speedup", "steady_decode_speedup", "run_speedup")
               if any(r[key] is not None for r in rounds)}
    return {**medians, "rounds": rounds}


def short_turn(engine: Engine, seed: int) -> Turn:
    """A 5 s voice turn in a fresh session: the same prompt length idle and during an ingest."""
    clip = voice_clip(VOICE_S, seed=100 + seed)
    return timed_turn(Session(engine), QUESTION, clip, GenerationOptions(max_new_tokens=2))


def bench_ingest(engine: Engine, long_seconds: float) -> dict:
    """A short voice turn's TTFT idle vs during another session's long ingest."""
    idle = [short_turn(engine, i).ttft_s for i in range(IDLE_REPEATS)]
    clip = prepare_clip(voice_clip(long_seconds, seed=7), engine.loaded.mel_filters,
                        max_seconds=engine.loaded.max_audio_s)
    box: dict = {}

    def ingest() -> None:
        try:
            box["turn"] = timed_turn(Session(engine), LONG_QUESTION, clip, GenerationOptions(max_new_tokens=2))
        except Exception as exc:  # re-raised on the main thread, likewise
            box["error"] = exc

    thread = threading.Thread(target=ingest)
    thread.start()
    while not engine.scheduler.prefilling and thread.is_alive():  # admitted: its clip goes to the encoder
        time.sleep(POLL_S)
    during, overlapped = [], []
    for i in range(IDLE_REPEATS):  # back to back, as long as the ingest lasts
        if not engine.scheduler.prefilling:
            break
        during.append(short_turn(engine, IDLE_REPEATS + i).ttft_s)
        overlapped.append(bool(engine.scheduler.prefilling))  # the ingest outlasted this short turn
    thread.join()
    if "error" in box:
        raise box["error"]
    if not during:
        raise RuntimeError("The long ingest ended before a short turn could be asked; use a longer --long-seconds.")
    long, idle_s, during_s = box["turn"], float(np.median(idle)), float(np.median(during))
    return {"long_audio_s": clip.duration_s, "long_audio_tokens": clip.tokens,
            **dataclasses.asdict(engine.budgets),
            "short_idle_ttft_s": idle_s, "short_during_ingest_ttft_s": during_s, "ttft_ratio": during_s / idle_s,
            "short_idle_all_s": idle, "short_during_all_s": during, "ingest_outlasted_short": overlapped,
            "long_ttft_s": long.ttft_s, "long_encode_s": long.encode_s, "long_prefill_s": long.prefill_s}


def warm_up(engine: Engine) -> None:
    """One short turn, so first-call costs (allocator, kernels) land in no measured figure."""
    short_turn(engine, seed=1000)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m afnext.bench_concurrent", description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=["tiny", "mid", "full"], default="mid")
    p.add_argument("--device", default="cpu")
    p.add_argument("--conversations", type=int, default=8, help="conversations run one at a time, then at once")
    p.add_argument("--tokens", type=int, default=32, help="reply tokens per conversation (fixed)")
    p.add_argument("--repeats", type=int, default=3, help="rounds of one-at-a-time vs at-once (medians reported)")
    p.add_argument("--long-seconds", type=float, default=600.0,
                   help="the long recording ingested beside a short turn; 0 leaves the ingest figure out")
    p.add_argument("--kv", choices=["buffers", "paged"], help="how KV caches are kept (afnext/paged.py; default: engine.default_kv)")
    p.add_argument("--decode", default="eager", choices=["eager", "static", "graphs"],
                   help="how decoding steps run; with --kv paged, graphs: one CUDA graph per batch bucket (CUDA only)")
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args(argv)
    from .tiny import build_in_memory

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    loaded, _ = build_in_memory(args.size, args.device, dtype)
    engine = Engine(loaded, kv=args.kv, decode=args.decode)
    result = {"command": "python -m afnext.bench_concurrent " + " ".join(argv if argv is not None else sys.argv[1:]),
              "date": datetime.date.today().isoformat(), "machine": machine(device),
              "model": {"size": args.size, "parameters": sum(t.numel() for t in loaded.model.parameters()),
                        "dtype": str(dtype).removeprefix("torch."), "attention": loaded.attn, "weights": "random",
                        "kv": engine.kv, "decode": args.decode, "flash_paged": engine.flash}}
    t0 = time.perf_counter()
    try:
        warm_up(engine)
        result["batching"] = bench_rounds(engine, args.conversations, args.tokens, args.repeats)
        print("done: batching", file=sys.stderr, flush=True)
        result["ingest"] = bench_ingest(engine, args.long_seconds) if args.long_seconds > 0 else None
    finally:
        engine.close()
    result["wall_s"] = time.perf_counter() - t0  # the whole benchmark, model build excluded
    write_json(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
