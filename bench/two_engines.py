"""Two engines on one CPU (the app's `--think-model`): every thread each, or the threads split. Prints JSON.

    python bench/two_engines.py [--size mid] [--repeats 2] [--tokens 48] [--out FILE]

Why `app.backend.cpu_threads` splits them. Each engine's worker keeps an OpenMP team; with two teams
of every thread each, the process holds more team threads than cores and libgomp puts every worker to
sleep after each parallel region (afnext/cores.py). Each run here is a fresh process holding two `mid`
engines that have both answered a turn (so both teams exist), with both engines on every thread
("full") or on half of them each ("split"); the two kinds alternate `repeats` times. Each reports the
median step time of engine A: 8 voice conversations decoding while B idles, one conversation while
B idles, and 8 while B decodes 8 of its own (and B's steps meanwhile).
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from afnext import bench_concurrent as bc  # noqa: E402
from afnext.bench import machine, write_json  # noqa: E402
from afnext.cores import in_own_thread  # noqa: E402
from afnext.engine import Engine  # noqa: E402
from afnext.sampling import GenerationOptions  # noqa: E402
from afnext.tiny import build_in_memory  # noqa: E402

CONVERSATIONS = 8
POOL_TOKENS = 1 << 18  # each engine's paged pool: ample for 8 voice turns


def one_run(size: str, threads: int, tokens: int) -> dict:
    """Two engines on `threads` threads each, in this process; median step times in ms."""
    def start() -> tuple[Engine, Engine]:  # as app/backend.py does: in a thread that ends
        loaded = [build_in_memory(size)[0] for _ in range(2)]
        return tuple(Engine(one, kv_pool_tokens=POOL_TOKENS, threads=threads) for one in loaded)

    a, b = in_own_thread(start)
    steps: dict[tuple[int, int], list[float]] = {}
    step = Engine._step

    def timed(engine: Engine, decodes, prefills) -> None:
        t0 = time.perf_counter()
        step(engine, decodes, prefills)
        if not prefills:  # decoding steps only
            steps.setdefault((id(engine), len(decodes)), []).append(time.perf_counter() - t0)

    Engine._step = timed
    clips = [bc.voice_clip(bc.VOICE_S, seed=i) for i in range(CONVERSATIONS)]
    options = GenerationOptions(max_new_tokens=tokens, min_new_tokens=tokens, repetition_penalty=1.0)
    try:
        bc.warm_up(a)
        bc.warm_up(b)  # both have run: both teams exist from here on

        def median_ms(engine: Engine, rows: int) -> float:
            return 1e3 * statistics.median(steps[(id(engine), rows)])

        out = {}
        steps.clear()
        bc.run_concurrent(a, clips, options)
        out["a_8_rows_b_idle_ms"] = median_ms(a, CONVERSATIONS)
        steps.clear()
        bc.run_sequential(a, clips[:2], options)
        out["a_1_row_b_idle_ms"] = median_ms(a, 1)
        steps.clear()
        other = threading.Thread(target=bc.run_concurrent, args=(b, clips, options))
        other.start()
        bc.run_concurrent(a, clips, options)
        other.join()
        out["a_8_rows_b_8_rows_ms"] = median_ms(a, CONVERSATIONS)
        out["b_8_rows_a_8_rows_ms"] = median_ms(b, CONVERSATIONS)
        return out
    finally:
        Engine._step = step
        a.close()
        b.close()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="mid")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=48, help="reply tokens per conversation (fixed)")
    parser.add_argument("--out")
    parser.add_argument("--child-threads", type=int, help=argparse.SUPPRESS)  # one run, in this process
    args = parser.parse_args(argv)
    if args.child_threads:
        print(json.dumps(one_run(args.size, args.child_threads, args.tokens)))
        return {}
    total = torch.get_num_threads()
    kinds = {"full": total, "split": max(1, total // 2)}
    runs: dict[str, list[dict]] = {kind: [] for kind in kinds}
    for _ in range(args.repeats):
        for kind, threads in kinds.items():
            child = subprocess.run([sys.executable, __file__, "--size", args.size, "--tokens", str(args.tokens),
                                    "--child-threads", str(threads)], capture_output=True, text=True, check=True)
            runs[kind].append(json.loads(child.stdout.strip().splitlines()[-1]))
    result = {"command": "python bench/two_engines.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "date": datetime.date.today().isoformat(), "machine": machine(torch.device("cpu")),
              "model": {"size": args.size, "dtype": "float32", "kv": "paged"}, "threads": kinds,
              "median": {kind: {key: statistics.median(r[key] for r in rs) for key in rs[0]} for kind, rs in runs.items()},
              "runs": runs}
    write_json(result, args.out)
    return result


if __name__ == "__main__":
    main()
