"""Recordings over 30 minutes: every part asked, answers merged, follow-ups without re-encoding."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import soundfile

from afnext.audio import SAMPLE_RATE, AudioError
from afnext.events import Interrupted, PartProgress, ReasoningDelta, TextDelta, ThinkStep, TurnDone
from afnext.conversation import ONE_RECORDING, Conversation
from afnext.parts import PartedSession, PartOptions
from afnext.sampling import GenerationOptions
from afnext.session import Session
from afnext.times import shift_times
from tests.conftest import noise
from tests.test_split import speech
from tests.web.scripted import ScriptedEngine

SCRIPT = "<think>\nA bell rings from 12.0s to 15.5s.\n</think>\nA bell rings at 0:12."
SHORT = GenerationOptions(max_new_tokens=6)
QUICK = PartOptions(part_s=60.0, part_tokens=6, think_part_tokens=6)  # 1-minute parts: the logic, in seconds


def turn(stream):
    events = list(stream)
    done = [e for e in events if isinstance(e, TurnDone)]
    return (done[0].reply if done else None), events


@pytest.fixture(scope="module")
def scripted(loaded):
    engine = ScriptedEngine(loaded, SCRIPT)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def long_wav(tmp_path_factory):
    """75 minutes of speech-like audio, as a 16-bit WAV (144 MB)."""
    path = tmp_path_factory.mktemp("long") / "meeting.wav"
    with soundfile.SoundFile(path, "w", SAMPLE_RATE, 1, "PCM_16") as out:
        for block in speech(75 * 60, [], block_s=60):
            out.write(block)
    return str(path)


def test_a_75_minute_recording_is_answered_over_every_part_and_followed_up_without_encoding_again(
        scripted, long_wav, monkeypatch):
    parted = PartedSession(scripted, long_wav)
    reply, events = turn(parted.ask("When does the bell ring?", think=True, options=GenerationOptions(max_new_tokens=120)))
    starts = [0.0, 1500.0, 3000.0]  # even parts of 25 minutes, cut within ±30 s of even
    assert len(parted.parts) == 3
    for (start, end), even in zip(parted.parts, starts):
        assert abs(start - even) <= 30 and end - start <= 1800
    progress = [(e.stage, e.part) for e in events if isinstance(e, PartProgress)]
    for part in (1, 2, 3):
        assert ("read", part) in progress and ("listening", part) in progress and ("answered", part) in progress
    assert progress[-1] == ("merging", 0)
    # Each part's steps (its reasoning's range, its answer's moment) are at the part's offset plus the
    # model's time in the part, and name their part.
    assert [(s.part, s.start, s.end) for s in reply.steps] == [  # in time order
        step for i, (start, _) in enumerate(parted.parts)
        for step in ((i + 1, pytest.approx(start + 12.0), pytest.approx(start + 15.5)),
                     (i + 1, pytest.approx(start + 12.0), None))]
    assert all(0 <= s.start <= 75 * 60 for s in reply.steps)
    assert reply.answer == "A bell rings at 0:12."  # the merge's answer is the turn's answer
    assert "Part 2 of 3" in reply.reasoning and "bell" in reply.reasoning
    assert [e.text for e in events if isinstance(e, TextDelta)] and all(e.turn == events[0].turn for e in events)
    windows = parted.encoded_windows
    assert windows == 150  # 75 minutes of 30 s windows, each prepared once

    # The follow-up: no clip is prepared or encoded again, each part prefills only the question.
    for encoder_call in ("encode_windows", "encoder_pass"):  # whole windows, or a window a few layers a step
        monkeypatch.setattr(scripted, encoder_call, lambda *a, **k: pytest.fail("a follow-up encoded audio again"))
    before = [p.session.cached_tokens for p in parted._parts]
    reply2, events2 = turn(parted.ask("And after that?", think=True, options=GenerationOptions(max_new_tokens=120)))
    assert reply2 is not None and parted.encoded_windows == windows
    assert not [e for e in events2 if isinstance(e, PartProgress) and e.stage == "read"]
    assert reply2.timings.encode_s == 0
    for part, cached in zip(parted._parts, before):
        assert part.session.cached_tokens - cached < 200  # the question and the reply, not 37,500 audio tokens
    assert reply2.timings.ttft_s < reply.timings.ttft_s / 3


def test_the_merge_hears_each_part_with_its_times_made_absolute(scripted, monkeypatch):
    asked = []
    real = Session.ask

    def spy(self, text="", audio=None, **kw):
        asked.append((text, audio is not None))
        return real(self, text, audio, **kw)

    monkeypatch.setattr(Session, "ask", spy)
    parted = PartedSession(scripted, noise(100), options=PartOptions(part_s=60.0, part_tokens=120))
    reply, _ = turn(parted.ask("When?", options=GenerationOptions(max_new_tokens=120)))
    firsts = [text for text, has_clip in asked if has_clip]
    assert len(firsts) == 3 and firsts[1].startswith("This clip is part 2 of 3 of a longer recording: it runs from 0:33 "
                                                     "to 1:06 of the whole.")
    merge = [text for text, has_clip in asked if not has_clip][-1]
    assert "Part 2 of 3 (0:33–1:06): A bell rings at 0:45." in merge  # 0:12 in a part from 0:33
    # A step's sentence speaks of the whole recording too, as its times do.
    assert [s.text for s in reply.steps if s.part == 2] == ["A bell rings from 0:45.3–0:48.8."]  # 12.0s in a part from 33.3 s
    assert merge.endswith("Question: When?\nAnswer it for the whole recording in one answer, from what the parts "
                          "found; give times as above.")


def test_closing_the_stream_stops_every_part_and_the_next_question_goes_on(loaded):
    slow = ScriptedEngine(loaded, SCRIPT * 20, step_delay_s=0.01)
    try:
        parted = PartedSession(slow, noise(200), options=PartOptions(part_s=60.0))
        stream = parted.ask("What happens?", options=GenerationOptions(max_new_tokens=400))
        for event in stream:
            if isinstance(event, PartProgress) and event.stage == "listening" and event.part == 2:
                break
        t0 = time.perf_counter()
        stream.close()
        assert time.perf_counter() - t0 < 2.0
        deadline = time.monotonic() + 5
        while (slow.scheduler.running() or slow.waiting) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not slow.scheduler.running() and not slow.waiting
        assert not [t for t in threading.enumerate() if t.name.startswith("afnext-part")]
        # The next question reads the parts it lacks; the ones heard are not encoded again.
        heard = [p.index for p in parted._parts if p.session.tokens]
        windows = parted.encoded_windows
        reply, events = turn(parted.ask("And now?", options=SHORT))
        assert reply is not None and len(parted.parts) == 5
        assert parted.encoded_windows == windows + 2 * (5 - len(heard))
    finally:
        slow.close()


def test_cancel_event_stops_a_turn_with_interrupted(scripted):
    cancel = threading.Event()
    parted = PartedSession(scripted, noise(100), options=QUICK)
    events = []
    for event in parted.ask("What?", options=SHORT, cancel=cancel):
        events.append(event)
        if isinstance(event, PartProgress) and event.stage == "listening":
            cancel.set()
    assert isinstance(events[-1], Interrupted) and not [e for e in events if isinstance(e, TurnDone)]


def test_one_after_another_gives_the_same_answers(scripted):
    together, _ = turn(PartedSession(scripted, noise(100), options=QUICK).ask("What?", options=SHORT))
    serial = PartedSession(scripted, noise(100), options=PartOptions(part_s=60.0, part_tokens=6, parallel=False))
    alone, _ = turn(serial.ask("What?", options=SHORT))
    assert alone.token_ids == together.token_ids and alone.reasoning == together.reasoning


def test_a_conversation_goes_on_in_parts_once_a_long_clip_comes(engine, tmp_path):
    path = tmp_path / "long.wav"
    soundfile.write(path, (noise(31 * 60) * 32767).astype(np.int16), SAMPLE_RATE)
    chat = Conversation(Session(engine))
    first, _ = turn(chat.ask("Hello", noise(3.0), options=SHORT))  # a short clip: a plain session
    assert chat.parted is None and first is not None
    second, events = turn(chat.ask("And this one?", str(path), options=SHORT))
    assert chat.parted is not None and len(chat.parted.parts) == 2
    assert any(isinstance(e, PartProgress) for e in events) and second is not None
    # Every part starts from the conversation so far; the conversation goes on as the merge.
    assert all(p.session.messages[:2] == chat.session.messages[:2] for p in chat.parted._parts)
    third, _ = turn(chat.ask("Go on.", options=SHORT))
    assert third is not None
    with pytest.raises(ValueError, match="heard in parts"):
        chat.ask("Another?", noise(2.0))
    assert ONE_RECORDING.startswith("This conversation is about a recording heard in parts")


def test_an_unreadable_long_file_is_one_sentence_and_the_conversation_is_as_before(engine, tmp_path):
    path = tmp_path / "bad.mp3"
    path.write_bytes(b"not audio at all" * 100)
    chat = Conversation(Session(engine))
    with pytest.raises(AudioError, match="not audio in a known format"):
        chat.ask("What?", str(path))
    assert chat.parted is None and not chat.session.messages


def test_a_file_that_states_no_length_is_decoded_once_to_be_heard(loaded, tmp_path, decodes):
    """`afnext ask`/`chat` on an MP3 with no length tag: under the limit it is decoded once, to be heard
    (it was decoded a first time only to learn it fits); over it, up to the limit and then by its parts."""
    import dataclasses

    from afnext.engine import Engine
    from tests.test_audio import untagged_mp3

    engine = Engine(dataclasses.replace(loaded, max_audio_s=60.0))
    try:
        chat = Conversation(Session(engine), QUICK)
        reply, _ = turn(chat.ask("What?", str(untagged_mp3(tmp_path / "short.mp3", 20)), options=SHORT))
        assert chat.parted is None and reply is not None
        assert decodes == [pytest.approx(20, abs=0.5)]
        decodes.clear()
        chat = Conversation(Session(engine), QUICK)
        reply, _ = turn(chat.ask("What?", str(untagged_mp3(tmp_path / "long.mp3", 70)), options=SHORT))
        assert chat.parted is not None and len(chat.parted.parts) == 2 and reply is not None
        assert len(decodes) == 2 and decodes[0] < 65 and decodes[1] == pytest.approx(70, abs=0.5)
    finally:
        engine.close()


def test_reasoning_names_every_part_and_answer_text_is_never_reasoning(scripted):
    reply, events = turn(PartedSession(scripted, noise(100), options=QUICK).ask("What?", options=SHORT))
    notes = "".join(e.text for e in events if isinstance(e, ReasoningDelta))
    assert all(f"Part {i} of 3" in notes for i in (1, 2, 3))
    assert all(isinstance(e, ThinkStep) and e.part for e in events if isinstance(e, ThinkStep))


def test_a_turn_cut_short_counts_in_no_part_so_a_rebuilt_conversation_goes_on_the_same(loaded, tmp_path):
    from afnext.journal import open_conversation
    from afnext.store import Store

    slow = ScriptedEngine(loaded, "A bell at 0:12. " * 5, step_delay_s=0.02)
    path = tmp_path / "rec.wav"
    soundfile.write(path, (noise(200) * 32767).astype(np.int16), SAMPLE_RATE)
    store = Store(tmp_path / "store")
    store.create("recording", id="c1", model=loaded.name, audio=(path.read_bytes(), ".wav"))
    key = store.get("c1").audio

    def opened():  # as the Recordings tab opens a kept recording (after a restart: a new one)
        parted = PartedSession(slow, str(store.audio_path(key)), options=QUICK)
        parted.journal, parted.kept = open_conversation(store, "c1", parted, model=loaded.name), key
        return parted

    def cut(parted, question, stage, part=None):
        cancel = threading.Event()
        for event in parted.ask(question, options=SHORT, cancel=cancel):
            if isinstance(event, PartProgress) and event.stage == stage and part in (None, event.part):
                cancel.set()

    try:
        live = opened()
        turn(live.ask("Q1?", options=SHORT))
        cut(live, "Q2?", "answered")  # some parts answered, the rest cut: no part keeps it
        assert len(store.turns("c1")) == 2
        rebuilt = opened()
        cut(rebuilt, "Q2 again?", "listening", part=1)  # cut while rebuilt parts hear their clips again
        turn(live.ask("Q3?", options=SHORT))
        live.journal = None  # the live one goes on beside the rebuilt one, which keeps Q3 in the store
        again = opened()
        turn(live.ask("Q4?", options=SHORT))
        turn(again.ask("Q4?", options=SHORT))
        assert [p.session.tokens for p in again._parts] == [p.session.tokens for p in live._parts]
        assert again._merge.tokens == live._merge.tokens
    finally:
        slow.close()


def test_parts_not_decoding_are_moved_out_when_memory_is_short_and_come_back_whole(loaded):
    """The engine's CacheKeeper treats parts like any sessions: with room for about two parts' caches,
    the others wait or move out (CPU memory, on a GPU), and a follow-up brings each back unchanged."""
    from afnext.engine import Engine
    from afnext.kvcache import cache_bytes

    roomy, tight = Engine(loaded), Engine(loaded)
    try:
        free = PartedSession(roomy, noise(200), options=QUICK)
        turn(free.ask("What?", options=SHORT))
        one_part = max(cache_bytes(p.session._cache) for p in free._parts)
        tight.keeper.budget_bytes = int(2.2 * one_part)
        short = PartedSession(tight, noise(200), options=QUICK)
        first, _ = turn(short.ask("What?", options=SHORT))
        assert any(tight.keeper.offloaded(p.session._cache) for p in short._parts)
        resident = sum(cache_bytes(p.session._cache) for p in short._parts if not tight.keeper.offloaded(p.session._cache))
        assert resident <= tight.keeper.budget_bytes
        follow = [turn(s.ask("And then?", options=SHORT))[0] for s in (free, short)]
        assert follow[0].token_ids == follow[1].token_ids and follow[0].reasoning == follow[1].reasoning
    finally:
        roomy.close()
        tight.close()


def test_no_more_than_max_reading_recordings_are_read_at_once(scripted, monkeypatch):
    from afnext import part_runs, split

    reading, most, lock = [0], [0], threading.Lock()
    real = split.split_recording

    def counted(*args, **kw):
        with lock:
            reading[0] += 1
            most[0] = max(most[0], reading[0])
        try:
            time.sleep(0.2)  # a slow decoder: the others arrive meanwhile
            yield from real(*args, **kw)
        finally:
            with lock:
                reading[0] -= 1

    monkeypatch.setattr(part_runs.split, "split_recording", counted)
    sessions = [PartedSession(scripted, noise(100), options=QUICK) for _ in range(6)]
    replies = []
    threads = [threading.Thread(target=lambda s=s: replies.append(turn(s.ask("What?", options=SHORT))[0]))
               for s in sessions]
    [t.start() for t in threads]
    [t.join(120) for t in threads]
    assert len(replies) == 6 and all(replies) and most[0] == part_runs.MAX_READING


def test_a_part_that_answers_in_whole_recording_times_is_not_shifted_twice(loaded):
    """The part's question names its place in the whole ("it runs from 0:33 to 1:06"), so a model may
    answer "at 0:45" meaning the whole recording's 0:45: past the part's own 33 s, inside its place in the
    whole, it can only be that (the time was clamped to the part's end and shifted to 1:06 before)."""
    absolute = ScriptedEngine(loaded, "<think>\nA bell rings at 0:45.\n</think>\nA bell at 0:45.")
    try:
        parted = PartedSession(absolute, noise(100), options=PartOptions(part_s=60.0, part_tokens=120))
        reply, events = turn(parted.ask("When?", think=True, options=GenerationOptions(max_new_tokens=120)))
    finally:
        absolute.close()
    start, end = parted.parts[1]
    assert start < 45.0 < end and end - start < 45.0
    assert {(s.start, s.text) for s in reply.steps if s.part == 2} == {(45.0, "A bell rings at 0:45."),
                                                                      (45.0, "A bell at 0:45.")}
    notes = "".join(e.text for e in events if isinstance(e, ReasoningDelta))  # what the merge hears
    assert "Part 2 of 3 (0:33–1:06): A bell rings at 0:45.\nA bell at 0:45." in notes


@pytest.mark.parametrize(
    ("text", "shifted"),
    [
        ("A bell at 1:10.", "A bell at 26:10."),  # the part's own time: shifted
        ("A bell at 26:10.", "A bell at 26:10."),  # already the whole's: kept
        ("From 26:10 to 26:20.", "From 26:10–26:20."),
        ("At 55:00.", "At 50:00."),  # past the part either way: its end, as before
        ("The clip is 10 seconds long.", "The clip is 10 seconds long."),  # a duration is no moment
    ],
)
def test_shift_times_tells_a_parts_own_times_from_the_wholes(text, shifted):
    assert shift_times(text, 1500.0, 1500.0) == shifted
