"""Hostile input at the library's edges: whatever comes in ends in one sentence, never a hang.

Outside input reaches the library as audio (paths, bytes, (rate, array) pairs), as JSON lines of
`python -m afnext chat --jsonl`, as generation options and as question text. Each finding has its
own test; Hypothesis then throws arbitrary values at the same edges.
"""

from __future__ import annotations

import argparse
import fractions
import io
import json
import math
import os
import threading
import time
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from afnext import __main__ as cli
from afnext import audio, media
from afnext.audio import AudioError
from afnext.media import load_audio
from afnext.sampling import GenerationOptions
from afnext.session import MAX_TEXT_CHARS, ContextFullError, Session

from .test_audio import _frame, encoder, tone

ASSETS = Path(__file__).resolve().parent.parent / "assets"
DEADLINE_S = 10.0  # seconds any one refusal may take before we call it a hang
FUZZ_EXAMPLE_S = 5.0  # seconds one fuzzed decode may take (they take milliseconds)


def one_line_sentence(message: str) -> bool:
    """One line, ending with a full stop: what a user or a JSON client is shown."""
    return bool(message) and "\n" not in message and "\r" not in message and message.endswith(".")


def finishes(fn, *args, unblock: Path | None = None):
    """fn(*args) on a daemon thread: its result or exception, or a failure after DEADLINE_S.

    On a hang, `unblock` (a FIFO) is opened for writing so the stuck reader returns and the thread
    does not outlive the test.
    """
    box: dict = {}

    def run() -> None:
        try:
            box["value"] = fn(*args)
        except Exception as exc:  # handed to the test thread
            box["error"] = exc

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(DEADLINE_S)
    if worker.is_alive():
        if unblock is not None:
            os.close(os.open(unblock, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail(f"{getattr(fn, '__name__', fn)} still blocked after {DEADLINE_S:.0f} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


def audio_refused(source, **kwargs) -> str:
    with pytest.raises(AudioError) as caught:
        finishes(lambda: load_audio(source, **kwargs))
    message = str(caught.value)
    assert one_line_sentence(message), message
    return message


# ---------------------------------------------------------------------------- 1. special files


def test_fifo_is_refused_not_read(tmp_path):
    fifo = tmp_path / "speech.wav"
    os.mkfifo(fifo)
    with pytest.raises(AudioError) as caught:
        finishes(load_audio, fifo, unblock=fifo)
    assert str(caught.value) == "The path speech.wav is not a regular file; give an audio file."


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/null"])
def test_devices_are_refused(device):
    assert "is not a regular file" in audio_refused(device)


def test_a_pipe_such_as_stdin_is_refused():
    read_end, write_end = os.pipe()
    try:
        assert "is not a regular file" in audio_refused(f"/proc/self/fd/{read_end}")
    finally:
        os.close(read_end)
        os.close(write_end)


def test_folder_message_is_kept_and_symlinks_to_files_work(tmp_path):
    assert audio_refused(tmp_path) == f"The path {tmp_path.name} is a folder, not an audio file."
    sf.write(tmp_path / "tone.wav", tone(1.0, 16000), 16000)
    (tmp_path / "link.wav").symlink_to(tmp_path / "tone.wav")
    assert len(load_audio(tmp_path / "link.wav")) == 16000


@pytest.mark.parametrize("path", ["", "a\0b.wav", "bad\ud800name.wav", "two\nlines.wav"])
def test_odd_paths_are_one_line_sentences(path):
    message = audio_refused(path)
    message.encode("utf-8")  # printable as the chat's JSON line


# ---------------------------------------------------------------------------- 2. containers


def encode(target, muxer: str, codec: str, rate: int, samples: np.ndarray, title: str = "") -> None:
    """test_audio's writer, with a bit rate set (FFmpeg's WMA encoder refuses its default of 0)
    and an optional title tag on the file and on the stream."""
    with av.open(target, "w", format=muxer) as container:
        stream = container.add_stream(codec, rate=rate, layout="mono")
        if title:
            container.metadata["title"] = stream.metadata["title"] = title
        stream.bit_rate = 128_000
        for start in range(0, len(samples), 4096):
            frame = _frame(samples[start : start + 4096], stream.format, "mono", rate)
            frame.pts, frame.time_base = start, fractions.Fraction(1, rate)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


CONTAINERS = [  # (suffix, muxer, encoder candidates, sample rate)
    ("avi", "avi", ("pcm_s16le",), 16000),
    ("mp3.avi", "avi", ("libmp3lame", "mp3"), 44100),
    ("mkv", "matroska", ("pcm_s16le",), 22050),
    ("aac.mkv", "matroska", ("aac",), 44100),
    ("mov", "mov", ("aac",), 44100),
    ("mp4", "mp4", ("aac",), 48000),
    ("wma", "asf", ("wmav2",), 44100),
    ("flv", "flv", ("libmp3lame", "mp3"), 44100),
    ("ts", "mpegts", ("mp2",), 48000),
    ("aac.ts", "mpegts", ("aac",), 48000),
    ("mpg", "mpeg", ("mp2",), 48000),
    ("au", "au", ("pcm_s16be",), 16000),
    ("voc", "voc", ("pcm_s16le",), 16000),
]


@pytest.mark.parametrize("suffix,muxer,encoders,rate", CONTAINERS, ids=[row[0] for row in CONTAINERS])
def test_common_containers_decode(tmp_path, suffix, muxer, encoders, rate):
    path = tmp_path / f"tone.{suffix}"
    encode(path, muxer, encoder(*encoders), rate, tone(2.0, rate))
    samples = load_audio(path)
    assert samples.dtype == np.float32 and samples.ndim == 1
    assert abs(len(samples) / audio.SAMPLE_RATE - 2.0) <= 0.1


def tagged_mkv(title: str = "TITLE") -> bytes:
    """1 s of tone in Matroska with a title tag on the file and on the stream."""
    buffer = io.BytesIO()
    encode(buffer, "matroska", "pcm_s16le", 16000, tone(1.0, 16000), title=title)
    return buffer.getvalue()


def test_tags_that_are_not_utf8_are_ignored():
    """PyAV decoded tags strictly: a bad byte in a title was a UnicodeDecodeError, not audio."""
    data = tagged_mkv().replace(b"TITLE", b"\xff" * 5)
    assert len(load_audio(data)) == 16000


@pytest.mark.parametrize("muxer,codec", [("avi", "mpeg4"), ("avi", "rawvideo"), ("matroska", "mpeg4")])
def test_video_only_files_have_no_audio_track(muxer, codec):
    encoder(codec)
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=muxer) as container:
        stream = container.add_stream(codec, rate=5)
        stream.width, stream.height = 16, 16
        stream.pix_fmt = "yuv420p"
        for _ in range(3):
            frame = av.VideoFrame.from_ndarray(np.zeros((16, 16, 3), np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    assert "no audio track (only video)" in audio_refused(buffer.getvalue())


@pytest.mark.parametrize("text", [
    "#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\nfile:///etc/passwd\n#EXT-X-ENDLIST\n",
    "ffconcat version 1.0\nfile '/etc/passwd'\n",
    "Buy milk and eggs.\n" * 50,
])
def test_playlists_and_text_stay_refused(tmp_path, text):
    (tmp_path / "list.m3u8").write_text(text)
    for source in (tmp_path / "list.m3u8", text.encode()):
        assert "not audio in a known format" in audio_refused(source)


def test_known_formats_message_is_one_sentence():
    assert one_line_sentence(f"The file is not audio in a known format; use {media._KNOWN_FORMATS}.")
    assert "avi" in media._KNOWN_FORMATS


# ---------------------------------------------------------------------------- 3. generation options

BAD_OPTIONS = [
    ("max_new_tokens", 0), ("max_new_tokens", -1), ("max_new_tokens", True), ("max_new_tokens", 8.0),
    ("max_new_tokens", 10**9), ("max_new_tokens", "8"), ("min_new_tokens", -1), ("min_new_tokens", None),
    ("temperature", math.nan), ("temperature", math.inf), ("temperature", -0.1), ("temperature", 1e6),
    ("temperature", "hot"), ("temperature", False), ("temperature", 1e-300), ("top_p", 0.0), ("top_p", -0.5),
    ("top_p", math.nan), ("top_p", 1.5), ("repetition_penalty", math.nan), ("repetition_penalty", 0.0),
    ("repetition_penalty", -1.2), ("repetition_penalty", math.inf), ("repetition_penalty", 1e9),
    ("repetition_penalty", 1e-300), ("seed", 1.5), ("seed", True), ("seed", -1), ("seed", 2**64), ("seed", "7"),
]


@pytest.mark.parametrize("field,value", BAD_OPTIONS, ids=[f"{f}={v!r}" for f, v in BAD_OPTIONS])
def test_bad_generation_options_are_refused(field, value):
    with pytest.raises(ValueError) as caught:
        GenerationOptions(**{field: value})
    message = str(caught.value)
    assert type(caught.value) is ValueError and field in message and one_line_sentence(message), message


def test_good_generation_options_still_construct():
    GenerationOptions()
    GenerationOptions(max_new_tokens=1, min_new_tokens=0, temperature=0, top_p=1, repetition_penalty=1)
    GenerationOptions(max_new_tokens=131_072, temperature=100.0, top_p=1e-9, repetition_penalty=100, seed=0)
    GenerationOptions(temperature=1e-4, repetition_penalty=0.01)
    GenerationOptions(max_new_tokens=np.int64(8), temperature=np.float32(0.7), seed=2**64 - 1)


junk = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8),
                 st.lists(st.integers(), max_size=2))


@settings(max_examples=300, deadline=None)
@given(field=st.sampled_from(["max_new_tokens", "min_new_tokens", "temperature", "top_p",
                              "repetition_penalty", "seed"]),
       value=st.one_of(st.floats(), st.integers(), junk))
def test_any_option_value_is_valid_or_a_value_error_naming_the_field(field, value):
    try:
        options = GenerationOptions(**{field: value})
    except ValueError as exc:
        assert type(exc) is ValueError and field in str(exc) and one_line_sentence(str(exc)), str(exc)
        return
    number = getattr(options, field)
    assert number is None or math.isfinite(number)


# ---------------------------------------------------------------------------- 4. chat --jsonl lines

BAD_LINES = {
    '{"text": "Hi", "temperature": NaN}': "NaN",
    '{"text": "Hi", "temperature": Infinity}': "Infinity",
    '{"text": "Hi", "repetition_penalty": -Infinity}': "-Infinity",
    '{"text": "Hi", "temperature": 1e400}': "temperature",
    '{"text": "Hi", "think": "no"}': "think",
    '{"text": "Hi", "think": 1}': "think",
    '{"text": "Hi", "think": null}': "think",
    '{"text": "Hi", "max_new_tokens": true}': "max_new_tokens",
    '{"text": "Hi", "max_new_tokens": 0}': "max_new_tokens",
    '{"text": "Hi", "max_new_tokens": 8.5}': "max_new_tokens",
    '{"text": "Hi", "repetition_penalty": 0}': "repetition_penalty",
    '{"text": "Hi", "temperature": 500}': "temperature",
    '{"text": "Hi", "audio": 5}': "audio",
    '{"text": "Hi", "min_new_tokens": 10, "max_new_tokens": 5}': "min_new_tokens (10) is more than max_new_tokens (5)",
    '{"text": ["Hi"]}': "text",
    '{"text": "Hi", "max_new_tokens": ' + "9" * 5000 + "}": "digits",
    "[" * 100_000: "nests",
    '{"text": "Hi", "bad\\nkey": 1}': "Unknown field",
    "[1, 2]": "JSON object",
}


@pytest.mark.parametrize("line,named", BAD_LINES.items(), ids=[str(i) for i in range(len(BAD_LINES))])
def test_bad_chat_lines_are_one_sentence(line, named):
    with pytest.raises(ValueError) as caught:
        cli._read_turn(line)
    message = str(caught.value)
    assert type(caught.value) is ValueError and named in message and one_line_sentence(message), message


def test_good_chat_lines_parse_into_turns():
    turn = cli._read_turn('{"text": "Hi", "audio": "a.wav", "think": true, "max_new_tokens": 8,'
                          ' "temperature": 0.5, "repetition_penalty": 1}')
    assert (turn.text, turn.audio, turn.think) == ("Hi", "a.wav", True)
    assert turn.options == GenerationOptions(max_new_tokens=8, temperature=0.5, repetition_penalty=1.0)
    assert cli._read_turn('{"audio": null, "think": false}') == cli.Turn()


def test_the_option_messages_are_the_library_ones():
    with pytest.raises(ValueError) as direct:
        GenerationOptions(temperature=500)
    with pytest.raises(ValueError) as parsed:
        cli._read_turn('{"text": "Hi", "temperature": 500}')
    assert str(parsed.value) == str(direct.value)


def _chat(engine, lines: str, monkeypatch, capsys) -> list[dict]:
    monkeypatch.setattr("sys.stdin", io.StringIO(lines))
    assert cli.chat(engine, argparse.Namespace(no_cache=False, conversation=None, store=None, keep_days=30.0)) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_a_10_mb_line_is_refused_and_the_session_goes_on(engine, monkeypatch, capsys):
    huge = json.dumps({"text": "a" * 10_000_000})
    ok = json.dumps({"text": "Hi", "max_new_tokens": 2})
    out = _chat(engine, f"{huge}\n{ok}\n", monkeypatch, capsys)
    assert len(out) == 2 and one_line_sentence(out[0]["error"]) and "limit" in out[0]["error"]
    assert "error" not in out[1]


def test_a_line_that_is_not_utf8_is_refused_and_the_session_goes_on(engine, monkeypatch, capsys):
    lines = b'{"text": "caf\xe9"}\n' + b'{"text": "Hi", "max_new_tokens": 2}\n'
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(lines)))
    assert cli.chat(engine, argparse.Namespace(no_cache=False, conversation=None, store=None, keep_days=30.0)) == 0
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert out[0] == {"error": "The line is not valid UTF-8 (byte 0xe9 at offset 13)."}
    assert "error" not in out[1]


