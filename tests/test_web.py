"""The web app's server side without a browser: the Recordings logic, the voice channel's protocol
(over Starlette's test client), the backend's fallbacks and the page's wiring."""

from __future__ import annotations

import json
import struct
import threading
import time
import urllib.request
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import soundfile
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.testclient import TestClient

from afnext.audio import SAMPLE_RATE, AudioError
from afnext.engine import Engine
from afnext.events import ThinkStep
from afnext.tts import load_synthesizer
from app import recordings, talk
from app.backend import Backend, BackendLoader, BackendOptions, banner, start_backend
from tests.web.running import free_port, health, running

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "assets"


@pytest.fixture(scope="module")
def backend(loaded):
    from tests.web.scripted import ScriptedEngine

    b = Backend(Engine(loaded), ScriptedEngine(loaded), load_synthesizer("espeak"))
    yield b
    b.close()


def test_peaks_hold_the_extremes_of_each_slice():
    audio = np.zeros(16000, np.float32)
    audio[100], audio[15999] = 0.9, -0.7
    p = recordings.peaks(audio, columns=8)
    assert len(p) == 16
    assert p[1] == pytest.approx(0.9) and p[-2] == pytest.approx(-0.7)
    assert max(p[2:-2]) == 0 and min(p[2:-2]) == 0
    assert len(recordings.peaks(np.ones(3, np.float32), columns=8)) == 16  # shorter than the columns


def test_open_recording_serves_playable_files_as_they_are_and_others_as_wav(tmp_path):
    flac = recordings.open_recording(str(ASSETS / "sounds.flac"), tmp_path)
    assert flac.url == f"gradio_api/file={ASSETS / 'sounds.flac'}"
    assert flac.duration_s == pytest.approx(13.0, abs=0.01)
    odd = tmp_path / "note.aiff"
    soundfile.write(odd, np.zeros(8000, np.float32), 16000, format="AIFF")
    rec = recordings.open_recording(str(odd), tmp_path)
    served = Path(rec.url.removeprefix("gradio_api/file="))
    assert served.suffix == ".wav" and served.parent == tmp_path and soundfile.info(served).frames == 8000
    waveform = json.loads(rec.waveform())
    assert waveform["duration"] == 0.5 and len(waveform["peaks"]) == 2 * recordings.PEAK_COLUMNS


def test_open_recording_refuses_bad_files_in_one_sentence(tmp_path):
    junk = tmp_path / "junk.mp3"
    junk.write_bytes(b"not audio at all" * 100)
    with pytest.raises(AudioError):
        recordings.open_recording(str(junk), tmp_path)
    long = tmp_path / "long.wav"
    soundfile.write(long, np.zeros(16000 * 1805, np.int16), 16000, subtype="PCM_16")
    with pytest.raises(AudioError, match="30"):
        recordings.open_recording(str(long), tmp_path)


def test_think_steps_then_a_follow_up_that_does_not_re_encode(backend, tmp_path):
    rec = recordings.open_recording(str(ASSETS / "speech.wav"), tmp_path)
    lines = list(recordings.ask(rec, "What is this?", True, backend))
    assert lines[0].startswith("Listening to the recording (0:11)")
    assert [(s.start, s.end) for s in rec.steps] == [(0.3, 3.6), (4.0, 6.9), (7.3, 10.2)]
    assert all(isinstance(s, ThinkStep) for s in rec.steps)
    reasoning, answer = rec.chat[1], rec.chat[2]
    assert reasoning["metadata"] == {"title": recordings.REASONING_TITLE, "status": "done"}
    assert "Tuesday morning" in reasoning["content"] and "milk and eggs" in answer["content"]
    assert rec.answer == answer["content"]
    assert [s["start"] for s in json.loads(rec.waveform())["steps"]] == [0.3, 4.0, 7.3]
    session, clip = rec.session(backend.think)
    assert clip is None and session.tokens  # the follow-up below must not bring the clip again
    follow = list(recordings.ask(rec, "And when?", True, backend))
    assert follow[0] == "Reading the question…" and "encoder" not in follow[-1]
    assert [m["role"] for m in rec.chat] == ["user", "assistant", "assistant"] * 2


def test_plain_questions_use_the_main_model_and_refuse_empty_ones(backend, tmp_path):
    rec = recordings.open_recording(str(ASSETS / "sounds.flac"), tmp_path)
    with pytest.raises(ValueError, match="question"):
        list(recordings.ask(rec, "   ", False, backend))
    assert rec.chat == []
    list(recordings.ask(rec, "What do you hear?", False, backend))
    assert rec.session(backend.main)[1] is None and rec.session(backend.think)[1] is not None


