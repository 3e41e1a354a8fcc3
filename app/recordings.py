"""The Recordings tab's recording: an upload decoded once (`open_recording`: the waveform's peaks, a copy
the page plays, the model's audio) into a `Recording`, with its sessions and the latest Think steps for
the waveform. Gradio-free, so tests call it directly; app/recording_questions.py keeps it, reopens it
and asks about it.

A `Recording` is one conversation about one recording: its audio, the waveform's peaks and one
`Session` per engine, so the recording is encoded by the first question on that engine and every
follow-up prefills only its own tokens. It is held live by the app's `Live` registry; once kept, its
sessions are rebuilt from the store with its next question (`open_sessions`).
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
from afnext.audio import MAX_AUDIO_S, SAMPLE_RATE
from afnext.clip import Clip, check_length, prepare_clip
from afnext.engine import Engine
from afnext.events import ThinkStep, clock
from afnext.journal import Journal, open_conversation
from afnext.parts import PartedSession
from afnext.sampling import GenerationOptions
from afnext.session import Session
from afnext.store import Store, StoredTurn

from .backend import Backend

log = logging.getLogger(__name__)

PEAK_COLUMNS = 1600  # min/max pairs sent for the waveform: finer than any page is wide
PEAK_BIN_SAMPLES = 1600  # samples (0.1 s) per min/max kept while a long recording is read: 4 h make 144,000
# Containers Chromium, Firefox and Safari play (mostly); anything else is served as a 16 kHz WAV.
PLAYABLE = frozenset(".wav .mp3 .flac .ogg .oga .opus .webm .m4a .aac .mp4".split())
SOURCE_SUFFIX = ".source"  # a kept file in a format the page cannot play, linked where the page's files are
DECODED_SUFFIX = ".f32"  # a long recording's decoded 16 kHz samples (split.Decoded): no type, never a page
ANSWER_OPTIONS = GenerationOptions(max_new_tokens=1024)  # the Instruct card's setting
THINK_OPTIONS = GenerationOptions(max_new_tokens=4096)  # the Think card's setting


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
    def held_bytes(self) -> int:
        """What the Live registry counts for it: its samples, when held whole (up to 115 MB for 30 minutes,
        from an upload that may be a few MB of compressed audio), and its sessions' KV caches."""
        samples = 0 if self.audio is None else self.audio.nbytes
        return samples + sum(s.cache_bytes for s in self._sessions.values())

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
        route = lambda user: self._session(model_for(backend, user.think)[0])  # noqa: E731
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
        for user, reply in exchanges_in(turns):
            engine = model_for(self.backend, user.think)[0]
            by_engine.setdefault(id(engine), (engine, []))[1].extend((user, reply))
        for engine, asked in by_engine.values():
            self.recording.parted(engine).replay(asked)


def exchanges_in(turns: list[StoredTurn]) -> list[tuple[StoredTurn, StoredTurn]]:
    return list(zip(turns[0::2], turns[1::2]))


def _models(backend: Backend) -> str:
    """The checkpoints a recording's replies come from: their token ids mean something to these only."""
    main, think = backend.main.loaded.name, backend.think.loaded.name
    return main if backend.think is backend.main else f"{main} + {think}"


def model_for(backend: Backend, think: bool) -> tuple[Engine, GenerationOptions]:
    """The engine and the reply length a question goes to, by mode."""
    return (backend.think, THINK_OPTIONS) if think else (backend.main, ANSWER_OPTIONS)


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
        url = served_path(path, cache_dir, made) if owned else path
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


def served_path(path: str, cache_dir: Path, files: list[Path]) -> str:
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
