"""Audio in: the one internal format, float32 mono 16 kHz, its limits, and the checks every source passes.

Samples already in memory (a microphone's blocks, an array) are converted here: downmixed by
averaging the channels and resampled with soxr; files and uploads are decoded in media.py, and the
encoder's log-mel windows made in mel.py. Bad input is refused at the boundary, with an `AudioError`
whose message is one sentence the user can act on; nothing past these modules has to check audio
again. No PyAV and no torch here: the desktop client resamples with this module and has no torch.
"""

from __future__ import annotations

import numbers
import os
import stat

import numpy as np
import soxr

SAMPLE_RATE = 16000  # Hz: the only rate the AF-Whisper encoder understands
MAX_AUDIO_S = 1800.0  # seconds: AF-Next's 30-minute limit (60 windows, 45,000 audio tokens)
# bytes: 30 min of 48 kHz stereo float32 WAV is 691 MB, so any recording the model can take fits,
# while one upload cannot make us read gigabytes before the duration check refuses it.
MAX_FILE_BYTES = 1 << 30
LIMIT_GRACE_S = 1.0  # seconds over the limit that are trimmed, not refused (encoder padding, a
#                      "30 min" phone recording that is really 30:00.4)
TRUNCATION_TOLERANCE_S = 0.5  # seconds a decode may fall short of the declared length (codec
#                               priming and container rounding stay well under 0.1 s)
MAX_SAMPLE_RATE = 768_000  # Hz: the highest rate audio interfaces record at; a larger rate in a
#                            header only makes soxr chew through a gigabyte for a fraction of a second
MAX_CHANNELS = 64  # channels: more than any recording has; a [channels, n] array passed as
#                    [n, channels] shows up as thousands of "channels" of a few samples each
MAX_NAME_CHARS = 80  # characters of a file name quoted back in an error message


NO_SAMPLES = "The recording has no samples (0 s of audio); record it again."
INVALID_SAMPLES = "The recording contains invalid samples (NaN or infinity); export it again as PCM audio."


class AudioError(ValueError):
    """Input audio we refuse; the message is one sentence for the user."""


class AudioTooLong(AudioError):
    """Audio refused for its length (over the limit it was checked against): a caller that can hear a
    longer recording in parts (split.py) takes it there, where the rest of it is checked, without
    decoding it again to find out why it was refused."""


def checked_16k(samples: np.ndarray, max_seconds: float = MAX_AUDIO_S) -> np.ndarray:
    """float32 mono 16 kHz samples checked as `media.load_audio` checks what it decodes (AudioError: empty,
    too long, NaN or infinity), without a copy; over the limit by at most the grace, a view trimmed to it."""
    return checked_samples(samples, max_seconds, declared_s=None)


def load_file(path: str | os.PathLike) -> bytes:
    """A file's bytes, checked as `media.load_audio` checks a path (AudioError with one sentence): for
    keeping the very bytes a turn was decoded from."""
    path = os.fspath(path)
    check_path(path)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as error:
        raise AudioError(f"The file {_name_text(path)} could not be read ({error.strerror}).") from error
    check_size(len(data))
    return data


def to_mono_16k(samples: np.ndarray, sample_rate: int) -> np.ndarray:
    """float32 mono 16 kHz from int16/int32/uint8/float samples shaped [n] or [n, channels].

    Integers are scaled to [-1, 1), channels averaged. For one whole clip; a stream cut into
    chunks should go through one `MonoResampler` so chunk edges leave no clicks.
    """
    check_rate(sample_rate)
    mono = mono_float32(samples)
    if sample_rate == SAMPLE_RATE or mono.size == 0:
        return mono
    return soxr.resample(mono, sample_rate, SAMPLE_RATE)


class MonoResampler:
    """Streaming `to_mono_16k` for one source: soxr keeps its filter state between chunks.

    `out_rate` defaults to the model's 16 kHz; the playback side uses it for the speaker's rate.
    """

    def __init__(self, sample_rate: int, out_rate: int = SAMPLE_RATE) -> None:
        check_rate(sample_rate)
        self.sample_rate = sample_rate  # Hz of the input
        self._stream = None
        if sample_rate != out_rate:
            self._stream = soxr.ResampleStream(sample_rate, out_rate, 1, dtype="float32")

    def push(self, samples: np.ndarray) -> np.ndarray:
        """Convert the next chunk ([n] or [n, channels]); output lags input by the filter delay."""
        mono = mono_float32(samples)
        return mono if self._stream is None else self._stream.resample_chunk(mono)

    def flush(self) -> np.ndarray:
        """The samples still held in the filter; call once, at the end of the stream."""
        empty = np.zeros(0, np.float32)
        return empty if self._stream is None else self._stream.resample_chunk(empty, last=True)


