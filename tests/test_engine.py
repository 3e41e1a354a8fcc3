"""The engine's scheduler: batching changes no token, cancels never wait, short turns overtake ingests."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from afnext import encoder, scheduler
from afnext.clip import prepare_clip
from afnext.engine import Engine
from afnext.events import Interrupted, TextDelta, TurnDone
from afnext.sampling import GenerationOptions
from afnext.scheduler import INTERACTIVE_TOKENS
from afnext.session import Session
from tests.conftest import noise

LONG = GenerationOptions(max_new_tokens=40, min_new_tokens=40)  # fixed length: the replies overlap in time
SAMPLED = GenerationOptions(max_new_tokens=40, min_new_tokens=40, temperature=0.8, top_p=0.9, seed=5)
CONVERSATIONS = {  # name → (question, clip seconds, options)
    "long clip": ("What happens here?", 65.0, LONG),
    "voice": ("", 5.0, LONG),
    "text only": ("Tell me about the sea.", None, LONG),
    "sampled": ("Say something.", 2.0, SAMPLED),
    "joins mid-decode": ("And this?", 3.0, LONG),
    "cancelled": ("Count to a hundred.", 1.0, LONG),
}


@pytest.fixture
def fresh_engine(loaded, request):
    engine = Engine(loaded, kv=getattr(request, "param", "buffers"))
    yield engine
    engine.close()


def ask(session: Session, name: str, **kw):
    text, seconds, options = CONVERSATIONS[name]
    return session.ask(text, None if seconds is None else noise(seconds, seed=len(name)), options=options, **kw)


def solo(engine: Engine, name: str):
    """The conversation's reply when it is the only one in the engine."""
    session = Session(engine)
    if name == "joins mid-decode":
        _reply(ask(session, "voice"))
    return _reply(ask(session, name))


def _reply(stream):
    return [e for e in stream if isinstance(e, TurnDone)][0].reply


def _ids(stream) -> tuple[int, ...]:
    return _reply(stream).token_ids


def batch_sizes(engine: Engine, monkeypatch) -> list[int]:
    """Record how many requests each forward pass advanced."""
    sizes, real = [], engine.run_segments

    def counting(segments, embeds):
        sizes.append(len(segments))
        return real(segments, embeds)

    monkeypatch.setattr(engine, "run_segments", counting)
    return sizes


@pytest.mark.parametrize("fresh_engine", ["buffers", "paged"], indirect=True)
def test_batching_changes_no_token(fresh_engine, monkeypatch):
    """Greedy (and seeded sampled) ids of conversations decoded together — a 65 s clip, a 5 s clip,
    text only, one joining mid-decode, one cancelled mid-decode — equal each one's solo run (fp32),
    with the KV cache in per-session buffers or in the paged pool (whose decoding rows then attend in
    classes of similar length: the 65 s clip's apart from the voice turns', read in place, and the
    voice turns' gathered together)."""
    alone = {name: solo(fresh_engine, name) for name in CONVERSATIONS}
    sizes, classes = batch_sizes(fresh_engine, monkeypatch), []
    if fresh_engine.pool is not None:
        import afnext.engine

        real_plan = afnext.engine.plan_step
        monkeypatch.setattr(afnext.engine, "plan_step", lambda *a: classes.append((step := real_plan(*a)).classes) or step)
    together: dict[str, tuple[int, ...]] = {}
    sessions = {name: Session(fresh_engine) for name in CONVERSATIONS}
    list(ask(sessions["joins mid-decode"], "voice"))  # it has a turn behind it, as in its solo run
    joiner = threading.Thread(target=lambda: together.update(
        {"joins mid-decode": _ids(ask(sessions["joins mid-decode"], "joins mid-decode"))}))

    def run(name: str) -> None:
        stream, deltas = ask(sessions[name], name), 0
        for event in stream:
            deltas += isinstance(event, TextDelta)
            if name == "long clip" and deltas == 5 and not joiner.is_alive():
                joiner.start()  # a request arrives while the others are decoding
            if name == "cancelled" and deltas == 5:
                stream.close()
                break
            if isinstance(event, TurnDone):
                together[name] = event.reply.token_ids

    threads = [threading.Thread(target=run, args=(name,)) for name in CONVERSATIONS if name != "joins mid-decode"]
    for t in threads:
        t.start()
    for t in threads + [joiner]:
        t.join(120)
    for name, ids in together.items():
        assert ids == alone[name].token_ids, f"{name}: batched ids differ from its solo run"
    assert set(together) == set(CONVERSATIONS) - {"cancelled"}
    assert sessions["cancelled"].wait(5)
    tail = len(fresh_engine.loaded.ids.newline) + 1  # <|im_end|> "\n" close the cut reply
    partial = sessions["cancelled"].tokens[alone["cancelled"].prompt_tokens:-tail]
    assert 5 <= len(partial) < 40, "the cancelled reply stays in the conversation as far as it got"
    assert tuple(partial) == alone["cancelled"].token_ids[:len(partial)]
    assert max(sizes) >= 4, f"no step advanced several requests at once: {sorted(set(sizes))}"
    if fresh_engine.pool is not None:
        assert max(map(len, classes)) >= 2, "the decoding rows never split into length classes"
        kinds = {"view" if c.span else "gather" for step in classes for c in step}
        assert kinds == {"view", "gather"}, f"only {kinds} ran: rows alone read in place, voice rows gathered together"


