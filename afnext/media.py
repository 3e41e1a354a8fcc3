"""Files and bytes in: any recording, or a video's sound track, decoded to float32 mono 16 kHz.

Files and uploads are decoded with PyAV (the FFmpeg libraries in its wheel), downmixed by averaging
the channels and resampled with soxr (audio.py's `MonoResampler`), a worker thread decoding ahead.
What a file states is checked before decoding (its size, its format, the length its header declares:
WAV and MP3 headers are read here), what decoding finds with audio.py's checks; either is refused
with an `AudioError`.
"""

from __future__ import annotations

import io
import os
import queue
import threading
from collections.abc import Iterator

import av
import numpy as np

from .audio import (INVALID_SAMPLES, LIMIT_GRACE_S, MAX_AUDIO_S, MAX_FILE_BYTES, NO_SAMPLES, SAMPLE_RATE,
                    TRUNCATION_TOLERANCE_S, AudioError, AudioTooLong, MonoResampler, check_path, check_rate,
                    check_size, checked_samples, duration_text, pcm_array, to_mono_16k, too_long_text,
                    truncated_text)

FRAMES_PER_BLOCK = 64  # decoded frames converted per numpy/soxr call (an MP3 frame is 1152
#                        samples); converting frame by frame cost more than decoding 30 min of MP3
DECODE_AHEAD_BLOCKS = 4  # decoded blocks the decoder may hold before they are resampled (a few MB each)
MAX_BAD_PACKETS = 8  # undecodable packets passed over, plus one per 100 good ones (a join of MP3 files
#                      has one: 4 hours of chapters joined may have a hundred); more and the file is damaged

# Demuxers we let FFmpeg use on untrusted uploads: audio files, and the common video containers
# whose sound track a user may hand us (avi, asf for wma/wmv, flv, mpegts, mpeg for mpg/vob). None of
# them opens anything but the one input. Playlist-style demuxers (hls, concat, the image-sequence
# ones) can make FFmpeg open other files or URLs, and "tty" would accept any .txt file as a video.
_DEMUXERS = "wav,w64,aiff,flac,mp3,ogg,matroska,mov,aac,caf,amr,avi,asf,flv,mpegts,mpeg,au,voc"
_CONTAINER_OPTIONS = {
    "format_whitelist": _DEMUXERS,
    "protocol_whitelist": "file",
    # bytes per WAV packet: FFmpeg's 4 KiB makes 77,000 packets of 30 min of 44.1 kHz stereo;
    # much bigger ones slow down opening (its stream probe took 0.27 s with 1 MiB packets).
    "max_size": str(1 << 16),
}
# FFmpeg sample formats (without the planar "p") and their native-endian numpy types.
_SAMPLE_TYPES = {"u8": np.uint8, "s16": np.int16, "s32": np.int32, "s64": np.int64,
                 "flt": np.float32, "dbl": np.float64}
_KNOWN_FORMATS = "wav, flac, mp3, ogg, webm or m4a audio, or an mp4, mkv, mov, avi, wmv, flv or ts video with sound"
# Raw ADTS AAC and AMR state no length, and neither does an MP3 without a Xing/Info/VBRI tag:
# FFmpeg's guess from the first frames' bitrate can be far off for variable-bitrate files.
_GUESSED_LENGTH_FORMATS = {"aac", "amr"}
_HEAD_BYTES = 1 << 16  # bytes read to find a WAV data chunk or an MP3 Xing/Info/VBRI tag


def load_audio(
    source: str | os.PathLike | bytes | tuple[int, np.ndarray], *, max_seconds: float = MAX_AUDIO_S
) -> np.ndarray:
    """Decode a file path, the bytes of a file, or a (sample_rate, samples) pair.

    Returns float32 mono samples at SAMPLE_RATE (16 kHz), shape [n], n > 0, all finite, at most
    `max_seconds` long. Raises AudioError for anything unusable.
    """
    if isinstance(source, tuple):
        return _load_pair(source, max_seconds)
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        check_size(len(data))
        return _load(io.BytesIO(data), data, max_seconds)
    path = os.fspath(source)
    check_path(path)
    # "file:" stops FFmpeg from reading a colon in the name as a protocol ("rtmp:", "concat:").
    return _load("file:" + path, path, max_seconds)


