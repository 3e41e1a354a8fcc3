"""The voice channel against a hostile public: capacity that heals itself, other sites' pages, silent
sockets, oversized messages, malformed input, and fuzzing of every parser that reads the socket."""

from __future__ import annotations

import gc
import json
import queue
import threading
import tracemalloc
import weakref
from functools import partial
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.testclient import TestClient

from afnext.engine import Engine
from afnext.tts import load_synthesizer
from app import talk, talk_link, talk_wire
from app.backend import Backend, BackendLoader

RATE = 16000  # Hz of the microphone in these tests
PTT_LIMIT_S = 30.0  # seconds of one push-to-talk press the server keeps (the endpointer's limit on an utterance)
RECEIVE_TIMEOUT_S = 10.0  # a message that has not come by then never will: fail instead of hanging


@pytest.fixture(scope="module")
def backend(loaded):
    from tests.web.scripted import ScriptedEngine

    b = Backend(Engine(loaded), ScriptedEngine(loaded), load_synthesizer("espeak"))
    yield b
    b.close()


@pytest.fixture
def registries():
    """Every registry a test opens; afterwards their ended connections must finish closing."""
    made: list[talk.TalkRegistry] = []
    yield made
    assert all(r.wait_closed(30) for r in made)


@pytest.fixture
def registry(backend, registries):
    """registry(**limits) → a TalkRegistry on the ready backend."""
    def make(loader: BackendLoader | None = None, **limits) -> talk.TalkRegistry:
        made = talk.TalkRegistry(loader or BackendLoader.ready_made(backend), **limits)
        registries.append(made)
        return made
    return make


def serve(registry: talk.TalkRegistry, ip: str = "testclient") -> TestClient:
    """The voice channel alone, as a page at address `ip` sees it."""
    app = Starlette(routes=[WebSocketRoute(talk.ROUTE, partial(talk.serve, registry=registry))])
    return TestClient(app, client=(ip, 50000))


def url(client: str) -> str:
    return f"{talk.ROUTE}?client={client}"


def receive(ws, timeout_s: float = RECEIVE_TIMEOUT_S) -> dict:
    """The next ASGI message the server sent (text, bytes or close), failing after `timeout_s`."""
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


def next_json(ws) -> dict:
    """The next text message, skipping audio and the loading state."""
    while True:
        message = receive(ws)
        assert message["type"] == "websocket.send", f"closed instead: {message}"
        if message.get("text") is not None and (m := json.loads(message["text"])) != {"type": "state",
                                                                                      "state": "loading", "waiting": 0}:
            return m


def hello(ws, **fields) -> dict:
    """Say hello; the server's answer (ready or error)."""
    ws.send_text(json.dumps({"type": "hello", "sample_rate": RATE, **fields}))
    return next_json(ws)


def refusal(ws) -> tuple[str, int]:
    """The server's one sentence and close code, after the message that earned them."""
    while (message := receive(ws))["type"] == "websocket.send":
        if message.get("text") and (m := json.loads(message["text"]))["type"] == "error":
            assert_sentence(m["message"])
            closed = receive(ws)
            assert closed["type"] == "websocket.close", closed
            return m["message"], closed["code"]
    pytest.fail(f"closed with no sentence: {message}")


def assert_sentence(text: str) -> None:
    assert text and "\n" not in text and text.endswith(".") and len(text) < 200, text
    assert text[0].isupper() and "line 1 column" not in text and "Expecting" not in text, text


