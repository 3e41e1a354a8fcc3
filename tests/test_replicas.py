"""`python -m app --replicas 2` on a local Ray cluster, reached as users reach it: the openai SDK with an
`x-session-id` per conversation, a Realtime session, the page in Chromium, and a replica killed with
SIGKILL between two turns of a conversation."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path

import openai
import pytest

from tests.test_api import user
from tests.test_cli import wav
from tests.web.running import free_port, running

pytest.importorskip("ray.serve", reason="Ray Serve is in requirements-serve.txt (requirements-dev.txt takes it)")

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "assets"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
HEADER = "x-afnext-replica"
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def deployment(tiny_dir, tmp_path_factory):
    """Two CPU replicas of the tiny model behind one port; yields (base URL, log path) once both serve."""
    work = tmp_path_factory.mktemp("replicas")
    port, log = str(free_port()), work / "app.log"
    env = dict(os.environ, HF_HUB_OFFLINE="1", AFNEXT_RAY_DASHBOARD="0", RAY_USAGE_STATS_ENABLED="0")
    args = ["-m", "app", "--model", str(tiny_dir), "--device", "cpu", "--replicas", "2", "--port", port,
            "--data", str(work / "data")]
    with running(args, log, env=env) as (proc, url):
        deadline = time.monotonic() + 300  # Ray starts two replicas; a loaded shared machine took over 120 s
        while len(_serving(url)) < 2:  # both replicas on the ring
            assert time.monotonic() < deadline, f"the second replica never served:\n{log.read_text()[-3000:]}"
            time.sleep(0.5)
        running_app = Deployment((url, log))
        running_app.proc = proc
        yield running_app
    # Stopped here (SIGTERM), unless the module's last test killed its cluster: then it exited with status 1.
    assert proc.returncode in ((1,) if running_app.cluster_killed else (0, -signal.SIGTERM)), log.read_text()[-2000:]


class Deployment(tuple):
    """(base URL, log path) of the running app, with its process."""

    proc: subprocess.Popen
    cluster_killed = False


def replica_of(url: str, session: str | None = None) -> str:
    """The replica that answers GET /health for this session id (None: without one)."""
    request = urllib.request.Request(url + "health", headers={"x-session-id": session} if session else {})
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 200
        return response.headers[HEADER]


def _serving(url: str) -> set[str]:
    """The replicas that answered 16 probes; while the second one deploys, an error is no answer."""
    seen = set()
    for i in range(16):
        try:
            seen.add(replica_of(url, f"probe-{i}"))
        except OSError:  # a refused or 5xx probe (HTTPError is an OSError): that replica is not serving yet
            pass
    return seen


def sessions_on_each(url: str, each: int) -> dict[str, list[str]]:
    """`each` session ids for every replica, as the ring places them."""
    found: dict[str, list[str]] = {}
    for i in range(400):
        session = f"conversation-{i}"
        ids = found.setdefault(replica_of(url, session), [])
        if len(ids) < each:
            ids.append(session)
        if len(found) == 2 and all(len(v) == each for v in found.values()):
            return found
    raise AssertionError(f"the ring did not place {each} of 400 ids on each replica: {found}")


def client(url: str, session: str | None) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "v1", api_key="unused", max_retries=0, timeout=120,
                         default_headers={"x-session-id": session} if session else None)


def turn(api: openai.OpenAI, messages: list[dict]):
    """One request with the conversation so far; (its answer, usage, the replica that answered)."""
    raw = api.chat.completions.with_raw_response.create(model="instruct", messages=messages, max_tokens=MAX_TOKENS)
    done = raw.parse()
    return done.choices[0].message.content, done.usage, raw.headers[HEADER]


def converse(url: str, session: str, clip: str) -> list[tuple[object, str]]:
    """Three turns (a clip in the first), each request resending the conversation: (usage, replica) per turn."""
    api, messages, out = client(url, session), [], []
    for text, path in (("What is this?", clip), ("And after that?", None), ("Say it once more.", None)):
        messages.append(user(text, path))
        answer, usage, replica = turn(api, messages)
        messages.append({"role": "assistant", "content": answer})
        out.append((usage, replica))
    return out


# SIGTERM to the app's process group (a terminal closed, a supervisor stopping it) stops it and its whole
# cluster within this. Measured 5-7 s on an idle 2-core machine: 3.6 s Ray stopping its node's processes
# one after the other, 1.5-2 s the interpreter's own exit (it took 39 s: Serve's shutdown waited 30 s
# for its controller, stopped by the same signal, and Ray's driver 5 s more for its GCS). About twice
# that leaves room for a loaded machine, and still fails the 39 s.
STOP_BOUND_S = 15.0


def test_sigterm_to_the_apps_process_group_stops_it_and_its_cluster_in_seconds(tiny_dir, tmp_path):
    """The app with two replicas, once both serve, stopped by SIGTERM to its process group, Ray's processes
    in it: it exits with status 0 within STOP_BOUND_S and no process of its cluster runs on. First of the
    tests that start the app: its cluster is its own, started before the shared deployment's runs."""
    port = str(free_port())
    url, log = f"http://127.0.0.1:{port}/", tmp_path / "app.log"
    env = dict(os.environ, HF_HUB_OFFLINE="1", AFNEXT_RAY_DASHBOARD="0", RAY_USAGE_STATS_ENABLED="0")
    with open(log, "wb") as out:  # a process group of its own, as a terminal or a supervisor gives it
        proc = subprocess.Popen([sys.executable, "-m", "app", "--model", str(tiny_dir), "--device", "cpu",
                                 "--replicas", "2", "--port", port, "--data", str(tmp_path / "data")], cwd=ROOT,
                                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # Both replicas answer, and the app has said it serves: a signal before that stops its start instead.
        deadline = time.monotonic() + 300
        while len(_serving(url)) < 2 or "Serving http" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        cluster = _descendants(proc.pid)  # Ray's processes, Serve's and the replicas' among them
        assert sum("ServeReplica" in command for command in cluster.values()) == 2, cluster
        signalled = time.monotonic()
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(STOP_BOUND_S * 4)
        exited = time.monotonic() - signalled
        while left := [c for pid, c in cluster.items() if _running(pid)]:
            assert time.monotonic() - signalled < STOP_BOUND_S, f"left running: {left}"
            time.sleep(0.2)
        assert proc.returncode == 0 and exited < STOP_BOUND_S, (proc.returncode, exited, log.read_text()[-2000:])
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)


