"""Recordings longer than the model hears, read part by part and cut at quiet moments.

AF-Next hears 30 minutes at most (`audio.MAX_AUDIO_S`). A longer recording, up to MAX_RECORDING_S
(4 hours), is decoded as a stream and cut into parts of at most that length, each with its offset
in the whole recording. Where the length is known before decoding (most files state it), the parts
are even: n = ceil(length / (limit - CUT_SEARCH_S)) parts, so every cut has CUT_SEARCH_S of room and
no part runs over the limit. Where it is not (an MP3 with no length tag, raw AAC), each part is as
long as the limit allows.

Each cut falls at the quietest QUIET_SPAN_S (a pause between words) within CUT_SEARCH_S of where an
even cut would be; among moments within QUIET_TOLERANCE_DB of the quietest, the one nearest the
even cut. Only a minute with no pause at all (continuous music) is cut mid-sound.

Memory: the part being read (at most 30 minutes of float32, 115 MB) plus a few decoded blocks;
never the whole recording, which for 4 hours would be 922 MB before its features.

Decoding is what costs (measured on 2 cores: 6.5 s for 75 minutes of MP3, 3.7 s of FLAC, 0.2 s of 16 kHz
WAV), so a recording read once can be kept as a `Decoded`: its 16 kHz samples in a file of their own
(4 bytes a sample: 288 MB for 75 minutes) and the lengths of the parts it was cut into.
`split_recording` reads that back part by part, by range: the same parts, nothing decoded again.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from .audio import LIMIT_GRACE_S, MAX_AUDIO_S, SAMPLE_RATE, AudioError
from .media import stream_audio

MAX_RECORDING_S = 4 * 3600.0  # seconds: the longest recording taken (8 or 9 parts of the model's 30 min)
CUT_SEARCH_S = 60.0  # seconds of room around each even cut in which the quietest moment is sought
QUIET_SPAN_S = 0.3  # seconds: the quiet stretch a cut looks for, about a pause between words
QUIET_TOLERANCE_DB = 1.0  # moments this close to the quietest count as equally quiet
ENERGY_FRAME = 160  # samples: energy is measured per 10 ms


@dataclass(frozen=True)
class Part:
    """One part of a long recording."""

    index: int  # 0-based
    start_s: float  # where it starts in the whole recording, seconds
    audio: np.ndarray  # float32 mono 16 kHz, at most the part limit long
    parts: int | None  # how many parts the recording has, when its length was known before decoding

    @property
    def duration_s(self) -> float:
        return self.audio.size / SAMPLE_RATE

    @property
    def end_s(self) -> float:
        return self.start_s + self.duration_s


@dataclass(frozen=True)
class Decoded:
    """A recording already decoded and cut: the whole of it as raw float32 mono 16 kHz samples in the
    file `path` (native byte order, nothing else in the file), and each part as it was cut then."""

    path: str
    part_s: float  # the part length it was cut with
    parts: tuple[tuple[int, int | None], ...]  # each part's samples, and the part count it stated when read

    @property
    def duration_s(self) -> float:
        return sum(n for n, _ in self.parts) / SAMPLE_RATE


def search_s(part_s: float) -> float:
    """Seconds of room around each cut: CUT_SEARCH_S, or a quarter of a part when parts are short."""
    return min(CUT_SEARCH_S, part_s / 4)


def part_count(total_s: float, part_s: float = MAX_AUDIO_S) -> int:
    """Parts a recording of `total_s` seconds is cut into (1 if it fits the model whole)."""
    if total_s <= part_s + LIMIT_GRACE_S:
        return 1
    return math.ceil(total_s / (part_s - search_s(part_s)))


NEAR_LIMIT = 15 / 16  # stated lengths above this share of a limit are measured (`longer_than`)


def longer_than(source, seconds: float, *, decode: bool = True) -> bool | None:
    """Whether `source` runs over `seconds` (plus the grace `load_audio` trims): by the length its file
    states, else by decoding until it does (bounded memory). AudioError for unusable audio. With
    `decode=False`, None where only decoding could tell: the caller decodes it once, to hear it."""
    if isinstance(source, np.ndarray):  # 16 kHz samples in memory: their count says it (no copy to check)
        return source.shape[0] / SAMPLE_RATE > seconds + LIMIT_GRACE_S
    declared_s, blocks = stream_audio(source, max_seconds=MAX_RECORDING_S)
    # A stated length a little under the limit is checked by decoding: an MP3's frame count can fall a
    # few percent short of what it holds, and `load_audio` would then refuse it as over the limit.
    if declared_s is not None and not seconds * NEAR_LIMIT < declared_s <= seconds + LIMIT_GRACE_S:
        blocks.close()
        return declared_s > seconds + LIMIT_GRACE_S
    if not decode:
        blocks.close()
        return None
    found = 0
    try:
        for block in blocks:
            found += block.size
            if found > (seconds + LIMIT_GRACE_S) * SAMPLE_RATE:
                return True
    finally:
        blocks.close()
    return False


def split_recording(source, *, part_s: float = MAX_AUDIO_S, max_seconds: float = MAX_RECORDING_S) -> Iterator[Part]:
    """Decode `source` (a path, bytes, a (sample_rate, samples) pair or a 16 kHz array) and yield its
    parts in order as they are read. Raises AudioError (one sentence) for unusable or too-long audio:
    at the call when the file says so up front, else from the iterator. A `Decoded` source is read back
    as it was cut (checked when it was decoded), without decoding."""
    if max_seconds > MAX_RECORDING_S:
        raise ValueError(f"max_seconds is at most {MAX_RECORDING_S:.0f} s")
    if isinstance(source, Decoded):
        return _decoded_parts(source, part_s)
    declared_s, blocks = stream_audio(source, max_seconds=max_seconds)
    return _parts(blocks, declared_s, part_s)


def _decoded_parts(decoded: Decoded, part_s: float) -> Iterator[Part]:
    """A `Decoded` recording's parts, each read by range when its turn comes (one part in memory)."""
    if part_s != decoded.part_s:  # cut for another length (a model hearing less): cut again, from its samples
        total = sum(n for n, _ in decoded.parts)
        yield from _parts(_samples_blocks(decoded.path, total), total / SAMPLE_RATE, part_s)
        return
    start = 0
    for index, (size, parts) in enumerate(decoded.parts):
        yield Part(index, start / SAMPLE_RATE, _samples(decoded.path, start, size), parts)
        start += size


