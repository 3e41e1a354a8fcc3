"""The Gradio 6 page: a Talk tab (OpenAI Realtime over the server's own `/v1/realtime`) and a Recordings
tab (questions about long recordings, Think steps on our waveform; app/recordings_tab.py), plus the
`ask_recording` API; the `Site` one process serves (the page with its routes and gate), and serving it.

Each browser has its own conversations, kept in the store (app/history.py) under its owner token
(app/static/owner.js keeps it in the browser): the Recordings tab's, held live by conversation id in
a `Live` registry and reopened from the store when needed, and the Talk tab's, on its own Realtime
socket (app/realtime.py). GPU work from the page's events goes
through Gradio's queue with a concurrency limit, so a waiting user sees their place in the queue.

Public-server rules (app/guard.py holds the HTTP side): only `ask_recording` is an API endpoint (the
page's own events are private), files come only as uploads to this process's own folder, which is
emptied as recordings close and swept of stale uploads, and `/health` says whether the model is ready.
"""

import errno
import logging
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import gradio as gr
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute

from afnext.audio import MAX_FILE_BYTES
from afnext.cli import KEEP_DAYS
from afnext.live import Live
from afnext.store import Store

from . import realtime, recording_questions
from .access import TOKEN_ROUTE, Access, origin_allowed
from .api import Api
from .realtime import RealtimeServer
from .backend import BackendLoader, BackendUnavailable
from .guard import REQUESTS_PER_S, UPLOAD_QUOTA_BYTES, Guard, GuardOptions
from .desk import Files, live_conversations, release_memory
from .history import MAX_HISTORY_GB, HistoryRoutes, open_store, prune_every
from .recording_questions import USER_ERRORS
from .recordings_tab import ASSETS, GPU_CONCURRENCY, STATIC, RecordingsTab, on_gpu, static_js

log = logging.getLogger(__name__)

PUBLIC_API = frozenset({"ask_recording"})  # the endpoints the README documents; every other event is private
QUEUE_MAX = 64  # questions waiting at once; more get Gradio's "queue is full" at once, not after hours
UPLOAD_SWEEP_S, UPLOAD_MAX_AGE_S = 600, 3600  # every 10 min, uploads no recording holds that are 1 h old go
# Uvicorn lets each WebSocket buffer 32 messages of 16 MiB before a handler reads one (measured: 4 clients
# sending 16 MiB frames took the server up by 2 GB); a Realtime event is at most a 30 s clip.
WS_MAX_MESSAGE_BYTES, WS_MAX_QUEUE = realtime.MAX_MESSAGE_BYTES, realtime.WS_MAX_QUEUE
CSS = """
#afn-banner { font-size: .92em; }
#afn-status { min-height: 1.6em; }
/* The chat's Clear button: the one before Copy conversation, the last, in its toolbar (after Share on a
   Space; see `RecordingsTab.build`). Its label is in the browser's language, so it is found by place. */
#afn-chat .icon-button-wrapper.top-panel > button:nth-last-of-type(2) { display: none; }
/* A phone's width: the question and Think take a line of their own (Think under the question), the
   buttons share the next. (Gradio wraps the row's two form fields in one .form block.) */
@media (max-width: 640px) {
  #afn-ask-row { flex-wrap: wrap; }
  #afn-ask-row > .form { flex: 1 1 100%; min-width: 100%; flex-wrap: wrap; }
  #afn-ask-row > .form > * { flex: 1 1 100%; min-width: 100%; }
  #afn-ask-row > button { flex: 1 1 40%; min-width: 0; }
}
"""


# Before the page's own scripts: the owner token, the affinity header that keeps a browser on one replica, and
# the Recordings tab's helpers.
HEAD = "".join(f"<script>{(STATIC / name).read_text(encoding='utf-8')}</script>"
               for name in ("owner.js", "affinity.js", "recordings.js"))


