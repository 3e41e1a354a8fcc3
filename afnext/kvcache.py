"""The KV cache a session keeps: per layer, keys and values in buffers with room to grow.

transformers' `DynamicLayer` appends with `torch.cat`, copying the layer's whole cache on every
decoded token: at 45,000 tokens of context (a 30-minute recording) that is 2.4 GiB copied per token
on AF-Next, the decode step's largest cost after the weights. `GrowingLayer` writes the new keys and
values in place and grows its buffer geometrically, so appending is O(new tokens), and the
attention reads a view of the filled part.

`CacheKeeper` moves idle sessions' caches to CPU memory when the device runs short, and back when
they are needed: sessions are never dropped for want of memory.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref

import torch
from transformers.cache_utils import Cache, DynamicLayer

log = logging.getLogger(__name__)

GROW_FACTOR = 1.5  # capacity multiplier when full: amortized O(1) per token, ≤ 50% spare memory…
GROW_MAX_TOKENS = 8192  # …but never more than this at once (0.45 GiB on AF-Next: a 30-minute cache grows in steps)
MIN_CAPACITY = 256  # tokens; capacities are rounded up to a multiple of this


class GrowingLayer(DynamicLayer):
    """A `DynamicLayer` whose `keys`/`values` are views of larger buffers ([batch, heads, capacity, dim]).

    Static mode (`start_static` … `end_static`, for CUDA-graph decoding) gives every step the same
    shapes and addresses: `keys`/`values` are the whole buffers, positions past the filled part are
    masked as the future, and the length is a device tensor advanced in place, as transformers'
    `StaticLayer` does it.
    """

    is_compileable = False  # True on an instance while it is in static mode

    def __init__(self, owner: SessionCache | None = None) -> None:
        super().__init__()
        self._owner = owner  # whose `reserved` sizes the first buffers

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self._length = 0
        self._k = self._v = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.is_compileable:
            return self._static_update(key_states, value_states)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        end = self._length + n
        if self._k is None or end > self._k.shape[-2]:
            self._grow(end, key_states, value_states)
        self._k.narrow(-2, self._length, n).copy_(key_states)  # narrow: a quarter cheaper than slicing, per
        self._v.narrow(-2, self._length, n).copy_(value_states)  # session and layer of every step
        self._set_length(end)
        return self.keys, self.values

    def get_seq_length(self) -> int | torch.Tensor:
        if self.is_compileable:
            return self.cumulative_length  # a device tensor: positions are computed without a host sync
        return self._length if self.is_initialized else 0

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if self.is_compileable:
            return self.capacity, 0
        return super().get_mask_sizes(query_length)

    def start_static(self, capacity: int) -> None:
        """Enter static mode with room for `capacity` tokens in all (grows the buffers at most once)."""
        assert self.is_initialized and not self.is_compileable
        if capacity > self.capacity:
            self._grow(capacity, self._k, self._v)
        # One length tensor for the layer's life on a device: a captured graph keeps reading its address.
        if getattr(self, "cumulative_length", None) is None or self.cumulative_length.device != self._k.device:
            self.cumulative_length = torch.zeros((), dtype=torch.long, device=self._k.device)
        self.cumulative_length.fill_(self._length)
        self.keys, self.values, self.is_compileable = self._k, self._v, True

    def end_static(self, length: int | None = None) -> None:
        """Back to views of the filled part: `length` tokens, when the caller knows it, else the
        device's count (a host sync)."""
        self.is_compileable = False
        self._set_length(int(self.cumulative_length) if length is None else length)

    @property
    def capacity(self) -> int:
        """Tokens the buffers hold before they must grow."""
        return 0 if not self.is_initialized or self._k is None else self._k.shape[-2]

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative number of tokens to remove")
        if tokens_to_remove and self.is_initialized:
            self._set_length(max(0, self._length + tokens_to_remove))

    def crop_to(self, length: int) -> None:
        """Keep at most the first `length` tokens."""
        if self.is_initialized and self._length > length:
            self._set_length(max(0, length))

    def reset(self) -> None:
        self._k = self._v = None
        self._length = 0
        super().reset()

    def offload(self) -> None:
        """Move the buffers to the CPU (the views follow)."""
        if self.is_initialized and self._k is not None:
            self._k, self._v = self._k.to("cpu", non_blocking=True), self._v.to("cpu", non_blocking=True)
            self._set_length(self._length)

    def prefetch(self) -> None:
        """Bring the buffers back to the device the layer was created on."""
        if self.is_initialized and self._k is not None and self._k.device != self.device:
            self._k, self._v = self._k.to(self.device, non_blocking=True), self._v.to(self.device, non_blocking=True)
            self._set_length(self._length)

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("sessions decode one sequence at a time")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("sessions decode one sequence at a time")

    def _static_update(self, key_states: torch.Tensor, value_states: torch.Tensor):
        n = key_states.shape[-2]
        positions = torch.arange(n, device=self._k.device) + self.cumulative_length
        self.cumulative_length.add_(n)
        self._k.index_copy_(2, positions, key_states)
        self._v.index_copy_(2, positions, value_states)
        return self._k, self._v

    def reserve(self, tokens: int) -> None:
        """Make room for `tokens` in all now, so the turn's prefill and decoding never reallocate."""
        if self.is_initialized and self._k is not None and tokens > self.capacity:
            self._grow(tokens, self._k, self._v)

    def release_spare(self) -> None:
        """Give back room reserved for a reply that came out shorter (a 5-token answer asked with
        max_tokens 100,000), when the spare room outweighs the filled part and a growth step."""
        if self.is_initialized and self._k is not None and not self.is_compileable:
            keep = -(-max(self._length, MIN_CAPACITY) // MIN_CAPACITY) * MIN_CAPACITY
            if self.capacity - self._length > self._length + GROW_MAX_TOKENS:
                self._k, self._v = self._k[..., :keep, :].clone(), self._v[..., :keep, :].clone()
                self._set_length(self._length)

    def _grow(self, need: int, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        old = self.capacity
        reserved = self._owner.reserved if self._owner is not None else 0
        capacity = max(need, reserved, min(int(old * GROW_FACTOR), old + GROW_MAX_TOKENS), MIN_CAPACITY)
        capacity = -(-capacity // MIN_CAPACITY) * MIN_CAPACITY
        # Zeros, not empty: static mode attends over the unfilled part with weight 0, and 0 × NaN-garbage is NaN.
        k = key_states.new_zeros((*key_states.shape[:-2], capacity, key_states.shape[-1]))
        v = value_states.new_zeros((*value_states.shape[:-2], capacity, value_states.shape[-1]))
        if self._k is not None:
            k[..., :self._length, :] = self._k[..., :self._length, :]
            v[..., :self._length, :] = self._v[..., :self._length, :]
        self._k, self._v = k, v

    def _set_length(self, length: int) -> None:
        self._length = length
        self.keys, self.values = self._k[..., :length, :], self._v[..., :length, :]


def start_static(cache: Cache, capacity: int) -> None:
    """Put every layer of a session cache in static mode (see `GrowingLayer`)."""
    for layer in cache.layers:
        layer.start_static(capacity)


def end_static(cache: Cache, length: int | None = None) -> None:
    for layer in cache.layers:
        if layer.is_compileable:
            layer.end_static(length)


class SessionCache(Cache):
    """A session's cache: one `GrowingLayer` per decoder layer, made on first use and sized by
    `reserve`, so a known turn (a 30-minute recording: 45,000 tokens) is one allocation, not a
    series of growths that each briefly hold the old and the new buffers."""

    def __init__(self) -> None:
        self.reserved = 0  # tokens the next buffers must hold
        super().__init__(layer_class_to_replicate=lambda: GrowingLayer(self))

    def reserve(self, tokens: int) -> None:
        self.reserved = tokens
        for layer in self.layers:
            layer.reserve(tokens)

    def release_spare(self) -> None:
        """The turn is over: room reserved beyond what it used goes back (see GrowingLayer)."""
        self.reserved = 0
        for layer in self.layers:
            layer.release_spare()

    def crop_to(self, length: int) -> None:
        """Keep at most the first `length` tokens in every layer. A rollback's way, rather than
        transformers' `crop` (a count to remove, taken from layer 0's length): a forward pass that
        failed part-way through the layers left the first ones a token longer than the rest."""
        for layer in self.layers:
            layer.crop_to(length)

    # ---- memory: the keeper's side (the same surface as paged.PagedCache) ----

    @property
    def away(self) -> bool:
        """Some layer's buffers are in CPU memory, not on the device they were made on (moved out by
        the keeper, or a fork of a cache that was)."""
        return any(layer.is_initialized and layer._k is not None and layer._k.device != layer.device for layer in self.layers)

    @property
    def nbytes(self) -> int:
        """Bytes the buffers take, spare room included."""
        return sum(2 * layer._k.numel() * layer._k.element_size() for layer in self.layers if layer.is_initialized and layer._k is not None)

    def offload(self) -> None:
        for layer in self.layers:
            layer.offload()

    def prefetch(self) -> None:
        for layer in self.layers:
            layer.prefetch()

    def copy(self, length: int) -> SessionCache:
        return copy_cache(self, length)

    def bytes_to_hold(self, tokens: int, bytes_per_token: int) -> int:
        """Bytes this cache grows by to hold `tokens` in all (the keeper adds its own size when it
        comes back from CPU memory)."""
        return max(0, tokens - self.get_seq_length()) * bytes_per_token


def new_cache() -> SessionCache:
    """An empty session cache."""
    return SessionCache()


def copy_cache(cache: SessionCache, length: int) -> SessionCache:
    """A new session cache holding the first `length` tokens of `cache` (on the same device, or in
    CPU memory if `cache` is offloaded there: its next turn brings it back). `cache` is not changed."""
    twin = SessionCache()
    if any(layer.is_initialized and layer.device.type == "cuda" for layer in cache.layers):
        torch.cuda.synchronize()  # a move to CPU memory is asynchronous: let it land before reading it
    for layer in cache.layers:
        copy = GrowingLayer(twin)
        if layer.is_initialized and layer._k is not None:
            n = min(length, layer._length)
            keys, values = layer._k[..., :n, :], layer._v[..., :n, :]
            copy.lazy_initialization(keys, values)
            copy.update(keys, values)  # into buffers of its own
            copy.device = layer.device  # where prefetch brings it back to
        twin.layers.append(copy)
    return twin


def kv_bytes_per_token(config, dtype: torch.dtype) -> int:
    """Bytes one token adds to the KV cache (AF-Next in bf16: 56 KiB)."""
    text = config.get_text_config(decoder=True)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim * torch.empty(0, dtype=dtype).element_size()


def cache_bytes(cache) -> int:
    """Bytes a session cache takes, wherever it is (spare room included)."""
    return cache.nbytes


class CacheKeeper:
    """Keeps the sessions' caches on the device while they fit. Under memory pressure it moves the
    least recently used idle ones to CPU memory, and brings each back when its session speaks again:
    a conversation is never silently dropped. Used by the engine's worker thread, but for `track`.

    Pressure: with a paged `pool`, fewer free blocks than the coming turn needs; over `budget_bytes`
    of resident caches when a budget is set; with neither a pool nor a budget, on CUDA, less than
    `reserve_bytes` of free device memory left after the coming turn; otherwise never.
    """

    def __init__(self, device: torch.device, *, budget_bytes: int | None = None, reserve_bytes: int = 2 << 30,
                 pool=None) -> None:
        self.device, self.budget_bytes, self.reserve_bytes, self.pool = device, budget_bytes, reserve_bytes, pool
        self._last_use: weakref.WeakKeyDictionary[Cache, float] = weakref.WeakKeyDictionary()
        self._offloaded: weakref.WeakSet[Cache] = weakref.WeakSet()
        self.lock = threading.Lock()  # held while caches move; `Session.fork` copies under it
        self._books = threading.Lock()  # `_last_use`: forks are tracked from the callers' threads

    def claim(self, cache, need_bytes: int = 0, busy: set[int] = frozenset(), force: bool = False) -> bool:
        """`cache`'s session is about to run a turn for which the device needs `need_bytes` more
        (`cache.bytes_to_hold`; a paged cache's includes coming back): make room by moving idle caches out (never
        one whose `id` is in `busy`: those are in the running batch), then bring the cache back. False
        if the room could not be made (the cache stays where it is), unless `force`: then it is
        brought back all the same (nothing else runs; a pool too small for it raises PoolFull)."""
        with self._books:
            self._last_use[cache] = time.monotonic()
        away = cache in self._offloaded or cache.away  # moved out by us, or a fork of a cache that was
        if away and self.pool is None:  # buffers moved out (on CPU, to where they were) count on coming back
            need_bytes += cache.nbytes
        while self._pressure(need_bytes):
            idle = [(t, id(c), c) for c, t in self._used()
                    if c is not cache and c not in self._offloaded and id(c) not in busy]
            if not idle:
                log.debug("KV memory is short and no idle cache is left to move out")
                if not force:
                    return False
                break
            victim = min(idle)[2]
            with self.lock:
                victim.offload()
            self._offloaded.add(victim)
            log.info("memory pressure: moved an idle KV cache of %.1f MiB to CPU memory", victim.nbytes / 2**20)
        if away:
            with self.lock:
                cache.prefetch()
            self._offloaded.discard(cache)
            log.info("KV cache of %.1f MiB brought back to %s", cache.nbytes / 2**20, self.device)
        return True

    def track(self, cache) -> None:
        """Count `cache` among the ones that may be moved out (a fork that has not spoken yet; any thread)."""
        with self._books:
            self._last_use.setdefault(cache, time.monotonic())

    def offloaded(self, cache) -> bool:
        return cache in self._offloaded

    def resident_bytes(self) -> int:
        return sum(c.nbytes for c, _ in self._used() if c not in self._offloaded and not c.away)

    def _used(self) -> list[tuple[Cache, float]]:
        """(cache, last use) of every cache tracked, copied out under the lock `track` takes."""
        with self._books:
            return list(self._last_use.items())

    def _pressure(self, extra_bytes: int) -> bool:
        # A pool: fewer free blocks than the turn needs (`bytes_to_hold` counts whole blocks), or over
        # the budget when one is set too.
        if self.pool is not None and self.pool.free_blocks * self.pool.block_bytes < extra_bytes:
            return True
        if self.budget_bytes is not None:
            return self.resident_bytes() + extra_bytes > self.budget_bytes
        if self.device.type == "cuda" and self.pool is None:
            # The driver's free memory, plus what torch's caching allocator holds unused: a cache moved
            # out frees its memory there, not to the driver.
            free, _ = torch.cuda.mem_get_info(self.device)
            free += torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
            return free - extra_bytes < self.reserve_bytes
        return False
