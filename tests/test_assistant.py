"""The voice loop: an utterance becomes a turn that is answered in text and speech; barge-in."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

from afnext.assistant import Assistant, AssistantOptions, Stamped, StateChanged, UserTurn, VoiceTurnDone
from afnext.audio import SAMPLE_RATE, to_mono_16k
from afnext.sampling import GenerationOptions
from afnext.events import AudioChunk, Interrupted, ReasoningDelta, TextDelta
from afnext.session import Session
from afnext.vad import SpeechStarted

CHUNK = 320  # 20 ms microphone blocks


def speech(text: str) -> np.ndarray:
    from afnext.tts.espeak import synthesize

    rate, samples = synthesize(text)
    return to_mono_16k(samples, rate)


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * SAMPLE_RATE), np.float32)


class Collector:
    """Reads the assistant's events on a thread, as a shell would."""

    def __init__(self, assistant: Assistant) -> None:
        self.events: list = []
        self.thread = threading.Thread(target=lambda: self.events.extend(assistant.events()), daemon=True)
        self.thread.start()

    def wait_for(self, kind, timeout: float = 60.0, count: int = 1) -> None:
        deadline = time.monotonic() + timeout
        while sum(self.matches(kind)) < count:
            assert time.monotonic() < deadline, f"no {kind} within {timeout} s: {self.events}"
            time.sleep(0.01)

    def matches(self, kind):
        return [isinstance(e.event if isinstance(e, Stamped) else e, kind) for e in list(self.events)]


def push(assistant: Assistant, audio: np.ndarray) -> None:
    for i in range(0, len(audio), CHUNK):
        assistant.push(audio[i:i + CHUNK], SAMPLE_RATE)


@pytest.fixture
def espeak():
    from afnext.tts import load_synthesizer

    return load_synthesizer("espeak")


def test_an_utterance_is_answered_in_text_and_speech(engine, espeak):
    options = AssistantOptions(generation=GenerationOptions(max_new_tokens=16, min_new_tokens=16))
    assistant = Assistant(Session(engine), espeak, options)
    seen = Collector(assistant)
    push(assistant, np.concatenate([silence(0.5), speech("What time is it in Paris?"), silence(1.0)]))
    assistant.wait()
    seen.wait_for(VoiceTurnDone)
    assistant.close()
    seen.thread.join(5)
    kinds = [type(e.event if isinstance(e, Stamped) else e).__name__ for e in seen.events]
    assert kinds.index("SpeechStarted") < kinds.index("UserTurn") < kinds.index("TextDelta") < kinds.index("VoiceTurnDone")
    assert "AudioChunk" in kinds
    done = next(e for e in seen.events if isinstance(e, VoiceTurnDone))
    assert 0.56 <= done.timings.endpoint_s <= 0.64
    assert done.timings.ttft_s is not None and done.timings.first_audio_s >= done.timings.ttft_s
    assert len(done.reply.token_ids) == 16 and not done.reply.interrupted
    turn = next(e for e in seen.events if isinstance(e, UserTurn))
    # The pre-roll, the speech, and the whole pause up to the decision (no soft ending is cut off).
    assert abs(len(turn.audio) / SAMPLE_RATE - (turn.t - turn.start + 0.3)) < 0.15
    states = [e.state for e in seen.events if isinstance(e, StateChanged)]
    assert states[:2] == ["thinking", "speaking"]


def slow_steps(engine, monkeypatch, delay_s: float = 0.03) -> list[float]:
    """Make each decoding step take `delay_s`, so a reply is still being generated when the user
    barges in; returns the list of step times."""
    times: list[float] = []
    real_step = engine.run_segments

    def step(segments, embeds):
        times.append(time.perf_counter())
        time.sleep(delay_s)
        return real_step(segments, embeds)

    monkeypatch.setattr(engine, "run_segments", step)
    return times