def test_six_conversations_stay_on_their_replicas_and_reuse_their_caches(deployment, tmp_path):
    url, _ = deployment
    placed = sessions_on_each(url, 3)
    sessions = [(s, replica) for replica, ids in placed.items() for s in ids]
    clips = {s: wav(tmp_path / f"{s}.wav", 3.0, seed=i) for i, (s, _) in enumerate(sessions)}  # six conversations
    with ThreadPoolExecutor(len(sessions)) as pool:  # at once
        results = list(pool.map(lambda s: converse(url, s[0], clips[s[0]]), sessions))
    for (session, expected), turns in zip(sessions, results):
        assert [replica for _, replica in turns] == [expected] * 3, (session, turns)
        assert turns[0][0].prompt_tokens_details.cached_tokens == 0
        for usage, _ in turns[1:]:  # each follow-up continued the kept session on its replica
            assert usage.prompt_tokens_details.cached_tokens > 0, (session, usage)
    assert {replica for turns in results for _, replica in turns} == set(placed), "both replicas served"


def test_requests_without_a_session_id_spread_over_the_replicas(deployment):
    url, _ = deployment
    served = {replica_of(url) for _ in range(24)}
    assert len(served) == 2, served


def test_the_log_says_where_serves_metrics_are_and_they_count_the_replicas_requests(deployment):
    url, log = deployment
    deadline = time.monotonic() + 60  # said once every replica runs, which the fixture does not wait for
    while not (found := re.findall(r"Serve's metrics .*: (http://\S+/metrics)", log.read_text())):
        assert time.monotonic() < deadline, log.read_text()[-2000:]
        time.sleep(0.5)
    (metrics,) = found
    for _ in range(4):
        replica_of(url, "counted")
    deadline = time.monotonic() + 60
    while True:  # Ray exports them every few seconds
        with urllib.request.urlopen(metrics, timeout=30) as response:
            text = response.read().decode()
        counted = re.findall(r'^ray_serve_deployment_request_counter_total\{[^}]*deployment="AFNextReplica"[^}]*\} (\S+)',
                             text, re.M)
        if counted and sum(map(float, counted)) >= 4 and "ray_serve_num_ongoing_requests_at_replicas" in text:
            return
        assert time.monotonic() < deadline, text[-2000:]
        time.sleep(1)


