"""One audio clip made ready for the encoder: decoded, resampled and cut into log-mel windows, with
the token count it will take in the conversation (25 per second)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from . import audio, media, mel
from .cores import one_core


@dataclass(frozen=True)
class Clip:
    """One audio clip, featurized and ready to encode."""

    features: torch.Tensor = field(repr=False)  # [windows, n_mels, 3000] float32 log-mel, CPU
    frames: tuple[int, ...]  # valid mel frames per window (10 ms each)
    duration_s: float  # seconds of audio the model hears
    load_s: float  # seconds spent decoding, resampling and featurizing

    @property
    def tokens(self) -> int:
        """Audio tokens the clip occupies in the sequence (25 per second)."""
        return sum(mel.audio_tokens(f) for f in self.frames)


def check_length(samples: np.ndarray) -> None:
    """Raises `AudioError` if the model would hear nothing of 16 kHz `samples`: 20 ms or less make
    no audio token."""
    if mel.audio_tokens(-(-len(samples) // mel.HOP_LENGTH)) == 0:
        raise audio.AudioError(f"The clip is too short ({len(samples) / audio.SAMPLE_RATE * 1000:.0f} ms); "
                               "the model needs more than 20 ms of audio.")


def prepare_clip(source, mel_filters: np.ndarray, *, max_seconds: float = audio.MAX_AUDIO_S) -> Clip:
    """Path, bytes, (sample_rate, array) or 16 kHz float32 array → `Clip`. Raises `AudioError`.

    A last window of 1-320 samples would give zero audio tokens (stock transformers crashes on it),
    so that ≤ 20 ms tail is dropped; a clip with no audio token at all is refused as too short.
    """
    t0 = time.perf_counter()
    with one_core():  # it runs in the asking thread: the cores are the engine's (cores.py)
        if isinstance(source, np.ndarray) and source.dtype == np.float32 and source.ndim == 1:
            samples = audio.checked_16k(source, max_seconds)  # 16 kHz already (a part of a long recording): no copy
        else:
            if isinstance(source, np.ndarray):
                source = (audio.SAMPLE_RATE, source)
            samples = media.load_audio(source, max_seconds=max_seconds)
        check_length(samples)
        features, frames = mel.log_mel_windows(samples, mel_filters)
        keep = [i for i, f in enumerate(frames) if mel.audio_tokens(f) > 0]  # a tail of 20 ms or less goes
        features, frames = features[keep], [frames[i] for i in keep]
    duration = min(len(samples), sum(frames) * mel.HOP_LENGTH) / audio.SAMPLE_RATE
    return Clip(features, tuple(frames), duration, time.perf_counter() - t0)
