"""Speech out: synthesizers that turn answer text (never reasoning) into streamed audio chunks.

    synth = load_synthesizer("espeak")                  # no weights, GPL-3.0 wheel, 22,050 Hz
    synth = load_synthesizer("pocket", device="auto")   # Kyutai Pocket TTS via transformers, 24 kHz
    chunker = SpeechChunker()
    for piece in chunker.feed(TextDelta("Hello there, how are you today?")):
        for chunk in synth.stream(piece, cancel=event):  # AudioChunk(sample_rate, float32 samples)
            play(chunk)

Engines are imported on first use, so importing this package costs nothing and needs neither
espeak-ng nor torch.
"""

from __future__ import annotations

import importlib.util
import os
import threading
from collections.abc import Iterator
from typing import Protocol, runtime_checkable

import numpy as np

from ..audio import MonoResampler
from ..events import AudioChunk
from .chunker import ChunkerOptions, SpeechChunker

ENGINES = ("espeak", "pocket")


class TTSError(RuntimeError):
    """A synthesizer cannot be loaded or run; the message says why and what to do instead."""


@runtime_checkable
class Synthesizer(Protocol):
    """Text in, float32 mono audio chunks out, as soon as they are made."""

    sample_rate: int  # Hz of every chunk this synthesizer yields

    def stream(self, text: str, cancel: threading.Event | None = None) -> Iterator[AudioChunk]:
        """Speak `text`; stops promptly when `cancel` is set or the generator is closed."""
        ...


class Mute:
    """The voice of a server whose synthesizers could not be loaded: speaking is a TTSError naming why,
    which every shell says in one sentence while the text goes on (the banner says it at the start)."""

    sample_rate = 24000

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def stream(self, text: str, cancel: threading.Event | None = None) -> Iterator[AudioChunk]:
        raise TTSError(f"This server has no voice: {self.reason}")
        yield  # a generator, as every synthesizer's stream is


def load_synthesizer(engine: str = "espeak", *, model: str | None = None, device: str = "auto") -> Synthesizer:
    """A ready synthesizer (loaded and warmed up once).

    engine "espeak": `model` is an espeak-ng voice name (default "en-us"); `device` is ignored (CPU).
    engine "pocket": `model` is a Pocket TTS checkpoint, hub id or folder (default
    `eustlb/pocket-tts`), or "tiny" for an offline random-weight one (noise); `device` is
    "auto" (CUDA when there is one), "cpu" or "cuda[:n]". Raises TTSError when a dependency or the
    checkpoint is missing, ValueError for an unknown engine or voice.
    """
    if engine == "espeak":
        _require("espeakng_loader", "espeakng-loader", "The espeak engine (espeak-ng, GPL-3.0)")
        from .espeak import EspeakSynthesizer

        return EspeakSynthesizer(voice=model or "en-us")
    if engine == "pocket":
        _require("torch", "torch", "The pocket engine")
        _require("transformers", "'transformers>=5.24'", "The pocket engine")
        import transformers

        if not hasattr(transformers, "PocketTTSForConditionalGeneration"):
            raise TTSError(f"Pocket TTS needs transformers >= 5.24 (found {transformers.__version__}); "
                           "run `pip install -U 'transformers>=5.24'`.")
        from .pocket import load_pocket

        return load_pocket(model, device=device)
    raise ValueError(f"Unknown TTS engine {engine!r}; choose one of {', '.join(ENGINES)}.")


def check_wav_path(path: str) -> None:
    """Raise ValueError (one sentence) when a wav file cannot be written at `path`; the command
    lines call this before any work, so a typo in --out does not cost the run."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ValueError(f"The output path {path} is a folder; give a .wav file name.")
    if not os.path.isdir(folder):
        raise ValueError(f"The output folder {folder} does not exist.")
    if not os.access(folder, os.W_OK):
        raise ValueError(f"The output folder {folder} is not writable.")


class SpeechResampler:
    """One reply's speech chunks (any rate) → `out_rate`, through one soxr stream per reply, so
    chunk edges leave no clicks. `push` each chunk; `end` when the reply is complete (the filter's
    last samples); `drop` when it is cut off (barge-in)."""

    def __init__(self, out_rate: int) -> None:
        self.out_rate = out_rate  # Hz the speech is played at
        self._stream: MonoResampler | None = None

    @property
    def in_reply(self) -> bool:
        """A reply has started and is neither complete nor cut off."""
        return self._stream is not None

    def push(self, chunk: AudioChunk) -> np.ndarray:
        """`chunk` at `out_rate` (float32 mono; the filter holds back its last few ms until later)."""
        # One read of the stream: a barge-in's `drop` from another thread may land at any moment.
        stream, held = self._stream, np.zeros(0, np.float32)
        if stream is None or chunk.sample_rate != stream.sample_rate:
            if stream is not None:  # a piece at another rate: the last rate's held samples still play
                held = stream.flush()
            stream = self._stream = MonoResampler(chunk.sample_rate, self.out_rate)
        out = stream.push(chunk.samples)
        return np.concatenate([held, out]) if len(held) else out

    def end(self) -> np.ndarray:
        stream, self._stream = self._stream, None
        return stream.flush() if stream is not None else np.zeros(0, np.float32)

    def drop(self) -> None:
        self._stream = None


def _require(module: str, package: str, what: str) -> None:
    """One clear error, naming the pip package, when an engine's dependency is not installed."""
    if importlib.util.find_spec(module) is None:
        raise TTSError(f"{what} needs the `{module}` module, which is not installed; run `pip install {package}`.")


__all__ = ["ENGINES", "ChunkerOptions", "Mute", "SpeechChunker", "SpeechResampler", "Synthesizer", "TTSError",
           "check_wav_path", "load_synthesizer"]