def test_a_realtime_session_through_the_deployment(deployment):
    from websockets.sync.client import connect

    url, _ = deployment
    with connect(url.replace("http", "ws", 1) + "v1/realtime?model=instruct", open_timeout=60) as socket:
        assert socket.response.headers[HEADER], "the socket's handshake names its replica"
        assert json.loads(socket.recv(timeout=60))["type"] == "session.created"
    from tests.test_realtime import Conversation

    with client(url, None).realtime.connect(model="instruct") as connection:
        talk = Conversation(connection)
        talk.wait_for("session.created")
        connection.session.update(session={"type": "realtime", "output_modalities": ["text"]})
        talk.wait_for("session.updated")
        connection.conversation.item.create(item={"type": "message", "role": "user",
                                                  "content": [{"type": "input_text", "text": "Hello, who are you?"}]})
        connection.response.create(response={"max_output_tokens": MAX_TOKENS})
        done = talk.wait_for("response.done")[0]
        assert done.response.status in ("completed", "incomplete"), done
        assert talk.wait_for("response.output_text.done")[0].text


def test_a_loopback_client_naming_other_addresses_still_counts_as_one(deployment):
    """Serve's proxy is the HTTP server: a client on 127.0.0.1 (through an SSH tunnel, say) naming a new
    X-Forwarded-For address with every socket got a fresh share of the per-address limits; uvicorn
    believes loopback peers unless told otherwise (FORWARDED_ALLOW_IPS)."""
    from websockets.sync.client import connect

    from app.realtime import MAX_PER_ADDRESS

    url, _ = deployment
    answers = []
    with ExitStack() as sockets:
        for i in range(MAX_PER_ADDRESS + 1):  # one replica (one session id): its limits are its own
            headers = {"x-session-id": "one-client", "X-Forwarded-For": f"203.0.113.{i + 1}"}
            socket = sockets.enter_context(connect(url.replace("http", "ws", 1) + "v1/realtime?model=instruct",
                                                   additional_headers=headers, open_timeout=60))
            answers.append(json.loads(socket.recv(timeout=60)))
    assert [a["type"] for a in answers] == ["session.created"] * MAX_PER_ADDRESS + ["error"], answers
    assert "Too many voice sessions" in answers[-1]["error"]["message"]


@contextmanager
def _log_on_failure(log: Path):
    """A failure inside carries the app's log's last lines (its replicas' tracebacks), for CI's output."""
    try:
        yield
    except Exception as exc:
        raise AssertionError(f"{exc}\n-- the app's log ends:\n{log.read_text(errors='replace')[-4000:]}") from exc


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed (scripts/setup.sh)")
def test_the_page_asks_about_a_recording_on_one_replica(deployment):
    from playwright.sync_api import sync_playwright

    from tests.test_browser import WAVE, _ask

    url, log = deployment
    with sync_playwright() as p, _log_on_failure(log):
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        errors, served, media = [], set(), []
        page.on("pageerror", lambda e: errors.append(str(e)))

        def seen(response) -> None:
            if response.url.startswith(url) and "/gradio_api/" in response.url:
                if response.request.headers.get("x-session-id"):
                    served.add(response.headers.get(HEADER))
                else:  # what no script fetched (an <audio> loading its file) carries no header: any replica
                    media.append(response.url)
        page.on("response", seen)
        page.goto(url)
        page.get_by_role("tab", name="Recordings").click()
        page.locator("#afn-upload input[type=file]").set_input_files(str(ASSETS / "speech.wav"))
        page.wait_for_function(f"() => document.querySelector('{WAVE}')?.dataset.duration", timeout=60_000)
        _ask(page, "What is this recording?", False, 1)
        _ask(page, "And what comes after?", False, 2)  # the follow-up finds the recording on the same replica
        assert page.locator("#afn-chat [data-testid='bot']").count() >= 2
        page.locator("#afn-speak").click()  # the answer spoken: its Download link is a plain link, no header
        link = page.locator("#afn-spoken [data-testid='download-link']")
        link.wait_for(timeout=60_000)
        spoken = urllib.parse.urljoin(url, link.get_attribute("href"))
        browser.close()
    assert not errors, errors
    assert len(served) == 1 and None not in served, served  # every call of this browser went to one replica
    # The recording's audio is played by whichever replica the player's requests reach: all of them hold it.
    files = [u for u in media if "/gradio_api/file=" in u]
    assert files, media
    for played in (files[0], spoken):
        answered = set()
        for _ in range(12):
            with urllib.request.urlopen(played, timeout=30) as response:
                assert response.status == 200 and response.read(4) in (b"RIFF", b"fLaC"), played
                answered.add(response.headers[HEADER])
        assert len(answered) == 2, (played, answered)


