"""The engine when something fails or races: a turn ends once, its caller is always told, and the
session is left exactly as it was before the turn (found in a review of the engine's core)."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from afnext import engine as engine_module
from afnext import prompt
from afnext.engine import ContextFullError, Engine, Finished
from afnext.events import TurnDone
from afnext.kvcache import CacheKeeper, SessionCache
from afnext.sampling import GenerationOptions
from afnext.session import Session

FIVE = GenerationOptions(max_new_tokens=5, min_new_tokens=5)


@pytest.fixture(params=["buffers", "paged"])
def fresh_engine(loaded, request):
    engine = Engine(loaded, kv=request.param)
    yield engine
    engine.close()


def _ids(stream) -> tuple[int, ...]:
    return [e for e in stream if isinstance(e, TurnDone)][0].reply.token_ids


def _decoder_layers(loaded) -> torch.nn.ModuleList:
    return loaded.model.get_decoder().layers


def test_a_step_failing_part_way_through_the_layers_leaves_the_conversation_as_it_was(fresh_engine, loaded, monkeypatch):
    """A forward pass that fails in its last layer has written the step's keys into the layers before
    it: the rollback cuts every layer back to the turn's start, so the next turn is what it would have
    been without the failed one."""
    failed, kept = Session(fresh_engine), Session(fresh_engine)
    for session in (failed, kept):
        _ids(session.ask("Hello there.", options=FIVE))
    last = _decoder_layers(loaded)[-1]
    calls, real = [0], last.forward

    def breaks_on_its_third_call(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 3:  # in the failed turn's decoding
            raise RuntimeError("out of memory (simulated) in the last layer")
        return real(*args, **kwargs)

    monkeypatch.setattr(last, "forward", breaks_on_its_third_call)
    with pytest.raises(RuntimeError, match="simulated"):
        list(failed.ask("A question that fails.", options=FIVE))
    monkeypatch.setattr(last, "forward", real)
    if isinstance(failed._cache, SessionCache):
        assert {layer._length for layer in failed._cache.layers} == {failed._cached}
    assert _ids(failed.ask("And now?", options=FIVE)) == _ids(kept.ask("And now?", options=FIVE))


def test_a_turn_failing_after_its_prompt_leaves_the_last_reply_to_rewrite(fresh_engine, loaded, monkeypatch):
    """The failed turn's prompt was in the session for a moment (its reply's place with it): put back,
    rewriting the last reply (a barge-in's truncate) rewrites the reply that is there."""
    session = Session(fresh_engine)
    _ids(session.ask("Hello there.", options=FIVE))

    def broken(*args, **kwargs):
        raise RuntimeError("sampling failed (simulated)")

    monkeypatch.setattr(engine_module, "pick", broken)
    with pytest.raises(RuntimeError, match="simulated"):
        list(session.ask("A question that fails.", options=FIVE))
    monkeypatch.undo()
    session.rewrite_reply("Short.")
    assert [m["role"] for m in session.messages] == ["user", "assistant"]
    assert session.tokens == loaded.tokenizer.encode(prompt.render(loaded, session.messages, False), add_special_tokens=False)


def test_a_failure_tidying_a_finished_turns_cache_still_ends_the_turn(loaded, monkeypatch):
    """Giving back spare room may itself fail (a copy, out of memory on a GPU): the caller still hears
    its turn's end and the engine goes on."""
    engine = Engine(loaded, kv="buffers")
    try:
        real, calls = SessionCache.release_spare, [0]

        def fails_once(cache):
            calls[0] += 1
            if calls[0] == 1:
                raise RuntimeError("out of memory (simulated) giving back spare room")
            return real(cache)

        monkeypatch.setattr(SessionCache, "release_spare", fails_once)
        session, got = Session(engine), {}
        reader = threading.Thread(target=lambda: got.update(ids=_ids(session.ask("Hello there.", options=FIVE))))
        reader.start()
        reader.join(60)
        assert len(got.get("ids", ())) == 5 and session.wait(1)
        assert len(_ids(session.ask("And now?", options=FIVE))) == 5
    finally:
        engine.close()


def test_a_cancel_landing_while_the_turn_is_admitted_ends_it_once(fresh_engine, monkeypatch):
    """The caller cancels while the engine is making room for the turn's cache: the engine, which
    owns the turn by then, ends it, and its caller is told once (before, the caller's cancel told it
    and the engine went on with the cache of a session already handed back)."""
    told = []
    real_tell = Engine._tell

    def counting(request, item):
        if isinstance(item, Finished):
            told.append(item)
        real_tell(request, item)

    monkeypatch.setattr(Engine, "_tell", staticmethod(counting))
    session = Session(fresh_engine)
    cache_type = type(fresh_engine.new_cache())
    real_reserve = cache_type.reserve

    settled_while_admitted = []

    def cancelled_meanwhile(cache, tokens):
        canceller = threading.Thread(target=fresh_engine.cancel, args=(session._request,))
        canceller.start()
        canceller.join()
        settled_while_admitted.append(session.wait(0))  # handed back while the engine works on its cache?
        return real_reserve(cache, tokens)

    monkeypatch.setattr(cache_type, "reserve", cancelled_meanwhile)
    events = list(session.ask("Hello there.", options=FIVE))
    monkeypatch.setattr(cache_type, "reserve", real_reserve)
    time.sleep(0.2)  # a second telling would come from the engine's thread
    assert settled_while_admitted == [False], "the session was handed back while the engine was making room for it"
    assert len(told) == 1 and not told[0].started
    assert not any(isinstance(e, TurnDone) for e in events)
    assert session.wait(1) and session.tokens == []
    assert len(_ids(session.ask("And now?", options=FIVE))) == 5


def test_a_turn_larger_than_the_whole_pool_fails_at_once_and_holds_no_one_up(loaded):
    """A turn that no amount of waiting would fit is refused when its turn to start comes, not once
    the running ones have finished; the turns behind it go ahead."""
    engine = Engine(loaded, kv="paged", kv_pool_tokens=16 * 256)
    try:
        long = Session(engine)
        done = {}
        reader = threading.Thread(target=lambda: done.update(
            long=_ids(long.ask("Count.", options=GenerationOptions(max_new_tokens=400, min_new_tokens=400)))))
        reader.start()
        while not engine.scheduler.decoding:
            time.sleep(0.001)
        with pytest.raises(ContextFullError, match="KV memory holds"):
            list(Session(engine).ask("Tell me everything.", options=GenerationOptions(max_new_tokens=8000)))
        assert len(_ids(Session(engine).ask("Hi.", options=FIVE))) == 5
        assert "long" not in done, "the refusal and the next turn came while the long reply was still decoding"
        reader.join(120)
        assert len(done["long"]) == 400
    finally:
        engine.close()


def test_an_unseeded_sampled_turn_leaves_torchs_global_generator_alone(engine):
    """A sampled reply without a seed draws a seed of its own; it does not reseed the process."""
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    options = GenerationOptions(max_new_tokens=5, min_new_tokens=5, temperature=0.9)
    _ids(Session(engine).ask("Say something.", options=options))
    assert torch.equal(torch.get_rng_state(), before)


def test_memory_a_moved_out_cache_frees_counts_on_a_gpu(monkeypatch):
    """On CUDA, a cache moved to CPU memory frees its memory into torch's caching allocator, not to
    the driver: the keeper counts what the allocator holds unused as free (else, once short, it
    would stay short for the server's life). The CUDA calls are stood in for here."""
    gib = 1 << 30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1 * gib, 80 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 30 * gib)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 20 * gib)
    keeper = CacheKeeper(torch.device("cuda"), reserve_bytes=2 * gib)
    assert not keeper._pressure(5 * gib)  # 1 GiB at the driver + 10 GiB unused in the allocator
    assert keeper._pressure(10 * gib)


