"""Decoding rows' attention over the paged pool: gathered, or read in place as views. Prints JSON.

    python bench/views.py [--rows 1] [--lengths 256,1024,...] [--kv-heads 2] [--head-dim 64] [--heads 8]
                          [--cold] [--out FILE]

Without flash-attn, `rows` decoding rows of one length class attend in one of two ways
(attention.py `_decode_rows`): gathered — their keys and values copied out of the pool
(`BlockPool.gather_rows`), then one sdpa call for all, masked past each row's end — or, for a row whose
keys lie in consecutive blocks, read as a view of the pool in a call of its own (`BlockPool.span`). The gather copies
every key each step and layer; views cost a call per row. Timed on one layer of `mid`'s shape by
default (2 KV heads of 64, 8 query heads), fp32, CPU, side by side in one run:
- gather, view: as the engine does them now without flash-attn (the pool's layout with each key
  head's slots in a row; `attention.decode_attention`: a key head's query heads attend as rows of
  one sequence; the gather lays each row's heads out contiguously, [rows, kv_heads, tokens, dim]);
- gather_head_first: the gather as it was before that: [kv_heads, rows × tokens, dim], attended
  through a transposed view of it;
- view_flash_layout: the same views of a pool in flash-attn's layout, where a head's keys are
  interleaved with the other heads';
- buffer: per-session buffers (kvcache.py: [1, kv_heads, tokens, dim]), the same call;
- gather_before, view_before: as before this benchmark was written: flash-attn's layout, a fresh
  tensor per gather, and sdpa's `enable_gqa`, which reads each key head once per query head.
`paged.VIEW_MIN_TOKENS` is set from where a view per row overtakes the batched gather.

`--cold`: each call timed alone after 64 MB are written, as in the engine, whose step streams the
decoder's weights through the caches between one layer's attention and the next step's (the median
of 40 calls per way, the ways taking turns).
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from transformers import Qwen2Config  # noqa: E402

from afnext.attention import decode_attention  # noqa: E402
from afnext.bench import machine, write_json  # noqa: E402
from afnext.paged import BLOCK_TOKENS, VIEW_MIN_TOKENS, BlockPool  # noqa: E402

sdpa = torch.nn.functional.scaled_dot_product_attention


def per_call_us(fn, budget_s: float = 0.3) -> float:
    """The median of five timings of `fn`, each over about budget_s / 5, in µs per call."""
    fn()
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < budget_s / 25:
        fn()
        n += 1
    reps = max(n * 5, 3)
    times = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        times.append((time.perf_counter() - t) / reps)
    return sorted(times)[2] * 1e6


def cold_us(ways: dict, calls: int = 40) -> dict[str, float]:
    """Each way's median µs per call, every call made after caches are flushed, the ways in turn."""
    flush, times = torch.ones(16 << 20), {name: [] for name in ways}
    for _ in range(calls):
        for name, fn in ways.items():
            flush.add_(1.0)
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: sorted(ts)[calls // 2] * 1e6 for name, ts in times.items()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1, help="decoding rows of one class")
    parser.add_argument("--lengths", default="256,512,1024,2048,4096,16384")
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--cold", action="store_true", help="time each call after flushing the caches")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    lengths, b, kvh, dim = [int(x) for x in args.lengths.split(",")], args.rows, args.kv_heads, args.head_dim
    config = Qwen2Config(hidden_size=args.heads * dim, num_attention_heads=args.heads, num_key_value_heads=kvh,
                         num_hidden_layers=1, head_dim=dim)
    pool = BlockPool(config, b * max(lengths), torch.device("cpu"), torch.float32)
    flash_pool = BlockPool(config, b * max(lengths), torch.device("cpu"), torch.float32, flash_layout=True)
    for t in pool.keys + pool.values + flash_pool.keys + flash_pool.values:
        t.normal_()
    q = torch.randn(b, args.heads, dim)
    rows = []
    for n in lengths:
        first = [BLOCK_TOKENS + r * n for r in range(b)]  # row r's keys: n consecutive slots from first[r]
        index = torch.cat([torch.arange(f, f + n) for f in first])
        rows_index = pool.head_rows(index.view(b, n))
        mask = torch.ones(b, 1, 1, n, dtype=torch.bool)
        buffers = [(torch.randn(1, kvh, n, dim), torch.randn(1, kvh, n, dim)) for _ in range(b)]

        def gathered():
            return decode_attention(q, *pool.gather_rows(0, rows_index), None, mask)

        def gathered_head_first():
            k, v = (t.view(kvh, b, n, dim).transpose(0, 1) for t in pool.gather(0, index))
            return decode_attention(q, k, v, None, mask)

        def viewed(where=pool):
            return [decode_attention(q[r:r + 1], *(t[None] for t in where.span(0, f, n)), None) for r, f in enumerate(first)]

        def buffered():
            return [decode_attention(q[r:r + 1], k, v, None) for r, (k, v) in enumerate(buffers)]

        def gathered_before():
            k, v = (t.flatten(0, 1).index_select(0, index).view(b, n, kvh, dim).transpose(1, 2)
                    for t in (flash_pool.keys[0], flash_pool.values[0]))
            return sdpa(q[:, :, None], k, v, attn_mask=mask, enable_gqa=True)[:, :, 0]

        def viewed_before():
            return [sdpa(q[r:r + 1, :, None], *(t[None] for t in flash_pool.span(0, f, n)), enable_gqa=True)
                    for r, f in enumerate(first)]

        assert torch.allclose(gathered(), torch.cat(viewed()), atol=1e-5)
        assert torch.equal(gathered(), gathered_head_first())
        assert torch.allclose(torch.cat(viewed(flash_pool)), gathered_before(), atol=1e-5)
        ways = {"gather": gathered, "gather_head_first": gathered_head_first, "view": viewed,
                "view_flash_layout": lambda: viewed(flash_pool), "buffer": buffered,
                "gather_before": gathered_before, "view_before": viewed_before}
        timed = cold_us(ways) if args.cold else {name: per_call_us(fn) for name, fn in ways.items()}
        row = {"tokens": n, **{f"{name}_us": round(us, 1) for name, us in timed.items()}}
        rows.append(row)
        print(row, file=sys.stderr)
    result = {
        "what": (f"{b} decoding row(s) of one length class attending on one layer: gathered from the pool in one call, "
                 "or read as views of it a call each, µs per step and layer" + (", caches flushed before each call" if args.cold else "")),
        "command": "python bench/views.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.date.today().isoformat(),
        "machine": machine(torch.device("cpu")),
        "shape": {"rows": b, "kv_heads": kvh, "head_dim": dim, "heads": args.heads, "dtype": "float32"},
        "view_min_tokens": VIEW_MIN_TOKENS,
        "rows": rows,
    }
    write_json(result, args.out)
    return result


if __name__ == "__main__":
    main()
