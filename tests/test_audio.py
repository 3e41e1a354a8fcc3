"""afnext.audio, media and mel: every format in, every bad input refused in one sentence, features equal stock.

Test files are written here with PyAV from known signals (a sine's frequency and length must come
back), so nothing is downloaded.
"""

from __future__ import annotations

import fractions
import io
import re
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf
import torch

from afnext import audio, media, mel
from afnext.audio import AudioError, MonoResampler, to_mono_16k
from afnext.media import load_audio
from afnext.mel import audio_tokens, log_mel_windows

ASSETS = Path(__file__).resolve().parent.parent / "assets"
TONE_HZ = 660.0


# ---------------------------------------------------------------------------- helpers


def tone(seconds: float, rate: int, hz: float = TONE_HZ, channels: int = 1) -> np.ndarray:
    """[n, channels] float32 sine at half scale."""
    t = np.arange(round(seconds * rate)) / rate
    return np.repeat((0.5 * np.sin(2 * np.pi * hz * t)).astype(np.float32)[:, None], channels, axis=1)


def dominant_hz(samples: np.ndarray, rate: int = audio.SAMPLE_RATE) -> float:
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return float(np.argmax(spectrum) * rate / len(samples))


def encoder(*names: str) -> str:
    """The first of `names` PyAV's FFmpeg can encode with, or skip the test saying which is missing."""
    for name in names:
        try:
            av.codec.Codec(name, "w")
            return name
        except Exception:
            continue
    pytest.skip(f"PyAV's FFmpeg has no {' or '.join(names)} encoder")


def encode(target, container_format: str, codec: str, rate: int, samples: np.ndarray,
           bit_rate: int | None = None) -> None:
    """Write [n, channels] float samples with PyAV; frames carry pts so encoder priming is marked."""
    layout = {1: "mono", 2: "stereo"}[samples.shape[1]]
    with av.open(target, "w", format=container_format) as container:
        stream = container.add_stream(codec, rate=rate, layout=layout)
        if bit_rate:
            stream.bit_rate = bit_rate
        sample_format = stream.format
        for start in range(0, len(samples), 4096):
            frame = _frame(samples[start : start + 4096], sample_format, layout, rate)
            frame.pts, frame.time_base = start, fractions.Fraction(1, rate)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def untagged_mp3(path, seconds: float):
    """An 8 kHz MP3 of noise whose length tag (LAME's Info or Xing frame) is blanked: FFmpeg can only
    guess its length, so the app must decode it to know. Returns `path`."""
    encode(path, "mp3", encoder("libmp3lame", "mp3"), 8000,
           np.random.default_rng(0).uniform(-0.1, 0.1, (int(seconds * 8000), 1)).astype(np.float32), bit_rate=8000)
    data = bytearray(path.read_bytes())
    for tag in (b"Info", b"Xing"):
        if (at := data.find(tag, 0, 4096)) >= 0:
            data[at:at + 4] = bytes(4)
    path.write_bytes(bytes(data))
    return path


def _frame(block: np.ndarray, sample_format, layout: str, rate: int) -> av.AudioFrame:
    dtype = {"s16": np.int16, "s32": np.int32, "flt": np.float32}[sample_format.name.removesuffix("p")]
    if dtype is not np.float32:
        block = block * (np.iinfo(dtype).max * 0.999)
    block = block.astype(dtype)
    data = np.ascontiguousarray(block.T) if sample_format.is_planar else block.reshape(1, -1)
    frame = av.AudioFrame.from_ndarray(data, format=sample_format.name, layout=layout)
    frame.sample_rate = rate
    return frame


def one_sentence(message: str) -> bool:
    """Starts with a capital, ends with one full stop, no sentence break inside."""
    return message[:1].isupper() and message.endswith(".") and not re.search(r"[.!?]\s", message[:-1])


def refused(source, **kwargs) -> str:
    with pytest.raises(AudioError) as caught:
        load_audio(source, **kwargs)
    message = str(caught.value)
    assert one_sentence(message), message
    return message


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """3 s 660 Hz files: WAV, FLAC and MP3 (the MP3 stereo), for the damage tests."""
    folder = tmp_path_factory.mktemp("audio")
    paths = {"wav": folder / "tone.wav", "flac": folder / "tone.flac", "mp3": folder / "tone.mp3"}
    sf.write(paths["wav"], tone(3.0, 16000), 16000, subtype="PCM_16")
    sf.write(paths["flac"], tone(3.0, 44100), 44100, subtype="PCM_16")
    encode(paths["mp3"], "mp3", encoder("libmp3lame"), 44100, tone(3.0, 44100, channels=2))
    return paths