def test_an_endless_line_is_skipped_in_pieces(monkeypatch):
    monkeypatch.setattr(cli, "MAX_LINE_BYTES", 10)
    stream = io.BytesIO(b"x" * 1000 + b"\n" + b'{"a": 1}\n' + b"y" * 25)
    assert list(cli._lines(stream)) == [None, b'{"a": 1}\n', None]


def test_ask_with_a_nan_temperature_is_a_one_line_error(engine, capsys):
    args = argparse.Namespace(question="Hi", audio=str(ASSETS / "speech.wav"), think=False, max_new_tokens=8,
                              temperature=math.nan)
    assert cli.ask(engine, args) == 1
    assert capsys.readouterr().err == "error: temperature must be 0 or a number from 0.0001 to 100; got nan.\n"


surrogates = st.text(st.characters(categories=["Cs"]), min_size=1, max_size=3)  # lone halves: "\ud800"
json_leaf = st.one_of(st.none(), st.booleans(), st.integers(min_value=-10, max_value=10**6),
                      st.floats(), st.text(max_size=12), surrogates)
json_value = st.recursive(json_leaf, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)), max_leaves=6)
turn_keys = st.sampled_from([*sorted(cli.TURN_FIELDS), "junk", "", "a\nb", "\ud800"])
turn_objects = st.dictionaries(turn_keys, json_value, max_size=7)