def test_answer_once_is_the_api(backend):
    answer = recordings.answer_once(backend, str(ASSETS / "speech.wav"), "Summarize.", True)
    assert answer == "It is a voice note asking to buy milk and eggs on the way home."
    with pytest.raises(ValueError, match="question"):
        recordings.answer_once(backend, str(ASSETS / "speech.wav"), " ", False)


def test_backend_falls_back_to_the_demo_model_and_says_so(monkeypatch):
    b = start_backend(BackendOptions(model="/nonexistent/checkpoint", device="cpu"))
    try:
        assert b.main is b.think and b.main.loaded.random_weights
        text = banner(b)
        assert "No checkpoint folder at /nonexistent/checkpoint" in text
        assert "random weights" in text and "non-commercial" in text
    finally:
        b.close()


@pytest.fixture
def registries():
    """Every registry a test opens; afterwards their ended connections must finish closing (a turn
    still running when the interpreter exits aborts it)."""
    made: list[talk.TalkRegistry] = []
    yield made
    assert all(r.wait_closed(30) for r in made)


@pytest.fixture
def channel(backend, registries):
    """The voice channel alone, served by Starlette's test client: channel(registry=None) → client."""
    def make(registry: talk.TalkRegistry | None = None) -> TestClient:
        registry = talk.TalkRegistry(BackendLoader.ready_made(backend)) if registry is None else registry
        registries.append(registry)
        return TestClient(Starlette(routes=[WebSocketRoute(talk.ROUTE, partial(talk.serve, registry=registry))]))
    return make


