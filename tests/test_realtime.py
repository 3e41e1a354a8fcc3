"""The Realtime voice WebSocket as its users drive it: the official openai SDK against the running app."""

from __future__ import annotations

import base64
import json
import threading
import time

import numpy as np
import openai
import pytest

from tests.test_assistant import silence, speech
from tests.web.running import free_port, running

RATE = 24_000
CHUNK_S = 0.1  # seconds of audio per append, as voice clients send it


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The browser tests' server: its "think" model answers with a long fixed script (tests/web/scripted.py),
    generated at 10 tokens a second, so a reply is still being made when the user cuts in."""
    port = str(free_port())
    log = tmp_path_factory.mktemp("realtime") / "app.log"
    with running(["-m", "tests.web.server", "--port", port, "--step-delay-s", "0.1"], log) as (_, url):
        yield url


@pytest.fixture(scope="module")
def quick_server(tmp_path_factory):
    """The same server with its Think script made at full speed, for tests that only need whole replies."""
    port = str(free_port())
    log = tmp_path_factory.mktemp("realtime-quick") / "app.log"
    with running(["-m", "tests.web.server", "--port", port], log) as (_, url):
        yield url


def pcm24(audio16k: np.ndarray) -> list[str]:
    """16 kHz float audio → base64 pcm16 24 kHz pieces of CHUNK_S."""
    audio = _resample(audio16k)
    step = round(CHUNK_S * RATE)
    return [base64.b64encode((np.clip(audio[i:i + step], -1, 1) * 32767).astype("<i2").tobytes()).decode()
            for i in range(0, len(audio), step)]


def _resample(audio16k: np.ndarray) -> np.ndarray:
    import soxr

    return soxr.resample(audio16k, 16_000, RATE).astype(np.float32)


class Conversation:
    """Events from a realtime connection, read on a thread so the test can wait with a deadline."""

    def __init__(self, connection) -> None:
        self.connection, self.events, self.lock = connection, [], threading.Lock()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            for event in self.connection:
                with self.lock:
                    self.events.append(event)
        except Exception:  # the socket closed at the end of the test
            pass

    def wait_for(self, kind: str, count: int = 1, timeout: float = 120.0, **fields) -> list:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                found = [e for e in self.events if e.type == kind
                         and all(_field(e, k) == v for k, v in fields.items())]
            if len(found) >= count:
                return found
            time.sleep(0.02)
        raise AssertionError(f"no {count} × {kind} {fields} within {timeout} s; got {[e.type for e in self.events]}")

    def types(self) -> list[str]:
        with self.lock:
            return [e.type for e in self.events]


def _field(event, path: str):
    value = event
    for key in path.split("."):
        value = getattr(value, key, None) if not isinstance(value, dict) else value.get(key)
    return value


def say(connection, audio16k: np.ndarray) -> None:
    for piece in pcm24(audio16k):
        connection.input_audio_buffer.append(audio=piece)


def test_server_vad_turn_barge_in_and_truncate(server):
    client = openai.OpenAI(base_url=server + "v1", api_key="unused", max_retries=0)
    with client.realtime.connect(model="think") as connection:
        talk = Conversation(connection)
        talk.wait_for("session.created")
        connection.session.update(session={"type": "realtime", "output_modalities": ["audio"], "audio": {
            "input": {"format": {"type": "audio/pcm", "rate": RATE},
                      "turn_detection": {"type": "server_vad", "silence_duration_ms": 500}}}})
        talk.wait_for("session.updated")
        say(connection, np.concatenate([speech("What is on my shopping list today?"), silence(1.0)]))
        first = talk.wait_for("response.created")[0].response.id
        time.sleep(1.0)  # the reply is being made (its reasoning comes first, unspoken)
        say(connection, np.concatenate([speech("Stop, wait a moment."), silence(1.0)]))  # over it
        cancelled = talk.wait_for("response.done")[0]
        assert cancelled.response.id == first and cancelled.response.status == "cancelled"
        assert cancelled.response.status_details.type == "cancelled"
        assert cancelled.response.status_details.reason == "turn_detected", "the user spoke over it"
        done = talk.wait_for("response.done", count=2)[1]
        assert done.response.status == "completed" and done.response.status_details is None
        # The socket's conversation, announced as OpenAI's server does, is the one each response joins.
        conversation = talk.wait_for("conversation.created")[0].conversation
        assert conversation.object == "realtime.conversation" and conversation.id
        assert done.response.conversation_id == cancelled.response.conversation_id == conversation.id
        assert done.response.output_modalities == ["audio"] and done.response.max_output_tokens > 0
        item = done.response.output[0].id  # its audio plays on the client; the user cuts in after 0.8 s
        connection.send({"type": "conversation.item.truncate", "item_id": item, "content_index": 0,
                         "audio_end_ms": 800})
        truncated = talk.wait_for("conversation.item.truncated")[0]
        assert truncated.item_id == item and truncated.audio_end_ms == 800

    types = talk.types()
    assert types[:2] == ["session.created", "conversation.created"]
    order = ["input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped", "input_audio_buffer.committed",
             "conversation.item.added", "response.created", "response.done"]
    positions = [types.index(kind) for kind in order]
    assert positions == sorted(positions), types[:40]
    answer = [i for i, e in enumerate(talk.events) if getattr(e, "response_id", None) == done.response.id]
    kinds = [talk.events[i].type for i in answer]
    assert kinds.index("response.output_audio_transcript.delta") < kinds.index("response.output_audio.delta")
    assert kinds.index("response.content_part.added") < kinds.index("response.output_audio_transcript.delta")
    assert kinds.index("response.output_audio.done") < kinds.index("response.content_part.done") < kinds.index(
        "response.output_item.done"), "OpenAI's order around an output's deltas"
    part = next(talk.events[i] for i in answer if talk.events[i].type == "response.content_part.done").part
    assert part.type == "audio" and part.transcript == done.response.output[0].content[0].transcript
    cut = [e.type for e in talk.events if getattr(e, "response_id", None) == first and e.type.endswith(".delta")]
    assert cut and set(cut) == {"response.reasoning_text.delta"}, "the cancelled reply was only reasoning, never spoken"
    assert types.count("input_audio_buffer.speech_started") == 2, "the barge-in was heard as speech"
    audio = b"".join(base64.b64decode(e.delta) for e in talk.events
                     if e.type == "response.output_audio.delta" and e.response_id == done.response.id)
    samples = np.frombuffer(audio, "<i2").astype(np.float32) / 32768
    assert len(samples) > RATE and np.abs(samples).max() > 0.05, "the reply is audible speech"
    transcript = [e for e in talk.events if e.type == "response.output_audio_transcript.done"][-1].transcript
    assert "milk" in transcript, transcript


def test_a_text_item_created_under_server_vad_is_answered_with_the_next_turn_heard(server):
    """OpenAI's server answers the turn its VAD ends with the items created before it: a typed note
    goes into that turn's prompt (before, it waited for a response.create and the turn was answered
    without it). The same speech with and without the note: the note's tokens are the difference."""
    client = openai.OpenAI(base_url=server + "v1", api_key="unused", max_retries=0)
    note = "My name is Ada and I am calling from Lisbon about the order."
    prompts = []
    for with_note in (False, True):
        with client.realtime.connect(model="instruct") as connection:
            talk = Conversation(connection)
            connection.session.update(session={"type": "realtime", "output_modalities": ["text"], "max_output_tokens": 2,
                                               "audio": {"input": {"format": {"type": "audio/pcm", "rate": RATE},
                                                         "turn_detection": {"type": "server_vad", "silence_duration_ms": 500}}}})
            talk.wait_for("session.updated")
            if with_note:
                connection.send({"type": "conversation.item.create", "item": {
                    "type": "message", "role": "user", "content": [{"type": "input_text", "text": note}]}})
                talk.wait_for("conversation.item.done")
            say(connection, np.concatenate([speech("What is on my shopping list today?"), silence(1.0)]))
            done = talk.wait_for("response.done")[0]
            prompts.append(done.response.usage.input_tokens)
            if with_note:  # taken by the turn: a response.create now has the assistant go on, not answer it again
                replied = done.response.output[0].id
                connection.send({"type": "response.create"})
                more = talk.wait_for("response.done", count=2)[1]
                added = talk.wait_for("conversation.item.added", **{"item.id": more.response.output[0].id})[0]
                assert added.previous_item_id == replied, "an item came between the reply and the next"
    assert prompts[1] - prompts[0] >= 10, f"prompt tokens without and with the note: {prompts}"


