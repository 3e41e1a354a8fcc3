"""Who may do what, tried as an attacker would: a real server with an API key, probed over HTTP and
WebSockets, and the gate's, the history's and the command line's rules in-process where a server would
only make the test slow. A test whose docstring tells what an attacker could do closes that hole (it
failed before the fix); the others pin what was tried and found closed."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import os
import time
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route, Router
from starlette.testclient import TestClient

from app import guard
from app.access import Access, owner_of
from tests.web.running import ROOT, free_port, raw_upload, running

KEY = "sesame-" + "7" * 24
OWNER = "c3" * 32


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The browser-test server (tiny model) with an API key, trusting no proxy unless told (as a user's
    shell would start it: FORWARDED_ALLOW_IPS unset)."""
    log = tmp_path_factory.mktemp("security") / "app.log"
    env = {k: v for k, v in os.environ.items() if k != "FORWARDED_ALLOW_IPS"}
    with running(["-m", "tests.web.server", "--port", str(free_port()), "--api-key", KEY], log, env=env) as (proc, url):
        yield proc, url, log


def _uploads(proc) -> Path:
    return Path(os.environ.get("TMPDIR", "/tmp")) / f"afnext-app-{proc.pid}" / "uploads"


# ---- the API key and the page's token ----

def test_v1_takes_the_key_in_its_header_only_never_the_pages_token(server):
    _, url, _ = server
    token = httpx.get(url + "afnext/token").json()["token"]
    for headers in ({}, {"Authorization": "Bearer"}, {"Authorization": "Bearer wrong"},
                    {"Authorization": f"Bearer {token}"}, {"Authorization": f"Basic {KEY}"}):
        r = httpx.get(url + "v1/models", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", headers
    assert httpx.get(url + f"v1/models?api_key={KEY}").status_code == 401, "a key in the URL ends up in logs"
    assert httpx.get(url + "v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    # A gzip body is not inflated by anyone on the way: 64 MiB of zeros in 64 KiB stays 64 KiB of non-JSON.
    bomb = gzip.compress(b"0" * (64 << 20))
    r = httpx.post(url + "v1/chat/completions", content=bomb, timeout=30,
                   headers={"Authorization": f"Bearer {KEY}", "Content-Encoding": "gzip",
                            "Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["message"].endswith("."), r.text[:200]


def test_a_page_token_is_this_servers_own_and_lasts_its_ttl_only():
    ours, theirs = Access(KEY), Access(KEY)
    token, expires = ours.page_token(now=1000.0)
    assert ours.token_ok(token, now=1000.0) and ours.token_ok(token, now=expires)
    assert not ours.token_ok(token, now=expires + 1), "expired"
    assert not theirs.token_ok(token, now=1000.0), "another server (another secret) refuses it"
    forged = f"{expires + 10**6}-{token.partition('-')[2]}"
    assert not ours.token_ok(forged, now=1000.0), "its expiry is signed"


def test_other_sites_pages_get_no_page_token():
    """Gradio's CORS middleware lets any site's page read any answer of a server reached by a name other
    than localhost (`Access-Control-Allow-Origin` echoes the Origin), so a page on another site could read
    a page token from a visitor's LAN or public server: only the socket's own Origin check stood."""
    from app.web import _page_token

    client = TestClient(Starlette(routes=[Route("/afnext/token", _page_token(Access(KEY)))]), base_url="http://app.example")
    assert client.get("/afnext/token").status_code == 200, "the page's own fetch sends no Origin"
    assert client.get("/afnext/token", headers={"Origin": "http://app.example"}).status_code == 200
    refused = client.get("/afnext/token", headers={"Origin": "https://evil.example"})
    assert refused.status_code == 403 and "token" not in refused.json() and refused.json()["error"].endswith(".")


def test_an_empty_api_key_is_refused_at_start_not_taken_as_no_key_needed(monkeypatch, capsys):
    """`AFNEXT_API_KEY=` (an env file with the value left out) made /v1 answer requests without any
    key: the API compares the key it was given with the one sent, and "" equals a missing header. The
    start warned of nothing, as a key was set."""
    from app.__main__ import parser

    for argv, env in ((["--api-key", ""], None), (["--api-key", "  "], None), ([], "")):
        if env is None:
            monkeypatch.delenv("AFNEXT_API_KEY", raising=False)
        else:
            monkeypatch.setenv("AFNEXT_API_KEY", env)
        with pytest.raises(SystemExit):
            parser().parse_args(argv)
        assert "empty" in capsys.readouterr().err, argv
    with pytest.raises(SystemExit):
        parser().parse_args(["--api-key", "k "])
    assert "space" in capsys.readouterr().err
    with pytest.raises(ValueError, match="empty"):
        Access("")  # app.web.assemble builds one before it serves: launch() refuses too
    monkeypatch.setenv("AFNEXT_API_KEY", KEY)
    assert parser().parse_args([]).api_key == KEY


# ---- files ----

@pytest.mark.parametrize("target", ["http://192.0.2.1/x.wav", "https://example.invalid/x.wav",
                                    "HTTP://example.invalid/x.wav", "//example.invalid/x.wav"])
def test_gradios_file_route_fetches_no_url_for_anyone(server, target):
    """Given a URL, Gradio's file route fetches it (any public address, any size, Range passed on) and
    streams it back, for any client, outside the per-address budget (a GET): the server was an open
    relay hiding the client's address and spending the server's bandwidth (seen in the server's log:
    `HTTP Request: GET http://93.184.215.14/x.wav`). The page names files on this server only."""
    _, url, _ = server
    for route in ("gradio_api/file=", "gradio_api/file/"):
        r = httpx.get(url + route + target, timeout=30)
        assert r.status_code == 403 and "fetches no URLs" in r.json()["error"], (route, r.status_code, r.text[:200])
        assert httpx.head(url + route + target, timeout=30).status_code == 403
    example = httpx.get(url + "gradio_api/file=" + str(ROOT / "assets" / "speech.wav"))
    assert example.status_code == 200 and example.headers["content-type"] == "audio/wav", "its own files are served"


def test_file_routes_serve_nothing_outside_and_uploads_only_as_downloads(server):
    proc, url, _ = server
    page = b"<html><script>alert(document.domain)</script></html>"
    up = httpx.post(url + "gradio_api/upload", files={"files": ("../../../x.html", page)})
    path = up.json()[0]
    assert Path(path).parent.parent == _uploads(proc) and Path(path).name == "x.html", "a name is a name, not a path"
    served = httpx.get(url + "gradio_api/file=" + path)
    assert served.content == page and served.headers["content-type"] == "application/octet-stream" \
        and served.headers["content-disposition"].startswith("attachment"), "an upload is never a page of ours"
    work = _uploads(proc).parent
    for target in ("/etc/passwd", f"{work}/uploads/../../../etc/passwd", f"{work}/wav/../../../../etc/passwd",
                   f"{work}/wav/%2e%2e/%2e%2e/%2e%2e/etc/passwd", str(ROOT / "app" / "access.py"),
                   str(ROOT / "assets" / ".." / "app" / "access.py"), f"{work}/uploads/"):
        r = httpx.get(url + "gradio_api/file=" + target)
        assert r.status_code in (403, 404) and b"root:" not in r.content, (target, r.status_code)


def test_kept_audio_never_comes_back_as_a_page(tmp_path):
    """A recording is kept under its upload's suffix, so audio named `x.html` (an Ogg with a script after
    its last page decodes as audio) came back from the history route as `text/html` on this origin."""
    from afnext.store import Store
    from app.history import HistoryRoutes

    store = Store(tmp_path)
    page = b"OggS\x00 ... <html><script>alert(document.domain)</script></html>"
    cid = store.create("recording", owner=owner_of(OWNER), audio=(page, ".html"))
    flac = store.create("recording", owner=owner_of(OWNER), audio=(b"fLaC bytes", ".flac"))
    client = TestClient(Starlette(routes=HistoryRoutes(store, Access()).routes()))
    r = client.get(f"/afnext/conversations/{cid}/audio/recording", headers={"X-AFNext-Owner": OWNER})
    assert r.content == page and r.headers["content-type"] == "application/octet-stream"
    assert r.headers["x-content-type-options"] == "nosniff"
    r = client.get(f"/afnext/conversations/{flac}/audio/recording", headers={"X-AFNext-Owner": OWNER})
    assert r.headers["content-type"] == "audio/flac", "audio keeps its own type, for the page's player"


# ---- uploads ----

def _gate(tmp_path: Path, quota: int = 1 << 20) -> guard.Guard:
    async def upload(request: Request) -> JSONResponse:
        await request.body()  # as Gradio's multipart reader does: ClientDisconnect when the body ends early
        return JSONResponse(["stored"])
    app = Router(routes=[Route("/gradio_api/upload", upload, methods=["POST"])])  # as inside FastAPI: no 500 page
    return guard.Guard(app, guard.GuardOptions(tmp_path, frozenset(), max_file_bytes=quota, quota_bytes=quota))


def _post(gate: guard.Guard, size: int, chunks) -> tuple[list[dict], float]:
    """One upload through `gate` declaring `size` bytes, its body from the async iterator `chunks`;
    (what the gate sent, seconds taken)."""
    scope = {"type": "http", "method": "POST", "path": "/gradio_api/upload", "client": ("10.0.0.9", 1),
             "headers": [(b"content-length", str(size).encode()), (b"content-type", b"application/octet-stream")],
             "query_string": b"", "http_version": "1.1", "scheme": "http", "server": ("t", 80), "root_path": ""}
    sent: list[dict] = []

    async def receive():
        try:
            return {"type": "http.request", "body": await anext(chunks), "more_body": True}
        except StopAsyncIteration:
            await asyncio.Event().wait()  # a client that keeps its connection open and sends nothing

    async def send(message):
        sent.append(message)

    async def run():
        started = time.monotonic()
        await asyncio.wait_for(gate(scope, receive, send), 10)
        return time.monotonic() - started
    return sent, asyncio.run(run())


async def _nothing():
    return
    yield


async def _trickle():
    while True:
        await asyncio.sleep(0.05)
        yield b"x"


@pytest.mark.parametrize("chunks, said", [(_nothing, "sent nothing"), (_trickle, "slower than")])
def test_an_upload_that_stops_or_crawls_is_ended_and_gives_its_room_back(tmp_path, monkeypatch, chunks, said):
    """An upload holds its Content-Length of the quota from its header on; uvicorn has no body timeout,
    so one that sent nothing held it for as long as the connection stayed open: four connections
    declaring 1 GiB each (two addresses) kept every other upload out with a 507, for good."""
    monkeypatch.setattr(guard, "UPLOAD_IDLE_S", 0.3, raising=False)
    monkeypatch.setattr(guard, "UPLOAD_MIN_BYTES_PER_S", 1 << 20, raising=False)  # 1 MiB a second: 600 kB take 0.6 s more
    gate = _gate(tmp_path)
    sent, took = _post(gate, 600_000, chunks())
    assert sent[0]["status"] == 408 and said in sent[1]["body"].decode(), sent
    assert took < 5 and gate.folder.reserved == 0 and gate.ledger.clients["10.0.0.9"].uploads == 0


def test_a_client_leaving_mid_upload_is_one_log_line_not_a_traceback(server):
    _, url, log = server
    with raw_upload(url, "Content-Length: 100000\r\n", b"--x\r\n"):
        time.sleep(0.3)
    deadline = time.monotonic() + 10
    while "ended when its client left" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    text = log.read_text()
    assert "ended when its client left" in text and "ClientDisconnect" not in text, text[-2000:]


# ---- client addresses (last: it spends this address's budget) ----

def test_an_address_named_in_x_forwarded_for_is_not_believed(server):
    """Uvicorn believes X-Forwarded-For from any peer on 127.0.0.1 by default: a client arriving through
    a loopback hop (an SSH tunnel, a script on the machine) named a new address with each request and
    each socket, and every per-address limit (8 voice sockets, the request budget, 2 uploads at once)
    fell: 10 sockets and 300 history reads went through."""
    from websockets.sync.client import connect

    _, url, _ = server
    ws_url = url.replace("http://", "ws://") + "v1/realtime?model=instruct"
    firsts = []
    with contextlib.ExitStack() as open_sockets:  # all open at once, closed together
        for i in range(9):
            headers = {"Authorization": f"Bearer {KEY}", "X-Forwarded-For": f"10.8.0.{i}"}
            ws = open_sockets.enter_context(connect(ws_url, additional_headers=headers, subprotocols=["realtime"],
                                                    open_timeout=30))
            firsts.append(json.loads(ws.recv(timeout=30)))
    assert [f["type"] for f in firsts[:8]] == ["session.created"] * 8
    assert firsts[8]["type"] == "error" and "Too many voice sessions" in firsts[8]["error"]["message"]
    from concurrent.futures import ThreadPoolExecutor

    def read(i: int) -> int:
        headers = {"X-AFNext-Owner": OWNER, "X-Forwarded-For": f"10.9.{i // 250}.{i % 250}"}
        return client.get(url + "afnext/conversations", headers=headers).status_code
    with httpx.Client(timeout=30) as client, ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(read, range(2 * guard.REQUEST_BURST)))
    assert 429 in codes, "one address's budget, whatever the header says"


@pytest.mark.parametrize("host, group", [
    ("203.0.113.7", "203.0.113.7"),
    ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
    ("2001:db8:1:2:ffff:ffff:ffff:fffe", "2001:db8:1:2::/64"),  # the same /64: the same share
    ("2001:db8:1:3::1", "2001:db8:1:3::/64"),
    ("::ffff:203.0.113.7", "203.0.113.7"),  # an IPv4 client on a dual-stack socket
    ("::1", "::/64"), (None, "?"), ("testclient", "testclient"),
])
def test_an_ipv6_client_counts_as_its_64_so_its_other_addresses_get_no_fresh_share(host, group):
    from app.access import client_group

    assert client_group(host) == group


def test_the_request_budget_is_shared_by_the_addresses_of_one_ipv6_64():
    from app.guard import GuardOptions, Refused, _address, _Ledger

    ledger = _Ledger(GuardOptions(Path("/nonexistent"), frozenset(), 1, burst=3, rate_per_s=0.001))
    for last in range(1, 4):
        ledger.spend(_address({"client": (f"2001:db8::{last}", 40000)}))
    with pytest.raises(Refused, match="Too many requests"):
        ledger.spend(_address({"client": ("2001:db8::ffff:4", 40000)}))
    ledger.spend(_address({"client": ("2001:db8:0:1::1", 40000)}))  # another /64: its own share
