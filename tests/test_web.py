"""The web app's server side without a browser: the Recordings logic, the page's voice socket
(/v1/realtime over Starlette's test client), the backend's fallbacks and the page's wiring."""

from __future__ import annotations

import json
import re
import shutil
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import soundfile
import soxr
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.testclient import TestClient

from afnext.audio import SAMPLE_RATE, AudioError
from afnext.clip import prepare_clip
from afnext.engine import Engine
from afnext.events import ThinkStep
from afnext.sampling import GenerationOptions
from afnext.tts import load_synthesizer
from app import realtime, recording_questions, recordings
from app import realtime_wire as wire
from app.access import KEY_PROTOCOL, PAGE_PROTOCOL, TOKEN_TTL_S, Access, owner_of
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
    # An upload is played from a link in the served folder, never from the upload folder (not served:
    # an upload may be a page named .html), and the link goes with the recording.
    uploads, served = tmp_path / "uploads", tmp_path / "served"
    uploads.mkdir(), served.mkdir()
    upload = uploads / "talk.flac"
    shutil.copyfile(ASSETS / "sounds.flac", upload)
    mine = recordings.open_recording(str(upload), served, owned=True)
    played = Path(mine.url.removeprefix("gradio_api/file="))
    assert played.parent == served and played.suffix == ".flac" and played.samefile(upload)
    assert set(mine.files) == {upload, played}


def test_a_recording_asked_about_on_another_replica_meanwhile_is_reopened_from_the_store(tmp_path):
    """Replica A opened a recording (no question yet, so no journal); B, on the same store, answered one
    about it. When the page comes back to A, A's copy is not current: it is reopened from the store, with
    B's question and answer in its chat. An upload named .html is played from a link that is no page."""
    from afnext.live import Live, matches_store
    from afnext.store import Store, StoredTurn

    served, uploads = tmp_path / "served", tmp_path / "uploads"
    served.mkdir(), uploads.mkdir()
    upload = uploads / "talk.html"  # audio, named as a page
    shutil.copyfile(ASSETS / "sounds.flac", upload)
    here, there = Store(tmp_path / "store"), Store(tmp_path / "store")
    held = recordings.open_recording(str(upload), served, owned=True)
    assert held.url.endswith(".wav")  # not a format the page plays: the copy it decoded, under its own name
    held.cid, held.owner = "rec", "o"
    recording_questions.keep(held, here, "o", str(upload))
    live = Live()
    live.put("rec", "o", "g", held)
    assert live.open("rec", "o", "g", lambda: pytest.fail("rebuilt a current one"), matches_store) is held
    there.add_exchange("rec", StoredTurn("user", "Asked on B?"), StoredTurn("assistant", "Answered on B."), at=0)
    again = live.open("rec", "o", "g", lambda: recording_questions.reopen(here, "rec", "o", served), matches_store)
    assert again is not held and [m["content"] for m in again.chat] == ["Asked on B?", "Answered on B."]
    assert again.current()
    # The kept file (named .html, as uploaded) is linked in as .source, and played from a WAV copy.
    assert here.audio_path(again.kept).suffix == ".html" and again.url.endswith(".wav")
    suffixes = {p.suffix for p in served.iterdir()}
    assert recordings.SOURCE_SUFFIX in suffixes and suffixes <= recordings.PLAYABLE | {recordings.SOURCE_SUFFIX}


def test_open_recording_refuses_bad_files_in_one_sentence(tmp_path):
    junk = tmp_path / "junk.mp3"
    junk.write_bytes(b"not audio at all" * 100)
    with pytest.raises(AudioError):
        recordings.open_recording(str(junk), tmp_path)
    five_hours = tmp_path / "five-hours.wav"  # an 8 kHz 8-bit WAV whose header states 5 hours
    with soundfile.SoundFile(five_hours, "w", 8000, 1, "PCM_U8") as out:
        out.write(np.zeros(8000, np.float32))
    data = bytearray(five_hours.read_bytes())
    data[40:44] = (8000 * 5 * 3600).to_bytes(4, "little")
    five_hours.write_bytes(bytes(data))
    with pytest.raises(AudioError, match="the limit is 4 h"):
        recordings.open_recording(str(five_hours), tmp_path)


def test_a_recording_over_30_minutes_is_heard_in_parts_with_steps_at_their_true_times(backend, tmp_path):
    from tests.test_split import speech

    long = tmp_path / "meeting.aiff"  # not a format the page plays as it is: a WAV copy is made while reading
    with soundfile.SoundFile(long, "w", SAMPLE_RATE, 1, format="AIFF", subtype="PCM_16") as out:
        for block in speech(31 * 60, [], block_s=60):
            out.write(block)
    rec = recordings.open_recording(str(long), tmp_path)
    assert rec.audio is None and len(rec.parts) == 2 and rec.duration_s == pytest.approx(31 * 60, abs=0.1)
    served = Path(rec.url.removeprefix("gradio_api/file="))
    assert served.suffix == ".wav" and soundfile.info(served).frames == pytest.approx(31 * 60 * SAMPLE_RATE, abs=2)
    wave = json.loads(rec.waveform())
    assert len(wave["peaks"]) == 2 * recordings.PEAK_COLUMNS and max(wave["peaks"]) > 0.3
    assert [p["start"] for p in wave["parts"]] == [0, pytest.approx(rec.parts[1][0], abs=1e-3)]
    lines = list(recording_questions.ask(rec, "What is this?", True, backend))
    assert lines[0] == "Reading the recording (31:00) in 2 parts…"
    assert "Listening to part 2 of 2 (15:30–31:00)…" in lines and "Putting the 2 parts' answers together…" in lines
    second = rec.parts[1][0]
    assert [(s.part, s.start) for s in rec.steps] == [(1, 0.3), (1, 4.0), (1, 7.3),
                                                       (2, pytest.approx(second + 0.3)), (2, pytest.approx(second + 4.0)),
                                                       (2, pytest.approx(second + 7.3))]
    assert {s["part"] for s in json.loads(rec.waveform())["steps"]} == {1, 2}
    assert "Part 2 of 2" in rec.chat[1]["content"] and "milk and eggs" in rec.chat[2]["content"]
    follow = list(recording_questions.ask(rec, "And when?", True, backend))
    assert follow[0] == "Asking each of the 2 parts…" and not [line for line in follow if line.startswith("Read")]
    assert "encoder" not in follow[-1]