def test_text_items_manual_turns_and_errors(server):
    client = openai.OpenAI(base_url=server + "v1", api_key="unused", max_retries=0)
    with client.realtime.connect(model="instruct") as connection:
        talk = Conversation(connection)
        connection.session.update(session={"type": "realtime", "output_modalities": ["text"],
                                           "audio": {"input": {"turn_detection": None}}})
        talk.wait_for("session.updated")
        # with nothing to answer, the assistant speaks first (LiveKit's generate_reply(instructions=…))
        connection.send({"type": "response.create", "response": {"instructions": "Greet the caller."}})
        greeting = talk.wait_for("response.done")[0].response
        assert greeting.status in {"completed", "incomplete"} and greeting.output[0].role == "assistant"
        assert talk.wait_for("conversation.item.added")[0].previous_item_id is None
        connection.send({"type": "conversation.item.create", "item": {
            "type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hello there"}]}})
        connection.send({"type": "response.create"})
        done = talk.wait_for("response.done", count=2)[1]
        assert done.response.status == "completed" or done.response.status_details.reason == "max_output_tokens"
        text = talk.wait_for("response.output_text.done", count=2)[1].text
        assert text == "".join(e.delta for e in talk.events if e.type == "response.output_text.delta"
                               and e.response_id == done.response.id)
        say(connection, speech("And this?"))
        connection.send({"type": "input_audio_buffer.commit"})
        talk.wait_for("input_audio_buffer.committed")
        connection.send({"type": "response.create"})
        talk.wait_for("response.done", count=3)
        connection.send({"type": "session.update", "session": {"audio": {"input": {"format": {"type": "audio/pcm",
                                                                                              "rate": 8000}}}}})
        connection.send({"type": "no.such.event"})
        errors = [e.error.message for e in talk.wait_for("error", count=2)]  # in either order: a bad
        # event is refused as it arrives, a bad setting once the events before it are done
        assert any("pcm16" in m for m in errors) and any("Unknown" in m for m in errors), errors
        connection.send({"type": "conversation.item.create", "item": {
            "type": "message", "role": "user", "content": [{"type": "input_text", "text": "Still there?"}]}})
        connection.send({"type": "response.create"})
        talk.wait_for("response.done", count=4)
    assert json.dumps([e.type for e in talk.events])  # every event parsed as an SDK event object


