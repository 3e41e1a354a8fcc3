"""afnext.vad and its backends (afnext.vad_backends): turns found at the known speech bounds, the same
events however the input is chunked, no turns from noise, tones or short bursts, the hangover kept to
±40 ms, and the CLI.

Speech is espeak-ng's (no weights); its true bounds are the first and last sample above a small
threshold, measured on the synthesized samples themselves.
"""

from __future__ import annotations

import functools
import json
import logging
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr

from afnext import vad, vad_backends
from afnext.audio import SAMPLE_RATE, AudioError, to_mono_16k
from afnext.tts.espeak import synthesize
from afnext.vad import TAIL_MS, Endpointer, EndpointerOptions, SpeechStarted, UtteranceEnded

ROOT = Path(__file__).resolve().parent.parent
FIRST = "Hello there, what is the weather like today?"
SECOND = "Please tell me a short story about a dragon."
SPEECH_THRESHOLD = 0.01  # |sample| above which the synthesized signal counts as voice
BOUNDS_TOLERANCE_S = 0.1
HANGOVER_TOLERANCE_S = 0.04


@functools.cache
def speech(text: str) -> np.ndarray:
    """espeak-ng saying `text`, float32 16 kHz, trimmed to its voice (first/last loud sample)."""
    sample_rate, samples = synthesize(text)
    audio = to_mono_16k(samples, sample_rate)
    loud = np.flatnonzero(np.abs(audio) > SPEECH_THRESHOLD)
    return audio[loud[0] : loud[-1] + 1]


def silence(seconds: float) -> np.ndarray:
    return np.zeros(round(seconds * SAMPLE_RATE), np.float32)


def sequence(*parts: float | np.ndarray) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """Concatenate silences (seconds) and speech arrays; also the speech bounds in seconds."""
    pieces, bounds, at = [], [], 0
    for part in parts:
        if isinstance(part, np.ndarray):
            bounds.append((at / SAMPLE_RATE, (at + part.size) / SAMPLE_RATE))
        else:
            part = silence(part)
        pieces.append(part)
        at += part.size
    return np.concatenate(pieces), bounds


@functools.cache
def two_turns() -> tuple[np.ndarray, list[tuple[float, float]]]:
    return sequence(0.5, speech(FIRST), 1.5, speech(SECOND), 1.0)


def run(audio: np.ndarray, sample_rate: int = SAMPLE_RATE, chunks=None, *,
        options: EndpointerOptions = EndpointerOptions(), backend: str = "auto") -> list:
    """All events of `audio` pushed in chunks (sizes from the iterable `chunks`, whole if None)."""
    endpointer = Endpointer(options, backend=backend)
    events, at = [], 0
    for size in chunks or [audio.shape[0]]:
        if at >= audio.shape[0]:
            break
        events += endpointer.push(audio[at : at + size], sample_rate)
        at += size
    assert at >= audio.shape[0]
    return events + endpointer.flush()


