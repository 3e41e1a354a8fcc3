"""A web app in a child process, for tests: started, awaited on its /health (never on a log line), stopped."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 180.0  # a loaded 2-core machine takes seconds to import gradio and torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def raw_upload(url: str, headers: str, body: bytes = b"") -> socket.socket:
    """A socket that has sent, by hand, an upload request to the server at `url` (http://host:port/):
    the request line, Host and a multipart Content-Type, then `headers` (lines ending in CRLF) and
    `body`. For what HTTP clients will not send: a length the body never reaches, both a length and
    chunked encoding."""
    host, port = url.removeprefix("http://").rstrip("/").split(":")
    s = socket.create_connection((host, int(port)), timeout=30)
    s.sendall(f"POST /gradio_api/upload HTTP/1.1\r\nHost: {host}\r\nContent-Type: multipart/form-data; "
              f"boundary=x\r\n{headers}\r\n".encode() + body)
    return s


def health(url: str) -> tuple[int, dict] | None:
    """(status, body) of GET /health, or None while nothing answers."""
    try:
        with urllib.request.urlopen(url + "health", timeout=5) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:  # Ray Serve's proxy says 404 in plain text until the app is deployed
        text = error.read().decode(errors="replace")
        try:
            return error.code, json.loads(text)
        except ValueError:
            return error.code, {"text": text[:200]}
    except OSError:
        return None


@contextmanager
def running(args: list[str], log: Path, *, ready: bool = True, env: dict | None = None):
    """Run `python ARGS` (e.g. ["-m", "app", "--port", P]) and yield (process, base URL) once its
    /health answers 200 (or answers at all, with `ready=False`); stop it afterwards."""
    port = args[args.index("--port") + 1]
    url = f"http://127.0.0.1:{port}/"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while (answer := health(url)) is None or (ready and answer[0] != 200):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the app did not become healthy ({answer}):\n{log.read_text()[-3000:]}")
            time.sleep(0.1)
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
