"""/v1/realtime against a hostile public: other sites' pages, too many sockets, oversized and
flooding clients, malformed events, and fuzzing of every parser that reads the socket."""

from __future__ import annotations

import json
import queue
import re
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.testclient import TestClient

from afnext.engine import Engine
from afnext.tts import load_synthesizer
from app import realtime, realtime_link
from app import realtime_wire as wire
from app.access import Access
from app.backend import Backend, BackendLoader

RECEIVE_TIMEOUT_S = 10.0  # a message that has not come by then never will: fail instead of hanging
URL = f"{realtime.ROUTE}?model=instruct"


@pytest.fixture(scope="module")
def backend(loaded):
    b = Backend(Engine(loaded), Engine(loaded), load_synthesizer("espeak"))
    yield b
    b.close()


@pytest.fixture
def serve(backend):
    """serve(access=None, ip=…) → a test client of /v1/realtime alone, as a client at `ip` sees it."""
    servers: list[realtime.RealtimeServer] = []

    def make(access: Access | None = None, ip: str = "testclient", server: realtime.RealtimeServer | None = None):
        servers.append(server or realtime.RealtimeServer(BackendLoader.ready_made(backend), access))
        return TestClient(Starlette(routes=[WebSocketRoute(realtime.ROUTE, servers[-1].__call__)]), client=(ip, 50000))
    yield make
    for server in servers:
        server.shutdown()


def receive(ws, timeout_s: float = RECEIVE_TIMEOUT_S) -> dict:
    """The next ASGI message the server sent (text or close), failing after `timeout_s`."""
    box: queue.Queue = queue.Queue()

    def get() -> None:
        try:
            box.put(ws.receive())
        except BaseException as exc:  # handed to the test's thread
            box.put(exc)

    threading.Thread(target=get, daemon=True).start()
    try:
        message = box.get(timeout=timeout_s)
    except queue.Empty:
        pytest.fail(f"the server sent nothing within {timeout_s} s")
    if isinstance(message, BaseException):
        raise message
    return message


def refusal(ws) -> tuple[str, int]:
    """The server's one sentence (an `error` event) and its close code."""
    while (message := receive(ws))["type"] == "websocket.send":
        event = json.loads(message["text"])
        if event["type"] == "error":
            assert_sentence(event["error"]["message"])
            closed = receive(ws)
            assert closed["type"] == "websocket.close", closed
            return event["error"]["message"], closed["code"]
    pytest.fail(f"closed with no sentence: {message}")


def assert_sentence(text: str) -> None:
    """One sentence of ours: capitalised, or opening with the protocol field it is about."""
    assert text and "\n" not in text and text.endswith(".") and len(text) < 200, text
    first = text.split()[0]
    field = re.fullmatch(r"[a-z]+([._][a-z]+)+", first) or first in ("instructions", "audio")
    assert (text[0].isupper() or text[0].isdigit() or field) and "line 1 column" not in text \
        and "Expecting" not in text, text


def created(ws) -> None:
    assert [json.loads(receive(ws)["text"])["type"] for _ in range(2)] == ["session.created", "conversation.created"]


# ---- other sites' pages ----

def test_pages_of_other_sites_are_refused(serve):
    client = serve()
    for origin in ("https://evil.example", "null", "http://testserver.evil.example", "http://testserver:8080"):
        with client.websocket_connect(URL, headers={"origin": origin}) as ws:
            message, code = refusal(ws)
            assert "own site" in message and code == 1008


def test_same_site_pages_allow_listed_sites_and_non_browser_clients_are_served(serve, monkeypatch):
    monkeypatch.setenv("AFNEXT_ALLOWED_ORIGINS", " *.hf.space ,https://other.example:8443")
    client = serve(Access(allowed_origins=["https://app.example"]))
    for headers in ({}, {"origin": "http://testserver"}, {"origin": "https://app.example"},
                    {"origin": "https://me-space.hf.space"}, {"origin": "https://other.example:8443"}):
        with client.websocket_connect(URL, headers=headers) as ws:
            created(ws)


@pytest.mark.parametrize("origin, host, allowed", [
    ("https://box.example", "box.example", True),
    ("https://box.example", "box.example:443", True),  # the default port, said or not
    ("http://box.example:7860", "box.example:7860", True),
    ("http://[::1]:7860", "[::1]:7860", True),
    ("HTTPS://Box.Example", "box.example", True),
    ("https://box.example", "box.example:7860", False),
    ("https://box.example.evil", "box.example", False),
    ("https://x.gradio.live", "127.0.0.1:7860", False),  # a proxy that rewrote Host needs the allow-list
    ("https://box.example:99999", "box.example", False),
    ("https://box.example", "", False),
    ("null", "box.example", False),
])
def test_origin_must_match_host(origin, host, allowed):
    assert (Access().socket({"origin": origin, "host": host}, []).refusal is None) is allowed


