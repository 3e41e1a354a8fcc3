"""A paged KV pool: every session's keys and values in blocks of one preallocated tensor per layer.

Why (the GPU's reason). With a buffer per session (kvcache.py), a step makes one attention call and
one cache write per session and layer: 896 Python-launched calls a step for 32 conversations on
AF-Next's 28 layers, which an H200 finishes faster than the host issues them (bench/host.py). With
one pool per layer and a block table per session, a step writes all of its new keys with one
`index_copy_` per layer and the decoding tokens attend in one call per layer: flash-attn's
`flash_attn_with_kvcache` reads each sequence's blocks where they lie (no gather), and the pool's
fixed address is what lets a decoding step be captured as a CUDA graph per batch size (decode.py).
Without flash-attn (CPU, or a GPU without it) short decoding rows are gathered per length class
(lengths within 2× of each other, so padding at most doubles the work) and attend in one sdpa call
per class. The pool lends each session its blocks in runs of consecutive ones where it can, so a
long row, and a prefill chunk's past, are read in place as one view of the pool, with no copy.

On CPU this pool is the default (`engine.default_kv`): 8 voice conversations decode together faster
than with buffers (one write and one attention call per layer instead of 8), and long recordings'
follow-ups as fast (read in place). On a GPU the buffers stay the default until the pool has run on
one; `Engine(kv=…)` (`--kv`) chooses either.

A session's cache (`PagedCache`) holds its block numbers and its length. Blocks are taken when a
turn is admitted (its prompt and reply budget, as the buffers reserve) and the spare ones go back
when it ends; a session dropped by its owner gives its blocks back when it is collected. Under
pressure the `CacheKeeper` moves an idle session's blocks to CPU memory (`offload`) and frees them;
`prefetch` takes new blocks and copies them back.
"""

from __future__ import annotations

import collections
import functools
import threading
import weakref
from dataclasses import dataclass

import numpy as np
import torch

BLOCK_TOKENS = 256  # tokens per block: flash-attn's paged kernel needs a multiple of 256
SCRATCH_BLOCK = 0  # never lent: padding rows of a fixed-shape step write and read here
# Without flash-attn, a decoding row this long attends in a call of its own, through a view of the
# pool where its keys lie in consecutive blocks, instead of being gathered with the rows of its length
# class: the gather copies every key of its rows each step and layer. Timed inside the engine (8
# conversations on `mid`, the ways taking turns step by step: bench/decode_rows.py, three runs, one in
# bench/results/cpu-decode-rows.json), 8 rows of 300-850 tokens stepped up to 6% faster gathered in
# five figures of six (2% slower in the sixth), and rows of 1,200-1,700 tokens 3-10% faster as views
# in four of six (up to 2% slower in the other two). One layer's attention timed alone (bench/views.py) had put
# the turn at 2,048: there the keys stay in the caches, which the engine's weights flush every step.
# Shorter rows stay batched: fewer calls are what the pool is for.
VIEW_MIN_TOKENS = 1024


class PoolFull(RuntimeError):
    """The pool has too few free blocks for what was asked."""


