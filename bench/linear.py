"""Few rows through the decoder's projections on CPU: `F.linear` against W·xᵀ (afnext/linear.py). Prints JSON.

    python bench/linear.py [--size mid] [--repeats 15] [--steps 200] [--cold-mb 86] [--out FILE]

Two parts, both side by side in one process:
- products: µs per product of each of the decoder's weight shapes, for 1 … 512 rows, by `F.linear`
  and by `RowsLinear`'s W·xᵀ (in an engaged thread, for every row count, though the engine takes it
  only up to `linear.ROWS_MAX`). The weights are cold, as in a decoding step that streams
  more weights than the CPU's cache holds: each figure runs a product over enough copies of the weight
  (`--cold-mb`, 86 MB) in turn; the two ways alternate `repeats` times, medians. It runs in a thread that
  ends, so its OpenMP team is gone before the engine's starts (afnext/cores.py).
- steps: one engine, 1 conversation and then 8 decoding `steps` tokens each; the worker takes the
  W·xᵀ path in every other run of 5 steps and `F.linear` in the others, so both see the same machine
  and the same lengths. Median ms per decoding step of each.
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
import torch.nn.functional as F  # noqa: E402

from afnext import bench_concurrent as bc  # noqa: E402
from afnext import linear  # noqa: E402
from afnext.bench import machine, write_json  # noqa: E402
from afnext.cores import in_own_thread  # noqa: E402
from afnext.engine import Engine  # noqa: E402
from afnext.sampling import GenerationOptions  # noqa: E402
from afnext.session import Session  # noqa: E402
from afnext.tiny import SIZES, build_in_memory  # noqa: E402

ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 512)
COLD_MB = 86  # weights a product cycles through: well over a 32 MB cache
SWITCH_STEPS = 5  # the step bench changes path every this many steps


def shapes(size: str) -> list[tuple[int, int]]:
    text = SIZES[size]["text"]
    h, i = text["hidden_size"], text["intermediate_size"]
    kv = h // text["num_attention_heads"] * text["num_key_value_heads"]
    return [(h, h), (kv, h), (i, h), (h, i)]  # q/o, k/v, gate/up, down: (out, in)


def products(size: str, repeats: int, cold_mb: float) -> list[dict]:
    """µs per product, both ways, per weight shape and row count (W·xᵀ for every row count here,
    past the engine's `ROWS_MAX` too)."""
    rows_max, linear.ROWS_MAX = linear.ROWS_MAX, max(ROWS)
    try:
        return _products(size, repeats, cold_mb)
    finally:
        linear.ROWS_MAX = rows_max


def _products(size: str, repeats: int, cold_mb: float) -> list[dict]:
    out = []
    for n_out, n_in in shapes(size):
        weights = [torch.randn(n_out, n_in) for _ in range(max(4, int(cold_mb * 1e6) // (4 * n_out * n_in)))]
        modules = []
        for w in weights:
            m = linear.RowsLinear(n_in, n_out, bias=False)
            m.weight.data = w
            modules.append(m)
        for rows in ROWS:
            x = torch.randn(1, rows, n_in)
            stock, ours = (t / len(weights) for t in _time_pair(lambda: [F.linear(x, w) for w in weights],
                                                                 lambda: [m(x) for m in modules], repeats))
            out.append({"weight": [n_out, n_in], "rows": rows, "f_linear_us": round(1e6 * stock, 1),
                        "w_xt_us": round(1e6 * ours, 1), "speedup": round(stock / ours, 2)})
    return out


def _time_pair(a, b, repeats: int) -> tuple[float, float]:
    """Median seconds of `a` and of `b`, run in turn `repeats` times each (the machine drifts)."""
    runs: tuple[list[float], list[float]] = ([], [])
    for i in range(repeats + 1):
        for fn, into in ((a, runs[0]), (b, runs[1])):
            t0 = time.perf_counter()
            fn()
            if i:  # the first pass warms up
                into.append(time.perf_counter() - t0)
    return statistics.median(runs[0]), statistics.median(runs[1])


def steps(size: str, n_steps: int) -> dict:
    """Median decoding-step ms with each path, for 1 and for 8 conversations at once."""
    loaded, _ = build_in_memory(size)
    engine = Engine(loaded)
    options = GenerationOptions(max_new_tokens=n_steps, min_new_tokens=n_steps, repetition_penalty=1.0)
    times: dict[tuple[int, bool], list[float]] = {}
    step, count = engine._step, [0]

    def timed(decodes, prefills) -> None:  # on the worker thread: its path switches every few steps
        on = (count[0] // SWITCH_STEPS) % 2 == 1
        linear._engaged.on = on
        t0 = time.perf_counter()
        step(decodes, prefills)
        if not prefills:
            count[0] += 1
            times.setdefault((len(decodes), on), []).append(time.perf_counter() - t0)

    def ask(seed: int) -> None:
        for _ in Session(engine).ask(bc.QUESTION, bc.voice_clip(bc.VOICE_S, seed=seed), options=options):
            pass

    ask(99)  # warm
    engine._step = timed
    out = {}
    for n in (1, 8):
        times.clear()
        threads = [threading.Thread(target=ask, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stock, ours = (statistics.median(times[(n, on)]) for on in (False, True))
        out[f"{n}_rows"] = {"f_linear_ms": round(1e3 * stock, 2), "w_xt_ms": round(1e3 * ours, 2),
                            "speedup": round(stock / ours, 2), "steps_each": [len(times[(n, on)]) for on in (False, True)]}
    engine.close()
    return out


def _engaged(fn, *args):
    """`fn(*args)` with this thread's RowsLinear taking W·xᵀ."""
    linear.engage()
    return fn(*args)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=["tiny", "mid"], default="mid")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--steps", type=int, default=200, help="tokens each conversation decodes in the step bench")
    p.add_argument("--cold-mb", type=float, default=COLD_MB, help="MB of weights each product cycles through")
    p.add_argument("--out")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    result = {"command": "python bench/linear.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "date": datetime.date.today().isoformat(), "machine": machine(torch.device("cpu")), "size": args.size,
              "products": in_own_thread(_engaged, products, args.size, args.repeats, args.cold_mb), "steps": steps(args.size, args.steps)}
    write_json(result, args.out)
    return result


if __name__ == "__main__":
    main()