def stream_audio(
    source: str | os.PathLike | bytes | tuple[int, np.ndarray] | np.ndarray, *, max_seconds: float = MAX_AUDIO_S
) -> tuple[float | None, Iterator[np.ndarray]]:
    """A recording as it decodes: (the length its file states in seconds, or None where the format
    does not say; consecutive float32 mono 16 kHz blocks).

    Checks as `load_audio` does; what can be refused before decoding (a missing file, an unknown
    format, a stated length over `max_seconds`) raises here, and what shows only while decoding
    raises from the iterator. The whole recording is never held: at most a few decoded blocks.
    An array or a (sample_rate, samples) pair is already whole in memory; it comes as one block.
    """
    if isinstance(source, (tuple, np.ndarray)):
        whole = load_audio(source if isinstance(source, tuple) else (SAMPLE_RATE, source), max_seconds=max_seconds)
        return whole.size / SAMPLE_RATE, _one_block(whole)
    if isinstance(source, (bytes, bytearray, memoryview)):
        origin = bytes(source)
        check_size(len(origin))
        target: str | io.BytesIO = io.BytesIO(origin)
    else:
        origin = os.fspath(source)
        check_path(origin)
        target = "file:" + origin
    container = _open(target)
    try:
        stream = _audio_stream(container)
        declared_s = _declared_seconds(container, stream, origin)
        if declared_s is not None and declared_s > max_seconds + LIMIT_GRACE_S:
            raise AudioTooLong(too_long_text(declared_s, max_seconds))
    except BaseException:
        container.close()
        raise
    return declared_s, _checked_blocks(container, stream, max_seconds, declared_s)


def _one_block(block: np.ndarray) -> Iterator[np.ndarray]:
    yield block


def _checked_blocks(container, stream, max_seconds: float, declared_s: float | None) -> Iterator[np.ndarray]:
    """`checked_samples` applied block by block: the grace trimmed, truncation and emptiness found at the end."""
    limit, found = int(max_seconds * SAMPLE_RATE), 0
    with container:
        for block in _decoded(container, stream, max_seconds):
            if not np.isfinite(block).all():
                raise AudioError(INVALID_SAMPLES)
            if found < limit and block.size:
                yield block[: limit - found]
            found += block.size
    if declared_s is not None and found / SAMPLE_RATE < declared_s - TRUNCATION_TOLERANCE_S:
        raise AudioError(truncated_text(declared_s, found / SAMPLE_RATE))
    if not found:
        raise AudioError(NO_SAMPLES)


def _load_pair(source: tuple, max_seconds: float) -> np.ndarray:
    """(sample_rate, samples) → float32 mono 16 kHz; the length is checked before resampling, so a
    tiny rate cannot make soxr build gigabytes."""
    if len(source) != 2:
        raise AudioError(f"Audio given as a tuple must be (sample_rate, samples), not {len(source)} items.")
    sample_rate, samples = source
    check_rate(sample_rate)
    samples = pcm_array(samples)
    seconds = len(samples) / sample_rate
    if seconds > max_seconds + LIMIT_GRACE_S:
        raise AudioTooLong(too_long_text(seconds, max_seconds))
    return checked_samples(to_mono_16k(samples, sample_rate), max_seconds, declared_s=None)


def _load(target: str | io.BytesIO, origin: str | bytes, max_seconds: float) -> np.ndarray:
    """Open, check the declared length, decode; `origin` is where header bytes can be re-read."""
    with _open(target) as container:
        stream = _audio_stream(container)
        declared_s = _declared_seconds(container, stream, origin)
        if declared_s is not None and declared_s > max_seconds + LIMIT_GRACE_S:
            raise AudioTooLong(too_long_text(declared_s, max_seconds))
        audio = _decode(container, stream, max_seconds)
    return checked_samples(audio, max_seconds, declared_s)


def _open(target: str | io.BytesIO) -> av.container.InputContainer:
    try:
        # Tags are never read here, but PyAV decodes them strictly: one bad byte in a title raised
        # UnicodeDecodeError past every check.
        return av.open(target, container_options=dict(_CONTAINER_OPTIONS), metadata_errors="replace")
    except av.error.FFmpegError as error:
        raise AudioError(f"The file is not audio in a known format; use {_KNOWN_FORMATS}.") from error


def _audio_stream(container: av.container.InputContainer) -> av.audio.stream.AudioStream:
    if container.streams.audio:
        return container.streams.audio[0]
    kinds = sorted({stream.type for stream in container.streams}) or ["nothing"]
    raise AudioError(
        f"The file has no audio track (only {' and '.join(kinds)}); export its sound as audio first."
    )


