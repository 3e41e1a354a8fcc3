"""`python -m tests.web.server --port P`: the web app as the browser tests see it.

The tiny random-weight model answers Talk and plain questions; Think mode goes to a
`ScriptedEngine` over the same model, so its replies carry timestamped steps. The banner says so.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from functools import partial

from afnext.engine import Engine
from afnext.model import load
from afnext.tts import load_synthesizer
from app.backend import Backend, BackendLoader
from app.guard import UPLOAD_QUOTA_BYTES
from app.web import launch

from .scripted import ScriptedEngine


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--upload-quota-bytes", type=int, default=UPLOAD_QUOTA_BYTES)
    p.add_argument("--step-delay-s", type=float, default=0.0, help="slow the scripted engine's steps down")
    p.add_argument("--api-key", default=None, help="protect /v1 with this key (the page must do without it)")
    p.add_argument("--data", default=None, help="the store's folder (default: a new temporary one)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    launch(BackendLoader(partial(backend, args.step_delay_s), "tiny"), host="127.0.0.1", port=args.port,
           upload_quota_bytes=args.upload_quota_bytes, api_key=args.api_key,
           data=args.data or tempfile.mkdtemp(prefix="afnext-test-store-"))


def backend(step_delay_s: float = 0.0) -> Backend:
    loaded = load("tiny", device="cpu")
    notice = "Browser-test server: Think mode answers from a fixed script (tests/web/scripted.py)."
    return Backend(Engine(loaded), ScriptedEngine(loaded, step_delay_s=step_delay_s), load_synthesizer("espeak"), [notice])


if __name__ == "__main__":
    main()