def test_barge_in_cancels_generation_and_speech(engine, espeak, monkeypatch):
    slow_steps(engine, monkeypatch)
    options = AssistantOptions(generation=GenerationOptions(max_new_tokens=200, min_new_tokens=200))
    assistant = Assistant(Session(engine), espeak, options)
    seen = Collector(assistant)
    push(assistant, np.concatenate([speech("Tell me a long story about the sea."), silence(0.8)]))
    seen.wait_for(AudioChunk)  # the reply is being spoken
    push(assistant, np.concatenate([speech("Stop, wait a moment."), silence(1.0)]))
    assistant.wait()
    seen.wait_for(VoiceTurnDone, count=2)
    assistant.close()
    seen.thread.join(5)

    assert seen.matches(Interrupted).count(True) == 1
    events = [e.event if isinstance(e, Stamped) else e for e in seen.events]
    cut = next(i for i, e in enumerate(events) if isinstance(e, Interrupted))
    second_turn = next(i for i, e in enumerate(events) if isinstance(e, UserTurn) and i > cut)
    assert not any(isinstance(e, AudioChunk) for e in events[cut:second_turn]), "reply audio after the interruption"
    first, second = [e for e in events if isinstance(e, VoiceTurnDone)]
    assert first.reply.interrupted and len(first.reply.token_ids) < 200
    assert not second.reply.interrupted and len(second.reply.token_ids) == 200
    users = [m for m in assistant.session.messages if m["role"] == "user"]
    assert len(users) == 2 and all(m["content"][0]["type"] == "audio" for m in users)


def test_turn_one_stops_within_one_step_of_the_barge_in(engine, espeak, monkeypatch):
    steps = slow_steps(engine, monkeypatch)
    options = AssistantOptions(generation=GenerationOptions(max_new_tokens=200, min_new_tokens=200))
    assistant = Assistant(Session(engine), espeak, options)
    seen = Collector(assistant)
    push(assistant, np.concatenate([speech("Tell me a long story."), silence(0.8)]))
    seen.wait_for(AudioChunk)
    barge_in = time.perf_counter()
    push(assistant, speech("Stop."))  # confirmed after 250 ms of speech: cancel, join the turn
    after = [t for t in steps if t > barge_in]
    assistant.close()
    seen.thread.join(5)
    assert seen.matches(Interrupted).count(True) == 1
    assert len(after) <= 1 + 1  # the step in flight when the speech was confirmed, and at most one more


def test_half_duplex_ignores_speech_while_speaking(engine, espeak, monkeypatch):
    slow_steps(engine, monkeypatch, delay_s=0.01)
    options = AssistantOptions(half_duplex=True, generation=GenerationOptions(max_new_tokens=40, min_new_tokens=40))
    assistant = Assistant(Session(engine), espeak, options)
    seen = Collector(assistant)
    push(assistant, np.concatenate([speech("Tell me a story."), silence(0.8)]))
    seen.wait_for(AudioChunk)
    push(assistant, np.concatenate([speech("Stop, wait a moment."), silence(1.0)]))
    assistant.wait()
    assistant.close()
    seen.thread.join(5)
    assert not any(seen.matches(Interrupted))
    assert seen.matches(SpeechStarted).count(True) == 1
    done = [e for e in seen.events if isinstance(e, VoiceTurnDone)]
    assert len(done) == 1 and not done[0].reply.interrupted


def test_speech_over_an_uninterruptible_reply_is_heard_and_the_reply_runs_on(engine, espeak, monkeypatch):
    """As the Realtime server runs it with interrupt_response false: the caller answers (answer off).
    What the user says while the reply is spoken neither cuts the reply off nor is lost: it is reported
    as an utterance, for the caller to answer once the reply is done."""
    slow_steps(engine, monkeypatch, delay_s=0.01)
    options = AssistantOptions(uninterruptible=True, answer=False,
                               generation=GenerationOptions(max_new_tokens=60, min_new_tokens=60))
    assistant = Assistant(Session(engine), espeak, options)
    seen = Collector(assistant)
    assistant.respond()  # a greeting
    seen.wait_for(AudioChunk)  # being spoken
    push(assistant, np.concatenate([speech("Stop, wait a moment."), silence(1.0)]))
    assistant.wait()
    seen.wait_for(VoiceTurnDone)
    seen.wait_for(UserTurn)  # what the user said (the greeting was a ReplyAsked)
    assistant.close()
    seen.thread.join(5)
    assert not any(seen.matches(Interrupted)), "speech over the reply cut it off"
    heard = [e for e in (x.event if isinstance(x, Stamped) else x for x in seen.events)
             if isinstance(e, UserTurn) and not e.answered]
    assert len(heard) == 1 and len(heard[0].audio) > 0.5 * SAMPLE_RATE, "what was said over the reply was lost"
    (done,) = [e for e in seen.events if isinstance(e, VoiceTurnDone)]
    assert not done.reply.interrupted and len(done.reply.token_ids) == 60


