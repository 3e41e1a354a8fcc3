"""The web app as an attacker (and a careless newcomer) meets it: a real server process on loopback,
awaited on /health, probed over HTTP; plus the Recordings desk's limits, without a server.

Each test here failed on the app before its hardening (issue 9)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from app import recordings
from app.desk import Files, hold, live_conversations
from app.guard import folder_bytes
from tests.web.running import ROOT, free_port, health, raw_upload, running

ASSETS = ROOT / "assets"
FILE_DATA = {"_type": "gradio.FileData"}


@pytest.fixture(scope="module")
def private_wav(tmp_path_factory) -> Path:
    """A recording on the server's disk that no user uploaded: in the temp dir, where Gradio allows
    files an app created, and beside the app's own folders."""
    path = tmp_path_factory.mktemp("private") / "private-meeting.wav"
    soundfile.write(path, np.random.default_rng(7).uniform(-0.2, 0.2, 16000).astype(np.float32), 16000)
    return path


@pytest.fixture(scope="module")
def app_server(tmp_path_factory):
    """The browser-test server (tiny model), with a 3.5 MiB upload quota so the quota is cheap to reach."""
    log = tmp_path_factory.mktemp("app") / "app.log"
    port = str(free_port())
    with running(["-m", "tests.web.server", "--port", port, "--upload-quota-bytes", str(7 << 19)], log) as (proc, url):
        yield proc, url, log


def _uploads(proc) -> Path:
    return Path(os.environ.get("TMPDIR", "/tmp")) / f"afnext-app-{proc.pid}" / "uploads"


def _upload(url: str, path: Path, name: str | None = None) -> httpx.Response:
    with open(path, "rb") as f:
        return httpx.post(url + "gradio_api/upload", files={"files": (name or path.name, f)}, timeout=30)


def _call(url: str, name: str, data: list) -> tuple[int, str]:
    """A named call through Gradio's two-step API: (status of the POST, the event stream's text)."""
    r = httpx.post(f"{url}gradio_api/call/{name}", json={"data": data}, timeout=30)
    if r.status_code != 200:
        return r.status_code, r.text
    stream = httpx.get(f"{url}gradio_api/call/{name}/{r.json()['event_id']}", timeout=120)
    return r.status_code, stream.text


def test_only_the_documented_endpoint_is_listed(app_server):
    _, url, _ = app_server
    info = httpx.get(url + "gradio_api/info").json()
    assert sorted(info["named_endpoints"]) == ["/ask_recording"]
    from gradio_client import Client

    assert "ask_recording" in Client(url, verbose=False).view_api(print_info=False, return_format="str")


def test_ui_events_cannot_be_called_by_name(app_server):
    _, url, _ = app_server
    config = httpx.get(url + "config").json()
    names = [d["api_name"] for d in config["dependencies"] if d.get("api_name") and d["api_name"] != "ask_recording"]
    assert names  # open, ask, speak, …: the page's own events
    for name in names:
        status, text = _call(url, name, [])
        assert status == 404 and "no API endpoint named" in text, (name, status, text)


def test_a_server_path_in_a_file_payload_is_refused_at_every_endpoint(app_server, private_wav):
    proc, url, _ = app_server
    payload = {"path": str(private_wav), "meta": FILE_DATA}
    status, text = _call(url, "ask_recording", [payload, "What is said?", False])
    assert status == 403 and "uploaded to this server first" in text
    config = httpx.get(url + "config").json()
    for index, dep in enumerate(config["dependencies"]):  # the page's way in: the queue, by index
        data = [payload] * max(1, len(dep["inputs"]))
        r = httpx.post(url + "gradio_api/queue/join", json={"data": data, "fn_index": index,
                                                             "session_hash": f"attacker{index:04d}"}, timeout=30)
        assert r.status_code == 403 and "uploaded to this server first" in r.text, (index, r.status_code, r.text)
    for variant in (f"{_uploads(proc)}/../../{private_wav}", str(private_wav.parent / "." / private_wav.name)):
        r = httpx.post(url + "gradio_api/queue/join", json={"data": [{"path": variant, "meta": FILE_DATA}],
                                                             "fn_index": 0, "session_hash": "attacker"})
        assert r.status_code == 403, variant
    assert httpx.get(f"{url}gradio_api/file={private_wav}").status_code == 403
    copies = [p for p in _uploads(proc).parent.rglob("*") if p.is_file() and p.read_bytes() == private_wav.read_bytes()]
    assert copies == []