def test_chat_completions_speak_the_answer(quick_server):
    """Audio out over Chat Completions, whole (a WAV file) and streamed (pcm16 deltas with the transcript)."""
    from afnext.media import load_audio

    client = openai.OpenAI(base_url=quick_server + "v1", api_key="unused", max_retries=0, timeout=120)
    question = [{"role": "user", "content": "What is it?"}]
    whole = client.chat.completions.create(model="think", messages=question, modalities=["text", "audio"],
                                           audio={"voice": "alloy", "format": "wav"})
    audio = whole.choices[0].message.audio
    assert whole.choices[0].message.content is None and "milk and eggs" in audio.transcript
    speech_16k = load_audio(base64.b64decode(audio.data))
    assert len(speech_16k) > 16_000 and np.abs(speech_16k).max() > 0.05, "a second or more of audible speech"
    chunks = list(client.chat.completions.create(model="think", messages=question, modalities=["text", "audio"],
                                                 audio={"voice": "alloy", "format": "pcm16"}, stream=True))
    parts = [c.choices[0].delta.audio for c in chunks if c.choices and c.choices[0].delta.audio]
    transcript = "".join(p.transcript or "" for p in parts)
    pcm = b"".join(base64.b64decode(p.data) for p in parts if p.data)
    assert transcript == audio.transcript
    assert len(pcm) // 2 > RATE and len({p.id for p in parts}) == 1