def check_size(size: int) -> None:
    if size == 0:
        raise AudioError("The file is empty (0 bytes); record or upload it again.")
    if size > MAX_FILE_BYTES:
        raise AudioError(
            f"The file is {_bytes_text(size)}, over the {_bytes_text(MAX_FILE_BYTES)} limit;"
            " compress it or send a shorter part."
        )


def check_path(path: str) -> None:
    """Refuse what FFmpeg must not open: missing, unreadable, and anything but a regular file.

    A FIFO (or /dev/stdin on a pipe) would block a plain open() until a writer came, and a device
    such as /dev/zero never ends, so the path is opened non-blocking and checked with fstat.
    """
    if not path:
        raise AudioError("The audio path is empty; give an audio file.")
    name = _name_text(path)
    try:
        descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise AudioError(f"The file {name} was not found; check the path.") from None
    except IsADirectoryError:
        raise AudioError(f"The path {name} is a folder, not an audio file.") from None
    except OSError as error:
        raise AudioError(f"The file {name} could not be read ({error.strerror}).") from error
    except ValueError:  # a NUL, or a lone surrogate the file system cannot encode
        raise AudioError(f"The path {name} has characters no file name can have; check the path.") from None
    try:
        info = os.fstat(descriptor)
    finally:
        os.close(descriptor)
    if stat.S_ISDIR(info.st_mode):
        raise AudioError(f"The path {name} is a folder, not an audio file.")
    if not stat.S_ISREG(info.st_mode):
        raise AudioError(f"The path {name} is not a regular file; give an audio file.")
    check_size(info.st_size)


def _name_text(path: str) -> str:
    """A file name as an error message quotes it: one printable line, not too long."""
    name = os.path.basename(path) or path
    if not name.isprintable():
        name = ascii(name)
    return name if len(name) <= MAX_NAME_CHARS else name[: MAX_NAME_CHARS - 1] + "…"


def checked_samples(audio: np.ndarray, max_seconds: float, declared_s: float | None) -> np.ndarray:
    """The checks every source shares, on the converted 16 kHz audio; trims the grace."""
    found_s = audio.size / SAMPLE_RATE
    if declared_s is not None and found_s < declared_s - TRUNCATION_TOLERANCE_S:
        raise AudioError(truncated_text(declared_s, found_s))
    if audio.size == 0:
        raise AudioError(NO_SAMPLES)
    if found_s > max_seconds + LIMIT_GRACE_S:
        raise AudioTooLong(too_long_text(found_s, max_seconds))
    if not np.isfinite(audio).all():
        raise AudioError(INVALID_SAMPLES)
    return audio[: int(max_seconds * SAMPLE_RATE)]


def check_rate(sample_rate: float) -> None:
    real = isinstance(sample_rate, numbers.Real) and not isinstance(sample_rate, bool)
    if not (real and 1 <= sample_rate <= MAX_SAMPLE_RATE):  # NaN fails the comparison too
        shown = ascii(sample_rate)[:MAX_NAME_CHARS]
        raise AudioError(f"The sample rate {shown} Hz is not a valid rate; use 1 to {MAX_SAMPLE_RATE:,} Hz.")


def pcm_array(samples) -> np.ndarray:
    """`samples` as a numeric array shaped [n] or [n, channels], or AudioError."""
    try:
        samples = np.asarray(samples)
    except (TypeError, ValueError):  # ragged lists, objects numpy cannot hold
        raise AudioError("The audio samples are not a numeric array; pass [n] or [n, channels] PCM.") from None
    if samples.dtype.kind not in "iuf":
        raise AudioError(f"The audio samples are of type {samples.dtype}; pass integer or float PCM.")
    if samples.ndim not in (1, 2):
        raise AudioError(f"The audio has shape {samples.shape}; expected [n] or [n, channels].")
    if samples.ndim == 2 and not 1 <= samples.shape[1] <= MAX_CHANNELS:
        raise AudioError(f"The audio has {samples.shape[1]} channels; expected 1 to {MAX_CHANNELS}, as [n, channels].")
    return samples


def mono_float32(samples: np.ndarray) -> np.ndarray:
    """[n] or [n, channels] of any PCM type to float32 [n] in [-1, 1], channels averaged."""
    samples = pcm_array(samples)
    columns = [samples] if samples.ndim == 1 else [samples[:, c] for c in range(samples.shape[1])]
    # Summing columns beats .mean(axis=1), which strides across every interleaved frame.
    # float64 beyond float32's range becomes inf, which `checked_samples` refuses: no warning needed.
    with np.errstate(over="ignore"):
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


def truncated_text(declared_s: float, found_s: float) -> str:
    return (f"The file is damaged or incomplete: it declares {duration_text(declared_s)} of audio"
            f" but only {duration_text(found_s)} could be decoded.")


def too_long_text(seconds: float, max_seconds: float, *, found_all: bool = True) -> str:
    length = duration_text(seconds) if found_all else f"over {duration_text(seconds)}"
    return f"The recording is {length} long; the limit is {duration_text(max_seconds)}."


def duration_text(seconds: float) -> str:
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