# ---------------------------------------------------------------------------- formats

FORMATS = [  # (suffix, container format, encoder candidates, sample rate, channels)
    ("wav", "wav", ("pcm_s16le",), 16000, 1),
    ("flac", "flac", ("flac",), 44100, 2),
    ("mp3", "mp3", ("libmp3lame",), 44100, 2),
    ("ogg", "ogg", ("libopus", "opus"), 48000, 1),
    ("webm", "webm", ("libopus", "opus"), 48000, 2),
    ("m4a", "ipod", ("aac",), 44100, 1),
]


@pytest.mark.parametrize(
    "suffix,container_format,encoders,rate,channels", FORMATS, ids=[row[0] for row in FORMATS]
)
def test_every_format_decodes_to_mono_16k(tmp_path, suffix, container_format, encoders, rate, channels):
    path = tmp_path / f"tone.{suffix}"
    encode(path, container_format, encoder(*encoders), rate, tone(2.0, rate, channels=channels))
    samples = load_audio(path)
    assert samples.dtype == np.float32 and samples.ndim == 1
    assert abs(len(samples) / audio.SAMPLE_RATE - 2.0) < 0.05  # AAC pads at most one 23 ms frame
    assert abs(dominant_hz(samples) - TONE_HZ) < 2
    assert 0.4 < np.abs(samples).max() < 0.6
    np.testing.assert_array_equal(load_audio(path.read_bytes()), samples)  # bytes in, same out


def test_stereo_is_averaged(tmp_path):
    left = tone(1.0, 16000)[:, 0]
    path = tmp_path / "left_only.wav"
    sf.write(path, np.stack([left, np.zeros_like(left)], axis=1), 16000, subtype="FLOAT")
    np.testing.assert_allclose(load_audio(path), left / 2, atol=1e-7)


@pytest.mark.parametrize("rate,hz", [(44100, 660.0), (48000, 660.0), (8000, 1000.0)])
def test_resampling_keeps_length_and_pitch(tmp_path, rate, hz):
    samples = tone(3.0, rate, hz)
    path = tmp_path / f"tone_{rate}.wav"
    sf.write(path, samples, rate, subtype="PCM_16")
    for converted in (load_audio(path), to_mono_16k(samples, rate)):
        assert len(converted) == 48000
        assert abs(dominant_hz(converted) - hz) < 1


def test_load_audio_takes_a_rate_and_array_pair():
    samples = (tone(1.0, 48000, channels=2) * 32767).astype(np.int16)
    out = load_audio((48000, samples))
    assert out.dtype == np.float32 and len(out) == 16000 and abs(dominant_hz(out) - TONE_HZ) < 2


@pytest.mark.parametrize(
    "dtype,value", [(np.int16, 16384), (np.int32, 2**30), (np.uint8, 192), (np.float64, 0.5)]
)
def test_to_mono_16k_scales_every_sample_type(dtype, value):
    out = to_mono_16k(np.full((100, 2), value, dtype=dtype), audio.SAMPLE_RATE)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, 0.5)


def test_streamed_resampling_equals_whole():
    """The mic path resamples chunk by chunk: any split gives the same samples as one call."""
    samples = np.random.default_rng(0).standard_normal(48000).astype(np.float32)

    def streamed(chunks):
        resampler = MonoResampler(48000)
        return np.concatenate([resampler.push(c) for c in chunks] + [resampler.flush()])

    whole = streamed([samples])
    np.testing.assert_array_equal(whole, to_mono_16k(samples, 48000))
    for parts in (2, 7, 100):
        np.testing.assert_array_equal(streamed(np.array_split(samples, parts)), whole)


def test_assets_decode():
    assert 9 < len(load_audio(ASSETS / "speech.wav")) / audio.SAMPLE_RATE < 12  # 10.6 s, per espeak-ng
    assert len(load_audio(ASSETS / "sounds.flac")) == 13 * audio.SAMPLE_RATE


# ---------------------------------------------------------------------------- bad input


def test_missing_file(tmp_path):
    assert "not found" in refused(tmp_path / "nothing.wav")


def test_folder(tmp_path):
    assert "folder" in refused(tmp_path)


def test_empty_file(tmp_path):
    (tmp_path / "empty.wav").write_bytes(b"")
    assert "empty (0 bytes)" in refused(tmp_path / "empty.wav")
    assert "empty (0 bytes)" in refused(b"")


