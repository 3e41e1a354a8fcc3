"""The session's growing KV cache behaves exactly like transformers' DynamicCache, without copying
the whole cache on every token."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from afnext.kvcache import MIN_CAPACITY, GrowingLayer, new_cache


def _kv(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 2, n, 8, generator=g), torch.randn(1, 2, n, 8, generator=g)


def test_growing_layer_equals_dynamic_layer_through_appends_and_crops():
    ours, stock = new_cache(), DynamicCache()
    steps = [300, 1, 1, -5, 40, 1, -100, 700, 1]  # prefill, decode, a rollback, a new turn, …
    for i, n in enumerate(steps):
        if n < 0:
            ours.crop(n)
            stock.crop(n)
        else:
            k, v = _kv(n, i)
            for layer in (0, 1):
                got, want = ours.update(k, v, layer), stock.update(k, v, layer)
                assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        assert ours.get_seq_length() == stock.get_seq_length()
    layer = ours.layers[0]
    assert isinstance(layer, GrowingLayer) and layer.capacity % MIN_CAPACITY == 0
    assert layer.get_seq_length() <= layer.capacity <= 1.5 * 1500


def test_a_reserved_turn_is_one_allocation_and_growth_is_bounded():
    from afnext.kvcache import GROW_MAX_TOKENS

    cache = new_cache()
    cache.reserve(1000)
    cache.update(*_kv(700, 0), 0)
    layer = cache.layers[0]
    buffer = layer._k
    for i in range(324):
        cache.update(*_kv(1, i), 0)
    assert layer._k is buffer and layer.capacity == 1024  # 1000 rounded up to 256s: filled, never reallocated
    cache.update(*_kv(1, 0), 0)
    assert layer.capacity == 1536  # full: 1.5×
    big = new_cache()
    big.update(*_kv(40_000, 0), 0)  # 40,192 after rounding
    big.update(*_kv(193, 0), 0)  # one past full
    assert big.layers[0].capacity == 40_192 + GROW_MAX_TOKENS  # a large cache grows by a bounded step


def test_appending_a_token_writes_in_place():
    cache = new_cache()
    cache.update(*_kv(10, 0), 0)
    buffer = cache.layers[0]._k
    keys, _ = cache.update(*_kv(1, 1), 0)
    assert cache.layers[0]._k is buffer and keys.data_ptr() == buffer.data_ptr()


def test_offload_and_prefetch_keep_the_contents():
    cache = new_cache()
    k, v = _kv(20, 0)
    cache.update(k, v, 0)
    layer = cache.layers[0]
    layer.offload()
    layer.prefetch()
    assert torch.equal(layer.keys, k) and torch.equal(layer.values, v)


def test_a_model_decodes_the_same_with_either_cache(loaded):
    model, ids = loaded.model, torch.tensor([[5, 9, 77, 3, 41, 8]])
    logits = []
    for cache in (new_cache(), DynamicCache()):
        with torch.inference_mode():
            out = [model(input_ids=ids, cache=cache, use_cache=True).logits[0, -1]]
            for token in (12, 99, 7):
                out.append(model(input_ids=torch.tensor([[token]]), cache=cache, use_cache=True).logits[0, -1])
        logits.append(torch.stack(out))
    assert torch.allclose(logits[0], logits[1], atol=1e-5)


def test_idle_caches_move_out_under_pressure_and_come_back_intact(loaded):
    from afnext.engine import Engine
    from afnext.sampling import GenerationOptions
    from afnext.kvcache import cache_bytes
    from afnext.session import Session
    from tests.conftest import noise

    engine = Engine(loaded, kv="buffers")  # the paged pool's own test: tests/test_paged.py
    try:
        short = GenerationOptions(max_new_tokens=6)
        a, b, reference = Session(engine), Session(engine), Session(engine, use_cache=False)
        for session in (a, reference):
            list(session.ask("What is this?", noise(4.0, seed=1), options=short))
        engine.keeper.budget_bytes = int(1.5 * cache_bytes(a._cache))  # room for one conversation only
        list(b.ask("And this?", noise(4.0, seed=2), options=short))
        assert engine.keeper.offloaded(a._cache) and not engine.keeper.offloaded(b._cache)

        replies = [[e for e in s.ask("Go on.", options=short)][-1].reply for s in (a, reference)]
        assert replies[0].token_ids == replies[1].token_ids  # a's conversation came back whole
        assert not engine.keeper.offloaded(a._cache) and engine.keeper.offloaded(b._cache)
    finally:
        engine.close()


def test_static_mode_decodes_the_same_tokens_as_eager(loaded):
    """The CUDA-graph path's cache layout, run eagerly: whole buffers, a device-side length, the
    unfilled part masked. Over turns with clips and a rollback it must pick the same greedy tokens."""
    from afnext.engine import Engine
    from afnext.sampling import GenerationOptions
    from afnext.session import Session
    from tests.conftest import noise

    turns = [("What is this?", noise(3.0, seed=1)), ("And then?", None), ("Now this one?", noise(1.5, seed=2))]
    options = GenerationOptions(max_new_tokens=12)
    replies = {}
    for mode in ("eager", "static"):
        engine = Engine(loaded, decode=mode, kv="buffers")
        try:
            session = Session(engine)
            replies[mode] = [[e for e in session.ask(text, audio, options=options)][-1].reply.token_ids
                             for text, audio in turns]
            assert session._cache.get_seq_length() == session._cached  # back to a plain length after each turn
            # The unfilled part is attended with weight 0: it must hold no NaN (0 × NaN is NaN).
            assert all(torch.isfinite(layer._k).all() and torch.isfinite(layer._v).all() for layer in session._cache.layers)
        finally:
            engine.close()
    assert replies["static"] == replies["eager"] and all(replies["eager"])


def test_graphs_need_cuda(loaded):
    import pytest

    from afnext.engine import Engine

    with pytest.raises(ValueError, match="CUDA"):
        Engine(loaded, decode="graphs")
    with pytest.raises(ValueError, match="Unknown decode mode"):
        Engine(loaded, decode="fast")


def test_a_copy_holds_its_prefix_and_a_copy_of_a_moved_out_cache_is_brought_back():
    from afnext.kvcache import CacheKeeper, copy_cache

    cache = new_cache()
    k, v = _kv(20, 1)
    cache.update(k, v, 0)
    twin = copy_cache(cache, 12)
    assert torch.equal(twin.layers[0].keys, k[..., :12, :]) and twin.get_seq_length() == 12
    twin.update(*_kv(3, 2), 0)  # the copy grows on its own…
    assert torch.equal(cache.layers[0].keys, k), "…and the original is untouched"
    # A cache whose home is another device but whose buffers are in CPU memory (a fork of one the
    # keeper moved out) comes home on its next turn. "meta" stands in for the GPU here.
    cache.layers[0].device = torch.device("meta")
    fork = copy_cache(cache, 20)
    assert fork.layers[0]._k.device.type == "cpu" and fork.layers[0].device.type == "meta"
    CacheKeeper(torch.device("meta")).claim(fork)
    assert fork.layers[0]._k.device.type == "meta" and fork.layers[0].keys.device.type == "meta"
