"""The paged KV pool: blocks lent and given back, sessions moved out and back under pressure, a turn
too large for the pool refused in one sentence, decoding rows attending in classes of similar length."""

from __future__ import annotations

import gc

import pytest
import torch

from afnext import paged
from afnext.engine import ContextFullError, Engine
from afnext.events import TurnDone
from afnext.paged import BLOCK_TOKENS, BlockPool, PagedCache, PoolFull
from afnext.sampling import GenerationOptions
from afnext.session import Session
from tests.conftest import noise

SHORT = GenerationOptions(max_new_tokens=6)


def reply(stream):
    events = list(stream)
    done = [e for e in events if isinstance(e, TurnDone)]
    return done[0].reply if done else events[-1]


@pytest.fixture(params=[False, True], ids=["heads-layout", "flash-layout"])
def pool(loaded, request):
    """An 8-block pool in either layout: each key head's slots in a row, or flash-attn's."""
    return BlockPool(loaded.model.config, 8 * BLOCK_TOKENS, torch.device("cpu"), torch.float32, flash_layout=request.param)


def fill(cache: PagedCache, tokens: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Write `tokens` random keys and values into every layer of `cache`; returns them [layers, tokens, heads, dim]."""
    pool = cache.pool
    gen = torch.Generator().manual_seed(seed)
    shape = (len(pool.keys), tokens, pool.kv_heads, pool.head_dim)
    keys, values = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    cache.reserve(tokens)
    cache.length = tokens
    cache._write(cache.slots(0, tokens), keys, values)
    return keys, values


def test_blocks_are_lent_given_back_and_refused_when_short(pool):
    assert pool.free_blocks == 8 and pool.capacity_tokens == 8 * BLOCK_TOKENS
    a = PagedCache(pool)
    a.reserve(3 * BLOCK_TOKENS + 1)
    assert len(a.blocks) == 4 and paged.SCRATCH_BLOCK not in a.blocks and pool.free_blocks == 4
    with pytest.raises(PoolFull):
        PagedCache(pool).reserve(5 * BLOCK_TOKENS)
    assert pool.free_blocks == 4, "a refused reservation takes nothing"
    a.length = BLOCK_TOKENS + 5
    a.release_spare()
    assert len(a.blocks) == 2 and pool.free_blocks == 6
    del a
    gc.collect()
    assert pool.free_blocks == 8, "a dropped session's blocks go back to the pool"


def test_slots_cross_block_edges_in_the_sessions_own_blocks(pool):
    cache = PagedCache(pool)
    other = PagedCache(pool)
    other.reserve(BLOCK_TOKENS)  # someone else's block, so this session's are not the first
    cache.reserve(3 * BLOCK_TOKENS)
    assert cache.blocks[0] != 1
    slots = cache.slots(BLOCK_TOKENS - 2, 4).tolist()
    b0, b1 = cache.blocks[0], cache.blocks[1]
    assert slots == [b0 * BLOCK_TOKENS + BLOCK_TOKENS - 2, b0 * BLOCK_TOKENS + BLOCK_TOKENS - 1, b1 * BLOCK_TOKENS, b1 * BLOCK_TOKENS + 1]


def test_a_moved_out_cache_comes_back_whole_and_a_copy_holds_its_prefix(pool):
    cache = PagedCache(pool)
    keys, values = fill(cache, 300)
    cache.offload()
    assert cache.away and not cache.blocks and pool.free_blocks == 8
    cache.prefetch()
    assert not cache.away and len(cache.blocks) == 2
    got_k, got_v = cache._stacked()
    assert torch.equal(got_k, keys) and torch.equal(got_v, values)
    twin = cache.copy(260)
    assert twin.get_seq_length() == 260 and set(twin.blocks).isdisjoint(cache.blocks)
    assert torch.equal(twin._stacked()[0], keys[:, :260])
    free = pool.free_blocks
    twin.crop_to(200)  # between turns: the block past its tokens goes back, as any session's would
    assert len(twin.blocks) == 1 and pool.free_blocks == free + 1
    cache.offload()
    away_twin = cache.copy(100)  # a copy of a moved-out cache stays out until its turn
    assert away_twin.away and away_twin.get_seq_length() == 100
    away_twin.prefetch()
    assert torch.equal(away_twin._stacked()[1], values[:, :100])


def test_decoding_rows_attend_in_classes_of_similar_length(pool):
    caches = [PagedCache(pool) for _ in range(4)]
    lengths = [10, 14, 700, 260]
    written = [fill(cache, n, seed=i) for i, (cache, n) in enumerate(zip(caches, lengths))]
    rows = [(i, c, n) for i, (c, n) in enumerate(zip(caches, lengths))]
    if pool.flash_layout:  # flash-attn reads blocks in place: one call
        (one,) = paged.decode_classes(rows, pool, torch.device("cpu"), flash=True)
        assert one.table.shape == (4, 3) and one.table.dtype == torch.int32 and one.index is None and one.mask is None
        assert one.table[0, 1:].tolist() == [paged.SCRATCH_BLOCK] * 2
        return
    classes = paged.decode_classes(rows, pool, torch.device("cpu"), flash=False)
    assert sorted(c.rows.tolist() for c in classes) == [[0, 1], [2], [3]]
    short = next(c for c in classes if c.rows.tolist() == [0, 1])
    assert short.index.shape == (2, pool.kv_heads, 14) and short.contiguous and short.first == 0  # the longest row's keys, no more
    per_head = pool.keys[0].shape[1]  # a layer's keys read as one [kv_heads × slots, head_dim] table
    assert [short.index[0, h, :10].tolist() for h in range(pool.kv_heads)] == \
        [(caches[0].slots(0, 10) + h * per_head).tolist() for h in range(pool.kv_heads)]
    assert short.mask[0, 0, 0].sum() == 10 and short.mask[1, 0, 0].all()
    keys, values = pool.gather_rows(1, short.index)  # each row's heads as they were written
    assert keys.shape == (2, pool.kv_heads, 14, pool.head_dim) and keys.is_contiguous()
    assert torch.equal(keys[0, :, :10], written[0][0][1].transpose(0, 1))
    assert torch.equal(values[1], written[1][1][1].transpose(0, 1))


def test_idle_conversations_move_out_of_a_full_pool_and_come_back_intact(loaded):
    """A pool with room for about one conversation with a clip: the second moves the first out; the
    first's next turn brings it back (moving the second out) and answers as a full recompute does."""
    engine = Engine(loaded, kv="paged", kv_pool_tokens=3 * BLOCK_TOKENS)
    try:
        a, b, reference = Session(engine), Session(engine), Session(engine, use_cache=False)
        for session in (a, reference):
            reply(session.ask("What is this?", noise(4.0, seed=1), options=SHORT))
        reply(b.ask("And this?", noise(4.0, seed=2), options=SHORT))
        assert a._cache.away and not b._cache.away
        again = reply(a.ask("Go on.", options=SHORT))
        assert not a._cache.away and b._cache.away
        assert again.token_ids == reply(reference.ask("Go on.", options=SHORT)).token_ids and again.token_ids
    finally:
        engine.close()


def test_a_turn_larger_than_the_pool_is_refused_in_one_sentence_and_the_session_goes_on(loaded):
    engine = Engine(loaded, kv="paged", kv_pool_tokens=2 * BLOCK_TOKENS)
    try:
        session = Session(engine)
        with pytest.raises(ContextFullError) as refused:  # a user's error: the API answers it with a 400
            list(session.ask("Tell me everything.", options=GenerationOptions(max_new_tokens=2000)))
        message = str(refused.value)
        assert message.startswith("This turn needs room for") and message.count(". ") == 0 and message.endswith(".")
        assert engine.pool.free_blocks == 2, "the refused turn holds no block"
        assert reply(session.ask("Hi.", options=SHORT)).token_ids, "the session still answers"
    finally:
        engine.close()


def test_an_unknown_layout_is_refused(loaded):
    with pytest.raises(ValueError, match="Unknown KV layout"):
        Engine(loaded, kv="pages")


def test_the_pool_is_the_default_on_cpu_and_the_buffers_on_a_gpu(loaded):
    from afnext.engine import default_kv

    assert default_kv(torch.device("cpu")) == "paged" and default_kv(torch.device("cuda", 0)) == "buffers"
    engine = Engine(loaded)
    try:
        assert engine.kv == "paged" and engine.pool is not None and not engine.pool.flash_layout
    finally:
        engine.close()


def test_decoding_steps_of_fixed_shape_per_batch_bucket_pick_the_eager_tokens(loaded):
    """The CUDA-graph path's step, run eagerly (static mode): batches padded to a bucket of rows, keys
    padded to a width per bucket, padding rows writing into the scratch block. Five conversations
    at once (one with a 23 s clip, the others 3 s), two turns each, must pick each one's solo tokens."""
    import threading

    options = GenerationOptions(max_new_tokens=24, min_new_tokens=24)

    def conversation(engine, i):
        session = Session(engine)
        first = reply(session.ask("What is this?", noise(3.0 + 20 * (i == 0), seed=i), options=options))
        return first.token_ids, reply(session.ask("And then?", options=options)).token_ids

    alone = Engine(loaded, kv="buffers")
    try:
        solo = {i: conversation(alone, i) for i in range(5)}
    finally:
        alone.close()
    engine = Engine(loaded, kv="paged", decode="static")
    try:
        together, threads = {}, []
        for i in range(5):
            threads.append(threading.Thread(target=lambda i=i: together.__setitem__(i, conversation(engine, i))))
            threads[-1].start()
        for t in threads:
            t.join(120)
        assert together == solo
        sizes = {size for size, _ in engine._buckets}
        assert max(sizes) >= 4 and sizes <= {1, 2, 4, 8}, "batches went through buckets of several rows"
        assert all(width & (width - 1) == 0 and width >= BLOCK_TOKENS for _, width in engine._buckets)
    finally:
        engine.close()


def test_a_copy_made_when_the_pool_is_full_waits_in_cpu_memory(pool):
    """Forking a conversation never fails for want of blocks: the copy starts out in CPU memory and
    its next turn brings it in, making room as for any turn."""
    cache = PagedCache(pool)
    keys, _ = fill(cache, 5 * BLOCK_TOKENS)
    other = PagedCache(pool)
    other.reserve(3 * BLOCK_TOKENS)  # the pool is full now
    twin = cache.copy(4 * BLOCK_TOKENS)
    assert twin.away and twin.get_seq_length() == 4 * BLOCK_TOKENS and pool.free_blocks == 0
    cache.offload()
    twin.prefetch()
    assert torch.equal(twin._stacked()[0], keys[:, :4 * BLOCK_TOKENS])


def test_a_collected_sessions_blocks_come_back_even_when_it_dies_inside_a_take(pool):
    """A finalizer can run inside any allocation, one made while `take` holds the pool's lock
    included: it must not wait for that lock (it would wait for itself)."""
    import threading

    cache = PagedCache(pool)
    cache.reserve(2 * BLOCK_TOKENS)
    given = threading.Thread(target=lambda: (pool._lock.acquire(), paged._give_back(pool, cache.blocks), pool._lock.release()),
                             daemon=True)  # a regression hangs this thread, not the test run
    given.start()
    given.join(5)
    assert not given.is_alive(), "the finalizer waited for the lock its own thread held"
    assert pool.free_blocks == 8


def test_a_moved_out_cache_comes_back_when_the_turn_fits_exactly_and_not_at_all_when_the_pool_is_short(loaded):
    """The keeper counts whole blocks: a 500-token cache out in CPU memory and a turn of 500 more fill
    a 4-block pool exactly and fit. A prefetch the pool cannot take leaves everything as it was."""
    from afnext.kvcache import CacheKeeper

    pool = BlockPool(loaded.model.config, 4 * BLOCK_TOKENS, torch.device("cpu"), torch.float32)
    keeper = CacheKeeper(pool.device, pool=pool)
    cache = PagedCache(pool)
    keys, _ = fill(cache, 500)
    cache.offload()
    hog = PagedCache(pool)
    hog.reserve(4 * BLOCK_TOKENS)  # an idle session holds the whole pool
    keeper.track(hog)
    assert keeper.claim(cache, cache.bytes_to_hold(1000)) and not cache.away and hog.away and not hog.blocks
    assert torch.equal(cache._stacked()[0], keys)
    cache.offload()
    other = PagedCache(pool)
    other.reserve(3 * BLOCK_TOKENS)  # 1 block free: the 2-block cache cannot come back
    with pytest.raises(PoolFull):
        cache.prefetch()
    assert cache.away and not cache.blocks and pool.free_blocks == 1


def test_a_fork_that_never_speaks_is_moved_out_when_the_pool_runs_short(loaded):
    """A fork's copy is counted among the caches the keeper may move out, though it has run no turn:
    otherwise its blocks would be pinned for as long as it lives."""
    engine = Engine(loaded, kv="paged", kv_pool_tokens=5 * BLOCK_TOKENS)
    try:
        a = Session(engine)
        reply(a.ask("What is this?", noise(4.0, seed=1), options=SHORT))  # 2 blocks
        fork = a.fork(2)  # 2 more, 1 left
        assert not fork._cache.away and len(fork._cache.blocks) == 2
        reply(a.ask("Go on.", options=SHORT))  # a is now the more recently used
        b = Session(engine)
        reply(b.ask("And this?", noise(4.0, seed=2), options=SHORT))  # needs 2: the fork moves out
        assert fork._cache.away and not a._cache.away, "the silent fork's blocks were lent to the turn that needed them"
        assert reply(fork.ask("Go on.", options=SHORT)).token_ids  # and it comes back when it speaks
    finally:
        engine.close()


def test_blocks_are_lent_in_runs_a_growing_session_stays_one_and_small_asks_fill_small_holes(loaded):
    """The pool lends consecutive blocks where it can: a session that grows takes the blocks right
    after its own; a new ask takes the smallest free run that holds it, so large runs are kept for
    large sessions; when no run is large enough it takes the largest first (fewest pieces)."""
    pool = BlockPool(loaded.model.config, 16 * BLOCK_TOKENS, torch.device("cpu"), torch.float32)
    a, b = PagedCache(pool), PagedCache(pool)
    a.reserve(2 * BLOCK_TOKENS)
    a.reserve(4 * BLOCK_TOKENS)  # grows in place
    assert a.blocks == [1, 2, 3, 4] and a.span(4 * BLOCK_TOKENS) == BLOCK_TOKENS
    holes = [PagedCache(pool) for _ in range(5)]
    for hole, size in zip(holes, (1, 1, 3, 1, 2)):  # blocks 5, 6, 7-9, 10, 11-12; 13-16 free
        hole.reserve(size * BLOCK_TOKENS)
    assert [h.blocks for h in holes] == [[5], [6], [7, 8, 9], [10], [11, 12]]
    holes[1].release_spare(), holes[2].release_spare()  # they hold no token: 6-9 free, a run of 4 beside 13-16
    assert pool.free_blocks == 4 + 4
    b.reserve(3 * BLOCK_TOKENS)  # the smallest run that holds 3: 6-9 (4 blocks) and 13-16 (4) tie; the first
    assert b.blocks == [6, 7, 8] and b.span(3 * BLOCK_TOKENS) == 6 * BLOCK_TOKENS
    c = PagedCache(pool)
    c.reserve(1 * BLOCK_TOKENS)  # the smallest hole: block 9, not the 4-block run
    assert c.blocks == [9]
    holes[3].release_spare()  # block 10 free: runs 10 (1) and 13-16 (4)
    d = PagedCache(pool)
    d.reserve(5 * BLOCK_TOKENS)  # no run holds 5: the largest first
    assert d.blocks == [13, 14, 15, 16, 10] and d.span(4 * BLOCK_TOKENS) == 13 * BLOCK_TOKENS and d.span(5 * BLOCK_TOKENS) is None
    assert pool.free_blocks == 0
    pool.give(c.blocks)
    for wrong in ([9], [paged.SCRATCH_BLOCK], [13, 13]):  # free already, never lent, twice in one list
        with pytest.raises(RuntimeError, match="not lent"):
            pool.give(wrong)
    assert pool.free_blocks == 1


def test_a_row_in_consecutive_blocks_is_read_in_place_and_a_scattered_one_gathered_with_the_same_result(loaded):
    """Decoding rows attend over a view of the pool where their keys lie in consecutive blocks and
    through a gather where they do not; rows of a class are gathered together, padded to the longest,
    whether each lies in consecutive blocks (their slots made in one op) or one does not (slot by
    slot); every way gives what attention over the keys themselves gives."""
    from afnext.attention import Segment, decode_attention, paged_attention

    pool = BlockPool(loaded.model.config, 20 * BLOCK_TOKENS, torch.device("cpu"), torch.float32)
    plugs = [PagedCache(pool) for _ in range(6)]
    for plug in plugs:
        plug.reserve(BLOCK_TOKENS)  # blocks 1-6
    for plug in plugs[::2]:
        plug.release_spare()  # free: 1, 3, 5 (holes of one) and 7-20
    scattered, whole, alone, near, beside = (PagedCache(pool) for _ in range(5))
    assert pool.take(3) == [7, 8, 9] and pool.give([7, 8, 9]) is None  # a run holds them: one piece
    scattered.blocks.extend(pool.take(1) + pool.take(1) + pool.take(1))  # a block at a time, as a session grows among others
    assert scattered.blocks == [1, 3, 5]
    written = [fill(scattered, 3 * BLOCK_TOKENS - 5, seed=1), fill(whole, BLOCK_TOKENS + 7, seed=2),
               fill(alone, 4 * BLOCK_TOKENS + 9, seed=3), fill(near, BLOCK_TOKENS + 40, seed=4),
               fill(beside, 2 * BLOCK_TOKENS + 88, seed=5)]
    caches = [scattered, whole, alone, near, beside]
    assert scattered.span(scattered.length) is None and all(c.span(c.length) is not None for c in caches[1:])
    step = paged.plan_step(pool, [Segment(c, c.length, 1) for c in caches], flash=False)
    # 764 and 601 tokens gathered together (one row scattered); 264 and 297 (both in runs); 1,034 read in place
    assert sorted(c.rows.tolist() for c in step.classes) == [[0, 4], [1, 3], [2]]
    assert [c.rows.tolist() for c in step.classes if c.span is not None] == [[2]]
    text = loaded.model.config.get_text_config(decoder=True)
    heads, dim = text.num_attention_heads, pool.head_dim
    layer = 0
    new_k = torch.randn(1, pool.kv_heads, len(caches), dim)
    step.update(new_k, new_k.clone(), layer)
    query = torch.randn(1, heads, len(caches), dim)
    module = loaded.model.model.language_model.layers[0].self_attn
    out = paged_attention(module, query, paged.PagedKV(step, layer), None)  # [1, rows, heads, dim]
    for row, (keys, values) in enumerate(written):
        k = torch.cat([keys[layer], new_k[0, :, row:row + 1].transpose(0, 1)]).transpose(0, 1)[None]
        v = torch.cat([values[layer], new_k[0, :, row:row + 1].transpose(0, 1)]).transpose(0, 1)[None]
        expected = torch.nn.functional.scaled_dot_product_attention(query[:, :, row:row + 1], k, v, enable_gqa=True)[0, :, 0]
        assert torch.allclose(out[0, row], expected, atol=1e-5)
        assert torch.allclose(decode_attention(query[:, :, row], k, v, None)[0], expected, atol=1e-5)


@pytest.mark.parametrize("heads,kv_heads,n,past", [(8, 2, 256, 700), (4, 4, 2, 1), (28, 4, 33, 300)])
def test_a_prompt_chunk_after_earlier_tokens_attends_as_masked_sdpa_does(heads, kv_heads, n, past):
    """CPU prefill chunks: two flash calls merged by log-sum-exp (attention.chunk_attention) against
    sdpa with the causal mask of a chunk that follows `past` tokens, on keys that are views of a
    pool laid out [kv_heads, slots, dim] as the paged pool's heads layout is."""
    from afnext.attention import chunk_attention

    g = torch.Generator().manual_seed(n + past)
    slots = torch.randn(2, kv_heads, past + n + 50, 64, generator=g)  # keys and values, with slots beyond
    k, v = (t[:, 10:10 + past + n][None] for t in slots)  # a strided window, not a copy
    q = torch.randn(1, heads, n, 64, generator=g)
    mask = torch.ones(n, past + n, dtype=torch.bool).tril(past)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.125, enable_gqa=True)
    out = chunk_attention(q, k, v, 0.125)
    assert out.shape == (1, n, heads, 64) and torch.allclose(out, expected.transpose(1, 2), atol=1e-5)
