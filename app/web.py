"""The Gradio 6 page: a Talk tab (OpenAI Realtime over the server's own `/v1/realtime`) and a Recordings
tab (questions about long recordings, Think steps on our waveform), plus the `ask_recording` API.

Each browser has its own conversations, kept in the store (app/history.py) under its owner token
(app/static/owner.js keeps it in the browser): the Recordings tab's, held live by conversation id in
a `Live` registry and reopened from the store when needed, and the Talk tab's, on its own Realtime
socket (app/realtime.py). GPU work from the page's events goes
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
import re
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from pathlib import Path
from zoneinfo import ZoneInfo

import gradio as gr
import numpy as np
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute

from afnext.audio import MAX_FILE_BYTES
from afnext.cli import KEEP_DAYS
from afnext.events import AudioChunk, TextDelta
from afnext.live import Live, matches_store
from afnext.session import MAX_TEXT_CHARS
from afnext.store import Store
from afnext.tts import TTSError
from afnext.tts.chunker import SpeechChunker

from . import realtime, recordings
from .access import TOKEN_ROUTE, Access, client_group, origin_allowed, owner_of
from .api import Api
from .realtime import RealtimeServer
from .backend import BackendLoader, BackendUnavailable, int16
from .guard import REQUESTS_PER_S, UPLOAD_QUOTA_BYTES, Guard, GuardOptions
from .desk import Files, claimed, hold, live_conversations, release_memory
from .history import MAX_HISTORY_GB, HistoryRoutes, forget_live, listing, open_store, prune_every
from .recordings import USER_ERRORS, Recording

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
/* The chat's Clear button (the second in its toolbar, after Share; see `build`) */
#afn-chat .icon-button-wrapper.top-panel > button:nth-of-type(2) { display: none; }
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


def build(loader: BackendLoader, cache_dir: Path, store: Store | None = None, live: Live | None = None,
          keep_days: float = KEEP_DAYS) -> "tuple[gr.Blocks, _RecordingsTab]":
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
                gr.HTML(html_template='<div class="afn-talk"></div>', js_on_load=_js("talk.js"), elem_id="afn-talk")
            with gr.Tab("Recordings", id="recordings"):
                tab = _RecordingsTab(loader, cache_dir, store, live, keep_days)
                tab.build(demo)
        _api(loader, tab.files)
    return demo, tab


class _RecordingsTab:
    """The Recordings tab: its components, and handlers that find the browser's open recording by its
    conversation id and the browser's owner token (both kept by the page, app/static/owner.js)."""

    def __init__(self, loader: BackendLoader, cache_dir: Path, store: Store | None, live: Live | None,
                 keep_days: float = KEEP_DAYS) -> None:
        self.loader, self.cache_dir, self.store, self.keep_days = loader, cache_dir, store, keep_days
        self.files = Files()
        self.live = live if live is not None else live_conversations()

    def build(self, demo: gr.Blocks) -> None:
        owner = gr.Textbox(visible=False, elem_id="afn-owner")  # the browser's owner token (owner.js)
        cid = gr.Textbox(visible=False, elem_id="afn-recording-id")  # the open recording's conversation
        clock = gr.Textbox(visible=False, elem_id="afn-clock")  # how this browser writes a date (recordings.js)
        with gr.Row():
            with gr.Column(scale=1, min_width=260):
                upload = gr.File(label="Drop a recording (audio or video, up to 4 hours)", type="filepath",
                                 file_types=["audio", "video"], elem_id="afn-upload", height=140)
                _browser_side_file_types(upload)
                self.files.keep = upload.keep_in_cache  # Gradio's cache sweep leaves claimed files alone
                with gr.Row():
                    examples = [gr.Button(f"Example: {label}", size="sm") for label in EXAMPLES]
                status = gr.Markdown("", elem_id="afn-status")
                with gr.Accordion("Your recordings", open=True, visible=self.store is not None):
                    history = gr.Dropdown(label="Open one again", choices=[], value=None, elem_id="afn-history",
                                          interactive=True)
                    with gr.Row():
                        title = gr.Textbox(placeholder="A new name for it", show_label=False, scale=3,
                                           elem_id="afn-title", max_length=200)
                        rename = gr.Button("Rename", size="sm", scale=1, elem_id="afn-rename")
                        delete = gr.Button("Delete", size="sm", scale=1, variant="stop", elem_id="afn-delete")
                        confirmed = gr.Checkbox(visible=False)  # the browser's answer to "Delete …?"
                    disk = gr.Markdown("", elem_id="afn-disk")
            with gr.Column(scale=2):
                wave = gr.HTML("", html_template='<div class="afn-wave"></div>', js_on_load=_js("waveform.js"),
                               elem_id="afn-wave")
        # The buttons named, so the toolbar's order is known: Gradio adds its Clear (trash) button after
        # Share, with no option to leave it out, and CSS hides it (#afn-chat in CSS): it would empty the
        # screen only, and the next answer would bring the conversation back.
        chat = gr.Chatbot(label="Questions about the recording", height=380, elem_id="afn-chat",
                          buttons=["share", "copy", "copy_all"])
        with gr.Row(elem_id="afn-ask-row"):
            question = gr.Textbox(placeholder="Ask about the recording… (Enter to send)", show_label=False, scale=5,
                                  elem_id="afn-question", max_length=MAX_TEXT_CHARS)
            think = gr.Checkbox(label="Think (timestamped steps)", elem_id="afn-think", scale=1)
            ask_button = gr.Button("Ask", variant="primary", scale=1, elem_id="afn-ask")
            speak_button = gr.Button("Speak the answer", scale=1, elem_id="afn-speak")
        waiting = gr.Markdown("", elem_id="afn-waiting")  # says a question asked during an answer waits for it
        spoken = gr.Audio(label="Spoken answer", autoplay=True, interactive=False, elem_id="afn-spoken")
        # Written where the recordings' played copies are, which every replica serves: its Download link
        # carries no header to find the replica that spoke it (app/replicas.py).
        spoken.GRADIO_CACHE = str(self.cache_dir)

        private = dict(api_visibility="private")
        listed = dict(fn=self.history, inputs=[owner, cid, clock], outputs=[history, disk], queue=False, **private)
        asked = dict(fn=_gpu(self.ask), inputs=[question, think, wave, cid, owner],
                     outputs=[chat, wave, status, question, waiting], concurrency_id="gpu",
                     concurrency_limit=GPU_CONCURRENCY, **private,
                     js="(q, ...rest) => { afnextRecordings.started(q); return [q, ...rest]; }")
        # One event for Enter and the button, which Gradio drops while an answer streams (so Enter with a click at
        # once sends one question); a new question typed meanwhile waits in recordings.js, sent when the answer
        # ends. Its note comes first: Gradio runs a trigger's events in order, each to its end.
        pressed = [question.submit, ask_button.click]
        gr.on(pressed, None, [question], [waiting], js="(q) => afnextRecordings.pressed(q)", **private)
        asking = [gr.on(pressed, **asked)]
        asking[0].then(**listed)
        asking[0].then(None, None, [waiting], js="() => afnextRecordings.ended()", **private)
        # The upload box is an output of every way to open a recording: it shows a file only while that file
        # is the open recording (an example or a history entry opened after an upload empties it).
        opened = dict(outputs=[status, wave, chat, cid, upload], concurrency_limit=4, cancels=asking,  # a new recording ends the old talk
                      js="(...inputs) => { afnextRecordings.forget(); return inputs; }", **private)
        upload.upload(self.open, [upload, owner], **opened).then(**listed)
        for button, path in zip(examples, EXAMPLES.values()):
            button.click(self.example(path), [owner], **opened).then(**listed)
        # `select`, not `input`: closing the list without picking must not reopen (and cut off an answer).
        history.select(self.reopen, [history, owner], **opened).then(**listed)
        renamed = dict(fn=self.rename, inputs=[history, title, cid, owner], outputs=[title, wave, status], **private)
        rename.click(**renamed).then(**listed)
        title.submit(**renamed).then(**listed)
        delete.click(self.delete, [history, cid, owner, confirmed], [status, wave, chat, cid], js=CONFIRM_DELETE_JS,
                     **private).then(**listed)
        speak_button.click(self.speak, [cid, owner], [spoken, status], **private)
        # The page keeps its owner token and its open recording (owner.js): a reload opens it again, with the
        # Think box as it was (recordings.js).
        cid.change(None, [cid], None, js="(c) => { afnextOwner.remember('recording', c); }", **private)
        think.input(None, [think], None, js="(on) => { afnextRecordings.keepThink(on); }", **private)
        recalled = ("() => [afnextOwner.token(), afnextOwner.recalled('recording'), afnextRecordings.think(), "
                    "afnextRecordings.clock()]")
        demo.load(None, None, [owner, cid, think, clock], js=recalled, **private).then(
            self.reopen, [cid, owner], **opened).then(**listed)

    # ---- handlers (each checks the owner: an id alone opens nothing) ----

    def example(self, path: Path):
        def open_example(owner: str, request: gr.Request):
            yield from self._open(str(path), owner, request, owned=False)
        return open_example

    def open(self, path: str | None, owner: str, request: gr.Request):
        """Upload → status, waveform, empty chat, its conversation id, and the upload box (emptied when
        the file is refused, so a refused file is not left there as if open; else left as it is). A
        refused file leaves the open recording as it was. A generator, so "decoding" shows at once."""
        yield from self._open(path, owner, request, owned=True)

    def _open(self, path: str | None, owner: str, request: gr.Request, owned: bool):
        """`owned`: the file is an upload, which the upload box (the last output) keeps showing unless it
        is refused; anything else empties the box, with its first update only: a file put in the box while
        this one decodes is a newer upload, which a later update here must not take away."""
        box = gr.skip() if owned else None
        if not path:
            yield "", "", [], "", box
            return
        claim = [path] if owned else []  # held while it is read: an identical upload elsewhere may end meanwhile
        self.files.claim(claim)
        recording = None
        try:
            if _owner(owner) is None:  # the page always sends one (owner.js): this is not the page
                yield f"⚠️ {NO_OWNER}", "", [], "", None
                return  # its upload is deleted with the release below, unless another recording uses it
            yield f"Decoding {_markdown_text(Path(path).name)}…", gr.skip(), gr.skip(), gr.skip(), box
            refused_box, box = (None if owned else gr.skip()), gr.skip()  # the box is emptied (or kept) already
            try:
                recording = recordings.open_recording(path, self.cache_dir, owned=owned)
            except USER_ERRORS as exc:
                log.info("recording refused: %s", exc)
                gr.Warning(str(exc))
                # The recording open before, if any, stays open with its questions: only the box empties.
                yield f"⚠️ {exc}", gr.skip(), gr.skip(), gr.skip(), refused_box
                return
            recording.owner = _owner(owner)
            recording.cid = secrets.token_hex(16) if self.store is not None else f"unkept-{secrets.token_hex(16)}"
            hold(self.live, self.files, _address(request), recording)
            ready = f"**{_markdown_text(recording.name)}** ({recordings.length(recording.duration_s)}). " + (
                f"The model hears 30 minutes at a time, so it will listen in {len(recording.parts)} parts and put their "
                "answers together. " if recording.parts else "") + (
                "Ask a question; the first one makes the model listen to the whole recording, follow-ups reuse what "
                "it heard.")
            # The waveform first; then the file goes into the history (a 30-minute WAV: a second or so), and
            # a question asked meanwhile waits for it (Recording.keeping).
            yield ready, recording.waveform(), [], recording.cid, box
            yield ready + self._keep(recording, path), gr.skip(), gr.skip(), gr.skip(), box
        finally:
            if recording is not None:
                recording.keeping.set()  # the page went before it was kept: questions do not wait for it
            self.files.release(claim)

    def _keep(self, recording: Recording, path: str) -> str:
        """Keep a new recording in its owner's history under its id; a sentence for the status if it is not."""
        try:
            if self.store is not None:
                recordings.keep(recording, self.store, recording.owner, path)
        except recordings.KeptError as exc:
            log.warning("%s", exc)
            return f" ⚠️ {exc}"
        finally:
            recording.keeping.set()
        return ""

    def reopen(self, cid: str, owner: str, request: gr.Request):
        """A recording from the history (or the one this page had open before a reload) → the view, and
        the upload box emptied."""
        if not cid:
            yield gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
            return
        try:
            recording = self._recording(cid, owner, request)
        except USER_ERRORS as exc:
            yield f"⚠️ {exc}", "", [], "", None
            return
        if recording is None:
            yield "That recording is no longer in your history.", "", [], "", None
            return
        turns = sum(m["role"] == "user" for m in recording.chat)
        asked = "no question yet. Ask one." if not turns else f"{_counted(turns, 'question')} so far. Ask another."
        yield (f"**{_markdown_text(recording.name)}** ({recordings.length(recording.duration_s)}): {asked}"), \
            recording.waveform(), recording.chat, cid, None

    def _recording(self, cid: str, owner: str, request: gr.Request) -> Recording | None:
        """The live recording `cid` of this owner, reopened from the store if it is not live (once, however
        many tabs ask at the same moment); None if the owner has none by that id."""
        owned = _owner(owner)
        if owned is None:
            return None

        def reopen() -> Recording:
            found = None
            if self.store is not None and not cid.startswith("unkept-"):
                found = recordings.reopen(self.store, cid, owned, self.cache_dir)
            if found is None:
                raise _NotHeld
            return claimed(self.files, found)
        try:
            recording = self.live.open(cid, owned, _address(request), reopen, current=matches_store)
        except _NotHeld:
            return None
        return recording if isinstance(recording, Recording) else None  # not a voice conversation's id

    def history(self, owner: str, cid: str, clock: str = ""):
        """The owner's kept recordings for the list, each with when it was last used as this browser writes
        a date (`clock`, see `_when`), and the disk they take."""
        owned = _owner(owner)
        if self.store is None or owned is None:
            return gr.update(choices=[], value=None), ""
        found = listing(self.store, owned, "recording")
        choices = [(f"{c['title']} · {_counted(c['turns'], 'question')} · {_when(c['updated'], clock)}", c["id"])
                   for c in found["conversations"]]  # CONFIRM_DELETE_JS reads these labels
        value = cid if any(c[1] == cid for c in choices) else None
        kept = (f"{_counted(len(choices), 'recording')} kept, {_megabytes(found['disk_bytes'])} on disk."
                if choices else "No recordings kept yet.")
        return gr.update(choices=choices, value=value), (
            f"{kept} Those unused for {self.keep_days:g} days are deleted, and the oldest first when the "
            "server's history is full.")

    def rename(self, cid: str | None, title: str, current: str, owner: str):
        """Rename the recording picked in the list; the open one's waveform and status show the new name."""
        owned, unchanged = _owner(owner), (gr.skip(), gr.skip(), gr.skip())
        if self.store is None or owned is None or not cid:
            gr.Warning("Pick a recording in the list first.")
            return unchanged
        try:
            if not self.store.rename(cid, title or "", owner=owned):
                gr.Warning("That recording is no longer in your history.")
                return unchanged
        except recordings.StoreError as exc:
            gr.Warning(str(exc))
            return unchanged
        held = self.live.get(cid, owned)
        if not isinstance(held, Recording):
            return "", gr.skip(), gr.skip()
        kept = self.store.get(cid, owner=owned)
        if kept is None:  # deleted from another tab since it was renamed
            gr.Warning("That recording is no longer in your history.")
            return unchanged
        held.name = kept.title
        if cid != current:
            return "", gr.skip(), gr.skip()
        return "", held.waveform(), f"Renamed to **{_markdown_text(held.name)}**."

    def delete(self, cid: str | None, current: str, owner: str, confirmed: bool):
        """Delete the recording picked in the list, once the browser has asked (`confirmed`: the answer)."""
        owned = _owner(owner)
        if not confirmed:  # the user chose Cancel
            return gr.skip(), gr.skip(), gr.skip(), gr.skip()
        if self.store is None or owned is None or not cid:
            gr.Warning("Pick a recording in the list first.")
            return gr.skip(), gr.skip(), gr.skip(), gr.skip()
        if not self.store.delete(cid, owner=owned):
            gr.Warning("That recording is no longer in your history.")
        forget_live(self.live, cid, owned)  # another tab asking about it is told it was deleted
        if cid == current:
            return "Deleted, with its questions and answers.", "", [], ""
        return "Deleted, with its questions and answers.", gr.skip(), gr.skip(), gr.skip()

    def ask(self, question: str, think: bool, shown: str | None, cid: str, owner: str, request: gr.Request):
        """A question → the chat, the waveform (new Think steps), the status line, the question box (emptied
        once it is taken) and the note under it (a question that waited for the last answer is sent: gone)."""
        recording = None
        try:
            recording = self._recording(cid, owner, request) if cid else None
        except USER_ERRORS as exc:
            yield gr.skip(), gr.skip(), f"⚠️ {exc}", gr.skip(), ""
            return
        if recording is None:  # the page's chat stays as it is (gr.skip): nothing of it is lost
            why = self.live.why_gone(cid) if cid else None
            if why is None and cid and self.store is not None and not cid.startswith("unkept-"):
                why = "it was deleted from your history"  # kept ones are reopened: this one is gone
            yield gr.skip(), gr.skip(), f"⚠️ {_nothing_held(shown, why)}", gr.skip(), ""
            return
        sent, box = question, ""  # the box empties once; what the user types meanwhile is theirs
        try:
            if not self.loader.ready:
                yield recording.chat, gr.skip(), "Waiting for the model to finish loading…", gr.skip(), gr.skip()
            backend = self.loader.wait()
            steps = len(recording.steps)
            recording.keeping.wait(KEEPING_WAIT_S)  # opened a moment ago: its file is still being kept
            store = self.store if recording.kept is not None else None
            for line in recordings.ask(recording, question, think, backend, store):
                changed, steps = len(recording.steps) != steps, len(recording.steps)  # a Think turn starts afresh
                yield recording.chat, recording.waveform() if changed else gr.skip(), line, box, box
                box = gr.skip()
        except USER_ERRORS as exc:
            log.info("question refused: %s", exc)
            gr.Warning(str(exc))
            yield recording.chat, gr.skip(), f"⚠️ {exc}", sent if box == "" else gr.skip(), box
        except Exception as exc:  # the traceback to the log, one sentence to the user, the page keeps working
            log.exception("question about %s failed", recording.name)
            yield (recording.chat, gr.skip(), f"⚠️ The server failed on that question ({type(exc).__name__}); the "
                   "conversation is kept, so try again.", sent if box == "" else gr.skip(), box)

    def _latest_answer(self, cid: str, owner: str) -> str:
        """The open recording's latest answer: the live copy's, or the store's when the app has let the
        live copy go (idle, or room for others) or another tab or replica has asked since; without its
        audio decoded again, which a reopen would do."""
        owned = _owner(owner)
        if not cid or owned is None:
            return ""
        recording = self.live.get(cid, owned)
        if isinstance(recording, Recording) and matches_store(recording):
            return recording.answer
        if self.store is None or cid.startswith("unkept-"):
            return ""
        return recordings.latest_answer(self.store, cid, owned)

    def speak(self, cid: str, owner: str):
        """The latest answer, spoken → the audio, and the status line where there is nothing to say."""
        text = self._latest_answer(cid, owner).strip()
        if not text:
            gr.Warning(NO_ANSWER)
            return None, NO_ANSWER
        chunker = SpeechChunker()  # what the voice loop speaks: pieces without markdown, emoji or links' URLs
        pieces = [*chunker.feed(TextDelta(text)), *chunker.flush()]
        try:
            synthesizer = self.loader.wait().synthesizer
            chunks = [c for piece in pieces for c in synthesizer.stream(piece)
                      if isinstance(c, AudioChunk) and len(c.samples)]
        except TTSError as exc:  # no voice on this server, or a voice that failed: its own sentence
            log.warning("answer not spoken: %s", exc)
            raise gr.Error(f"The answer could not be spoken: {exc}") from exc
        except Exception as exc:  # the voice failed: say so, keep serving
            log.exception("speaking the answer failed")
            raise gr.Error(f"The answer could not be spoken ({type(exc).__name__}: {exc}).") from exc
        if not chunks:
            gr.Warning("The voice made no sound for that answer.")
            return None, "The voice made no sound for that answer."
        return (chunks[0].sample_rate, int16(np.concatenate([c.samples for c in chunks]))), gr.skip()