def test_what_clients_send_at_the_edges_of_the_protocol(server):
    """Found probing with clients' habits: a client's own item ids, a second response.create while one
    is made, a cancel naming another response, a truncate sent twice, a commit of almost nothing, and
    a clear under server VAD: each answered as OpenAI's server answers it, in one sentence."""
    client = openai.OpenAI(base_url=server + "v1", api_key="unused", max_retries=0)
    with client.realtime.connect(model="think") as connection:
        talk = Conversation(connection)
        connection.session.update(session={"type": "realtime", "output_modalities": ["text"],
                                           "audio": {"input": {"turn_detection": None}}})
        session_id = talk.wait_for("session.created")[0].session.id
        assert session_id.startswith("sess_") and talk.wait_for("session.updated")[0].session.id == session_id
        question = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "My list?"}]}
        connection.send({"type": "conversation.item.create", "item": {**question, "id": "my_item_1"}})
        assert talk.wait_for("conversation.item.added")[0].item.id == "my_item_1"
        connection.send({"type": "conversation.item.create", "item": {**question, "id": "my_item_1"}})
        connection.send({"type": "conversation.item.create", "previous_item_id": "root", "item": question})
        errors = talk.wait_for("error", count=2)
        assert [e.error.code for e in errors][0] == "item_id_duplicate" and "end of the conversation" in errors[1].error.message

        connection.send({"type": "response.create"})
        first = talk.wait_for("response.created")[0].response.id
        connection.send({"type": "response.create"})
        busy = talk.wait_for("error", count=3)[2].error
        assert busy.code == "conversation_already_has_active_response", busy
        connection.send({"type": "response.cancel", "response_id": "resp_not_this_one"})
        assert "not the response in progress" in talk.wait_for("error", count=4)[3].error.message
        done = talk.wait_for("response.done")[0].response
        assert done.id == first and done.status == "completed", "the refused events left the reply alone"

        item = done.output[0].id
        for ms in (1500, 1500, 900):  # a client that truncates at every pause, then at an earlier point
            connection.send({"type": "conversation.item.truncate", "item_id": item, "content_index": 0, "audio_end_ms": ms})
        assert len(talk.wait_for("conversation.item.truncated", count=3)) == 3
        assert len([e for e in talk.events if e.type == "error"]) == 4, [e.error.message for e in talk.events if e.type == "error"]

        connection.input_audio_buffer.append(audio=base64.b64encode(b"\0\0" * 240).decode())  # 10 ms
        connection.send({"type": "input_audio_buffer.commit"})
        short = talk.wait_for("error", count=5)[4].error
        assert short.code == "input_audio_buffer_commit_empty" and "at least 100 ms" in short.message

        connection.session.update(session={"type": "realtime", "audio": {"input": {
            "turn_detection": {"type": "server_vad", "silence_duration_ms": 500}}}})
        talk.wait_for("session.updated", count=2)
        say(connection, speech("Forget that I said this."))
        talk.wait_for("input_audio_buffer.speech_started")
        connection.send({"type": "input_audio_buffer.clear"})
        say(connection, silence(1.5))
        connection.session.update(session={"type": "realtime"})  # handled after the silence: a fence
        talk.wait_for("session.updated", count=3)
        time.sleep(1.0)
        assert "input_audio_buffer.committed" not in talk.types() and len(talk.wait_for("response.created")) == 1, \
            "the cleared speech was taken as a turn"


def test_settings_this_server_cannot_honour_are_refused_not_dropped():
    """Tools, transcription sessions and another conversation for a response would be silently ignored:
    each is refused in one sentence instead, and what the session already does is taken."""
    from app import realtime_wire as wire

    config = wire.Config.for_model("instruct")
    for session in ({"tools": [{"type": "function", "name": "lookup"}]}, {"tool_choice": "required"},
                    {"type": "transcription"}):
        with pytest.raises(wire.ProtocolError):
            wire.updated(config, session)
    assert wire.updated(config, {"type": "realtime", "tools": [], "tool_choice": "auto"}) == config
    for response in ({"conversation": "none"}, {"input": [{"type": "message"}]},
                     {"output_modalities": ["text"]}, {"max_output_tokens": -3},
                     {"audio": {"output": {"format": {"type": "audio/pcmu"}}}}, {"output_audio_format": "g711_ulaw"}):
        with pytest.raises(wire.ProtocolError):
            wire.check_response(config, response)
    assert wire.check_response(config, {"output_modalities": ["audio"], "metadata": {"topic": "x"}}) is None
    assert wire.check_response(config, {"modalities": ["text", "audio"], "max_output_tokens": 3}) == 3  # its own
    assert wire.check_response(config, {"audio": {"output": {"format": {"type": "audio/pcm", "rate": 24000},
                                                             "voice": "alloy"}}}) is None
