"""Features: 16 kHz mono samples → Whisper log-mel windows for the AF-Next encoder, and the audio
tokens each window takes.

The encoder hears non-overlapping 30 s windows of 3000 mel frames (10 ms each), made here as the
stock processor makes them (tests/test_audio.py compares the two).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

WINDOW_S = 30  # seconds of audio per encoder window
N_FFT = 400  # samples: 25 ms analysis window at 16 kHz
HOP_LENGTH = 160  # samples: 10 ms between mel frames
WINDOW_SAMPLES = 480_000  # samples in one 30 s window
WINDOW_FRAMES = 3000  # mel frames in one 30 s window
WINDOWS_PER_BATCH = 2  # windows per STFT call: 10 MB of spectrum; bigger batches measured slower


def log_mel_windows(audio: np.ndarray, mel_filters: np.ndarray) -> tuple[torch.Tensor, list[int]]:
    """Whisper log-mel features of 16 kHz mono `audio`, cut into non-overlapping 30 s windows.

    `mel_filters` is the checkpoint's `feature_extractor.mel_filters`, shape [N_FFT // 2 + 1,
    n_mels]. Returns `input_features` float32 [n_windows, n_mels, WINDOW_FRAMES] (each window
    zero-padded to 30 s, as the stock processor does) and the valid mel frames per window, which
    is what the stock `input_features_mask` sums to per window.
    """
    import torch  # here, not at the top: the constants and `audio_tokens` need no torch

    assert audio.ndim == 1 and audio.size > 0, "expects non-empty 1-D audio"
    batches = _window_batches(torch.from_numpy(np.require(audio, np.float32, ["C", "W"])))
    filters = torch.from_numpy(np.ascontiguousarray(mel_filters.T, dtype=np.float32))
    hann = torch.hann_window(N_FFT)
    n_windows = -(-audio.size // WINDOW_SAMPLES)
    features = torch.empty(n_windows, filters.shape[0], WINDOW_FRAMES)
    done = 0
    with torch.inference_mode():
        for batch in batches:
            features[done : done + len(batch)] = _log_mel(batch, filters, hann)
            done += len(batch)
    last = audio.size - (n_windows - 1) * WINDOW_SAMPLES
    frames = [WINDOW_FRAMES] * (n_windows - 1) + [-(-last // HOP_LENGTH)]
    return features, frames


def audio_tokens(frames: int) -> int:
    """Encoder output tokens for a window with `frames` valid mel frames (conv stride 2, then
    pooling stride 2): 750 for a full window, 0 for 1-2 frames."""
    return max(0, ((frames - 1) // 2 + 1 - 2) // 2 + 1)


def _window_batches(audio: torch.Tensor) -> list[torch.Tensor]:
    """[b, WINDOW_SAMPLES] batches: views of `audio` for full windows; the last, shorter one is
    copied and zero-padded, so 30 min of audio is never copied whole."""
    import torch

    full, rest = divmod(audio.numel(), WINDOW_SAMPLES)
    whole = audio[: full * WINDOW_SAMPLES].view(full, WINDOW_SAMPLES)
    batches = list(whole.split(WINDOWS_PER_BATCH)) if full else []
    if rest:
        last = torch.zeros(1, WINDOW_SAMPLES)
        last[0, :rest] = audio[full * WINDOW_SAMPLES :]
        batches.append(last)
    return batches


def _log_mel(windows: torch.Tensor, filters: torch.Tensor, hann: torch.Tensor) -> torch.Tensor:
    """The stock Whisper recipe on a batch of padded windows [b, WINDOW_SAMPLES]."""
    import torch

    spectrum = torch.view_as_real(torch.stft(windows, N_FFT, HOP_LENGTH, window=hann, return_complex=True))
    # |X|^2 as re*re + im*im, dropping the last frame as stock does; in place, because these
    # elementwise passes cost more than the FFT itself.
    real, imag = spectrum[..., :-1, 0], spectrum[..., :-1, 1]
    power = real.square().addcmul_(imag, imag)
    log_spec = torch.matmul(filters, power).clamp_(min=1e-10).log10_()
    # The floor sits 8 decades (80 dB) under each window's own peak.
    peak = log_spec.amax(dim=(1, 2), keepdim=True)
    return log_spec.clamp_(min=peak - 8.0).add_(4.0).div_(4.0)
