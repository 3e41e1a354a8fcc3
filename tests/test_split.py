"""Long recordings cut into parts: at quiet moments, in order, with their offsets, in bounded memory."""

from __future__ import annotations

import json
import struct
import subprocess
import sys

import numpy as np
import pytest
import soundfile

from afnext import split
from afnext.audio import SAMPLE_RATE, AudioError
from afnext.media import stream_audio

MINUTE = 60 * SAMPLE_RATE  # samples


def speech(seconds: float, pauses: list[tuple[float, float]], seed: int = 0, block_s: float = 20.0):
    """Blocks of speech-like audio: 250 ms "words" of loud noise, 60 ms gaps between them (too short
    to count as a pause), and near-silence over each (start_s, end_s) in `pauses`."""
    rng = np.random.default_rng(seed)
    word, gap = round(0.25 * SAMPLE_RATE), round(0.06 * SAMPLE_RATE)
    total, done = round(seconds * SAMPLE_RATE), 0
    while done < total:
        n = min(round(block_s * SAMPLE_RATE), total - done)
        index = np.arange(done, done + n)
        loud = (index % (word + gap)) < word
        block = (rng.standard_normal(n) * np.where(loud, 0.3, 0.02)).astype(np.float32)
        for start, end in pauses:
            inside = (index >= start * SAMPLE_RATE) & (index < end * SAMPLE_RATE)
            block[inside] *= 0.01
        yield block
        done += n


def cuts(parts) -> list[float]:
    return [p.start_s for p in parts[1:]]


def inside(t: float, pauses) -> bool:
    return any(start <= t <= end for start, end in pauses)


def test_without_a_stated_length_parts_fill_the_limit_and_cut_in_the_pause_before_30_00():
    # Speech runs on across 30:00 and 60:00 (a naive cut would fall mid-word); the pauses sit in the
    # minute before each.
    pauses = [(29 * 60 + 35, 29 * 60 + 35.8), (59 * 60 + 10, 59 * 60 + 10.8)]
    parts = list(split._parts(speech(75 * 60, pauses), None, 1800.0))
    assert len(parts) == 3
    for at, pause in zip(cuts(parts), pauses):
        assert pause[0] <= at <= pause[1], (at, pause)
    assert [p.index for p in parts] == [0, 1, 2]
    assert all(p.duration_s <= 1800 for p in parts)
    assert sum(p.audio.size for p in parts) == 75 * MINUTE  # nothing lost or doubled at the cuts
    assert all(a.end_s == pytest.approx(b.start_s) for a, b in zip(parts, parts[1:]))
    assert parts[-1].parts == 3  # known once read to the end


def test_with_a_stated_length_parts_are_even_and_each_cut_is_in_the_pause_near_its_even_place():
    pauses = [(24 * 60 + 44, 24 * 60 + 44.6), (50 * 60 + 20, 50 * 60 + 20.5)]  # near 25:00 and 50:00
    parts = list(split._parts(speech(75 * 60, pauses), 75 * 60.0, 1800.0))
    assert [p.parts for p in parts] == [3, 3, 3]
    assert all(inside(at, pauses) for at in cuts(parts)), cuts(parts)
    assert sum(p.audio.size for p in parts) == 75 * MINUTE


def test_with_no_pause_at_all_the_cut_is_the_even_one():
    parts = list(split._parts(speech(70 * 60, []), 70 * 60.0, 1800.0))
    assert len(parts) == 3 and all(p.duration_s <= 1800 for p in parts)
    for i, at in enumerate(cuts(parts), 1):
        assert abs(at - i * 70 * 60 / 3) <= split.CUT_SEARCH_S / 2


@pytest.mark.parametrize("seconds, expected", [(1800.5, 1), (1801.5, 2), (3480, 2), (3481, 3), (4 * 3600, 9)])
def test_part_count(seconds, expected):
    assert split.part_count(seconds) == expected


def test_a_file_up_to_the_limit_is_one_part_trimmed_like_load_audio(tmp_path):
    path = tmp_path / "exact.wav"
    soundfile.write(path, np.zeros(round(1800.4 * SAMPLE_RATE), np.int16), SAMPLE_RATE)
    (part,) = split.split_recording(str(path))
    assert part.audio.size == 1800 * SAMPLE_RATE and part.parts == 1