# ---- capacity ----

def test_sockets_are_capped_per_address_and_in_all(serve, monkeypatch):
    monkeypatch.setattr(realtime, "MAX_PER_ADDRESS", 2)
    monkeypatch.setattr(realtime, "MAX_SESSIONS", 3)
    client = serve()
    server = client.app.routes[0].endpoint.__self__
    other = serve(server=server, ip="10.0.0.9")  # the same server, from another address
    with client.websocket_connect(URL) as a, client.websocket_connect(URL) as b:
        created(a), created(b)
        with client.websocket_connect(URL) as third:
            message, code = refusal(third)
            assert "Too many voice sessions" in message and code == 1013
        with other.websocket_connect(URL) as fourth:  # another address is not affected…
            created(fourth)
            with other.websocket_connect(URL) as fifth:  # …until the server is full
                assert refusal(fifth)[1] == 1013
    with client.websocket_connect(URL) as again:  # they left: room again
        created(again)


def test_a_burst_of_handshakes_cannot_pass_the_cap_together(backend, monkeypatch):
    """Twenty sockets from one address arrive at once and their handshakes interleave (looking up the
    conversation is awaited): only MAX_PER_ADDRESS of them are served, the others refused — the cap is
    counted before the first await, not after the handshake."""
    import asyncio
    import time
    from types import SimpleNamespace

    monkeypatch.setattr(realtime, "MAX_PER_ADDRESS", 2)
    server = realtime.RealtimeServer(BackendLoader.ready_made(backend), Access())
    monkeypatch.setattr(server, "_kept", lambda *args: time.sleep(0.2))  # a slow store: handshakes pile up here
    served, refused = [], []

    class Socket:
        headers = {"host": "127.0.0.1:7860"}
        query_params: dict = {}
        client = SimpleNamespace(host="203.0.113.7")

        async def accept(self, subprotocol=None):
            pass

        async def send_text(self, text):
            refused.append(json.loads(text)["error"]["message"])

        async def close(self, code=1000, reason=""):
            pass

    async def serve_it(ws, *args):
        served.append(ws)
        await asyncio.sleep(0.3)  # held open while the others arrive

    monkeypatch.setattr(server, "_serve", serve_it)

    async def burst():
        await asyncio.gather(*(server(Socket()) for _ in range(20)))

    asyncio.run(burst())
    server.shutdown()
    assert len(served) == 2 and len(refused) == 18, (len(served), refused[:2])
    assert all("Too many voice sessions" in r for r in refused) and not server._open


# ---- byte and event caps ----

def test_an_oversized_event_closes_the_socket_with_1009(serve, monkeypatch):
    monkeypatch.setattr(realtime, "MAX_MESSAGE_BYTES", 64 << 10)
    with serve().websocket_connect(URL) as ws:
        created(ws)
        ws.send_text(json.dumps({"type": "input_audio_buffer.append", "audio": "A" * (80 << 10)}))
        message, code = refusal(ws)
        assert "MiB limit" in message and code == 1009


def test_a_flood_of_events_ends_the_session(serve, monkeypatch):
    monkeypatch.setattr(realtime_link, "MAX_PENDING_EVENTS", 4)
    gate = threading.Event()
    real = realtime_link.RealtimeLink._on_session_update
    monkeypatch.setattr(realtime_link.RealtimeLink, "_on_session_update", lambda self, e: gate.wait(10) and real(self, e))
    with serve().websocket_connect(URL) as ws:
        created(ws)
        for _ in range(12):  # the feeder is stuck on the first: the rest pile up
            ws.send_json({"type": "session.update", "session": {}})
        message, code = refusal(ws)
        assert "faster than the server" in message and code == 1008
    gate.set()


# ---- malformed events, and fuzzing ----

JUNK = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=False),
                 st.text(max_size=20), st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=5),
                                                                                             st.integers(), max_size=3))
SESSIONS = st.fixed_dictionaries({}, optional={
    "instructions": JUNK, "output_modalities": st.one_of(JUNK, st.lists(st.sampled_from(["text", "audio", "video"]))),
    "modalities": JUNK, "turn_detection": st.one_of(JUNK, st.fixed_dictionaries(
        {"type": st.sampled_from(["server_vad", "semantic_vad", "x"])},
        optional={"silence_duration_ms": JUNK, "create_response": JUNK, "interrupt_response": JUNK})),
    "audio": st.one_of(JUNK, st.fixed_dictionaries({}, optional={"input": st.one_of(JUNK, st.fixed_dictionaries(
        {}, optional={"format": st.one_of(JUNK, st.just({"type": "audio/pcm", "rate": 24000})),
                      "turn_detection": st.one_of(st.none(), JUNK)}))})),
    "max_output_tokens": st.one_of(JUNK, st.just("inf")), "max_response_output_tokens": JUNK})