def test_forks_tracked_from_other_threads_never_break_a_claim(loaded):
    """`Session.fork` tracks its copy from the asking thread while the engine's thread may be looking
    for an idle cache to move out: the keeper's books are read under a lock."""
    keeper = CacheKeeper(torch.device("cpu"), budget_bytes=0)  # always short: every claim looks at all
    caches = [SessionCache() for _ in range(64)]
    for cache in caches:
        keeper.track(cache)
    stop, errors = threading.Event(), []

    def tracking():
        made = []
        while not stop.is_set():
            made.append(SessionCache())
            keeper.track(made[-1])
            if len(made) > 500:
                made.clear()

    switch = __import__("sys").getswitchinterval()
    __import__("sys").setswitchinterval(1e-6)
    tracker = threading.Thread(target=tracking)
    tracker.start()
    try:
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            try:
                keeper.claim(caches[0], force=True)
                keeper.resident_bytes()
            except RuntimeError as exc:
                errors.append(exc)
                break
    finally:
        stop.set()
        tracker.join()
        __import__("sys").setswitchinterval(switch)
    assert not errors, errors


def test_a_fork_taking_blocks_while_a_moved_out_cache_comes_back_makes_the_turn_try_again(loaded, monkeypatch):
    """A fork on another thread may take the blocks the keeper just freed before the moved-out cache
    is copied back into them (its prefetch then finds the pool short): the turn moves the fork out
    and tries again, as when a fork takes them before the reserve; it is not refused as too large."""
    from afnext.paged import BLOCK_TOKENS, PagedCache

    engine = Engine(loaded, kv="paged", kv_pool_tokens=4 * BLOCK_TOKENS)
    try:
        session = Session(engine)
        _ids(session.ask("Hello there.", options=FIVE))
        session._cache.offload()  # moved out meanwhile
        real, forks = PagedCache.prefetch, []

        def a_fork_first(cache):
            if not forks:  # what `Session.fork`'s copy on the asking thread can do between the claim's look and here
                forks.append(PagedCache(engine.pool))
                forks[0].reserve(engine.pool.free_blocks * BLOCK_TOKENS)
                engine.keeper.track(forks[0])
            return real(cache)

        monkeypatch.setattr(PagedCache, "prefetch", a_fork_first)
        assert len(_ids(session.ask("And now?", options=FIVE))) == 5
        assert forks[0].away, "the idle fork was moved out to make room"
    finally:
        engine.close()