def test_a_file_is_read_in_even_parts_with_their_offsets(tmp_path):
    path = tmp_path / "long.flac"
    with soundfile.SoundFile(path, "w", SAMPLE_RATE, 1, "PCM_16") as out:
        for block in speech(65 * 60, [], block_s=60):
            out.write(block)
    assert split.longer_than(str(path), 1800) and not split.longer_than(str(path), 3900)
    parts = list(split.split_recording(str(path)))
    assert [p.parts for p in parts] == [3, 3, 3]
    assert parts[0].start_s == 0 and parts[-1].end_s == pytest.approx(65 * 60)
    assert all(1200 < p.duration_s < 1400 for p in parts)


def test_over_four_hours_is_one_sentence_before_decoding(tmp_path):
    # An 8 kHz 8-bit WAV whose header states 5 hours: refused from the header, nothing decoded.
    rate, seconds = 8000, 5 * 3600
    header = (b"RIFF" + struct.pack("<I", 36 + rate * seconds) + b"WAVEfmt " +
              struct.pack("<IHHIIHH", 16, 1, 1, rate, rate, 1, 8) + b"data" + struct.pack("<I", rate * seconds))
    path = tmp_path / "five-hours.wav"
    path.write_bytes(header + bytes([128]) * rate * 10)
    with pytest.raises(AudioError) as caught:
        split.split_recording(str(path))
    assert str(caught.value) == "The recording is 5 h long; the limit is 4 h."


def test_a_wav_whose_header_leaves_its_length_open_is_measured_by_its_size(tmp_path):
    """Streaming writers (a recorder that crashed, ffmpeg into a pipe) leave 0xFFFFFFFF as the sizes; the
    data runs to the file's end. Five hours of it are refused before decoding, not after every part up
    to 4 hours has been heard and answered, and a shorter one is cut in even parts from the start."""
    rate = 1000  # Hz, 8-bit mono: 5 hours in 18 MB

    def open_ended(seconds: int):
        header = (b"RIFF" + struct.pack("<I", 0xFFFFFFFF) + b"WAVEfmt " +
                  struct.pack("<IHHIIHH", 16, 1, 1, rate, rate, 1, 8) + b"data" + struct.pack("<I", 0xFFFFFFFF))
        path = tmp_path / f"{seconds}.wav"
        path.write_bytes(header + bytes([128]) * rate * seconds)
        return str(path)

    with pytest.raises(AudioError) as caught:
        split.split_recording(open_ended(5 * 3600))
    assert str(caught.value) == "The recording is 5 h long; the limit is 4 h."
    declared_s, blocks = stream_audio(open_ended(65 * 60), max_seconds=split.MAX_RECORDING_S)
    blocks.close()
    assert declared_s == 65 * 60


def test_a_file_cut_short_says_so_after_the_parts_it_had(tmp_path):
    path = tmp_path / "cut.wav"
    soundfile.write(path, np.zeros(40 * MINUTE, np.int16), SAMPLE_RATE)
    data = bytearray(path.read_bytes())
    data[40:44] = struct.pack("<I", 75 * MINUTE * 2)  # the header now states 75 minutes
    path.write_bytes(bytes(data))
    read = []
    with pytest.raises(AudioError, match="damaged or incomplete: it declares 1 h 15 min of audio but only 40 min"):
        for part in split.split_recording(str(path)):
            read.append(part.index)
    assert read == [0]  # the first 25-minute part was whole and came before the end was found


MEMORY_SCRIPT = """
import resource, sys, numpy as np
from afnext import split
from afnext.clip import prepare_clip
from afnext.model import ensure_tiny
from transformers import WhisperFeatureExtractor
filters = WhisperFeatureExtractor.from_pretrained(str(ensure_tiny())).mel_filters
prepare_clip(np.zeros(16000, np.float32), filters)  # warm: the STFT's own buffers are not the recording's
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
held = None
for part in split.split_recording(sys.argv[1]):
    # As the parted session does: part k is made ready while part k-1 waits for its prefill, whose
    # features are let go once it begins answering, before part k is handed over.
    clip = prepare_clip(part.audio, filters)
    del part
    held = clip
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024)
"""


