"""The decoding step: eager, or replayed from a captured CUDA graph.

At batch 1 a decoding step of AF-Next's 28-layer decoder is some 400 small kernels; launched one by
one from Python they cost about as much as reading the 16.5 GB of weights they need. A CUDA graph
launches them all at once. A graph replays fixed shapes at fixed addresses, so the session cache is
put in static mode for the step (`kvcache.GrowingLayer.start_static`: whole buffers, a device-side
length, the unfilled part masked as the future) and the graph is kept on the cache and captured again
only when its buffers change (grown, or moved by the `CacheKeeper`).

`mode` "eager" is the engine's packed batched step (attention.py); "static" runs a step in which one
request decodes alone over its cache in static mode (any device: the CPU tests check it against
eager); "graphs" captures that step (CUDA only). Batched steps run eagerly in every mode.
NOT YET RUN ON A GPU: the "graphs" mode is written to transformers 5.24's static-cache contract but
no GPU was at hand to capture it; it is opt-in (`Engine(decode="graphs")`) until it has been measured.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers.cache_utils import Cache

from .kvcache import end_static, start_static

MODES = ("eager", "static", "graphs")
WARMUP_STEPS = 2  # runs on a side stream before capture, as torch.cuda.graph requires
Step = Callable[[int], torch.Tensor]  # token → logits for the next one [vocab]


def begin(cache: Cache, mode: str, capacity: int) -> None:
    """Lay `cache` out for one turn's decoding in `mode` ("static" or "graphs"), for at most
    `capacity` tokens by the turn's end."""
    start_static(cache, capacity)


def graphed(model: torch.nn.Module, cache: Cache) -> Step:
    """The decoding step over `cache` (in static mode) as a CUDA graph: the one kept on the cache,
    or a new capture when its buffers changed."""
    key = tuple((layer._k.data_ptr(), layer.capacity) for layer in cache.layers)
    graphed = getattr(cache, "_afnext_graph", None)
    if graphed is None or graphed.key != key:
        graphed = cache._afnext_graph = _GraphedStep(model, cache, key)
    return graphed


def end(cache: Cache) -> None:
    """The turn's decoding is over: the cache goes back to its growing views."""
    end_static(cache)


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
