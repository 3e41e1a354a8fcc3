"""The page's Recordings tab (questions about long recordings, Think steps on our waveform): its
components and their wiring (`RecordingsTab.build`), the handlers behind them, and the helpers that
word its status lines and its list of recordings. app/recordings.py and app/recording_questions.py hold
the logic the handlers call; app/web.py, the page the tab is part of.

A browser's recordings are kept in the store (app/history.py) under its owner token (app/static/owner.js
keeps it in the browser), held live by conversation id in a `Live` registry and reopened from the store
when needed. Questions go through Gradio's queue with a concurrency limit (`GPU_CONCURRENCY`), so a
waiting user sees their place in the queue.
"""

# No `from __future__ import annotations`: Gradio finds `gr.Request` parameters by their type hints, which
# must stay objects to survive wrappers such as spaces.GPU.

import contextlib
import itertools
import json
import logging
import os
import re
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import gradio as gr
import numpy as np

from afnext.cli import KEEP_DAYS
from afnext.events import AudioChunk, TextDelta
from afnext.journal import KeptError
from afnext.live import Live, matches_store
from afnext.session import MAX_TEXT_CHARS
from afnext.store import Store, StoreError
from afnext.tts import TTSError
from afnext.tts.chunker import SpeechChunker

from . import recording_questions, recordings
from .access import client_group, owner_of
from .backend import BackendLoader, int16
from .desk import Files, claimed, hold, live_conversations
from .history import forget_live, listing
from .recording_questions import USER_ERRORS
from .recordings import Recording

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
ASSETS = Path(__file__).resolve().parents[1] / "assets"
EXAMPLES = {"Speech (10 s)": ASSETS / "speech.wav", "Sounds (13 s)": ASSETS / "sounds.flac"}
# Questions handed to the engine at once: its scheduler batches their decoding and interleaves their
# prefills (short questions first); beyond this many, Gradio's queue shows each waiting user their place.
GPU_CONCURRENCY = 8


def on_gpu(fn: Callable) -> Callable:
    """`spaces.GPU` where the `spaces` package is importable (Hugging Face Spaces), else `fn` itself.

    On dedicated Space hardware it is a no-op; ZeroGPU is not supported: the engine keeps its model
    and every session's KV cache on one long-lived worker, which ZeroGPU's per-call processes cannot host.
    """
    try:
        import spaces
    except ImportError:
        return fn
    return spaces.GPU(fn)


