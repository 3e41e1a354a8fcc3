"""The decoder's projections on CPU: W·xᵀ for a step's one or two rows, oneDNN over packed copies of
the weights for more.

Why. A decoding step multiplies a few rows (one per conversation) by every weight matrix, and on CPU
that is bound by reading the weights: `mid`'s decoder holds 56 MB of them, more than this machine's
32 MB cache, so every step streams them from memory. `F.linear(x, W)` hands MKL the product as x·Wᵀ,
and for a few rows its kernels read the weights far slower than memory allows; one row goes to
sgemv, which ran on one core. Two remedies, measured on 2 cores of this AMD EPYC
(`python bench/linear.py`, bench/results/cpu-linear.json; weights cold, the ways in turn), µs per
product, F.linear / W·xᵀ / packed:

    weight (out × in)   rows:  1              2              8              32             512
    1408 × 512 (gate, up)    285 / 118 / 146  416 / 149 / 151  302 / 305 / 154  505 / 533 / 297  4110 / 4795 / 3466
    512 × 1408 (down)        214 / 112 / 142  292 / 185 / 151  250 / 318 / 142  430 / 435 / 297  4562 / 4947 / 3571
    128 × 512 (key, value)    29 /  21 /  31   47 /  31 /  41   36 /  50 /  36   57 /  79 /  65   401 /  501 /  351

- W·xᵀ: the same product taken the other way round, the small [N, rows] result transposed back,
  reads the weights 2-3× faster for one row (padded with a zero row: the two-row path) to four; from
  about 8 rows it is no faster than F.linear. It needs nothing more.
- Packed: oneDNN's linear over a copy of the weight laid out for its kernel (`PACK_ROWS`), made
  once: twice as fast as F.linear at 8 rows and 15-25% faster at 512 (a prompt's chunk).

A whole step of `mid` in one engine, the three ways alternating every 5 steps (the same file):
one decoding row 8.1 / 6.4 / 6.6 ms, 8 rows 14.2 / 14.8 / 11.4 ms, a 30 s clip's prefill 213 / 214 /
194 ms. So one or two rows take W·xᵀ, and more rows the packed copy, which costs the decoder's weights
again in memory (55 MB on `mid`) and is made only while it fits in `PACK_MAX_BYTES`: AF-Next's 28 GB
of float32 decoder weights do not, and there up to `ROWS_MAX` rows take W·xᵀ and more F.linear.
Weights small enough to stay in the cache (`MIN_WEIGHT_ELEMENTS`) keep F.linear: no way was
reliably faster for them. This machine's figures move ±20% between runs; the ranking above held in
every run but W·xᵀ's at 8 rows, which won in two runs of three.

Only the engine's steps take these paths: `engage()` is called by the engine's worker thread, and
the projections check it per call, so stock `generate` on the same model (the equality tests, the
"ours vs stock" benchmarks) runs stock in any other thread. The sums are the same dot products in
another order: results differ from F.linear's in the last bits, as a batch of 8 rows already differs
from one row alone in MKL, and the greedy tokens the tests compare stay the same. A GPU keeps
F.linear, and so does any dtype but float32: this was measured with float32 on MKL and oneDNN only.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .cores import in_own_thread

ROWS_MAX = 4  # without a packed copy, up to this many rows take W·xᵀ
# Weights smaller than this (1 MiB of float32) keep F.linear: they stay in the cache between steps, and
# neither way was reliably faster for `mid`'s 128×512 key and value projections.
MIN_WEIGHT_ELEMENTS = 1 << 18
PACKED_FROM_ROWS = 3  # from this many rows a packed copy is used where there is one (W·xᵀ below)
PACK_ROWS = 8  # the row count oneDNN lays a packed weight out for: the fastest here from 2 rows to 512
PACK_MAX_BYTES = 2 << 30  # the packed copies are made only if they take no more than this in all
_engaged = threading.local()


def engage() -> None:
    """The calling thread's forwards take the faster paths (the engine's worker calls this once)."""
    _engaged.on = True


class RowsLinear(torch.nn.Linear):
    """`nn.Linear` whose forward, in an engaged thread, takes one or two rows as W·xᵀ and more through
    `packed`, a oneDNN copy of the weight (without one, up to ROWS_MAX rows as W·xᵀ, more by F.linear)."""

    packed: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not getattr(_engaged, "on", False):
            return F.linear(x, self.weight, self.bias)
        rows = x.numel() // x.shape[-1]
        flat = x.reshape(rows, x.shape[-1])
        if self.packed is not None and rows >= PACKED_FROM_ROWS:
            out = torch.ops.mkldnn._linear_pointwise(flat, self.packed, self.bias, "none", [], "")
            return out.view(*x.shape[:-1], self.out_features)
        if rows > ROWS_MAX:
            return F.linear(x, self.weight, self.bias)
        if rows == 1:  # sgemv is the slow path: two rows, the second zero
            flat = torch.cat([flat, flat.new_zeros(1, flat.shape[1])])
        out = (torch.mm(self.weight, flat.T) if self.bias is None
               else torch.addmm(self.bias[:, None], self.weight, flat.T))  # [out_features, rows]
        return out.T[:rows].contiguous().view(*x.shape[:-1], self.out_features)


@dataclass(frozen=True)
class Installed:
    """What `install` did: how many projections are `RowsLinear`, and the bytes of their packed copies
    (0 when there are none)."""

    layers: int
    packed_bytes: int


def install(model: torch.nn.Module, min_elements: int = MIN_WEIGHT_ELEMENTS,
            pack_max_bytes: int = PACK_MAX_BYTES) -> Installed:
    """Make the decoder's projections and the lm_head whose weights hold `min_elements` or more
    `RowsLinear`, on a float32 CPU model, and give them packed copies if these take at most
    `pack_max_bytes` and oneDNN is there (idempotent). The audio tower and projector keep theirs. A
    copy is made once: weights loaded into the model afterwards would not reach the engine's steps."""
    param = next(model.parameters())
    if param.device.type != "cpu" or param.dtype != torch.float32:
        return Installed(0, 0)
    layers = [m for m in [*model.get_decoder().modules(), model.get_output_embeddings()]
              if type(m) in (torch.nn.Linear, RowsLinear) and m.weight.numel() >= min_elements]
    for module in layers:
        module.__class__ = RowsLinear
    size = sum(m.weight.numel() * m.weight.element_size() for m in layers)
    if layers and size <= pack_max_bytes and torch.backends.mkldnn.is_available():
        in_own_thread(_pack, [m for m in layers if m.packed is None])  # its OpenMP team ends with it (cores.py)
    packed = bool(layers) and all(m.packed is not None for m in layers)  # all of them or none
    return Installed(len(layers), size if packed else 0)


def _pack(layers: list[RowsLinear]) -> None:
    with torch.no_grad():
        for module in layers:
            module.packed = torch.ops.mkldnn._reorder_linear_weight(module.weight.detach(), PACK_ROWS)
