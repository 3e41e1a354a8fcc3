"""The Gradio 6 page: a Talk tab (OpenAI Realtime over the server's own `/v1/realtime`) and a Recordings
tab (questions about long recordings, Think steps on our waveform), plus the `ask_recording` API.

Each browser session has its own conversations: the Recordings tab's on the `Desk` by Gradio session,
the Talk tab's on its own Realtime socket (app/realtime.py). GPU work from the page's events goes
through Gradio's queue with a concurrency limit, so a waiting user sees their place in the queue.

Public-server rules (app/guard.py holds the HTTP side): only `ask_recording` is an API endpoint (the
page's own events are private), files come only as uploads to this process's own folder, which is
emptied as recordings close and swept of stale uploads, and `/health` says whether the model is ready.
"""

# No `from __future__ import annotations`: Gradio finds `gr.Request` parameters by their type hints, which
# must stay objects to survive wrappers such as spaces.GPU.

import errno
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import gradio as gr
import numpy as np
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute

from afnext.audio import MAX_FILE_BYTES
from afnext.events import AudioChunk
from afnext.session import MAX_TEXT_CHARS

from . import realtime, recordings
from .access import TOKEN_ROUTE, Access
from .api import Api
from .realtime import RealtimeServer
from .backend import BackendLoader, BackendUnavailable, int16
from .guard import UPLOAD_QUOTA_BYTES, Guard, GuardOptions
from .desk import Desk, Files, release_memory
from .recordings import USER_ERRORS

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
ASSETS = Path(__file__).resolve().parents[1] / "assets"
EXAMPLES = {"Speech (10 s)": ASSETS / "speech.wav", "Sounds (13 s)": ASSETS / "sounds.flac"}
# Questions handed to the engine at once: its scheduler batches their decoding and interleaves their
# prefills (short questions first); beyond this many, Gradio's queue shows each waiting user their place.
GPU_CONCURRENCY = 8
PUBLIC_API = frozenset({"ask_recording"})  # the endpoints the README documents; every other event is private
QUEUE_MAX = 64  # questions waiting at once; more get Gradio's "queue is full" at once, not after hours
UPLOAD_SWEEP_S, UPLOAD_MAX_AGE_S = 600, 3600  # every 10 min, uploads no recording holds that are 1 h old go
# Uvicorn lets each WebSocket buffer 32 messages of 16 MiB before a handler reads one (measured: 4 clients
# sending 16 MiB frames took the server up by 2 GB); a Realtime event is at most a 30 s clip.
WS_MAX_MESSAGE_BYTES, WS_MAX_QUEUE = realtime.MAX_MESSAGE_BYTES, realtime.WS_MAX_QUEUE
CSS = """
#afn-banner { font-size: .92em; }
#afn-status { min-height: 1.6em; }
"""


def _gpu(fn: Callable) -> Callable:
    """`spaces.GPU` where the `spaces` package is importable (Hugging Face Spaces), else `fn` itself.

    On dedicated Space hardware it is a no-op; ZeroGPU is not supported: the engine keeps its model
    and every session's KV cache on one long-lived worker, which ZeroGPU's per-call processes cannot host.
    """
    try:
        import spaces
    except ImportError:
        return fn
    return spaces.GPU(fn)


def build(loader: BackendLoader, cache_dir: Path) -> tuple[gr.Blocks, Desk]:
    """The page, and the desk of its open recordings. `cache_dir` holds WAV copies of recordings the
    browser could not play as uploaded."""
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
                gr.HTML(html_template='<div class="afn-talk"></div>', js_on_load=_js("talk.js"), elem_id="afn-talk")
            with gr.Tab("Recordings", id="recordings"):
                tab = _RecordingsTab(loader, cache_dir)
                tab.build()
        _api(loader, tab.desk)
        demo.unload(tab.closed)
    return demo, tab.desk


