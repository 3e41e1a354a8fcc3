"""The Recordings tab's logic: a recording decoded once, questions and follow-ups about it, Think
steps for the waveform. Gradio-free apart from the message dicts its chatbot takes, so tests call it
directly.

A `Recording` is one conversation about one recording: its audio, the waveform's peaks and one
`Session` per engine, so the recording is encoded by the first question on that engine and every
follow-up prefills only its own tokens. It is kept in the store from its upload on (`keep`: the
recording's file, then each question and answer as it completes), held live by the app's `Live`
registry, and rebuilt from the store (`reopen`) when it is opened again: after a reload, a restart, or
once the registry has let go of it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile

from afnext import split
from afnext.audio import MAX_AUDIO_S, SAMPLE_RATE, AudioError, load_file
from afnext.clip import Clip, check_length, prepare_clip
from afnext.engine import Engine
from afnext.events import PartProgress, ReasoningDelta, TextDelta, ThinkStep, TurnDone, clock
from afnext.conversation import Conversation
from afnext.journal import Journal, KeptError, lossless, open_conversation
from afnext.parts import PartedSession
from afnext.sampling import GenerationOptions
from afnext.session import MAX_TEXT_CHARS, ContextFullError, Session
from afnext.store import Store, StoredTurn, StoreError

from .backend import Backend, BackendUnavailable

log = logging.getLogger(__name__)

PEAK_COLUMNS = 1600  # min/max pairs sent for the waveform: finer than any page is wide
PEAK_BIN_SAMPLES = 1600  # samples (0.1 s) per min/max kept while a long recording is read: 4 h make 144,000
# Containers Chromium, Firefox and Safari play (mostly); anything else is served as a 16 kHz WAV.
PLAYABLE = frozenset(".wav .mp3 .flac .ogg .oga .opus .webm .m4a .aac .mp4".split())
SOURCE_SUFFIX = ".source"  # a kept file in a format the page cannot play, linked where the page's files are
DECODED_SUFFIX = ".f32"  # a long recording's decoded 16 kHz samples (split.Decoded): no type, never a page
ANSWER_OPTIONS = GenerationOptions(max_new_tokens=1024)  # the Instruct card's setting
THINK_OPTIONS = GenerationOptions(max_new_tokens=4096)  # the Think card's setting
REASONING_TITLE = "Reasoning"


@dataclass
class Recording:
    """One uploaded recording and the conversation about it."""

    name: str  # file name shown to the user
    url: str  # where the page plays it from
    audio: np.ndarray | None = field(repr=False)  # float32 mono 16 kHz; None when heard in parts (never whole)
    peaks: list[float] = field(repr=False)  # PEAK_COLUMNS × (min, max), flattened
    chat: list[dict] = field(default_factory=list)  # the chatbot's messages
    steps: list[ThinkStep] = field(default_factory=list)  # the latest Think reply's steps
    answer: str = ""  # the latest answer (what "Speak" says)
    _sessions: dict[int, Session] = field(default_factory=dict, repr=False)  # by engine
    files: tuple[Path, ...] = ()  # files it brought (its upload, WAV copy, decoded samples): deleted with it
    cid: str | None = None  # its conversation's id (in the store, unless `kept` is None)
    kept: str | None = None  # its audio's key in the store (None: not kept)
    owner: str = ""
    journal: Journal | None = field(default=None, repr=False)  # set once its sessions are opened
    keeping: threading.Event = field(default_factory=threading.Event, repr=False)  # set once `keep` is done
    on_close: Callable[[Recording], None] | None = field(default=None, repr=False)
    # A recording over the model's 30 minutes is heard in parts (afnext/parts.py): where they lie, and
    # the recording as it was decoded on opening, whose parts each model's first question reads (its
    # file is one of the recording's `files`).
    parts: tuple[tuple[float, float], ...] = ()
    source: split.Decoded | None = None
    # Where it is kept, and how many exchanges the store held when it was opened from there: until its
    # sessions are open (its journal then says), what tells that another process went on with it.
    store: Store | None = field(default=None, repr=False)
    opened_with: int = 0
    # The engines whose session is hearing the clip with a question now (`asking`): a question asked
    # meanwhile on that engine waits, so the clip is heard once.
    _hearing: set[int] = field(default_factory=set, repr=False)
    _heard: threading.Condition = field(default_factory=threading.Condition, repr=False)
    _opening: threading.Lock = field(default_factory=threading.Lock, repr=False)  # `open_sessions` once

    def current(self) -> bool:
        """Whether it holds what the store holds of its conversation (`Live.open`'s `current`): no other
        process (a replica) has asked about it meanwhile."""
        if self.journal is not None:
            return self.journal.current()
        if self.store is None or self.kept is None or not self.cid:
            return True
        return self.store.exchanges(self.cid) == self.opened_with

    @property
    def duration_s(self) -> float:
        return self.parts[-1][1] if self.parts else len(self.audio) / SAMPLE_RATE

    @property
    def cache_bytes(self) -> int:
        """The KV caches its sessions hold (what the Live registry counts)."""
        return sum(s.cache_bytes for s in self._sessions.values())

    def close(self) -> None:
        """Let go of it (the Live registry did): its files are released."""
        if self.on_close is not None:
            self.on_close(self)

    def open_sessions(self, backend: Backend, store: Store | None) -> None:
        """Before its first question here: the sessions rebuilt from the store, each going on keeping
        its turns there (Think turns go to the Think model's session when it has its own). Two first
        questions at once (two tabs) open them once: the second waits for the first's."""
        if self.journal is not None or store is None or self.kept is None:
            return
        with self._opening:
            if self.journal is None:
                self._open_sessions(backend, store)

    def _open_sessions(self, backend: Backend, store: Store) -> None:
        if self.parts:  # heard in parts: each model's parted session rebuilds the turns asked of it
            self.journal = open_conversation(store, self.cid, _PartedTurns(self, backend), model=_models(backend),
                                             kind="recording", owner=self.owner, title=self.name)
            return
        route = lambda user: self._session(_model_for(backend, user.think)[0])  # noqa: E731
        self.journal = open_conversation(store, self.cid, route, model=_models(backend), kind="recording",
                                         owner=self.owner, title=self.name)

    def _session(self, engine: Engine) -> Session:
        if id(engine) not in self._sessions:
            self._sessions[id(engine)] = Session(engine, journal=self.journal)
        return self._sessions[id(engine)]

    def parted(self, engine: Engine) -> PartedSession:
        """The conversation on `engine` about a recording heard in parts, keeping its turns in the
        recording's journal once it has one."""
        if id(engine) not in self._sessions:
            self._sessions[id(engine)] = PartedSession(engine, self.source)
        parted = self._sessions[id(engine)]
        if parted.journal is None and self.journal is not None:
            parted.journal, parted.kept = self.journal, self.kept
        return parted

    @contextlib.contextmanager
    def asking_in_parts(self, engine: Engine) -> Iterator[PartedSession]:
        """`parted(engine)` for the length of one question. A parted session takes one question at a time
        (its parts read, hear and answer it together): one asked meanwhile (a second tab, Enter and a click
        at once) waits until it has ended, instead of reading and encoding the recording a second time
        into part sessions that replace the first question's."""
        with self._heard:
            while id(engine) in self._hearing:
                self._heard.wait()
            self._hearing.add(id(engine))
        try:
            yield self.parted(engine)
        finally:
            self._let_hear(engine)

    def session(self, engine: Engine) -> tuple[Session, Clip | None]:
        """The conversation on `engine`, and the clip while that conversation has not heard it (a
        first turn that failed or was cancelled is rolled back, so the next one brings the clip)."""
        session = self._session(engine)
        if session.journal is None:
            session.journal = self.journal
        if session.tokens:
            return session, None
        # Features are made when needed, not kept: 30 minutes of them are 90 MB.
        return session, prepare_clip(self.audio, engine.loaded.mel_filters, max_seconds=engine.loaded.max_audio_s)

    @contextlib.contextmanager
    def asking(self, engine: Engine) -> Iterator[tuple[Session, Clip | None]]:
        """`session(engine)` for the length of one question. The clip goes to one question only: one
        asked while another brings it (a second tab, Enter and a click at once) waits until that one
        has ended, then goes on without the clip if the conversation heard it, or with it if that turn
        was rolled back (it failed, or was cut off before the recording was read)."""
        with self._heard:
            while id(engine) in self._hearing:
                self._heard.wait()
            self._hearing.add(id(engine))  # this question decides whether the clip goes with it
        held = True
        try:
            self._session(engine).wait()  # the turn before it is committed or rolled back
            session, clip = self.session(engine)
            if clip is None:  # the conversation heard it: the next question need not wait for this one
                held = False
                self._let_hear(engine)
            yield session, clip
        finally:
            if held:
                self._let_hear(engine)

    def _let_hear(self, engine: Engine) -> None:
        with self._heard:
            self._hearing.discard(id(engine))
            self._heard.notify_all()

    def waveform(self) -> str:
        """The waveform component's value (JSON)."""
        return json.dumps({
            "name": self.name, "url": self.url, "duration": round(self.duration_s, 3), "peaks": self.peaks,
            "parts": [{"start": round(a, 3), "end": round(b, 3)} for a, b in self.parts] if len(self.parts) > 1 else [],
            "steps": [{"start": s.start, "end": s.end, "text": s.text, "part": s.part} for s in self.steps]})


class _PartedTurns:
    """Hands a kept recording's turns, by the model each was asked of, to that model's parted session."""

    def __init__(self, recording: Recording, backend: Backend) -> None:
        self.recording, self.backend = recording, backend

    def replay(self, turns: list[StoredTurn]) -> None:
        by_engine: dict[int, tuple[Engine, list[StoredTurn]]] = {}
        for user, reply in _exchanges(turns):
            engine = _model_for(self.backend, user.think)[0]
            by_engine.setdefault(id(engine), (engine, []))[1].extend((user, reply))
        for engine, asked in by_engine.values():
            self.recording.parted(engine).replay(asked)


def open_recording(path: str, cache_dir: Path, *, owned: bool = False) -> Recording:
    """Decode `path` (any format, up to 4 hours; over 30 minutes it is heard in parts) for questions;
    raises AudioError with one sentence.

    It is decoded once, here, for everything: the waveform's peaks, a 16 kHz WAV copy when the page cannot
    play its format, and the model's audio. A recording the model hears whole is held in memory; a longer
    one, read part by part (never whole in memory), goes to a file of its 16 kHz samples in `cache_dir`,
    from which its parts are read for its first question on each model (`split.Decoded`): decoding a
    compressed file again would cost as much as this (75 minutes of MP3: 6.5 s of two cores).

    `owned` says the file is an upload of ours, one of the recording's `files` (deleted with it).
    """
    made: list[Path] = []  # files written for it: deleted with it, or now if it is refused
    try:
        recording = _read(path, cache_dir, owned, made)
    except BaseException:
        for file in made:
            file.unlink(missing_ok=True)
        raise
    recording.files = (Path(path), *made) if owned else tuple(made)
    return recording


def _read(path: str, cache_dir: Path, owned: bool, made: list[Path]) -> Recording:
    """`open_recording`'s one pass over the recording, part by part as split.py cuts it."""
    name, copy = Path(path).name, None
    if Path(path).suffix.lower() in PLAYABLE:
        url = _served(path, cache_dir, made) if owned else path
    else:  # the page could not play it: it plays what is decoded, as a WAV
        url = _private_name(cache_dir, ".wav")
        made.append(Path(url))
        copy = soundfile.SoundFile(url, "w", SAMPLE_RATE, 1, "PCM_16")
    places, sizes, lows, highs = [], [], [], []
    # A long recording's samples, written as its parts come: next to the WAV copies, so it goes with them
    # (when the recording closes, and with the process's folder, even after a crash), as unguessably named.
    decoded, samples = None, None
    with contextlib.ExitStack() as written:
        if copy is not None:
            written.enter_context(copy)
        for part in written.enter_context(contextlib.closing(split.split_recording(path, part_s=MAX_AUDIO_S))):
            if copy is not None:
                copy.write(part.audio)
            if part.parts == 1:  # all of it, in one part: the model hears it whole
                audio = part.audio.copy()  # its own size (the part's buffer has room for 30 minutes)
                check_length(audio)  # refused now, not at its first question
                return Recording(name, "gradio_api/file=" + url, audio, peaks(audio))
            if samples is None:
                decoded = _private_name(cache_dir, DECODED_SUFFIX)
                made.append(Path(decoded))
                samples = written.enter_context(open(decoded, "wb"))
            part.audio.tofile(samples)
            places.append((part.start_s, part.end_s))
            sizes.append((part.audio.size, part.parts))
            edges = np.arange(0, part.audio.size, PEAK_BIN_SAMPLES)
            lows.append(np.minimum.reduceat(part.audio, edges))
            highs.append(np.maximum.reduceat(part.audio, edges))
    low, high = np.concatenate(lows), np.concatenate(highs)
    edges = np.linspace(0, low.size, PEAK_COLUMNS + 1).astype(np.int64)[:-1]
    edges = np.minimum(edges, low.size - 1)
    summary = np.stack([np.minimum.reduceat(low, edges), np.maximum.reduceat(high, edges)], axis=1)
    return Recording(name, "gradio_api/file=" + url, None, np.round(summary.ravel(), 3).tolist(), parts=tuple(places),
                     source=split.Decoded(decoded, MAX_AUDIO_S, tuple(sizes)))


def _private_name(cache_dir: Path, suffix: str) -> str:
    """A new file's name in the served folder: unguessable, as the folder is served to every page and
    each file in it is one user's recording."""
    return str(cache_dir / f"{secrets.token_urlsafe(16)}{suffix.lower()}")


def _served(path: str, cache_dir: Path, files: list[Path]) -> str:
    """Where the page plays `path` (an upload, or a kept file) from: `path` itself when it is in the
    served folder already, else a link to it there (a copy across file systems), added to `files`. Only that folder is served, never
    the upload folder: Gradio sends a served file inline with the type its name says, and an upload may
    be a page named .html (app/web.py, assemble). So a name there ends in a format the page plays, or
    in SOURCE_SUFFIX (no type: a download, never a page)."""
    if Path(path).resolve().parent == Path(cache_dir).resolve():
        return path
    suffix = Path(path).suffix.lower()
    served = _private_name(cache_dir, suffix if suffix in PLAYABLE else SOURCE_SUFFIX)
    try:
        os.link(path, served)
    except OSError:  # another file system
        shutil.copyfile(path, served)
    files.append(Path(served))
    return served


def length(seconds: float) -> str:
    """A recording's length for the page: m:ss as a player shows it (`clock`), or two significant
    digits of a second under one second, where m:ss would say 0:00 ("0.2 s"; the waveform does the same)."""
    return clock(seconds) if seconds >= 1 else f"{max(seconds, 0.0):.2g} s"


def peaks(audio: np.ndarray, columns: int = PEAK_COLUMNS) -> list[float]:
    """min and max of each of `columns` equal slices of `audio`, flattened: [min0, max0, min1, …]."""
    n = len(audio)
    if n < columns:
        audio = np.pad(audio, (0, columns - n))
        n = columns
    edges = np.linspace(0, n, columns + 1).astype(np.int64)
    lows, highs = np.minimum.reduceat(audio, edges[:-1]), np.maximum.reduceat(audio, edges[:-1])
    return np.round(np.stack([lows, highs], axis=1).ravel(), 3).tolist()


def keep(recording: Recording, store: Store, owner: str, path: str) -> None:
    """Keep a newly opened recording in the store, as conversation `recording.cid` of `owner` with no turns
    yet: its file (an integer WAV as FLAC of the same samples) and its name. KeptError if the disk refuses."""
    try:
        if recording.parts:  # over 30 minutes: copied as it is, in blocks (never whole in memory)
            store.create("recording", owner=owner, title=recording.name, audio=Path(path), id=recording.cid)
        else:
            data, suffix = lossless(load_file(path), Path(path).suffix)
            store.create("recording", owner=owner, title=recording.name, audio=(data, suffix), id=recording.cid)
    except (OSError, StoreError) as exc:
        raise KeptError(f"The recording could not be kept ({exc}); it can be asked about, but will not be in "
                        "your history.") from exc
    recording.kept = store.get(recording.cid, owner=owner).audio
    recording.store = store


def reopen(store: Store, cid: str, owner: str, cache_dir: Path) -> Recording | None:
    """`owner`'s kept recording `cid` as it was left: its audio decoded again from the kept file, its
    questions, answers and latest Think steps; None if `owner` has no such recording. Its sessions are
    rebuilt with its next question (`open_sessions`). Raises AudioError or StoreError if its audio is gone."""
    conversation = store.get(cid, owner=owner)
    if conversation is None or conversation.kind != "recording" or conversation.audio is None:
        return None
    kept = store.audio_path(conversation.audio)
    # A private name for the page to play it from, deleted with the recording (a link: no copy).
    served = _served(str(kept), cache_dir, [])
    try:
        recording = open_recording(served, cache_dir, owned=True)
    except BaseException:
        Path(served).unlink(missing_ok=True)
        raise
    recording.name, recording.cid, recording.kept, recording.owner = conversation.title, cid, conversation.audio, owner
    recording.store = store
    recording.keeping.set()
    exchanges = _exchanges(store.turns(cid))
    recording.opened_with = len(exchanges)
    for user, reply in exchanges:
        recording.chat.append({"role": "user", "content": user.text})
        answer = reply.answer
        if reply.reasoning:
            _message(recording, reply.reasoning, {"title": REASONING_TITLE, "status": "done"})
        if reply.interrupted:
            _message(recording, f"{answer} {CUT_OFF}".strip())
        else:
            _message(recording, answer or "(The model gave no answer after its reasoning.)")
        recording.answer = answer
        if user.think:
            recording.steps = [ThinkStep(s["start"], s.get("end"), s["text"], part=s.get("part")) for s in reply.steps]
    return recording


def latest_answer(store: Store, cid: str, owner: str) -> str:
    """`owner`'s kept recording `cid`'s latest answer, as the page shows it ("" if none, or not theirs)."""
    conversation = store.get(cid, owner=owner)
    if conversation is None or conversation.kind != "recording":
        return ""
    exchanges = _exchanges(store.turns(cid))
    return exchanges[-1][1].answer if exchanges else ""


def _exchanges(turns: list[StoredTurn]) -> list[tuple[StoredTurn, StoredTurn]]:
    return list(zip(turns[0::2], turns[1::2]))


def _models(backend: Backend) -> str:
    """The checkpoints a recording's replies come from: their token ids mean something to these only."""
    main, think = backend.main.loaded.name, backend.think.loaded.name
    return main if backend.think is backend.main else f"{main} + {think}"


def ask(recording: Recording, question: str, think: bool, backend: Backend, store: Store | None = None) -> Iterator[str]:
    """Ask about the recording; streams status lines while `recording.chat`, `.steps` and `.answer`
    fill in. Raises one of USER_ERRORS, with one sentence, for what the user can fix. With `store`,
    the question and its answer are kept there before the answer is done."""
    question = _question(question)
    engine, options = _model_for(backend, think)
    if recording.parts:
        if store is not None:
            yield "Opening the conversation…" if recording.journal is None and recording.cid else "Reading the question…"
            recording.open_sessions(backend, store)
        yield from _ask_in_parts(recording, question, think, engine, options)
        return
    if store is not None:
        yield "Opening the conversation…" if recording.journal is None and recording.cid else "Reading the question…"
        recording.open_sessions(backend, store)
    with recording.asking(engine) as (session, clip):
        kept = recording.kept if session.journal is not None and clip is not None else None
        stream = session.ask(question, clip, think=think, options=options, kept=kept)
        recording.chat.append({"role": "user", "content": question})
        recording.steps = [] if think else recording.steps
        reasoning = answer = None
        done = False
        try:
            yield (f"Listening to the recording ({length(recording.duration_s)}) and reading the question…"
                   if clip else "Reading the question…")
            for event in stream:
                reasoning, answer, done, line = _on_event(recording, event, reasoning, answer, clip is not None)
                if line is not None:
                    yield line
        finally:
            stream.close()  # the turn stops before the clip is handed on (a closed stream cancels it)
            if not done:  # cancelled (a new recording, the page closed) or failed: the chat says it was cut off
                _cut_off(recording, reasoning, answer)


def _ask_in_parts(recording: Recording, question: str, think: bool, engine: Engine,
                  options: GenerationOptions) -> Iterator[str]:
    """`ask` for a recording over 30 minutes: every part asked (progress for the status line), the
    parts' findings as the reasoning, the merged answer as the answer, Think steps at absolute times."""
    with recording.asking_in_parts(engine) as parted:
        first = not parted.heard
        stream = parted.ask(question, think=think, options=options)
        recording.chat.append({"role": "user", "content": question})
        recording.steps = [] if think else recording.steps
        reasoning = answer = None
        done = False
        try:
            yield (f"Reading the recording ({clock(recording.duration_s)}) in {len(recording.parts)} parts…" if first
                   else f"Asking each of the {len(recording.parts)} parts…")
            for event in stream:
                if isinstance(event, PartProgress):
                    yield event.message
                    continue
                reasoning, answer, done, line = _on_event(recording, event, reasoning, answer, first)
                if line is not None and not isinstance(event, (ReasoningDelta, ThinkStep)):  # progress says more
                    yield line
        finally:
            stream.close()  # a question cut off (a new recording, the page closed) stops every part
            if not done:
                _cut_off(recording, reasoning, answer)


def _on_event(recording: Recording, event, reasoning: dict | None, answer: dict | None, first: bool):
    """One turn event into the chat; (reasoning, answer, done, status line or None)."""
    if isinstance(event, ReasoningDelta):
        reasoning = reasoning or _message(recording, "", {"title": REASONING_TITLE, "status": "pending"})
        reasoning["content"] += event.text
        return reasoning, answer, False, "Reasoning…"
    if isinstance(event, TextDelta):
        if reasoning is not None:
            reasoning["metadata"]["status"] = "done"
        answer = answer or _message(recording, "")
        answer["content"] += event.text
        return reasoning, answer, False, "Answering…"
    if isinstance(event, ThinkStep):
        recording.steps.append(event)
        return reasoning, answer, False, "Reasoning…"
    if isinstance(event, TurnDone):
        if event.reply.interrupted:
            _cut_off(recording, reasoning, answer)
        elif reasoning is not None:
            reasoning["metadata"]["status"] = "done"
        recording.answer = event.reply.answer
        if not event.reply.answer.strip() and not event.reply.interrupted:
            _message(recording, "(The model gave no answer after its reasoning.)")
        return reasoning, answer, True, _timings(event.reply.timings, first)
    return reasoning, answer, False, None


CUT_OFF = "(cut off before the answer was finished)"


def _cut_off(recording: Recording, reasoning: dict | None, answer: dict | None) -> None:
    """A turn that ended early: no spinner left turning, and the chat says it was cut off."""
    if reasoning is not None:
        reasoning["metadata"]["status"] = "done"
    if answer is not None:
        answer["content"] += f" {CUT_OFF}"
    else:
        _message(recording, CUT_OFF)


def _question(text: str) -> str:
    text = text.strip()
    if not text:
        raise QuestionError("Type a question about the recording first.")
    if len(text) > MAX_TEXT_CHARS:
        raise QuestionError(f"The question is {len(text):,} characters long; the limit is {MAX_TEXT_CHARS:,}.")
    return text


def _model_for(backend: Backend, think: bool) -> tuple[Engine, GenerationOptions]:
    """The engine and the reply length a question goes to, by mode."""
    return (backend.think, THINK_OPTIONS) if think else (backend.main, ANSWER_OPTIONS)


def _message(recording: Recording, content: str, metadata: dict | None = None) -> dict:
    message = {"role": "assistant", "content": content}
    if metadata:
        message["metadata"] = metadata
    recording.chat.append(message)
    return message


def _timings(t, first: bool) -> str:
    read = f"audio {t.audio_s:.2f} s + encoder {t.encode_s:.2f} s, " if first else ""
    return (f"Done: {read}prefill {t.prefill_s:.2f} s, first token after {t.ttft_s:.2f} s, "
            f"{t.new_tokens} tokens at {t.decode_tok_s:.0f} tokens/s.")




def answer_once(backend: Backend, path: str, question: str, think: bool) -> str:
    """The `ask_recording` API: a fresh session, one question, the answer's text."""
    if not path:
        raise QuestionError("Send an audio file with the question.")
    if not question.strip():
        raise QuestionError("Send a question with the audio file.")
    question = _question(question)
    engine, options = _model_for(backend, think)
    for event in Conversation(Session(engine)).ask(question, path, think=think, options=options):
        if isinstance(event, TurnDone):
            return event.reply.answer
    raise RuntimeError("The turn ended without a reply.")


class QuestionError(ValueError):
    """A question the app cannot take as sent; the message says what to do."""


# What a user can cause (or the disk), each with its one sentence; anything else is a server fault (logged).
USER_ERRORS = (AudioError, ContextFullError, QuestionError, BackendUnavailable, KeptError, StoreError)