def test_voice_channel_hears_a_turn_and_answers_with_text_and_audio(backend, channel):
    speech, rate = soundfile.read(ASSETS / "speech.wav", dtype="int16")
    pcm = np.concatenate([speech, np.zeros(rate * 2, np.int16)])
    with channel().websocket_connect(f"{talk.ROUTE}?client=test-client-0001") as ws:
        ws.send_text(json.dumps({"type": "hello", "sample_rate": rate, "play_rate": 48000}))
        assert ws.receive_json()["type"] == "ready"
        for i in range(0, len(pcm), rate // 50):
            ws.send_bytes(pcm[i:i + rate // 50].tobytes())
        seen, audio = [], 0
        while "turn_done" not in seen:
            message = ws.receive()
            if message.get("bytes"):
                kind, turn, sr = struct.unpack_from("<BxxxII", message["bytes"])
                audio += (kind == talk.REPLY_AUDIO) * (len(message["bytes"]) - 12) // 2
                assert sr == (48000 if kind == talk.REPLY_AUDIO else SAMPLE_RATE)  # speech at the page's rate
                seen.append(f"audio{kind}")
            else:
                seen.append(json.loads(message["text"])["type"])
    assert seen.index("user_turn") < seen.index("audio2") < seen.index("text") < seen.index("audio1")
    assert audio > 0


def test_the_page_is_served_while_the_model_loads_and_says_so(backend):
    gate = threading.Event()
    loader = BackendLoader(lambda: gate.wait() and backend, "instruct")
    assert not loader.ready and loader.banner().startswith("⏳ Loading instruct")
    with pytest.raises(RuntimeError, match="still loading"):
        loader.wait(0.01)
    gate.set()
    assert loader.wait(5) is backend and "non-commercial" in loader.banner()

    def broken() -> Backend:
        raise OSError("No space left on device")

    failed = BackendLoader(broken, "instruct")
    with pytest.raises(RuntimeError, match="could not be loaded: No space left on device"):
        failed.wait(5)
    assert "No space left on device" in failed.banner()


def test_cli_serves_the_page_with_the_demo_model_when_the_model_cannot_load(tmp_path):
    log = tmp_path / "app.log"
    args = ["-m", "app", "--model", str(tmp_path / "missing"), "--port", str(free_port())]
    with running(args, log, ready=False) as (proc, url):  # /health answers 503 while the model loads
        with urllib.request.urlopen(url + "config", timeout=10) as response:
            assert json.load(response)["title"] == "AF-Next voice assistant"
        deadline = time.monotonic() + 120
        while (answer := health(url))[0] != 200:
            assert answer[0] == 503 and answer[1]["reason"] and time.monotonic() < deadline, answer
            time.sleep(0.1)
        assert "Model: tiny" in answer[1]["model"]
        assert f"No checkpoint folder at {tmp_path / 'missing'}" in log.read_text()


def test_voice_channel_refuses_a_bad_hello(backend, channel):
    api = channel()
    with api.websocket_connect(f"{talk.ROUTE}?client=x") as ws:
        ws.send_text(json.dumps({"type": "hello", "sample_rate": 16000}))
        assert "client id" in ws.receive_json()["message"]
    with api.websocket_connect(f"{talk.ROUTE}?client=abcdef123456") as ws:
        ws.send_text(json.dumps({"type": "hello", "sample_rate": 1000}))
        assert "1000 Hz" in ws.receive_json()["message"]
    with api.websocket_connect(f"{talk.ROUTE}?client=abcdef123456") as ws:
        ws.send_text(json.dumps({"type": "hello", "sample_rate": 16000, "play_rate": "fast"}))
        assert "could not read" in ws.receive_json()["message"]


def _ptt_turn(ws, seconds: float = 1.0) -> dict:
    """Hold push-to-talk for `seconds` of noise; the user_turn message that follows."""
    ws.send_text(json.dumps({"type": "mode", "ptt": True}))
    ws.send_text(json.dumps({"type": "ptt", "down": True}))
    block = (np.random.default_rng(0).standard_normal(320) * 3000).astype(np.int16)
    for _ in range(round(seconds * 50)):
        ws.send_bytes(block.tobytes())
    ws.send_text(json.dumps({"type": "ptt", "down": False}))
    while (message := ws.receive_json())["type"] not in ("user_turn", "notice"):
        pass
    return message


def _hello(ws) -> dict:
    ws.send_text(json.dumps({"type": "hello", "sample_rate": SAMPLE_RATE}))
    return ws.receive_json()


def test_a_page_that_reconnects_keeps_its_conversation_and_turn_ids(backend, channel):
    registry = talk.TalkRegistry(BackendLoader.ready_made(backend))
    client = channel(registry)
    with client.websocket_connect(f"{talk.ROUTE}?client=page-one-0001") as ws:
        assert _hello(ws) == {"type": "ready", "turns": 0}
        assert _ptt_turn(ws)["id"] == 1
    with client.websocket_connect(f"{talk.ROUTE}?client=page-one-0001") as ws:
        assert _hello(ws) == {"type": "ready", "turns": 1}
        assert _ptt_turn(ws)["id"] == 2
    with client.websocket_connect(f"{talk.ROUTE}?client=page-two-0002") as ws:
        assert _hello(ws)["turns"] == 0  # another page: another conversation
    assert registry.wait_closed(30) and len(registry) == 1  # page two never spoke: nothing is kept for it


def test_idle_conversations_are_dropped_and_the_count_is_capped(backend, channel):
    registry = talk.TalkRegistry(BackendLoader.ready_made(backend), idle_s=0.0, max_conversations=1)
    client = channel(registry)
    with client.websocket_connect(f"{talk.ROUTE}?client=page-one-0001") as ws:
        _hello(ws)
        with client.websocket_connect(f"{talk.ROUTE}?client=page-two-0002") as other:
            other.send_text(json.dumps({"type": "hello", "sample_rate": SAMPLE_RATE}))
            assert "as many voice conversations" in other.receive_json()["message"]
    assert len(registry) == 0  # its page left: nobody was connected for idle_s


def test_switching_to_push_to_talk_mid_sentence_makes_no_turn_of_it(backend, channel):
    speech, rate = soundfile.read(ASSETS / "speech.wav", dtype="int16")
    with channel().websocket_connect(f"{talk.ROUTE}?client=page-one-0001") as ws:
        ws.send_text(json.dumps({"type": "hello", "sample_rate": rate}))
        ws.receive_json()
        for i in range(0, 2 * rate, rate // 50):  # two seconds into the first sentence…
            ws.send_bytes(speech[i:i + rate // 50].tobytes())
        message = _ptt_turn(ws)  # …then push-to-talk: its 1 s hold is the only turn
        assert message["type"] == "user_turn" and message["end"] - message["start"] == pytest.approx(1.0, abs=0.03)


def test_a_short_push_to_talk_press_is_not_a_turn(backend, channel):
    with channel().websocket_connect(f"{talk.ROUTE}?client=page-one-0001") as ws:
        _hello(ws)
        assert "too short" in _ptt_turn(ws, seconds=0.1)["message"]


def test_push_to_talk_makes_the_held_audio_one_turn(backend, channel):
    with channel().websocket_connect(f"{talk.ROUTE}?client=ptt-client-01") as ws:
        _hello(ws)
        message = _ptt_turn(ws)
        assert message["type"] == "user_turn" and message["end"] - message["start"] == pytest.approx(1.0, abs=0.03)
