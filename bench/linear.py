"""The decoder's projections on CPU three ways: `F.linear`, W·xᵀ, and oneDNN over packed copies
(afnext/linear.py). Prints JSON.

    python bench/linear.py [--size mid] [--repeats 15] [--steps 200] [--prompts 3] [--cold-mb 86] [--out FILE]

Two parts, each side by side in one process:
- products: µs per product of each of the decoder's weight shapes, for 1 … 512 rows, by `F.linear`,
  by W·xᵀ and by oneDNN over a copy packed for `linear.PACK_ROWS` rows, whatever the engine would
  take for that row count. The weights are cold, as in a decoding step that streams more weights than
  the CPU's cache holds: each figure runs a product over enough copies of the weight (`--cold-mb`,
  86 MB) in turn; the three ways take turns `repeats` times, medians. It runs in a thread that ends,
  so its OpenMP team is gone before the engine's starts (afnext/cores.py).
- steps: one engine whose worker takes `F.linear` ("f_linear"), `RowsLinear` without packed copies
  ("w_xt": W·xᵀ up to ROWS_MAX rows) or with them ("packed": W·xᵀ for 1–2 rows, oneDNN for more).
  1 conversation, then 8, decode `steps` tokens each, the way changing every 5 steps, so all see
  the same machine and the same lengths: median ms per decoding step. Then `prompts` rounds of a
  30 s clip's turn per way, in turn: the median of its prefill's time (its 750 audio tokens and
  prompt in one step, the encoder aside).
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


WAYS = ("f_linear", "w_xt", "packed")


def products(size: str, repeats: int, cold_mb: float) -> list[dict]:
    """µs per product, three ways, per weight shape and row count: `F.linear`, W·xᵀ (for every row
    count here, past the engine's `ROWS_MAX` too) and oneDNN over a packed copy (from 1 row)."""
    out = []
    for n_out, n_in in shapes(size):
        weights = [torch.randn(n_out, n_in) for _ in range(max(4, int(cold_mb * 1e6) // (4 * n_out * n_in)))]
        packed = [torch.ops.mkldnn._reorder_linear_weight(w, linear.PACK_ROWS) for w in weights]
        for rows in ROWS:
            x = torch.randn(rows, n_in)
            two = torch.cat([x, x.new_zeros(1, n_in)]) if rows == 1 else x  # one row padded, as RowsLinear does
            ways = (lambda: [F.linear(x, w) for w in weights],
                    lambda: [(w @ two.T).T[:rows].contiguous() for w in weights],
                    lambda: [torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "") for p in packed])
            us = [1e6 * t / len(weights) for t in _time_in_turn(ways, repeats)]
            out.append({"weight": [n_out, n_in], "rows": rows, **{f"{w}_us": round(t, 1) for w, t in zip(WAYS, us)}})
    return out


def _time_in_turn(fns, repeats: int) -> list[float]:
    """Median seconds of each of `fns`, run in turn `repeats` times each (the machine drifts)."""
    runs: list[list[float]] = [[] for _ in fns]
    for i in range(repeats + 1):
        for fn, into in zip(fns, runs):
            t0 = time.perf_counter()
            fn()
            if i:  # the first pass warms up
                into.append(time.perf_counter() - t0)
    return [statistics.median(r) for r in runs]


def steps(size: str, n_steps: int, prompts: int) -> dict:
    """One engine, the three ways taken in turn by its worker: median ms of a decoding step for 1 and
    for 8 conversations at once (the way changes every few steps), and of a prompt's prefill (a 30 s
    clip and a question, `prompts` asks per way, in turn)."""
    loaded, _ = build_in_memory(size)
    engine = Engine(loaded)
    packed = {m: m.packed for m in loaded.model.modules() if isinstance(m, linear.RowsLinear)}
    options = GenerationOptions(max_new_tokens=n_steps, min_new_tokens=n_steps, repetition_penalty=1.0)
    times: dict[tuple[int, str], list[float]] = {}
    step, count, fixed = engine._step, [0], [None]

    def take(way: str) -> None:  # on the worker thread, between steps
        linear._engaged.on = way != "f_linear"
        for module, copy in packed.items():
            module.packed = copy if way == "packed" else None

    def timed(decodes, prefills) -> None:
        take(fixed[0] or WAYS[(count[0] // SWITCH_STEPS) % len(WAYS)])
        t0 = time.perf_counter()
        step(decodes, prefills)
        if not prefills:
            count[0] += 1
            times.setdefault((len(decodes), WAYS[((count[0] - 1) // SWITCH_STEPS) % len(WAYS)]), []).append(
                time.perf_counter() - t0)

    def ask(seed: int, seconds: float = bc.VOICE_S, opts: GenerationOptions = options):
        done = None
        for event in Session(engine).ask(bc.QUESTION, bc.voice_clip(seconds, seed=seed), options=opts):
            done = event
        return done.reply

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
        out[f"decode_{n}_rows_ms"] = {way: round(1e3 * statistics.median(times[(n, way)]), 2) for way in WAYS}
        out[f"decode_{n}_rows_steps"] = {way: len(times[(n, way)]) for way in WAYS}
    prefill: dict[str, list[float]] = {way: [] for way in WAYS}
    for i in range(prompts):
        for way in WAYS:
            fixed[0] = way
            prefill[way].append(ask(i, 30.0, GenerationOptions(max_new_tokens=1)).timings.prefill_s)
    fixed[0] = None
    out["prefill_30s_clip_ms"] = {way: round(1e3 * statistics.median(t), 1) for way, t in prefill.items()}
    out["packed_mb"] = round(sum(m.weight.numel() * 4 for m, c in packed.items() if c is not None) / 1e6, 1)
    engine.close()
    return out





def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=["tiny", "mid"], default="mid")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--steps", type=int, default=200, help="tokens each conversation decodes in the step bench")
    p.add_argument("--prompts", type=int, default=3, help="prefills timed per way")
    p.add_argument("--cold-mb", type=float, default=COLD_MB, help="MB of weights each product cycles through")
    p.add_argument("--out")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    result = {"command": "python bench/linear.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "date": datetime.date.today().isoformat(), "machine": machine(torch.device("cpu")), "size": args.size,
              "products": in_own_thread(products, args.size, args.repeats, args.cold_mb),
              "steps": steps(args.size, args.steps, args.prompts)}
    write_json(result, args.out)
    return result


if __name__ == "__main__":
    main()