def test_reasoning_is_shown_but_never_spoken(engine, monkeypatch):
    """A synthesizer that records its text: only answer text reaches it."""
    from afnext.tts.chunker import SpeechChunker

    spoken: list[str] = []

    class Recorder:
        sample_rate = 16000

        def stream(self, text, cancel=None):
            spoken.append(text)
            yield AudioChunk(16000, np.zeros(160, np.float32))

    def scripted(self, text="", audio=None, **kw):
        yield ReasoningDelta("At 1.5s the user asks about the weather. ")
        yield TextDelta("It is sunny today, with a light breeze.")

    monkeypatch.setattr(Session, "ask", scripted)
    assistant = Assistant(Session(engine), Recorder())
    seen = Collector(assistant)
    push(assistant, np.concatenate([speech("How is the weather?"), silence(0.8)]))
    assistant.wait()
    assistant.close()
    seen.thread.join(5)
    assert "".join(spoken).replace(" ", "") == "It is sunny today, with a light breeze.".replace(" ", "")
    assert any(isinstance(e, Stamped) and isinstance(e.event, ReasoningDelta) for e in seen.events)
    with pytest.raises(TypeError):
        SpeechChunker().feed(ReasoningDelta("never spoken"))


def test_no_reply_audio_after_interruption_even_from_a_synthesizer_that_ignores_cancel(engine):
    class Stubborn:  # a third-party engine that keeps yielding after cancel
        sample_rate = 16000

        def stream(self, text, cancel=None):
            for _ in range(50):
                time.sleep(0.02)
                yield AudioChunk(16000, np.full(320, 0.1, np.float32))

    options = AssistantOptions(generation=GenerationOptions(max_new_tokens=8, min_new_tokens=8))
    assistant = Assistant(Session(engine), Stubborn(), options)
    seen = Collector(assistant)
    push(assistant, np.concatenate([speech("Tell me a story."), silence(0.8)]))
    seen.wait_for(AudioChunk)
    push(assistant, speech("Stop."))
    time.sleep(0.3)  # the stubborn stream goes on yielding; none of it may get out
    assistant.close()
    seen.thread.join(5)
    events = [e.event if isinstance(e, Stamped) else e for e in seen.events]
    cut = next(i for i, e in enumerate(events) if isinstance(e, Interrupted))
    assert not any(isinstance(e, AudioChunk) for e in events[cut:])


def test_state_returns_to_listening_once_the_reply_has_played(engine, espeak):
    options = AssistantOptions(generation=GenerationOptions(max_new_tokens=4, min_new_tokens=4))
    assistant = Assistant(Session(engine), espeak, options)
    seen = Collector(assistant)
    push(assistant, np.concatenate([speech("Hello there."), silence(0.8)]))
    assistant.wait()
    push(assistant, silence(12.0))  # long enough for any 4-token reply to have been heard
    assistant.close()
    seen.thread.join(5)
    states = [e.state for e in seen.events if isinstance(e, StateChanged)]
    assert states == ["thinking", "speaking", "listening"]