def _decode(container: av.container.InputContainer, stream, max_seconds: float) -> np.ndarray:
    """All of `stream` as float32 mono 16 kHz."""
    blocks = list(_decoded(container, stream, max_seconds))
    return np.concatenate(blocks) if blocks else np.zeros(0, np.float32)


def _decoded(container: av.container.InputContainer, stream, max_seconds: float) -> Iterator[np.ndarray]:
    """`stream` as consecutive float32 mono 16 kHz blocks.

    A worker thread decodes (FFmpeg releases the GIL) while this one converts and resamples, so
    30 min of MP3 or FLAC keeps both cores busy instead of one. The worker stays at most
    DECODE_AHEAD_BLOCKS ahead: a 4-hour recording read part by part is never in memory whole.
    """
    batches: queue.Queue = queue.Queue(maxsize=DECODE_AHEAD_BLOCKS)
    stop = threading.Event()
    worker = threading.Thread(
        target=_decode_frames, args=(container, stream, max_seconds, batches, stop),
        name="afnext-decode", daemon=True,
    )
    worker.start()
    try:
        yield from _resampled(batches)
    finally:
        stop.set()
        # No timeout: closing the container under a running decode would crash FFmpeg, and the
        # worker checks `stop` after every frame. Blocks it is waiting to hand over are taken.
        while worker.is_alive():
            try:
                batches.get(timeout=0.05)
            except queue.Empty:
                pass
        worker.join()


def _decode_frames(container, stream, max_seconds: float, batches: queue.Queue,
                   stop: threading.Event) -> None:
    """Worker: put (sample_rate, [n, channels] samples) blocks on `batches`, then None, or the
    error to raise. Frames are copied out here so FFmpeg can reuse their buffers at once."""
    batch: list[av.AudioFrame] = []
    decoded_s, outcome = 0.0, None
    try:
        for frame in _frames(container, stream):
            if stop.is_set():
                return
            if batch and (len(batch) == FRAMES_PER_BLOCK or _format(frame) != _format(batch[0])):
                batches.put((batch[0].sample_rate, _frames_samples(batch)))
                batch = []
            check_rate(frame.sample_rate)  # a damaged header can say 0 Hz or 2 GHz
            decoded_s += frame.samples / frame.sample_rate
            if decoded_s > max_seconds + LIMIT_GRACE_S:
                raise AudioTooLong(too_long_text(decoded_s, max_seconds, found_all=False))
            batch.append(frame)
        if batch:
            batches.put((batch[0].sample_rate, _frames_samples(batch)))
    except av.error.FFmpegError as error:
        outcome = AudioError(
            f"The file is damaged or incomplete: decoding failed after {duration_text(decoded_s)} of audio."
        )
        outcome.__cause__ = error
    except Exception as error:  # re-raised in the caller's thread
        outcome = error
    finally:
        batches.put(outcome)


def _frames(container: av.container.InputContainer, stream) -> Iterator[av.AudioFrame]:
    """`container.decode(stream)`, passing over packets the decoder refuses as FFmpeg's own tools and
    players do: the ID3 tag and Info frame in the middle of MP3 files joined end to end, a broken frame
    in a radio recording. A file mostly of such packets is damaged; and where a file states its length,
    audio lost that way is found by the truncation check."""
    bad = good = 0
    for packet in container.demux(stream):
        try:
            frames = packet.decode()
        except av.error.InvalidDataError:
            bad += 1
            if bad > MAX_BAD_PACKETS + good // 100:
                raise
            continue
        good += 1
        yield from frames


def _resampled(batches: queue.Queue) -> Iterator[np.ndarray]:
    """`_decode_frames` output as float32 mono 16 kHz blocks (a format change mid-file gets its own resampler)."""
    resampler: MonoResampler | None = None
    while isinstance(block := batches.get(), tuple):
        sample_rate, samples = block
        if resampler is None or sample_rate != resampler.sample_rate:
            if resampler is not None:
                yield resampler.flush()
            resampler = MonoResampler(sample_rate)
        yield resampler.push(samples)
    if block is not None:
        raise block
    if resampler is not None:
        yield resampler.flush()