def turns(events: list) -> list[UtteranceEnded]:
    """The UtteranceEnded events, after checking that every turn starts, then ends, in order."""
    kinds = [type(event) for event in events]
    assert kinds == [SpeechStarted, UtteranceEnded] * (len(events) // 2), kinds
    for started, ended in zip(events[::2], events[1::2]):
        assert started.t == ended.start < ended.end <= ended.t
    return events[1::2]


def repeat(size: int):
    while True:
        yield size


@pytest.mark.parametrize("backend", ["silero", "webrtc"])
def test_two_turns_at_the_speech_bounds(backend):
    audio, bounds = two_turns()
    ended = turns(run(audio, backend=backend))
    assert len(ended) == 2
    for event, (start, end) in zip(ended, bounds):
        assert abs(event.start - start) <= BOUNDS_TOLERANCE_S, (event, start)
        assert abs(event.end - end) <= BOUNDS_TOLERANCE_S, (event, end)


@functools.cache
def four_turns() -> tuple[np.ndarray, list[tuple[float, float]]]:
    return sequence(0.3, speech(FIRST), 1.0, speech("Stop."), 1.3, speech(SECOND), 0.9, speech("What time is it?"), 1.0)


@pytest.mark.parametrize("backend", ["silero", "webrtc"])
def test_turn_ends_one_hangover_after_the_voice(backend):
    audio, bounds = four_turns()
    ended = turns(run(audio, backend=backend))
    assert len(ended) == 4
    for event, (_, end) in zip(ended, bounds):
        assert abs(event.t - end - 0.6) <= HANGOVER_TOLERANCE_S, (event, end)


def test_hangover_option_moves_the_decision():
    audio, bounds = four_turns()
    ended = turns(run(audio, options=EndpointerOptions(hangover_ms=300)))
    assert len(ended) == 4
    for event, (_, end) in zip(ended, bounds):
        assert abs(event.t - end - 0.3) <= HANGOVER_TOLERANCE_S, (event, end)


@pytest.mark.parametrize("backend", ["silero", "webrtc"])
@pytest.mark.parametrize("size", [1, 160, 480, 4800])
def test_chunking_changes_nothing(size, backend):
    audio, _ = two_turns()
    whole = run(audio, backend=backend)
    chunked = run(audio, chunks=repeat(size), backend=backend)
    assert len(whole) == 4
    assert chunked == whole  # times and kinds (the dataclasses leave audio out of ==)
    for a, b in zip(chunked[1::2], whole[1::2]):
        assert np.array_equal(a.audio, b.audio)


@pytest.mark.parametrize("channels", [1, 2])
def test_48k_int16_in_random_chunks_matches_16k(channels):
    audio, _ = two_turns()
    reference = run(audio)
    high = soxr.resample(audio, SAMPLE_RATE, 48000)
    pcm = np.repeat((np.clip(high, -1, 1) * 32767).astype(np.int16)[:, None], channels, axis=1)
    sizes = np.random.default_rng(channels).integers(1, 9600, size=pcm.shape[0])
    events = run(pcm if channels > 1 else pcm[:, 0], 48000, chunks=iter(sizes.tolist()))
    assert [type(e) for e in events] == [type(e) for e in reference]
    for got, want in zip(events, reference):
        for name in ("t", "start", "end"):
            if hasattr(want, name):
                assert abs(getattr(got, name) - getattr(want, name)) <= 0.04, (got, want)


def white_noise(seconds: float = 4.0, level: float = 0.05) -> np.ndarray:
    return (np.random.default_rng(0).standard_normal(round(seconds * SAMPLE_RATE)) * level).astype(np.float32)


def steady_tone(seconds: float = 4.0, hz: float = 440.0, level: float = 0.3) -> np.ndarray:
    return (level * np.sin(2 * np.pi * hz * np.arange(round(seconds * SAMPLE_RATE)) / SAMPLE_RATE)).astype(np.float32)


@pytest.mark.parametrize("signal", [white_noise, steady_tone])
def test_noise_and_tones_start_no_turn(signal):
    assert run(signal(), backend="silero") == []


def test_webrtc_backend_calls_tones_and_loud_noise_speech():
    # What is true of the fallback (FACTS): webrtcvad hears a steady tone and -26 dBFS white noise
    # as one long turn; quiet noise (-40 dBFS) it ignores. Silero (above) ignores all three.
    for signal in (steady_tone(), white_noise()):
        assert len(turns(run(signal, backend="webrtc"))) == 1
    assert run(white_noise(level=0.01), backend="webrtc") == []


def test_short_bursts_start_no_turn():
    burst_s = 0.18
    voice = speech(FIRST)[: round(burst_s * SAMPLE_RATE)]  # the loud start of a word
    cough = white_noise(burst_s, 0.3) * np.exp(-np.arange(voice.size) / (0.04 * SAMPLE_RATE)).astype(np.float32)
    for burst in (voice, cough):
        assert run(sequence(0.5, burst, 1.0)[0]) == []


def test_max_utterance_forces_an_end_and_speech_goes_on():
    talk = np.concatenate([speech(FIRST), speech(SECOND), speech(FIRST)])  # ~7 s, no long pause
    audio, ((start, end),) = sequence(0.5, talk, 1.0)
    ended = turns(run(audio, options=EndpointerOptions(max_utterance_s=2.0)))
    assert len(ended) >= 3
    first = ended[0]
    assert abs(first.t - first.start - 2.0) <= 0.032 and first.t < end  # forced, mid-speech
    assert first.forced, "and says so (the voice loop lets the speech going on carry it)"
    short, _ = sequence(0.5, speech(FIRST), 1.0)
    assert [e.forced for e in turns(run(short))] == [False], "a pause ends a turn unforced"
    for before, after in zip(ended, ended[1:]):
        assert after.start >= before.t  # speech picked up again after each forced end
    audio_s = sum(event.audio.size for event in ended) / SAMPLE_RATE
    assert audio_s <= audio.size / SAMPLE_RATE  # no sample handed out twice


def test_utterance_audio_includes_pre_roll():
    audio, bounds = two_turns()
    for event, (start, end) in zip(turns(run(audio)), bounds):
        first = round(event.start * SAMPLE_RATE) - 300 * SAMPLE_RATE // 1000  # 300 ms pre-roll
        assert np.array_equal(event.audio, audio[first : first + event.audio.size])
        assert first / SAMPLE_RATE <= start - 0.2  # the onset's lead-in is there
        audio_end = (first + event.audio.size) / SAMPLE_RATE
        # The voice and the whole pause before the decision (up to TAIL_MS), so no soft ending is lost.
        assert end <= audio_end and audio_end == pytest.approx(min(event.t, event.end + TAIL_MS / 1000))


def test_flush_ends_the_utterance_in_progress():
    audio, ((start, _),) = sequence(0.5, speech(FIRST)[: 3 * SAMPLE_RATE // 2])  # cut mid-sentence
    endpointer = Endpointer()
    events = endpointer.push(audio, SAMPLE_RATE)
    assert [type(e) for e in events] == [SpeechStarted] and endpointer.speaking
    (ended,) = endpointer.flush()
    assert isinstance(ended, UtteranceEnded) and ended.t == audio.size / SAMPLE_RATE
    assert abs(ended.start - start) <= BOUNDS_TOLERANCE_S and ended.t - 0.1 <= ended.end <= ended.t
    assert not endpointer.speaking
    assert endpointer.flush() == []  # a flushed endpointer starts over


def test_discard_forgets_the_utterance_in_progress_and_keeps_the_timeline():
    half = speech(FIRST)[: 3 * SAMPLE_RATE // 2]
    audio, (_, (start, _)) = sequence(0.5, half, 1.0, speech(SECOND), 1.0)
    endpointer = Endpointer()
    cut = round(0.5 * SAMPLE_RATE) + half.size + SAMPLE_RATE // 5  # the first speech, 0.2 s into its hangover
    assert [type(e) for e in endpointer.push(audio[:cut], SAMPLE_RATE)] == [SpeechStarted]
    endpointer.discard()
    assert not endpointer.speaking
    events = endpointer.push(audio[cut:], SAMPLE_RATE)
    (ended,) = [e for e in events if isinstance(e, UtteranceEnded)]  # only the second speech is a turn
    assert abs(ended.start - start) <= BOUNDS_TOLERANCE_S  # on the same timeline as before
    first = round(ended.start * SAMPLE_RATE) - 300 * SAMPLE_RATE // 1000
    assert np.array_equal(ended.audio, audio[first : first + ended.audio.size])


def test_speaking_follows_the_turn():
    audio, _ = two_turns()
    endpointer, states = Endpointer(), []
    for at in range(0, audio.size, 1600):
        for event in endpointer.push(audio[at : at + 1600], SAMPLE_RATE):
            states.append((type(event).__name__, endpointer.speaking))
    assert states == [("SpeechStarted", True), ("UtteranceEnded", False)] * 2


def test_webrtc_gate_vetoes_onsets_webrtcvad_does_not_hear(monkeypatch):
    class Deaf:  # a webrtcvad that never hears speech
        def __init__(self, mode: int) -> None:
            pass

        def is_speech(self, frame: bytes, sample_rate: int) -> bool:
            return False

    monkeypatch.setattr(vad, "load_webrtcvad", lambda: type("module", (), {"Vad": Deaf}))
    audio, _ = two_turns()
    assert run(audio) == []
    assert len(turns(run(audio, options=EndpointerOptions(webrtc_gate=False)))) == 2


def test_auto_falls_back_to_webrtc_with_a_warning(monkeypatch, caplog):
    monkeypatch.setattr(vad_backends, "_silero_missing", lambda: "onnxruntime is not installed")
    with caplog.at_level(logging.WARNING, logger="afnext.vad_backends"):
        assert Endpointer().backend == "webrtc"
    assert "onnxruntime is not installed" in caplog.text
    assert Endpointer(backend="webrtc").backend == "webrtc"
    with pytest.raises(RuntimeError, match="onnxruntime"):
        Endpointer(backend="silero")


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="backend"):
        Endpointer(backend="vosk")
    with pytest.raises(ValueError, match="leave"):
        Endpointer(EndpointerOptions(enter=0.3, leave=0.5))
    with pytest.raises(AudioError):
        Endpointer().push(np.zeros(10, np.float32), 0)
    with pytest.raises(AudioError):
        Endpointer().push(np.zeros((2, 2, 2), np.float32), SAMPLE_RATE)


def test_the_batched_silero_model_equals_the_per_frame_one():
    """Batching frames into one call is what makes chunk sizes irrelevant; it must be exact."""
    frame_path = vad_backends._silero_path((vad_backends._FRAME_MODEL,))
    model = vad_backends.silero_model()
    if not model.sequence or frame_path is None:
        pytest.skip("the silero-vad wheel has no sequence model (< 6.2.2)")
    audio, _ = two_turns()
    n = audio.size // vad_backends.SILERO_FRAME_SAMPLES
    frames = audio[: n * vad_backends.SILERO_FRAME_SAMPLES].reshape(n, -1)
    context = np.zeros((n, vad_backends.SILERO_CONTEXT_SAMPLES), np.float32)
    context[1:] = frames[:-1, -vad_backends.SILERO_CONTEXT_SAMPLES :]
    frames = np.concatenate([context, frames], axis=1)
    state = np.zeros((2, 1, 128), np.float32)
    batched, batched_state = model.run(frames, state)
    single, single_state = vad_backends._SileroModel(frame_path).run(frames, state)
    assert np.array_equal(batched, single) and np.array_equal(batched_state, single_state)
    assert batched.max() > 0.9 and batched.min() < 0.1


def test_endpointers_in_threads_share_the_model():
    audio, _ = two_turns()
    expected = run(audio, chunks=repeat(512))
    results = [None] * 3

    def work(i: int) -> None:
        results[i] = run(audio, chunks=repeat(512))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert results == [expected] * 3


def test_cli_prints_segments_as_json(tmp_path):
    audio, bounds = two_turns()
    path = tmp_path / "turns.wav"
    sf.write(path, audio, SAMPLE_RATE, subtype="PCM_16")
    done = subprocess.run(
        [sys.executable, "-m", "afnext.vad", str(path), "--json"], cwd=ROOT, capture_output=True, text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["backend"] == "silero" and report["realtime_factor"] > 0
    assert len(report["segments"]) == 2
    for segment, (start, end) in zip(report["segments"], bounds):
        assert abs(segment["start"] - start) <= BOUNDS_TOLERANCE_S and abs(segment["end"] - end) <= BOUNDS_TOLERANCE_S


def test_cli_flags_set_the_options(tmp_path, capsys):
    audio, _ = two_turns()
    path = tmp_path / "turns.flac"
    sf.write(path, audio, SAMPLE_RATE)
    assert vad.main([str(path), "--json", "--backend", "webrtc", "--no-webrtc-gate"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["backend"] == "webrtc" and len(report["segments"]) == 2
    assert vad.main([str(path), "--json", "--min-speech-ms", "5000"]) == 0  # no 5 s sentence here
    assert json.loads(capsys.readouterr().out)["segments"] == []


def test_cli_takes_a_list_of_numbers_for_a_tuple_option(tmp_path, capsys, monkeypatch):
    audio, _ = two_turns()
    path = tmp_path / "turns.wav"
    sf.write(path, audio, SAMPLE_RATE, subtype="PCM_16")
    seen = []
    real = vad.Endpointer
    monkeypatch.setattr(vad, "Endpointer", lambda options, **kw: seen.append(options) or real(options, **kw))
    for flags, asked in ((["--ask-at-ms", "150"], (150,)), (["--ask-at-ms", "100", "250"], (100, 250)),
                         ([], (192, 288))):
        assert vad.main([str(path), "--json", "--backend", "webrtc", *flags]) == 0
        assert seen[-1].ask_at_ms == asked  # not ('1', '5', '0')
    capsys.readouterr()


def test_cli_refuses_a_bad_file_in_one_line(tmp_path):
    path = tmp_path / "notes.wav"
    path.write_bytes(b"this is not audio at all\n" * 40)
    done = subprocess.run(
        [sys.executable, "-m", "afnext.vad", str(path), "--json"], cwd=ROOT, capture_output=True, text=True,
        timeout=120,
    )
    assert done.returncode == 1 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("The file") and lines[0].endswith("."), done.stderr