def build(loader: BackendLoader, cache_dir: Path, store: Store | None = None, live: Live | None = None,
          keep_days: float = KEEP_DAYS) -> "tuple[gr.Blocks, RecordingsTab]":
    """The page, and its Recordings tab (which holds the live recordings). `cache_dir` holds the
    files the page plays recordings from; `store` keeps conversations (None: nothing is kept)."""
    with gr.Blocks(title="AF-Next voice assistant", delete_cache=(UPLOAD_SWEEP_S, UPLOAD_MAX_AGE_S)) as demo:
        gr.Markdown("## AF-Next voice assistant\nTalk with Audio Flamingo Next, or ask it about a recording.")
        notice = gr.Markdown(loader.banner(), elem_id="afn-banner")
        poll = gr.Timer(1.0, active=not loader.ready)  # until the model is loaded
        poll.tick(lambda: (loader.banner(), gr.Timer(active=not loader.ready)), None, [notice, poll],
                  show_progress="hidden", queue=False, api_visibility="private")
        demo.load(loader.banner, None, notice, queue=False, api_visibility="private")
        with gr.Tabs():
            with gr.Tab("Talk", id="talk"):
                gr.Markdown("Press **Start**, speak, and pause: the assistant hears the end of your turn, answers "
                            "in text and voice, and stops when you speak over it.")
                gr.HTML(html_template='<div class="afn-talk"></div>', js_on_load=static_js("talk.js"), elem_id="afn-talk")
            with gr.Tab("Recordings", id="recordings"):
                tab = RecordingsTab(loader, cache_dir, store, live, keep_days)
                tab.build(demo)
        _api(loader, tab.files)
    return demo, tab


def _api(loader: BackendLoader, files: Files) -> None:
    """`ask_recording(audio, question, think) → answer`: one question about one file, no session kept."""
    with gr.Row(visible=False):
        audio = gr.File(type="filepath", label="audio")
        question, think = gr.Textbox(label="question"), gr.Checkbox(label="think")
        answer = gr.Textbox(label="answer")
        button = gr.Button("ask_recording")
    button.click(on_gpu(partial(_answer_api, loader=loader, files=files)), [audio, question, think], answer,
                 api_name="ask_recording", concurrency_id="gpu", concurrency_limit=GPU_CONCURRENCY)


def _answer_api(audio: str | None, question: str, think: bool, loader: BackendLoader, files: Files) -> str:
    # An upload serves one call: deleted after it, unless an open recording uses the same file.
    claim = [audio] if audio and _is_upload(audio) else []
    files.claim(claim)
    try:
        return recording_questions.answer_once(loader.wait(), audio, question or "", bool(think))
    except USER_ERRORS as exc:
        log.info("ask_recording refused: %s", exc)
        raise gr.Error(str(exc), print_exception=False) from None
    finally:
        files.release(claim)
        release_memory()  # its audio and KV cache: up to hundreds of MB for 30 minutes


def _is_upload(path: str) -> bool:
    return Path(path).resolve().is_relative_to(Path(gr.utils.get_upload_folder()).resolve())


class PortBusy(OSError):
    """The port is taken; the message names --port."""


def port_busy(host: str, port: int) -> str:
    """What a user is told when `port` is taken (one process or replicas)."""
    return f"Port {port} on {host} is in use by another program; start with another one, e.g. --port {port + 1}."


def cannot_serve(host: str, port: int, exc: OSError) -> str:
    """What a user is told when `host`:`port` cannot be served for another reason (an address this
    machine does not have, a port it may not use)."""
    return f"The app could not serve on {host}:{port} ({exc.strerror or exc}); check --host and --port."


@dataclass
class Site:
    """Everything one process serves, built but not yet served: the page (Gradio), its routes and gate
    (`app_kwargs`), and the page's settings Gradio takes when it launches or mounts it (`page`)."""

    demo: gr.Blocks
    app_kwargs: dict
    page: dict
    voice: RealtimeServer
    folders: list[Path]  # this process's own: removed when it stops

    def close(self) -> None:
        self.voice.shutdown()  # cancel the voice turns still running before the process ends
        for folder in self.folders:
            shutil.rmtree(folder, ignore_errors=True)


