"""The decoding step: eager, or replayed from a captured CUDA graph.

At batch 1 a decoding step of AF-Next's 28-layer decoder is some 400 small kernels; launched one by
one from Python they cost about as much as reading the 16.5 GB of weights they need, and at batch 32
the per-conversation calls of the buffers layout add some 900 more (bench/host.py). A CUDA graph
launches them all at once. A graph replays fixed shapes at fixed addresses:
- per-session buffers (kvcache.py): a request decoding alone puts its cache in static mode for the
  step (`GrowingLayer.start_static`: whole buffers, a device-side length, the unfilled part masked as
  the future); the graph is kept on the cache and captured again only when its buffers change.
  Batched steps run eagerly.
- the paged pool (paged.py): a step in which only decoding rows run goes through a `BucketStep` for
  its batch size rounded up to a bucket (and its longest row rounded up to a power of two): token
  ids, positions, write slots and block tables in fixed buffers, refilled each step; padding rows
  decode into the scratch block. A few graphs cover every batch.

`mode` "eager" is the engine's packed step (attention.py); "static" runs the fixed-shape steps above
eagerly (any device: the CPU tests check them against eager); "graphs" captures them (CUDA only).
NOT YET RUN ON A GPU: both graph paths are written to transformers 5.24's and torch's contracts but
no GPU was at hand to capture them; they are opt-in (`Engine(decode="graphs")`) until measured.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers.cache_utils import Cache

from . import paged
from .attention import NO_MASKS
from .kvcache import end_static, start_static

MODES = ("eager", "static", "graphs")
WARMUP_STEPS = 2  # runs on a side stream before capture, as torch.cuda.graph requires
Step = Callable[[int], torch.Tensor]  # token → logits for the next one [vocab]


def begin(cache: Cache, capacity: int) -> None:
    """Lay `cache` out for static decoding ("static" or "graphs" mode), for at most `capacity`
    tokens by the turn's end."""
    start_static(cache, capacity)


def graphed(model: torch.nn.Module, cache: Cache) -> Step:
    """The decoding step over `cache` (in static mode) as a CUDA graph: the one kept on the cache,
    or a new capture when its buffers changed."""
    key = tuple((layer._k.data_ptr(), layer.capacity) for layer in cache.layers)
    graphed = getattr(cache, "_afnext_graph", None)
    if graphed is None or graphed.key != key:
        graphed = cache._afnext_graph = _GraphedStep(model, cache, key)
    return graphed


def end(cache: Cache, length: int | None = None) -> None:
    """Static decoding is over: the cache goes back to its growing views, of `length` tokens when
    the caller knows it (no host sync), else as many as the device counted."""
    end_static(cache, length)


class _GraphedStep:
    """One decoding step captured as a CUDA graph over a cache in static mode."""

    def __init__(self, model: torch.nn.Module, cache: Cache, key: tuple) -> None:
        device = model.device
        self.key = key
        self.ids = torch.zeros((1, 1), dtype=torch.long, device=device)
        lengths = [layer.cumulative_length.clone() for layer in cache.layers]
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                model(input_ids=self.ids, cache=cache, use_cache=True)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = model(input_ids=self.ids, cache=cache, use_cache=True).logits[0, -1]
        # Warm-up and capture wrote past the filled part (masked, to be overwritten): rewind the lengths.
        for layer, length in zip(cache.layers, lengths):
            layer.cumulative_length.copy_(length)

    def __call__(self, token: int) -> torch.Tensor:
        self.ids.fill_(token)  # a device-side write: no host sync
        self.graph.replay()
        return self.logits


# ---- paged: a decoding step per batch-size bucket (paged.py) ----

BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64)  # decoding rows a step's graph is made for; a batch takes the next up


def bucket_key(rows: list[tuple], flash: bool) -> tuple[int, int] | None:
    """(rows, width) of the fixed-shape step that takes these decoding rows ((cache, token, length)
    each), or None when there are more rows than the largest bucket. Width: blocks per row for
    flash-attn (it reads no further than each row's length), keys per row for the gather (a power of
    two from 256: a few graphs cover every length; every row is padded to the longest row's power
    of two, so short rows beside a long one read padding that eager classes would not)."""
    size = next((b for b in BATCH_BUCKETS if b >= len(rows)), None)
    if size is None:
        return None
    longest = max(length for _, _, length in rows)
    width = paged.blocks_for(longest) if flash else max(longest, paged.BLOCK_TOKENS)
    return size, 1 << (width - 1).bit_length()


