"""RSS of the Realtime server under oversized client messages (a measurement, not a test).

    python bench/realtime_flood_memory.py            # uvicorn capped as `python -m app` caps it
    python bench/realtime_flood_memory.py uncapped   # uvicorn's defaults (16 MiB frames, 32 queued)

Starts uvicorn on 127.0.0.1 with /v1/realtime alone (tiny random model, espeak) in a child process,
warms it with one normal session, then CLIENTS clients each send MESSAGES text messages of
MESSAGE_BYTES after session.created; prints the server's RSS before, its peak (VmHWM), and after.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

CLIENTS, MESSAGES, MESSAGE_BYTES = 4, 50, 16 << 20  # 16 MiB: uvicorn's default ws_max_size lets it through


def serve(port: int) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import uvicorn
    from starlette.applications import Starlette
    from starlette.routing import WebSocketRoute

    from afnext.engine import Engine
    from afnext.model import ensure_tiny, load
    from afnext.tts import load_synthesizer
    from app import realtime
    from app.backend import Backend, BackendLoader

    engine = Engine(load(str(ensure_tiny()), device="cpu"))
    server = realtime.RealtimeServer(BackendLoader.ready_made(Backend(engine, engine, load_synthesizer("espeak"))))
    app = Starlette(routes=[WebSocketRoute(realtime.ROUTE, server.__call__)])
    from app.web import WS_MAX_MESSAGE_BYTES, WS_MAX_QUEUE

    caps = {} if os.environ.get("UNCAPPED") else dict(ws_max_size=WS_MAX_MESSAGE_BYTES, ws_max_queue=WS_MAX_QUEUE)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="error", **caps)


def rss(pid: int) -> dict[str, int]:
    fields = {}
    for line in open(f"/proc/{pid}/status"):
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) // 1024  # MiB
    return fields


def flood(url: str, results: list) -> None:
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    payload = "x" * MESSAGE_BYTES
    with connect(url, max_size=None) as ws:
        assert json.loads(ws.recv())["type"] == "session.created"
        sent, answer = 0, None
        try:
            for _ in range(MESSAGES):
                ws.send(payload)
                sent += 1
            answer = ws.recv(timeout=30)
        except (ConnectionClosed, TimeoutError) as exc:
            answer = answer or repr(exc)[:160]
        results.append((sent, answer))


def main() -> None:
    if sys.argv[1:2] == ["serve"]:
        serve(int(sys.argv[2]))
        return
    if sys.argv[1:] not in ([], ["uncapped"]):  # -h, --help, or anything else: what it takes
        print(__doc__.strip().split("\n\n")[1] if sys.argv[1] in ("-h", "--help") else
              f"usage: python {sys.argv[0]} [uncapped] ({sys.argv[1]!r} is not an option)", file=sys.stderr)
        sys.exit(0 if sys.argv[1] in ("-h", "--help") else 2)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "AFNEXT_TINY_DIR": os.path.join(tempfile.gettempdir(), "afnext-tiny-rss")}
    if sys.argv[1:2] == ["uncapped"]:
        env["UNCAPPED"] = "1"
    server = subprocess.Popen([sys.executable, __file__, "serve", str(port)], env=env)
    try:
        from websockets.sync.client import connect

        url = f"ws://127.0.0.1:{port}/v1/realtime?model=instruct"
        for _ in range(600):
            try:
                with connect(url) as ws:
                    assert json.loads(ws.recv())["type"] == "session.created"
                break
            except OSError:
                time.sleep(0.1)
        time.sleep(1.0)
        before = rss(server.pid)
        results: list = []
        threads = [threading.Thread(target=flood, args=(url, results)) for _ in range(CLIENTS)]
        started = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        took = time.monotonic() - started
        time.sleep(2.0)
        after = rss(server.pid)
        print(f"{CLIENTS} clients x {MESSAGES} x {MESSAGE_BYTES >> 20} MiB in {took:.1f} s")
        for sent, answer in results:
            print(f"  sent {sent}, server said: {answer!s:.160}")
        print(f"server RSS before {before['VmRSS']} MiB (peak so far {before['VmHWM']}), peak {after['VmHWM']} MiB, after {after['VmRSS']} MiB "
              f"(peak growth {after['VmHWM'] - before['VmRSS']} MiB)")
        print(json.dumps({"uvicorn": "uncapped" if "UNCAPPED" in env else "capped", "clients": CLIENTS,
                          "message_mib": MESSAGE_BYTES >> 20, "rss_before_mib": before["VmRSS"],
                          "rss_peak_mib": after["VmHWM"], "rss_after_mib": after["VmRSS"]}))
    finally:
        server.terminate()
        server.wait(30)


if __name__ == "__main__":
    main()