def test_text_never_waits_for_a_slow_voice(engine, monkeypatch):
    """A synthesizer taking 1 s per piece: the answer's text still reaches the shell as it is
    generated (here all at once), and every piece is spoken afterwards, in order."""
    spoken: list[str] = []

    class Slow:
        sample_rate = 16000

        def stream(self, text, cancel=None):
            time.sleep(1.0)
            spoken.append(text)
            yield AudioChunk(16000, np.zeros(160, np.float32))

    sentences = ["It is sunny today.", " Tomorrow it will rain,", " and the weekend looks cold.", " Take a coat."]

    def scripted(self, text="", audio=None, **kw):
        for sentence in sentences:
            yield TextDelta(sentence)

    monkeypatch.setattr(Session, "ask", scripted)
    assistant = Assistant(Session(engine), Slow())
    seen = Collector(assistant)
    assistant.say(None, "What is the weather?")
    seen.wait_for(TextDelta, count=len(sentences), timeout=0.9)  # before the voice's first piece is done
    seen.wait_for(VoiceTurnDone, timeout=30)
    assistant.close()
    seen.thread.join(5)
    assert "".join(spoken).replace(" ", "") == "".join(sentences).replace(" ", "")
    events = [e.event if isinstance(e, Stamped) else e for e in seen.events]
    last_text = max(i for i, e in enumerate(events) if isinstance(e, TextDelta))
    first_audio = next(i for i, e in enumerate(events) if isinstance(e, AudioChunk))
    done = next(i for i, e in enumerate(events) if isinstance(e, VoiceTurnDone))
    last_audio = max(i for i, e in enumerate(events) if isinstance(e, AudioChunk))
    assert last_text < first_audio and last_audio < done, "the turn ends once its speech is out"


def test_a_voice_that_fails_says_so_once_and_the_text_goes_on(engine, monkeypatch):
    from afnext.events import Error

    class Broken:
        sample_rate = 16000

        def stream(self, text, cancel=None):
            raise RuntimeError("the voice model is gone")
            yield

    def scripted(self, text="", audio=None, **kw):
        yield TextDelta("First sentence here. ")
        yield TextDelta("Second sentence here.")

    monkeypatch.setattr(Session, "ask", scripted)
    assistant = Assistant(Session(engine), Broken())
    seen = Collector(assistant)
    assistant.say(None, "Hello?")
    seen.wait_for(VoiceTurnDone, timeout=30)
    assistant.close()
    seen.thread.join(5)
    events = [e.event if isinstance(e, Stamped) else e for e in seen.events]
    assert sum(isinstance(e, Error) for e in events) == 1 and "could not be spoken" in next(
        e.message for e in events if isinstance(e, Error))
    assert sum(isinstance(e, TextDelta) for e in events) == 2


class Scripted:
    """A session whose every turn yields `deltas`, `delay_s` apart, and stops at its cancel."""

    def __init__(self, deltas: list, delay_s: float = 0.0) -> None:
        self.deltas, self.delay_s = deltas, delay_s
        self.asked: list = []  # (text, seconds of audio, cancel) per turn

    def ask(self, text="", audio=None, *, cancel=None, **kw):
        self.asked.append((text, 0.0 if audio is None else len(audio) / SAMPLE_RATE, cancel))
        for delta in self.deltas:
            if cancel is not None and cancel.is_set():
                return
            time.sleep(self.delay_s)
            yield delta


class Quiet:
    """A synthesizer of `seconds` of low noise per piece."""

    sample_rate = 16000

    def __init__(self, seconds: float = 0.01) -> None:
        self.seconds = seconds

    def stream(self, text, cancel=None):
        yield AudioChunk(16000, np.full(int(self.seconds * 16000), 0.01, np.float32))


def test_no_text_after_interrupted_when_the_barge_in_lands_between_check_and_emit(monkeypatch):
    """The turn thread has found its turn current and is about to emit a word when a barge-in comes
    from the feeding thread: the word goes out before Interrupted or not at all, never after."""
    assistant = Assistant(Scripted([TextDelta("One. "), TextDelta("Two. "), TextDelta("Three.")]), Quiet())
    seen = Collector(assistant)
    real_stale, fired = Assistant._stale, []

    def stale(self, turn):
        current = real_stale(self, turn)
        if threading.current_thread().name == "afnext-voice-turn" and turn.first_text and not fired:
            fired.append(True)
            barge_in = threading.Thread(target=self.interrupt)  # the feeding thread, just now
            barge_in.start()
            barge_in.join(0.5)  # done, or waiting for the turn thread's lock
        return current

    monkeypatch.setattr(Assistant, "_stale", stale)
    assistant.say(None, "Count to three.")
    seen.wait_for(VoiceTurnDone, timeout=10)
    assistant.close()
    seen.thread.join(5)
    events = [e.event if isinstance(e, Stamped) else e for e in seen.events]
    cut = next(i for i, e in enumerate(events) if isinstance(e, Interrupted))
    assert fired and not any(isinstance(e, (TextDelta, AudioChunk)) for e in events[cut:]), events