class BlockPool:
    """Keys and values of every session, per layer in one tensor, lent out a block of BLOCK_TOKENS
    slots at a time. Two layouts of the same slots:
    - `flash_layout`: [blocks, BLOCK_TOKENS, kv_heads, head_dim], flash-attn's paged layout, which
      its kernel reads through block tables;
    - otherwise [kv_heads, blocks × BLOCK_TOKENS, head_dim]: each key head's slots in a row, so a
      run of consecutive blocks is, per head, one contiguous stretch, as a per-session buffer is.
      sdpa reads the flash layout's runs too, but with a head's keys interleaved with the others'
      it took 1.1-1.6× as long on CPU (bench/results/cpu-kv-views.json).
    Whatever the layout, the methods below take and give keys and values head first, [kv_heads,
    tokens, head_dim], and only flash-attn's call (attention.py) reads `keys`/`values` directly."""

    def __init__(self, config, tokens: int, device: torch.device, dtype: torch.dtype, flash_layout: bool = False) -> None:
        text = config.get_text_config(decoder=True)
        self.kv_heads = text.num_key_value_heads
        self.head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        self.blocks = blocks_for(tokens) + 1  # and the scratch block
        self.flash_layout = flash_layout
        shape = ((self.blocks, BLOCK_TOKENS, self.kv_heads, self.head_dim) if flash_layout
                 else (self.kv_heads, self.blocks * BLOCK_TOKENS, self.head_dim))
        # Empty, so in CPU memory a page is taken only when a token is first written there. Attention
        # reads a lent block only below its session's length (written), and padding only from the
        # scratch block, zeroed here and written only with padding rows' finite keys: masked keys are
        # multiplied by 0, and 0 × NaN-garbage is NaN.
        self.keys = [torch.empty(shape, device=device, dtype=dtype) for _ in range(text.num_hidden_layers)]
        self.values = [torch.empty(shape, device=device, dtype=dtype) for _ in range(text.num_hidden_layers)]
        for layer in range(len(self.keys)):
            for t in self.heads(layer):
                t.narrow(1, SCRATCH_BLOCK * BLOCK_TOKENS, BLOCK_TOKENS).zero_()
        self.device, self.dtype = torch.device(device), dtype
        self.block_bytes = 2 * len(self.keys) * BLOCK_TOKENS * self.kv_heads * self.head_dim * self.keys[0].element_size()
        # Which blocks are free, and how many. Blocks are lent in runs (`take`): a session whose tokens
        # lie in consecutive blocks is read as one view of the pool, with no gather (`PagedCache.span`).
        self._is_free = np.ones(self.blocks, dtype=bool)
        self._is_free[SCRATCH_BLOCK] = False
        self._free_count = self.blocks - 1
        self._lock = threading.Lock()  # sessions are forked on other threads
        # Blocks of collected sessions: their finalizer may run inside any allocation, `take` holding
        # the lock included, so it only appends here (atomic) and the next use of the pool takes them in.
        self._returned: collections.deque[list[int]] = collections.deque()
        self._space: tuple[torch.Tensor, torch.Tensor] | None = None  # gathers' keys and values (`gather`)

    @property
    def free_blocks(self) -> int:
        with self._lock:
            self._take_returned()
            return self._free_count

    @property
    def capacity_tokens(self) -> int:
        """Tokens the pool holds in all (the scratch block aside)."""
        return (self.blocks - 1) * BLOCK_TOKENS

    def take(self, n: int, after: int | None = None) -> list[int]:
        """`n` free blocks, or PoolFull (nothing taken). As few runs of consecutive blocks as the free
        ones allow: first those right after block `after` (a growing session's last: it stays one run),
        then the smallest free run that holds the rest (large runs are kept for large sessions), else
        the largest runs until it is held."""
        with self._lock:
            self._take_returned()
            if n > self._free_count:
                raise PoolFull(f"the KV pool has {self._free_count} free blocks of {BLOCK_TOKENS} tokens, {n} are needed")
            taken: list[int] = []
            if after is not None:
                b = after + 1
                while len(taken) < n and b < self.blocks and self._is_free[b]:
                    taken.append(b)
                    b += 1
            self._is_free[taken] = False
            if len(taken) < n:
                taken += self._runs(n - len(taken))
                self._is_free[taken] = False
            self._free_count -= n
        return taken

    def _runs(self, n: int) -> list[int]:
        """`n` free blocks in as few runs as possible (lock held; marked taken by the caller)."""
        edges = np.diff(self._is_free.astype(np.int8), prepend=0, append=0)
        starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
        sizes = ends - starts
        fits = np.flatnonzero(sizes >= n)
        if fits.size:  # the smallest run that holds them all; among equals the first
            start = int(starts[fits[np.argmin(sizes[fits])]])
            return list(range(start, start + n))
        taken: list[int] = []
        for i in np.argsort(-sizes, kind="stable"):  # the largest runs first
            start = int(starts[i])
            taken += range(start, start + min(int(sizes[i]), n - len(taken)))
            if len(taken) == n:
                break
        return taken

    def give(self, blocks: list[int]) -> None:
        with self._lock:
            self._take_returned()
            self._release(blocks)

    def give_later(self, blocks: list[int]) -> None:
        """Blocks of a collected session: lock-free, taken in at the pool's next use."""
        self._returned.append(blocks)

    def _take_returned(self) -> None:
        while self._returned:
            self._release(self._returned.popleft())

    def _release(self, blocks: list[int]) -> None:
        if not blocks:
            return
        if SCRATCH_BLOCK in blocks or len(set(blocks)) != len(blocks) or self._is_free[blocks].any():
            raise RuntimeError(f"blocks given back that were not lent: {sorted(blocks)}")
        self._is_free[blocks] = True
        self._free_count += len(blocks)

    # ---- keys and values, head first: [kv_heads, tokens, head_dim] ----

    def heads(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `layer`'s keys and values as [kv_heads, slots, head_dim] views (slot = block ×
        BLOCK_TOKENS + offset): the tensors themselves, or a transposed view of the flash layout."""
        if self.flash_layout:
            return tuple(t[layer].view(-1, self.kv_heads, self.head_dim).transpose(0, 1) for t in (self.keys, self.values))
        return self.keys[layer], self.values[layer]

    def span(self, layer: int, first: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Slots `first` … `first + n - 1` of a layer, as views: [kv_heads, n, head_dim] each."""
        return tuple(t.narrow(1, first, n) for t in self.heads(layer))

    def read(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A layer's keys and values at `slots` [n], copied into new tensors [kv_heads, n, head_dim]."""
        return tuple(t.index_select(1, slots) for t in self.heads(layer))

    def write(self, layer: int, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Keys and values [kv_heads, n, head_dim] into a layer's `slots` [n]."""
        for t, new in zip(self.heads(layer), (keys, values)):
            t.index_copy_(1, slots, new)

    def gather(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A layer's keys and values at `slots` [n], copied out for attention: [kv_heads, n, head_dim]."""
        return self._gathered(layer, 1, slots, (self.kv_heads, -1, self.head_dim))

    def gather_rows(self, layer: int, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoding rows' keys and values, copied out for attention: [rows, kv_heads, width, head_dim]
        each, contiguous. `index` [rows, kv_heads, width]: rows of the layer's keys seen as one
        [kv_heads × slots, head_dim] table (`head_rows`), so one copy lays every row's heads out as the
        attention reads them. Copied head first ([kv_heads, rows × width, head_dim], then transposed),
        as before, a step of 8 rows of 1,200-1,700 tokens took 13-44% longer on CPU, and of 300-850
        tokens up to 27% (bench/decode_rows.py, bench/results/cpu-decode-rows.json). The non-flash
        layout only."""
        assert not self.flash_layout, "flash-attn's layout is read through block tables, not gathered"
        return self._gathered(layer, 0, index.view(-1), (*index.shape, self.head_dim))

    def head_rows(self, slots: torch.Tensor) -> torch.Tensor:
        """Slots [..., n] → [..., kv_heads, n]: each key head's row of a slot in a layer's keys seen as
        one [kv_heads × slots, head_dim] table (what `gather_rows` reads)."""
        heads = torch.arange(self.kv_heads, device=slots.device)[:, None] * self.keys[0].shape[1]
        return slots.unsqueeze(-2) + heads

    def _gathered(self, layer: int, dim: int, index: torch.Tensor, shape: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        """index_select of a layer's keys and values along `dim` (1: slots of [kv_heads, slots, head_dim];
        0: rows of [kv_heads × slots, head_dim]), viewed as `shape`. In CPU memory into a space kept
        for it, valid until the next gather (only the engine's worker gathers, one class at a time): a
        fresh tensor per call and layer made glibc hand the pages back and fault them in again, some
        2 µs a page, which made a gather of 4,096 keys 20× slower than its copy (bench/views.py). A
        GPU's caching allocator keeps its memory, and a captured graph needs its temporaries in its
        own pool: there each gather is a new tensor."""
        tables = [t if dim == 1 else t.view(-1, self.head_dim) for t in self.heads(layer)]
        if self.device.type != "cpu":
            return tuple(t.index_select(dim, index).view(shape) for t in tables)
        size = index.numel() * self.head_dim * (self.kv_heads if dim == 1 else 1)  # elements per tensor
        if self._space is None or self._space[0].numel() < size:
            with torch.inference_mode(False):  # a normal tensor: writable in and out of inference mode
                self._space = tuple(self.keys[0].new_empty(1 << (size - 1).bit_length()) for _ in range(2))
        out = []
        for t, space in zip(tables, self._space):
            into = space[:size].view(-1, self.head_dim) if dim == 0 else space[:size].view(self.kv_heads, -1, self.head_dim)
            torch.index_select(t, dim, index, out=into)
            out.append(into.view(shape))
        return tuple(out)


def blocks_for(tokens: int) -> int:
    return -(-tokens // BLOCK_TOKENS)


def _give_back(pool: BlockPool, blocks: list[int]) -> None:
    """A collected session's finalizer (see BlockPool._returned)."""
    if blocks:
        pool.give_later(list(blocks))


class PagedCache:
    """A session's KV cache in a `BlockPool`: its blocks, in order, and how many tokens they hold.
    The same surface as kvcache.SessionCache, so sessions, the engine and the keeper take either."""

    def __init__(self, pool: BlockPool) -> None:
        self.pool = pool
        self.blocks: list[int] = []  # changed in place only: the finalizer below holds this list
        self.length = 0
        self.reserved = 0
        self._away: tuple[torch.Tensor, torch.Tensor] | None = None  # in CPU memory: [layers, tokens, kv_heads, head_dim] each
        self._map: torch.Tensor | None = None  # the pool slot of each token its blocks hold; None when blocks changed
        self._run = 0  # how many of its first blocks are consecutive (made with `_map`)
        weakref.finalize(self, _give_back, pool, self.blocks)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def reserve(self, tokens: int) -> None:
        """Hold blocks for `tokens` in all (PoolFull if the pool has too few free: then nothing changes)."""
        need = blocks_for(tokens) - len(self.blocks)
        if need > 0:
            assert self._away is None, "a cache must be brought back before it grows"
            self.blocks.extend(self.pool.take(need, after=self.blocks[-1] if self.blocks else None))
            self._map = None
        self.reserved = tokens

    def release_spare(self) -> None:
        """Blocks past the filled ones go back to the pool."""
        self.reserved = 0
        keep = blocks_for(self.length)
        if len(self.blocks) > keep:
            self.pool.give(self.blocks[keep:])
            del self.blocks[keep:]
            self._map = None

    def crop_to(self, length: int) -> None:
        """Keep at most the first `length` tokens; between turns (nothing reserved) the blocks past
        them go back."""
        self.length = max(0, min(self.length, length))
        if self._away is not None:
            self._away = tuple(t[:, :self.length] for t in self._away)
        elif not self.reserved:
            self.release_spare()

    def slots(self, start: int, n: int) -> torch.Tensor:
        """Flat pool slots of this session's tokens `start` … `start + n - 1` [n] (CPU, long; a view of
        the session's slot map, made again only when its blocks change: a step asks for every
        decoding row's, and the gather for all of a row's tokens)."""
        self._layout()
        assert start + n <= self._map.numel(), "slots asked past the session's blocks"
        return self._map[start:start + n]

    def span(self, total: int) -> int | None:
        """The pool slot of token 0 when tokens 0 … `total` - 1 lie in consecutive blocks, else None:
        attention then reads them as one view of the pool, copying nothing. The pool lends a session
        its blocks in runs (`BlockPool.take`), so this is the rule, and a gather the exception."""
        self._layout()
        return self.blocks[0] * BLOCK_TOKENS if 0 < blocks_for(total) <= self._run else None

    def _layout(self) -> None:
        """Make the slot map and the run length again if the blocks changed."""
        if self._map is None:
            blocks = list(self.blocks)
            run = min(1, len(blocks))
            while run < len(blocks) and blocks[run] == blocks[run - 1] + 1:
                run += 1
            # the run first: another thread (a fork's copy) reads both once `_map` is set
            self._run, self._map = run, _slot_map(blocks)

    # ---- memory: the keeper's side ----

    def bytes_to_hold(self, tokens: int, bytes_per_token: int = 0) -> int:
        """Bytes of free blocks this cache needs to hold `tokens` in all (all of them when it is out)."""
        return max(0, blocks_for(tokens) - len(self.blocks)) * self.pool.block_bytes

    @property
    def away(self) -> bool:
        """Moved to CPU memory (its blocks are free for others)."""
        return self._away is not None

    @property
    def nbytes(self) -> int:
        if self._away is not None:
            return 2 * self._away[0].numel() * self._away[0].element_size()
        return len(self.blocks) * self.pool.block_bytes

    def offload(self) -> None:
        """Copy the filled part to CPU memory and give every block back."""
        if self._away is not None or not self.blocks:
            return
        self._away = self._stacked()
        self.pool.give(self.blocks)
        self.blocks.clear()
        self._map = None

    def prefetch(self) -> None:
        """Take blocks again and copy the cache back into them (PoolFull if there are too few; then
        nothing has changed)."""
        if self._away is None:
            return
        blocks = self.pool.take(blocks_for(self.length))
        try:
            self._write(_slot_map(blocks), *(t[:, :self.length] for t in self._away))
        except BaseException:
            self.pool.give(blocks)
            raise
        self.blocks.extend(blocks)
        self._map, self._away = None, None

    def copy(self, length: int) -> PagedCache:
        """A new cache holding this one's first `length` tokens: in new blocks, copied layer by layer on
        the device, or in CPU memory if this one is there or the pool is full (its next turn brings it
        back, making room as for any turn). This one is not changed."""
        twin, n = PagedCache(self.pool), min(length, self.length)
        twin.length = n
        if self._away is None:
            try:
                twin.reserve(n)
            except PoolFull:
                pass
            else:
                twin.reserved = 0  # it holds what it needs; a turn reserves its own room
                source, target = (self.slots(0, n).to(self.pool.device), twin.slots(0, n).to(self.pool.device))
                for layer in range(len(self.pool.keys)):
                    self.pool.write(layer, target, *self.pool.read(layer, source))
                return twin
        kept = self._away if self._away is not None else self._stacked()
        twin._away = tuple(t[:, :n].clone() for t in kept)
        return twin

    def _stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every layer's filled keys and values, [layers, length, kv_heads, head_dim] each, in CPU
        memory, copied a layer at a time (a temporary of one layer's share on the device, not all)."""
        n, pool = self.length, self.pool
        slots = self.slots(0, n).to(pool.device)
        out = tuple(torch.empty((len(pool.keys), n, pool.kv_heads, pool.head_dim), dtype=pool.dtype) for _ in range(2))
        for layer in range(len(pool.keys)):
            for t, dest in zip(pool.read(layer, slots), out):
                dest[layer].copy_(t.transpose(0, 1))  # to pageable CPU memory: synchronous
        return out

    def _write(self, slot_map: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Keys and values [layers, n, kv_heads, head_dim] into the first n slots of `slot_map`."""
        slots = slot_map[:keys.shape[1]].to(self.pool.device)
        for layer in range(len(self.pool.keys)):
            self.pool.write(layer, slots, *(t[layer].to(self.pool.device, self.pool.dtype).transpose(0, 1) for t in (keys, values)))


def _slot_map(blocks: list[int]) -> torch.Tensor:
    """The pool slot of every token the blocks hold, in order [len(blocks) × BLOCK_TOKENS] (CPU, long)."""
    return (torch.tensor(blocks, dtype=torch.long)[:, None] * BLOCK_TOKENS + torch.arange(BLOCK_TOKENS)).view(-1)


@dataclass
class DecodeClass:
    """Decoding rows of a step that attend together: their places in the step's packed sequence and
    lengths (this step's token included), and where their keys lie: block tables for flash-attn, or
    the flat slots the gather reads, padded to the class's longest row and masked past each row's end."""

    rows: torch.Tensor  # [b] long
    lengths: torch.Tensor  # [b] int32
    table: torch.Tensor | None  # [b, blocks] int32, padded with the scratch block (flash-attn)
    index: torch.Tensor | None  # [b, kv_heads, width] long: each key head's pool row (BlockPool.head_rows) to gather
    mask: torch.Tensor | None  # [b, 1, 1, width] bool (the gather)
    first: int  # rows are first … first + b - 1 of the packed sequence, when `contiguous`
    contiguous: bool
    span: tuple[int, int] | None = None  # one row read as a view: its first pool slot and its length


@dataclass
class PrefillChunk:
    """A chunk of one session's prompt in a step: causal within itself, after the session's past."""

    start: int  # its first token's place in the step's packed sequence
    length: int  # its tokens
    total: int  # the session's tokens once the chunk is in
    table: torch.Tensor | None  # [1, blocks] int32 the session's blocks (flash-attn)
    index: torch.Tensor | None  # [total] long pool slots of all its tokens (the gather)
    span: int | None = None  # or, when they lie in consecutive blocks, the first one's slot (a view)


class PagedStep:
    """The `cache` a step over paged sessions passes to the model. `update` writes the whole step's
    new keys and values with one `index_copy_` per layer and hands the attention a `PagedKV` naming
    the layer; attention.py then attends per `DecodeClass` and `PrefillChunk`."""

    def __init__(self, pool: BlockPool, slots: torch.Tensor, classes: list[DecodeClass],
                 prefills: list[PrefillChunk], flash: bool) -> None:
        self.pool, self.slots, self.classes, self.prefills, self.flash = pool, slots, classes, prefills, flash

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args, **kwargs):
        """keys/values: [1, kv_heads, T, head_dim], the step's tokens in order."""
        self.pool.write(layer_idx, self.slots, keys[0], values[0])
        marker = PagedKV(self, layer_idx)
        return marker, marker


@dataclass(frozen=True)
class PagedKV:
    """What a paged step's `update` returns in place of keys and values: where to find them."""

    step: PagedStep
    layer: int


def plan_step(pool: BlockPool, segments: list, flash: bool) -> PagedStep:
    """A `PagedStep` for packed `segments` (attention.Segment over `PagedCache`s), in order. A segment
    of one token attends with the decoding rows; longer ones are prefill chunks. Each session must
    hold blocks for its new tokens (reserved at admission; taken here if not)."""
    assert flash == pool.flash_layout, "flash-attn reads the pool only in its own layout"
    slots, rows, prefills, start = [], [], [], 0
    for seg in segments:
        cache, total = seg.cache, seg.past + seg.length
        if blocks_for(total) > len(cache.blocks):
            cache.reserve(total)
        slots.append(cache.slots(seg.past, seg.length))
        if seg.length == 1:
            rows.append((start, cache, total))
        elif flash:
            table = torch.tensor([cache.blocks[:blocks_for(total)]], dtype=torch.int32, device=pool.device)
            prefills.append(PrefillChunk(start, seg.length, total, table, None))
        elif (first := cache.span(total)) is not None:
            prefills.append(PrefillChunk(start, seg.length, total, None, None, first))
        else:
            prefills.append(PrefillChunk(start, seg.length, total, None, cache.slots(0, total).to(pool.device)))
        start += seg.length
        cache.length = total
    slots = torch.cat(slots).to(pool.device)
    return PagedStep(pool, slots, decode_classes(rows, pool, pool.device, flash), prefills, flash)


def decode_classes(rows: list[tuple[int, PagedCache, int]], pool: BlockPool, device: torch.device, flash: bool,
                   width: int | None = None) -> list[DecodeClass]:
    """Decoding rows (packed index, cache, length with this step's token) grouped to attend together.
    flash-attn reads each row's blocks where they lie: one class. The gather copies each class's
    longest row's length of keys per row, so rows are grouped by lengths within 2× of each other: a
    500-token voice chat is never padded to a 45,000-token recording's length. A row of
    VIEW_MIN_TOKENS or more is a class of its own, and a row alone in its class whose keys lie in
    consecutive blocks is read in place, not gathered. A given `width` (a fixed-shape step's) pads
    every row to it: one class."""
    classes: list[DecodeClass] = []
    if flash or width:  # flash-attn reads no padding; a fixed width pads every row alike
        groups = [rows] if rows else []
    else:
        by_size: dict[int, list] = {}
        for row in rows:  # a long row in consecutive blocks alone; the others with their length class
            alone = row[2] >= VIEW_MIN_TOKENS and row[1].span(row[2]) is not None
            by_size.setdefault(-1 - row[0] if alone else (row[2] - 1).bit_length(), []).append(row)
        groups = []
        for group in by_size.values():
            i, cache, total = group[0]
            first = cache.span(total) if len(group) == 1 else None
            if first is None:
                groups.append(group)
            else:  # a row alone in consecutive blocks: read in place (a gather would only add its copy)
                classes.append(DecodeClass(torch.tensor([i], device=device), torch.tensor([total], dtype=torch.int32, device=device),
                                           None, None, None, i, True, (first, total)))
    for group in groups:
        index = [i for i, _, _ in group]
        lengths = torch.tensor([total for _, _, total in group], dtype=torch.int32)
        table = gather = mask = None
        if flash:
            w = width or max(blocks_for(total) for _, _, total in group)
            table = torch.tensor([cache.blocks[:blocks_for(total)] + [SCRATCH_BLOCK] * (w - blocks_for(total))
                                  for _, cache, total in group], dtype=torch.int32, device=device)
        else:
            w = width or int(lengths.max())
            positions = torch.arange(w)
            inside = positions < lengths[:, None]  # [b, w]: each row's own keys; the rest is padding, masked
            firsts = [cache.span(total) for _, cache, total in group]
            if None in firsts:  # a row in blocks lent apart: its slots one by one
                slots = torch.stack([_padded_slots(cache, total, w) for _, cache, total in group])
            else:  # the rule (blocks lent in runs): a row's slots are its first one + position, in one op for all
                slots = torch.where(inside, torch.tensor(firsts)[:, None] + positions, _scratch_slots(positions))
            gather = pool.head_rows(slots).to(device)
            mask = inside[:, None, None].to(device)
        classes.append(DecodeClass(torch.tensor(index, device=device), lengths.to(device), table, gather, mask,
                                   index[0], index == list(range(index[0], index[0] + len(index)))))
    return classes


def _padded_slots(cache: PagedCache, total: int, width: int) -> torch.Tensor:
    """The pool slots of a session's first `total` tokens, then the scratch block's up to `width` [width]."""
    slots = cache.slots(0, total)
    if width > total:
        slots = torch.cat([slots, _scratch_slots(torch.arange(width - total))])
    return slots


def _scratch_slots(positions: torch.Tensor) -> torch.Tensor:
    """Slots of the scratch block for padding positions: finite keys, never a session's."""
    return positions % BLOCK_TOKENS + SCRATCH_BLOCK * BLOCK_TOKENS


@functools.cache
def flash_kernel():
    """flash-attn's `flash_attn_with_kvcache`, or None when flash-attn is not installed (looked up
    once: attention asks for it in every layer of every step)."""
    try:
        from flash_attn import flash_attn_with_kvcache
    except ImportError:
        return None
    return flash_attn_with_kvcache