def slow_steps(engine: Engine, monkeypatch, delay_s: float) -> list[tuple[float, int]]:
    """Every forward pass takes `delay_s` longer; returns (time, segments) per pass."""
    log, real = [], engine.run_segments

    def slow(segments, embeds):
        time.sleep(delay_s)
        log.append((time.perf_counter(), len(segments)))
        return real(segments, embeds)

    monkeypatch.setattr(engine, "run_segments", slow)
    return log


def test_cancelling_a_queued_turn_returns_at_once(fresh_engine, monkeypatch):
    slow_steps(fresh_engine, monkeypatch, 0.3)
    fresh_engine.scheduler.max_batch = 1  # one decoding request at a time: the second one queues
    busy, queued, cancel = Session(fresh_engine), Session(fresh_engine), threading.Event()
    first = ask(busy, "text only")
    next(e for e in first if isinstance(e, TextDelta))  # it is decoding, each step 0.3 s
    events: list = []
    waiter = threading.Thread(target=lambda: events.extend(queued.ask("Hello?", cancel=cancel, options=LONG)))
    waiter.start()
    deadline = time.monotonic() + 5
    while fresh_engine.waiting == 0 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert queued.ahead == 0, "its place in the queue is observable"
    t0 = time.perf_counter()
    cancel.set()
    waiter.join(5)
    took = time.perf_counter() - t0
    assert took <= 0.05, f"a queued turn's cancel took {took * 1000:.0f} ms"
    assert isinstance(events[-1], Interrupted) and not any(isinstance(e, TurnDone) for e in events)
    assert queued.wait(0) and queued.tokens == [], "nothing of the cancelled turn was kept"
    first.close()
    fresh_engine.scheduler.max_batch = 64
    assert _ids(queued.ask("Still there?", options=GenerationOptions(max_new_tokens=3)))