# Asks before a recording is deleted, as the Talk tab does (owner.js), naming the title the list shows
# (`history`'s "title · N questions · when"); with nothing picked the server says to pick one.
CONFIRM_DELETE_JS = """(picked, open, owner) => {
  const shown = document.querySelector("#afn-history input")?.value || "";
  const title = shown.replace(/ · \\d+ questions? · [^·]*$/, "");
  return [picked, open, owner, !picked || afnextOwner.confirmDelete(title)];
}"""
KEEPING_WAIT_S = 120.0  # a question waits this long at most for its recording to be kept (a 1 GB file)


class _NotHeld(Exception):
    """No recording of that id and owner, live or kept."""


NO_OWNER = "This request carries no owner token (the page sends one); reload the page."
NO_ANSWER = "There is no answer to speak yet; ask a question first."


def _owner(token: str | None) -> str | None:
    return owner_of(token) if isinstance(token, str) else None


def _counted(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


MAX_CLOCK_CHARS = 400  # a browser's way of writing a date (recordings.js, `clock`) is under 200 characters


def _when(stamp: float, clock: str | None = None) -> str:
    """`stamp` (Unix seconds) as this browser writes a short date and time, the way the Talk tab's list
    writes them: `clock` is its pattern, words for a.m. and p.m. and time zone (recordings.js says how);
    without one, or one that makes no sense, the server's own format in its own time zone."""
    try:
        way = json.loads(clock) if clock and len(clock) <= MAX_CLOCK_CHARS else {}
        pattern, am, pm = (str(way[k]) for k in ("pattern", "am", "pm"))
        when = datetime.fromtimestamp(stamp, ZoneInfo(way["zone"]))
        if not pattern:
            raise ValueError("a part of the browser's date is not written in digits")
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError, OSError):
        return time.strftime("%d %b %H:%M", time.localtime(stamp))
    hour = (when.hour % 12 or 12) if "{a}" in pattern else when.hour
    fields = {"M": when.month, "MM": f"{when.month:02}", "d": when.day, "dd": f"{when.day:02}",
              "yy": f"{when.year % 100:02}", "yyyy": when.year, "h": hour, "hh": f"{hour:02}",
              "mm": f"{when.minute:02}", "a": pm if when.hour >= 12 else am}
    # Filled field by field, never with str.format: the pattern comes from the browser.
    return re.sub(r"\{(\w+)\}", lambda m: str(fields.get(m.group(1), "")), pattern)