class RecordingsTab:
    """The Recordings tab: its components, and handlers that find the browser's open recording by its
    conversation id and the browser's owner token (both kept by the page, app/static/owner.js)."""

    def __init__(self, loader: BackendLoader, cache_dir: Path, store: Store | None, live: Live | None,
                 keep_days: float = KEEP_DAYS) -> None:
        self.loader, self.cache_dir, self.store, self.keep_days = loader, cache_dir, store, keep_days
        self.files = Files()
        self.live = live if live is not None else live_conversations()
        self.shown = Shown()

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
                        # Labels hidden but kept: a screen reader names each box by its label (else "Textbox").
                        title = gr.Textbox(label="A new name for the recording", placeholder="A new name for it",
                                           show_label=False, scale=3,
                                           elem_id="afn-title", max_length=200)
                        rename = gr.Button("Rename", size="sm", scale=1, elem_id="afn-rename")
                        delete = gr.Button("Delete", size="sm", scale=1, variant="stop", elem_id="afn-delete")
                        confirmed = gr.Checkbox(visible=False)  # the browser's answer to "Delete …?"
                    disk = gr.Markdown("", elem_id="afn-disk")
            with gr.Column(scale=2):
                wave = gr.HTML("", html_template='<div class="afn-wave"></div>', js_on_load=static_js("waveform.js"),
                               elem_id="afn-wave")
        # The buttons named, so the toolbar's order is known: Gradio adds its Clear (trash) button before
        # Copy conversation, with no option to leave it out, and CSS hides it (#afn-chat in app/web.py's CSS):
        # it would empty the screen only, and the next answer would bring the conversation back. Share posts
        # to the Space's discussions: off a Space it does nothing at all, so it is there on a Space only.
        chat = gr.Chatbot(label="Questions about the recording", height=380, elem_id="afn-chat",
                          buttons=[*(["share"] if os.environ.get("SPACE_ID") else []), "copy", "copy_all"])
        with gr.Row(elem_id="afn-ask-row"):
            question = gr.Textbox(label="Question about the recording", show_label=False, scale=5,
                                  placeholder="Ask about the recording… (Enter to send)",
                                  elem_id="afn-question", max_length=MAX_TEXT_CHARS)
            think = gr.Checkbox(label="Think (timestamped steps)", elem_id="afn-think", scale=1)
            ask_button = gr.Button("Ask", variant="primary", scale=1, elem_id="afn-ask")
            speak_button = gr.Button("Speak the answer", scale=1, elem_id="afn-speak")
        waiting = gr.Markdown("", elem_id="afn-waiting")  # says a question asked during an answer waits for it
        spoken = gr.Audio(label="Spoken answer", autoplay=True, interactive=False, elem_id="afn-spoken")
        # Written where the recordings' played copies are, which every replica serves: its Download link
        # carries no header to find the replica that spoke it (app/replica.py).
        spoken.GRADIO_CACHE = str(self.cache_dir)

        private = dict(api_visibility="private")
        # Gradio's progress timer ("queue: 1/1 | 0.2s", "processing | 1.3s") goes on the part of the page an
        # event makes, never over the status line, which says in words what is happening.
        listed = dict(fn=self.history, inputs=[owner, cid, clock], outputs=[history, disk], queue=False,
                      show_progress="hidden", **private)
        asked = dict(fn=on_gpu(self.ask), inputs=[question, think, wave, cid, owner],
                     outputs=[chat, wave, status, question, waiting], show_progress_on=[chat], concurrency_id="gpu",
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
        opened = dict(outputs=[status, wave, chat, cid, upload], show_progress_on=[wave], concurrency_limit=4,
                      cancels=asking,  # a new recording ends the old talk
                      js="(...inputs) => { afnextRecordings.forget(); return inputs; }", **private)
        upload.upload(self.open, [upload, owner], **opened).then(**listed)
        for button, path in zip(examples, EXAMPLES.values()):
            button.click(self.example(path), [owner], **opened).then(**listed)
        # `select`, not `input`: closing the list without picking must not reopen (and cut off an answer).
        history.select(self.reopen, [history, owner], **opened).then(**listed)
        renamed = dict(fn=self.rename, inputs=[history, title, cid, owner], outputs=[title, wave, status],
                       show_progress="hidden", **private)
        rename.click(**renamed).then(**listed)
        title.submit(**renamed).then(**listed)
        delete.click(self.delete, [history, cid, owner, confirmed], [status, wave, chat, cid], js=CONFIRM_DELETE_JS,
                     show_progress="hidden", **private).then(**listed)
        # The answer is not spoken over the recording: the recording pauses (waveform.js listens).
        speak_button.click(self.speak, [cid, owner], [spoken, status], show_progress_on=[spoken], **private,
                           js="(...inputs) => { afnextRecordings.pausePlayback(); return inputs; }")
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
        self.shown.changed(request)  # an answer still streaming about the last one stops updating this page
        claim = [path] if owned else []  # held while it is read: an identical upload elsewhere may end meanwhile
        self.files.claim(claim)
        recording = keeper = None
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
                # The line names the refused file, which the emptied box no longer shows.
                yield f"⚠️ {_markdown_text(Path(path).name)} was not opened: {exc}", gr.skip(), gr.skip(), gr.skip(), refused_box
                return
            recording.owner = _owner(owner)
            recording.cid = secrets.token_hex(16) if self.store is not None else f"unkept-{secrets.token_hex(16)}"
            hold(self.live, self.files, _address(request), recording)
            ready = f"**{_markdown_text(recording.name)}** ({recordings.length(recording.duration_s)}). " + (
                f"The model hears 30 minutes at a time, so it will listen in {len(recording.parts)} parts and put their "
                "answers together. " if recording.parts else "") + (
                "Ask a question; the first one makes the model listen to the whole recording, follow-ups reuse what "
                "it heard.")
            # The waveform first, while the file goes into the history on a thread of its own (a 30-minute
            # WAV: a second or so): a question asked meanwhile waits for it (Recording.keeping), which must
            # not depend on Gradio coming back to this generator (a page that went, a stream cut off).
            said: list[str] = []
            keeper = threading.Thread(target=self._keep, args=(recording, path, said), daemon=True,
                                      name="afnext-keep-recording")
            keeper.start()
            yield ready, recording.waveform(), [], recording.cid, box
            keeper.join()
            yield ready + "".join(said), gr.skip(), gr.skip(), gr.skip(), box
        finally:
            if keeper is not None:
                keeper.join()  # its file stays claimed until it is kept
            if recording is not None:
                recording.keeping.set()  # the page went before it was kept: questions do not wait for it
            self.files.release(claim)

    def _keep(self, recording: Recording, path: str, said: list[str]) -> None:
        """Keep a new recording in its owner's history under its id; a sentence for the status (into
        `said`) if it is not. Its own thread."""
        try:
            if self.store is not None:
                recording_questions.keep(recording, self.store, recording.owner, path)
        except KeptError as exc:
            log.warning("%s", exc)
            said.append(f" ⚠️ {exc}")
        except Exception as exc:  # ours: the traceback to the log, a sentence to the page, questions go on
            log.exception("keeping %s failed", recording.name)
            said.append(f" ⚠️ The recording could not be kept ({type(exc).__name__}); it can be asked about, but "
                        "will not be in your history.")
        finally:
            recording.keeping.set()

    def reopen(self, cid: str, owner: str, request: gr.Request):
        """A recording from the history (or the one this page had open before a reload) → the view, and
        the upload box emptied."""
        if not cid:
            yield gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
            return
        self.shown.changed(request)
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
                found = recording_questions.reopen(self.store, cid, owned, self.cache_dir)
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
        except StoreError as exc:
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

    def delete(self, cid: str | None, current: str, owner: str, confirmed: bool, request: gr.Request):
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
            self.shown.changed(request)  # an answer still streaming about it stops filling the emptied chat
            return "Deleted, with its questions and answers.", "", [], ""
        return "Deleted, with its questions and answers.", gr.skip(), gr.skip(), gr.skip()

    def ask(self, question: str, think: bool, shown: str | None, cid: str, owner: str, request: gr.Request):
        """A question → the chat, the waveform (new Think steps), the status line, the question box (emptied
        once it is taken) and the note under it (a question that waited for the last answer is sent: gone).
        Only while the page shows the recording asked about (`Shown`): once it opens another, or deletes
        this one, the answer is cut off and nothing more of it reaches the page."""
        showing = self.shown.now(request)
        with contextlib.closing(self._answer(question, think, shown, cid, owner, request)) as updates:
            for update in updates:
                with self.shown.sending(request, showing) as current:
                    if not current:
                        break
                    yield update
        if self.shown.now(request) != showing:  # Gradio sends a generator's last update again when it ends
            yield gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()

    def _answer(self, question: str, think: bool, shown: str | None, cid: str, owner: str, request: gr.Request):
        """`ask`'s updates, whatever the page shows meanwhile; closing it cuts the answer off."""
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
            with contextlib.closing(recording_questions.ask(recording, question, think, backend, store)) as lines:
                for line in lines:  # closed early: the turn stops at once and the chat says it was cut off
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
        return recording_questions.latest_answer(self.store, cid, owned)

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


class Shown:
    """Which opening of a recording each page (a Gradio session) shows, as a number that grows each time
    the page opens another, or empties its own by a delete. An answer streaming to the page sends each
    update only while its number is current, and stops once the page has moved on: Gradio's `cancels`
    reaches the server only after the new recording is on the page, and the old answer's last updates
    would land on its chat and status line (cancel by generation id, not by waiting for the cancel)."""

    MAX_PAGES = 10_000  # pages remembered; the oldest are forgotten (an answer to one of them then stops)
    SENT_WAIT_S = 1.0  # at most, for an update already on its way to the page before the one that changes it

    def __init__(self) -> None:
        self._pages: OrderedDict[str, int] = OrderedDict()
        self._sending: dict[str, int] = {}  # page → updates on their way to it (yielded, not yet in its queue)
        self._count = itertools.count(1)
        self._lock = threading.Condition()

    def changed(self, request: gr.Request | None) -> None:
        """The page shows another recording, or none, from its next update on: an answer's update already on
        its way is let through first (Gradio resumes a generator once its last update is queued), so it
        cannot land after this one."""
        page = getattr(request, "session_hash", None)
        if page is None:
            return
        with self._lock:
            self._pages[page] = next(self._count)
            self._pages.move_to_end(page)
            while len(self._pages) > self.MAX_PAGES:
                self._pages.popitem(last=False)
            self._lock.wait_for(lambda: not self._sending.get(page), timeout=self.SENT_WAIT_S)

    def now(self, request: gr.Request | None) -> int | None:
        page = getattr(request, "session_hash", None)
        with self._lock:
            return self._pages.get(page, 0) if page is not None else None

    @contextlib.contextmanager
    def sending(self, request: gr.Request | None, shown: int | None) -> Iterator[bool]:
        """Whether an update for the page that showed `shown` may go; held around its `yield`, so `changed`
        waits for it to be queued."""
        page = getattr(request, "session_hash", None)
        with self._lock:
            current = page is None or self._pages.get(page, 0) == shown
            if current and page is not None:
                self._sending[page] = self._sending.get(page, 0) + 1
        try:
            yield current
        finally:
            if current and page is not None:
                with self._lock:
                    self._sending[page] -= 1
                    if not self._sending[page]:
                        del self._sending[page]
                    self._lock.notify_all()


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


def static_js(name: str) -> str:
    return (STATIC / name).read_text(encoding="utf-8")
