"""Audio in: any recording to float32 mono 16 kHz, then log-mel windows for the AF-Next encoder.

Files and uploads are decoded with PyAV (the FFmpeg libraries in its wheel), downmixed by
averaging the channels and resampled with soxr. Bad input is refused here, at the boundary, with an
`AudioError` whose message is one sentence the user can act on; nothing past this module has to
check audio again.
"""

from __future__ import annotations

import io
import os

import av
import numpy as np
import soxr
import torch

SAMPLE_RATE = 16000  # Hz: the only rate the AF-Whisper encoder understands
MAX_AUDIO_S = 1800.0  # seconds: AF-Next's 30-minute limit (60 windows, 45,000 audio tokens)
# bytes: 30 min of 48 kHz stereo float32 WAV is 691 MB, so any recording the model can take fits,
# while one upload cannot make us read gigabytes before the duration check refuses it.
MAX_FILE_BYTES = 1 << 30
LIMIT_GRACE_S = 1.0  # seconds over the limit that are trimmed, not refused (encoder padding, a
#                      "30 min" phone recording that is really 30:00.4)
TRUNCATION_TOLERANCE_S = 0.5  # seconds a decode may fall short of the declared length (codec
#                               priming and container rounding stay well under 0.1 s)
WINDOW_S = 30  # seconds of audio per encoder window
N_FFT = 400  # samples: 25 ms analysis window at 16 kHz
HOP_LENGTH = 160  # samples: 10 ms between mel frames
WINDOW_SAMPLES = 480_000  # samples in one 30 s window
WINDOW_FRAMES = 3000  # mel frames in one 30 s window
FRAMES_PER_BLOCK = 64  # decoded frames converted per numpy/soxr call (an MP3 frame is 1152
#                        samples): per-frame calls cost more than decoding on 30 min of MP3
WINDOWS_PER_BATCH = 4  # windows per STFT call: ~20 MB of complex spectrum, stays in cache-ish sizes

# Demuxers we let FFmpeg use on untrusted uploads. Playlist-style demuxers (hls, concat) can make
# FFmpeg open other files or URLs, and "tty" would accept any .txt file as a video.
_DEMUXERS = "wav,w64,aiff,flac,mp3,ogg,matroska,mov,aac,caf,amr"
_CONTAINER_OPTIONS = {
    "format_whitelist": _DEMUXERS,
    "protocol_whitelist": "file",
    # bytes per WAV packet: FFmpeg's 4 KiB makes 77,000 packets of 30 min of 44.1 kHz stereo;
    # far bigger packets slow down opening, where FFmpeg probes the first 5 MB packet by packet.
    "max_size": str(1 << 16),
}
_KNOWN_FORMATS = "wav, flac, mp3, ogg, webm or m4a"
_HEAD_BYTES = 1 << 16  # bytes read to find a WAV data chunk or an MP3 Xing/Info/VBRI tag


class AudioError(ValueError):
    """Input audio we refuse; the message is one sentence for the user."""


def load_audio(
    source: str | os.PathLike | bytes | tuple[int, np.ndarray], *, max_seconds: float = MAX_AUDIO_S
) -> np.ndarray:
    """Decode a file path, the bytes of a file, or a (sample_rate, samples) pair.

    Returns float32 mono samples at SAMPLE_RATE (16 kHz), shape [n], n > 0, all finite, at most
    `max_seconds` long. Raises AudioError for anything unusable.
    """
    if isinstance(source, tuple):
        sample_rate, samples = source
        audio = to_mono_16k(np.asarray(samples), int(sample_rate))
        return _checked(audio, max_seconds, declared_s=None)
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        _check_size(len(data))
        return _load(io.BytesIO(data), data, max_seconds)
    path = os.fspath(source)
    _check_path(path)
    # "file:" stops FFmpeg from reading a colon in the name as a protocol ("rtmp:", "concat:").
    return _load("file:" + path, path, max_seconds)


def to_mono_16k(samples: np.ndarray, sample_rate: int) -> np.ndarray:
    """float32 mono 16 kHz from int16/int32/uint8/float samples shaped [n] or [n, channels].

    Integers are scaled to [-1, 1), channels averaged. For one whole clip; a stream cut into
    chunks should go through one `MonoResampler` so chunk edges leave no clicks.
    """
    if sample_rate <= 0:
        raise AudioError(f"The sample rate {sample_rate} Hz is not a valid rate.")
    mono = _mono_float32(samples)
    if sample_rate == SAMPLE_RATE or mono.size == 0:
        return mono
    return soxr.resample(mono, sample_rate, SAMPLE_RATE)