def _megabytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n / 1e3:.0f} kB"


def _api(loader: BackendLoader, files: Files) -> None:
    """`ask_recording(audio, question, think) → answer`: one question about one file, no session kept."""
    with gr.Row(visible=False):
        audio = gr.File(type="filepath", label="audio")
        question, think = gr.Textbox(label="question"), gr.Checkbox(label="think")
        answer = gr.Textbox(label="answer")
        button = gr.Button("ask_recording")
    button.click(_gpu(partial(_answer_api, loader=loader, files=files)), [audio, question, think], answer,
                 api_name="ask_recording", concurrency_id="gpu", concurrency_limit=GPU_CONCURRENCY)


def _answer_api(audio: str | None, question: str, think: bool, loader: BackendLoader, files: Files) -> str:
    # An upload serves one call: deleted after it, unless an open recording uses the same file.
    claim = [audio] if audio and _is_upload(audio) else []
    files.claim(claim)
    try:
        return recordings.answer_once(loader.wait(), audio, question or "", bool(think))
    except USER_ERRORS as exc:
        log.info("ask_recording refused: %s", exc)
        raise gr.Error(str(exc), print_exception=False) from None
    finally:
        files.release(claim)
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
    return (f"The server no longer holds {_markdown_text(name)} ({reason}); upload it again to go on. "
            "The questions above stay on this page.")


def _markdown_text(text: str) -> str:
    """`text` with Markdown's marks escaped, so a status line shows a file's name letter for letter.
    (The name is the upload's: Gradio keeps only the last part of a name with "/" in it.)"""
    return "".join("\\" + c if c in "\\`*_{}[]<>()#+-.!|~" else c for c in text)


def _address(request: gr.Request) -> str:
    """The client's group for per-address limits (`access.client_group`)."""
    return client_group(getattr(getattr(request, "client", None), "host", None))


def _js(name: str) -> str:
    return (STATIC / name).read_text(encoding="utf-8")


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
    tokens (replicas share one, app/replicas.py; by default each process makes its own). `shared_root`:
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
                             *Api(loader, api_key, access).routes(), *HistoryRoutes(store, access, live).routes()]}
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
        demo.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=True, quiet=False,
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
    """`site` as an ASGI app for a server other than Gradio's own (Ray Serve's proxy, app/replicas.py)."""
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
