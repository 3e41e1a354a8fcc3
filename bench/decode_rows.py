"""Decoding rows' attention inside the engine, the ways taking turns step by step. Prints JSON.

    python bench/decode_rows.py [--clips 5,25,40,60] [--conversations 8] [--tokens 48] [--rounds 2] [--out FILE]

bench/views.py times one layer's attention alone. In the engine the same call runs between matmuls
that stream the decoder's weights (56 MB on `mid`) through the caches, so the keys come from memory
every time, and the figures there did not predict the step's. Here `--conversations` conversations,
each a `--clips` seconds clip and a question, decode together on `mid` (random weights, fp32, the CPU,
the paged pool) while the way their rows attend changes every step, so that a slow minute of a shared
machine weighs on every way alike. Per clip length, the median time of the engine's steps with every
conversation decoding and nothing else, per way:
- gather: the rows' keys copied out of the pool row by row ([rows, kv_heads, tokens, dim], contiguous:
  `BlockPool.gather_rows`), then one sdpa call for the class — how the engine attends short rows;
- gather_head_first: the copy as it was laid out before, [kv_heads, rows × tokens, dim], attended
  through a transposed view;
- views: each row read in place as a view of the pool, a call per row — how the engine attends rows
  of `paged.VIEW_MIN_TOKENS` or more.
Every row is put in one class for the run (VIEW_MIN_TOKENS is set out of reach), so each way sees
the same rows; a row's tokens are its clip's audio tokens, the prompt and the reply so far.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from afnext import attention, paged  # noqa: E402
from afnext.bench import machine, write_json  # noqa: E402
from afnext.bench_concurrent import run_concurrent, voice_clip, warm_up  # noqa: E402
from afnext.engine import Engine  # noqa: E402
from afnext.sampling import GenerationOptions  # noqa: E402
from afnext.tiny import build_in_memory  # noqa: E402

engine_rows = attention._decode_rows


def _queries(query: torch.Tensor, rows: paged.DecodeClass) -> torch.Tensor:
    q = query[0].narrow(1, rows.first, rows.rows.shape[0]) if rows.contiguous else query[0].index_select(1, rows.rows)
    return q.transpose(0, 1)


def gathered_head_first(query, rows: paged.DecodeClass, pool: paged.BlockPool, layer: int, scaling, flash: bool):
    b, _, width = rows.index.shape
    slots = rows.index[:, 0].reshape(-1)  # key head 0's rows of the table are the pool slots themselves
    k, v = (t.view(t.shape[0], b, width, t.shape[-1]).transpose(0, 1) for t in pool.gather(layer, slots))
    return attention.decode_attention(_queries(query, rows), k, v, scaling, rows.mask)


def viewed(query, rows: paged.DecodeClass, pool: paged.BlockPool, layer: int, scaling, flash: bool):
    q, out = _queries(query, rows), []
    for r, (length, first) in enumerate(zip(rows.lengths.tolist(), rows.index[:, 0, 0].tolist())):
        out.append(attention.decode_attention(q[r:r + 1], *(t[None] for t in pool.span(layer, first, length)), scaling))
    return torch.cat(out)


WAYS = {"gather": engine_rows, "gather_head_first": gathered_head_first, "views": viewed}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", default="5,25,40,60", help="seconds of each conversation's clip, one run per length")
    parser.add_argument("--conversations", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=48, help="reply tokens per conversation (fixed)")
    parser.add_argument("--rounds", type=int, default=2, help="conversations decoded together, per clip length")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    loaded, _ = build_in_memory("mid", "cpu", torch.float32)
    engine = Engine(loaded, kv="paged")
    ways = list(WAYS)
    steps: list[tuple[int, int, bool, float]] = []  # (step, decoding rows, prefill in it, seconds)
    lengths: list[int] = []  # the rows' tokens, every class attended
    step = Engine._step

    def timed(self, decodes, prefills):
        t = time.perf_counter()
        step(self, decodes, prefills)
        steps.append((self.steps, len(decodes), bool(prefills), time.perf_counter() - t))

    def rows_by_step(query, rows, pool, layer, scaling, flash):
        if rows.span is not None:  # a row alone (warming up, the last of a round) is read in place by every way
            return engine_rows(query, rows, pool, layer, scaling, flash)
        if layer == 0:
            lengths.extend(rows.lengths.tolist())
        return WAYS[ways[engine.steps % len(ways)]](query, rows, pool, layer, scaling, flash)

    view_min, paged.VIEW_MIN_TOKENS = paged.VIEW_MIN_TOKENS, 1 << 30
    Engine._step, attention._decode_rows = timed, rows_by_step
    options = GenerationOptions(max_new_tokens=args.tokens, min_new_tokens=args.tokens, temperature=0.0)
    runs = []
    try:
        warm_up(engine)
        for seconds in (float(s) for s in args.clips.split(",")):
            clips = [voice_clip(seconds, seed=i) for i in range(args.conversations)]
            steps.clear()
            lengths.clear()
            for _ in range(args.rounds):
                run_concurrent(engine, clips, options)
            full = [(n, s) for n, rows, prefill, s in steps if rows == args.conversations and not prefill]
            run = {"clip_s": seconds, "row_tokens": [min(lengths), max(lengths)]}
            for i, way in enumerate(ways):
                times = [s for n, s in full if n % len(ways) == i]
                run[f"{way}_step_ms"] = round(statistics.median(times) * 1e3, 2)
                run[f"{way}_steps"] = len(times)
            runs.append(run)
            print(run, file=sys.stderr, flush=True)
    finally:
        paged.VIEW_MIN_TOKENS = view_min
        Engine._step, attention._decode_rows = step, engine_rows
        engine.close()
    result = {
        "what": (f"{args.conversations} conversations decoding together on mid (fp32, CPU, paged pool): the median "
                 "step, ms, per way their rows attend, the ways taking turns step by step"),
        "command": "python bench/decode_rows.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.date.today().isoformat(),
        "machine": machine(torch.device("cpu")),
        "view_min_tokens": view_min,
        "runs": runs,
    }
    write_json(result, args.out)
    return result


if __name__ == "__main__":
    main()
