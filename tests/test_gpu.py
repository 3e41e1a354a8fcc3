"""GPU checks, skipped without CUDA: the fast decode path against the eager one, and a 30-minute
recording under a 24 GB cap. Run on a GPU machine with `python -m pytest tests/test_gpu.py`."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def mid_bf16():
    from afnext.tiny import build_in_memory

    loaded, _ = build_in_memory("mid", "cuda", torch.bfloat16)
    return loaded


@pytest.mark.parametrize("mode", ["static", "graphs"])
def test_fast_decoding_picks_the_eager_tokens(mid_bf16, mode):
    """bf16 rounding differs between kernels, so only the first 32 greedy tokens must agree."""
    from afnext.engine import Engine
    from afnext.sampling import GenerationOptions
    from afnext.session import Session
    from tests.conftest import noise

    options = GenerationOptions(max_new_tokens=32, min_new_tokens=32)
    tokens = {}
    for m in ("eager", mode):
        engine = Engine(mid_bf16, decode=m)
        try:
            session = Session(engine)
            first = [e for e in session.ask("What is this?", noise(20.0), options=options)][-1].reply
            follow = [e for e in session.ask("And then?", options=options)][-1].reply
            tokens[m] = (first.token_ids, follow.token_ids)
        finally:
            engine.close()
    assert tokens[mode] == tokens["eager"]


@pytest.mark.parametrize("mode", ["eager", "graphs"])
def test_the_paged_pool_picks_the_buffers_tokens_in_a_batch(mid_bf16, mode):
    """Four conversations at once with the KV caches in the paged pool (flash-attn's paged kernel when
    installed, else the gather), eagerly or replayed from a graph per batch bucket, against the
    per-session buffers: bf16 rounding differs between kernels, so the first 16 greedy tokens."""
    import threading

    from afnext.engine import Engine
    from afnext.sampling import GenerationOptions
    from afnext.session import Session
    from tests.conftest import noise

    options = GenerationOptions(max_new_tokens=16, min_new_tokens=16)
    tokens = {}
    for kv, decode in (("buffers", "eager"), ("paged", mode)):
        engine, got = Engine(mid_bf16, kv=kv, decode=decode), {}
        try:
            def talk(i, engine=engine, got=got):
                session = Session(engine)
                first = [e for e in session.ask("What is this?", noise(5.0 + 40 * (i == 0), seed=i), options=options)][-1].reply
                got[i] = (first.token_ids, [e for e in session.ask("And then?", options=options)][-1].reply.token_ids)
            threads = [threading.Thread(target=talk, args=(i,)) for i in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(300)
        finally:
            engine.close()
        tokens[kv] = got
    assert tokens["paged"] == tokens["buffers"] and len(tokens["paged"]) == 4


def test_a_30_minute_recording_fits_a_24_gb_card():
    """The real-size model in bf16 with a 30-minute recording, the process capped at 24 GB."""
    from afnext.engine import Engine
    from afnext.sampling import GenerationOptions
    from afnext.session import Session
    from afnext.tiny import build_in_memory
    from tests.conftest import noise

    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, 24e9 / total))
    try:
        loaded, _ = build_in_memory("full", "cuda", torch.bfloat16)
        engine = Engine(loaded)
        torch.cuda.reset_peak_memory_stats()
        session = Session(engine)
        reply = [e for e in session.ask("What happens?", noise(1800.0), options=GenerationOptions(max_new_tokens=8))][-1]
        assert reply.reply.prompt_tokens > 45_000
        assert torch.cuda.max_memory_allocated() <= 22 * 2**30
        engine.close()
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
