"""Sessions: the cached path equals full recomputation and stock transformers; cancel; rollback."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from afnext.audio import AudioError
from afnext.sampling import GenerationOptions
from afnext.events import Interrupted, TextDelta, TurnDone
from afnext.session import THINK_PREFILL, ContextFullError, Session
from tests.conftest import noise

OPTS = GenerationOptions(max_new_tokens=12)
# Clips whose tails hit the stock bugs: 30.013 s leaves 208 samples past the first window.
TURNS = [("What is this?", 5.0), ("And this one?", 30.013), ("Answer in text only.", None), ("Last one.", 65.0)]


@pytest.fixture(params=["buffers", "paged"])
def engine(request):
    """Every session test on both KV layouts: per-session buffers, and a paged pool small enough that
    the conversations here fill it (idle ones move out and come back)."""
    return request.getfixturevalue(f"{request.param}_engine")


def run(session: Session, text: str, audio=None, **kw):
    """One turn; returns (reply, events)."""
    events = list(session.ask(text, audio, **{"options": OPTS, **kw}))
    done = [e for e in events if isinstance(e, TurnDone)]
    return (done[0].reply if done else None), events


def conversation(engine, use_cache: bool):
    session = Session(engine, use_cache=use_cache)
    replies = [run(session, text, None if s is None else noise(s, seed=i))[0] for i, (text, s) in enumerate(TURNS)]
    return session, replies


def test_cached_turns_equal_full_recompute(engine):
    cached_session, cached = conversation(engine, use_cache=True)
    _, fresh = conversation(engine, use_cache=False)
    assert [r.token_ids for r in cached] == [r.token_ids for r in fresh]
    assert [r.prompt_tokens for r in cached] == [r.prompt_tokens for r in fresh]
    assert all(len(r.token_ids) > 0 for r in cached), "replies were empty: the comparison would prove nothing"
    assert cached_session._cache.get_seq_length() < len(cached_session.tokens), "the last reply is not all cached"


def test_first_turn_equals_stock_generate(engine, tiny_dir):
    from transformers import AutoProcessor

    clip = noise(5.0, seed=7)
    reply, _ = run(Session(engine), "What is this?", clip)
    processor = AutoProcessor.from_pretrained(tiny_dir)
    messages = [{"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": "What is this?"}]}]
    prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = processor(text=[prompt], audio=[clip])
    with torch.inference_mode():
        ids = engine.loaded.ids  # the audio placeholders are never generated (afnext/sampling.py), here either
        out = engine.loaded.model.generate(**inputs, max_new_tokens=12, do_sample=False, repetition_penalty=1.2,
                                           suppress_tokens=[ids.sound, ids.sound_bos, ids.sound_eos])
    stock = out[0, inputs["input_ids"].shape[1]:].tolist()
    assert list(reply.token_ids) == [t for t in stock if t != engine.loaded.ids.im_end]
    assert reply.prompt_tokens == inputs["input_ids"].shape[1]


def test_stock_processor_crashes_where_we_do_not(engine, tiny_dir):
    """Why prepare_clip drops ≤ 20 ms tails: stock transformers raises on them (FACTS 3)."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_dir)
    messages = [{"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": "Hi"}]}]
    inputs = processor(text=[processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)],
                       audio=[noise(30.013)])
    with pytest.raises(IndexError), torch.inference_mode():
        engine.loaded.model.generate(**inputs, max_new_tokens=2)
    assert run(Session(engine), "Hi", noise(30.013))[0] is not None


def test_token_layout_matches_template_and_processor(engine):
    """Decoding the conversation, each clip's span folded back to <sound>, gives the rendered template."""
    session, replies = conversation(engine, use_cache=True)
    ids, tok = engine.loaded.ids, engine.loaded.tokenizer
    folded, spans, i = [], [], 0
    while i < len(session.tokens):
        if session.tokens[i] == ids.sound_bos:
            end = session.tokens.index(ids.sound_eos, i)
            assert set(session.tokens[i + 1:end]) == {ids.sound}
            spans.append(end - i - 1)
            folded.append(ids.sound)
            i = end + 1
        else:
            folded.append(session.tokens[i])
            i += 1
    assert spans == [125, 750, 1625]  # 25 tokens per second; 30.013 s keeps one full window
    rendered = tok.apply_chat_template(session.messages, chat_template=engine.loaded.chat_template, tokenize=False)
    assert tok.decode(folded) == rendered