EVENTS = st.one_of(
    st.builds(lambda s: {"type": "session.update", "session": s}, SESSIONS),
    st.builds(lambda a: {"type": "input_audio_buffer.append", "audio": a}, st.one_of(JUNK, st.just("AAAA"))),
    st.builds(lambda i: {"type": "conversation.item.create", "item": i}, st.one_of(JUNK, st.fixed_dictionaries(
        {"type": st.just("message"), "role": st.sampled_from(["user", "assistant"]),
         "content": st.one_of(JUNK, st.lists(st.fixed_dictionaries({"type": st.sampled_from(
             ["input_text", "input_audio", "x"])}, optional={"text": JUNK, "audio": JUNK}), max_size=3))}))),
    st.builds(lambda i, ms: {"type": "conversation.item.truncate", "item_id": i, "audio_end_ms": ms}, JUNK, JUNK),
    st.sampled_from([{"type": t} for t in wire.CLIENT_EVENTS]),
    st.builds(lambda t: {"type": t}, JUNK))
TEXTS = st.one_of(st.text(max_size=60), EVENTS.map(json.dumps))


@settings(max_examples=500, deadline=None)
@given(TEXTS, SESSIONS)
def test_the_event_parsers_give_an_event_a_config_or_one_sentence(text, session):
    try:
        event = wire.parse(text)
        assert event["type"] in wire.CLIENT_EVENTS
    except wire.ProtocolError as exc:
        assert_sentence(str(exc))
    try:
        config = wire.updated(wire.Config(), session)
        assert 1 <= config.max_output_tokens <= wire.MAX_OUTPUT_TOKENS and 100 <= config.silence_ms <= 5000
        assert type(config.server_vad) is type(config.interrupt) is type(config.audio_out) is bool
    except wire.ProtocolError as exc:
        assert_sentence(str(exc))


@settings(max_examples=200, deadline=None)
@given(st.builds(wire.Config, instructions=st.one_of(st.none(), st.text(max_size=40)), server_vad=st.booleans(),
                 silence_ms=st.integers(100, 5000), interrupt=st.booleans(), audio_out=st.booleans(),
                 max_output_tokens=st.integers(1, wire.MAX_OUTPUT_TOKENS)))
def test_a_config_round_trips_through_the_clients_session_update(config):
    sent = json.loads(json.dumps(wire.session_update(config)))  # over the wire, as the desktop client sends it
    back = wire.updated(wire.Config(), wire.parse(json.dumps(sent))["session"])
    assert back == (config if config.server_vad else
                    wire.Config(**{**config.__dict__, "silence_ms": 600, "interrupt": True}))  # kept only with VAD


def test_random_events_are_answered_and_the_session_goes_on(serve):
    client = serve()
    with client.websocket_connect(URL) as ws:
        created(ws)

        @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
        @given(st.one_of(TEXTS, st.binary(max_size=32)))
        def one(message):
            ws.send_bytes(message) if isinstance(message, bytes) else ws.send_text(message)

        one()
        ws.send_json({"type": "input_audio_buffer.clear"})  # the session still answers, in order
        while (event := json.loads(receive(ws)["text"]))["type"] != "input_audio_buffer.cleared":
            assert event["type"] in ("error", "session.updated", "conversation.item.added", "conversation.item.done",
                                     "input_audio_buffer.cleared", "input_audio_buffer.committed",
                                     "conversation.item.truncated") or event["type"].startswith(
                                         ("response.", "input_audio_buffer.")), event
            if event["type"] == "error":
                assert_sentence(event["error"]["message"])
                assert event["error"]["code"] != "server_error", event  # the client's mistake, not a crash of ours


def test_pcm16_cut_mid_sample_is_refused_not_shifted():
    """Audio cut mid-sample would shift every later sample by a byte (noise, not speech): refused."""
    import base64

    import numpy as np

    whole = np.arange(-3, 3, dtype=np.int16)
    assert np.array_equal(wire.pcm16(base64.b64encode(whole.tobytes()).decode()), whole)
    with pytest.raises(wire.ProtocolError, match="whole 16-bit samples; 11 bytes is an odd count"):
        wire.pcm16(base64.b64encode(whole.tobytes()[:11]).decode())
