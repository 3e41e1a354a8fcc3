"""Semantic end of turn: Smart Turn's features, the endpointer asking it in pauses, and what it gets
right and wrong on speech made here (espeak's flat prosody fools it on some sentences; the figures
are printed, and `bench` carries them with timings)."""

from __future__ import annotations

import itertools
import logging
import statistics

import numpy as np
import pytest

from afnext import turn
from afnext.audio import SAMPLE_RATE
from afnext.vad import Endpointer, EndpointerOptions, SpeechStarted, UtteranceEnded
from tests.test_vad import run, sequence, speech, turns

SEMANTIC = EndpointerOptions(semantic=True)
MODEL = turn.find_model()
needs_model = pytest.mark.skipif(MODEL is None, reason="Smart Turn is not installed (scripts/setup.sh installs it)")
FINISHED = ["Order a large pizza with mushrooms.", "Please call my mother tonight.", "I need a taxi to the airport.",
            "Set an alarm for seven tomorrow.", "How far is the moon from the earth?", "Thank you, that is all.",
            "What is the weather like today?", "Can you play some jazz?"]
UNFINISHED = ["I would like to", "So I was thinking that maybe we could", "Let me think, I need", "The meeting is on",
              "and then", "Can you tell me about the", "I want to order a", "My favourite color is"]


def test_features_are_whispers_log_mel_at_80_bins_over_8_seconds():
    from transformers import WhisperFeatureExtractor

    rng = np.random.default_rng(3)
    reference = WhisperFeatureExtractor(feature_size=80, chunk_length=8)
    for seconds in (2.0, 8.0, 11.0):  # shorter (padded in front), exact, longer (its end is heard)
        audio = (rng.standard_normal(round(seconds * SAMPLE_RATE)) * 0.1).astype(np.float32)
        window = np.pad(audio[-8 * SAMPLE_RATE:], (max(0, 8 * SAMPLE_RATE - audio.size), 0))
        expected = reference(window, sampling_rate=SAMPLE_RATE, padding="max_length", max_length=8 * SAMPLE_RATE,
                             truncation=True, do_normalize=True, return_tensors="np").input_features[0]
        ours = turn.features(audio)
        assert ours.shape == (80, 800) and np.abs(ours - expected).max() < 1e-5


class Scripted:
    """A turn model that calls a turn complete once `after` seconds of audio have been heard."""

    def __init__(self, after: float) -> None:
        self.after, self.asked = after, []

    def complete(self, audio: np.ndarray) -> float:
        self.asked.append(audio.size / SAMPLE_RATE)
        return 0.9 if audio.size / SAMPLE_RATE >= self.after else 0.1


def _run(audio: np.ndarray, model, chunks=None, options: EndpointerOptions = SEMANTIC) -> list:
    endpointer = Endpointer(options, turn_model=model)
    events, at = [], 0
    for size in chunks or [audio.size]:
        events += endpointer.push(audio[at:at + size], SAMPLE_RATE)
        at += size
    return events + endpointer.flush()


def test_complete_ends_the_turn_at_the_first_ask_and_incomplete_waits_for_the_longest_silence():
    words = speech("Order a large pizza with mushrooms.")
    audio, ((start, end),) = sequence(0.5, words, 3.0)
    (done,) = turns(_run(audio, Scripted(after=0.0)))
    assert done.complete == 0.9 and 0.17 <= done.t - done.end <= 0.22  # asked 192 ms into the pause
    model = Scripted(after=99.0)  # never sure
    (waited,) = turns(_run(audio, model))
    assert waited.complete is None and abs(waited.t - waited.end - 2.0) < 0.04  # max_silence_ms
    assert len(model.asked) == 2, "asked at 192 and 288 ms into the pause, then no more"


def test_speech_after_a_pause_the_model_called_unfinished_stays_in_the_turn():
    first, second = speech("I would like to"), speech("order a large pizza with mushrooms.")
    audio, bounds = sequence(0.5, first, 1.0, second, 3.0)
    model = Scripted(after=99.0)
    (one,) = turns(_run(audio, model))
    assert abs(one.start - bounds[0][0]) < 0.1 and abs(one.end - bounds[1][1]) < 0.1
    assert len(model.asked) == 4, "two asks in each pause: the first pause's, then the last one's"