def test_closing_the_stream_cancels_and_keeps_the_partial_reply(engine):
    session = Session(engine)
    stream = session.ask("Tell me a long story.", options=GenerationOptions(max_new_tokens=200, repetition_penalty=1.0))
    first = next(e for e in stream if isinstance(e, TextDelta))
    stream.close()
    assert session.wait(5), "the engine settles a closed turn within a step"
    assert first.text
    assert session.tokens[-1 - len(engine.loaded.ids.newline)] == engine.loaded.ids.im_end
    partial = session.messages[-1]["content"][0]["text"]
    assert len(session.tokens) < 400 and partial, "the partial reply must stay in the conversation"
    reply, _ = run(session, "Go on.")
    assert reply.token_ids and not reply.interrupted


def test_cancel_event_stops_within_one_step(engine, monkeypatch):
    session, cancel, steps = Session(engine), threading.Event(), []
    real_step = engine.run_segments

    def counting_step(segments, embeds):
        if all(s.length == 1 for s in segments):  # a decoding step
            steps.append(segments)
            if len(steps) == 3:
                cancel.set()  # another thread would do this: the check happens before the next step
        return real_step(segments, embeds)

    monkeypatch.setattr(engine, "run_segments", counting_step)
    reply, events = run(session, "Count.", options=GenerationOptions(max_new_tokens=50, repetition_penalty=1.0), cancel=cancel)
    assert reply.interrupted and any(isinstance(e, Interrupted) for e in events)
    assert len(steps) == 3 and len(reply.token_ids) == 4  # the token picked after the 3rd step, then stop


def test_bad_audio_leaves_the_session_answering(engine, tmp_path):
    session = Session(engine)
    first, _ = run(session, "Hello", noise(2.0))
    before = list(session.tokens)
    junk = tmp_path / "notes.wav"
    junk.write_text("this is not audio")
    for bad in (junk, tmp_path / "missing.wav", noise(0.01)):
        with pytest.raises(AudioError):
            run(session, "What about this?", bad)
    assert session.tokens == before
    reply, _ = run(session, "Still there?")
    assert reply.token_ids


def test_failed_turn_rolls_back_cache_and_tokens(engine, monkeypatch):
    reference = Session(engine)
    run(reference, "One", noise(3.0, seed=1))
    expected, _ = run(reference, "Two")

    session = Session(engine)
    run(session, "One", noise(3.0, seed=1))
    real_step, calls = engine.run_segments, []

    def failing_step(segments, embeds):
        calls.append(segments)
        if len(calls) == 2:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real_step(segments, embeds)

    monkeypatch.setattr(engine, "run_segments", failing_step)
    with pytest.raises(RuntimeError, match="simulated"):
        run(session, "Broken turn")
    monkeypatch.setattr(engine, "run_segments", real_step)
    again, _ = run(session, "Two")
    assert again.token_ids == expected.token_ids


def test_full_context_is_a_clear_error(engine, monkeypatch):
    session = Session(engine)
    run(session, "Hi")
    before = list(session.tokens)
    monkeypatch.setattr(type(engine.loaded), "context_tokens", property(lambda self: len(before) + 20))
    with pytest.raises(ContextFullError, match="new conversation"):
        run(session, "Please listen", noise(2.0))
    assert session.tokens == before
    reply, _ = run(session, "ok", options=GenerationOptions(max_new_tokens=500))
    assert len(before) + 20 >= reply.prompt_tokens + len(reply.token_ids)


def test_think_turn_is_prefilled_on_the_think_checkpoint(engine, monkeypatch):
    from dataclasses import replace

    monkeypatch.setattr(engine, "loaded", replace(engine.loaded, is_think=True))
    session = Session(engine)
    reply, _ = run(session, "When does it change?", noise(4.0), think=True)
    prefill = engine.loaded.tokenizer.encode("assistant\n" + THINK_PREFILL, add_special_tokens=False)
    start = reply.prompt_tokens - len(prefill)
    assert session.tokens[start:reply.prompt_tokens] == prefill
    assert reply.text.startswith(THINK_PREFILL)
    assert "timestamps" in session.messages[-2]["content"][-1]["text"]


def test_sampling_is_reproducible_with_a_seed(engine):
    opts = GenerationOptions(max_new_tokens=10, temperature=0.8, top_p=0.9, seed=3)
    a, _ = run(Session(engine), "Hi", options=opts)
    b, _ = run(Session(engine), "Hi", options=opts)
    assert a.token_ids == b.token_ids