DECODED_BLOCK = 60 * SAMPLE_RATE  # samples read at a time when a `Decoded` recording is cut again (3.8 MB)


def _samples_blocks(path: str, total: int) -> Iterator[np.ndarray]:
    for start in range(0, total, DECODED_BLOCK):
        yield _samples(path, start, min(DECODED_BLOCK, total - start))


def _samples(path: str, start: int, size: int) -> np.ndarray:
    """`size` samples from sample `start` of a `Decoded` recording's file; AudioError if it is gone or short
    (the recording was closed meanwhile)."""
    try:
        samples = np.fromfile(path, np.float32, count=size, offset=start * 4)
    except OSError as error:
        raise AudioError(f"The decoded recording could not be read ({error.strerror}); open it again.") from error
    if samples.size != size:
        raise AudioError("The decoded recording was cut short; open it again.")
    return samples


def _parts(blocks: Iterator[np.ndarray], total_s: float | None, part_s: float) -> Iterator[Part]:
    """Cut a stream of blocks: each cut is decided once the audio up to its search window's end has come."""
    n = part_count(total_s, part_s) if total_s is not None else None
    search = round(search_s(part_s) * SAMPLE_RATE)
    limit = round(part_s * SAMPLE_RATE)
    grace = round(LIMIT_GRACE_S * SAMPLE_RATE)
    # One sample of room over the limit and its grace: a recording of exactly that length is one part, as
    # `longer_than` and `load_audio` take it; a part is cut only once more than that has come.
    buffer = _Buffer(limit + grace + 1)
    start, index = 0, 0  # the current part's first sample in the recording, and its index
    for block in blocks:
        while block.size:
            block = buffer.fill(block)
            lo, hi = _window(index, start, n, total_s, limit, search)
            if len(buffer) > hi - start + grace:  # all of the window has come, and more than a grace
                target = _target(index, n, total_s, hi) - start
                cut = _quietest(buffer.view(), lo - start, hi - start, target)
                if n is not None and index >= n - 1:  # it runs on past the length it stated: count unknown
                    n = None
                yield Part(index, start / SAMPLE_RATE, buffer.take(cut), n)
                start, index = start + cut, index + 1
    if index > 0 and len(buffer) > limit:
        # A later part up to its grace over the limit: the recording's end, not a clip's padding (only a
        # recording heard whole is trimmed, as `load_audio` trims it). It is cut once more, the last part
        # at least the grace long.
        cut = _quietest(buffer.view(), limit - search, len(buffer) - grace, len(buffer) - grace)
        yield Part(index, start / SAMPLE_RATE, buffer.take(cut), index + 2)
        start, index = start + cut, index + 1
    if len(buffer):
        yield Part(index, start / SAMPLE_RATE, buffer.take(min(len(buffer), limit)), index + 1)
    elif index == 0:
        raise AudioError("The recording has no samples (0 s of audio); record it again.")


