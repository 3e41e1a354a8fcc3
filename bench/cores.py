"""A decoding step beside an idle OpenMP team in another thread, and without one. Prints JSON.

    python bench/cores.py [--size mid] [--rows 1,8] [--steps 60] [--repeats 5] [--out FILE]

Why afnext/cores.py exists. GNU OpenMP keeps a team of worker threads for every thread that has run a
parallel torch op; once the process holds more of them than there are cores, every worker sleeps as
soon as a parallel region ends. Here the engine's packed step (`Engine.run_segments`) decodes `rows`
sessions of 330 tokens each, timed as the median of `steps` steps, in turns: alone, then while another
thread that once ran a parallel op (and so keeps a team) waits beside it, then alone again, `repeats`
times, all in one process. That other thread is what every asking thread was before its features and
cache copies ran on one core (`cores.one_core`).
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from afnext.attention import Segment  # noqa: E402
from afnext.bench import machine, write_json  # noqa: E402
from afnext.engine import Engine  # noqa: E402
from afnext.tiny import build_in_memory  # noqa: E402

PAST_TOKENS = 330  # a 5 s voice clip's turn: what bench_concurrent's conversations hold


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="mid")
    parser.add_argument("--rows", default="1,8", help="decoding rows per step, comma-separated")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    loaded, _ = build_in_memory(args.size)
    engine = Engine(loaded)
    hidden = loaded.model.config.get_text_config().hidden_size
    result = {"command": "python bench/cores.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "date": datetime.date.today().isoformat(), "machine": machine(loaded.device),
              "model": {"size": args.size, "dtype": "float32", "kv": engine.kv}, "rows": []}

    def step_ms(caches) -> float:
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            engine.run_segments([Segment(c, c.get_seq_length(), 1) for c in caches], torch.randn(len(caches), hidden))
            times.append(time.perf_counter() - t0)
        for c in caches:
            c.crop_to(c.get_seq_length() - args.steps)
        return statistics.median(times) * 1e3

    def idle_team(ready: threading.Event, stop: threading.Event) -> None:
        torch.randn(2048, 2048).sum()  # one parallel op: this thread keeps a team from now on
        ready.set()
        stop.wait()

    def measure() -> None:  # on one thread, as the engine's worker runs its steps
        with torch.inference_mode():
            for rows in (int(r) for r in args.rows.split(",")):
                caches = [engine.new_cache() for _ in range(rows)]
                for c in caches:
                    c.reserve(PAST_TOKENS + args.steps)
                    engine.run_segments([Segment(c, 0, PAST_TOKENS)], torch.randn(PAST_TOKENS, hidden))
                step_ms(caches)  # warm
                alone, beside = [], []
                for _ in range(args.repeats):
                    alone.append(step_ms(caches))
                    ready, stop = threading.Event(), threading.Event()
                    other = threading.Thread(target=idle_team, args=(ready, stop))
                    other.start()
                    ready.wait()
                    beside.append(step_ms(caches))
                    stop.set()
                    other.join()  # its team ends with it
                alone.append(step_ms(caches))
                result["rows"].append({"rows": rows, "alone_ms": alone, "beside_idle_team_ms": beside,
                                       "median_alone_ms": statistics.median(alone),
                                       "median_beside_idle_team_ms": statistics.median(beside),
                                       "slowdown": statistics.median(beside) / statistics.median(alone)})

    worker = threading.Thread(target=measure)
    worker.start()
    worker.join()
    engine.close()
    write_json(result, args.out)
    return result


if __name__ == "__main__":
    main()
