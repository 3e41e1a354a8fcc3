"""The Gradio 6 page: a Talk tab (our WebSocket voice channel) and a Recordings tab (questions about
long recordings, Think steps on our waveform), plus the `ask_recording` API.

Each browser session has its own conversations: the Recordings tab's in a `gr.State`, the Talk tab's
under the page's own random id (app/talk.py). GPU work from the page's events goes through Gradio's
queue with a concurrency limit, so a waiting user sees their place in the queue.
"""

# No `from __future__ import annotations`: Gradio finds `gr.Request` parameters by their type hints, which
# must stay objects to survive wrappers such as spaces.GPU.

import logging
import tempfile
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import gradio as gr
import numpy as np
from starlette.routing import WebSocketRoute

from afnext.audio import MAX_FILE_BYTES
from afnext.events import AudioChunk

from . import recordings, talk
from .backend import BackendLoader, int16
from .recordings import USER_ERRORS, Recording

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
ASSETS = Path(__file__).resolve().parents[1] / "assets"
EXAMPLES = {"Speech (10 s)": ASSETS / "speech.wav", "Sounds (13 s)": ASSETS / "sounds.flac"}
GPU_CONCURRENCY = 1  # one generation at a time: the engine runs one job at a time anyway
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


def build(loader: BackendLoader, cache_dir: Path) -> gr.Blocks:
    """The page. `cache_dir` holds WAV copies of recordings the browser could not play as uploaded."""
    with gr.Blocks(title="AF-Next voice assistant") as demo:
        gr.Markdown("## AF-Next voice assistant\nTalk with Audio Flamingo Next, or ask it about a recording.")
        notice = gr.Markdown(loader.banner(), elem_id="afn-banner")
        poll = gr.Timer(1.0, active=not loader.ready)  # until the model is loaded
        poll.tick(lambda: (loader.banner(), gr.Timer(active=not loader.ready)), None, [notice, poll],
                  show_progress="hidden", queue=False)
        demo.load(loader.banner, None, notice, queue=False)
        with gr.Tabs():
            with gr.Tab("Talk", id="talk"):
                gr.Markdown("Press **Start**, speak, and pause: the assistant hears the end of your turn, answers "
                            "in text and voice, and stops when you speak over it.")
                gr.HTML(html_template='<div class="afn-talk"></div>', js_on_load=_js("talk.js"), elem_id="afn-talk")
            with gr.Tab("Recordings", id="recordings"):
                tab = _RecordingsTab(loader, cache_dir)
                tab.build()
        _api(loader)
        demo.unload(tab.desk.drop)
    return demo


class _Desk:
    """Each browser session's open recording (its audio, sessions and KV caches), by Gradio session
    hash; dropped as soon as the tab closes."""

    def __init__(self) -> None:
        self._open: dict[str, Recording] = {}
        self._lock = threading.Lock()

    def get(self, request: gr.Request) -> Recording | None:
        with self._lock:
            return self._open.get(request.session_hash)

    def put(self, request: gr.Request, recording: Recording | None) -> None:
        with self._lock:
            if recording is None:
                self._open.pop(request.session_hash, None)
            else:
                self._open[request.session_hash] = recording

    def drop(self, request: gr.Request) -> None:
        with self._lock:
            recording = self._open.pop(request.session_hash, None)
        if recording is not None:
            log.info("tab closed: freed %s and its conversation", recording.name)


