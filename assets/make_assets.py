"""Write the sample recordings: assets/speech.wav (espeak-ng) and assets/sounds.flac (synthesized).

    python assets/make_assets.py

Deterministic: no downloads, no wall-clock or unseeded randomness, so a re-run rewrites the same
bytes (with the same espeak-ng, soxr and libsndfile versions). assets/README.md describes what
happens at which second; `timeline()` prints it from the constants below.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

ASSETS = Path(__file__).resolve().parent
sys.path.insert(0, str(ASSETS.parent))  # run from a checkout, without installing afnext

from afnext.tts.espeak import synthesize  # noqa: E402  (needs the path above)

SAMPLE_RATE = 16000  # Hz: both files are already in the project's internal rate
SENTENCES = (
    "Hi, this is a test of the Audio Flamingo voice assistant.",
    "I recorded this short voice note on Tuesday morning.",
    "Please remind me to buy milk and eggs on the way home.",
)
LEAD_S = 0.3  # seconds of silence before the first sentence
GAP_S = 0.4  # seconds of silence between sentences, and after the last
RATE_WPM = 170  # espeak-ng speaking rate

# sounds.flac, in order. Each entry: (start second, what, how long it sounds in seconds).
SCALE_HZ = (261.63, 293.66, 329.63, 349.23, 392.00, 440.00, 493.88, 523.25)  # C4 D4 E4 F4 G4 A4 B4 C5
NOTE_S = 0.5  # seconds per plucked note
SCALE_START_S = 0.5
CHORD_HZ = (261.63, 329.63, 392.00)  # C4 E4 G4: a C-major triad
CHORD_START_S, CHORD_S = 5.5, 2.0
KNOCKS_S = (8.5, 9.0, 9.5)  # three knocks on wood
CLAPS_S = (10.5, 10.8)  # two hand claps
BEEP_START_S, BEEP_S, BEEP_HZ = 12.0, 0.5, 1000.0
SOUNDS_S = 13.0  # total length of sounds.flac
SEED = 20261126  # noise for the knocks and claps


def make_speech() -> tuple[np.ndarray, list[tuple[float, float, str]]]:
    """The voice note at 16 kHz, and (start s, end s, sentence) for each sentence."""
    pieces, spans, t = [_silence(LEAD_S)], [], LEAD_S
    for sentence in SENTENCES:
        rate, samples = synthesize(sentence, rate_wpm=RATE_WPM)
        samples = _trimmed(soxr.resample(samples, rate, SAMPLE_RATE))
        spans.append((t, t + len(samples) / SAMPLE_RATE, sentence))
        t += len(samples) / SAMPLE_RATE + GAP_S
        pieces += [samples, _silence(GAP_S)]
    audio = np.concatenate(pieces)
    return 0.8 * audio / np.abs(audio).max(), spans


def make_sounds() -> np.ndarray:
    """Plucked C-major scale, a held chord, knocks, claps, a beep; silence between, at 16 kHz."""
    rng = np.random.default_rng(SEED)
    audio = _silence(SOUNDS_S)
    for i, hz in enumerate(SCALE_HZ):
        _add(audio, SCALE_START_S + i * NOTE_S, 0.5 * _pluck(hz, NOTE_S))
    _add(audio, CHORD_START_S, 0.5 * _chord(CHORD_HZ, CHORD_S))
    for start in KNOCKS_S:
        _add(audio, start, 0.7 * _knock(rng))
    for start in CLAPS_S:
        _add(audio, start, 0.6 * _clap(rng))
    _add(audio, BEEP_START_S, 0.3 * _tone(BEEP_HZ, BEEP_S))
    return audio


def timeline(spans: list[tuple[float, float, str]]) -> str:
    """What happens when, as assets/README.md lists it."""
    lines = ["speech.wav:"] + [f"  {a:5.2f}-{b:5.2f} s  {text}" for a, b, text in spans]
    notes = "C4 D4 E4 F4 G4 A4 B4 C5".split()
    lines.append("sounds.flac:")
    lines += [f"  {SCALE_START_S + i * NOTE_S:5.2f} s  plucked {n}" for i, n in enumerate(notes)]
    lines.append(f"  {CHORD_START_S:5.2f}-{CHORD_START_S + CHORD_S:5.2f} s  held C-major chord")
    lines += [f"  {t:5.2f} s  knock" for t in KNOCKS_S] + [f"  {t:5.2f} s  clap" for t in CLAPS_S]
    lines.append(f"  {BEEP_START_S:5.2f}-{BEEP_START_S + BEEP_S:5.2f} s  {BEEP_HZ:.0f} Hz beep")
    return "\n".join(lines)


def _trimmed(samples: np.ndarray, floor: float = 1e-3) -> np.ndarray:
    """Without espeak-ng's own leading and trailing silence, so the spans are the speech."""
    loud = np.flatnonzero(np.abs(samples) > floor)
    return samples[loud[0] : loud[-1] + 1]


def _silence(seconds: float) -> np.ndarray:
    return np.zeros(round(seconds * SAMPLE_RATE), np.float32)


def _times(seconds: float) -> np.ndarray:
    return np.arange(round(seconds * SAMPLE_RATE)) / SAMPLE_RATE


def _add(audio: np.ndarray, start_s: float, sound: np.ndarray) -> None:
    start = round(start_s * SAMPLE_RATE)
    audio[start : start + len(sound)] += sound[: len(audio) - start]


def _pluck(hz: float, seconds: float) -> np.ndarray:
    """A plucked string: harmonics 1-6, the higher ones quieter and dying faster."""
    t = _times(seconds)
    wave = sum(np.sin(2 * np.pi * k * hz * t) * np.exp(-t * 6 * k) / k for k in range(1, 7))
    attack = np.minimum(1.0, t / 0.003)  # 3 ms, so the onset does not click
    return (wave * attack / 1.5).astype(np.float32)


def _chord(hzs: tuple[float, ...], seconds: float) -> np.ndarray:
    """An organ-like held chord: three harmonics per note, 50 ms fade in and out."""
    t = _times(seconds)
    wave = sum(np.sin(2 * np.pi * k * hz * t) / k for hz in hzs for k in (1, 2, 3))
    fade = np.minimum(1.0, np.minimum(t, seconds - t) / 0.05)
    return (wave * fade / np.abs(wave).max()).astype(np.float32)


def _knock(rng: np.random.Generator) -> np.ndarray:
    """A knock on wood: a damped 180 Hz thump plus a short click of noise, ~80 ms."""
    t = _times(0.08)
    thump = np.sin(2 * np.pi * 180 * t) * np.exp(-t / 0.015)
    click = rng.standard_normal(len(t)) * np.exp(-t / 0.002)
    return (0.8 * thump + 0.3 * click).astype(np.float32)


def _clap(rng: np.random.Generator) -> np.ndarray:
    """A hand clap: a burst of white noise with a sharp attack and a ~20 ms decay."""
    t = _times(0.12)
    return (rng.standard_normal(len(t)) * np.exp(-t / 0.02) / 3).astype(np.float32)


def _tone(hz: float, seconds: float) -> np.ndarray:
    t = _times(seconds)
    fade = np.minimum(1.0, np.minimum(t, seconds - t) / 0.01)
    return (np.sin(2 * np.pi * hz * t) * fade).astype(np.float32)


def main() -> None:
    speech, spans = make_speech()
    sf.write(ASSETS / "speech.wav", speech, SAMPLE_RATE, subtype="PCM_16")
    sf.write(ASSETS / "sounds.flac", make_sounds(), SAMPLE_RATE, subtype="PCM_16")
    print(timeline(spans))


if __name__ == "__main__":
    main()