def test_a_short_turn_overtakes_a_long_prefill(fresh_engine, monkeypatch):
    """A 5 s voice turn asked while a 10-minute recording is being prefilled gets its first token
    after at most one of the long prefill's chunks (the one in flight) plus its own work."""
    recording = prepare_clip(noise(600.0), fresh_engine.loaded.mel_filters)
    work, real_forward, real_encode = [], fresh_engine.run_segments, fresh_engine.encode_windows

    def forward(segments, embeds):  # which session each prefill chunk belongs to
        work.extend(("prefill", id(s.cache)) for s in segments if s.length > 1)
        return real_forward(segments, embeds)

    def encode(windows):  # whose windows each encoder call runs
        work.extend(("encode", "long" if clip is recording else "voice") for clip in dict.fromkeys(c for c, _ in windows))
        return real_encode(windows)

    submitted, real_submit = [], fresh_engine.submit

    def submit(request):  # where the work log stands when a turn reaches the engine (its clip is ready)
        submitted.append(len(work))
        real_submit(request)

    monkeypatch.setattr(fresh_engine, "run_segments", forward)
    monkeypatch.setattr(fresh_engine, "encode_windows", encode)
    monkeypatch.setattr(fresh_engine, "submit", submit)
    long_session, voice = Session(fresh_engine), Session(fresh_engine)
    long_turn = threading.Thread(target=lambda: list(long_session.ask(
        "Summarise it.", recording, options=GenerationOptions(max_new_tokens=2))))
    long_turn.start()
    deadline = time.monotonic() + 60
    while not any(kind == "prefill" for kind, _ in work) and time.monotonic() < deadline:
        time.sleep(0.001)  # the recording is encoded and its prefill has begun
    long_cache = work[-1][1]
    first = next(e for e in voice.ask(audio=noise(5.0, seed=3), options=GenerationOptions(max_new_tokens=2))
                 if isinstance(e, TextDelta))
    after = work[submitted[-1]:]
    long_turn.join(120)
    assert first.text is not None
    long_work = {("encode", "long"), ("prefill", long_cache)}
    ours = [i for i, w in enumerate(after) if w not in long_work]
    overtaken = [w for w in after[:ours[-1]] if w in long_work] if ours else []
    assert len(overtaken) <= 1, f"the long prefill ran {len(overtaken)} units before the voice turn's first token"
    chunks = sum(1 for kind, cache in work if kind == "prefill" and cache == long_cache)
    assert chunks >= 10, "the recording must be prefilled in chunks for this to mean anything"


