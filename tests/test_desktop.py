"""The desktop loop: the playback buffer, the loop on fake streams, clear failures without sound
devices, and the whole program through real PortAudio on ALSA devices backed by named pipes."""

from __future__ import annotations

import contextlib
import fcntl
import io
import itertools
import json
import os
import queue
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soxr

from afnext.events import Stamped, StateChanged, UserTurn, VoiceTimings, VoiceTurnDone
from afnext.audio import SAMPLE_RATE, to_mono_16k
from afnext.events import AudioChunk, Interrupted, ReasoningDelta, TextDelta
from app import audio_io, desktop
from app.audio_io import AudioPorts, NoAudioError, Playback
from app.remote import RemoteBrain, RemoteError, realtime_url

ROOT = Path(__file__).resolve().parents[1]
SPEAKER_RATE = 48000  # Hz of the fake speaker: reply chunks (espeak: 22,050 Hz) are resampled to it


def speech(text: str = "What is the weather like in Paris today?") -> np.ndarray:
    from afnext.tts.espeak import synthesize

    rate, samples = synthesize(text)
    return to_mono_16k(samples, rate)


def sine(seconds: float, rate: int, hz: float = 440.0) -> np.ndarray:
    return (0.3 * np.sin(2 * np.pi * hz * np.arange(round(seconds * rate)) / rate)).astype(np.float32)