def test_empty_turn_is_refused(engine):
    with pytest.raises(ValueError, match="question, an audio clip"):
        run(Session(engine), "   ")


@pytest.mark.parametrize(("seconds", "batch_windows"), [(65.0, 1), (65.0, 2), (65.0, 16), (0.5, 16), (5.0, 16),
                                                      (29.99, 16), (30.0, 16), (31.0, 16)])
def test_encoding_equals_stock_audio_features(engine, tiny_dir, monkeypatch, seconds, batch_windows):
    """Window-batched encoding with our own time stamps, running only the frames each window needs,
    equals the stock path (which runs every window's whole 30 s) on clips of one to three windows."""
    from transformers import AutoProcessor

    from afnext.clip import prepare_clip

    monkeypatch.setattr(engine, "encode_batch_frames", batch_windows * 3000)  # whole windows per call
    clip_audio = noise(seconds, seed=5)
    processor = AutoProcessor.from_pretrained(tiny_dir)
    messages = [{"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": "Hi"}]}]
    inputs = processor(text=[processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)],
                       audio=[clip_audio])
    with torch.inference_mode():
        stock = engine.loaded.model.get_audio_features(
            inputs["input_features"], inputs["input_features_mask"], inputs["input_ids"]).pooler_output
        ours = engine.encode(prepare_clip(clip_audio, engine.loaded.mel_filters))
    tokens = {65.0: 1625, 0.5: 12, 5.0: 125, 29.99: 750, 30.0: 750, 31.0: 775}[seconds]
    assert ours.shape == stock.shape == (tokens, engine.loaded.model.config.text_config.hidden_size)
    torch.testing.assert_close(ours, stock, rtol=1e-4, atol=1e-5)


def test_bad_input_raises_at_the_call_not_at_the_first_event(engine, tmp_path):
    with pytest.raises(AudioError):
        Session(engine).ask("What?", tmp_path / "missing.wav")


def test_a_fork_branches_off_with_the_shared_cache_and_leaves_the_original_as_it_was(engine):
    """Regenerating an answer, or asking something else after the same turns: the fork's replies
    equal a session that took that branch from the start, and the original goes on unchanged."""
    clip = noise(6.0, seed=11)
    original = Session(engine)
    first, _ = run(original, "What is this?", clip)
    run(original, "And then?")
    fork = original.fork(2)  # the clip's turn and its answer
    assert fork.messages == original.messages[:2] and fork.cached_tokens > 6 * 25, "the clip's tokens come cached"
    assert original.fork(0).tokens == [] and original.fork(0).cached_tokens == 0
    branched, _ = run(fork, "Something else?")
    reference = Session(engine, use_cache=False)  # the same two turns, computed from scratch
    run(reference, "What is this?", clip)
    expected, _ = run(reference, "Something else?")
    assert branched.token_ids == expected.token_ids and branched.prompt_tokens == expected.prompt_tokens
    went_on, _ = run(original, "Last one.")  # the original's own cache was not touched
    run(reference := Session(engine, use_cache=False), "What is this?", clip)
    run(reference, "And then?")
    assert went_on.token_ids == run(reference, "Last one.")[0].token_ids
    assert first.token_ids  # replies were not empty: the comparisons prove something


def test_a_fork_cut_after_a_user_message_goes_on_as_a_fresh_session_would(engine):
    """A client resends the user turn with another reply (edited, or an audio reply sent back without
    text): the fork keeps the user turn but not the kept reply's header."""
    clip = noise(3.0, seed=5)
    original = Session(engine)
    run(original, "What is this?", clip)
    fork = original.fork(1)
    fork.extend("assistant", "A short note.")
    reference = Session(engine)
    reference.extend("user", "What is this?", clip)
    reference.extend("assistant", "A short note.")
    assert fork.tokens == reference.tokens
    assert run(fork, "And then?")[0].token_ids == run(reference, "And then?")[0].token_ids


def test_the_system_prompt_reaches_the_model(engine, tiny_dir):
    from transformers import AutoProcessor

    clip = noise(2.0, seed=9)
    session = Session(engine, system="Answer in one word.")
    reply, _ = run(session, "What is this?", clip)
    processor = AutoProcessor.from_pretrained(tiny_dir)
    messages = [{"role": "system", "content": "Answer in one word."},
                {"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": "What is this?"}]}]
    prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    expected = processor(text=[prompt], audio=[clip])["input_ids"][0].tolist()
    assert "Answer in one word." in prompt and session.tokens[:len(expected)] == expected
    assert reply.prompt_tokens == len(expected)