def test_not_audio(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("Buy milk and eggs.\n" * 50)  # FFmpeg's "tty" demuxer would call this video
    noise = np.random.default_rng(1).integers(0, 256, 20000, dtype=np.uint8).tobytes()
    for source in (text, text.read_bytes(), noise):
        assert "not audio" in refused(source)


@pytest.mark.parametrize("kind", ["wav", "flac", "mp3"])
def test_cut_in_half(files, kind):
    data = files[kind].read_bytes()
    message = refused(data[: len(data) // 2])
    # FLAC's cut-off last frame fails to decode; WAV and MP3 headers state the length they lack.
    assert "damaged or incomplete" in message
    assert "declares 3.0 s" in message or kind == "flac"


@pytest.mark.parametrize("kind", ["flac", "mp3"])
def test_garbage_in_the_middle(files, kind):
    data = bytearray(files[kind].read_bytes())
    third = len(data) // 3
    data[third : 2 * third] = np.random.default_rng(2).integers(0, 256, third, dtype=np.uint8).tobytes()
    assert "damaged or incomplete" in refused(bytes(data))


@pytest.mark.parametrize("bit_rates", [(128_000, 128_000), (32_000, 192_000), (192_000, 32_000)])
def test_mp3_files_joined_end_to_end_decode_whole(bit_rates):
    """`cat intro.mp3 talk.mp3` (chapters, podcast segments) plays whole everywhere. The second file's ID3
    tag and Info frame are a packet the decoder refuses mid-file (players and ffmpeg pass over it), and
    the first file's Info frame states only its own length: FFmpeg then guesses from the first frames'
    bitrate (14 s or 2.3 s here), which is no stated length to hold the file to."""
    joined = b""
    for bit_rate in bit_rates:
        buffer = io.BytesIO()
        encode(buffer, "mp3", encoder("libmp3lame"), 44100, tone(2.0, 44100, channels=2), bit_rate=bit_rate)
        joined += buffer.getvalue()
    samples = load_audio(joined)
    assert abs(len(samples) / audio.SAMPLE_RATE - 4.0) < 0.15  # each file's priming, at most 50 ms
    assert abs(dominant_hz(samples[-audio.SAMPLE_RATE :]) - TONE_HZ) < 2  # the second file's end, not silence


def test_no_audio_track():
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="matroska") as container:
        stream = container.add_stream("ffv1", rate=5)
        stream.width, stream.height, stream.pix_fmt = 16, 16, "yuv420p"
        for _ in range(3):
            frame = av.VideoFrame.from_ndarray(np.zeros((16, 16, 3), np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    assert "no audio track (only video)" in refused(buffer.getvalue())


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf_samples(tmp_path, bad):
    samples = tone(1.0, 16000)
    samples[8000] = bad
    sf.write(tmp_path / "bad.wav", samples, 16000, subtype="FLOAT")
    assert "invalid samples (NaN or infinity)" in refused(tmp_path / "bad.wav")


def test_zero_samples(tmp_path):
    sf.write(tmp_path / "zero.wav", np.zeros((0, 1), np.float32), 16000, subtype="PCM_16")
    assert "no samples" in refused(tmp_path / "zero.wav")
    assert "no samples" in refused((16000, np.zeros(0, np.int16)))


def test_too_long_is_refused_from_the_header_before_decoding(monkeypatch):
    """A WAV whose header declares 31 min 12 s: refused without decoding a single frame."""
    header, _ = _wav_bytes(np.zeros(16000, np.int16))
    declared = (31 * 60 + 12) * 16000 * 2  # bytes of 16-bit mono at 16 kHz
    data = header[:40] + declared.to_bytes(4, "little") + header[44:]
    monkeypatch.setattr(media, "_decode", lambda *args: pytest.fail("decoded a file it should refuse"))
    assert refused(data) == "The recording is 31 min 12 s long; the limit is 30 min."


def test_too_long_without_a_declared_length_stops_decoding_early(monkeypatch):
    """When the container states no length, decoding stops once the limit is passed."""
    _, data = _wav_bytes(np.zeros(60 * 16000, np.int16))
    monkeypatch.setattr(media, "_declared_seconds", lambda *args: None)
    message = refused(data, max_seconds=1.0)
    # The duration it names is where it stopped (within a 2 s WAV packet), not the file's 60 s.
    assert re.fullmatch(r"The recording is over \d\.\d s long; the limit is 1\.0 s\.", message), message


def test_audio_refused_for_its_length_alone_says_so_by_its_type(monkeypatch):
    """AudioTooLong, from the header, from decoding or from samples in memory: a caller that hears longer
    audio in parts (app/api_turn.py) goes there without decoding the file again to learn why it was refused."""
    header, data = _wav_bytes(np.zeros(3 * 16000, np.int16))
    stated = header[:40] + (31 * 60 * 16000 * 2).to_bytes(4, "little") + header[44:]
    for source, kwargs in ((stated, {}), (data, {"max_seconds": 1.0}), ((16000, np.zeros(3 * 16000)), {"max_seconds": 1.0})):
        with pytest.raises(audio.AudioTooLong, match="long; the limit is"):
            load_audio(source, **kwargs)
    monkeypatch.setattr(media, "_declared_seconds", lambda *args: None)  # found while decoding
    with pytest.raises(audio.AudioTooLong):
        load_audio(data, max_seconds=1.0)
    with pytest.raises(AudioError) as caught:
        load_audio(b"not audio at all")
    assert not isinstance(caught.value, audio.AudioTooLong)


def test_too_long_array():
    assert "long; the limit is 1.0 s" in refused((16000, np.zeros(3 * 16000, np.int16)), max_seconds=1.0)


def test_a_second_over_the_limit_is_trimmed_not_refused():
    out = load_audio((16000, np.zeros(round(1.5 * 16000), np.int16)), max_seconds=1.0)
    assert len(out) == 16000


def test_file_over_the_size_cap(tmp_path, monkeypatch, files):
    monkeypatch.setattr(audio, "MAX_FILE_BYTES", 1000)
    for source in (files["wav"], files["wav"].read_bytes()):
        assert "over the 1000 bytes limit" in refused(source)


def test_duration_text():
    assert audio.duration_text(1872) == "31 min 12 s"
    assert audio.duration_text(1800) == "30 min"
    assert audio.duration_text(1.94) == "1.9 s"
    assert audio.duration_text(3725) == "1 h 2 min 5 s"


def _wav_bytes(samples: np.ndarray) -> tuple[bytes, bytes]:
    """(44-byte canonical header, whole file) of 16 kHz 16-bit mono samples."""
    buffer = io.BytesIO()
    sf.write(buffer, samples, 16000, format="WAV", subtype="PCM_16")
    data = buffer.getvalue()
    assert data[36:40] == b"data"  # the canonical layout the header test edits
    return data[:44], data


# ---------------------------------------------------------------------------- features


@pytest.fixture(scope="module")
def stock_extractor():
    from transformers import WhisperFeatureExtractor

    return WhisperFeatureExtractor(feature_size=128)


def _clip(name: str) -> np.ndarray:
    if name == "speech":
        return load_audio(ASSETS / "speech.wav")[: 16000]  # 1 s of speech
    seconds = float(name.removesuffix("s"))
    return (np.random.default_rng(3).standard_normal(round(seconds * 16000)) * 0.1).astype(np.float32)


@pytest.mark.parametrize("name", ["5s", "30.013s", "65s", "speech"])
def test_log_mel_windows_equal_the_stock_processor(stock_extractor, name):
    clip = _clip(name)
    # The MusicFlamingo processor cuts 30 s windows itself, then calls the extractor like this.
    windows = [clip[i : i + mel.WINDOW_SAMPLES] for i in range(0, len(clip), mel.WINDOW_SAMPLES)]
    stock = stock_extractor(windows, sampling_rate=16000, return_attention_mask=True, return_tensors="pt")
    features, frames = log_mel_windows(clip, stock_extractor.mel_filters)
    assert features.dtype == torch.float32
    assert features.shape == (len(windows), 128, mel.WINDOW_FRAMES)
    torch.testing.assert_close(features, stock["input_features"], rtol=0, atol=1e-5)
    assert frames == stock["attention_mask"].sum(-1).tolist()


def test_audio_tokens_match_the_processor():
    from transformers import MusicFlamingoProcessor

    frames = torch.tensor([0, 1, 2, 3, 4, 5, 500, 2999, 3000])
    stock = MusicFlamingoProcessor._get_audio_token_length(None, frames)  # uses no state
    assert [audio_tokens(int(f)) for f in frames] == stock.clamp(min=0).tolist()
    assert audio_tokens(3000) == 750 and audio_tokens(2) == 0


# ---------------------------------------------------------------------------- espeak-ng


def test_espeak_speaks():
    pytest.importorskip("espeakng_loader")
    from afnext.tts.espeak import synthesize

    rate, samples = synthesize("Hello there, this is a test.")
    assert rate == 22050 and samples.dtype == np.float32 and samples.ndim == 1
    assert 1.0 < len(samples) / rate < 4.0 and 0.1 < np.abs(samples).max() <= 1.0
    faster = synthesize("Hello there, this is a test.", rate_wpm=340)[1]
    assert len(faster) < 0.75 * len(samples)
    assert synthesize("   ")[1].size == 0
    with pytest.raises(ValueError, match="no voice"):
        synthesize("Hello.", voice="no-such-voice")