def test_an_upload_is_never_served_as_a_page_by_any_replica(deployment):
    """Replicas share a folder so that any of them plays the WAV copies the others wrote; an upload
    (here a page named .html) is never among what they serve to anyone: no replica returns it inline as
    HTML (its own gives it as a download, the others refuse it)."""
    import httpx

    url, _ = deployment
    page = b"<!doctype html><script>document.title = 'stored XSS'</script>"
    sent = httpx.post(url + "gradio_api/upload", files={"files": ("evil.html", page, "text/html")}, timeout=30)
    assert sent.status_code == 200, sent.text
    (path,) = sent.json()
    answers = set()
    for _ in range(12):
        got = httpx.get(url + "gradio_api/file=" + path, timeout=30)
        answers.add((got.headers.get(HEADER), got.status_code))
        assert "html" not in got.headers.get("content-type", ""), (got.status_code, dict(got.headers))
        if got.status_code == 200:
            assert got.headers["content-disposition"].startswith("attachment")
    assert len({replica for replica, _ in answers} - {None}) == 2, answers


def test_a_replica_answers_only_the_apps_own_routes(deployment):
    """The app a replica serves is Gradio's inside an outer one: the outer adds no pages of its own
    (FastAPI's /docs and /redoc would answer outside the gate)."""
    import httpx

    url, _ = deployment
    for path in ("docs", "redoc"):
        got = httpx.get(url + path, timeout=30)
        assert got.status_code == 404 and got.headers[HEADER], (path, got.status_code)


def test_a_second_start_on_the_cluster_is_refused_and_leaves_the_first_serving(deployment):
    """Joining the deployment's cluster (at the address its log names) to start the app again, on its port
    or another: refused with a sentence, and the app already there goes on."""
    url, log = deployment
    port = int(url.rsplit(":", 1)[1].strip("/"))
    (cluster,) = re.findall(r"the Ray cluster is at (\S+)", log.read_text())
    for asked, words in ((port, "The app already runs on this Ray cluster"),
                         (free_port(), f"Ray Serve already runs on this cluster on port {port}")):
        result = _start("--replicas", "1", "--device", "cpu", "--address", cluster, "--port", str(asked), timeout=180,
                        RAY_ADDRESS="")
        assert result.returncode == 2 and words in result.stderr.strip().splitlines()[-1], result.stderr[-1500:]
    deadline = time.monotonic() + 30
    while len({replica_of(url, f"after-{i}") for i in range(16)}) < 2:  # both replicas still on the ring
        assert time.monotonic() < deadline, "the first app lost a replica"
        time.sleep(0.5)


def test_a_conversation_goes_on_when_its_replica_is_killed(deployment):
    url, log = deployment
    session = "conversation-killed"
    api, messages = client(url, session), [user("What is this?", None)]
    answer, _, first = turn(api, messages)
    messages += [{"role": "assistant", "content": answer}, user("And then?", None)]
    answer, usage, second = turn(api, messages)
    assert second == first and usage.prompt_tokens_details.cached_tokens > 0
    pids = dict(re.findall(r"replica (\w+) ready \(pid (\d+)", log.read_text()))  # the replicas' start-up lines
    os.kill(int(pids[first]), signal.SIGKILL)
    messages += [{"role": "assistant", "content": answer}, user("Go on.", None)]
    answer, usage, third = turn(api, messages)  # rebuilt from the request's history elsewhere
    assert answer is not None and third != first
    assert usage.prompt_tokens_details.cached_tokens == 0
    assert usage.prompt_tokens > 0