def test_ask_recording_answers_an_upload_then_deletes_it(app_server):
    from gradio_client import Client, handle_file

    proc, url, log = app_server
    client = Client(url, verbose=False)
    answer = client.predict(handle_file(str(ASSETS / "speech.wav")), "Summarize.", True, api_name="/ask_recording")
    assert "milk and eggs" in answer
    with pytest.raises(Exception, match="Send a question with the audio file"):
        client.predict(handle_file(str(ASSETS / "speech.wav")), " ", False, api_name="/ask_recording")
    assert folder_bytes(_uploads(proc)) == 0  # both uploads deleted once answered (or refused)
    assert "Traceback" not in log.read_text()  # user errors are one log line each


OWNER = "5" * 64  # the owner token a page would send with its events


def _page_event(url: str, api_name: str, data: list, session: str) -> dict:
    """Call one of the page's events as the page does (queue, by index); its last message."""
    config = httpx.get(url + "config").json()
    index = next(i for i, d in enumerate(config["dependencies"]) if d.get("api_name") == api_name)
    r = httpx.post(url + "gradio_api/queue/join", json={"data": data, "fn_index": index, "session_hash": session})
    assert r.status_code == 200, r.text
    with httpx.stream("GET", f"{url}gradio_api/queue/data?session_hash={session}", timeout=60) as stream:
        for line in stream.iter_lines():
            if '"process_completed"' in line:
                return json.loads(line.removeprefix("data: "))
    raise AssertionError("the event never completed")


def test_a_file_that_is_not_audio_gets_a_sentence_and_is_deleted(app_server):
    proc, url, log = app_server
    path = _upload(url, Path(__file__), "notes.md").json()[0]
    done = _page_event(url, "open", [{"path": path, "meta": FILE_DATA, "orig_name": "notes.md"}, OWNER], "page-session-01")
    assert "not audio in a known format" in done["output"]["data"][0]
    assert not Path(path).exists()
    assert "Traceback" not in log.read_text()


def test_a_recording_opened_without_an_owner_token_is_refused_so_nobody_else_can_reach_it(app_server):
    proc, url, log = app_server
    path = _upload(url, ASSETS / "speech.wav").json()[0]
    for owner in ("", "not-a-token"):
        done = _page_event(url, "open", [{"path": path, "meta": FILE_DATA, "orig_name": "speech.wav"}, owner],
                           f"no-owner-{len(owner):02d}")
        assert "no owner token" in done["output"]["data"][0] and done["output"]["data"][3] == ""
    assert not Path(path).exists(), "a refused upload is deleted"


def test_uploads_past_the_quota_or_size_are_refused_and_the_server_keeps_serving(app_server, tmp_path):
    proc, url, _ = app_server
    blob = tmp_path / "blob.bin"
    blob.write_bytes(os.urandom(1 << 20))
    answers = [_upload(url, blob, f"b{i}.bin") for i in range(5)]  # 5 MiB into a 3.5 MiB quota
    codes = [a.status_code for a in answers]
    assert codes[:3] == [200] * 3 and codes[3:] == [507, 507], codes
    assert answers[-1].text == "The server has no room for more uploads right now; try again in a few minutes."
    assert folder_bytes(_uploads(proc)) <= 7 << 19
    assert "413" in _raw_upload_head(url, 2 << 30)  # refused on its header, before a byte is stored
    assert health(url)[0] == 200
    for answer in answers[:3]:  # room for the tests after this one (the hourly sweep would free it)
        Path(answer.json()[0]).unlink()


def _raw_upload_head(url: str, declared: int) -> str:
    """Send an upload's headers claiming `declared` bytes (and only a few of them); the status line."""
    with raw_upload(url, f"Content-Length: {declared}\r\n", b"--x\r\n") as s:
        return s.recv(4096).decode(errors="replace").splitlines()[0]