def test_half_duplex_hears_the_user_while_the_answer_is_thought_of():
    """Half duplex mutes the microphone against the reply's echo, so only while reply audio plays:
    the rest of a sentence said while the model is still on its first token is heard and answered."""
    session = Scripted([TextDelta("Sure.")], delay_s=2.0)  # 2 s to the first token
    assistant = Assistant(session, Quiet(), AssistantOptions(half_duplex=True))
    seen = Collector(assistant)
    push(assistant, np.concatenate([silence(0.3), speech("I would like to order"), silence(0.8)]))
    seen.wait_for(UserTurn)
    push(assistant, np.concatenate([speech("a large pizza with mushrooms"), silence(1.0)]))
    assert assistant.busy, "the first turn was still being thought of"
    seen.wait_for(UserTurn, count=2, timeout=10)
    assistant.wait()
    assistant.close()
    seen.thread.join(5)
    assert len(session.asked) == 2 and session.asked[1][1] > 1.5, session.asked


def test_the_microphone_clock_never_steps_back_when_audio_comes_in_a_burst(monkeypatch):
    """A callback 80 ms late brings its audio as a burst of blocks: the clock, which wall time carried
    on meanwhile, waits for the audio to catch up instead of stepping back (event stamps stay in order)."""
    import afnext.assistant as brain
    wall = [100.0]
    monkeypatch.setattr(brain, "time", SimpleNamespace(perf_counter=lambda: wall[0], sleep=time.sleep))
    assistant = Assistant(Scripted([]), Quiet())
    block = np.zeros(320, np.float32)  # 20 ms
    assistant.push(block, SAMPLE_RATE)
    wall[0] += 0.08  # nothing for 80 ms
    before = assistant.now()
    assert before == pytest.approx(0.10)
    for blocks in range(1, 5):  # the burst: 4 blocks at once
        assistant.push(block, SAMPLE_RATE)
        assert assistant.now() == pytest.approx(max(before, 0.02 + 0.02 * blocks)), blocks
    wall[0] += 0.01
    assert assistant.now() == pytest.approx(0.11), "caught up, the clock runs on"
    assistant.close()


def test_speech_that_goes_on_past_a_forced_end_of_turn_is_answered_whole():
    """A turn the endpointer ends by force (max_utterance_s) while the user talks on is cut off as by
    any barge-in, and the turn the rest becomes carries the words before it: the session is asked
    about everything said, once, not about its last seconds alone."""
    from afnext.vad import EndpointerOptions

    session = Scripted([TextDelta("Sure.")], delay_s=1.0)  # no reply begins before the user goes on
    options = AssistantOptions(endpointer=EndpointerOptions(max_utterance_s=2.5))
    assistant = Assistant(session, Quiet(), options)
    seen = Collector(assistant)
    said = speech("I would like to order a large pizza with mushrooms, olives and extra cheese, and a lemonade")
    assert len(said) > 3.5 * SAMPLE_RATE
    push(assistant, np.concatenate([silence(0.3), said, silence(1.2)]))
    assert assistant.wait(20)  # the last turn, answered (the push heard every turn end)
    *cut_off, (_, heard, cancel) = session.asked
    assert cut_off and all(c.is_set() for _, _, c in cut_off), "each forced end was barged in on"
    assert not cancel.is_set() and heard >= len(said) / SAMPLE_RATE, (heard, len(said) / SAMPLE_RATE)
    assert heard < len(said) / SAMPLE_RATE + 1.0, "and no second of it twice"
    seen.wait_for(TextDelta)
    assistant.close()
    seen.thread.join(5)