def test_semantic_events_do_not_depend_on_the_chunking():
    audio, _ = sequence(0.5, speech("I would like to"), 0.8, speech("order a large pizza."), 2.5)
    whole = _run(audio, Scripted(after=3.0))
    for size in (160, 777, 4096):
        assert _run(audio, Scripted(after=3.0), chunks=[size] * (audio.size // size + 1)) == whole


def test_without_the_model_semantic_falls_back_to_silence_and_says_so_once(monkeypatch, caplog):
    monkeypatch.setattr(turn, "find_model", lambda: None)
    monkeypatch.setattr(turn, "_LOADED", {})
    audio, _ = sequence(0.5, speech("Order a large pizza with mushrooms."), 2.0)
    with caplog.at_level(logging.WARNING, logger="afnext.turn"):
        first = run(audio, options=SEMANTIC)
        second = run(audio, options=SEMANTIC)
    assert first == second == run(audio)  # the silence endpointer's events
    assert sum("Smart Turn is not installed" in r.getMessage() for r in caplog.records) == 1


def test_the_utterance_holds_the_whole_pause_before_the_decision():
    """A soft ending (a trailing syllable the detectors call non-speech) is in the audio handed over."""
    words = speech("Meet me at the center")
    fade = words[-1600:] * np.linspace(1, 0, 1600, dtype=np.float32) * 0.05  # a 100 ms whisper of a tail
    audio, ((start, end),) = sequence(0.5, np.concatenate([words, fade]), 2.0)
    for options, model in ((EndpointerOptions(), None), (SEMANTIC, Scripted(after=0.0))):
        (ended,) = turns(_run(audio, model, options=options))
        handed = ended.start - options.pre_roll_ms / 1000 + ended.audio.size / SAMPLE_RATE
        # The bound covers the audible part of the fading syllable (its last ~30 ms are under -60 dB).
        assert ended.end >= end - 0.04, "the end bound covers the soft ending"
        assert handed >= end + 0.05, "and the audio handed over holds all of it, with a margin"
        assert np.allclose(ended.audio[-round((handed - end) * SAMPLE_RATE):][:1600], audio[round(end * SAMPLE_RATE):][:1600])


# ---- the real model on speech made here ----

# Smart Turn's answer on espeak speech swings with small changes: where the phrase starts on the 32 ms
# grid, how loud it is, and what espeak-ng said before in the process (its wave generator keeps static
# state that nothing resets, so a phrase's samples depend on the tests that ran before). On "I would
# like to" alone it gave 0.42 and 0.43 here and over 0.5 in CI. So each phrase is heard in variants
# (leading silence, gain) and the tests judge rates over them.
VARIANTS = list(itertools.product((0.3, 0.7), (0.5, 1.0)))


def _decisions(texts: list[str], pause_s: float = 2.5) -> list[UtteranceEnded]:
    model = turn.load_turn_model(MODEL)
    out = []
    for text in texts:
        words = speech(text)
        for lead, gain in VARIANTS:
            audio, _ = sequence(lead, words * gain, pause_s)
            events = [e for e in _run(audio, model) if not isinstance(e, SpeechStarted)]
            out.append(events[0])
    return out


@needs_model
def test_finished_sentences_end_a_fifth_of_a_second_after_their_last_word():
    ended = _decisions(FINISHED)
    delays = [e.t - e.end for e in ended]
    right = sum(e.complete is not None for e in ended)
    print(f"\nSmart Turn on espeak, finished: {right}/{len(ended)} called complete; end of speech → decision "
          f"median {statistics.median(delays):.3f} s")
    assert statistics.median(delays) <= 0.35 and right >= len(ended) // 2


class Heard:
    """The real model, with every probability it gave kept in order."""

    def __init__(self, model) -> None:
        self.model, self.said = model, []

    def complete(self, audio: np.ndarray) -> float:
        self.said.append(self.model.complete(audio))
        return self.said[-1]


# Phrases cut off before their end, then a thinking pause: the test asks for half of their variants
# to stay one turn (18 to 22 of the 24 did here, with different tests before it), each split exactly
# where the model's answer in the pause called the phrase finished.
THINKING = ["I would like to", "Well, um, I want to", "Let me see, I want to"]


@needs_model
def test_an_unfinished_phrase_with_a_thinking_pause_stays_one_turn_mostly_and_as_the_model_said():
    model, second = turn.load_turn_model(MODEL), speech("order a large pizza with mushrooms.")
    kept = []
    for text in THINKING:
        first = speech(text)
        for (lead, gain), pause in itertools.product(VARIANTS, (0.6, 1.0)):
            audio, (one, two) = sequence(lead, first * gain, pause, second, 2.5)
            heard = Heard(model)
            ended = turns(_run(audio, heard))
            # In the pause the model is asked at 192 ms, and at 288 ms if it was not sure at 192.
            asked = heard.said[:1] if heard.said[0] >= SEMANTIC.complete else heard.said[:2]
            variant = f"{text!r} after {lead} s at gain {gain}, paused {pause} s; the model said {asked}"
            if max(asked) >= SEMANTIC.complete:
                assert len(ended) == 2 and ended[0].complete == asked[-1], variant
                assert abs(ended[0].end - one[1]) < 0.1 and abs(ended[1].end - two[1]) < 0.1, variant
            else:
                assert len(ended) == 1 and abs(ended[0].end - two[1]) < 0.1, variant
            kept.append(len(ended) == 1)
    print(f"\nSmart Turn on espeak, thinking pauses: {sum(kept)}/{len(kept)} stayed one turn")
    assert sum(kept) >= len(kept) // 2, f"only {sum(kept)} of {len(kept)} thinking pauses stayed one turn"
    ended = _decisions(UNFINISHED)
    right = sum(e.complete is None for e in ended)
    print(f"Smart Turn on espeak, unfinished: {right}/{len(ended)} called incomplete (espeak's flat "
          "prosody makes many sound finished)")


@needs_model
@pytest.mark.parametrize("kind", ["noise", "tone"])
def test_noise_and_tones_give_no_turn(kind):
    rng = np.random.default_rng(5)
    t = np.arange(4 * SAMPLE_RATE) / SAMPLE_RATE
    signal = (rng.standard_normal(t.size) * 0.1 if kind == "noise" else 0.3 * np.sin(2 * np.pi * 440 * t))
    assert _run(signal.astype(np.float32), turn.load_turn_model(MODEL)) == []


@needs_model
def test_the_real_model_gives_the_same_events_for_any_chunking():
    audio, _ = sequence(0.5, speech("I would like to"), 0.8, speech("order a large pizza."), 2.5)
    model = turn.load_turn_model(MODEL)
    whole = _run(audio, model)
    assert whole and _run(audio, model, chunks=[480] * (audio.size // 480 + 1)) == whole
    assert [e.complete for e in whole if isinstance(e, UtteranceEnded)] == \
        [e.complete for e in _run(audio, model, chunks=[3333] * (audio.size // 3333 + 1)) if isinstance(e, UtteranceEnded)]


def test_bad_semantic_options_are_refused():
    for bad in (dict(ask_at_ms=(0,)), dict(ask_at_ms=[192]), dict(ask_at_ms=(3000,)), dict(complete=1.5),
                dict(max_silence_ms=-1)):
        with pytest.raises(ValueError):
            Endpointer(EndpointerOptions(semantic=True, **bad), turn_model=Scripted(0.0))


def test_a_quiet_syllable_after_a_stop_closure_is_inside_the_end_bound():
    """"cen … ter": the detectors call the quiet second syllable, after 120 ms of closure, non-speech;
    the end bound still covers it, and so does the audio handed over."""
    audio, bounds = sequence(0.5, speech("Meet me at the cen"), 0.12, speech("ter") * 0.02, 2.0)
    for options, model in ((EndpointerOptions(), None), (SEMANTIC, Scripted(after=99.0))):
        (ended,) = turns(_run(audio, model, options=options))
        assert abs(ended.end - bounds[1][1]) < 0.03, (ended.end, bounds)
        handed = ended.start - options.pre_roll_ms / 1000 + ended.audio.size / SAMPLE_RATE
        assert handed >= bounds[1][1] + 0.1