class BucketStep:
    """A decoding step of up to `size` rows over the paged pool, in buffers of fixed shape and address:
    token ids, positions, the slots the new keys go to, and where each row's keys lie. `run` fills
    them and runs the step — replaying a CUDA graph captured over them when `capture`, else eagerly
    (static mode: the CPU tests check it against the eager step). Rows past the batch decode a dummy
    token into the scratch block."""

    def __init__(self, model: torch.nn.Module, pool: paged.BlockPool, size: int, width: int, flash: bool,
                 capture: bool, mempool=None) -> None:
        assert flash == pool.flash_layout, "flash-attn reads the pool only in its own layout"
        dev = pool.device
        self.model, self.size, self.width, self.flash = model, size, width, flash
        self.ids = torch.zeros((1, size), dtype=torch.long, device=dev)
        self.positions = torch.zeros((1, size), dtype=torch.long, device=dev)
        self.slots = torch.zeros(size, dtype=torch.long, device=dev)  # the scratch block's first slot
        self.lengths = torch.ones(size, dtype=torch.int32, device=dev)
        table = torch.zeros((size, width), dtype=torch.int32, device=dev) if flash else None
        index = None if flash else torch.zeros((size, pool.kv_heads, width), dtype=torch.long, device=dev)
        mask = None if flash else torch.zeros((size, 1, 1, width), dtype=torch.bool, device=dev)
        if mask is not None:
            mask[..., 0] = True  # a padding row sees one key: no row is all masked (its softmax would be NaN)
        self.rows = paged.DecodeClass(torch.arange(size, device=dev), self.lengths, table, index, mask, 0, True)
        self.step = paged.PagedStep(pool, self.slots, [self.rows], [], flash)
        self.graph, self.logits = None, None
        if capture:
            self._capture(mempool)

    def run(self, rows: list[tuple]) -> torch.Tensor:
        """rows: (cache, token, length with this step's token) each → next-token logits [len(rows), vocab]."""
        n = len(rows)
        for cache, _, total in rows:
            if paged.blocks_for(total) > len(cache.blocks):
                cache.reserve(total)
        (host,) = paged.decode_classes([(i, cache, total) for i, (cache, _, total) in enumerate(rows)],
                                       self.step.pool, torch.device("cpu"), self.flash, width=self.width)
        self._fill(rows, host)
        if self.graph is not None:
            self.graph.replay()
            return self.logits[:n]
        return self._forward()[:n]

    def _fill(self, rows: list[tuple], host: paged.DecodeClass) -> None:
        n = len(rows)
        self.ids[0, :n] = torch.tensor([token for _, token, _ in rows])
        self.ids[0, n:] = 0
        self.positions[0, :n] = torch.tensor([total - 1 for _, _, total in rows])
        self.positions[0, n:] = 0
        self.slots[:n] = torch.cat([cache.slots(total - 1, 1) for cache, _, total in rows])
        self.slots[n:] = 0
        self.lengths[:n] = host.lengths.to(self.lengths.device)
        self.lengths[n:] = 1
        if self.flash:
            self.rows.table[:n] = host.table.to(self.rows.table.device)
            self.rows.table[n:] = paged.SCRATCH_BLOCK
        else:
            self.rows.index[:n] = host.index.to(self.rows.index.device)
            self.rows.index[n:] = 0
            self.rows.mask[:n] = host.mask.to(self.rows.mask.device)
            self.rows.mask[n:] = False
            self.rows.mask[n:, ..., 0] = True
        for cache, _, total in rows:
            cache.length = total

    def _forward(self) -> torch.Tensor:
        out = self.model(input_ids=self.ids, position_ids=self.positions, attention_mask=dict(NO_MASKS),
                         cache=self.step, use_cache=True)
        return out.logits[0]

    def _capture(self, mempool) -> None:
        """Capture the step (CUDA); every bucket's graph shares `mempool` for its activations."""
        device = self.ids.device
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # padding rows only: every write lands in the scratch block
            for _ in range(WARMUP_STEPS):
                self._forward()
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: another engine's thread (a Think model on the same GPU) may call CUDA meanwhile
        with torch.cuda.graph(self.graph, pool=mempool, capture_error_mode="thread_local"):
            self.logits = self._forward()