def ptt_turn(ws, seconds: float = 0.4) -> dict:
    """Hold push-to-talk for `seconds` of noise; the user_turn (or notice) that follows."""
    ws.send_text(json.dumps({"type": "mode", "ptt": True}))
    ws.send_text(json.dumps({"type": "ptt", "down": True}))
    block = (np.random.default_rng(0).standard_normal(RATE // 50) * 3000).astype(np.int16)
    for _ in range(round(seconds * 50)):
        ws.send_bytes(block.tobytes())
    ws.send_text(json.dumps({"type": "ptt", "down": False}))
    while (message := next_json(ws))["type"] not in ("user_turn", "notice"):
        pass
    return message


# ---- 1. capacity: fair, and healing itself ----

def test_pages_that_never_spoke_leave_no_conversation_behind(registry):
    reg = registry(max_conversations=4)
    api = serve(reg)
    for burst in range(3):  # each burst fills every slot at once (many tabs, or "New conversation" clicks)
        sockets = [api.websocket_connect(url(f"page-{burst}-{i:04d}")) for i in range(4)]
        for ws in sockets:
            assert hello(ws.__enter__())["type"] == "ready"
        for ws in sockets:
            ws.__exit__(None, None, None)
        assert reg.wait_closed(30)
        assert len(reg) == 0  # nothing to come back to: dropped at once


def test_sockets_that_close_while_the_model_loads_hold_nothing(backend, registry):
    gate = threading.Event()
    loader = BackendLoader(lambda: gate.wait() and backend, "tiny")
    reg = registry(loader, max_conversations=2)
    api = serve(reg)
    opening = threading.Timer(1.0, gate.set)  # the model finishes loading after the sockets below have gone
    opening.start()
    for i in range(3):
        with api.websocket_connect(url(f"early-page-{i:04d}")) as ws:
            ws.send_text(json.dumps({"type": "hello", "sample_rate": RATE}))
            assert json.loads(receive(ws)["text"])["state"] == "loading"
    opening.join()
    loader.wait(5)
    threading.Event().wait(0.3)  # time for any conversation made for the gone sockets to appear
    assert len(reg) == 0
    with api.websocket_connect(url("late-page-0001")) as ws:
        assert hello(ws)["type"] == "ready" and len(reg) == 1


def test_an_address_over_its_cap_gives_up_its_own_oldest_idle_conversation(registry):
    reg = registry(max_per_ip=2)
    api = serve(reg, "10.0.0.1")
    for name in ("a-page-0001", "a-page-0002", "a-page-0003"):
        with api.websocket_connect(url(name)) as ws:
            assert hello(ws)["turns"] == 0 and ptt_turn(ws)["type"] == "user_turn"
        assert reg.wait_closed(30)
    assert len(reg) == 2
    with api.websocket_connect(url("a-page-0003")) as ws:
        assert hello(ws)["turns"] == 1  # kept
    with api.websocket_connect(url("a-page-0001")) as ws:
        assert hello(ws)["turns"] == 0  # the oldest was dropped for the third


def test_an_address_whose_conversations_are_all_live_is_refused_and_others_are_not(registry):
    reg = registry(max_per_ip=2)
    crowd, other = serve(reg, "10.0.0.1"), serve(reg, "10.0.0.2")
    with crowd.websocket_connect(url("crowd-0001")) as one, crowd.websocket_connect(url("crowd-0002")) as two:
        assert hello(one)["type"] == hello(two)["type"] == "ready"
        with crowd.websocket_connect(url("crowd-0003")) as three:
            three.send_text(json.dumps({"type": "hello", "sample_rate": RATE}))
            message, code = refusal(three)
            assert "This address" in message and code == 1013
        with other.websocket_connect(url("other-0001")) as ws:
            assert hello(ws)["type"] == "ready"


def test_a_full_server_drops_its_least_recently_seen_idle_conversation_and_frees_it(registry):
    reg = registry(max_conversations=2)
    sessions = {}
    for ip in ("10.0.0.1", "10.0.0.2"):
        with serve(reg, ip).websocket_connect(url(f"page-{ip.replace('.', '-')}")) as ws:
            hello(ws)
            assert ptt_turn(ws)["type"] == "user_turn"
            sessions[ip] = weakref.ref(reg._conversations[f"page-{ip.replace('.', '-')}"].session)
        assert reg.wait_closed(30)
    with serve(reg, "10.0.0.3").websocket_connect(url("page-10-0-0-3")) as ws:
        assert hello(ws)["type"] == "ready"  # the server was full of idle conversations: the oldest went
        assert len(reg) == 2
        gc.collect()
        assert sessions["10.0.0.1"]() is None, gc.get_referrers(sessions["10.0.0.1"]())  # its KV cache freed
        assert sessions["10.0.0.2"]() is not None


def test_a_full_server_of_live_connections_refuses_a_newcomer_in_one_sentence(registry):
    reg = registry(max_conversations=1)
    with serve(reg, "10.0.0.1").websocket_connect(url("page-one-0001")) as ws:
        hello(ws)
        with serve(reg, "10.0.0.2").websocket_connect(url("page-two-0002")) as other:
            other.send_text(json.dumps({"type": "hello", "sample_rate": RATE}))
            message, code = refusal(other)
            assert "as many voice conversations" in message and code == 1013


# ---- 2. other sites' pages ----

def test_pages_of_other_sites_are_refused(registry):
    api = serve(registry())
    for origin in ("https://evil.example", "null", "http://testserver.evil.example", "http://testserver:8080"):
        with api.websocket_connect(url("page-one-0001"), headers={"origin": origin}) as ws:
            message, code = refusal(ws)
            assert "site" in message and code == 1008


def test_same_site_pages_allow_listed_sites_and_non_browser_clients_are_served(registry, monkeypatch):
    monkeypatch.setenv("AFNEXT_ALLOWED_ORIGINS", " *.hf.space ,https://other.example:8443")
    api = serve(registry(allowed_origins=["https://app.example"]))
    for headers in ({}, {"origin": "http://testserver"}, {"origin": "https://app.example"},
                    {"origin": "https://me-space.hf.space"}, {"origin": "https://other.example:8443"}):
        with api.websocket_connect(url("page-one-0001"), headers=headers) as ws:
            assert hello(ws)["type"] == "ready", headers


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
def test_origin_must_match_host(registry, origin, host, allowed):
    assert registry().origin_allowed({"origin": origin, "host": host}) is allowed


# ---- 3. silent sockets ----

def test_a_socket_that_never_says_hello_is_let_go(registry):
    with serve(registry(hello_timeout_s=0.2)).websocket_connect(url("page-one-0001")) as ws:
        message, code = refusal(ws)
        assert "hello" in message and code == 1008


# ---- 4. byte caps ----

@pytest.mark.parametrize("first", [False, True])
def test_oversized_messages_close_the_socket_with_1009(registry, first):
    api = serve(registry())
    for big in (bytes(1 << 20), "x" * (16 << 10), "é" * 3000):  # 3000 characters, 6000 bytes
        with api.websocket_connect(url("page-one-0001")) as ws:
            if not first:
                assert hello(ws)["type"] == "ready"
            ws.send_bytes(big) if isinstance(big, bytes) else ws.send_text(big)
            message, code = refusal(ws)
            assert "KiB" in message and code == 1009


class StuckAssistant:
    """An assistant whose feeding blocks until closed: the server stuck on the GPU."""

    def __init__(self) -> None:
        self.released = threading.Event()
        self.session = SimpleNamespace(engine=SimpleNamespace(waiting=0))

    def push(self, pcm, rate) -> None:
        self.released.wait(30)

    def events(self):
        self.released.wait(30)
        return iter(())

    def close(self) -> None:
        self.released.set()


def test_the_microphone_backlog_is_capped_in_bytes():
    stuck = StuckAssistant()
    link = talk_link.Link(SimpleNamespace(turns=0), stuck, RATE, lambda m: None, RATE)
    try:
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(100):  # 100 s of audio in 1 s messages, the feeder stuck on the first
            link.audio(np.ones(RATE, np.int16).tobytes())
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
        stuck.close()
        link.close()
    assert held < 1_000_000, held  # ~10 s of audio (320 kB), not 100


def test_a_flood_of_control_messages_ends_the_connection():
    stuck = StuckAssistant()
    link = talk_link.Link(SimpleNamespace(turns=0), stuck, RATE, lambda m: None, RATE)
    try:
        link.audio(bytes(640))  # the feeder is stuck on this
        for _ in range(talk_link.MAX_PENDING_CONTROLS):
            link.control(talk_wire.Mode(ptt=False))
        with pytest.raises(ValueError, match="faster than the server"):
            link.control(talk_wire.Mode(ptt=False))
    finally:
        stuck.close()
        link.close()


def test_a_held_push_to_talk_press_keeps_at_most_its_limit(registry, monkeypatch):
    monkeypatch.setattr(talk_link, "MIC_BACKLOG_S", 60.0, raising=False)  # room for the burst below, sent at once
    with serve(registry()).websocket_connect(url("page-one-0001")) as ws:
        hello(ws)
        ws.send_text(json.dumps({"type": "mode", "ptt": True}))
        ws.send_text(json.dumps({"type": "ptt", "down": True}))
        second = (np.random.default_rng(0).standard_normal(RATE) * 3000).astype(np.int16).tobytes()
        for _ in range(round(PTT_LIMIT_S) + 5):
            ws.send_bytes(second)
        ws.send_text(json.dumps({"type": "ptt", "down": False}))
        while (message := next_json(ws))["type"] != "user_turn":
            pass
        assert message["end"] - message["start"] == pytest.approx(PTT_LIMIT_S, abs=0.05)


# ---- 5. input that slipped through ----

HOSTILE_HELLOS = [
    '{"type": "hello", "sample_rate": Infinity}',
    '{"type": "hello", "sample_rate": 1e400}',
    '{"type": "hello", "sample_rate": NaN}',
    '{"type": "hello", "sample_rate": 16000, "play_rate": -Infinity}',
    '{"type": "hello", "sample_rate": true}',
    '{"type": "hello", "sample_rate": "16000"}',
    '{"type": "hello", "sample_rate": 1' + "0" * 400 + "}",
    '{"type": "hello"}',
    '{"type": "hello", "sample_rate": 16000, "half_duplex": "false"}',
    '{"type": "hello", "sample_rate": 16000, "think": "no"}',
    '{"type": "hello", "sample_rate": 16000, "think": null}',
    '{"type": "hell", "sample_rate": 16000}',
    '{"type": "hello", "sample_rate": 16000',
    "not json at all",
    "",
    "[1, 2]",
    '"hello"',
    "[" * 3000,
    b"\x00\x01\x02\x03",
]


@pytest.mark.parametrize("first", HOSTILE_HELLOS, ids=range(len(HOSTILE_HELLOS)))
def test_hostile_hellos_get_one_sentence_each(registry, first):
    with serve(registry()).websocket_connect(url("page-one-0001")) as ws:
        ws.send_bytes(first) if isinstance(first, bytes) else ws.send_text(first)
        assert refusal(ws)[1] == 1008


def test_bad_control_messages_close_with_one_sentence_and_unknown_types_are_ignored(registry):
    api = serve(registry())
    with api.websocket_connect(url("page-one-0001")) as ws:
        hello(ws)
        ws.send_text(json.dumps({"type": "from-a-newer-page", "x": 1}))
        assert "too short" in ptt_turn(ws, seconds=0.1)["message"]  # still served, in order
        ws.send_text(json.dumps({"type": "ptt", "down": "no"}))
        assert refusal(ws)[1] == 1008
    for bad in ("{oops", "[]", '{"type": "mode", "ptt": NaN}', '{"type": 7}', '{"kind": "ptt"}'):
        with api.websocket_connect(url("page-one-0001")) as ws:
            hello(ws)
            ws.send_text(bad)
            assert refusal(ws)[1] == 1008, bad


# ---- 6. fuzzing ----

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=12)
JUNK = st.one_of(JSON, st.sampled_from([8000, 16000, 48000.0, 192000, 7999.5, 1e400, True, "hello", "ptt", "mode"]))
HELLO_LIKE = st.fixed_dictionaries({"type": st.one_of(st.just("hello"), JUNK)},
                                   optional={k: JUNK for k in ("sample_rate", "play_rate", "half_duplex", "think")})
CONTROL_LIKE = st.fixed_dictionaries({"type": st.one_of(st.sampled_from(["ptt", "mode", "other"]), JUNK)},
                                     optional={"down": JUNK, "ptt": JUNK})
TEXTS = st.one_of(st.text(max_size=80), JSON.map(json.dumps), HELLO_LIKE.map(json.dumps), CONTROL_LIKE.map(json.dumps))


def parsed_or_sentence(parse, text: str):
    try:
        return parse(text)
    except ValueError as exc:
        assert type(exc) in (ValueError, talk_wire.MessageTooBig), type(exc)
        assert_sentence(str(exc))
        return None


@settings(max_examples=400, deadline=None)
@given(TEXTS)
def test_the_hello_parser_gives_a_hello_or_one_sentence(text):
    hello = parsed_or_sentence(partial(talk_wire.parse_hello, client="page-one-0001"), text)
    if hello is not None:
        assert 8000 <= hello.rate <= 192000 and 8000 <= hello.play_rate <= 192000
        assert type(hello.rate) is type(hello.play_rate) is int
        assert type(hello.half_duplex) is type(hello.think) is bool


@settings(max_examples=400, deadline=None)
@given(TEXTS)
def test_the_control_parser_gives_a_control_nothing_or_one_sentence(text):
    control = parsed_or_sentence(talk_wire.parse_control, text)
    assert control is None or isinstance(control, (talk_wire.Ptt, talk_wire.Mode))


@settings(max_examples=50, deadline=None)
@given(st.text(max_size=80), HELLO_LIKE.map(json.dumps))
def test_the_hello_parser_checks_the_client_id(client, text):
    hello = parsed_or_sentence(partial(talk_wire.parse_hello, client=client), text)
    assert hello is None or talk_wire._CLIENT_ID.fullmatch(client)


def test_random_first_messages_are_answered_and_the_server_keeps_serving(registry):
    reg = registry()
    api = serve(reg)

    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.one_of(st.binary(max_size=64), TEXTS, HELLO_LIKE.map(json.dumps)))
    def one(first):
        with api.websocket_connect(url("fuzz-page-0001")) as ws:
            ws.send_bytes(first) if isinstance(first, bytes) else ws.send_text(first)
            message = next_json(ws)
            assert message["type"] in ("ready", "error"), message
            if message["type"] == "error":
                assert_sentence(message["message"])
                assert receive(ws)["type"] == "websocket.close"

    one()
    with api.websocket_connect(url("normal-page-0001")) as ws:
        assert hello(ws, play_rate=48000, half_duplex=False, think=True)["type"] == "ready"
    assert reg.wait_closed(30) and len(reg) == 0


def test_sockets_that_never_say_hello_are_capped_per_address(registry):
    made = registry(max_sockets_per_ip=2, hello_timeout_s=30.0)
    client, other = serve(made), serve(made, ip="10.0.0.9")
    with client.websocket_connect(url("page-one-0001")), client.websocket_connect(url("page-two-0002")):
        with client.websocket_connect(url("page-three-03")) as third:
            assert "already has 2 voice connections open" in next_json(third)["message"]
        with other.websocket_connect(url("page-four-004")) as fourth:  # another address is not affected
            fourth.send_text(json.dumps({"type": "hello", "sample_rate": 16000}))
            assert next_json(fourth)["type"] == "ready"
    with client.websocket_connect(url("page-five-005")) as fifth:  # the silent ones left: room again
        fifth.send_text(json.dumps({"type": "hello", "sample_rate": 16000}))
        assert next_json(fifth)["type"] == "ready"