def _check_turn_or_sentence(line: str) -> None:
    try:
        turn = cli._read_turn(line)
    except ValueError as exc:
        assert one_line_sentence(str(exc)), repr(str(exc))
        return
    assert isinstance(turn.text, str) and (turn.audio is None or isinstance(turn.audio, str))
    assert isinstance(turn.think, bool) and isinstance(turn.options, GenerationOptions)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80))
def test_any_text_line_is_a_turn_or_a_sentence(line):
    _check_turn_or_sentence(line)


@settings(max_examples=300, deadline=None)
@given(turn_objects)
def test_any_json_object_is_a_turn_or_a_sentence(obj):
    _check_turn_or_sentence(json.dumps(obj))  # allow_nan: NaN/Infinity literals appear too


@pytest.fixture(scope="module")
def special_paths(tmp_path_factory) -> list:
    folder = tmp_path_factory.mktemp("special")
    os.mkfifo(folder / "pipe.wav")
    return [None, str(folder), str(folder / "pipe.wav"), str(folder / "missing.wav"), "/dev/zero",
            "x\0y.wav", str(ASSETS / "speech.wav"), 3, ["a"]]


# Valid turns, then in the test one field may be swapped for junk or an odd audio path. Valid
# max_new_tokens are at most 3 (junk too), so the tiny model's replies stay short.
chat_objects = st.fixed_dictionaries({"max_new_tokens": st.integers(1, 3)}, optional={
    "text": st.one_of(st.text(max_size=20), surrogates), "think": st.booleans(),
    "temperature": st.floats(0, 2), "repetition_penalty": st.floats(0.5, 2)})