def assemble(loader: BackendLoader, *, host: str = "127.0.0.1", upload_quota_bytes: int = UPLOAD_QUOTA_BYTES,
             api_key: str | None = None, data: str | None = None, keep_days: float = KEEP_DAYS,
             max_history_gb: float = MAX_HISTORY_GB, page_secret: bytes | None = None,
             extra_middleware: list[Middleware] = (), shared_root: Path | None = None,
             requests_per_s: float = REQUESTS_PER_S) -> Site:
    """The page, the OpenAI API and Realtime voice socket (/v1, with `api_key` if given) and /health;
    conversations are kept in the store in `data` (app/history.py says where by default) for `keep_days`
    after their last use, within `max_history_gb` of audio. `page_secret` signs the page's socket
    tokens (replicas share one, app/replica.py; by default each process makes its own). `shared_root`:
    the folder this process's own folders go in — uploads in `uploads/`, the WAV copies it writes in
    `wav/` — and whose `wav/` it serves to anyone: replicas on one machine share one, so a recording one
    of them took is played by any of them (a browser's media requests carry no header to route them by).
    Uploads are never served from there: Gradio sends a served file inline with the type its name says,
    so a shared upload named .html would be a page on this origin."""
    store, notice = open_store(data, max_history_gb)
    if notice:
        loader.notices.append(notice)
    threading.Thread(target=prune_every, args=(store, keep_days), name="afnext-prune", daemon=True).start()
    if shared_root is None:
        workdir = _workdir()
        uploads, cache_dir, folders, played = workdir / "uploads", workdir / "wav", [workdir], workdir / "wav"
        cache_dir.mkdir()
    else:
        uploads, cache_dir = _workdir(shared_root / "uploads"), _workdir(shared_root / "wav")
        folders, played = [uploads, cache_dir], shared_root / "wav"
    # Gradio reads its upload folder from here when it builds components and routes: ours alone,
    # so no other Gradio app's uploads on this machine count as uploads to this one.
    os.environ["GRADIO_TEMP_DIR"] = str(uploads)
    live = live_conversations()  # recordings and voice chats alike: one owner of their lifetime and memory
    demo, tab = build(loader, cache_dir, store, live, keep_days=keep_days)
    demo.queue(default_concurrency_limit=GPU_CONCURRENCY, max_size=QUEUE_MAX)
    access = Access(api_key, local=host in ("127.0.0.1", "localhost", "::1"), secret=page_secret)
    gate = GuardOptions(upload_dir=uploads, public_api=PUBLIC_API, max_file_bytes=MAX_FILE_BYTES,
                        quota_bytes=upload_quota_bytes, rate_per_s=requests_per_s, host_ok=access.host_ok)
    voice = RealtimeServer(loader, access, store, live)
    threading.Thread(target=live.sweep_every, name="afnext-live-sweep", daemon=True).start()
    # Our routes and the gate go in when Gradio builds its FastAPI app, so they answer from the first request.
    app_kwargs = {"middleware": [*extra_middleware, Middleware(Guard, options=gate)],
                  "routes": [Route("/health", _health(loader)), Route(TOKEN_ROUTE, _page_token(access)),
                             WebSocketRoute(realtime.ROUTE, voice.__call__),
                             *Api(loader, access).routes(), *HistoryRoutes(store, access, live).routes()]}
    page = {"css": CSS, "head": HEAD, "max_file_size": MAX_FILE_BYTES, "allowed_paths": [str(ASSETS), str(played)],
            "ssr_mode": False, "footer_links": ["api", "gradio"]}
    return Site(demo, app_kwargs, page, voice, folders)


def launch(loader: BackendLoader, *, host: str = "127.0.0.1", port: int = 7860, share: bool = False,
           block: bool = True, **options) -> gr.Blocks:
    """Serve `assemble(loader, host=host, **options)` on `host`:`port` with Gradio's own server.
    Blocks until Ctrl-C unless `block` is False. Raises PortBusy when `port` is taken."""
    started = time.perf_counter()
    site = assemble(loader, host=host, **options)
    demo = site.demo
    trust_proxies(share)
    try:
        # Gradio's own lines only with --share (its public link): without, it would tell the user to "set
        # `share=True` in `launch()`", which is not this app's flag; the log's "serving URL" line says where.
        demo.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=True, quiet=not share,
                    app_kwargs=site.app_kwargs, **site.page)
    except OSError as exc:
        site.close()
        if exc.errno == errno.EADDRINUSE or "Cannot find empty port" in str(exc):  # Gradio's words for it
            raise PortBusy(port_busy(host, port)) from exc
        raise
    # Read by each new connection's protocol: in force before a page can connect.
    demo.server.config.ws_max_size, demo.server.config.ws_max_queue = WS_MAX_MESSAGE_BYTES, WS_MAX_QUEUE
    log.info("serving %s, %.2f s after launch (the model %s; %s)", demo.local_url, time.perf_counter() - started,
             "is ready" if loader.ready else "is still loading", server_stack(demo.server.config))
    if block:
        try:
            demo.block_thread()
        finally:
            site.close()
    return demo