class _RecordingsTab:
    """The Recordings tab: its components, and handlers that find each browser session's recording."""

    def __init__(self, loader: BackendLoader, cache_dir: Path) -> None:
        self.loader, self.cache_dir = loader, cache_dir
        self.desk = Desk(Files())

    def build(self) -> None:
        with gr.Row():
            with gr.Column(scale=1, min_width=260):
                upload = gr.File(label="Drop a recording (audio or video, up to 30 minutes)", type="filepath",
                                 file_types=["audio", "video"], elem_id="afn-upload", height=140)
                _browser_side_file_types(upload)
                self.desk.files.keep = upload.keep_in_cache  # Gradio's cache sweep leaves claimed files alone
                with gr.Row():
                    examples = [gr.Button(f"Example: {label}", size="sm") for label in EXAMPLES]
                status = gr.Markdown("", elem_id="afn-status")
            with gr.Column(scale=2):
                wave = gr.HTML("", html_template='<div class="afn-wave"></div>', js_on_load=_js("waveform.js"),
                               elem_id="afn-wave")
        chat = gr.Chatbot(label="Questions about the recording", height=380, elem_id="afn-chat")
        with gr.Row():
            question = gr.Textbox(placeholder="Ask about the recording… (Enter to send)", show_label=False, scale=5,
                                  elem_id="afn-question", max_length=MAX_TEXT_CHARS)
            think = gr.Checkbox(label="Think (timestamped steps)", elem_id="afn-think", scale=1)
            ask_button = gr.Button("Ask", variant="primary", scale=1, elem_id="afn-ask")
            speak_button = gr.Button("Speak the answer", scale=1, elem_id="afn-speak")
        spoken = gr.Audio(label="Spoken answer", autoplay=True, interactive=False, elem_id="afn-spoken")

        asked = dict(fn=_gpu(self.ask), inputs=[question, think, wave], outputs=[chat, wave, status, question],
                     concurrency_id="gpu", concurrency_limit=GPU_CONCURRENCY, api_visibility="private")
        asking = [question.submit(**asked), ask_button.click(**asked)]
        opened = dict(outputs=[status, wave, chat], concurrency_limit=4, cancels=asking,  # a new recording ends the old talk
                      api_visibility="private")
        upload.upload(self.open, [upload], **opened)
        for button, path in zip(examples, EXAMPLES.values()):
            button.click(self.example(path), None, **opened)
        speak_button.click(self.speak, None, [spoken], api_visibility="private")

    def example(self, path: Path):
        def open_example(request: gr.Request):
            yield from self._open(str(path), request, owned=False)
        return open_example

    def open(self, path: str | None, request: gr.Request):
        """Upload → status, waveform, empty chat. A generator, so "decoding" shows at once."""
        yield from self._open(path, request, owned=True)

    def _open(self, path: str | None, request: gr.Request, owned: bool):
        if not path:
            self.desk.drop(request.session_hash)
            yield "", "", []
            return
        claim = [path] if owned else []  # held while it is read: an identical upload elsewhere may end meanwhile
        self.desk.files.claim(claim)
        try:
            yield f"Decoding {_markdown_text(Path(path).name)}…", gr.skip(), gr.skip()
            try:
                recording = recordings.open_recording(path, self.cache_dir, owned=owned)
            except USER_ERRORS as exc:
                log.info("recording refused: %s", exc)
                self.desk.drop(request.session_hash)  # the page shows no recording now: hold none
                gr.Warning(str(exc))
                yield f"⚠️ {exc}", "", []
                return
            self.desk.put(request.session_hash, _address(request), recording)
        finally:
            self.desk.files.release(claim)
        yield (f"**{_markdown_text(recording.name)}**: {recording.duration_s / 60:.1f} min. Ask a question; the "
               "first one makes the model listen to the whole recording, follow-ups reuse what it heard."), \
            recording.waveform(), []

    def closed(self, request: gr.Request) -> None:
        """The tab closed: free its recording."""
        self.desk.drop(request.session_hash)

    def ask(self, question: str, think: bool, shown: str | None, request: gr.Request):
        recording = self.desk.get(request.session_hash)
        if recording is None:  # the page's chat stays as it is (gr.skip): nothing of it is lost
            yield gr.skip(), gr.skip(), f"⚠️ {_nothing_held(shown, self.desk.why_gone(request.session_hash))}", gr.skip()
            return
        sent, box = question, ""  # the box empties once; what the user types meanwhile is theirs
        try:
            if not self.loader.ready:
                yield recording.chat, gr.skip(), "Waiting for the model to finish loading…", gr.skip()
            backend = self.loader.wait()
            steps = len(recording.steps)
            for line in recordings.ask(recording, question, think, backend):
                changed, steps = len(recording.steps) != steps, len(recording.steps)  # a Think turn starts afresh
                yield recording.chat, recording.waveform() if changed else gr.skip(), line, box
                box = gr.skip()
        except USER_ERRORS as exc:
            log.info("question refused: %s", exc)
            gr.Warning(str(exc))
            yield recording.chat, gr.skip(), f"⚠️ {exc}", sent if box == "" else gr.skip()
        except Exception as exc:  # the traceback to the log, one sentence to the user, the page keeps working
            log.exception("question about %s failed", recording.name)
            yield (recording.chat, gr.skip(), f"⚠️ The server failed on that question ({type(exc).__name__}); the "
                   "conversation is kept, so try again.", sent if box == "" else gr.skip())

    def speak(self, request: gr.Request):
        recording = self.desk.get(request.session_hash)
        text = recording.answer.strip() if recording else ""
        if not text:
            gr.Warning("There is no answer to speak yet.")
            return None
        try:
            synthesizer = self.loader.wait().synthesizer
            chunks = [c for c in synthesizer.stream(text) if isinstance(c, AudioChunk) and len(c.samples)]
        except Exception as exc:  # the voice failed: say so, keep serving
            log.exception("speaking the answer failed")
            raise gr.Error(f"The answer could not be spoken ({type(exc).__name__}: {exc}).") from exc
        if not chunks:
            gr.Warning("The voice made no sound for that answer.")
            return None
        return chunks[0].sample_rate, int16(np.concatenate([c.samples for c in chunks]))


