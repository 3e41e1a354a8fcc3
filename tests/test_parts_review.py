"""A review of recordings heard in parts: failures, cancellations and limits, each as a user meets them."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile

from afnext.audio import SAMPLE_RATE
from afnext.events import PartProgress
from afnext.parts import MAX_QUESTION_CHARS, PartedSession, PartOptions
from afnext.prompt import reply_tail
from afnext.sampling import GenerationOptions
from tests.conftest import noise
from tests.test_parts import QUICK, SHORT, turn
from tests.web.scripted import ScriptedEngine


class FailingEngine(ScriptedEngine):
    """A scripted engine whose step fails, while `fail` is set, once a reply has begun (its first tokens
    are with its reader): a fault on the device mid-answer, as any part may meet."""

    fail = False

    def _forward(self, decodes, prefill):
        if self.fail and any(len(r.generated) >= 3 for r in decodes):
            raise RuntimeError("the device failed mid-answer")
        return super()._forward(decodes, prefill)


def test_a_rebuilt_part_that_failed_after_it_began_answering_hears_its_clip_again(loaded, tmp_path):
    """A kept recording reopened (a restart): its next question brings every part up to the kept turns,
    with its clip. A part that failed after it began answering has its turn rolled back by the engine, clip
    encoding and all, so its session holds the clip unencoded again. It must hear it again with the next
    question; it was taken as heard (its clip's features let go), and every later question failed."""
    from afnext.journal import open_conversation
    from afnext.store import Store

    engine = FailingEngine(loaded, "A bell at 0:12. " * 5)
    path = tmp_path / "rec.wav"
    soundfile.write(path, (noise(100) * 32767).astype(np.int16), SAMPLE_RATE)
    store = Store(tmp_path / "store")
    store.create("recording", id="c1", model=loaded.name, audio=(path.read_bytes(), ".wav"))
    key = store.get("c1").audio

    def opened():
        parted = PartedSession(engine, str(store.audio_path(key)), options=QUICK)
        parted.journal, parted.kept = open_conversation(store, "c1", parted, model=loaded.name), key
        return parted

    try:
        first, _ = turn(opened().ask("Q1?", options=SHORT))
        assert first is not None
        rebuilt = opened()
        engine.fail = True
        with pytest.raises(RuntimeError, match="device failed"):
            turn(rebuilt.ask("Q2?", options=SHORT))
        engine.fail = False
        assert len(store.turns("c1")) == 2  # the failed turn counts nowhere
        again, _ = turn(rebuilt.ask("Q2 again?", options=SHORT))  # failed with every question before the fix
        assert again is not None and len(store.turns("c1")) == 4
        assert [len(p.session.messages) for p in rebuilt._parts] == [4] * len(rebuilt._parts)
    finally:
        engine.close()


@pytest.mark.parametrize(("question", "heard_in_parts"), [
    ("x" * (MAX_QUESTION_CHARS + 1), True), ("What is <sound> here?", True), ("What is <sound> here?", False)])
def test_a_question_the_recordings_tab_cannot_take_is_one_sentence_not_a_server_failure(engine, question,
                                                                                        heard_in_parts):
    """The tab tells the user what to fix for USER_ERRORS; anything else is "The server failed on that
    question (ValueError) … try again", which trying again never mends. A question over a parted
    recording's limit (16,000 characters, half the page's own) or spelling a control token was that."""
    from types import SimpleNamespace

    from afnext import split
    from app import recording_questions, recordings

    backend = SimpleNamespace(main=engine, think=engine)
    if heard_in_parts:
        audio = noise(100)
        places = tuple((p.start_s, p.end_s) for p in split.split_recording(audio, part_s=60.0))
        rec = recordings.Recording("long.wav", "", None, [], parts=places, source=audio)
    else:
        rec = recordings.Recording("short.wav", "", noise(2), [])
    with pytest.raises(recording_questions.USER_ERRORS) as refused:
        list(recording_questions.ask(rec, question, False, backend))
    assert "characters long" in str(refused.value) or "control tokens" in str(refused.value)
    assert rec.chat == []  # nothing asked


def cut_at(parted, question, stage, part, **kw):
    """Ask, and cut the question off (the stream closed, as a page going away does) at `stage` of `part`."""
    stream = parted.ask(question, options=SHORT, **kw)
    events = []
    for event in stream:
        events.append(event)
        if isinstance(event, PartProgress) and event.stage == stage and event.part == part:
            break
    stream.close()
    return events


def test_a_question_cut_off_at_part_k_counts_in_no_part_and_usage_counts_the_next_one_alone(loaded):
    slow = ScriptedEngine(loaded, "A bell at 0:12. " * 5, step_delay_s=0.01)
    try:
        parted = PartedSession(slow, noise(200), options=QUICK)
        cut_at(parted, "Q1?", "listening", 3)
        assert all(len(p.session.messages) == 0 for p in parted._parts)  # rolled back everywhere
        first, _ = turn(parted.ask("Q1 again?", options=SHORT))
        n = len(parted._parts)
        assert first is not None and n == 5 and [len(p.session.messages) for p in parted._parts] == [2] * n
        usage = first.parts
        assert usage.completion_tokens == 6 * n
        assert usage.cached_tokens == 0 and usage.prompt_tokens > 0

        cached = sum(p.session.cached_tokens for p in parted._parts)
        cut_at(parted, "Q2?", "answered", 2)  # some parts answered, the others cut
        assert [len(p.session.messages) for p in parted._parts] == [2] * n
        tokens = [len(p.session.tokens) for p in parted._parts]
        assert sum(p.session.cached_tokens for p in parted._parts) >= cached  # its prefill kept, never less
        cached = sum(p.session.cached_tokens for p in parted._parts)
        second, _ = turn(parted.ask("Q2 again?", options=SHORT))
        assert second is not None and [len(p.session.messages) for p in parted._parts] == [4] * n
        assert second.parts.cached_tokens == cached and second.parts.completion_tokens == 6 * n
        assert second.parts.prompt_tokens == sum(tokens) + sum(  # each part's history and the question
            len(p.session.tokens) - t - 6 - len(reply_tail(loaded)) for p, t in zip(parted._parts, tokens))
        assert second.timings.encode_s == 0
    finally:
        slow.close()


@pytest.mark.parametrize("how", ["refused", "mid-answer"])
def test_a_follow_up_that_fails_in_one_part_is_one_error_and_the_next_question_goes_on(loaded, how):
    from afnext.engine import ContextFullError

    engine = FailingEngine(loaded, "A bell at 0:12. " * 5)
    try:
        parted = PartedSession(engine, noise(100), options=QUICK)
        assert turn(parted.ask("Q1?", options=SHORT))[0] is not None
        merge = list(parted._merge.messages)
        if how == "refused":  # a part's session refuses the question (its context is full)
            second = parted._parts[1].session

            def full(*args, **kwargs):
                raise ContextFullError("This turn would bring the conversation over the model's context.")
            second.ask = full
            with pytest.raises(ContextFullError):
                turn(parted.ask("Q2?", options=SHORT))
            del second.ask
        else:
            engine.fail = True
            with pytest.raises(RuntimeError, match="device failed"):
                turn(parted.ask("Q2?", options=SHORT))
            engine.fail = False
        assert [len(p.session.messages) for p in parted._parts] == [2] * 3 and parted._merge.messages == merge
        windows = parted.encoded_windows
        reply, _ = turn(parted.ask("Q3?", options=SHORT))
        assert reply is not None and [len(p.session.messages) for p in parted._parts] == [4] * 3
        assert parted.encoded_windows == windows and reply.timings.encode_s == 0
    finally:
        engine.close()


def test_think_steps_at_a_parts_very_start_and_end_and_past_it_fall_inside_that_part(loaded):
    script = "<think>\nA bell at 0:00. A knock at 0:59. A cough from 0:20 to 0:50.\n</think>\nDone."
    engine = ScriptedEngine(loaded, script)
    try:
        parted = PartedSession(engine, noise(100), options=PartOptions(part_s=60.0, think_part_tokens=200))
        reply, events = turn(parted.ask("When?", think=True, options=GenerationOptions(max_new_tokens=200)))
    finally:
        engine.close()
    assert reply is not None and len(parted.parts) == 3
    for number, (start, end) in enumerate(parted.parts, 1):
        steps = [s for s in reply.steps if s.part == number]
        assert steps and all(start <= s.start <= end and (s.end is None or s.start <= s.end <= end) for s in steps)
        assert any(s.start == pytest.approx(start) for s in steps)  # "0:00" is where the part starts
    assert [s.start for s in reply.steps] == sorted(s.start for s in reply.steps)
    # A moment past the first part's 33 s (and not a time of a later part) is that part's end.
    knocks = [s.start for s in reply.steps if s.part == 1 and "knock" in s.text]
    assert knocks and knocks == [pytest.approx(parted.parts[0][1])] * len(knocks)


@pytest.mark.parametrize("seconds", [120.35, 120.85, 119.85 + 1 / SAMPLE_RATE])
def test_the_last_second_of_a_long_recording_of_unstated_length_is_heard(seconds):
    """With no stated length each part fills the limit; a last part up to its grace over the limit was
    trimmed as one clip is (`load_audio`), so the recording's last second was never heard and the page
    showed it that much shorter. Only a recording heard whole is trimmed; a later part is cut once more."""
    from afnext import split

    audio = noise(seconds)
    parts = list(split._parts(iter([audio[:100_000], audio[100_000:]]), None, 60.0))
    assert sum(p.audio.size for p in parts) == audio.size  # nothing lost at the end
    assert parts[-1].end_s == pytest.approx(audio.size / SAMPLE_RATE)
    assert all(p.duration_s <= 60.0 for p in parts) and parts[-1].duration_s >= split.LIMIT_GRACE_S
    assert [p.index for p in parts] == list(range(len(parts))) and parts[-1].parts == len(parts)
    assert all(a.end_s == pytest.approx(b.start_s) for a, b in zip(parts, parts[1:]))