def test_a_reply_never_holds_an_audio_marker_so_it_can_always_be_prefilled_again(loaded):
    """A model that wants to say <sound> (random weights do, now and then) does not: put back into the
    conversation, the marker would be taken for an audio slot with no audio."""
    from afnext.engine import Engine
    from tests.web.scripted import ScriptedEngine

    engine = ScriptedEngine(loaded, script="<sound><|sound_bos|>")
    try:
        session = Session(engine)
        reply = [e for e in session.ask("Say it.", options=GenerationOptions(max_new_tokens=4)) if isinstance(e, TurnDone)][0].reply
        markers = {loaded.ids.sound, loaded.ids.sound_bos, loaded.ids.sound_eos}
        assert reply.token_ids and not markers.intersection(reply.token_ids)
        follow = [e for e in session.ask("Again?", options=GenerationOptions(max_new_tokens=2)) if isinstance(e, TurnDone)]
        assert follow, "the conversation goes on"
    finally:
        engine.close()
    plain = Engine(loaded)
    try:
        kept = Session(plain)
        kept.extend("user", "Say it.")
        with pytest.raises(ValueError, match="audio marker"):
            kept.extend_reply([loaded.ids.sound])  # a store written before this rule cannot sneak one in
    finally:
        plain.close()


def test_a_stream_read_with_wake_never_blocks_and_is_the_same_turn(engine):
    """`ask(..., wake=...)`: each read returns at once — PENDING while the engine has nothing new — and
    `wake` is called as the engine produces; between PENDINGs the events are exactly those of the
    blocking stream for the same turn, and the session ends the same."""
    from afnext.session import PENDING

    options = GenerationOptions(max_new_tokens=16, repetition_penalty=1.0)
    clip = noise(5.0, seed=3)
    blocking = Session(engine)
    expected = list(blocking.ask("What is this?", clip, options=options))
    woken = threading.Event()
    session, events, pending, slowest = Session(engine), [], 0, 0.0
    stream = session.ask("What is this?", clip, options=options, wake=woken.set)
    while True:
        t0 = time.perf_counter()
        event = next(stream, None)
        slowest = max(slowest, time.perf_counter() - t0)
        if event is None:
            break
        if event is PENDING:
            pending += 1
            assert woken.wait(10), "the engine had more for the stream and did not call wake"
            woken.clear()  # before the next read: a wake after it is not lost
        else:
            events.append(event)
    assert pending > 0, "the stream never had to wait: nothing shows it does not block"
    assert [(type(e), getattr(e, "text", None)) for e in events] == [(type(e), getattr(e, "text", None))
                                                                     for e in expected]
    assert events[-1].reply.token_ids == expected[-1].reply.token_ids and session.tokens == blocking.tokens
    assert slowest < 0.5, f"a read took {slowest:.3f} s: it blocked on the engine"


def test_a_queued_turn_read_with_wake_is_cancelled_at_its_next_read(engine, monkeypatch):
    """A cancel set while the turn waits in the queue takes it out at the stream's next read (no poll
    runs for a stream that is not blocked), and the session is as it was."""
    from afnext.session import PENDING

    monkeypatch.setattr(engine.scheduler, "max_batch", 1)  # one decoding turn fills the engine
    session, cancel = Session(engine), threading.Event()
    hog = Session(engine).ask("Long story.", options=GenerationOptions(max_new_tokens=2000, min_new_tokens=2000,
                                                                       repetition_penalty=1.0))
    busy = [hog]
    next(e for e in hog if isinstance(e, TextDelta))  # decoding: the next turn waits for its slot
    before = list(session.tokens)
    stream = session.ask("Hello?", options=OPTS, cancel=cancel, wake=lambda: None)
    assert next(stream) is PENDING and session.ahead is not None, "the turn should be waiting in the queue"
    cancel.set()
    t0 = time.perf_counter()
    rest = list(stream)
    assert time.perf_counter() - t0 < 0.05 and any(isinstance(e, Interrupted) for e in rest)
    assert session.wait(0) and session.tokens == before
    for stream in busy:
        stream.close()
