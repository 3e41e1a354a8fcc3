"""The Gradio 6 page: a Talk tab (our WebSocket voice channel) and a Recordings tab (questions about
long recordings, Think steps on our waveform), plus the `ask_recording` API.

Each browser session has its own conversations: the Recordings tab's in a `gr.State`, the Talk tab's
under the page's own random id (app/talk.py). GPU work from the page's events goes through Gradio's
queue with a concurrency limit, so a waiting user sees their place in the queue.
"""

from __future__ import annotations

import logging
import tempfile
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
                _recordings_tab(loader, cache_dir)
        _api(loader)
    return demo


def _recordings_tab(loader: BackendLoader, cache_dir: Path) -> None:
    state = gr.State(None)
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

    opened = [status, wave, chat, state]
    upload.upload(partial(_open, cache_dir=cache_dir), [upload], opened, concurrency_limit=4)
    for button, path in zip(examples, EXAMPLES.values()):
        button.click(partial(_open, str(path), cache_dir=cache_dir), None, opened, concurrency_limit=4)
    asked = dict(fn=partial(_ask, loader=loader), inputs=[question, think, state],
                 outputs=[chat, wave, status, question], concurrency_id="gpu", concurrency_limit=GPU_CONCURRENCY)
    question.submit(**asked)
    ask_button.click(**asked)
    speak_button.click(partial(_speak, loader=loader), [state], [spoken])


def _open(path: str | None, cache_dir: Path):
    """Upload → status, waveform, empty chat, new state. A generator, so "decoding" shows at once."""
    if not path:
        yield "", "", [], None
        return
    yield f"Decoding {Path(path).name}…", gr.skip(), gr.skip(), gr.skip()
    try:
        recording = recordings.open_recording(path, cache_dir)
    except USER_ERRORS as exc:
        gr.Warning(str(exc))
        yield f"⚠️ {exc}", "", [], None
        return
    yield (f"**{recording.name}**: {recording.duration_s / 60:.1f} min. Ask a question; the first one makes the "
           "model listen to the whole recording, follow-ups reuse what it heard."), recording.waveform(), [], recording


@_gpu
def _ask(question: str, think: bool, recording: Recording | None, loader: BackendLoader):
    if recording is None:
        yield [], gr.skip(), "⚠️ Upload a recording, or pick an example, first.", gr.skip()
        return
    sent = question
    try:
        if not loader.ready:
            yield recording.chat, gr.skip(), "Waiting for the model to finish loading…", gr.skip()
        backend = loader.wait()
        steps = len(recording.steps)
        for line in recordings.ask(recording, question, think, backend):
            changed, steps = len(recording.steps) != steps, len(recording.steps)  # a Think turn starts afresh
            yield recording.chat, recording.waveform() if changed else gr.skip(), line, ""
    except (*USER_ERRORS, RuntimeError) as exc:
        gr.Warning(str(exc))
        yield recording.chat, gr.skip(), f"⚠️ {exc}", sent
    except Exception as exc:  # the traceback to the log, one sentence to the user, the page keeps working
        log.exception("question about %s failed", recording.name)
        yield recording.chat, gr.skip(), f"⚠️ The server failed on that question ({type(exc).__name__}); " \
                                         "the conversation is kept, so try again.", sent


def _speak(recording: Recording | None, loader: BackendLoader):
    text = recording.answer.strip() if recording else ""
    if not text:
        gr.Warning("There is no answer to speak yet.")
        return None
    backend = loader.wait()
    chunks = [c for c in backend.synthesizer.stream(text) if isinstance(c, AudioChunk)]
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
    except (*USER_ERRORS, RuntimeError) as exc:
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
        demo.block_thread()
    return demo