class _RecordingsTab:
    """The Recordings tab: its components, and handlers that find each browser session's recording."""

    def __init__(self, loader: BackendLoader, cache_dir: Path) -> None:
        self.loader, self.cache_dir, self.desk = loader, cache_dir, _Desk()

    def build(self) -> None:
        with gr.Row():
            with gr.Column(scale=1, min_width=260):
                upload = gr.File(label="Drop a recording (audio or video, up to 30 minutes)", type="filepath",
                                 file_types=["audio", "video"], elem_id="afn-upload", height=140)
                with gr.Row():
                    examples = [gr.Button(f"Example: {label}", size="sm") for label in EXAMPLES]
                status = gr.Markdown("", elem_id="afn-status")
            with gr.Column(scale=2):
                wave = gr.HTML("", html_template='<div class="afn-wave"></div>', js_on_load=_js("waveform.js"),
                               elem_id="afn-wave")
        chat = gr.Chatbot(label="Questions about the recording", height=380, elem_id="afn-chat")
        with gr.Row():
            question = gr.Textbox(placeholder="Ask about the recording… (Enter to send)", show_label=False, scale=5,
                                  elem_id="afn-question")
            think = gr.Checkbox(label="Think (timestamped steps)", elem_id="afn-think", scale=1)
            ask_button = gr.Button("Ask", variant="primary", scale=1, elem_id="afn-ask")
            speak_button = gr.Button("Speak the answer", scale=1, elem_id="afn-speak")
        spoken = gr.Audio(label="Spoken answer", autoplay=True, interactive=False, elem_id="afn-spoken")

        asked = dict(fn=_gpu(self.ask), inputs=[question, think], outputs=[chat, wave, status, question],
                     concurrency_id="gpu", concurrency_limit=GPU_CONCURRENCY)
        asking = [question.submit(**asked), ask_button.click(**asked)]
        opened = dict(outputs=[status, wave, chat], concurrency_limit=4, cancels=asking)  # a new recording ends the old talk
        upload.upload(self.open, [upload], **opened)
        for button, path in zip(examples, EXAMPLES.values()):
            button.click(self.example(path), None, **opened)
        speak_button.click(self.speak, None, [spoken])

    def example(self, path: Path):
        def open_example(request: gr.Request):
            yield from self.open(str(path), request)
        return open_example

    def open(self, path: str | None, request: gr.Request):
        """Upload → status, waveform, empty chat. A generator, so "decoding" shows at once."""
        self.desk.put(request, None)
        if not path:
            yield "", "", []
            return
        yield f"Decoding {Path(path).name}…", gr.skip(), gr.skip()
        try:
            recording = recordings.open_recording(path, self.cache_dir)
        except USER_ERRORS as exc:
            gr.Warning(str(exc))
            yield f"⚠️ {exc}", "", []
            return
        self.desk.put(request, recording)
        yield (f"**{recording.name}**: {recording.duration_s / 60:.1f} min. Ask a question; the first one makes the "
               "model listen to the whole recording, follow-ups reuse what it heard."), recording.waveform(), []

    def ask(self, question: str, think: bool, request: gr.Request):
        recording = self.desk.get(request)
        if recording is None:
            yield [], gr.skip(), "⚠️ Upload a recording, or pick an example, first.", gr.skip()
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
            gr.Warning(str(exc))
            yield recording.chat, gr.skip(), f"⚠️ {exc}", sent if box == "" else gr.skip()
        except Exception as exc:  # the traceback to the log, one sentence to the user, the page keeps working
            log.exception("question about %s failed", recording.name)
            yield (recording.chat, gr.skip(), f"⚠️ The server failed on that question ({type(exc).__name__}); the "
                   "conversation is kept, so try again.", sent if box == "" else gr.skip())

    def speak(self, request: gr.Request):
        recording = self.desk.get(request)
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


def _api(loader: BackendLoader) -> None:
    """`ask_recording(audio, question, think) → answer`: one question about one file, no session kept."""
    with gr.Row(visible=False):
        audio = gr.File(type="filepath", label="audio")
        question, think = gr.Textbox(label="question"), gr.Checkbox(label="think")
        answer = gr.Textbox(label="answer")
        button = gr.Button("ask_recording")
    button.click(_gpu(partial(_answer_api, loader=loader)), [audio, question, think], answer,
                 api_name="ask_recording", concurrency_id="gpu", concurrency_limit=GPU_CONCURRENCY)


def _answer_api(audio: str | None, question: str, think: bool, loader: BackendLoader) -> str:
    try:
        return recordings.answer_once(loader.wait(), audio, question or "", bool(think))
    except USER_ERRORS as exc:
        raise gr.Error(str(exc)) from exc


def _js(name: str) -> str:
    return (STATIC / name).read_text(encoding="utf-8")


def launch(loader: BackendLoader, *, host: str = "127.0.0.1", port: int = 7860, share: bool = False,
           block: bool = True) -> gr.Blocks:
    """Serve the page and the voice channel; blocks until Ctrl-C unless `block` is False."""
    started = time.perf_counter()
    cache_dir = Path(tempfile.mkdtemp(prefix="afnext-web-"))
    demo = build(loader, cache_dir)
    demo.queue(default_concurrency_limit=GPU_CONCURRENCY)
    demo.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=True, css=CSS,
                max_file_size=MAX_FILE_BYTES, allowed_paths=[str(ASSETS), str(cache_dir)], ssr_mode=False,
                footer_links=["api", "gradio"], quiet=False)
    registry = talk.TalkRegistry(loader)
    demo.app.router.routes.append(WebSocketRoute(talk.ROUTE, partial(talk.serve, registry=registry)))
    log.info("serving %s, %.2f s after launch (the model %s)", demo.local_url, time.perf_counter() - started,
             "is ready" if loader.ready else "is still loading")
    if block:
        try:
            demo.block_thread()
        finally:
            registry.shutdown()  # cancel the voice turns still running before the process ends
    return demo