def test_a_huge_request_body_gets_a_sentence_on_every_route(app_server):
    _, url, _ = app_server
    body = json.dumps({"data": ["x" * (2 << 20), False, None, None], "fn_index": 2, "session_hash": "big"})
    for route in ("queue/join", "reset", "cancel", "call/ask_recording"):
        r = httpx.post(f"{url}gradio_api/{route}", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error"].endswith("KiB."), route


def test_routes_the_page_does_not_use_are_closed(app_server):
    _, url, _ = app_server
    for route in ("gradio_api/process_recording", "gradio_api/component_server", "gradio_api/stream/x",
                  "gradio_api/run-history/connect", "login", "gradio_api//call/open"):
        r = httpx.post(url + route, content=b"x" * 1000, headers={"content-type": "application/octet-stream"})
        assert r.status_code == 404 and "no such endpoint" in r.json()["error"], (route, r.status_code)
    assert httpx.request("PUT", url + "gradio_api/upload", content=b"x").status_code == 405
    assert health(url)[0] == 200


def test_a_server_on_localhost_serves_no_page_to_another_name(app_server):
    """DNS rebinding: a site points its own name at 127.0.0.1, and its page, same-origin with itself,
    would drive ours; served on 127.0.0.1, the app answers only to this computer's names."""
    _, url, _ = app_server
    for path in ("", "config", "gradio_api/info", "v1/models"):
        r = httpx.get(url + path, headers={"host": "rebind.attacker.example"})
        assert r.status_code == 403 and "own address" in r.text, (path, r.status_code)
    assert httpx.get(url + "v1/models", headers={"host": "rebind.attacker.example"}).json()["error"]["type"] == \
        "permission_error"
    assert httpx.get(url + "config", headers={"host": "localhost"}).status_code == 200
    assert health(url)[0] == 200


def test_a_body_with_both_length_and_chunked_encoding_is_refused(app_server):
    _, url, _ = app_server
    with raw_upload(url, "Content-Length: 300\r\nTransfer-Encoding: chunked\r\n", b"0\r\n\r\n") as s:
        assert " 400 " in s.recv(4096).decode(errors="replace").splitlines()[0]


def test_a_path_anywhere_in_a_payload_is_refused(app_server, private_wav):
    _, url, _ = app_server
    chat = [{"role": "user", "content": {"type": "component", "component": "file", "value": {"path": str(private_wav)}}}]
    r = httpx.post(url + "gradio_api/queue/join", json={"data": ["Hi", False, "", chat], "fn_index": 2,
                                                         "session_hash": "chat-path-1"})
    assert r.status_code == 403


def test_the_same_file_twice_in_a_tab_and_in_parallel_calls_stays_readable(app_server):
    from concurrent.futures import ThreadPoolExecutor

    from gradio_client import Client, handle_file

    proc, url, _ = app_server
    for attempt in range(2):  # dropped twice in one tab: the second must not find the first's deletion
        path = _upload(url, ASSETS / "speech.wav").json()[0]
        done = _page_event(url, "open", [{"path": path, "meta": FILE_DATA, "orig_name": "speech.wav"}, OWNER], "same-tab-01")
        assert "(0:10)" in done["output"]["data"][0], (attempt, done)
    client = Client(url, verbose=False)
    with ThreadPoolExecutor(2) as pool:  # two calls about one file: one upload path, shared
        answers = list(pool.map(lambda _: client.predict(handle_file(str(ASSETS / "speech.wav")), "Summarize.",
                                                         True, api_name="/ask_recording"), range(2)))
    assert all("milk and eggs" in a for a in answers)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.one_of(st.binary(max_size=300), st.recursive(
    st.none() | st.booleans() | st.floats() | st.text(max_size=20) | st.integers(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["data", "fn_index", "session_hash", "path", "meta", "_type", "url", "orig_name"]),
        inner, max_size=5), max_leaves=12).map(lambda v: json.dumps(v).encode())))
@example(body=b"Infinity")  # found by this test: Gradio answered 500 until the gate refused non-objects
@example(body=b'{"data": [NaN], "fn_index": 2}')
@example(body=b"[" * 5000)
def test_fuzzed_call_bodies_never_break_the_server(app_server, body):
    _, url, _ = app_server
    for route in ("gradio_api/queue/join", "gradio_api/call/ask_recording"):
        r = httpx.post(url + route, content=body, headers={"content-type": "application/json"}, timeout=30)
        assert r.status_code < 500, (route, body, r.status_code, r.text[:300])