class MonoResampler:
    """Streaming `to_mono_16k` for one source: soxr keeps its filter state between chunks."""

    def __init__(self, sample_rate: int) -> None:
        self.sample_rate = sample_rate  # Hz of the input
        self._stream = None
        if sample_rate != SAMPLE_RATE:
            self._stream = soxr.ResampleStream(sample_rate, SAMPLE_RATE, 1, dtype="float32")

    def push(self, samples: np.ndarray) -> np.ndarray:
        """Convert the next chunk ([n] or [n, channels]); output lags input by the filter delay."""
        mono = _mono_float32(samples)
        return mono if self._stream is None else self._stream.resample_chunk(mono)

    def flush(self) -> np.ndarray:
        """The samples still held in the filter; call once, at the end of the stream."""
        empty = np.zeros(0, np.float32)
        return empty if self._stream is None else self._stream.resample_chunk(empty, last=True)


def log_mel_windows(audio: np.ndarray, mel_filters: np.ndarray) -> tuple[torch.Tensor, list[int]]:
    """Whisper log-mel features of 16 kHz mono `audio`, cut into non-overlapping 30 s windows.

    `mel_filters` is the checkpoint's `feature_extractor.mel_filters`, shape [N_FFT // 2 + 1,
    n_mels]. Returns `input_features` float32 [n_windows, n_mels, WINDOW_FRAMES] (each window
    zero-padded to 30 s, as the stock processor does) and the valid mel frames per window, which
    is what the stock `input_features_mask` sums to per window.
    """
    assert audio.ndim == 1 and audio.size > 0, "expects non-empty 1-D audio"
    n_windows = -(-audio.size // WINDOW_SAMPLES)
    padded = np.zeros(n_windows * WINDOW_SAMPLES, np.float32)
    padded[: audio.size] = audio
    windows = torch.from_numpy(padded).view(n_windows, WINDOW_SAMPLES)
    filters = torch.from_numpy(np.ascontiguousarray(mel_filters.T, dtype=np.float32))
    hann = torch.hann_window(N_FFT)
    features = torch.empty(n_windows, filters.shape[0], WINDOW_FRAMES)
    with torch.inference_mode():
        for start in range(0, n_windows, WINDOWS_PER_BATCH):
            batch = windows[start : start + WINDOWS_PER_BATCH]
            features[start : start + batch.shape[0]] = _log_mel(batch, filters, hann)
    last = audio.size - (n_windows - 1) * WINDOW_SAMPLES
    frames = [WINDOW_FRAMES] * (n_windows - 1) + [-(-last // HOP_LENGTH)]
    return features, frames


def audio_tokens(frames: int) -> int:
    """Encoder output tokens for a window with `frames` valid mel frames (conv stride 2, then
    pooling stride 2): 750 for a full window, 0 for 1-2 frames."""
    return max(0, ((frames - 1) // 2 + 1 - 2) // 2 + 1)


def _log_mel(windows: torch.Tensor, filters: torch.Tensor, hann: torch.Tensor) -> torch.Tensor:
    """The stock Whisper recipe on a batch of padded windows [b, WINDOW_SAMPLES]."""
    spectrum = torch.stft(windows, N_FFT, HOP_LENGTH, window=hann, return_complex=True)
    power = (spectrum[..., :-1].abs() ** 2).contiguous()  # the last frame is dropped, as stock
    log_spec = torch.clamp(filters @ power, min=1e-10).log10()
    # The dynamic range floor is 8 decades (80 dB) below each window's own peak.
    peak = log_spec.amax(dim=(1, 2), keepdim=True)
    return (torch.maximum(log_spec, peak - 8.0) + 4.0) / 4.0


def _check_size(size: int) -> None:
    if size == 0:
        raise AudioError("The file is empty (0 bytes); record or upload it again.")
    if size > MAX_FILE_BYTES:
        raise AudioError(
            f"The file is {_bytes_text(size)}, over the {_bytes_text(MAX_FILE_BYTES)} limit;"
            " compress it or send a shorter part."
        )


def _check_path(path: str) -> None:
    name = os.path.basename(path) or path
    if os.path.isdir(path):
        raise AudioError(f"{name} is a folder, not an audio file.")
    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        raise AudioError(f"The file {name} was not found; check the path.") from None
    _check_size(size)


def _load(target: str | io.BytesIO, origin: str | bytes, max_seconds: float) -> np.ndarray:
    """Open, check the declared length, decode; `origin` is where header bytes can be re-read."""
    try:
        container = av.open(target, container_options=dict(_CONTAINER_OPTIONS))
    except av.error.FFmpegError:
        raise AudioError(f"The file is not audio in a known format; use {_KNOWN_FORMATS}.") from None
    with container:
        stream = _audio_stream(container)
        declared_s = _declared_seconds(container, stream, origin)
        if declared_s is not None and declared_s > max_seconds + LIMIT_GRACE_S:
            raise AudioError(_too_long_text(declared_s, max_seconds))
        audio = _decode(container, stream, max_seconds)
    return _checked(audio, max_seconds, declared_s)


def _audio_stream(container: av.container.InputContainer) -> av.audio.stream.AudioStream:
    if container.streams.audio:
        return container.streams.audio[0]
    kinds = sorted({stream.type for stream in container.streams}) or ["nothing"]
    raise AudioError(
        f"The file has no audio track (only {' and '.join(kinds)}); export its sound as audio first."
    )


def _decode(container: av.container.InputContainer, stream, max_seconds: float) -> np.ndarray:
    """All of `stream` as float32 mono 16 kHz; gives up as soon as it passes the limit."""
    pieces: list[np.ndarray] = []
    pending: list[av.AudioFrame] = []  # frames of one format, converted together
    resampler: MonoResampler | None = None
    decoded_s = 0.0
    try:
        for frame in container.decode(stream):
            if pending and not _same_format(pending[0], frame) or len(pending) == FRAMES_PER_BLOCK:
                pieces.append(resampler.push(_frames_samples(pending)))
                pending.clear()
            if resampler is None or frame.sample_rate != resampler.sample_rate:
                pieces.append(resampler.flush() if resampler else np.zeros(0, np.float32))
                resampler = MonoResampler(frame.sample_rate)
            decoded_s += frame.samples / frame.sample_rate
            if decoded_s > max_seconds + LIMIT_GRACE_S:
                raise AudioError(_too_long_text(decoded_s, max_seconds, found_all=False))
            pending.append(frame)
    except av.error.FFmpegError:
        raise AudioError(
            f"The file is damaged: decoding failed after {_duration_text(decoded_s)} of audio."
        ) from None
    if pending:
        pieces.append(resampler.push(_frames_samples(pending)))
    if resampler is not None:
        pieces.append(resampler.flush())
    return np.concatenate(pieces) if pieces else np.zeros(0, np.float32)


def _checked(audio: np.ndarray, max_seconds: float, declared_s: float | None) -> np.ndarray:
    """The checks every source shares, on the converted 16 kHz audio; trims the grace."""
    found_s = audio.size / SAMPLE_RATE
    if declared_s is not None and found_s < declared_s - TRUNCATION_TOLERANCE_S:
        raise AudioError(
            f"The file is damaged or incomplete: it declares {_duration_text(declared_s)} of audio"
            f" but only {_duration_text(found_s)} could be decoded."
        )
    if audio.size == 0:
        raise AudioError("The recording has no samples (0 s of audio); record it again.")
    if found_s > max_seconds + LIMIT_GRACE_S:
        raise AudioError(_too_long_text(found_s, max_seconds))
    if not np.isfinite(audio).all():
        raise AudioError(
            "The recording contains invalid samples (NaN or infinity); export it again as PCM audio."
        )
    return audio[: int(max_seconds * SAMPLE_RATE)]


def _declared_seconds(container, stream, origin: str | bytes) -> float | None:
    """The length the file says it has, when that is a statement and not FFmpeg's guess."""
    if container.format.name == "wav":
        # FFmpeg clips a WAV's length to the file size, which hides truncation: read the header.
        return _wav_declared_seconds(_read_at(origin, 0, _HEAD_BYTES))
    if container.format.name == "mp3" and not _has_mp3_length_tag(origin):
        return None  # without a Xing/Info/VBRI tag FFmpeg estimates from the first frame's bitrate
    if stream.duration:
        return float(stream.duration * stream.time_base)
    if container.duration:
        return container.duration / av.time_base
    return None


def _wav_declared_seconds(head: bytes) -> float | None:
    """data chunk size / byte rate from a RIFF/WAVE header, None when unknown or a placeholder."""
    if head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return None
    position, byte_rate = 12, 0
    while position + 8 <= len(head):
        chunk, size = head[position : position + 4], int.from_bytes(head[position + 4 : position + 8], "little")
        if chunk == b"fmt ":
            byte_rate = int.from_bytes(head[position + 16 : position + 20], "little")
        elif chunk == b"data":
            # Streaming writers leave 0 or 0xFFFFFFFF here; nothing real exceeds the file cap.
            return size / byte_rate if byte_rate and 0 < size <= MAX_FILE_BYTES else None
        position += 8 + size + (size & 1)
    return None


def _has_mp3_length_tag(origin: str | bytes) -> bool:
    """Whether the first MP3 frame carries a frame count (LAME/FFmpeg Xing or Info, or VBRI)."""
    id3 = _read_at(origin, 0, 10)
    start = 0
    if id3[:3] == b"ID3" and len(id3) == 10:
        size = (id3[6] << 21) | (id3[7] << 14) | (id3[8] << 7) | id3[9]  # 7 bits a byte
        start = 10 + size + (10 if id3[5] & 0x10 else 0)
    first_frame = _read_at(origin, start, 2048)
    return any(tag in first_frame for tag in (b"Xing", b"Info", b"VBRI"))


def _read_at(origin: str | bytes, offset: int, size: int) -> bytes:
    if isinstance(origin, bytes):
        return origin[offset : offset + size]
    with open(origin, "rb") as file:
        file.seek(offset)
        return file.read(size)


def _same_format(a: av.AudioFrame, b: av.AudioFrame) -> bool:
    return (a.format.name, a.layout.nb_channels, a.sample_rate) == (
        b.format.name, b.layout.nb_channels, b.sample_rate)


def _frames_samples(frames: list[av.AudioFrame]) -> np.ndarray:
    """Consecutive decoded frames of one format as [n, channels] in their own sample type."""
    # to_ndarray gives planar frames as [channels, n] and packed ones as [1, n * channels].
    samples = np.concatenate([frame.to_ndarray() for frame in frames], axis=1)
    if frames[0].format.is_planar:
        return samples.T
    return samples.reshape(-1, frames[0].layout.nb_channels)


def _mono_float32(samples: np.ndarray) -> np.ndarray:
    """[n] or [n, channels] of any PCM type to float32 [n] in [-1, 1], channels averaged."""
    samples = np.asarray(samples)
    assert samples.ndim in (1, 2), f"expected [n] or [n, channels], got shape {samples.shape}"
    columns = [samples] if samples.ndim == 1 else [samples[:, c] for c in range(samples.shape[1])]
    # Summing columns beats .mean(axis=1), which strides across every interleaved frame.
    mono = columns[0].astype(np.float32)  # always a copy, so the in-place steps below are safe
    for column in columns[1:]:
        mono += column
    kind, bits = samples.dtype.kind, samples.dtype.itemsize * 8
    if kind == "u":
        mono -= len(columns) * 2.0 ** (bits - 1)  # unsigned PCM (8-bit WAV) is centred on 128
    scale = 1.0 if kind == "f" else 2.0 ** -(bits - 1)
    if len(columns) > 1 or scale != 1.0:
        mono *= scale / len(columns)
    return mono


def _too_long_text(seconds: float, max_seconds: float, *, found_all: bool = True) -> str:
    length = _duration_text(seconds) if found_all else f"over {_duration_text(seconds)}"
    return f"The recording is {length} long; the limit is {_duration_text(max_seconds)}."


def _duration_text(seconds: float) -> str:
    """'1.9 s', '45 s', '31 min 12 s', '1 h 5 min': durations as messages show them."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    minutes, whole_s = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    parts = [f"{value} {unit}" for value, unit in ((hours, "h"), (minutes, "min"), (whole_s, "s")) if value]
    return " ".join(parts)


def _bytes_text(size: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale:
            return f"{size / scale:.3g} {unit}"
    return f"{size} bytes"