def _window(index: int, start: int, n: int | None, total_s: float | None, limit: int,
            search: int) -> tuple[int, int]:
    """[lo, hi] samples (absolute) where part `index`, starting at `start`, may end (`search`: the room, samples)."""
    hi = start + limit
    if n is not None and index < n - 1:
        even = round((index + 1) * total_s / n * SAMPLE_RATE)
        return max(start + 1, even - search // 2), min(hi, even + search // 2)
    return max(start + 1, hi - search), hi


def _target(index: int, n: int | None, total_s: float | None, hi: int) -> int:
    """Where an even cut would be (the window's end when the length is unknown)."""
    if n is not None and index < n - 1:
        return min(round((index + 1) * total_s / n * SAMPLE_RATE), hi)
    return hi


def _quietest(audio: np.ndarray, lo: int, hi: int, target: int) -> int:
    """The cut in audio[lo:hi] (relative samples): the middle of the quietest QUIET_SPAN_S, the one
    nearest `target` among those within QUIET_TOLERANCE_DB of it."""
    first = lo // ENERGY_FRAME
    frames = audio[first * ENERGY_FRAME: (hi // ENERGY_FRAME) * ENERGY_FRAME].reshape(-1, ENERGY_FRAME)
    span = max(1, round(QUIET_SPAN_S * SAMPLE_RATE / ENERGY_FRAME))
    if len(frames) < span:
        return min(max(target, lo), hi)
    energy = np.square(frames, dtype=np.float64).mean(axis=1)
    smooth = np.convolve(energy, np.ones(span) / span, mode="valid")  # mean energy of each span
    level = 10 * np.log10(smooth + 1e-12)
    quiet = np.flatnonzero(level <= level.min() + QUIET_TOLERANCE_DB)
    centres = (first + quiet) * ENERGY_FRAME + span * ENERGY_FRAME // 2
    best = int(centres[np.argmin(np.abs(centres - target))])
    return min(max(best, lo), hi)


class _Buffer:
    """The part being read: a preallocated float32 array filled block by block."""

    def __init__(self, capacity: int) -> None:
        self._data = np.empty(capacity, np.float32)
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def fill(self, block: np.ndarray) -> np.ndarray:
        """Copy in what fits of `block`; the rest is returned."""
        n = min(block.size, self._data.size - self._size)
        self._data[self._size:self._size + n] = block[:n]
        self._size += n
        return block[n:]

    def view(self) -> np.ndarray:
        return self._data[: self._size]

    def take(self, n: int) -> np.ndarray:
        """The first `n` samples (handed over as they are, no copy); the rest starts a new buffer."""
        data, rest = self._data, self._data[n: self._size]
        self._data = np.empty(data.size, np.float32)
        self._data[: rest.size] = rest
        self._size = rest.size
        return data[:n]