def _api(loader: BackendLoader, desk: Desk) -> None:
    """`ask_recording(audio, question, think) → answer`: one question about one file, no session kept."""
    with gr.Row(visible=False):
        audio = gr.File(type="filepath", label="audio")
        question, think = gr.Textbox(label="question"), gr.Checkbox(label="think")
        answer = gr.Textbox(label="answer")
        button = gr.Button("ask_recording")
    button.click(_gpu(partial(_answer_api, loader=loader, desk=desk)), [audio, question, think], answer,
                 api_name="ask_recording", concurrency_id="gpu", concurrency_limit=GPU_CONCURRENCY)


def _answer_api(audio: str | None, question: str, think: bool, loader: BackendLoader, desk: Desk) -> str:
    # An upload serves one call: deleted after it, unless an open recording uses the same file.
    claim = [audio] if audio and _is_upload(audio) else []
    desk.files.claim(claim)
    try:
        return recordings.answer_once(loader.wait(), audio, question or "", bool(think))
    except USER_ERRORS as exc:
        log.info("ask_recording refused: %s", exc)
        raise gr.Error(str(exc), print_exception=False) from None
    finally:
        desk.files.release(claim)
        release_memory()  # its audio and KV cache: up to hundreds of MB for 30 minutes


def _is_upload(path: str) -> bool:
    return Path(path).resolve().is_relative_to(Path(gr.utils.get_upload_folder()).resolve())


def _browser_side_file_types(upload: gr.File) -> None:
    """Keep `file_types` as the browser's file-picker filter only. Gradio also enforces it on the
    server, raising an error it logs with a traceback; a wrong file should instead reach our handler,
    which refuses it in one sentence (and deletes it) like any other file that is not audio."""
    preprocess = upload.preprocess

    def without_type_check(payload):
        with _FILE_TYPES_OFF:
            kept, upload.file_types = upload.file_types, None
            try:
                return preprocess(payload)
            finally:
                upload.file_types = kept
    upload.preprocess = without_type_check


_FILE_TYPES_OFF = threading.Lock()  # preprocess runs on worker threads; the swap above is not atomic


def _nothing_held(shown: str | None, why: str | None = None) -> str:
    """Why a question found no recording: none was opened, or the page shows one the server closed
    (`why`, if it said) or lost in a restart."""
    try:
        name = json.loads(shown)["name"] if shown else None
    except (ValueError, TypeError, KeyError, IndexError, RecursionError):
        name = None
    if not isinstance(name, str) or not name:
        return "Upload a recording, or pick an example, first."
    reason = why or "the server restarted since it was opened"
    return (f"The server no longer holds {name} ({reason}); upload it again to go on. "
            "The questions above stay on this page.")


def _markdown_text(text: str) -> str:
    """`text` with Markdown's marks escaped, so a status line shows a file's name letter for letter.
    (The name is the upload's: Gradio keeps only the last part of a name with "/" in it.)"""
    return "".join("\\" + c if c in "\\`*_{}[]<>()#+-.!|~" else c for c in text)