short_junk = json_leaf.filter(lambda v: not isinstance(v, int) or v <= 3)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_chat_turn_on_the_real_engine_answers_or_says_why(engine, special_paths, data):
    obj = data.draw(chat_objects)
    if data.draw(st.booleans()):
        obj[data.draw(st.sampled_from(sorted(cli.TURN_FIELDS)))] = data.draw(short_junk)
    if data.draw(st.booleans()):
        obj["audio"] = data.draw(st.sampled_from(special_paths))
    result = finishes(cli._chat_turn, Session(engine), json.dumps(obj))
    json.dumps(result, ensure_ascii=False).encode("utf-8")  # what chat() prints must be printable
    if "error" in result:
        assert one_line_sentence(result["error"]), result
        assert "The model failed" not in result["error"], result
    else:
        assert len(result["token_ids"]) <= 3


# ---------------------------------------------------------------------------- 5. question length


def test_a_1_mb_question_gets_the_limit_not_start_a_new_conversation(engine):
    session = Session(engine)
    with pytest.raises(ValueError) as caught:
        session.ask("a" * 1_000_000)
    assert not isinstance(caught.value, ContextFullError)
    assert str(caught.value) == f"The question is 1,000,000 characters long; the limit is {MAX_TEXT_CHARS:,}."
    events = list(session.ask("Hello?", options=GenerationOptions(max_new_tokens=2)))
    assert events[-1].reply.prompt_tokens > 0