def _declared_seconds(container, stream, origin: str | bytes) -> float | None:
    """The length the file states, or None where FFmpeg could only guess it from the bitrate."""
    name = container.format.name
    if name == "wav":
        # FFmpeg clips a WAV's length to the file size, which hides truncation: read the header.
        return _wav_declared_seconds(_read_at(origin, 0, _HEAD_BYTES), _size(origin))
    if name in _GUESSED_LENGTH_FORMATS or name == "mp3" and not _has_mp3_length_tag(origin):
        return None
    if stream.duration:
        return float(stream.duration * stream.time_base)
    if container.duration:
        return container.duration / av.time_base
    return None


def _wav_declared_seconds(head: bytes, file_bytes: int) -> float | None:
    """data chunk size / byte rate from a RIFF/WAVE header, None when unknown.

    Streaming writers (a recorder that crashed, ffmpeg to a pipe) leave 0 or 0xFFFFFFFF as the size:
    then the data runs to the end of the file, as FFmpeg reads it, and that is its length, so a
    4-hour limit is checked before decoding and long ones are cut in even parts."""
    if head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return None
    position, byte_rate = 12, 0
    while position + 8 <= len(head):
        chunk = head[position : position + 4]
        size = int.from_bytes(head[position + 4 : position + 8], "little")
        if chunk == b"fmt ":
            byte_rate = int.from_bytes(head[position + 16 : position + 20], "little")
        elif chunk == b"data":
            if size in (0, 0xFFFFFFFF):
                size = file_bytes - position - 8
            # Nothing real exceeds the file cap.
            return size / byte_rate if byte_rate and 0 < size <= MAX_FILE_BYTES else None
        position += 8 + size + (size & 1)
    return None


def _has_mp3_length_tag(origin: str | bytes) -> bool:
    """Whether the first MP3 frame carries a frame count (LAME/FFmpeg Xing or Info, or VBRI) that
    is the whole file's. MP3 files joined end to end (`cat` of chapters or segments) keep the first
    one's tag: where the file is over 1/16 bigger than the bytes its tag states, FFmpeg replaces the
    length by a guess from the first frames' bitrate ("invalid concatenated file detected"), which
    states nothing."""
    id3 = _read_at(origin, 0, 10)
    start = 0
    if id3[:3] == b"ID3" and len(id3) == 10:
        size = (id3[6] << 21) | (id3[7] << 14) | (id3[8] << 7) | id3[9]  # 7 bits a byte
        start = 10 + size + (10 if id3[5] & 0x10 else 0)
    first_frame = _read_at(origin, start, 2048)
    stated = None  # bytes of audio the tag states, where it does
    if tags := [i for i in (first_frame.find(b"Xing"), first_frame.find(b"Info")) if i >= 0]:
        at = min(tags)
        flags = int.from_bytes(first_frame[at + 4 : at + 8], "big")
        field = at + 8 + (4 if flags & 1 else 0)  # the frame count comes first when present
        stated = int.from_bytes(first_frame[field : field + 4], "big") if flags & 2 else None
    elif (at := first_frame.find(b"VBRI")) >= 0:
        stated = int.from_bytes(first_frame[at + 10 : at + 14], "big")
    else:
        return False
    return not stated or _size(origin) - start <= stated + stated // 16


def _size(origin: str | bytes) -> int:
    return len(origin) if isinstance(origin, bytes) else os.path.getsize(origin)


def _read_at(origin: str | bytes, offset: int, size: int) -> bytes:
    if isinstance(origin, bytes):
        return origin[offset : offset + size]
    with open(origin, "rb") as file:
        file.seek(offset)
        return file.read(size)


def _format(frame: av.AudioFrame) -> tuple[str, int, int]:
    return frame.format.name, frame.layout.nb_channels, frame.sample_rate


def _frames_samples(frames: list[av.AudioFrame]) -> np.ndarray:
    """Consecutive decoded frames of one format as [n, channels] in their own sample type."""
    first = frames[0]
    dtype = np.dtype(_SAMPLE_TYPES[first.format.name.removesuffix("p")])
    channels = first.layout.nb_channels
    # Plane buffers are joined as bytes: `to_ndarray` per frame costs 5 us, 0.4 s on 30 min of
    # MP3. Planes may hold more than `samples`, so each is cut to its valid part.
    if first.format.is_planar:
        data = b"".join(
            memoryview(frame.planes[c])[: frame.samples * dtype.itemsize]
            for c in range(channels) for frame in frames
        )
        return np.frombuffer(data, dtype).reshape(channels, -1).T
    data = b"".join(memoryview(f.planes[0])[: f.samples * dtype.itemsize * channels] for f in frames)
    return np.frombuffer(data, dtype).reshape(-1, channels)