def drain(playback: Playback, frames: int, block: int = 256, channels: int = 1) -> np.ndarray:
    out = [np.full((block, channels), np.nan, np.float32) for _ in range(-(-frames // block))]
    for buf in out:
        playback.fill(buf)
    return np.concatenate(out)


# ---- the playback buffer ----

def test_playback_is_gapless_resampled_and_underruns_play_zeros():
    playback = Playback(SPEAKER_RATE)
    assert not drain(playback, 1000).any()  # nothing queued: zeros, no exception
    tone = sine(0.5, 22050)
    for piece in np.array_split(tone, 9):  # chunks of odd sizes, as a synthesizer yields them
        playback.add(AudioChunk(22050, piece))
    playback.end_reply()
    played = drain(playback, SPEAKER_RATE, channels=2)
    expected = soxr.resample(tone, 22050, SPEAKER_RATE)  # one continuous filter: streamed == whole
    np.testing.assert_array_equal(played[:len(expected), 0], expected)
    np.testing.assert_array_equal(played[:, 0], played[:, 1])  # mono on every channel
    assert not played[len(expected):].any() and playback.underruns == 0


def test_playback_underrun_mid_reply_is_silence_and_counted():
    playback = Playback(16000)
    playback.add(AudioChunk(16000, sine(0.01, 16000)))  # 160 samples, then the synthesizer is late
    out = drain(playback, 512)
    assert np.isfinite(out).all() and out[:160].any() and not out[160:].any()
    assert playback.underruns >= 1


def test_flush_drops_pending_audio_at_once():
    playback = Playback(16000)
    playback.add(AudioChunk(22050, sine(2.0, 22050)))
    assert drain(playback, 1024).any()
    playback.flush()
    assert playback.pending_s == 0 and not drain(playback, 4096).any()
    playback.add(AudioChunk(22050, sine(0.2, 22050)))  # the next reply starts a fresh filter
    playback.end_reply()
    assert drain(playback, 4096).any()


# ---- the loop on fake streams (no PortAudio) ----

class FakeStream:
    """Calls a sounddevice-style callback from its own thread, like PortAudio does."""

    def __init__(self, body) -> None:
        self.closed = threading.Event()
        self.thread = threading.Thread(target=body, args=(self.closed,), daemon=True)
        self.thread.start()

    @property
    def active(self) -> bool:  # PortAudio's stream stops by itself when its device goes away
        return self.thread.is_alive()

    def close(self) -> None:
        self.closed.set()
        self.thread.join(5)


class FakeDevices:
    """A microphone that plays `mic_audio` then silence, a speaker that records what it is given;
    setting `unplugged` stops the microphone's stream as pulling out a headset does."""

    def __init__(self, mic_audio: np.ndarray, block: int = 320, pace: float = 4.0) -> None:
        self.mic_audio, self.block, self.pace = mic_audio, block, pace  # pace: times faster than real time
        self.played: list[np.ndarray] = []
        self.streams: list[FakeStream] = []
        self.unplugged = threading.Event()

    def ports(self) -> AudioPorts:
        return AudioPorts("fake mic", SAMPLE_RATE, "fake speaker", SPEAKER_RATE, self.open_mic, self.open_speaker)

    def open_mic(self, callback) -> FakeStream:
        def run(closed: threading.Event) -> None:
            for i in itertools.count(0, self.block):
                if closed.wait(self.block / SAMPLE_RATE / self.pace) or self.unplugged.is_set():
                    return
                block = self.mic_audio[i:i + self.block]
                callback(np.pad(block, (0, self.block - len(block)))[:, None], self.block, None, None)

        self.streams.append(FakeStream(run))
        return self.streams[-1]

    def open_speaker(self, callback) -> FakeStream:
        def run(closed: threading.Event) -> None:
            while not closed.wait(256 / SPEAKER_RATE / self.pace):
                out = np.full((256, 1), np.nan, np.float32)
                callback(out, 256, None, None)
                self.played.append(out[:, 0].copy())

        self.streams.append(FakeStream(run))
        return self.streams[-1]

    def speaker_audio(self) -> np.ndarray:
        return np.concatenate(self.played or [np.zeros(0, np.float32)])


class FakeBrain:
    """Records pushed audio; the test scripts the events it gives out."""

    def __init__(self) -> None:
        self.pushed: list[np.ndarray] = []
        self.out: queue.Queue = queue.Queue()
        self.closed = False
        self.ended = False

    def push(self, pcm: np.ndarray, sample_rate: int) -> None:
        assert sample_rate == SAMPLE_RATE and pcm.dtype == np.float32 and pcm.ndim == 1
        self.pushed.append(pcm)

    def heard_s(self) -> float:
        return sum(map(len, list(self.pushed))) / SAMPLE_RATE

    def events(self, timeout=None):
        while True:
            try:
                yield self.out.get(timeout=timeout)
            except queue.Empty:
                return

    def close(self) -> None:
        self.closed = True


def run_loop(brain, devices: FakeDevices):
    """Start `desktop.converse` on a thread; returns (stop, thread, console text, result holder)."""
    stop, out, result = threading.Event(), io.StringIO(), {}
    thread = threading.Thread(target=lambda: result.update(
        playback=desktop.converse(brain, devices.ports(), stop, desktop.Console(out))), daemon=True)
    thread.start()
    return stop, thread, out, result


def wait_until(condition, timeout: float = 30.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_loop_feeds_the_mic_prints_the_turn_and_plays_the_reply():
    question = speech()
    devices, brain = FakeDevices(question), FakeBrain()
    stop, thread, out, result = run_loop(brain, devices)
    wait_until(lambda: brain.heard_s() > len(question) / SAMPLE_RATE, what="the question to be heard")
    reply = sine(0.6, 22050)
    for event in (UserTurn(2.9, 0.5, 2.6, question), StateChanged(2.9, "thinking"),
                  Stamped(3.0, ReasoningDelta("weather: the user asks")), Stamped(3.1, TextDelta("It is sunny.")),
                  Stamped(3.2, AudioChunk(22050, reply[:7000])), StateChanged(3.2, "speaking"),
                  Stamped(3.3, AudioChunk(22050, reply[7000:])),
                  VoiceTurnDone(3.4, VoiceTimings(0.6, 0.21, 0.35), None)):
        brain.out.put(event)
    wait_until(lambda: np.count_nonzero(devices.speaker_audio()) > 0.5 * SPEAKER_RATE, what="the reply to play")
    stop.set()
    thread.join(10)
    assert not thread.is_alive() and brain.closed and all(s.closed.is_set() for s in devices.streams)
    heard = np.concatenate(brain.pushed)
    np.testing.assert_array_equal(heard[:len(question)], question)  # every mic sample, in order
    played = devices.speaker_audio()
    assert np.isfinite(played).all()  # every callback filled its whole buffer
    expected = soxr.resample(reply, 22050, SPEAKER_RATE)  # both chunks through one filter: gapless
    p0, e0 = np.flatnonzero(played)[0], np.flatnonzero(expected)[0]
    n = min(len(played) - p0, len(expected) - e0)
    np.testing.assert_array_equal(played[p0:p0 + n], expected[e0:e0 + n])
    text = out.getvalue()
    assert "you: (2.1 s of speech)" in text and "[thinking]" in text
    assert "  (reasoning) weather: the user asks\nassistant: It is sunny.\n[speaking]\n" in text
    assert "latency: endpoint 0.60 s, first token 0.21 s, first audio 0.35 s" in text


def test_interrupted_flushes_pending_playback():
    devices, brain = FakeDevices(np.zeros(0, np.float32)), FakeBrain()
    stop, thread, out, result = run_loop(brain, devices)
    brain.out.put(Stamped(0.0, AudioChunk(22050, sine(5.0, 22050))))
    wait_until(lambda: np.count_nonzero(devices.speaker_audio()) > 0.1 * SPEAKER_RATE, what="playback")
    brain.out.put(Stamped(0.5, Interrupted("the user spoke")))
    wait_until(lambda: "interrupted" in out.getvalue(), what="the interruption")
    at_flush = len(devices.speaker_audio())
    wait_until(lambda: len(devices.speaker_audio()) > at_flush + SPEAKER_RATE // 2, what="more callbacks")
    stop.set()
    thread.join(10)
    played = devices.speaker_audio()
    assert not played[at_flush + 256:].any()  # at most the block being filled at the flush
    assert np.count_nonzero(played) < 2 * SPEAKER_RATE  # of the 5 s queued
    assert result["playback"].pending_s == 0
    assert "-- interrupted (the user spoke) --" in out.getvalue()


def test_the_loop_ends_when_the_brains_events_end():
    """A remote brain whose connection dropped: its events end for good. The loop says so and returns,
    instead of asking again and again (it spun at 100% CPU)."""
    from afnext.events import END_OF_EVENTS, Error, drain

    class Gone(FakeBrain):
        calls = 0

        def events(self, timeout=None):
            self.calls += 1
            return drain(self.out, timeout)

    devices, brain = FakeDevices(np.zeros(0, np.float32)), Gone()
    stop, thread, out, result = run_loop(brain, devices)
    brain.out.put(Stamped(0.0, Error("The connection to the server was lost (reset).")))
    brain.out.put(END_OF_EVENTS)
    brain.ended = True
    thread.join(5)
    alive = thread.is_alive()
    stop.set()
    thread.join(5)
    assert not alive and brain.calls < 5 and brain.closed, brain.calls
    text = out.getvalue()
    assert "error: The connection to the server was lost (reset).\n" in text
    assert text.endswith("The connection to the assistant is gone, so the conversation ends here.\n"), text


def test_an_unplugged_microphone_ends_the_loop_with_one_sentence():
    """A headset pulled out mid-run: PortAudio stops its stream and calls back no more. The loop
    said nothing and waited for ever, hearing nothing; now it names the device and ends."""
    devices, brain = FakeDevices(np.zeros(0, np.float32)), FakeBrain()
    stop, thread, out, result = run_loop(brain, devices)
    wait_until(lambda: brain.heard_s() > 0.1, what="the microphone to be heard")
    devices.unplugged.set()
    thread.join(5)
    alive = thread.is_alive()
    stop.set()
    thread.join(5)
    assert not alive and brain.closed and all(s.closed.is_set() for s in devices.streams)
    assert out.getvalue().endswith("The microphone 'fake mic' stopped working (was it unplugged?), so the "
                                   "conversation ends here; plug it back in and start again, or pick another "
                                   "with --input-device (see --list-devices).\n"), out.getvalue()


def test_a_brain_that_fails_on_every_block_logs_one_traceback(caplog):
    """A broken VAD fails on every 20 ms block: the log got 50 tracebacks a second, for ever."""
    class Broken(FakeBrain):
        def push(self, pcm: np.ndarray, sample_rate: int) -> None:
            super().push(pcm, sample_rate)
            raise RuntimeError("the VAD model failed")

    devices, brain = FakeDevices(np.zeros(0, np.float32)), Broken()
    stop, thread, out, result = run_loop(brain, devices)
    wait_until(lambda: len(brain.pushed) > 20, what="blocks to fail")
    stop.set()
    thread.join(10)
    failures = [r for r in caplog.records if r.name == "app.desktop"]
    assert len(failures) == 1 and failures[0].exc_info is not None, failures


def test_loop_with_the_real_assistant_and_fake_devices(engine):
    from afnext.assistant import Assistant, AssistantOptions
    from afnext.sampling import GenerationOptions
    from afnext.session import Session
    from afnext.tts import load_synthesizer

    options = AssistantOptions(generation=GenerationOptions(max_new_tokens=24))
    one_spoken_turn(Assistant(Session(engine), load_synthesizer("espeak"), options))


def one_spoken_turn(brain) -> None:
    """Speak one question into the loop: a whole turn must be printed and its reply heard."""
    devices = FakeDevices(np.concatenate([np.zeros(SAMPLE_RATE // 2, np.float32), speech()]))
    stop, thread, out, result = run_loop(brain, devices)
    wait_until(lambda: "latency:" in out.getvalue(), timeout=60, what="a whole turn")
    wait_until(lambda: np.abs(devices.speaker_audio()).max(initial=0) > 0.05, what="reply audio")
    stop.set()
    thread.join(10)
    assert not thread.is_alive()
    text = out.getvalue()
    assert "you: (" in text and "assistant: " in text and "[thinking]" in text, text


def test_console_keeps_the_terminal_safe():
    out = io.StringIO()
    console = desktop.Console(out)
    console.show(Stamped(0.0, TextDelta("a\x1b[2Jb\tc\nd")))
    assert out.getvalue() == "assistant: a\ufffd[2Jb\ufffdc\nd"


# ---- failures at the boundary: one sentence, no traceback ----

class _NoPortAudio:
    """An import hook that fails like sounddevice does without libportaudio2."""

    def find_spec(self, name, path=None, target=None):
        if name == "sounddevice":
            raise OSError("PortAudio library not found")
        return None


def test_missing_portaudio_says_what_to_install(monkeypatch, capsys):
    monkeypatch.delitem(sys.modules, "sounddevice", raising=False)
    monkeypatch.setattr(sys, "meta_path", [_NoPortAudio(), *sys.meta_path])
    assert desktop.main(["--list-devices"]) == 1
    err = capsys.readouterr().err
    assert "sudo apt-get install libportaudio2" in err and "Traceback" not in err and err.count("\n") == 1


class FakePortAudioError(Exception):
    pass


def fake_sounddevice(devices: list[dict], refuse: bool = False, default=(-1, -1)) -> SimpleNamespace:
    def check(**settings):
        if refuse:
            raise FakePortAudioError("Error opening InputStream: Device unavailable [PaErrorCode -9985]")

    return SimpleNamespace(query_devices=lambda: devices, default=SimpleNamespace(device=default),
                           PortAudioError=FakePortAudioError, check_input_settings=check, check_output_settings=check)


def device(index: int, name: str, inputs: int, outputs: int) -> dict:
    return {"index": index, "name": name, "max_input_channels": inputs, "max_output_channels": outputs,
            "default_samplerate": 44100.0}


@pytest.mark.parametrize("argv, words", [([], "finds no microphone"), (["--list-devices"], "finds no sound device")])
def test_no_sound_device_says_what_to_plug_in(monkeypatch, capsys, argv, words):
    monkeypatch.setattr(desktop, "load_sounddevice", lambda: fake_sounddevice([]))
    assert desktop.main(argv) == 1
    err = capsys.readouterr().err
    assert words in err and "plug" in err and "Traceback" not in err and err.count("\n") == 1


def test_a_device_that_refuses_to_open_is_named(monkeypatch, capsys):
    sd = fake_sounddevice([device(0, "USB mic", 1, 0), device(1, "HDMI", 0, 2)], refuse=True)
    monkeypatch.setattr(desktop, "load_sounddevice", lambda: sd)
    assert desktop.main([]) == 1
    err = capsys.readouterr().err
    assert "'USB mic' refuses to open" in err and "--input-device" in err and "Traceback" not in err


def test_a_stream_that_fails_to_open_closes_what_was_opened():
    devices, brain = FakeDevices(np.zeros(0, np.float32)), FakeBrain()

    def broken_mic(callback):
        raise NoAudioError("The input device 'mic' could not be opened (busy).")

    ports = AudioPorts("mic", SAMPLE_RATE, "speaker", SPEAKER_RATE, broken_mic, devices.open_speaker)
    with pytest.raises(NoAudioError):
        desktop.converse(brain, ports, threading.Event(), desktop.Console(io.StringIO()))
    assert brain.closed and devices.streams[0].closed.is_set()


def test_devices_are_picked_by_index_or_name():
    sd = fake_sounddevice([device(0, "HDA Intel: ALC (hw:0,0)", 2, 2), device(3, "USB Headset", 1, 2),
                           device(4, "USB Webcam", 2, 0)], default=(0, 0))
    pick = audio_io.pick_device
    assert pick(sd, None, "input")["index"] == 0
    assert pick(sd, "3", "input")["index"] == 3 and pick(sd, "headset", "output")["index"] == 3
    assert pick(sd, "webcam", "input")["index"] == 4
    with pytest.raises(NoAudioError, match="matches several input devices"):
        pick(sd, "usb", "input")
    with pytest.raises(NoAudioError, match="matches no output device"):
        pick(sd, "webcam", "output")


@contextlib.contextmanager
def realtime_server(engine, access=None):
    """The web app's /v1/realtime alone, served by uvicorn on a free port (the tiny model, espeak)."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.routing import WebSocketRoute

    from afnext.tts import load_synthesizer
    from app import realtime
    from app.backend import Backend, BackendLoader

    voice = realtime.RealtimeServer(BackendLoader.ready_made(Backend(engine, engine, load_synthesizer("espeak"))), access)
    app = Starlette(routes=[WebSocketRoute(realtime.ROUTE, voice.__call__)])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started, what="the server to start")
        yield f"http://127.0.0.1:{port}/"
    finally:
        server.should_exit = True
        thread.join(10)
        voice.shutdown()  # no voice turn may outlive the test: one running at interpreter exit aborts it


@pytest.fixture
def voice_server(engine):
    with realtime_server(engine) as url:
        yield url


def test_loop_with_a_remote_brain_on_the_servers_realtime_socket(voice_server):
    one_spoken_turn(RemoteBrain(voice_server, SAMPLE_RATE))


def greeted(brain) -> None:
    """`--greet`: with nobody speaking, the assistant speaks first, once the devices are open."""
    devices = FakeDevices(np.zeros(0, np.float32))
    stop, out = threading.Event(), io.StringIO()
    thread = threading.Thread(target=desktop.converse, args=(brain, devices.ports(), stop, desktop.Console(out)),
                              kwargs={"greet": desktop.GREETING}, daemon=True)
    thread.start()
    wait_until(lambda: "latency:" in out.getvalue(), timeout=60, what="the greeting")
    wait_until(lambda: np.abs(devices.speaker_audio()).max(initial=0) > 0.05, what="its audio")
    stop.set()
    thread.join(10)
    text = out.getvalue()
    assert "assistant: " in text and "you: (" not in text, text


def test_greet_has_the_assistant_speak_first_here_and_through_a_server(engine, voice_server):
    from afnext.assistant import Assistant, AssistantOptions
    from afnext.sampling import GenerationOptions
    from afnext.session import Session
    from afnext.tts import load_synthesizer

    session = Session(engine)
    greeted(Assistant(session, load_synthesizer("espeak"), AssistantOptions(generation=GenerationOptions(max_new_tokens=16))))
    assert [m["role"] for m in session.messages] == ["assistant"]
    greeted(RemoteBrain(voice_server, SAMPLE_RATE))


def test_the_remote_client_imports_neither_torch_nor_transformers(voice_server):
    """`--server` on a laptop without them: the whole client path, a session opened and a second of
    audio sent, in a Python where importing torch or transformers fails."""
    code = ("import sys\n"
            "sys.modules.update(torch=None, transformers=None)  # importing either now raises ImportError\n"
            "import numpy as np\n"
            "from app import desktop\n"
            "from app.remote import RemoteBrain\n"
            f"brain = RemoteBrain({voice_server!r}, 16000)\n"
            "brain.push(np.zeros(16000, np.float32), 16000)\n"
            "brain.close()\n"
            "print('client ok', [m for m in ('torch', 'transformers') if sys.modules.get(m)])\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "client ok []" in result.stdout, result.stderr[-2000:]


def test_speech_over_a_playing_reply_stops_it_and_tells_the_server_what_was_heard():
    from app import realtime_wire as wire
    from app.remote import _Turns

    out, sent = [], []
    turns = _Turns(True, out.append, sent.append)
    for event in ({"type": "input_audio_buffer.speech_started", "audio_start_ms": 100},
                  {"type": "input_audio_buffer.speech_stopped", "audio_end_ms": 1600},
                  {"type": "input_audio_buffer.committed", "item_id": "item_u"},
                  {"type": "response.created", "response": {"id": "resp_1"}},
                  {"type": "response.output_item.added", "item": {"id": "item_a"}},
                  {"type": "response.output_audio_transcript.delta", "delta": "Hello"},
                  {"type": "response.output_audio.delta", "delta": wire.b64_pcm16(np.zeros(wire.AUDIO_RATE * 5, np.float32))},
                  {"type": "response.done", "response": {"status": "completed"},
                   "timings": {"endpoint_s": 0.5, "ttft_s": 0.1, "first_audio_s": 0.3}}):
        turns.on(event)
    time.sleep(0.2)  # 5 s of reply audio arrived: it is still playing
    turns.on({"type": "input_audio_buffer.speech_started", "audio_start_ms": 4000})
    inner = [e.event if isinstance(e, Stamped) else e for e in out]
    kinds = [type(e).__name__ for e in inner]
    # No "listening" at response.done: the 5 s of reply audio are still playing (a timer says it later).
    assert kinds == ["UserTurn", "StateChanged", "TextDelta", "StateChanged", "AudioChunk", "VoiceTurnDone",
                     "Interrupted", "StateChanged"], kinds
    assert inner[7].state == "listening" and inner[7].t == 4.0  # as a local Assistant says at a barge-in
    assert inner[0].start == 0.1 and inner[0].end == 1.6 and inner[5].timings == VoiceTimings(0.5, 0.1, 0.3)
    assert sent[0]["type"] == "conversation.item.truncate" and sent[0]["item_id"] == "item_a"
    assert 150 <= sent[0]["audio_end_ms"] < 2000, sent  # what had played when the user cut in
    turns.on({"type": "input_audio_buffer.speech_started", "audio_start_ms": 9000})  # nothing plays now
    assert len(out) == 8 and len(sent) == 1


@contextlib.contextmanager
def scripted_server(events: list[dict], close_code: int = 1011):
    """A Realtime server that opens the session, sends `events`, then closes with `close_code`."""
    from websockets.sync.server import serve

    def handler(ws):
        ws.send(json.dumps({"type": "session.created", "session": {}}))
        ws.recv(timeout=10)  # the client's session.update
        for event in events:
            ws.send(json.dumps(event))
        ws.close(close_code, "gone")

    with serve(handler, "127.0.0.1", 0) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{server.socket.getsockname()[1]}/"
        finally:
            server.shutdown()
            thread.join(10)


def test_server_events_that_cannot_be_read_are_said_once_and_reading_goes_on():
    odd = [{"type": "response.done", "response": "completed", "timings": [0.1]},  # not objects: no timings
           {"type": "response.created", "response": "r1"},  # cannot be read: said once, logged
           {"type": "response.created", "response": "r2"},
           {"type": "error", "error": {"message": "Still talking."}}]
    with scripted_server(odd) as url:
        brain = RemoteBrain(url, SAMPLE_RATE)
        events = [e.event if isinstance(e, Stamped) else e for e in brain.events(timeout=10)]
        assert brain.ended
        brain.close()
    kinds = [type(e).__name__ for e in events]
    assert kinds == ["VoiceTurnDone", "StateChanged", "Error", "Error", "Error"], events
    assert events[0].timings == VoiceTimings(None, None, None)
    assert "could not read" in events[2].message
    assert events[3].message == "Still talking." and "connection to the server was lost (gone)" in events[4].message


def test_a_server_whose_first_message_is_garbled_is_one_sentence_and_is_hung_up_on():
    """The socket opened, then a first message that is no Realtime event: one sentence, and the client
    closes its side at once rather than leaving the server's connection open until it is collected."""
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.server import serve

    left = threading.Event()

    def handler(ws):
        ws.send("this is not a Realtime event")
        try:
            ws.recv(timeout=10)
        except ConnectionClosed:
            left.set()

    with serve(handler, "127.0.0.1", 0) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            with pytest.raises(RemoteError, match="Could not open a Realtime session.*not JSON"):
                RemoteBrain(f"http://127.0.0.1:{server.socket.getsockname()[1]}/", SAMPLE_RATE)
            assert left.wait(5), "the client left the socket open"
        finally:
            server.shutdown()


def test_quitting_while_the_server_has_stopped_answering_takes_seconds_not_fifteen():
    """A server (or the network to it) that stopped answering mid-conversation: the closing handshake
    gets no reply. Ctrl-C waited for websockets' 10 s close timeout, then 5 s for the reader."""
    import base64
    import hashlib

    from app.remote import CLOSE_TIMEOUT_S

    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def stalled() -> None:  # the handshake, one event, then silence: reads everything, answers nothing
        conn, _ = listener.accept()
        held.append(conn)
        request = b""
        while b"\r\n\r\n" not in request:
            request += conn.recv(4096)
        key = next(line.split(b":", 1)[1].strip() for line in request.split(b"\r\n")
                   if line.lower().startswith(b"sec-websocket-key:"))
        accept = base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
        conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n")
        event = json.dumps({"type": "session.created", "session": {}}).encode()
        conn.sendall(bytes([0x81, len(event)]) + event)
        while conn.recv(4096):
            pass

    threading.Thread(target=stalled, daemon=True).start()
    try:
        brain = RemoteBrain(f"http://127.0.0.1:{listener.getsockname()[1]}/", SAMPLE_RATE)
        started = time.monotonic()
        brain.close()
        assert time.monotonic() - started < CLOSE_TIMEOUT_S + 2.0
    finally:
        for conn in held:
            conn.close()
        listener.close()


def test_speech_over_a_reply_still_being_made_leaves_listening_to_its_response_done():
    from app import realtime_wire as wire
    from app.remote import _Turns

    out: list = []
    turns = _Turns(True, out.append, lambda event: None)
    for event in ({"type": "response.created", "response": {"id": "resp_1"}},
                  {"type": "response.output_item.added", "item": {"id": "item_a"}},
                  {"type": "response.output_audio.delta",
                   "delta": wire.b64_pcm16(np.zeros(wire.AUDIO_RATE, np.float32))},
                  {"type": "input_audio_buffer.speech_started", "audio_start_ms": 500},
                  {"type": "response.done", "response": {"status": "cancelled"}}):
        turns.on(event)
    states = [e.state for e in out if isinstance(e, StateChanged)]
    assert states == ["speaking", "listening"], out  # one "listening", at response.done


def test_nothing_of_a_reply_cut_off_by_speech_is_shown_or_played():
    """Deltas the server had in flight when the user spoke over its reply: its audio was dropped, its
    words were still printed after "-- interrupted --" (a local Assistant emits nothing after it)."""
    from app import realtime_wire as wire
    from app.remote import _Turns

    out: list = []
    turns = _Turns(True, out.append, lambda event: None)
    for event in ({"type": "response.created", "response": {"id": "resp_1"}},
                  {"type": "response.output_audio_transcript.delta", "delta": "Hello"},
                  {"type": "input_audio_buffer.speech_started", "audio_start_ms": 500},
                  {"type": "response.reasoning_text.delta", "delta": "so"},
                  {"type": "response.output_audio_transcript.delta", "delta": " there"},
                  {"type": "response.output_text.delta", "delta": " again"},
                  {"type": "response.output_audio.delta", "delta": wire.b64_pcm16(np.zeros(2400, np.float32))},
                  {"type": "response.done", "response": {"status": "cancelled"}}):
        turns.on(event)
    kinds = [type(e.event if isinstance(e, Stamped) else e).__name__ for e in out]
    assert kinds == ["TextDelta", "Interrupted", "VoiceTurnDone", "StateChanged"], kinds


def test_a_conversation_the_server_ends_exits_with_a_failure_status(monkeypatch, capsys):
    """Ctrl-C ends with status 0 (the PortAudio test below); a server that goes away ends the loop with
    its sentence and status 1, so a script or a supervisor running it sees that it failed."""
    devices = FakeDevices(np.zeros(0, np.float32))
    monkeypatch.setattr(desktop, "load_sounddevice", lambda: fake_sounddevice([device(0, "mic", 1, 1)], default=(0, 0)))
    monkeypatch.setattr(desktop, "sounddevice_ports", lambda sd, mic, speaker: devices.ports())
    with scripted_server([]) as url:
        assert desktop.main(["--server", url]) == 1
    out = capsys.readouterr().out
    assert "The connection to the assistant is gone, so the conversation ends here." in out and out.endswith("bye\n")


def test_an_unreachable_server_is_one_clear_error(capsys, monkeypatch):
    monkeypatch.setattr(desktop, "load_sounddevice", lambda: fake_sounddevice([device(0, "mic", 1, 1)], default=(0, 0)))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket is closed
    assert desktop.main(["--server", f"http://127.0.0.1:{port}/"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: Could not open a Realtime session at ws://127.0.0.1:") and err.count("\n") == 1
    assert realtime_url("https://box.example/app/", "think") == "wss://box.example/app/v1/realtime?model=think"
    assert realtime_url("http://box:7860/v1", "instruct") == "ws://box:7860/v1/realtime?model=instruct"
    with pytest.raises(RemoteError, match="not an http"):
        realtime_url("ftp://box", "instruct")


def test_a_server_that_refuses_the_session_is_one_clear_error(engine, capsys, monkeypatch):
    from app.access import Access

    monkeypatch.setattr(desktop, "load_sounddevice", lambda: fake_sounddevice([device(0, "mic", 1, 1)], default=(0, 0)))
    monkeypatch.delenv(desktop.API_KEY_ENV, raising=False)
    with realtime_server(engine, Access("sesame")) as url:
        assert desktop.main(["--server", url]) == 1
        assert capsys.readouterr().err == "error: Missing API key: send it as a Bearer token.\n"
        assert desktop.main(["--server", url, "--api-key", "wrong"]) == 1
        assert capsys.readouterr().err == "error: Incorrect API key.\n"
        RemoteBrain(url, SAMPLE_RATE, api_key="sesame").close()  # the right key opens a session
# ---- the program through real PortAudio: ALSA `file` devices on named pipes ----
#
# ALSA's `file` plugin over a `null` slave is not paced: reading a regular file it runs as fast
# as the CPU (tens of millions of frames a second), and past the end of the file it repeats stale
# buffer contents. Named pipes give the pacing: this test writes the microphone pipe at real time
# and reads the speaker pipe at real time, and the plugin's blocking read()/write() follow.

MIC_PERIOD_BYTES = 2 * round(audio_io.MIC_BLOCK_S * 16000) * 2  # 2 callback blocks of 16-bit mono
# The plugin overwrites each ALSA period with ONE read() of the pipe; a short read leaves the rest
# of the period stale. PortAudio reads two 20 ms callback blocks per period here, so the pipe is
# written in whole periods and every read finds one.

ASOUNDRC = """\
pcm.afnext_mic {{
    type plug
    slave {{
        pcm {{
            type file
            slave.pcm "null"
            file "/dev/null"
            infile "{mic}"
            format "raw"
        }}
        format S16_LE
        rate 16000
        channels 1
    }}
}}
pcm.afnext_speaker {{
    type plug
    slave {{
        pcm {{
            type file
            slave.pcm "null"
            file "{speaker}"
            format "raw"
        }}
        format S16_LE
        rate 16000
        channels 1
    }}
}}
"""
PIPE_BYTES_PER_S = 16000 * 2
MAX_BEHIND_S = 0.2  # seconds a pipe end may lag the clock before its clock is moved up instead


class AlsaPipes:
    """HOME with an .asoundrc whose two PCMs read and write named pipes held open here."""

    def __init__(self, home: Path) -> None:
        self.home = home
        mic, speaker = home / "mic.pipe", home / "speaker.pipe"
        os.mkfifo(mic)
        os.mkfifo(speaker)
        (home / ".asoundrc").write_text(ASOUNDRC.format(mic=mic, speaker=speaker))
        # O_RDWR: ALSA's own opens (probes included) never block waiting for the other end.
        self.mic = os.open(mic, os.O_RDWR | os.O_NONBLOCK)
        self.speaker = os.open(speaker, os.O_RDWR | os.O_NONBLOCK)
        fcntl.fcntl(self.mic, fcntl.F_SETPIPE_SZ, 4096)  # bytes: little silence queued ahead of the speech
        self.heard = bytearray()  # what the program played
        self.say = queue.Queue()  # 16-bit PCM bytes to put on the microphone
        self.done = threading.Event()
        self.threads = [threading.Thread(target=f, daemon=True) for f in (self._write_mic, self._read_speaker)]
        for thread in self.threads:
            thread.start()

    def env(self) -> dict:
        return dict(os.environ, HOME=str(self.home), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")

    def _write_mic(self) -> None:
        """Real-time paced: queued speech, else silence, one whole ALSA period per write."""
        pending, sent, start = b"", 0, time.monotonic()
        while not self.done.is_set():
            if not pending:
                pending = self.say.get_nowait() if not self.say.empty() else bytes(MIC_PERIOD_BYTES)
                pending += bytes(-len(pending) % MIC_PERIOD_BYTES)
            if select.select([], [self.mic], [], 0.1)[1]:
                try:
                    os.write(self.mic, pending[:MIC_PERIOD_BYTES])  # ≤ PIPE_BUF: all or nothing
                except BlockingIOError:
                    continue
                pending, sent = pending[MIC_PERIOD_BYTES:], sent + MIC_PERIOD_BYTES
                ahead = start + sent / PIPE_BYTES_PER_S - time.monotonic()
                start -= min(0.0, ahead + MAX_BEHIND_S)  # blocked while nobody read: don't catch up
                time.sleep(max(0.0, ahead - 0.1))

    def _read_speaker(self) -> None:
        """Real-time paced: the program's writes block once it is ahead of the clock."""
        start = time.monotonic()
        while not self.done.is_set():
            if select.select([self.speaker], [], [], 0.1)[0]:
                start = max(start, time.monotonic() - len(self.heard) / PIPE_BYTES_PER_S - MAX_BEHIND_S)
                allowed = int((time.monotonic() - start) * PIPE_BYTES_PER_S) - len(self.heard)
                if allowed > 0:
                    try:
                        self.heard += os.read(self.speaker, min(allowed, 1 << 16))
                    except BlockingIOError:
                        pass
            time.sleep(0.01)

    def played(self) -> np.ndarray:
        return np.frombuffer(bytes(self.heard[:len(self.heard) // 2 * 2]), "<i2")

    def close(self) -> None:
        self.done.set()
        for thread in self.threads:
            thread.join(5)
        os.close(self.mic)
        os.close(self.speaker)


@pytest.fixture
def alsa(tmp_path):
    if not hasattr(os, "mkfifo") or not hasattr(fcntl, "F_SETPIPE_SZ"):
        pytest.skip("needs Linux named pipes")
    try:
        audio_io.load_sounddevice()
    except NoAudioError as exc:
        pytest.skip(str(exc))
    pipes = AlsaPipes(tmp_path)
    yield pipes
    pipes.close()


def desktop_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "app.desktop", *args]


def test_list_devices_shows_the_alsa_devices(alsa):
    result = subprocess.run(desktop_cmd("--list-devices"), cwd=ROOT, env=alsa.env(), capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "afnext_mic" in result.stdout and "afnext_speaker" in result.stdout


def test_talk_through_portaudio_on_alsa(alsa, tiny_dir):
    talk_through_alsa(alsa, desktop_cmd("--model", str(tiny_dir), "--tts", "espeak", "--device", "cpu",
                                        "--input-device", "afnext_mic", "--output-device", "afnext_speaker"))


def test_talk_to_a_server_through_portaudio_on_alsa_without_torch(alsa, engine):
    """`--server`: the program on real PortAudio, in a Python that cannot import torch or transformers."""
    blocked = "import sys; sys.modules.update(torch=None, transformers=None); from app.desktop import main; sys.exit(main())"
    with realtime_server(engine) as url:
        talk_through_alsa(alsa, [sys.executable, "-c", blocked, "--server", url,
                                 "--input-device", "afnext_mic", "--output-device", "afnext_speaker"])


def talk_through_alsa(alsa, command: list[str]) -> None:
    proc = subprocess.Popen(command, cwd=ROOT, env=alsa.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        wait_until(lambda: any(line.startswith("Microphone: afnext_mic") for line in lines) or proc.poll() is not None,
                   timeout=60, what="the program to start")
        assert proc.poll() is None, proc.stderr.read()
        question = np.concatenate([speech(), np.zeros(2 * SAMPLE_RATE, np.float32)])
        alsa.say.put((np.clip(question, -1, 1) * 32767).astype("<i2").tobytes())
        wait_until(lambda: any("latency:" in line for line in lines) and np.abs(alsa.played()).max(initial=0) > 1000,
                   timeout=60, what=f"a reply that is printed and played; so far: {lines}")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(5)
    err = proc.stderr.read()
    text = "".join(lines)
    assert "you: (" in text and "s of speech)" in text
    assert any(line.startswith("assistant: ") and len(line.strip()) > len("assistant:") for line in lines), text
    assert lines[-1] == "bye\n" and "Traceback" not in err, (text, err)