def test_a_turn_whose_scores_are_not_numbers_fails_alone_and_the_batch_goes_on(engine, monkeypatch):
    """NaN in one row's logits (an overflow in half precision) made torch.multinomial fail the whole
    step: every turn in the batch failed. Now that turn alone fails, rolled back, and the others go on
    exactly as they would alone."""
    plain = GenerationOptions(max_new_tokens=8, min_new_tokens=8)
    sampled = GenerationOptions(max_new_tokens=8, min_new_tokens=8, temperature=1.0, seed=3)
    alone = _ids(Session(engine).ask("Tell me more.", options=plain))
    real = engine._forward

    def forward(decodes, prefills):  # the sampled turn's scores overflow once it has two tokens
        return [(r, torch.full_like(logits, float("nan")) if r.options.temperature and len(r.generated) >= 2
                 else logits) for r, logits in real(decodes, prefills)]

    monkeypatch.setattr(engine, "_forward", forward)
    broken, other = Session(engine), Session(engine)
    results: dict[str, object] = {}

    def run(name, session, options):
        try:
            results[name] = _ids(session.ask("Tell me more.", options=options))
        except Exception as exc:  # noqa: BLE001 - the outcome is what the test reads
            results[name] = exc

    threads = [threading.Thread(target=run, args=a) for a in (("broken", broken, sampled), ("other", other, plain))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results["other"] == alone, results["other"]  # decoded beside it, as if alone
    assert isinstance(results["broken"], RuntimeError) and "not numbers" in str(results["broken"])
    assert broken.messages == []


def test_a_turn_cancelled_while_it_waits_for_memory_is_dropped_though_no_one_reads(loaded):
    """A queued turn whose reader does not look again (a `wake` reader waits to be woken; a blocking one
    may have looked while the turn was being started) was settled only when the engine next tried to
    start it; behind another turn waiting for KV memory, that was once the running turn had finished,
    and its session could take no other turn meanwhile. The engine now drops it before its next step."""
    from afnext.paged import BLOCK_TOKENS

    engine = Engine(loaded, kv="paged", kv_pool_tokens=4 * BLOCK_TOKENS)
    try:
        long_turn = GenerationOptions(max_new_tokens=3 * BLOCK_TOKENS, min_new_tokens=3 * BLOCK_TOKENS)
        talker = Session(engine)
        running = talker.ask("Tell me everything.", options=long_turn)
        next(iter(running))  # its reply has begun: it holds three of the pool's four blocks
        long_request = talker._request
        two_blocks = GenerationOptions(max_new_tokens=2 * BLOCK_TOKENS)
        ahead = Session(engine)
        first = ahead.ask("Me first.", options=two_blocks, wake=lambda: None)
        next(first)  # queued: it waits for memory, and the turns behind it wait behind it
        deadline = time.monotonic() + 30
        while not ahead._request.waited_for_memory:
            assert time.monotonic() < deadline, "the turn never had to wait for memory"
            time.sleep(0.01)
        woken, cancel, long_turn_then = threading.Event(), threading.Event(), []
        behind = Session(engine)
        stream = behind.ask("And this?", options=two_blocks, cancel=cancel,
                            wake=lambda: (long_turn_then.append(long_request.state), woken.set()))
        next(stream)  # queued behind it
        cancel.set()  # and its reader waits for a wake
        assert woken.wait(30), "the engine never told the cancelled turn"
        assert long_turn_then[0] == "decoding", "told only once the long turn had ended and freed its memory"
        assert behind.wait(1.0)  # the session is free for its next turn
        for open_stream in (stream, first, running):
            open_stream.close()
    finally:
        engine.close()


def test_rewriting_a_reply_added_by_extend_cuts_that_reply_only(engine):
    """A client resending history adds a user turn and a reply (`extend`) after a generated one;
    rewriting the last reply then cut from where the generated reply began (its place was never
    moved on), dropping the user turn and both replies' tokens while only one message went: the
    tokens no longer matched the messages."""
    rewritten, direct = Session(engine), Session(engine)
    for session, reply in ((rewritten, "An earlier answer, longer than the cut."), (direct, "Cut.")):
        _ids(session.ask("Hello there.", options=FIVE))
        session.extend("user", "An earlier question.")
        session.extend("assistant", reply)
    rewritten.rewrite_reply("Cut.")
    assert rewritten.messages == direct.messages
    assert rewritten.tokens == direct.tokens
    assert _ids(rewritten.ask("And now?", options=FIVE)) == _ids(direct.ask("And now?", options=FIVE))


def test_a_change_from_another_thread_waits_while_a_turn_is_handed_to_the_engine(engine, monkeypatch):
    """A socket's reader (a truncate, the client's own messages) and a turn's thread both change a
    conversation. A system message added while the turn was being handed over went into `tokens`
    under the turn's prompt, which the engine had already taken: the conversation read system, user,
    reply, and its KV cache user, reply. It now waits for the turn and goes after its reply."""
    from afnext import session as session_module

    session = Session(engine)
    _ids(session.ask("Hello there.", options=FIVE))
    handing, go = threading.Event(), threading.Event()
    made = session_module.Request

    def slow_request(*args, **kwargs):  # the turn paused while it is handed over
        handing.set()
        assert go.wait(10)
        return made(*args, **kwargs)

    monkeypatch.setattr(session_module, "Request", slow_request)
    stream = session.ask("And now?", options=FIVE)
    reader = threading.Thread(target=lambda: _ids(stream))
    reader.start()
    assert handing.wait(10)
    added = threading.Thread(target=session.extend, args=("system", "Answer in French from now on."))
    added.start()
    added.join(0.5)
    assert added.is_alive(), "the system message went in while the turn was being handed over"
    go.set()
    reader.join(30)
    added.join(30)
    assert [m["role"] for m in session.messages] == ["user", "assistant", "user", "assistant", "system"]
    added_ids = prompt.message_ids(engine.loaded, session.messages[:-1], session.messages[-1], None)
    assert session.tokens[-len(added_ids):] == added_ids  # its tokens after the reply's, none in the cache
    assert session.cached_tokens <= len(session.tokens) - len(added_ids)


def test_a_truncate_meant_for_a_reply_no_longer_last_changes_nothing(engine):
    """`rewrite_reply(messages=N)`: the reply is cut only while the conversation holds the N messages
    the caller saw (a Realtime truncate racing a turn's thread that added the client's own messages)."""
    session = Session(engine)
    _ids(session.ask("Hello there.", options=FIVE))
    seen = len(session.messages)
    session.extend("system", "Be brief.")
    before = (list(session.tokens), list(session.messages))
    assert session.rewrite_reply("Hel", messages=seen) is False
    assert (session.tokens, session.messages) == before
    session2 = Session(engine)
    _ids(session2.ask("Hello there.", options=FIVE))
    assert session2.rewrite_reply("Hel", messages=len(session2.messages)) is True
    assert prompt.text_of(session2.messages[-1]) == "Hel"


def test_a_reply_says_how_many_messages_the_conversation_held_once_it_went_in(engine):
    """What a Realtime truncate checks (`rewrite_reply(messages=)`): taken when the reply went in, not when
    its reader got to it, by which time the next turn may have added the client's own exchange; with that
    count, the rewrite meant for the old reply leaves the client's message alone."""
    session = Session(engine, system="Be brief.")
    first = [e for e in session.ask("Hello there.", options=FIVE) if isinstance(e, TurnDone)][0].reply
    assert first.messages == len(session.messages) == 3
    greeting = [e for e in session.respond(options=FIVE) if isinstance(e, TurnDone)][0].reply
    assert greeting.messages == len(session.messages) == 4
    session.add_exchange("Given.", None, "A reply the client gave.")  # the next turn's thread, before the reader
    assert session.rewrite_reply("Hel", messages=greeting.messages) is False
    assert prompt.text_of(session.messages[-1]) == "A reply the client gave."