def test_a_flood_from_one_address_is_slowed_and_others_are_unaffected():
    from app.guard import GuardOptions, Refused, _Ledger

    ledger = _Ledger(GuardOptions(Path("/nonexistent"), frozenset(), 1, burst=5, rate_per_s=100.0))
    for _ in range(5):
        ledger.spend("10.0.0.1")
    with pytest.raises(Refused, match="Too many requests"):
        ledger.spend("10.0.0.1")
    ledger.spend("10.0.0.2")  # another address has its own budget
    time.sleep(0.02)
    ledger.spend("10.0.0.1")  # and the budget refills
    ledger.upload_started("10.0.0.2")
    ledger.upload_started("10.0.0.2")
    with pytest.raises(Refused, match="already sending files"):
        ledger.upload_started("10.0.0.2")


def test_uploads_left_by_a_killed_server_are_removed_by_the_next_start(tmp_path):
    first_log, second_log = tmp_path / "first.log", tmp_path / "second.log"
    with running(["-m", "tests.web.server", "--port", str(free_port())], first_log) as (proc, url):
        assert _upload(url, ASSETS / "speech.wav").status_code == 200
        left = _uploads(proc)
        assert folder_bytes(left) > 0
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    with running(["-m", "tests.web.server", "--port", str(free_port())], second_log):
        assert not left.parent.exists()


def test_a_busy_port_gets_a_sentence_naming_the_flag(tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "app", "--model", "tiny", "--port", str(port)], cwd=ROOT,
                              capture_output=True, text=True, timeout=180, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"Port {port}" in proc.stderr and "--port" in proc.stderr and "Traceback" not in proc.stderr
    assert "INFO app.backend" not in proc.stderr, "said only once the model had loaded (minutes for a real one)"


@pytest.mark.parametrize("flags, env", [(["--port", "70000"], {}), (["--port", "http"], {}),
                                       ([], {"GRADIO_SERVER_PORT": "99999"}), ([], {"GRADIO_SERVER_PORT": "x"})])
def test_a_port_that_is_no_port_is_one_sentence(flags, env):
    """Past 65535 it was a traceback from the port check (OverflowError), or from reading the variable."""
    proc = subprocess.run([sys.executable, "-m", "app", "--model", "tiny", *flags], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, HF_HUB_OFFLINE="1", **env))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-1500:]
    assert proc.stderr.strip().splitlines()[-1].endswith("is not a port; give a number from 1 to 65535 (say 7860)")


# The live recordings, without a server.

def _recording(tmp_path: Path, name: str) -> recordings.Recording:
    path = tmp_path / name
    soundfile.write(path, np.zeros(1600, np.float32), 16000)
    return recordings.open_recording(str(path), tmp_path, owned=True)


def _held(live, files, address: str, recording: recordings.Recording, cid: str) -> None:
    recording.cid = cid
    hold(live, files, address, recording)


def test_live_recordings_are_capped_per_address_and_in_all_and_their_files_go_with_them(tmp_path):
    live, files = live_conversations(per_group=2, most=3), Files()
    held = {s: _recording(tmp_path, f"{s}.aiff") for s in "abcde"}  # aiff: a WAV copy is made too
    paths = {s: r.files for s, r in held.items()}
    assert all(len(f) == 2 for f in paths.values())
    for s in "abc":
        _held(live, files, "10.0.0.1", held[s], s)
    assert live.get("a", "") is None and live.get("b", "") and live.get("c", "")  # one address: its oldest went
    assert not any(p.exists() for p in paths["a"]) and "newer one from your address" in live.why_gone("a")
    _held(live, files, "10.0.0.2", held["d"], "d")
    _held(live, files, "10.0.0.3", held["e"], "e")  # four held in all: the least recently used (b) goes
    assert len(live) == 3 and live.get("b", "") is None and live.get("c", "") is not None
    assert "server was full" in live.why_gone("b")
    assert not live.drop("c", "someone else") and live.get("c", "") is not None, "only its owner lets it go"
    live.drop("c", "")
    assert not any(p.exists() for p in paths["c"]) and all(p.exists() for p in paths["d"])
    assert live.why_gone("c") is None  # its owner let go of it: nobody to tell