def test_text_that_is_not_unicode_is_a_sentence(engine):
    with pytest.raises(ValueError) as caught:
        Session(engine).ask("half a \ud800 pair")
    assert one_line_sentence(str(caught.value)) and "Unicode" in str(caught.value)


def test_a_full_context_still_says_start_a_new_conversation(engine, monkeypatch):
    session = Session(engine)
    monkeypatch.setattr(session, "tokens", [0] * (engine.loaded.context_tokens - 3))
    with pytest.raises(ContextFullError, match="start a new conversation"):
        session.ask("Hello there, how are you?")


# ---------------------------------------------------------------------------- 6. audio fuzzing


def _check_audio_or_sentence(source, max_seconds: float = audio.MAX_AUDIO_S) -> None:
    started = time.perf_counter()
    try:
        samples = load_audio(source, max_seconds=max_seconds)
    except AudioError as exc:
        assert one_line_sentence(str(exc)), repr(str(exc))
    else:
        assert samples.dtype == np.float32 and samples.ndim == 1 and samples.size > 0
        assert np.isfinite(samples).all() and samples.size <= max_seconds * audio.SAMPLE_RATE
    assert time.perf_counter() - started < FUZZ_EXAMPLE_S


REAL_FILES = [(ASSETS / "speech.wav").read_bytes(), (ASSETS / "sounds.flac").read_bytes(), tagged_mkv()]