def test_a_kept_long_recording_goes_on_after_a_restart_exactly_as_it_would_have(backend, tmp_path, monkeypatch):
    from afnext.sampling import GenerationOptions
    from afnext.store import Store
    from tests.test_split import speech

    monkeypatch.setattr(recordings, "ANSWER_OPTIONS", GenerationOptions(max_new_tokens=16))  # short noise replies

    long = tmp_path / "meeting.flac"
    with soundfile.SoundFile(long, "w", SAMPLE_RATE, 1, subtype="PCM_16") as out:
        for block in speech(31 * 60, [], block_s=60):
            out.write(block)
    store, cache = Store(tmp_path / "data"), tmp_path / "cache"
    cache.mkdir()
    rec = recordings.open_recording(str(long), cache)
    rec.cid, rec.owner = "meeting", "someone"
    recording_questions.keep(rec, store, "someone", str(long))
    rec.keeping.set()
    list(recording_questions.ask(rec, "What happens?", False, backend, store))
    shutil.copytree(tmp_path / "data", tmp_path / "restarted")  # the store as a restart finds it after turn 1
    list(recording_questions.ask(rec, "And then?", False, backend, store))  # the live conversation goes on
    live = store.turns("meeting")
    assert len(live) == 4 and live[1].parts["merge"].startswith("A recording of 31:00 was too long")
    assert live[0].audio == rec.kept and len(live[1].parts["ids"]) == 2

    again = recording_questions.reopen(Store(tmp_path / "restarted"), "meeting", "someone", cache)
    assert again.parts == rec.parts and [m["content"] for m in again.chat][:1] == ["What happens?"]
    lines = list(recording_questions.ask(again, "And then?", False, backend, Store(tmp_path / "restarted")))
    assert "Reading the recording (31:00) in 2 parts…" in lines  # its parts hear their clips again, once
    restored = Store(tmp_path / "restarted").turns("meeting")
    assert restored[3].parts["ids"] == live[3].parts["ids"]  # every part answered as it would have
    assert restored[3].token_ids == live[3].token_ids and restored[3].text == live[3].text


def test_a_long_upload_is_decoded_once_for_its_waveform_questions_and_follow_ups(backend, tmp_path, monkeypatch,
                                                                                 decodes):
    """Decoding a compressed recording is its costliest step before the model (75 minutes of MP3: ~6 s of
    both cores), so the page's waveform, the parts' first question and a reopening after a restart do it
    once each, not once per stage. The page's 30-minute parts are 1-minute ones here: the same code."""
    from afnext.parts import PartedSession, PartOptions
    from afnext.store import Store
    from tests.test_split import speech

    monkeypatch.setattr(recordings, "MAX_AUDIO_S", 60.0)
    monkeypatch.setattr(recordings, "ANSWER_OPTIONS", GenerationOptions(max_new_tokens=8))
    monkeypatch.setattr(recordings, "PartedSession", lambda engine, source: PartedSession(
        engine, source, options=PartOptions(part_s=60.0, part_tokens=6)))
    long = tmp_path / "meeting.flac"
    with soundfile.SoundFile(long, "w", SAMPLE_RATE, 1, "PCM_16") as out:
        for block in speech(150, [], block_s=30):
            out.write(block)
    store, cache = Store(tmp_path / "data"), tmp_path / "cache"
    cache.mkdir()
    rec = recordings.open_recording(str(long), cache)
    assert decodes == [pytest.approx(150)] and len(rec.parts) == 4
    rec.cid, rec.owner = "meeting", "someone"
    recording_questions.keep(rec, store, "someone", str(long))
    rec.keeping.set()
    lines = list(recording_questions.ask(rec, "What happens?", False, backend, store))
    assert "Reading the recording (2:30) in 4 parts…" in lines and lines[-1].startswith("Done")
    assert rec.parted(backend.main).parts == list(rec.parts)  # the parts heard are the ones the page shows
    list(recording_questions.ask(rec, "And then?", False, backend, store))
    assert len(decodes) == 1  # the question read its parts from what the upload decoded, the follow-up nothing
    rec.close()

    again = recording_questions.reopen(store, "meeting", "someone", cache)  # a restart: the kept file, decoded once more
    lines = list(recording_questions.ask(again, "And after that?", False, backend, store))
    assert "Reading the recording (2:30) in 4 parts…" in lines and lines[-1].startswith("Done")
    assert len(decodes) == 2 and again.parts == rec.parts
    decoded = [f for f in again.files if f.suffix == recordings.DECODED_SUFFIX]
    assert len(decoded) == 1 and decoded[0].stat().st_size == 150 * SAMPLE_RATE * 4  # float32, as decoded


def test_a_recording_near_the_limit_is_decoded_once_to_tell_and_to_hear(backend, tmp_path, monkeypatch, decodes):
    """A file stating a length just under the limit may hold more (an MP3's frame count falls short), so it
    is measured by decoding: that decoding is the one it is heard from, not one more before it."""
    monkeypatch.setattr(recordings, "MAX_AUDIO_S", 60.0)
    near = tmp_path / "near.flac"
    soundfile.write(near, np.random.default_rng(0).uniform(-0.1, 0.1, 59 * SAMPLE_RATE).astype(np.float32),
                    SAMPLE_RATE, subtype="PCM_16")
    rec = recordings.open_recording(str(near), tmp_path)
    assert rec.parts == () and rec.audio.size == 59 * SAMPLE_RATE
    assert decodes == [pytest.approx(59)]


def test_the_api_sends_a_clip_over_the_limit_to_parts_without_decoding_it_again_to_know(loaded, tmp_path, decodes):
    """An MP3 that states no length is decoded up to the limit before it is found over; the request goes on
    to its parts from that, not from a second decoding up to the limit. Over 4 hours by its header, it is
    refused at once, as before."""
    import base64
    import dataclasses
    from types import SimpleNamespace

    from app import api_turn
    from app import openai_wire
    from tests.test_audio import untagged_mp3

    data = untagged_mp3(tmp_path / "untagged.mp3", 70).read_bytes()
    engine = SimpleNamespace(loaded=dataclasses.replace(loaded, max_audio_s=60.0))

    def message(raw: bytes):
        part = {"type": "input_audio", "input_audio": {"data": base64.b64encode(raw).decode(), "format": "mp3"}}
        return api_turn._message(openai_wire.ChatMessage(role="user", content=[part]), 0, engine, True)

    asked = message(bytes(data))
    assert asked.clip is None and asked.recording() == bytes(data)  # heard in parts
    assert len(decodes) == 1 and decodes[0] < 65  # decoded up to the limit once, never whole
    rate, hours = 8000, 5  # an 8-bit WAV header stating 5 hours, 10 s of samples
    header = (b"RIFF" + (36 + rate * hours * 3600).to_bytes(4, "little") + b"WAVEfmt " + (16).to_bytes(4, "little")
              + bytes([1, 0, 1, 0]) + rate.to_bytes(4, "little") + rate.to_bytes(4, "little") + bytes([1, 0, 8, 0])
              + b"data" + (rate * hours * 3600).to_bytes(4, "little"))
    with pytest.raises(AudioError, match="5 h long; the limit is 4 h"):
        message(header + bytes([128]) * rate * 10)


def test_think_steps_then_a_follow_up_that_does_not_re_encode(backend, tmp_path):
    rec = recordings.open_recording(str(ASSETS / "speech.wav"), tmp_path)
    lines = list(recording_questions.ask(rec, "What is this?", True, backend))
    assert lines[0].startswith("Listening to the recording (0:10)")
    assert [(s.start, s.end) for s in rec.steps] == [(0.3, 3.6), (4.0, 6.9), (7.3, 10.2)]
    assert all(isinstance(s, ThinkStep) for s in rec.steps)
    reasoning, answer = rec.chat[1], rec.chat[2]
    assert reasoning["metadata"] == {"title": recording_questions.REASONING_TITLE, "status": "done"}
    assert "Tuesday morning" in reasoning["content"] and "milk and eggs" in answer["content"]
    assert rec.answer == answer["content"]
    assert [s["start"] for s in json.loads(rec.waveform())["steps"]] == [0.3, 4.0, 7.3]
    session, clip = rec.session(backend.think)
    assert clip is None and session.tokens  # the follow-up below must not bring the clip again
    follow = list(recording_questions.ask(rec, "And when?", True, backend))
    assert follow[0] == "Reading the question…" and "encoder" not in follow[-1]
    assert [m["role"] for m in rec.chat] == ["user", "assistant", "assistant"] * 2


