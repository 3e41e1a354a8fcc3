"""The decoder's projections for a step's few rows on CPU, computed as weight × rowsᵀ.

Why. A decoding step multiplies a few rows (one per conversation) by every weight matrix, and on CPU
that is bound by reading the weights: `mid`'s decoder holds 56 MB of them, more than this machine's
32 MB cache, so every step streams them from memory. `F.linear(x, W)` hands MKL the product as
x·Wᵀ, and for a few rows its kernels read the weights far slower than memory allows; one row goes
to sgemv, which ran on one core. The same product taken the other way round, W·xᵀ with the small
[N, rows] result transposed back, streams them up to 3× faster. Measured on 2 cores of this AMD EPYC
with MKL (`python bench/linear.py`, bench/results/cpu-linear.json; weights cold, the two ways in
turn), µs per product:

    weight (out × in)   rows:  1          2          8          32         128         512
    1408 × 512 (gate, up)    274 → 141  394 → 119  388 → 263  637 → 498  1623 → 1437  4978 → 5469
    512 × 1408 (down)        214 → 160  312 → 134  319 → 334  555 → 458  1323 → 1232  3951 → 4296
    128 × 512 (key, value)    29 →  48   40 →  38   46 →  52   70 →  80   132 →  171   392 →  610

and a whole decoding step of `mid` (the two ways alternating every 5 steps in one engine): one row
7.6 → 4.7 ms, 8 rows 12.3 → 11.2 ms. One row is padded with a zero row to take the two-row path.
The products move ±20% between runs of this benchmark; a whole step gained in every run. Up to
`ROWS_MAX` rows take W·xᵀ and a prompt chunk's hundreds keep `F.linear`; so do weights small enough
to stay in the cache (`MIN_WEIGHT_ELEMENTS`), where W·xᵀ was slower.

Only the engine's steps take this path: `engage()` is called by the engine's worker thread, and
the projections check it per call, so stock `generate` on the same model (the equality tests, the
"ours vs stock" benchmarks) runs stock in any other thread. The sums are the same dot products in a
different order: results differ from `F.linear`'s in the last bits, as a batch of 8 rows already
differs from one row alone in MKL, and the greedy tokens the tests compare stay the same.
A GPU keeps `F.linear`, and so does any dtype but float32: this was measured with MKL's float32 only.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F

ROWS_MAX = 32  # up to this many rows take W·xᵀ (faster through 128 rows for the large weights)
# Weights smaller than this (1 MiB of float32) stay in the cache between steps, and there W·xᵀ was no
# faster: `mid`'s 128×512 key and value projections took 1.4× as long with it at 8 rows.
MIN_WEIGHT_ELEMENTS = 1 << 18
_engaged = threading.local()


def engage() -> None:
    """The calling thread's forwards take W·xᵀ for few rows (the engine's worker calls this once)."""
    _engaged.on = True


class RowsLinear(torch.nn.Linear):
    """`nn.Linear` whose forward, in an engaged thread, computes a few rows as W·xᵀ."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if rows > ROWS_MAX or not getattr(_engaged, "on", False):
            return F.linear(x, self.weight, self.bias)
        flat = x.reshape(rows, x.shape[-1])
        if rows == 1:  # sgemv is the slow path: two rows, the second zero
            flat = torch.cat([flat, flat.new_zeros(1, flat.shape[1])])
        out = (torch.mm(self.weight, flat.T) if self.bias is None
               else torch.addmm(self.bias[:, None], self.weight, flat.T))  # [out_features, rows]
        return out.T[:rows].contiguous().view(*x.shape[:-1], self.out_features)


def install(model: torch.nn.Module, min_elements: int = MIN_WEIGHT_ELEMENTS) -> int:
    """Make the decoder's projections and the lm_head whose weights hold `min_elements` or more
    `RowsLinear`, on a float32 CPU model (idempotent). The audio tower and projector keep theirs: they
    see hundreds of rows a call. Returns how many are `RowsLinear`."""
    param = next(model.parameters())
    if param.device.type != "cpu" or param.dtype != torch.float32:
        return 0
    swapped = 0
    for module in [*model.get_decoder().modules(), model.get_output_embeddings()]:
        if type(module) in (torch.nn.Linear, RowsLinear) and module.weight.numel() >= min_elements:
            module.__class__ = RowsLinear
            swapped += 1
    return swapped