@st.composite
def mutated_files(draw) -> bytes:
    """A real file with bytes flipped, inserted or cut, mostly in the header where parsing happens."""
    data = bytearray(draw(st.sampled_from(REAL_FILES)))
    for _ in range(draw(st.integers(1, 4))):
        where = draw(st.one_of(st.integers(0, 256), st.integers(0, len(data))))
        kind = draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        if kind == "flip" and where < len(data):
            data[where] = draw(st.integers(0, 255))
        elif kind == "insert":
            data[where:where] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del data[where:where + draw(st.integers(1, 64))]
        else:
            del data[where:]
    return bytes(data)


# How each accepted container starts, so random bytes reach the demuxers rather than the probe alone.
MAGICS = [b"RIFF\x24\x08\x00\x00WAVEfmt ", b"fLaC\x00\x00\x00\x22", b"ID3\x04\x00\x00", b"\xff\xfb\x90\x64",
          b"OggS\x00\x02", b"\x1aE\xdf\xa3", b"\x00\x00\x00\x20ftypisom", b"RIFF\x00\x10\x00\x00AVI LIST",
          b"\x30\x26\xb2\x75\x8e\x66\xcf\x11", b"FLV\x01\x05\x00\x00\x00\x09", b"\x47\x40\x00\x10",
          b"\x00\x00\x01\xba", b".snd\x00\x00\x00\x18", b"Creative Voice File\x1a", b"FORM\x00\x00\x00\x20AIFF",
          b"#!AMR\n", b"caff\x00\x01\x00\x00", b"\xff\xf1\x50\x80"]
any_bytes = st.one_of(st.binary(max_size=4096),
                      st.builds(bytes.__add__, st.sampled_from(MAGICS), st.binary(max_size=4096)))


@settings(max_examples=100, deadline=None)
@given(any_bytes)
def test_any_bytes_decode_or_say_why(data):
    _check_audio_or_sentence(data)


@settings(max_examples=50, deadline=None)
@given(mutated_files())
def test_damaged_real_files_decode_or_say_why(data):
    _check_audio_or_sentence(data)


def _wav_with(offset: int, value: int, size: int) -> bytes:
    """speech.wav with one header field (little-endian, `size` bytes at `offset`) replaced."""
    wav = REAL_FILES[0]
    return wav[:offset] + value.to_bytes(size, "little") + wav[offset + size :]


def test_a_wav_header_with_a_huge_rate_is_refused_before_resampling():
    # 2 GHz: soxr took 1.4 s to make 1.4 ms of audio out of speech.wav's 170,000 samples.
    assert "sample rate 2000000000 Hz is not a valid rate" in audio_refused(_wav_with(24, 2_000_000_000, 4))


def test_a_channels_first_array_is_refused_not_averaged():
    """torchaudio's [channels, n] passed as [n, channels]: 48,000 "channels" of two samples each."""
    assert "48000 channels" in audio_refused((16000, np.zeros((2, 48000), np.float32)))


RATES = st.one_of(st.sampled_from([0, -1, 1, 8000, 16000, 2**31, 10**12, math.nan, math.inf, -math.inf, 1e-9,
                                   "16000", None, True]),
                  st.integers(), st.floats())
ARRAYS = hnp.arrays(
    dtype=st.sampled_from([np.float32, np.float64, np.int16, np.int32, np.uint8, np.complex64, np.bool_,
                           np.float16, np.dtype(">i2"), object]),
    shape=hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=40),
    elements=None, fill=st.nothing())


@settings(max_examples=200, deadline=None)
@given(rate=RATES, samples=st.one_of(ARRAYS, st.lists(st.floats(), max_size=5), st.text(max_size=3)))
def test_hostile_rate_and_array_pairs_give_audio_errors_only(rate, samples):
    _check_audio_or_sentence((rate, samples), max_seconds=2.0)