def _children(pid: int) -> dict[int, str]:
    """The processes `pid` started, by pid: their command lines."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found[int(stat.parent.name)] = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError, IndexError):  # gone meanwhile
            continue
    return found


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _descendants(pid: int) -> dict[int, str]:
    """Every process `pid` started, and those they started, by pid: their command lines (the replicas
    are the children of Ray's node process, not of the app)."""
    found, parents = {}, [pid]
    while parents:
        children = _children(parents.pop())
        found.update(children)
        parents += children
    return found


@pytest.mark.parametrize("flags, scale", [
    ((2, None, None), {"num_replicas": 2}),
    ((None, None, 4), {"autoscaling_config": {"min_replicas": 1, "initial_replicas": 1, "max_replicas": 4,
                                              "target_ongoing_requests": 32}}),
    ((3, 2, 5), {"autoscaling_config": {"min_replicas": 2, "initial_replicas": 3, "max_replicas": 5,
                                        "target_ongoing_requests": 32}}),
])
def test_scale_flags_become_serve_options(flags, scale):
    from app.replica import Scale

    assert Scale.of(*flags).deployment_options() == scale


@pytest.mark.parametrize("flags, sentence", [
    ((0, None, None), "--replicas must be at least 1 (given 0)."),
    ((None, 2, None), "--min-replicas needs --max-replicas (the most replicas to scale up to)."),
    ((None, 3, 2), "Replicas must satisfy 1 <= --min-replicas <= --replicas <= --max-replicas (given 3, 3, 2)."),
    ((5, 1, 4), "Replicas must satisfy 1 <= --min-replicas <= --replicas <= --max-replicas (given 1, 5, 4)."),
])
def test_bad_scale_flags_get_one_sentence(flags, sentence):
    from app.replica import Scale

    with pytest.raises(ValueError) as refused:
        Scale.of(*flags)
    assert str(refused.value) == sentence


def test_bad_replicas_flag_stops_the_app_with_its_sentence():
    result = subprocess.run([sys.executable, "-m", "app", "--replicas", "0"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1] == (
        "error: --replicas must be at least 1 (given 0)."), result.stderr[-800:]


def test_a_page_token_from_one_replica_opens_a_socket_on_another():
    from app.access import Access

    secret = b"s" * 32  # what every replica of one deployment is given (ReplicaOptions.page_secret)
    token, _ = Access("key", secret=secret).page_token()
    assert Access("key", secret=secret).token_ok(token)
    assert not Access("key").token_ok(token)  # a process of its own makes its own secret


def _start(*flags: str, timeout: int = 120, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "app", "--model", "unused", *flags], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1", **env})


def test_what_keeps_the_replicas_from_starting_is_one_sentence_at_once(tmp_path):
    """A taken port, a cluster that does not answer, a GPU named by number: each stops the start with its
    sentence before any Ray cluster starts (no traceback, no minute-long wait); from the command line,
    on stderr with status 2."""
    import socket

    from app.backend import BackendOptions
    from app.cluster import StartError
    from app.replica import ReplicaOptions, Scale
    from app.replicas import start

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = _start("--replicas", "2", "--port", str(port))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-800:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: Port {port} on 127.0.0.1 is in use by another program; start with another one, e.g. --port {port + 1}.")
    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        nowhere = f"127.0.0.1:{closed.getsockname()[1]}"
    for device, address, words in (("auto", nowhere, f"No Ray cluster answers at --address {nowhere}"),
                                   ("auto", "head-without-port", "--address takes auto or HOST:PORT"),
                                   ("cuda:1", None, "--device cuda:1 names one GPU")):
        options = ReplicaOptions(BackendOptions("unused", device=device), "127.0.0.1", None, str(tmp_path), 1.0, 1.0, 1)
        t0 = time.monotonic()
        with pytest.raises(StartError) as refused:
            start(options, Scale(2), port=free_port(), address=address)
        assert words in str(refused.value) and time.monotonic() - t0 < 30, (address, device)


def test_a_taken_port_on_a_cluster_joined_is_one_sentence_and_leaves_no_serve_behind(tmp_path):
    """Joining a cluster whose Serve is not started yet, on a port another program holds there: the
    sentence that names the port (no traceback), and Serve is not left on the cluster retrying that port
    (every later start on another port was refused: "Ray Serve already runs on this cluster on port …")."""
    import socket

    gcs, env = free_port(), dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
                                 PYTHONPATH=str(ROOT))
    head = subprocess.Popen([str(Path(sys.executable).parent / "ray"), "start", "--head", "--port", str(gcs),
                             "--num-cpus", "1", "--include-dashboard=false", "--block"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"127.0.0.1:{gcs}"
    try:
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            result = _start("--replicas", "1", "--device", "cpu", "--address", address, "--port", str(port),
                            timeout=180, RAY_AUTH_MODE="disabled", RAY_ADDRESS="")
        # Serve's proxy logs its own traceback (forwarded from its process); the app's code raises none.
        assert result.returncode == 2 and f'File "{ROOT / "app"}' not in result.stderr, result.stderr[-1500:]
        assert result.stderr.strip().splitlines()[-1] == (
            f"error: Port {port} on 127.0.0.1 is in use by another program; start with another one, e.g. "
            f"--port {port + 1}."), result.stderr[-1500:]
        probe = subprocess.run([sys.executable, "-c", "import ray; from app.cluster import serve_port; "
                                f"ray.init(address={address!r}, logging_level='ERROR'); print(serve_port())"],
                               cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert probe.stdout.strip().splitlines()[-1] == "None", (probe.stdout[-500:], probe.stderr[-1500:])
    finally:  # the whole cluster at once: `ray start --block` takes half a minute to stop it on SIGTERM
        os.killpg(head.pid, signal.SIGKILL)
        head.wait(60)


def test_each_replica_gets_the_most_cpus_that_still_place_them_all():
    from app.sizing import cpus_each

    assert cpus_each([(16.0, 0.0)], 2, gpus=False) == 8
    assert cpus_each([(2.0, 0.0)], 2, gpus=False) == 1
    assert cpus_each([(4.0, 0.0)] * 3, 4, gpus=False) == 2  # 2 on each of two machines
    assert cpus_each([(32.0, 4.0)], 4, gpus=True) == 8
    assert cpus_each([(32.0, 4.0), (8.0, 4.0)], 8, gpus=True) == 2  # the smaller machine holds 4 of 2 CPUs
    assert cpus_each([(1.0, 0.0)], 3, gpus=False) == 1  # fewer CPUs than replicas: one each, Ray's CPUs grow


def test_the_replicas_take_the_settings_the_app_was_started_with():
    from app.cluster import forwarded_env

    env = forwarded_env({"HF_HUB_OFFLINE": "1", "HF_HOME": "/models", "AFNEXT_DATA": "/data", "XDG_DATA_HOME": "/x",
                         "CUDA_VISIBLE_DEVICES": "0,1", "PATH": "/bin", "PYTHONPATH": "/extra", "HF_TOKEN": "hf_secret",
                         "XDG_RUNTIME_DIR": "/run/user/0", "AFNEXT_API_KEY": "k"})  # secrets: Ray's dashboard shows them
    assert env == {"HF_HUB_OFFLINE": "1", "HF_HOME": "/models", "AFNEXT_DATA": "/data", "XDG_DATA_HOME": "/x",
                   "PYTHONPATH": f"{ROOT}{os.pathsep}/extra"}  # Ray gives each replica its own GPUs


def test_a_killed_runs_shared_folder_is_removed_by_the_next(tmp_path):
    from app.cluster import sweep_shared
    from app.replica import SHARED_PREFIX

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    left, live, other = (tmp_path / f"{SHARED_PREFIX}{dead.stdout.strip()}-abcd", tmp_path / f"{SHARED_PREFIX}{os.getppid()}-ef01",
                         tmp_path / "afnext-replicas-notapid")
    outlived = tmp_path / f"{SHARED_PREFIX}{dead.stdout.strip()}-beef"  # its starter killed, a replica still up
    for folder in (left, live, other, outlived):
        (folder / "wav").mkdir(parents=True)
    (outlived / "wav" / f"afnext-app-{os.getpid()}").mkdir()
    (left / "wav" / f"afnext-app-{dead.stdout.strip()}").mkdir()
    sweep_shared(tmp_path)
    assert not left.exists() and live.exists() and other.exists() and outlived.exists()


def test_a_draining_replica_tells_a_realtime_socket_once_its_reply_is_over(monkeypatch):
    """Serve waits for a replica it removes until its sockets close: each is told (an `error` event, then
    the close 1001 with the same sentence) once its reply is over, never in the middle of it, and to the
    app its client has left. Until the replica drains, the socket is the client's and the app's alone."""
    import asyncio

    from app import replica

    monkeypatch.setattr(replica, "DRAIN_POLL_S", 0.01)
    draining, sent, heard = False, [], []

    async def run() -> list[dict]:
        nonlocal draining
        reply_over, client = asyncio.Event(), asyncio.Queue()

        async def realtime(scope, receive, send):  # a Realtime server giving one reply
            assert (await receive())["type"] == "websocket.connect"
            await send({"type": "websocket.accept"})
            heard.append(await receive())
            await send({"type": "websocket.send", "text": json.dumps({"type": "response.created", "event_id": "1"})})
            await reply_over.wait()
            await send({"type": "websocket.send", "text": json.dumps({"type": "response.done", "event_id": "2"})})
            heard.append(await receive())  # the client's next event, or its leaving
            await send({"type": "websocket.send", "text": "{}"})  # after the close: goes nowhere

        async def to_client(message):
            sent.append(message)

        for message in ({"type": "websocket.connect"}, {"type": "websocket.receive", "text": "hello"}):
            client.put_nowait(message)
        served = asyncio.ensure_future(replica.Drain(realtime, draining=lambda: draining)(
            {"type": "websocket", "path": "/v1/realtime"}, client.get, to_client))
        await asyncio.sleep(0.1)
        draining = True
        await asyncio.sleep(0.2)
        during = list(sent)  # the reply still running
        reply_over.set()
        await asyncio.wait_for(served, 5)
        return during

    during = asyncio.run(run())
    assert [m["type"] for m in during] == ["websocket.accept", "websocket.send"], during
    told = json.loads(sent[3]["text"])
    assert [json.loads(m["text"])["type"] for m in sent[1:4]] == ["response.created", "response.done", "error"]
    assert told["error"]["code"] == "replica_stopping" and told["error"]["message"] == replica.DRAINING
    assert sent[4:] == [{"type": "websocket.close", "code": 1001, "reason": replica.DRAINING}], sent
    assert heard == [{"type": "websocket.receive", "text": "hello"}, {"type": "websocket.disconnect", "code": 1001}]


def test_a_draining_replica_ends_the_pages_heartbeat_streams(monkeypatch):
    """A page keeps a heartbeat stream open on its replica as long as it is open; on a draining replica
    the stream ends (the browser opens it again, on a replica that stays) instead of keeping the replica
    to the end of the drain and being cut there."""
    import asyncio

    import gradio as gr
    import httpx
    from fastapi import FastAPI

    from app import replica

    monkeypatch.setattr(replica, "DRAIN_POLL_S", 0.01)
    with gr.Blocks() as page:
        gr.Markdown("A page.")
    served = replica.Drain(gr.mount_gradio_app(FastAPI(), page, "/"), draining=lambda: True)

    async def heartbeat():  # Gradio's stream sends ALIVE every 15 s until its server stops
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=served), base_url="http://replica") as http:
            return await asyncio.wait_for(http.get("/gradio_api/heartbeat/page-1"), 10)

    got = asyncio.run(heartbeat())
    assert got.status_code == 200 and got.text.startswith("data: ALIVE"), got.text[:200]


def _refusing_ray(monkeypatch) -> list:
    """ray.init made to raise StartedRay (and record its call): what reaches it has passed every check made
    before a cluster starts. The environment start() sets for Ray is put back afterwards."""
    import ray

    calls = []

    def init(**kwargs):
        calls.append(kwargs)
        raise StartedRay

    monkeypatch.setattr(ray, "init", init)
    for name in ("PYTHONPATH", "RAY_USAGE_STATS_ENABLED", "RAY_task_events_shutdown_flush_timeout_ms"):
        if name in os.environ:  # recorded as it is: start() changes it, the test's end puts it back
            monkeypatch.setenv(name, os.environ[name])
        else:
            monkeypatch.delenv(name, raising=False)
    return calls


class StartedRay(Exception):
    pass


def test_cpu_replicas_that_cannot_fit_in_memory_are_refused_before_ray_starts(tiny_dir, loaded, tmp_path,
                                                                            monkeypatch):
    """Each CPU replica loads its own copy of the model: as many as this machine's available memory holds
    start, more are refused with one sentence before any Ray cluster starts. Faked here: 4 GB available,
    and the tiny model's replica takes 0.6 GB (its process; 1.3 MB of weights)."""
    from app import sizing
    from app.backend import BackendOptions
    from app.cluster import StartError
    from app.replica import ReplicaOptions, Scale
    from app.replicas import start

    monkeypatch.setattr(sizing, "available_memory", lambda: 4 << 30)
    calls = _refusing_ray(monkeypatch)

    def options(model: str, device: str = "cpu") -> ReplicaOptions:
        return ReplicaOptions(BackendOptions(model, device=device), "127.0.0.1", None, str(tmp_path), 1.0, 1.0, 1)

    # Counted from the safetensors headers, without loading: the loaded model's own count.
    assert sizing.checkpoint_params(tiny_dir) == sum(p.numel() for p in loaded.model.parameters())
    for scale in (Scale(7), Scale(2, 1, 8)):  # --replicas 7; autoscaled up to 8
        with pytest.raises(StartError) as refused:
            start(options(str(tiny_dir)), scale, port=free_port())
        assert str(refused.value) == (
            f"This machine has 4.0 GB of memory available and each CPU replica of {tiny_dir} takes about 0.6 GB "
            "(its own copy of the model in float32, and its process): start at most 6 (--replicas / "
            "--max-replicas 6).")
    assert not calls, "refused before a Ray cluster started"
    for fits in (options(str(tiny_dir)), options("nvidia/not-downloaded-here")):  # 6 fit; a size unknown: no refusal
        with pytest.raises(StartedRay):
            start(fits, Scale(6), port=free_port())
    monkeypatch.setattr(sizing, "available_memory", lambda: 300 << 20)
    with pytest.raises(StartError) as refused:
        start(options(str(tiny_dir)), Scale(1), port=free_port())
    assert str(refused.value).endswith(": free some memory, or run it where there is more (or on GPUs).")


def test_too_many_cpu_replicas_for_the_memory_stop_the_app_with_its_sentence(tiny_dir):
    """Autoscaled up to 1000 tiny CPU replicas (0.6 GB each): refused at once, before a Ray cluster starts."""
    result = _start("--model", str(tiny_dir), "--device", "cpu", "--max-replicas", "1000", "--port", str(free_port()))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-800:]
    assert "the Ray cluster is at" not in result.stderr, "refused before a Ray cluster started"
    assert re.fullmatch(r"error: This machine has [\d.]+ GB of memory available and each CPU replica of \S+ takes "
                        r"about 0\.6 GB \(its own copy of the model in float32, and its process\): start at most "
                        r"(\d+) \(--replicas / --max-replicas \1\)\.", result.stderr.strip().splitlines()[-1]), \
        result.stderr[-800:]


def test_on_a_cluster_joined_replicas_beyond_its_memory_are_a_warning(tiny_dir, caplog):
    """Machines may join a cluster later: there, too little memory for the CPU replicas is said, not refused."""
    from app.backend import BackendOptions
    from app.replica import Scale
    from app.sizing import memory_warning

    with caplog.at_level("WARNING", logger="app.sizing"):
        memory_warning(BackendOptions(str(tiny_dir)), Scale(8), cluster_bytes=16 << 30)
        assert not caplog.records
        memory_warning(BackendOptions(str(tiny_dir)), Scale(2, 1, 64), cluster_bytes=16 << 30)
    assert [r.getMessage() for r in caplog.records] == [
        f"The Ray cluster has 16.0 GB of memory for tasks now and each CPU replica of {tiny_dir} takes about "
        "0.6 GB: 64 replicas may run out of memory unless more machines join."]


def test_the_app_exits_with_a_sentence_when_the_ray_cluster_it_started_dies(deployment):
    """The cluster's node process killed (the kernel's OOM killer picks such processes): every replica and
    Serve's proxy go with it. The app says so and exits with status 1, so a supervisor restarts it, instead
    of running on with nothing serving its port. Last in the module: it ends the deployment the others share."""
    (url, log), proc = deployment, deployment.proc
    port = urllib.parse.urlsplit(url).port
    cluster = _children(proc.pid)  # Ray's processes: its node's, its control store, its agents
    (raylet,) = [pid for pid, command in cluster.items() if "raylet/raylet" in command]
    deployment.cluster_killed = True
    os.kill(raylet, signal.SIGKILL)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the app ran on without its cluster:\n{log.read_text()[-2000:]}") from None
    said = [line for line in log.read_text().splitlines() if line.startswith("error: ")]
    assert proc.returncode == 1 and said == [
        "error: The Ray cluster this app started has stopped (its raylet process exited: was it killed, "
        f"e.g. for lack of memory?), and the replicas with it; nothing serves port {port} now: start the "
        "app again."], log.read_text()[-2000:]
    deadline = time.monotonic() + 30
    while left := [c for pid, c in cluster.items() if _running(pid)]:
        assert time.monotonic() < deadline, f"left running: {left}"
        time.sleep(0.5)