def test_idle_recordings_are_let_go_by_the_sweep_whether_or_not_anyone_asks(tmp_path):
    live, files = live_conversations(idle_s=0.05), Files()
    _held(live, files, "10.0.0.1", _recording(tmp_path, "a.wav"), "a")
    stop = threading.Event()
    threading.Thread(target=live.sweep_every, args=(0.02, stop), daemon=True).start()
    deadline = time.monotonic() + 10
    while len(live) and time.monotonic() < deadline:
        time.sleep(0.01)
    stop.set()
    assert len(live) == 0 and "nobody had used it" in live.why_gone("a")


def test_a_file_in_use_twice_is_deleted_only_after_its_last_user(tmp_path):
    path = tmp_path / "same.wav"
    soundfile.write(path, np.zeros(1600, np.float32), 16000)
    files = Files(keep := set())
    live = live_conversations()
    _held(live, files, "10.0.0.1", recordings.open_recording(str(path), tmp_path, owned=True), "a")
    files.claim([path])  # an API call about the same upload, in flight
    _held(live, files, "10.0.0.2", recordings.open_recording(str(path), tmp_path, owned=True), "b")
    live.drop("a")
    live.drop("b")
    assert path.exists() and str(path) in keep  # Gradio's sweep leaves it alone while it is in use
    files.release([path])
    assert not path.exists() and keep == set()


def test_an_owner_reaches_a_live_conversation_only_by_its_id_and_their_token():
    from afnext.live import Live

    live = Live()
    made = []
    value = live.open("c1", "alice", "10.0.0.1", lambda: made.append(1) or "state")
    assert value == "state" and live.open("c1", "alice", "10.0.0.1", lambda: made.append(1) or "other") == "state"
    assert made == [1], "made once, then found live"
    assert live.get("c1", "mallory") is None and live.get("c2", "alice") is None


def test_a_page_whose_recording_the_server_lost_is_told_why():
    from app.recordings_tab import _nothing_held

    shown = json.dumps({"name": "meeting.m4a", "peaks": []})
    assert "no longer holds meeting\\.m4a (the server restarted" in _nothing_held(shown)  # Markdown-escaped
    assert "(nobody had asked" in _nothing_held(shown, "nobody had asked about it for 30 minutes")
    for junk in ("", "{not json", "[" * 100_000, json.dumps({"name": ["x"]}), "[]"):
        assert _nothing_held(junk) == "Upload a recording, or pick an example, first."


def test_measuring_the_upload_folder_tidies_what_gradio_leaves(tmp_path):
    from app.guard import measure_folder

    (tmp_path / "abc123").mkdir()
    (tmp_path / "abc123" / "kept.wav").write_bytes(b"x" * 10)
    (tmp_path / "empty-dir").mkdir()
    (tmp_path / "tmpleftover").write_bytes(b"")  # what gr.File leaves on every call
    (tmp_path / "tmpfresh").write_bytes(b"")
    old = time.time() - 120
    for stale in (tmp_path / "empty-dir", tmp_path / "tmpleftover"):
        os.utime(stale, (old, old))
    assert measure_folder(tmp_path) == (10, 2)  # the fresh empty file still counts: it may be in use
    assert sorted(p.name for p in tmp_path.iterdir()) == ["abc123", "tmpfresh"]


def test_a_flood_of_history_reads_is_slowed_like_any_other_flood(app_server):
    """History reads take the store's lock, which each finished turn takes too: a flood of them from one
    address meets the per-address budget (GETs elsewhere on the page are not counted). Last in this file:
    it spends this address's budget."""
    from concurrent.futures import ThreadPoolExecutor

    _, url, _ = app_server
    with httpx.Client(timeout=30) as client, ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda _: client.get(url + "afnext/conversations", headers={"X-AFNext-Owner": OWNER}),
                                range(300)))
    codes = [a.status_code for a in answers]
    assert 429 in codes and 200 in codes, codes
    refused = next(a for a in answers if a.status_code == 429)
    assert refused.headers["retry-after"] == "2", "a refused client is told how long to wait"
    time.sleep(1.0)  # the budget refills; the server answers as before
    assert httpx.get(url + "health").status_code == 200