@pytest.mark.parametrize("pair", [
    (0, np.zeros(100)), (-1, np.zeros(100)), (math.nan, np.zeros(100)), (10**12, np.zeros(16000)),
    (16000, np.zeros((2, 2, 2))), (16000, np.array(["a", "b"], dtype=object)), (16000, np.zeros(0)),
    (16000, np.full(100, np.nan)), (16000, np.zeros((100, 0))), (16000, np.zeros(10, np.complex64)),
    (1, np.zeros(10**6, np.float32)), (16000, [[1.0], [2.0, 3.0]]), (16000,), (16000, np.zeros(10), 3),
])
def test_hostile_pairs(pair):
    audio_refused(pair, max_seconds=10.0)


# ---------------------------------------------------------------------------- other entry points


def test_vad_cli_refuses_non_finite_options_in_one_line(capsys):
    from afnext import vad

    for flag, value in (("--max-utterance-s", "inf"), ("--max-utterance-s", "nan"), ("--hangover-ms", "-100")):
        with pytest.raises(SystemExit) as caught:
            vad.main([str(ASSETS / "speech.wav"), "--json", "--backend", "webrtc", flag, value])
        assert caught.value.code == 2
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert flag.lstrip("-").replace("-", "_") in error and "Traceback" not in error, error


def test_vad_cli_refuses_a_fifo(tmp_path, capsys):
    from afnext import vad

    os.mkfifo(tmp_path / "pipe.wav")
    assert finishes(vad.main, [str(tmp_path / "pipe.wav"), "--json"], unblock=tmp_path / "pipe.wav") == 1
    assert "not a regular file" in capsys.readouterr().err


@pytest.mark.parametrize("out", ["/nonexistent-folder/x.wav", "{tmp}"])
def test_tts_cli_bad_out_path_is_one_line_before_speaking(tmp_path, capsys, monkeypatch, out):
    from afnext.tts import __main__ as tts_cli

    monkeypatch.setattr(tts_cli, "load_synthesizer", lambda *a, **k: pytest.fail("loaded before checking --out"))
    assert tts_cli.main(["Hello there.", "--out", out.format(tmp=tmp_path)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and "\n" not in error and error.endswith("."), error


def test_tts_speaks_text_with_an_unpaired_surrogate(tmp_path):
    pytest.importorskip("espeakng_loader")
    from afnext.tts import __main__ as tts_cli

    assert tts_cli.main(["Hello \udcff there.", "--out", str(tmp_path / "x.wav")]) == 0
    assert sf.info(str(tmp_path / "x.wav")).frames > 0


def test_voice_cli_bad_out_path_fails_before_the_run(capsys):
    from afnext import voice

    code = voice.main(["--model", "tiny", "--input", str(ASSETS / "speech.wav"),
                       "--out", "/nonexistent-folder/r.wav", "--json"])
    assert code == 1 and "nonexistent-folder" in capsys.readouterr().err


def test_voice_cli_says_a_turn_cut_off_before_its_reply_began_was_interrupted():
    """`python -m afnext.voice --json`: the interrupted event, then turn_done saying so (it said false:
    such a turn has no reply to ask)."""
    from afnext.assistant import Stamped, UserTurn
    from afnext.events import Interrupted, VoiceTimings, VoiceTurnDone
    from afnext.voice import describe

    seen: dict = {}
    lines = [describe(event, seen) for event in (
        UserTurn(1.0, 0.2, 0.9, np.zeros(16, np.float32)),
        Stamped(1.1, Interrupted("cancelled before the reply started", turn=1)),
        VoiceTurnDone(1.2, VoiceTimings(0.1, None, None), None))]
    assert [line["event"] for line in lines] == ["turn_end", "interrupted", "turn_done"]
    assert lines[-1]["interrupted"] is True and lines[-1]["answer"] == ""
    assert describe(UserTurn(2.0, 1.5, 1.9, np.zeros(16, np.float32)), seen)["event"] == "turn_end" and not seen
