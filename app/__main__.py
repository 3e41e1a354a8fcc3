"""`python -m app`: the web app — talk with the assistant, or ask it about a long recording.

    python -m app [--model M] [--think-model M] [--host H] [--port P] [--share] [--api-key K]
                  [--device auto|cpu|cuda] [--tts espeak|pocket] [--tts-model V] [--data DIR] [--keep-days N]
                  [--replicas N [--address A] [--min-replicas N --max-replicas N]]

Besides the page it serves an OpenAI-compatible API on the same port: GET /v1/models,
POST /v1/chat/completions (audio in with input_audio; streamed or whole), and GET /health.
With --replicas N it runs as N engine replicas on Ray Serve behind the same port (app/replicas.py).

If a model cannot be loaded (no network and not cached), the app still starts, with the offline demo
model (random weights) and the espeak voice, and the page says so at the top.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from functools import partial
from pathlib import Path

if __package__ in (None, ""):  # run as a file (Hugging Face Spaces runs `python app/__main__.py`)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from afnext import check_setup  # noqa: E402

check_setup()  # before anything imports torch: a missing one is a sentence saying how to get it

from afnext.cli import KEEP_DAYS, add_model_flags, add_tts_flags, keep_days  # noqa: E402
from app.access import EMPTY_KEY  # noqa: E402
from app.backend import BackendLoader, BackendOptions, start_backend  # noqa: E402
from app.guard import REQUEST_BURST, REQUESTS_PER_S  # noqa: E402
from app.history import MAX_HISTORY_GB  # noqa: E402


def port(text: str) -> int:
    """The --port value (or $GRADIO_SERVER_PORT): a TCP port, 1 to 65535."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port; give a number from 1 to 65535 (say 7860)")
    return value


def requests_per_second(text: str) -> float:
    """The --requests-per-second value: a number of requests a second, more than 0."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of requests a second above 0 (say 5 or 50)")
    return value


def api_key(text: str) -> str:
    """The --api-key value (or $AFNEXT_API_KEY): a key clients can send. An empty one (`AFNEXT_API_KEY=` in
    an env file) would match a request with no key at all, and one with spaces around it none at all."""
    if not text.strip():
        raise argparse.ArgumentTypeError(EMPTY_KEY)
    if text != text.strip():
        raise argparse.ArgumentTypeError("the API key starts or ends with a space, which no client could send; "
                                         "check --api-key and $AFNEXT_API_KEY")
    return text


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m app", description=__doc__.splitlines()[0])
    add_model_flags(p, model_default="instruct")
    p.add_argument("--think-model", default=None,
                   help="a second checkpoint for Think mode (e.g. think); by default Think mode uses --model")
    # Spaces and Docker set GRADIO_SERVER_NAME/PORT; by default the app is reachable from this computer only.
    p.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    p.add_argument("--port", type=port, default=os.environ.get("GRADIO_SERVER_PORT", "7860"))
    p.add_argument("--share", action="store_true", help="also serve through a public gradio.live https link")
    add_tts_flags(p)
    p.add_argument("--api-key", type=api_key, default=os.environ.get("AFNEXT_API_KEY"),
                   help="require this key (Authorization: Bearer KEY) on the /v1 API; default $AFNEXT_API_KEY")
    p.add_argument("--data", default=None,
                   help="the folder conversations and recordings are kept in (default: $AFNEXT_DATA, or "
                        "~/.local/share/afnext; on a Hugging Face Space its persistent storage, /data)")
    p.add_argument("--keep-days", type=keep_days, default=KEEP_DAYS,
                   help=f"delete conversations and recordings unused for this many days (default {KEEP_DAYS:g})")
    p.add_argument("--max-history-gb", type=float, default=MAX_HISTORY_GB,
                   help=f"audio the history may hold (default {MAX_HISTORY_GB:g} GB); beyond it the conversations "
                        "least recently used are deleted first")
    p.add_argument("--upload-quota-gb", type=float, default=4.0,
                   help="disk space uploads may take at once (GB); more are refused until some are freed")
    p.add_argument("--requests-per-second", type=requests_per_second, default=REQUESTS_PER_S,
                   help=f"requests one client address may make a second, after a burst of {REQUEST_BURST} "
                        f"(default {REQUESTS_PER_S:g}; raise it for an agent making many API calls)")
    scale = p.add_argument_group("several replicas (Ray Serve: bash scripts/setup.sh requirements-serve.txt)")
    scale.add_argument("--replicas", type=int, default=None,
                       help="serve with N engine replicas behind this port (one GPU each; CPU ones without GPUs)")
    scale.add_argument("--address", default=None,
                       help="join the Ray cluster at this address (e.g. auto, or HEAD_IP:6379) instead of starting one")
    scale.add_argument("--min-replicas", type=int, default=None, help="autoscale down to this many (needs --max-replicas)")
    scale.add_argument("--max-replicas", type=int, default=None,
                       help="autoscale up to this many on ongoing requests (down to --min-replicas, default 1)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # The model loads on its own thread while the page is served: a real checkpoint takes minutes.
    options = BackendOptions(args.model, args.think_model, args.device, args.tts, args.tts_model, args.kv)
    if args.api_key is None and (args.share or args.host not in ("127.0.0.1", "localhost", "::1")):
        logging.getLogger("app").warning("The /v1 API listens beyond this computer without a key: anyone who can "
                                         "reach %s can use it. Start with --api-key KEY to require one.", args.host)
    if args.replicas is not None or args.min_replicas is not None or args.max_replicas is not None \
            or args.address is not None:
        return _replicas(args, options)
    from app.cluster import StartError, port_free
    from app.web import PortBusy, cannot_serve, launch

    try:  # before the model loads (minutes for a real checkpoint), which a taken port would only end after
        port_free(args.host, args.port)
    except StartError as exc:
        _fail(str(exc))
    loader = BackendLoader(partial(start_backend, options), args.model)

    try:
        launch(loader, host=args.host, port=args.port, share=args.share,
               upload_quota_bytes=int(args.upload_quota_gb * (1 << 30)), api_key=args.api_key, data=args.data,
               keep_days=args.keep_days, max_history_gb=args.max_history_gb, requests_per_s=args.requests_per_second)
    except PortBusy as exc:
        _fail(str(exc))
    except OSError as exc:  # an address this machine does not have, a port it may not use
        _fail(cannot_serve(args.host, args.port, exc))
    return 0


def _replicas(args: argparse.Namespace, options: BackendOptions) -> int:
    """The app on Ray Serve replicas (app/replicas.py)."""
    from app import replicas
    from app.replica import ReplicaOptions, Scale

    replicas.require_ray()
    if args.share:
        _fail("--share serves one process through Gradio's link; with --replicas put the port behind your own proxy.")
    try:
        scale = Scale.of(args.replicas, args.min_replicas, args.max_replicas)
    except ValueError as exc:
        _fail(str(exc))
    served = ReplicaOptions(options, args.host, args.api_key, args.data, args.keep_days, args.max_history_gb,
                            int(args.upload_quota_gb * (1 << 30)), args.requests_per_second)
    return replicas.serve_replicas(served, scale, port=args.port, address=args.address)


def _fail(message: str) -> None:
    """Say why the app cannot start and exit at once: the model may be loading on its thread, and an
    interpreter shutting down under a running torch thread aborts ("terminate called…", exit -6)."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    logging.shutdown()
    os._exit(2)


if __name__ == "__main__":
    sys.exit(main())