def test_a_two_hour_file_is_read_in_far_less_memory_than_decoding_it_whole(tmp_path, tiny_dir):
    path = tmp_path / "two-hours.wav"
    with soundfile.SoundFile(path, "w", SAMPLE_RATE, 1, "PCM_16") as out:
        for block in speech(2 * 3600, [], block_s=120):
            out.write(block)
    grown = int(subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(path)], capture_output=True, text=True,
                               check=True).stdout.split()[-1])
    samples = 2 * 3600 * SAMPLE_RATE
    whole = samples * 4 + (samples // 480_000) * 128 * 3000 * 4  # float32 audio + its log-mel features
    print(json.dumps({"peak_growth_mb": grown / 1e6, "whole_mb": whole / 1e6}))
    assert grown < 0.5 * whole, f"reading grew the process by {grown / 1e6:.0f} MB; whole would be {whole / 1e6:.0f} MB"


def test_an_mp3_whose_frame_count_falls_short_near_the_limit_is_measured(tmp_path):
    """An MP3's Info frame counts 4% fewer frames than it holds: it states 57.6 s of its 60 s. Against a
    limit of 58 s that is under, so it went to `load_audio`, which refused it as over; measured, it is
    heard in parts."""
    from afnext.media import load_audio
    from tests.test_audio import encode, encoder

    path = tmp_path / "short-count.mp3"
    encode(path, "mp3", encoder("libmp3lame", "mp3"), 8000,
           np.random.default_rng(0).uniform(-0.1, 0.1, (60 * 8000, 1)).astype(np.float32), bit_rate=8000)
    data = bytearray(path.read_bytes())
    at = data.find(b"Info", 0, 4096)
    assert at > 0 and int.from_bytes(data[at + 4:at + 8], "big") & 1, "a frame count comes first"
    frames = int.from_bytes(data[at + 8:at + 12], "big")
    data[at + 8:at + 12] = int(frames * 0.96).to_bytes(4, "big")
    path.write_bytes(data)
    declared, blocks = stream_audio(str(path))
    blocks.close()
    assert declared == pytest.approx(57.6, abs=0.3)
    with pytest.raises(AudioError, match="over"):
        load_audio(str(path), max_seconds=58)
    assert split.longer_than(str(path), 58)
    assert not split.longer_than(str(path), 61) and not split.longer_than(str(path), 120)


def test_a_recording_decoded_once_is_read_back_in_the_same_parts_without_decoding(tmp_path, monkeypatch):
    """The page decodes an upload once (app/recordings.py): its samples go to a file as they are cut, and
    every later question reads its parts from there, by range, as they were cut."""
    path = tmp_path / "talk.flac"
    with soundfile.SoundFile(path, "w", SAMPLE_RATE, 1, "PCM_16") as out:
        for block in speech(150, [(40, 40.5), (95, 95.5)], block_s=30):
            out.write(block)
    parts = list(split.split_recording(str(path), part_s=60.0))
    samples = tmp_path / "talk.f32"
    with open(samples, "wb") as out:
        for part in parts:
            part.audio.tofile(out)
    decoded = split.Decoded(str(samples), 60.0, tuple((p.audio.size, p.parts) for p in parts))
    assert decoded.duration_s == pytest.approx(150)
    monkeypatch.setattr(split, "stream_audio", lambda *args, **kwargs: pytest.fail("decoded again"))
    again = list(split.split_recording(decoded, part_s=60.0))
    assert [(p.index, p.start_s, p.end_s, p.parts) for p in again] == [(p.index, p.start_s, p.end_s, p.parts) for p in parts]
    assert all(np.array_equal(a.audio, b.audio) for a, b in zip(again, parts))
    # Asked for other parts (a model hearing less than the page cut for): cut again, from the same samples.
    other = list(split.split_recording(decoded, part_s=40.0))
    whole = np.concatenate([p.audio for p in parts])
    expected = list(split._parts(iter([whole]), whole.size / SAMPLE_RATE, 40.0))
    assert [(p.start_s, p.audio.size) for p in other] == [(p.start_s, p.audio.size) for p in expected]
    samples.unlink()  # the recording was closed meanwhile
    with pytest.raises(AudioError, match="could not be read"):
        next(split.split_recording(decoded, part_s=60.0))


def test_exactly_the_limit_and_its_grace_is_one_part_as_load_audio_takes_it():
    """A recording `longer_than` calls within the limit is one part (trimmed to the limit); one sample
    more is two. The page opens every upload through the parts, so the two must agree."""
    limit = round((60 + split.LIMIT_GRACE_S) * SAMPLE_RATE)
    for samples, count in ((limit, 1), (limit + 1, 2)):
        audio = np.zeros(samples, np.float32)
        assert split.longer_than(audio, 60.0) == (count == 2)
        parts = list(split._parts(iter([audio[: samples // 2], audio[samples // 2:]]), None, 60.0))
        assert len(parts) == count and parts[0].parts == (1 if count == 1 else None)
        assert parts[0].audio.size <= 60 * SAMPLE_RATE