def _address(request: gr.Request) -> str:
    client = getattr(request, "client", None)
    return getattr(client, "host", None) or "?"


def _js(name: str) -> str:
    return (STATIC / name).read_text(encoding="utf-8")


class PortBusy(OSError):
    """The port is taken; the message names --port."""


def launch(loader: BackendLoader, *, host: str = "127.0.0.1", port: int = 7860, share: bool = False,
           block: bool = True, upload_quota_bytes: int = UPLOAD_QUOTA_BYTES, api_key: str | None = None) -> gr.Blocks:
    """Serve the page, the OpenAI API and Realtime voice socket (/v1, with `api_key` if given) and /health;
    blocks until Ctrl-C unless `block` is False.
    Raises PortBusy when `port` is taken."""
    started = time.perf_counter()
    workdir = _workdir()
    uploads, cache_dir = workdir / "uploads", workdir / "wav"
    cache_dir.mkdir(parents=True)
    # Gradio reads its upload folder from here when it builds components and routes: ours alone,
    # so no other Gradio app's uploads on this machine count as uploads to this one.
    os.environ["GRADIO_TEMP_DIR"] = str(uploads)
    demo, desk = build(loader, cache_dir)
    demo.queue(default_concurrency_limit=GPU_CONCURRENCY, max_size=QUEUE_MAX)
    access = Access(api_key, local=host in ("127.0.0.1", "localhost", "::1"))
    gate = GuardOptions(upload_dir=uploads, public_api=PUBLIC_API, max_file_bytes=MAX_FILE_BYTES,
                        quota_bytes=upload_quota_bytes, host_ok=access.host_ok)
    voice = RealtimeServer(loader, access)
    threading.Thread(target=desk.sweep_every, name="afnext-desk-sweep", daemon=True).start()
    # Our routes and the gate go in when Gradio builds its FastAPI app, so they answer from the first request.
    app_kwargs = {"middleware": [Middleware(Guard, options=gate)],
                  "routes": [Route("/health", _health(loader)), Route(TOKEN_ROUTE, _page_token(access)),
                             WebSocketRoute(realtime.ROUTE, voice.__call__),
                             *Api(loader, api_key, access).routes()]}
    try:
        demo.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=True, css=CSS,
                    max_file_size=MAX_FILE_BYTES, allowed_paths=[str(ASSETS), str(cache_dir)], ssr_mode=False,
                    footer_links=["api", "gradio"], quiet=False, app_kwargs=app_kwargs)
    except OSError as exc:
        shutil.rmtree(workdir, ignore_errors=True)
        if exc.errno == errno.EADDRINUSE or "Cannot find empty port" in str(exc):  # Gradio's words for it
            raise PortBusy(f"Port {port} on {host} is in use by another program; start with another one, "
                           f"e.g. --port {port + 1}.") from exc
        raise
    # Read by each new connection's protocol: in force before a page can connect.
    demo.server.config.ws_max_size, demo.server.config.ws_max_queue = WS_MAX_MESSAGE_BYTES, WS_MAX_QUEUE
    log.info("serving %s, %.2f s after launch (the model %s)", demo.local_url, time.perf_counter() - started,
             "is ready" if loader.ready else "is still loading")
    if block:
        try:
            demo.block_thread()
        finally:
            voice.shutdown()  # cancel the voice turns still running before the process ends
            shutil.rmtree(workdir, ignore_errors=True)
    return demo


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
    Other sites' pages cannot read it (no CORS headers), and their sockets fail the Origin check."""
    async def token(_request: Request) -> JSONResponse:  # the gate has checked Host (app/guard.py)
        value, expires = access.page_token()
        return JSONResponse({"token": value, "expires_at": expires}, headers={"Cache-Control": "no-store"})
    return token


def _workdir() -> Path:
    """This process's own folder for uploads and WAV copies, removed when it stops; folders left by
    processes that died (a crash, kill -9) are removed here, so uploads never pile up across restarts."""
    base = Path(tempfile.gettempdir())
    for stale in base.glob("afnext-app-*"):
        pid = stale.name.removeprefix("afnext-app-")
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    folder = base / f"afnext-app-{os.getpid()}"
    shutil.rmtree(folder, ignore_errors=True)  # a dead process's, with our recycled pid
    folder.mkdir(mode=0o700)
    return folder


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True