def test_an_interactive_turn_takes_the_whole_prefill_budget_and_a_long_one_its_chunk(loaded, monkeypatch):
    """The chunk bounds what a long prefill delays others by; a short question longer than a chunk
    is prefilled in one step (with the step's whole budget), not a chunk at a time behind nobody."""
    engine = Engine(loaded, prefill_chunk_tokens=64, prefill_step_tokens=INTERACTIVE_TOKENS)
    try:
        prefilled = []
        real = engine.run_segments

        def forward(segments, embeds):
            prefilled.extend(s.length for s in segments if s.length > 1)
            return real(segments, embeds)

        monkeypatch.setattr(engine, "run_segments", forward)
        one = GenerationOptions(max_new_tokens=1)
        short = " ".join(["word"] * 300)  # some 1,000 tokens: interactive, many chunks' worth
        _reply(Session(engine).ask(short, options=one))
        assert len(prefilled) == 1 and prefilled[0] > 64, f"the short question's prefill steps: {prefilled}"
        prefilled.clear()
        long = " ".join(["word"] * (INTERACTIVE_TOKENS // 2))  # some 3,000 tokens: not interactive
        _reply(Session(engine).ask(long, options=one))
        assert max(prefilled) == 64 and len(prefilled) > INTERACTIVE_TOKENS // 64, f"the long one's: {prefilled}"
    finally:
        engine.close()


def test_a_long_prefill_goes_on_while_voice_turns_keep_coming(loaded, monkeypatch):
    """Twelve short questions queued behind a long prefill, each taking a few steps of a small step
    budget: every step has interactive work, and before planner.PASSED_OVER_MAX the long prefill
    waited for all of them. Now it advances a chunk every few steps meanwhile, and every reply is
    the one it gets alone."""
    monkeypatch.setattr(scheduler, "INTERACTIVE_TOKENS", 200)  # a long prefill of a few hundred tokens
    engine = Engine(loaded, prefill_chunk_tokens=16, prefill_step_tokens=16)
    try:
        one = GenerationOptions(max_new_tokens=1)
        questions = [f"Question {i}: what is the weather like on the coast today?" for i in range(12)]
        alone = [_ids(Session(engine).ask(q, options=one)) for q in questions]
        steps, real_forward, real_plan, hold = [], engine.run_segments, engine._plan, threading.Event()

        def forward(segments, embeds):  # the caches each step prefilled into
            steps.append([id(s.cache) for s in segments if s.length > 1])
            if len(steps) == 1:
                hold.set()
            return real_forward(segments, embeds)

        def plan():  # the questions are all queued before the long prefill's second step
            deadline = time.monotonic() + 30
            while hold.is_set() and engine.waiting < len(questions) and time.monotonic() < deadline:
                time.sleep(0.005)
            hold.clear()
            return real_plan()

        monkeypatch.setattr(engine, "run_segments", forward)
        monkeypatch.setattr(engine, "_plan", plan)
        long_session, got = Session(engine), {}
        long_text = " ".join(["word"] * 200)  # some 300 tokens: not interactive here
        long_turn = threading.Thread(target=lambda: got.update(long=_ids(long_session.ask(long_text, options=one))))
        long_turn.start()
        deadline = time.monotonic() + 30
        while not steps and time.monotonic() < deadline:
            time.sleep(0.001)
        long_cache = steps[0][0]
        threads = [threading.Thread(target=lambda i=i: got.update({i: _ids(Session(engine).ask(questions[i], options=one))}))
                   for i in range(len(questions))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        last_voice = max(i for i, caches in enumerate(steps) if any(c != long_cache for c in caches))
        meanwhile = sum(long_cache in caches for caches in steps[1:last_voice])
        long_turn.join(120)
        assert [got[i] for i in range(len(questions))] == alone
        assert len(got["long"]) == 1
        assert last_voice > 4 * 4, f"the questions took {last_voice} steps: too few to starve anything"
        # every fifth step while it lasts (it may finish before the questions do): starved, it ran in none
        assert meanwhile >= 3, f"the long prefill ran in {meanwhile} of the {last_voice} voice steps"
    finally:
        engine.close()


def test_a_turn_waiting_for_kv_memory_lets_the_started_ingest_go_on(loaded):
    """When the KV budget holds only the running ingest, a newcomer waits and the ingest is not
    stalled by it (found in review: the prefill slot was given to the one that could not start)."""
    from afnext.kvcache import CacheKeeper

    engine = Engine(loaded, prefill_chunk_tokens=128)
    try:
        text = " ".join(["word"] * 1500)
        size = len(loaded.tokenizer.encode(text)) + 300
        engine.keeper = CacheKeeper(loaded.device, budget_bytes=size * engine.kv_bytes_per_token)
        fixed = GenerationOptions(max_new_tokens=2, min_new_tokens=2)
        long, short, done = Session(engine), Session(engine), {}
        ingest = threading.Thread(target=lambda: done.update(long=_ids(long.ask(text, options=fixed))))
        ingest.start()
        while not engine.scheduler.prefilling:
            time.sleep(0.001)
        done["short"] = _ids(short.ask("hi", options=fixed))
        ingest.join(60)
        assert set(done) == {"long", "short"} and all(len(ids) == 2 for ids in done.values())
    finally:
        engine.close()


def test_a_failing_encoder_fails_only_its_own_turn(fresh_engine, monkeypatch):
    def broken(windows):
        raise RuntimeError("CUDA out of memory (simulated) while encoding")

    chat, audio, got = Session(fresh_engine), Session(fresh_engine), {}
    reader = threading.Thread(target=lambda: got.update(reply=_reply(chat.ask("Tell me about the sea.", options=LONG))))
    reader.start()
    while not fresh_engine.scheduler.decoding:
        time.sleep(0.001)
    monkeypatch.setattr(fresh_engine, "encode_windows", broken)
    with pytest.raises(RuntimeError, match="simulated"):
        list(audio.ask("What is this?", noise(2.0), options=LONG))
    reader.join(60)
    assert len(got["reply"].token_ids) == 40, "the decoding turn of another session went on"
    assert audio.wait(1) and audio.tokens == [], "the failed turn left nothing behind"


def test_a_closed_engine_refuses_new_turns_and_the_session_stays_usable(loaded):
    engine = Engine(loaded)
    session = Session(engine)
    engine.close()
    with pytest.raises(RuntimeError, match="closed"):
        list(session.ask("Hello?"))
    assert session.wait(1), "a turn that never began does not hold the session"


def test_voice_turns_arriving_together_share_encoder_calls_and_prefill_steps(fresh_engine, monkeypatch):
    """Four 5 s voice turns asked while the engine is busy start in one step: their clips go through
    the encoder in one call, each running 6 s of frames, not 30 (encoder.py), and their prompts are
    prefilled together in that step and the next; each reply equals its solo run."""
    clips = [noise(5.0, seed=20 + i) for i in range(4)]
    alone = [_ids(Session(fresh_engine).ask(audio=clip, options=LONG)) for clip in clips]
    calls, real_encode = [], fresh_engine.encode_windows

    def encode(windows):
        calls.append([encoder.run_frames(clip.frames[index]) for clip, index in windows])
        return real_encode(windows)

    monkeypatch.setattr(fresh_engine, "encode_windows", encode)
    prefills, real_forward, real_plan, hold = [], fresh_engine.run_segments, fresh_engine._plan, threading.Event()

    def forward(segments, embeds):
        prefills.append(sum(s.length > 1 for s in segments))
        return real_forward(segments, embeds)

    def plan():  # while the four arrive the busy turn decodes alone; then they are planned together
        deadline = time.monotonic() + 30
        while hold.is_set() and fresh_engine.waiting < 4 and time.monotonic() < deadline:
            time.sleep(0.005)
        hold.clear()
        return real_plan()

    monkeypatch.setattr(fresh_engine, "run_segments", forward)
    monkeypatch.setattr(fresh_engine, "_plan", plan)
    busy = ask(Session(fresh_engine), "text only")
    next(e for e in busy if isinstance(e, TextDelta))
    hold.set()
    got: dict[int, tuple[int, ...]] = {}
    threads = [threading.Thread(target=lambda i=i: got.update(
        {i: _ids(Session(fresh_engine).ask(audio=clips[i], options=LONG))})) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    busy.close()
    assert [got[i] for i in range(4)] == alone, "a reply of a shared step differs from its solo run"
    assert calls == [[600] * 4], f"encoder calls (frames run per window): {calls}"
    assert max(prefills) >= 3, f"no step prefilled several turns: {prefills}"


@pytest.fixture
def three_layer_encoder(loaded):
    """The tiny checkpoint's audio tower with three layers (copies of its one), so a window can go
    through it a layer at a time."""
    import copy

    tower = loaded.model.model.audio_tower
    one = tower.layers
    tower.layers = torch.nn.ModuleList(copy.deepcopy(one[0]) for _ in range(3))
    yield loaded
    tower.layers = one


def test_a_long_ingest_goes_through_the_encoder_a_few_layers_a_step_and_gets_the_same_reply(three_layer_encoder):
    """A 90 s recording (2,250 audio tokens: not an interactive turn) on an engine whose ingest share
    is half a window: each 30 s window takes its layers over several steps (the convolutions once,
    one layer a step here), and the reply equals the one from whole windows."""
    loaded, options = three_layer_encoder, GenerationOptions(max_new_tokens=6)
    recording = noise(90.0, seed=9)
    whole = Engine(loaded, encode_chunk_frames=3000)
    try:
        expected = _ids(Session(whole).ask("Summarise it.", recording, options=options))
    finally:
        whole.close()
    staged = Engine(loaded, encode_chunk_frames=1500)
    advances, real_pass = [], staged.encoder_pass

    def encoder_pass(windows):
        run = real_pass(windows)
        real_advance = run.advance
        run.advance = lambda layers: (advances.append((id(run), layers)), real_advance(layers))
        return run

    staged.encoder_pass = encoder_pass
    try:
        got = _ids(Session(staged).ask("Summarise it.", recording, options=options))
    finally:
        staged.close()
    assert got == expected
    assert len({run for run, _ in advances}) == 3 and [layers for _, layers in advances] == [1] * 9, advances


def test_an_encoder_pass_run_in_parts_equals_one_run_whole(three_layer_encoder):
    enc, loaded = encoder, three_layer_encoder
    clip = prepare_clip(noise(40.0, seed=4), loaded.mel_filters)
    windows = [(clip, 0), (clip, 1)]
    with torch.inference_mode():
        whole = enc.encode_windows(loaded.model, windows, loaded.device, loaded.dtype)
        run = enc.EncoderPass(loaded.model, windows, loaded.device, loaded.dtype)
        for layers in (1, 2):
            run.advance(layers)
        parts = run.finish()
    assert run.layers_left == 0 and all(a.equal(b) for a, b in zip(parts, whole))