def test_plain_questions_use_the_main_model_and_refuse_empty_ones(backend, tmp_path):
    rec = recordings.open_recording(str(ASSETS / "sounds.flac"), tmp_path)
    with pytest.raises(ValueError, match="question"):
        list(recording_questions.ask(rec, "   ", False, backend))
    assert rec.chat == []
    list(recording_questions.ask(rec, "What do you hear?", False, backend))
    assert rec.session(backend.main)[1] is None and rec.session(backend.think)[1] is not None


def _asked_at_once(rec, backend) -> dict[int, list[str]]:
    """Two tabs asking about `rec` at the same moment: each one's status lines."""
    lines: dict[int, list[str]] = {}
    go = threading.Barrier(2)

    def asker(i: int) -> None:
        go.wait()
        lines[i] = list(recording_questions.ask(rec, f"Question {i}?", False, backend))

    threads = [threading.Thread(target=asker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return lines


def test_two_first_questions_at_once_hear_the_recording_once(backend, tmp_path):
    """Two tabs on one recording asking at the same moment: the clip goes with one question, the other
    waits for it and is a follow-up (the conversation holds the recording once)."""
    rec = recordings.open_recording(str(ASSETS / "speech.wav"), tmp_path)
    lines = _asked_at_once(rec, backend)
    firsts = sorted(lines[i][0] for i in range(2))
    assert firsts == ["Listening to the recording (0:10) and reading the question…", "Reading the question…"]
    session, sound = rec.session(backend.main)[0], backend.main.loaded.ids.sound
    heard = prepare_clip(rec.audio, backend.main.loaded.mel_filters).tokens
    assert session.tokens.count(sound) == heard  # one clip's audio tokens
    third = list(recording_questions.ask(rec, "And a third?", False, backend))  # nothing is left waiting
    assert third[0] == "Reading the question…" and third[-1].startswith("Done")


def test_two_first_questions_at_once_open_a_kept_recordings_conversation_once(backend, monkeypatch):
    """Two tabs ask about a kept recording at the same moment: its conversation is opened from the
    store once (two journals on one conversation would each refuse the other's next turn)."""
    opened, go = [], threading.Barrier(2)

    def slow_open(store, cid, route, **kwargs):
        opened.append(cid)
        time.sleep(0.2)  # rebuilding the sessions from the store takes a while
        return object()
    monkeypatch.setattr(recordings, "open_conversation", slow_open)
    rec = recordings.Recording("talk.wav", "", np.zeros(16000, np.float32), [], cid="c1", kept="k.wav")

    def first_question() -> None:
        go.wait()
        rec.open_sessions(backend, object())
    threads = [threading.Thread(target=first_question) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert opened == ["c1"] and rec.journal is not None


def test_two_questions_at_once_about_a_recording_in_parts_are_asked_one_after_the_other(backend, monkeypatch):
    """Two tabs on one long recording asking at the same moment: its parted session takes one question at
    a time, so the recording is read and encoded once, every part holds both turns, and the chat has each
    question with its answer (not the second question between the first and its answer)."""
    from afnext import split
    from afnext.parts import PartedSession, PartOptions
    from afnext.sampling import GenerationOptions
    from tests.conftest import noise

    monkeypatch.setattr(recordings, "ANSWER_OPTIONS", GenerationOptions(max_new_tokens=16))
    monkeypatch.setattr(recordings, "PartedSession", lambda engine, source: PartedSession(
        engine, source, options=PartOptions(part_s=60.0, part_tokens=6)))  # 1-minute parts: seconds, not minutes
    audio = noise(150)
    places = tuple((p.start_s, p.end_s) for p in split.split_recording(audio, part_s=60.0))
    rec = recordings.Recording("long.wav", "", None, [], parts=places, source=audio)
    lines = _asked_at_once(rec, backend)
    assert all(lines[i][-1].startswith("Done") for i in range(2))
    parted = rec.parted(backend.main)
    assert parted.encoded_windows == 2 * len(places)  # each part's two 30 s windows, once
    assert [len(p.session.messages) for p in parted._parts] == [4] * len(places)  # both turns in every part
    roles = "".join(m["role"][0] for m in rec.chat)  # u: a question, a: its reasoning and answer
    assert re.fullmatch("ua+ua+", roles), roles


def test_a_first_question_cut_off_before_the_clip_is_heard_leaves_it_to_the_next(backend, tmp_path):
    rec = recordings.open_recording(str(ASSETS / "speech.wav"), tmp_path)
    first = recording_questions.ask(rec, "First?", False, backend)
    assert next(first).startswith("Listening to the recording")
    first.close()  # the page closed before the model read it: the turn is rolled back
    again = list(recording_questions.ask(rec, "Again?", False, backend))
    assert again[0].startswith("Listening to the recording") and again[-1].startswith("Done")


def test_a_recording_too_short_to_hear_is_refused_when_it_is_opened(tmp_path):
    blip = tmp_path / "blip.wav"
    soundfile.write(blip, np.full(160, 0.1, np.float32), SAMPLE_RATE)  # 10 ms
    with pytest.raises(AudioError, match=r"too short \(10 ms\)"):
        recordings.open_recording(str(blip), tmp_path)


def test_answer_once_is_the_api(backend):
    answer = recording_questions.answer_once(backend, str(ASSETS / "speech.wav"), "Summarize.", True)
    assert answer == "It is a voice note asking to buy milk and eggs on the way home."
    with pytest.raises(ValueError, match="question"):
        recording_questions.answer_once(backend, str(ASSETS / "speech.wav"), " ", False)


def test_backend_falls_back_to_the_demo_model_and_says_so(monkeypatch):
    b = start_backend(BackendOptions(model="/nonexistent/checkpoint", device="cpu"))
    try:
        assert b.main is b.think and b.main.loaded.random_weights
        text = banner(b)
        assert "No checkpoint folder at /nonexistent/checkpoint" in text
        assert "random weights" in text and "non-commercial" in text
    finally:
        b.close()


def test_a_server_without_any_voice_serves_text_and_says_so(monkeypatch, loaded, tmp_path):
    """espeak-ng cannot load (a platform without its library): the app still serves, the banner says
    replies are text only, and speaking is one sentence naming why, while the text goes on."""
    from afnext.assistant import Assistant
    from afnext.events import Error
    from afnext.session import Session
    from afnext.tts import TTSError
    from app import backend as backends

    def cannot(engine="espeak", **kwargs):
        raise TTSError(f"{engine} could not load its library (no such file).")
    monkeypatch.setattr(backends, "load_synthesizer", cannot)
    notices: list[str] = []
    voice = backends._voice(BackendOptions(tts="pocket"), notices)
    assert notices == ["No voice could be loaded (pocket: pocket could not load its library (no such file); "
                       "espeak-ng: espeak could not load its library (no such file)). Replies are text only."]
    engine = Engine(loaded)
    try:
        assistant = Assistant(Session(engine), voice)
        assistant.say(None, "Hello?", generation=GenerationOptions(max_new_tokens=4))
        assert assistant.wait(30)
        assistant.close()
        events = [e.event if hasattr(e, "event") else e for e in assistant.events(timeout=5)]
    finally:
        engine.close()
    errors = [e.message for e in events if isinstance(e, Error)]
    assert errors == ["The reply could not be spoken: This server has no voice: espeak could not load its library "
                      "(no such file)."], errors
    assert any(type(e).__name__ == "TextDelta" for e in events), "the text went on"

    import gradio as gr

    from afnext.live import Live
    from app.recordings_tab import RecordingsTab
    tab = RecordingsTab(BackendLoader.ready_made(Backend(engine, engine, voice)), tmp_path, None, Live())
    recording = recordings.open_recording(str(ASSETS / "sounds.flac"), tmp_path)
    recording.answer = "A dog barks."
    tab.live.put("rec1", owner_of("d" * 32), "10.0.0.1", recording)
    with pytest.raises(gr.Error, match="The answer could not be spoken: This server has no voice: espeak could not"):
        tab.speak("rec1", "d" * 32)


def test_two_models_on_the_cpu_split_its_threads_between_their_engines(tiny_dir):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        both = start_backend(BackendOptions(model=str(tiny_dir), think_model=str(tiny_dir), device="cpu"))
        one = start_backend(BackendOptions(model=str(tiny_dir), device="cpu"))
    finally:
        torch.set_num_threads(before)
    try:
        assert both.main is not both.think
        assert (both.main.threads, both.think.threads) == (2, 2)  # one OpenMP team each, none oversubscribed
        assert one.main.threads == 4
    finally:
        both.close()
        one.close()


@pytest.fixture
def voice(backend):
    """/v1/realtime alone, served by Starlette's test client: voice(access=None) → client. Every
    conversation is closed after the test (a turn still running when the interpreter exits aborts it)."""
    servers: list[realtime.RealtimeServer] = []

    def make(access: Access | None = None, ip: str = "testclient", store=None) -> TestClient:
        servers.append(realtime.RealtimeServer(BackendLoader.ready_made(backend), access, store))
        return TestClient(Starlette(routes=[WebSocketRoute(realtime.ROUTE, servers[-1].__call__)]), client=(ip, 50000))
    yield make
    for server in servers:
        server.shutdown()


def appends(pcm16k: np.ndarray, chunk_s: float = 0.1) -> list[str]:
    """int16 16 kHz → input_audio_buffer.append events of 24 kHz pcm16, `chunk_s` each."""
    audio = soxr.resample(pcm16k.astype(np.float32) / 32768, SAMPLE_RATE, 24_000)
    step = round(chunk_s * 24_000)
    return [json.dumps(wire.append(audio[i:i + step])) for i in range(0, len(audio), step)]


def events_until(ws, kind: str, count: int = 1) -> list[dict]:
    """Server events up to the `count`-th of `kind`, in order."""
    seen: list[dict] = []
    while sum(e["type"] == kind for e in seen) < count:
        seen.append(ws.receive_json())
    return seen


def answered(response: dict) -> bool:
    """A reply made to its end: completed, or cut off by its max_output_tokens (a random-weight model
    seldom ends a reply by itself)."""
    return response["status"] == "completed" or (
        response["status"] == "incomplete" and response["status_details"]["reason"] == "max_output_tokens")


def speech_16k() -> np.ndarray:
    speech, rate = soundfile.read(ASSETS / "speech.wav", dtype="int16")
    assert rate == SAMPLE_RATE
    return speech


def test_realtime_hears_a_turn_and_answers_with_text_and_audio(voice):
    pcm = np.concatenate([speech_16k(), np.zeros(SAMPLE_RATE * 2, np.int16)])
    with voice().websocket_connect(f"{realtime.ROUTE}?model=instruct") as ws:
        assert ws.receive_json()["type"] == "session.created"
        for event in appends(pcm):
            ws.send_text(event)
        seen = events_until(ws, "response.done")
    kinds = [e["type"] for e in seen]
    assert kinds.index("input_audio_buffer.speech_started") < kinds.index("input_audio_buffer.committed") \
        < kinds.index("response.created") < kinds.index("response.output_audio_transcript.delta") \
        < kinds.index("response.output_audio.delta")
    audio = sum(len(wire.pcm16(e["delta"])) for e in seen if e["type"] == "response.output_audio.delta")
    assert audio > 0
    done = seen[-1]
    assert answered(done["response"]) and done["timings"]["endpoint_s"] > 0
    assert done["timings"]["first_audio_s"] >= done["timings"]["ttft_s"] > 0


def test_with_create_response_off_a_heard_turn_waits_for_response_create(voice):
    pcm = np.concatenate([speech_16k(), np.zeros(SAMPLE_RATE * 2, np.int16)])
    with voice().websocket_connect(f"{realtime.ROUTE}?model=instruct") as ws:
        ws.receive_json()
        ws.send_json({"type": "session.update", "session": {"audio": {"input": {"turn_detection": {
            "type": "server_vad", "create_response": False}}}}})
        updated = events_until(ws, "session.updated")[-1]
        assert updated["session"]["audio"]["input"]["turn_detection"]["create_response"] is False
        for event in appends(pcm):
            ws.send_text(event)
        heard = events_until(ws, "conversation.item.done")
        assert "input_audio_buffer.committed" in [e["type"] for e in heard]
        ws.send_json({"type": "input_audio_buffer.clear"})  # nothing but this answer comes: no response began
        assert ws.receive_json()["type"] == "input_audio_buffer.cleared"
        ws.send_json({"type": "response.create"})
        reply = events_until(ws, "response.done")
    kinds = [e["type"] for e in heard + reply]
    assert "response.created" not in [e["type"] for e in heard] and answered(reply[-1]["response"])
    assert any(e["type"] == "response.output_audio.delta" for e in reply), kinds


def test_a_burst_of_responses_asked_for_gets_one_at_a_time_and_loses_no_item(voice):
    """Items and response.create sent in a burst: the first response answers the first item; the
    others, asked for while it is made, are refused as OpenAI refuses them, and their items wait for
    the next response.create, which answers them, after the last of them."""
    with voice().websocket_connect(f"{realtime.ROUTE}?model=instruct") as ws:
        ws.receive_json()
        ws.send_json({"type": "session.update", "session": {"output_modalities": ["text"], "max_output_tokens": 3,
                                                            "audio": {"input": {"turn_detection": None}}}})
        for i in range(3):  # no waiting between them: the server's threads see them all at once
            ws.send_json({"type": "conversation.item.create", "item": {
                "type": "message", "role": "user", "content": [{"type": "input_text", "text": f"Question {i}?"}]}})
            ws.send_json({"type": "response.create"})
        seen = events_until(ws, "response.done")
        users = [e["item"]["id"] for e in seen if e["type"] == "conversation.item.done" and e["item"]["role"] == "user"]
        while len(users) < 3 or sum(e["type"] == "error" for e in seen) < 2:
            seen.append(ws.receive_json())
            users += [seen[-1]["item"]["id"]] if seen[-1]["type"] == "conversation.item.done" else []
        ws.send_json({"type": "response.create"})
        seen += events_until(ws, "response.done")
    answers = [e["previous_item_id"] for e in seen
               if e["type"] == "conversation.item.added" and e["item"]["role"] == "assistant"]
    refused = [e["error"]["code"] for e in seen if e["type"] == "error"]
    assert len(users) == 3 and answers == [users[0], users[2]], (users, answers)
    assert refused == ["conversation_already_has_active_response"] * 2, refused
    assert not [e for e in seen if e["type"].startswith("input_audio_buffer.")], "no audio was committed"


def test_response_done_says_why_a_response_did_not_complete(voice, backend):
    """status_details as OpenAI's server gives it: none for a finished reply; max_output_tokens (the
    session's, or the response's own) for one cut off there; client_cancelled for a response.cancel."""
    question = {"type": "conversation.item.create", "item": {
        "type": "message", "role": "user", "content": [{"type": "input_text", "text": "My list?"}]}}

    def respond(ws, response=None) -> dict:
        ws.send_json(question)
        ws.send_json({"type": "response.create", **({"response": response} if response else {})})
        return events_until(ws, "response.done")[-1]["response"]
    with voice().websocket_connect(f"{realtime.ROUTE}?model=think") as ws:  # the scripted reply: 60-odd tokens
        ws.receive_json()
        ws.send_json({"type": "session.update", "session": {"output_modalities": ["text"],
                                                            "audio": {"input": {"turn_detection": None}}}})
        events_until(ws, "session.updated")
        whole = respond(ws)
        assert whole["status"] == "completed" and whole["status_details"] is None, whole
        own = respond(ws, {"max_output_tokens": 5})
        assert own["status"] == "incomplete" and own["usage"]["output_tokens"] == 5, own
        assert own["status_details"] == {"type": "incomplete", "reason": "max_output_tokens"}
        assert own["output"][0]["status"] == "incomplete"
        ws.send_json({"type": "session.update", "session": {"max_output_tokens": 7}})
        events_until(ws, "session.updated")
        session = respond(ws)
        assert session["status"] == "incomplete" and session["usage"]["output_tokens"] == 7, session

        backend.think.step_delay_s = 0.05  # slow enough to be cancelled while it is made
        try:
            ws.send_json(question)
            ws.send_json({"type": "response.create"})
            created = events_until(ws, "response.created")[-1]["response"]["id"]
            ws.send_json({"type": "response.cancel", "response_id": created})
            cancelled = events_until(ws, "response.done")[-1]["response"]
        finally:
            backend.think.step_delay_s = 0.0
    assert cancelled["id"] == created and cancelled["status"] == "cancelled", cancelled
    assert cancelled["status_details"] == {"type": "cancelled", "reason": "client_cancelled"}


def test_the_think_model_shows_its_reasoning_and_speaks_only_the_answer(voice):
    from tests.web.scripted import SCRIPT

    reasoning, answer = SCRIPT.removeprefix("<think>\n").split("\n</think>\n")
    with voice().websocket_connect(f"{realtime.ROUTE}?model=think") as ws:
        assert ws.receive_json()["session"]["max_output_tokens"] == wire.THINK_OUTPUT_TOKENS
        ws.send_json({"type": "session.update", "session": {"audio": {"input": {"turn_detection": None}}}})
        ws.send_json({"type": "conversation.item.create", "item": {
            "type": "message", "role": "user", "content": [{"type": "input_text", "text": "What is it?"}]}})
        ws.send_json({"type": "response.create"})
        seen = events_until(ws, "response.done")
    said = "".join(e["delta"] for e in seen if e["type"] == "response.output_audio_transcript.delta")
    thought = "".join(e["delta"] for e in seen if e["type"] == "response.reasoning_text.delta")
    assert said.strip() == answer and thought.strip() == reasoning.strip()
    assert [e["text"] for e in seen if e["type"] == "response.reasoning_text.done"] == [thought]


def test_switching_to_manual_turns_mid_sentence_makes_no_turn_of_it(voice):
    speech = speech_16k()
    noise = (np.random.default_rng(0).standard_normal(SAMPLE_RATE) * 3000).astype(np.int16)
    with voice().websocket_connect(f"{realtime.ROUTE}?model=instruct") as ws:
        ws.receive_json()
        for event in appends(speech[: 2 * SAMPLE_RATE]):  # two seconds into the first sentence…
            ws.send_text(event)
        ws.send_json({"type": "session.update", "session": {"audio": {"input": {"turn_detection": None}}}})
        for event in appends(noise):  # …then a held push-to-talk second: the only turn
            ws.send_text(event)
        ws.send_json({"type": "input_audio_buffer.commit"})
        ws.send_json({"type": "response.create"})
        seen = events_until(ws, "response.done")
    kinds = [e["type"] for e in seen]
    assert kinds.count("input_audio_buffer.committed") == 1 and "input_audio_buffer.speech_stopped" not in kinds
    assert kinds.index("session.updated") < kinds.index("input_audio_buffer.committed")


def test_an_unknown_model_and_a_wrong_key_get_a_sentence_and_a_close(voice):
    client = voice(Access("sesame"))
    for url, headers, words in [
            (f"{realtime.ROUTE}?model=gpt-4o", {"authorization": "Bearer sesame"}, "Unknown model 'gpt-4o'"),
            (f"{realtime.ROUTE}?model=instruct", {"authorization": "Bearer wrong"}, "Incorrect API key"),
            (f"{realtime.ROUTE}?model=instruct", {}, "Missing API key")]:
        with client.websocket_connect(url, headers=headers) as ws:
            error = ws.receive_json()
            assert error["type"] == "error" and words in error["error"]["message"], error
            assert ws.receive()["type"] == "websocket.close"
    with client.websocket_connect(f"{realtime.ROUTE}?model=instruct", headers={"authorization": "Bearer sesame"}) as ws:
        assert ws.receive_json()["type"] == "session.created"


def test_the_page_opens_its_socket_with_a_token_not_the_key(voice):
    access = Access("sesame")
    client = voice(access)
    token, expires = access.page_token()
    assert expires > time.time() + 60
    same_site = {"origin": "http://testserver"}  # copied per call: the test client writes its subprotocols into it
    with client.websocket_connect(f"{realtime.ROUTE}?model=instruct", headers=dict(same_site),
                                  subprotocols=["realtime", f"{PAGE_PROTOCOL}{token}"]) as ws:
        assert ws.receive_json()["type"] == "session.created"
    stale, _ = access.page_token(now=time.time() - 2 * TOKEN_TTL_S)
    forged = token[:-1] + ("0" if token[-1] != "0" else "1")
    for bad, words in ((stale, "expired"), (forged, "expired"), ("12-ab", "expired")):
        with client.websocket_connect(f"{realtime.ROUTE}?model=instruct", headers=dict(same_site),
                                      subprotocols=["realtime", f"{PAGE_PROTOCOL}{bad}"]) as ws:
            got = ws.receive_json()
            assert words in got.get("error", {}).get("message", ""), (bad, got)
    with client.websocket_connect(f"{realtime.ROUTE}?model=instruct", headers={"origin": "https://evil.example"},
                                  subprotocols=["realtime", f"{PAGE_PROTOCOL}{token}"]) as ws:
        assert "own site" in ws.receive_json()["error"]["message"]  # another site's page, even with a token
    with client.websocket_connect(f"{realtime.ROUTE}?model=instruct", headers={"origin": "https://evil.example"},
                                  subprotocols=["realtime", f"{KEY_PROTOCOL}sesame"]) as ws:
        assert ws.receive_json()["type"] == "session.created"  # a browser client of another site with the key
        assert ws.accepted_subprotocol == "realtime", "the key is never echoed in the handshake"


def test_a_page_token_opens_only_what_the_page_does(voice):
    """The page is open to all, so its token is no key: the instruct model, microphone audio in,
    speech out, and turn detection settings, from a socket that names the page's Origin."""
    access = Access("sesame")
    client = voice(access)
    token, _ = access.page_token()
    page = {"subprotocols": ["realtime", f"{PAGE_PROTOCOL}{token}"]}
    with client.websocket_connect(f"{realtime.ROUTE}?model=instruct", **page) as ws:  # no Origin: a script
        assert "page only" in ws.receive_json()["error"]["message"]
    with client.websocket_connect(f"{realtime.ROUTE}?model=think", headers={"origin": "http://testserver"}, **page) as ws:
        assert "instruct model only" in ws.receive_json()["error"]["message"]
    with client.websocket_connect(f"{realtime.ROUTE}?model=instruct", headers={"origin": "http://testserver"}, **page) as ws:
        assert [ws.receive_json()["type"] for _ in range(2)] == ["session.created", "conversation.created"]
        ws.send_json({"type": "conversation.item.create", "item": {
            "type": "message", "role": "user", "content": [{"type": "input_text", "text": "Write me a poem."}]}})
        assert ws.receive_json()["error"]["code"] == "page_session"
        for session in ({"instructions": "Be a pirate."}, {"output_modalities": ["text"]}, {"max_output_tokens": 4096}):
            ws.send_json({"type": "session.update", "session": session})
            assert ws.receive_json()["error"]["code"] == "page_session", session
        for response in ({"instructions": "Write me a poem."}, {"max_output_tokens": 4096}):
            ws.send_json({"type": "response.create", "response": response})
            assert ws.receive_json()["error"]["code"] == "page_session", response
        ws.send_json({"type": "session.update", "session": {"audio": {"input": {"turn_detection": None}}}})
        assert ws.receive_json()["type"] == "session.updated"  # push-to-talk, as the page switches to it


def test_a_server_on_localhost_answers_only_to_its_own_names():
    """DNS rebinding: another site's name pointed at 127.0.0.1 is same-origin with itself, not with us."""
    access = Access(local=True)
    for host in ("127.0.0.1:7860", "localhost:7860", "[::1]:7860", "abc.gradio.live"):
        assert access.socket({"host": host, "origin": f"http://{host}"}, []).refusal is None, host
    for host in ("rebind.attacker.example:7860", "", "127.0.0.1.attacker.example"):
        assert "own address" in access.socket({"host": host, "origin": f"http://{host}"}, []).refusal, host
    assert Access(local=False).socket({"host": "box.example", "origin": "http://box.example"}, []).refusal is None
    assert not access.token_ok("\u00b2-ab") and not access.token_ok("")  # "²".isdigit() is True in Python


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


def test_the_fallback_notice_does_not_advise_the_demo_model_it_already_runs(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # the hub off: the model is not in the cache
    b = start_backend(BackendOptions(model="nvidia/af-next-not-in-the-cache", device="cpu"))
    try:
        text = banner(b)
        assert b.main.loaded.random_weights and "Running the offline demo model instead" in text
        assert "hf download nvidia/af-next-not-in-the-cache" in text, "the advice that does apply stays"
        assert "--model tiny" not in text, text
        assert text.count("random") == 1, f"the demo model's random weights said once: {text}"
    finally:
        b.close()


def test_short_recordings_show_their_length_in_seconds():
    assert [recordings.length(s) for s in (0.2000625, 0.03, 0.95, 10.6, 3700)] == [
        "0.2 s", "0.03 s", "0.95 s", "0:10", "1:01:40"]


def test_opening_an_example_empties_the_upload_box_with_its_first_update_only(backend, tmp_path):
    """The box is emptied as the example starts decoding; a file dropped in the box meanwhile is a newer
    upload, which the example's later updates (its waveform, its place in the history) leave alone."""
    import gradio as gr

    from app.recordings_tab import RecordingsTab

    tab = RecordingsTab(BackendLoader.ready_made(backend), tmp_path, None, None)
    request = type("Request", (), {"client": type("Client", (), {"host": "10.0.0.1"})()})()
    updates = list(tab.example(ASSETS / "sounds.flac")("a" * 32, request))
    boxes = [update[-1] for update in updates]
    assert len(boxes) >= 3 and boxes[0] is None, boxes
    assert all(box == gr.skip() for box in boxes[1:]), boxes
    assert updates[-1][0].startswith("**sounds\\.flac** (0:13).")


def test_a_rename_a_delete_from_another_tab_overtakes_changes_nothing_shown(backend, tmp_path, monkeypatch):
    import gradio as gr

    from afnext.store import Store
    from app.access import owner_of
    from app.recordings_tab import RecordingsTab
    from tests.test_history import deleted_once_renamed

    store, owner = Store(tmp_path / "store"), "b" * 32
    tab = RecordingsTab(BackendLoader.ready_made(backend), tmp_path, store, None)
    request = type("Request", (), {"client": type("Client", (), {"host": "10.0.0.1"})()})()
    cid = list(tab.example(ASSETS / "sounds.flac")(owner, request))[-2][3]  # (status, wave, chat, cid, box)
    deleted_once_renamed(store, monkeypatch)
    assert store.get(cid, owner=owner_of(owner)) is not None
    assert tab.rename(cid, "new name", cid, owner) == (gr.skip(), gr.skip(), gr.skip())


def test_a_recording_is_kept_though_gradio_never_comes_back_to_its_upload(backend, tmp_path):
    """Gradio may not resume the upload's generator after it showed the waveform (the page went, its
    stream was cut off): the recording is kept all the same, so a question asked about it does not wait
    on it (it waited up to KEEPING_WAIT_S, 120 s, with nothing shown: the file was kept only on the
    generator's next step)."""
    from afnext.store import Store
    from app.access import owner_of
    from app.recordings_tab import RecordingsTab

    store, owner = Store(tmp_path / "store"), "c" * 32
    tab = RecordingsTab(BackendLoader.ready_made(backend), tmp_path, store, None)
    request = type("Request", (), {"client": type("Client", (), {"host": "10.0.0.1"})()})()
    opening = tab.example(ASSETS / "sounds.flac")(owner, request)
    next(opening)  # "Decoding…"
    cid = next(opening)[3]  # the waveform, and the conversation's id; Gradio never comes back
    recording = tab.live.get(cid, owner_of(owner))
    assert recording.keeping.wait(30), "kept only once the upload's event went on"
    assert store.get(cid, owner=owner_of(owner)) is not None and recording.kept is not None
    opening.close()


class _Heard:
    """A voice that says what it was asked to, each piece as 0.1 s of sound."""

    sample_rate = 16000

    def __init__(self) -> None:
        self.said: list[str] = []

    def stream(self, text, cancel=None):
        from afnext.events import AudioChunk

        self.said.append(text)
        yield AudioChunk(16000, np.full(1600, 0.1, np.float32))


def test_speak_says_the_answer_as_the_voice_loop_would_not_its_markdown(loaded, tmp_path):
    """The Speak button's answer goes through the chunker, as a spoken reply does: no "asterisk
    asterisk", no emoji names, a link's words and not its URL, in pieces (one synthesizer call per
    sentence, not the whole answer in one)."""
    from afnext.live import Live
    from app.access import owner_of
    from app.recordings_tab import RecordingsTab

    voice = _Heard()
    engine = Engine(loaded)
    try:
        tab = RecordingsTab(BackendLoader.ready_made(Backend(engine, engine, voice)), tmp_path, None, Live())
        recording = recordings.open_recording(str(ASSETS / "sounds.flac"), tmp_path)
        recording.answer = "**Two** things happen 🎉. See [the notes](https://example.com/n) for more.\n- a dog\n- a bell"
        owner = "c" * 32
        tab.live.put("rec1", owner_of(owner), "10.0.0.1", recording)
        (rate, samples), _ = tab.speak("rec1", owner)
    finally:
        engine.close()
    assert voice.said == ["Two things happen.", "See the notes for more.", "a dog", "a bell"], voice.said
    assert rate == 16000 and len(samples) == 4 * 1600


def test_speak_reads_the_latest_answer_from_the_store_when_the_live_copy_is_gone_or_behind(loaded, tmp_path):
    """Speak on a recording the app has let go of (idle, or room for others) says its latest answer, as
    the page shows it, without decoding its audio again; and after another tab or replica asked about
    it, the newer answer, not the live copy's older one. Another owner's id says nothing."""
    from afnext.live import Live
    from afnext.store import Store, StoredTurn
    from app.access import owner_of
    from app.recordings_tab import NO_ANSWER, RecordingsTab

    voice, engine, owner = _Heard(), Engine(loaded), "e" * 32
    store = Store(tmp_path / "store")
    cid = store.create("recording", owner=owner_of(owner), audio=((ASSETS / "sounds.flac").read_bytes(), ".flac"))
    store.add_exchange(cid, StoredTurn("user", "What is it?"), StoredTurn("assistant", "A dog barks."), at=0)
    try:
        tab = RecordingsTab(BackendLoader.ready_made(Backend(engine, engine, voice)), tmp_path, store, Live())
        decoded = []
        real = recording_questions.open_recording
        recording_questions.open_recording = lambda *a, **k: decoded.append(a) or real(*a, **k)
        try:
            assert tab.speak(cid, owner)[0] is not None  # not live: from the store
            live = recording_questions.reopen(store, cid, owner_of(owner), tmp_path)
            tab.live.put(cid, owner_of(owner), "10.0.0.1", live)
            decoded.clear()
            store.add_exchange(cid, StoredTurn("user", "And then?"), StoredTurn("assistant", "A bell rings."), at=1)
            assert tab.speak(cid, owner)[0] is not None  # another replica asked since: the store's newer answer
            assert tab.speak(cid, "f" * 32) == (None, NO_ANSWER)
        finally:
            recording_questions.open_recording = real
    finally:
        engine.close()
    assert voice.said == ["A dog barks.", "A bell rings."] and not decoded


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




OWNER_A, OWNER_B = "a" * 64, "b" * 64


def _text_turn(ws, text: str) -> dict:
    ws.send_json({"type": "conversation.item.create", "item": {"type": "message", "role": "user",
                                                                "content": [{"type": "input_text", "text": text}]}})
    ws.send_json({"type": "response.create"})
    return events_until(ws, "response.done")[-1]


def test_a_socket_with_an_owner_keeps_its_conversation_and_goes_on_with_it_after_a_restart(voice, tmp_path):
    """Each completed turn is in the store; `?conversation=` goes on with it (the live session while the
    server runs, rebuilt from the store after a restart, with the tokens of an uninterrupted run);
    another owner, or no owner, cannot open it."""
    from afnext.store import Store

    store = Store(tmp_path / "store")
    client = voice(store=store)
    mine = ["realtime", f"afnext-owner.{OWNER_A}"]
    with client.websocket_connect(f"{realtime.ROUTE}?model=instruct", subprotocols=mine) as ws:
        created = ws.receive_json()
        cid = created["conversation"]["id"]
        assert created["conversation"]["turns"] == 0
        ws.send_json({"type": "session.update", "session": {"output_modalities": ["text"], "max_output_tokens": 6,
                                                            "audio": {"input": {"turn_detection": None}}}})
        events_until(ws, "session.updated")
        first = _text_turn(ws, "Hello there.")
        assert answered(first["response"])
        assert [t.text for t in store.turns(cid)][0] == "Hello there."
    shutil.copytree(tmp_path / "store", tmp_path / "copy")  # as the first server leaves it
    restarted = voice(store=Store(tmp_path / "copy"))  # a new server: nothing live, all from the store
    kept = []
    for server, where in ((client, store), (restarted, Store(tmp_path / "copy"))):
        with server.websocket_connect(f"{realtime.ROUTE}?model=instruct&conversation={cid}", subprotocols=mine) as ws:
            assert ws.receive_json()["conversation"] == {"id": cid, "turns": 1}
            ws.send_json({"type": "session.update", "session": {"output_modalities": ["text"], "max_output_tokens": 6,
                                                                "audio": {"input": {"turn_detection": None}}}})
            events_until(ws, "session.updated")
            assert answered(_text_turn(ws, "And then?")["response"])
        kept.append(where.turns(cid))
    assert [t.text for t in kept[0][0::2]] == ["Hello there.", "And then?"] == [t.text for t in kept[1][0::2]]
    assert kept[0][3].token_ids == kept[1][3].token_ids, "the live and the rebuilt session answered alike"
    assert kept[0][3].token_ids, "an empty reply would prove nothing"
    for protocols, words in ((["realtime", f"afnext-owner.{OWNER_B}"], "no voice conversation"),
                             (["realtime"], "needs an owner token"),
                             (["realtime", "afnext-owner.short"], "32 to 128 hexadecimal")):
        with restarted.websocket_connect(f"{realtime.ROUTE}?model=instruct&conversation={cid}",
                                         subprotocols=protocols) as ws:
            assert words in ws.receive_json()["error"]["message"], protocols


def test_instructions_changed_mid_conversation_come_in_where_they_changed_and_a_restart_goes_on_with_them(voice, tmp_path):
    """An agent handing over to another (LiveKit's update_instructions, the Agents SDK's handoffs) sends
    new instructions with session.update mid-conversation: they come into the conversation as a system
    message before the next turn (it was an error), are kept with that turn, and a socket that goes on
    with the conversation, after a restart too, has them in force and adds them no second time."""
    from afnext.store import Store

    store = Store(tmp_path / "store")
    client = voice(store=store)
    mine = ["realtime", f"afnext-owner.{OWNER_A}"]
    text_only = {"output_modalities": ["text"], "max_output_tokens": 4, "audio": {"input": {"turn_detection": None}}}
    with client.websocket_connect(f"{realtime.ROUTE}?model=instruct", subprotocols=mine) as ws:
        cid = ws.receive_json()["conversation"]["id"]
        ws.send_json({"type": "session.update", "session": {**text_only, "instructions": "Be brief."}})
        events_until(ws, "session.updated")
        first = _text_turn(ws, "Hello there.")["response"]["usage"]
        ws.send_json({"type": "session.update", "session": {"instructions": "Answer in French."}})
        assert events_until(ws, "session.updated")[-1]["session"]["instructions"] == "Answer in French."
        ws.send_json({"type": "session.update", "event_id": "clear", "session": {"instructions": ""}})
        error = events_until(ws, "error")[-1]["error"]
        assert error["event_id"] == "clear" and "not removed" in error["message"]
        second = _text_turn(ws, "And then?")["response"]["usage"]
        added = second["input_tokens"] - first["input_tokens"] - first["output_tokens"]
        assert added > 10, (first, second)  # the question, and the instructions before it
    kept = store.turns(cid)
    assert [t.instructions for t in kept[0::2]] == [(), ("Answer in French.",)]
    assert store.get(cid, owner=owner_of(OWNER_A)).system == "Be brief."
    shutil.copytree(tmp_path / "store", tmp_path / "copy")
    restarted = voice(store=Store(tmp_path / "copy"))
    replies = []
    for server, where in ((client, store), (restarted, Store(tmp_path / "copy"))):
        with server.websocket_connect(f"{realtime.ROUTE}?model=instruct&conversation={cid}", subprotocols=mine) as ws:
            assert ws.receive_json()["session"]["instructions"] == "Answer in French."
            ws.send_json({"type": "session.update", "session": {**text_only, "instructions": "Answer in French."}})
            events_until(ws, "session.updated")
            replies.append(_text_turn(ws, "Still there?")["response"])
        assert where.turns(cid)[-2].instructions == (), "the instructions in force were added again"
    assert replies[0]["usage"]["input_tokens"] == replies[1]["usage"]["input_tokens"]
    assert replies[0]["output"][0]["content"] == replies[1]["output"][0]["content"], "live and rebuilt answered alike"


def test_a_voice_conversation_that_went_on_on_another_replica_goes_on_from_the_store_when_it_comes_back(voice, tmp_path):
    """Two replicas on one store (each its own live registry): a conversation begun on A, gone on with on
    B, then opened on A again goes on from all the store holds — A's live copy, a turn behind, is rebuilt —
    and no turn is lost or refused."""
    from afnext.store import Store

    mine = ["realtime", f"afnext-owner.{OWNER_A}"]
    a, b = voice(store=Store(tmp_path)), voice(store=Store(tmp_path))

    def turn(server, text: str, cid: str | None, turns: int) -> str:
        query = f"&conversation={cid}" if cid else ""
        with server.websocket_connect(f"{realtime.ROUTE}?model=instruct{query}", subprotocols=mine) as ws:
            created = ws.receive_json()["conversation"]
            assert created["turns"] == turns, created
            ws.send_json({"type": "session.update", "session": {"output_modalities": ["text"], "max_output_tokens": 4,
                                                                "audio": {"input": {"turn_detection": None}}}})
            events_until(ws, "session.updated")
            done = _text_turn(ws, text)
            assert answered(done["response"]), done
        return created["id"]

    cid = turn(a, "First, on A.", None, 0)
    turn(b, "Second, on B.", cid, 1)
    turn(a, "Third, back on A.", cid, 2)  # A still holds its one-turn session live
    turn(b, "Fourth, on B again.", cid, 3)
    kept = Store(tmp_path).turns(cid)
    assert [t.text for t in kept[0::2]] == ["First, on A.", "Second, on B.", "Third, back on A.", "Fourth, on B again."]
    assert all(t.token_ids for t in kept[1::2])


def _owner_a() -> str:
    from app.access import owner_of
    return owner_of(OWNER_A)


def test_eight_voice_conversations_writing_at_once_lose_nothing(voice, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from afnext.store import Store

    store = Store(tmp_path)
    client = voice(store=store)

    def converse(i: int) -> tuple[str, str]:
        owner = f"{i:02d}" * 32
        with client.websocket_connect(f"{realtime.ROUTE}?model=instruct", subprotocols=["realtime", f"afnext-owner.{owner}"]) as ws:
            cid = ws.receive_json()["conversation"]["id"]
            ws.send_json({"type": "session.update", "session": {"output_modalities": ["text"], "max_output_tokens": 4,
                                                                "audio": {"input": {"turn_detection": None}}}})
            events_until(ws, "session.updated")
            for turn in range(3):
                assert answered(_text_turn(ws, f"conversation {i}, turn {turn}")["response"])
        return owner, cid

    with ThreadPoolExecutor(8) as pool:
        done = list(pool.map(converse, range(8)))
    reopened = Store(tmp_path)  # what a restart finds
    from app.access import owner_of
    for i, (owner, cid) in enumerate(done):
        assert [c.id for c in reopened.list(owner=owner_of(owner))] == [cid]
        turns = reopened.turns(cid)
        assert [t.text for t in turns[0::2]] == [f"conversation {i}, turn {t}" for t in range(3)]
        assert all(t.token_ids for t in turns[1::2])


def test_semantic_vad_is_taken_with_its_eagerness_and_a_bad_one_is_refused(voice):
    with voice().websocket_connect(f"{realtime.ROUTE}?model=instruct") as ws:
        ws.receive_json()
        ws.send_json({"type": "session.update", "session": {"audio": {"input": {"turn_detection": {
            "type": "semantic_vad", "eagerness": "high"}}}}})
        detection = events_until(ws, "session.updated")[-1]["session"]["audio"]["input"]["turn_detection"]
        assert detection["type"] == "semantic_vad" and detection["eagerness"] == "high"
        ws.send_json({"type": "session.update", "session": {"audio": {"input": {"turn_detection": {
            "type": "semantic_vad", "eagerness": "eventually"}}}}})
        assert "eagerness must be" in events_until(ws, "error")[-1]["error"]["message"]
        ws.send_json({"type": "session.update", "session": {"audio": {"input": {"turn_detection": {
            "type": "semantic_vad", "eagerness": ["high"]}}}}})  # not even a string: the same sentence
        assert "eagerness must be" in events_until(ws, "error")[-1]["error"]["message"]
    assert wire.updated(wire.Config(), {"turn_detection": {"type": "server_vad"}}).semantic is False


def test_with_an_api_key_a_clients_voice_conversations_belong_to_the_key(voice, tmp_path):
    from afnext.store import Store
    from app.access import key_owner

    store = Store(tmp_path)
    client = voice(Access("sesame"), store=store)
    with client.websocket_connect(f"{realtime.ROUTE}?model=instruct", headers={"Authorization": "Bearer sesame"}) as ws:
        cid = ws.receive_json()["conversation"]["id"]
        ws.send_json({"type": "session.update", "session": {"output_modalities": ["text"], "max_output_tokens": 3,
                                                            "audio": {"input": {"turn_detection": None}}}})
        events_until(ws, "session.updated")
        _text_turn(ws, "Remember this.")
    (kept,) = store.list(owner=key_owner("sesame"))
    assert kept.id == cid and kept.kind == "api" and kept.turns == 1
    with client.websocket_connect(f"{realtime.ROUTE}?model=instruct&conversation={cid}",
                                  headers={"Authorization": "Bearer sesame"}) as ws:
        assert ws.receive_json()["conversation"] == {"id": cid, "turns": 1}
