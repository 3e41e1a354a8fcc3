"""The engine's own time per decoding step (host overhead), by batch size and KV layout. Prints JSON.

    python bench/host.py [--batches 1,8,32,64] [--tokens 64] [--layers 28] [--out FILE]

An H200 reads AF-Next's 16.5 GB of weights in about 3.4 ms, so a batched decoding step there is
short, and what the host does per step decides the tokens per second as soon as it takes longer:
transformers' Python per layer, and ours per session and layer. This measures it on a random-weight
model with AF-Next's 28 decoder layers but a width of 64, where the arithmetic is next to nothing,
so a step's time is the host's: B conversations decode `--tokens` tokens each at once, on one torch
thread. Side by side in one run, taken in turn `--rounds` times at each size: the two KV layouts —
per-session buffers (each session's keys written and attended by calls of its own, attention.py)
and the paged pool (one write and one attention call per layer for the whole batch, paged.py; on
this CPU the rows are gathered, as on a GPU without flash-attn). Reported per batch size: the
median time of a step in which all B decode and nothing else runs (median over the rounds), and the
tokens/s it allows; the fixed cost of a step and the cost per session and layer, from the line
through all batch sizes (intercept; slope / layers).
"""

from __future__ import annotations

import argparse
import datetime
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from afnext import tiny  # noqa: E402
from afnext.bench import machine, write_json  # noqa: E402
from afnext.bench_concurrent import run_concurrent  # noqa: E402
from afnext.engine import Engine  # noqa: E402
from afnext.sampling import GenerationOptions  # noqa: E402



def narrow_model(layers: int):
    """The tiny checkpoint's shape with `layers` decoder layers: AF-Next's depth at almost no arithmetic."""
    shape = {"audio": dict(tiny.SIZES["tiny"]["audio"]), "text": dict(tiny.SIZES["tiny"]["text"], num_hidden_layers=layers)}
    tiny.SIZES[f"narrow{layers}"], tiny.INIT_STD[f"narrow{layers}"] = shape, tiny.INIT_STD["tiny"]
    loaded, _ = tiny.build_in_memory(f"narrow{layers}")
    return loaded


def decode_at_once(engine: Engine, batch: int, tokens: int) -> dict:
    """`batch` conversations asked together, each answering exactly `tokens` tokens; the figure is the
    median time of the steps in which all of them decoded and nothing else ran."""
    options = GenerationOptions(max_new_tokens=tokens, min_new_tokens=tokens)
    times, step, plan, gate = [], engine._step, engine._plan, threading.Event()

    def timed(decodes, prefills):
        t0 = time.perf_counter()
        step(decodes, prefills)
        if len(decodes) == batch and not prefills:
            times.append(time.perf_counter() - t0)

    def gated():  # nothing starts before all `batch` turns are queued: they start in one step
        if not gate.is_set() and engine.waiting < batch:
            time.sleep(0.001)
            return []
        gate.set()
        return plan()

    engine._step, engine._plan = timed, gated
    try:
        run_concurrent(engine, [None] * batch, options)  # text-only turns; a failed one fails the bench
    finally:
        del engine._step, engine._plan
    ms = 1e3 * float(np.median(times))
    return {"batch": batch, "steps_timed": len(times), "ms_per_step": ms, "tok_s": batch * 1e3 / ms}


def summary(rows: list[dict], layers: int) -> dict:
    slope, intercept = np.polyfit([r["batch"] for r in rows], [r["ms_per_step"] for r in rows], 1)
    return {"rows": rows, "ms_per_step_fixed": float(intercept), "us_per_session_layer": float(slope * 1e3 / layers)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python bench/host.py", description=__doc__.splitlines()[0])
    p.add_argument("--batches", default="1,8,32,64", help="conversations decoding at once, comma-separated")
    p.add_argument("--tokens", type=int, default=64, help="tokens each conversation answers")
    p.add_argument("--layers", type=int, default=28, help="decoder layers (AF-Next has 28)")
    p.add_argument("--rounds", type=int, default=2, help="runs of each way at each size, taken in turn")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    torch.set_num_threads(1)
    model = narrow_model(args.layers)
    engines = {"buffers": Engine(model, kv="buffers"), "paged": Engine(model, kv="paged")}
    try:
        for engine in engines.values():
            decode_at_once(engine, 2, 8)  # first-call costs land in no figure
        rows: dict[str, list[dict]] = {name: [] for name in engines}
        for batch in batches:  # the two ways in turn, twice, at each size: this machine drifts over a minute
            runs = {name: [] for name in rows}
            for name in list(engines) * args.rounds:
                runs[name].append(decode_at_once(engines[name], batch, args.tokens))
            for name, done in runs.items():
                ms = float(np.median([r["ms_per_step"] for r in done]))
                rows[name].append({"batch": batch, "steps_timed": sum(r["steps_timed"] for r in done),
                                   "ms_per_step": ms, "tok_s": batch * 1e3 / ms,
                                   "ms_per_step_runs": [r["ms_per_step"] for r in done]})
        variants = {name: {"kv": engines[name].kv, **summary(done, args.layers)} for name, done in rows.items()}
    finally:
        for engine in engines.values():
            engine.close()
    command = " ".join(["python bench/host.py", *(sys.argv[1:] if argv is None else argv)])
    result = {"command": command, "date": datetime.date.today().isoformat(), "machine": machine(torch.device("cpu")),
              "model": {"decoder_layers": args.layers, "hidden_size": tiny.SIZES["tiny"]["text"]["hidden_size"],
                        "weights": "random", "torch_threads": 1},
              "tokens": args.tokens, **variants}
    write_json(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
