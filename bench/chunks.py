"""A prompt chunk's attention after earlier tokens, on CPU: masked sdpa against two flash calls merged
by log-sum-exp (`attention.chunk_attention`). Prints JSON.

    python bench/chunks.py [--pasts 1024,4096,15000,45000] [--chunks 32,256] [--kv-heads 2] [--heads 8] [--head-dim 64] [--out FILE]

A long recording is prefilled in chunks (128 tokens on CPU, planner.PREFILL_CHUNK_TOKENS) and a
follow-up question is one short chunk after the whole conversation. Each chunk attends over all the
earlier tokens and, causally, over itself. Timed on one layer of `mid`'s shape by default (2 KV
heads of 64, 8 query heads), fp32, side by side in one run, µs per call:
- masked: sdpa with the chunk's causal mask [n, past + n] and `enable_gqa` (what `_one` did before);
- merged: `chunk_attention`, the past with no mask (a key head's query heads as rows of one query)
  and the chunk over its own keys with the causal flag, merged by their log-sum-exp;
- causal_pass_share: for scale, a single causal sdpa pass over past + n tokens, times the share of
  its query-key pairs that the chunk's n rows (the last ones) attend: what the same rows cost when
  the whole prompt is attended in one call (timed once, up to 16,384 tokens). The last rows attend
  the most keys, so this is about twice the pass's time divided by its (past + n) / n chunks.
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

from afnext.attention import chunk_attention  # noqa: E402
from afnext.bench import machine, write_json  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from views import per_call_us  # noqa: E402

sdpa = torch.nn.functional.scaled_dot_product_attention
CAUSAL_PASS_MAX = 16384  # tokens: longer single passes are not timed


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pasts", default="1024,4096,15000,45000")
    parser.add_argument("--chunks", default="32,256")
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    kvh, heads, dim = args.kv_heads, args.heads, args.head_dim
    scale = dim ** -0.5
    rows = []
    for past in (int(x) for x in args.pasts.split(",")):
        for n in (int(x) for x in args.chunks.split(",")):
            q = torch.randn(1, heads, n, dim)
            k, v = torch.randn(1, kvh, past + n, dim), torch.randn(1, kvh, past + n, dim)
            mask = torch.ones(n, past + n, dtype=torch.bool).tril(past)

            def masked():
                return sdpa(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)

            def merged():
                return chunk_attention(q, k, v, scale)

            assert torch.allclose(merged(), masked().transpose(1, 2), atol=1e-5)
            whole_q = torch.randn(1, heads, past + n, dim) if past + n <= CAUSAL_PASS_MAX else None
            row = {"past": past, "chunk": n, "masked_us": round(per_call_us(masked), 1),
                   "merged_us": round(per_call_us(merged), 1)}
            row["causal_pass_share_us"] = None  # a single pass over 45,000 tokens takes most of a minute here
            if past + n <= CAUSAL_PASS_MAX:
                once = time.perf_counter()
                sdpa(whole_q, k, v, is_causal=True, scale=scale, enable_gqa=True)
                total, pairs = past + n, n * past + n * (n + 1) / 2  # the last n rows' query-key pairs
                share = pairs / (total * (total + 1) / 2)
                row["causal_pass_share_us"] = round((time.perf_counter() - once) * 1e6 * share, 1)
            row["speedup"] = round(row["masked_us"] / row["merged_us"], 2)
            rows.append(row)
            print(row, file=sys.stderr)
    result = {
        "what": "one prompt chunk after `past` tokens attending on one layer: masked sdpa against two merged flash calls, µs per call",
        "command": "python bench/chunks.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.date.today().isoformat(),
        "machine": machine(torch.device("cpu")),
        "shape": {"kv_heads": kvh, "heads": heads, "head_dim": dim, "dtype": "float32"},
        "rows": rows,
    }
    write_json(result, args.out)
    return result


if __name__ == "__main__":
    main()