def trust_proxies(share: bool) -> None:
    """Which peers' X-Forwarded-For uvicorn believes, read when Gradio makes its server: those named in
    FORWARDED_ALLOW_IPS, and none by default. Uvicorn's own default believes any peer on 127.0.0.1, so a
    client arriving through a loopback hop (an SSH tunnel, a script on this machine) could name any
    address in the header and get a fresh share of every per-address limit with each. With --share the
    visitors come through Gradio's tunnel client on 127.0.0.1 and its relay adds each one's address:
    loopback is believed then, or all of them would share one address's limits."""
    os.environ.setdefault("FORWARDED_ALLOW_IPS", "127.0.0.1,::1" if share else "")


def asgi_app(site: Site):
    """`site` as an ASGI app for a server other than Gradio's own (Ray Serve's proxy, app/replica.py)."""
    from fastapi import FastAPI

    # The outer app only carries Gradio's: its own /docs, /redoc and /openapi.json would answer outside
    # the gate (Gradio's app, which the gate guards, turns them off too).
    outer = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    return gr.mount_gradio_app(outer, site.demo, "/", app_kwargs=site.app_kwargs, **site.page)


def server_stack(config) -> str:
    """Which event loop and HTTP parser uvicorn chose: uvloop and httptools where they are installed (the
    serve extra brings them), else asyncio's loop and h11 (for a log line: a difference seen under load
    starts with which of them ran)."""
    factory = config.get_loop_factory()
    loop = "uvloop" if factory is not None and factory.__module__.startswith("uvloop") else "asyncio"
    http = "httptools" if "httptools" in config.http_protocol_class.__module__ else "h11"
    return f"event loop {loop}, HTTP parser {http}"


def _health(loader: BackendLoader):
    """GET /health: 200 once the model is ready, 503 with the reason while it loads or if it failed."""
    async def health(_request: Request) -> JSONResponse:
        if not loader.ready:
            return JSONResponse({"status": "loading", "reason": f"{loader.name} is still loading."}, 503)
        try:
            backend = loader.wait(0)
        except BackendUnavailable as exc:
            return JSONResponse({"status": "failed", "reason": str(exc)}, 503)
        return JSONResponse({"status": "ready", "model": backend.describe()})
    return health


def _page_token(access: Access):
    """GET /afnext/token: a short-lived token that opens the page's Realtime socket without the API key.
    Other sites' pages get none, and their sockets fail the Origin check. (Gradio's CORS middleware lets
    any site's page read any answer of a server reached by a name other than localhost; a browser's
    own page asks without an Origin header, or with its own site's.)"""
    async def token(request: Request) -> JSONResponse:  # the gate has checked Host (app/guard.py)
        if not origin_allowed(request.headers, access.allowed):
            return JSONResponse({"error": "The page's token is for the app's own page; other sites' pages get none."},
                                403, headers={"Cache-Control": "no-store"})
        value, expires = access.page_token()
        return JSONResponse({"token": value, "expires_at": expires}, headers={"Cache-Control": "no-store"})
    return token


def _workdir(base: Path | None = None) -> Path:
    """This process's own folder for uploads and WAV copies (in `base`, by default the temporary folder),
    removed when it stops; folders left by processes that died (a crash, kill -9) are removed here, so
    uploads never pile up across restarts."""
    base = base or Path(tempfile.gettempdir())
    base.mkdir(mode=0o700, parents=True, exist_ok=True)
    for stale in base.glob("afnext-app-*"):
        pid = stale.name.removeprefix("afnext-app-")
        if pid.isdigit() and not alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    folder = base / f"afnext-app-{os.getpid()}"
    shutil.rmtree(folder, ignore_errors=True)  # a dead process's, with our recycled pid
    folder.mkdir(mode=0o700)
    return folder


def alive(pid: int) -> bool:
    """Whether process `pid` runs on this machine (a folder named after it is still in use)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True
