"""One turn about a recording heard in parts (parts.py), run over every part: the threads that read the
recording and ask each part, the events they report, and a turn not kept rolled back.

A reader thread reads the recording part by part (on a first turn, or while some part has not heard its
clip; MAX_READING recordings at a time in the process) and hands each part's session its question and
clip; one thread per part drains its stream; they all report to one queue, which the turn relays as
`PartProgress`, each part's findings, and `ThinkStep`s at absolute times. A part is handed over once the
one before it has begun answering, so at most two parts' features (92 MB each) are ever in memory,
however long the recording. A follow-up asks every part at once, without its clip.

A turn not kept counts in no part: each part's session goes back to before it (`Runs.roll_back`), and a
part that heard its clip only with that turn hears it again with the next question.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from . import split
from .clip import Clip, prepare_clip
from .events import Interrupted, PartProgress, PartsUsage, ReasoningDelta, ThinkStep, TurnDone, clock
from .sampling import GenerationOptions
from .scheduler import Cancel
from .session import Session
from .times import shift_step, shift_times

if TYPE_CHECKING:
    from .parts import PartedSession

JOIN_S = 5.0  # how long a finished turn waits for its part threads to end (they end within a step)
# Recordings read at once in the process: each holds a part's samples and features (up to ~300 MB)
# while it is read, so a hundred first questions at once wait here instead of exhausting memory.
MAX_READING = 2
_reading = threading.BoundedSemaphore(MAX_READING)


@dataclass
class Part:
    """A part of the recording: where it lies in the whole, its session, and what that session holds."""

    index: int  # 0-based
    start_s: float
    end_s: float
    session: Session
    heard: bool = False  # its session holds its clip, encoded (a turn with it began answering)
    before: int = 0  # messages its session held before the turn in flight: what a turn not kept goes back to
    clip_at: int | None = None  # the message its clip came with

    def progress(self, stage: str, parts: int | None, text: str = "") -> PartProgress:
        return PartProgress(stage, self.index + 1, parts, self.start_s, self.end_s, text)


class Runs:
    """One parted turn in flight: a reader thread that reads the recording (on a first turn) and hands
    each part to the engine, one thread per part draining its stream, and one queue they all report to."""

    def __init__(self, owner: PartedSession, text: str, think: bool, options: GenerationOptions,
                 cancel: Cancel, turn: int) -> None:
        self.owner, self.text, self.think, self.cancel, self.turn = owner, text, think, cancel, turn
        tokens = owner.options.think_part_tokens if think else owner.options.part_tokens
        self.part_options = replace(options, max_new_tokens=min(tokens, options.max_new_tokens), min_new_tokens=0)
        self.out: queue.Queue = queue.Queue()
        self.answers: dict[int, str] = {}
        self.ids: dict[int, tuple[int, ...]] = {}  # each part's reply, as generated
        self.read: dict[int, tuple[int, int]] = {}  # each part's prompt tokens, and those it had cached
        self.cached: dict[int, int] = {}  # each part's KV cache as its turn was asked
        self.reasoning: dict[int, str] = {}
        self.steps: list[ThinkStep] = []
        self.audio_s = self.encode_s = self.prefill_s = 0.0
        self.t_merge = 0.0
        self._threads: list[threading.Thread] = []
        self._began: dict[int, threading.Event] = {}
        self.kept = False  # the turn was kept (its merge began answering): else every part goes back
        self._launched: list[Part] = []

    def roll_back(self) -> None:
        """A turn that was not kept counts in no part: each goes back to before it (a part that heard its
        clip only with it will hear it again), so the parts, the store and a rebuilt conversation agree."""
        for part in self._launched:
            if len(part.session.messages) > part.before:
                part.session.truncate(part.before)
            if part.clip_at is not None and part.clip_at >= part.before:
                part.heard, part.clip_at = False, None
            elif part.session.unencoded_clips:  # brought up with its clip, whose encoding a failed turn undid
                part.heard = False  # (its features were let go once it began answering): it is read again

    @property
    def total_s(self) -> float:
        return self.owner._parts[-1].end_s if self.owner._parts else 0.0

    def running(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    def join(self) -> None:
        for thread in self._threads:
            thread.join(JOIN_S)

    def usage(self) -> PartsUsage:
        """What the parts that answered read and wrote for this turn."""
        return PartsUsage(sum(p for p, _ in self.read.values()), sum(c for _, c in self.read.values()),
                          sum(map(len, self.ids.values())))

    def notes(self) -> str:
        parts = self.owner._parts
        return "\n\n".join(f"Part {p.index + 1} of {len(parts)} ({clock(p.start_s)}–{clock(p.end_s)}): "
                           f"{self.reasoning.get(p.index, '')}".rstrip() for p in parts)

    def parts(self) -> Iterator:
        """Start the parts, relay their events; returns once every part has answered (or raises)."""
        self._start(self._launch_all if self.owner._complete else self._read, "afnext-parts-reader")
        failure = None
        while self.running() or not self.out.empty():
            try:
                item = self.out.get(timeout=0.1)
            except queue.Empty:
                continue
            if isinstance(item, BaseException):
                failure = failure or item
                self.cancel.set()
                continue
            yield from self._on(*item)
        self.t_merge = time.perf_counter()
        if failure is not None:
            raise failure

    def _start(self, target, name: str, *args) -> None:
        thread = threading.Thread(target=self._guarded, args=(target, *args), name=name, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _guarded(self, target, *args) -> None:
        try:
            target(*args)
        except BaseException as exc:  # raised in the reader of the turn
            self.out.put(exc)

    def _read(self) -> None:
        """Read the recording part by part (MAX_READING recordings at a time in the process)."""
        while not _reading.acquire(timeout=0.05):
            if self.cancel.is_set():
                return
        try:
            self._read_parts()
        finally:
            _reading.release()

    def _read_parts(self) -> None:
        """Hand each part to the engine once the one before has begun answering."""
        owner = self.owner
        loaded = owner.engine.loaded
        assert owner._recording is not None, "a recording is let go only once every part holds its clip"
        for piece in split.split_recording(owner._recording, part_s=min(owner.options.part_s, loaded.max_audio_s)):
            if self.cancel.is_set():
                return
            owner._count = piece.parts
            if piece.index < len(owner._parts) and owner._parts[piece.index].heard:
                part, clip = owner._parts[piece.index], None  # heard on a turn cut short: not encoded again
            else:
                t0 = time.perf_counter()
                clip = prepare_clip(piece.audio, loaded.mel_filters, max_seconds=loaded.max_audio_s)
                self.audio_s += time.perf_counter() - t0
                owner.encoded_windows += len(clip.frames)
                part = Part(piece.index, piece.start_s, piece.end_s, owner._new_part_session())
                owner._parts[piece.index:piece.index + 1] = [part]
            del piece  # its samples: the clip holds the features now
            self.out.put((part.index, part.progress("read", owner._count)))
            if self._began:
                self._wait_for(len(self._began) - 1)
            if clip is not None and owner._history:  # a kept conversation rebuilt: the turns before, then this one
                owner._bring_up(part, clip)
                self._launch(part, None, release=clip)
            else:
                self._launch(part, clip)
        owner._count = len(owner._parts)
        owner._read_all = not self.cancel.is_set()

    def _launch_all(self) -> None:
        for part in self.owner._parts:
            self._launch(part, None)

    def _wait_for(self, index: int) -> None:
        """Until part `index` has begun answering (or, one after another, finished)."""
        while not self._began[index].wait(0.05):
            if self.cancel.is_set():
                return

    def _launch(self, part: Part, clip, release: Clip | None = None) -> None:
        """Ask part `part` (with its clip the first time it hears it); `release`: a clip it was brought up
        with, whose features are let go like its own."""
        if self.cancel.is_set():
            return
        self._began[part.index] = threading.Event()
        question = self.text if clip is None else part_question(self.text, part.index, self.owner._count,
                                                                part.start_s, part.end_s)
        part.before = len(part.session.messages)
        self.cached[part.index] = part.session.cached_tokens
        if clip is not None:
            part.clip_at = part.before
        self._launched.append(part)
        stream = part.session.ask(question, clip, think=self.think, options=self.part_options, cancel=self.cancel)
        self.out.put((part.index, part.progress("listening", self.owner._count)))
        self._start(self._drain, f"afnext-part-{part.index + 1}", part, stream, clip or release)

    def _drain(self, part: Part, stream, clip: Clip | None) -> None:
        began = self._began[part.index]
        try:
            for event in stream:
                if not isinstance(event, Interrupted):  # it is answering: its clip is encoded, in its cache
                    part.heard = True
                    _let_go(clip)  # a turn rolled back before this keeps its clip, to be encoded with the next
                    if self.owner.options.parallel or isinstance(event, TurnDone):
                        began.set()
                self.out.put((part.index, event))
        finally:
            began.set()
            stream.close()

    def _on(self, index: int, event) -> Iterator:
        part = self.owner._parts[index]
        if isinstance(event, PartProgress):
            yield replace(event, parts=self.owner._count, turn=self.turn)
        elif isinstance(event, ThinkStep):
            # Its times, and its sentence's, in the whole (kept where the model already answered in the whole's).
            step = replace(shift_step(event, part.start_s, part.end_s - part.start_s), part=index + 1, turn=self.turn)
            self.steps.append(step)
            yield step
        elif isinstance(event, TurnDone):
            reply, shift = event.reply, part.start_s
            self.ids[index] = reply.token_ids
            self.read[index] = (reply.prompt_tokens, self.cached.get(index, 0))
            duration = part.end_s - part.start_s
            self.answers[index] = shift_times(reply.answer, shift, duration)
            found = shift_times(reply.reasoning, shift, duration)
            self.reasoning[index] = f"{found}\n{self.answers[index]}".strip() if found else self.answers[index]
            self.encode_s += reply.timings.encode_s
            self.prefill_s += reply.timings.prefill_s
            yield ReasoningDelta(f"{'' if index == 0 else chr(10) * 2}Part {index + 1}"
                                 f"{f' of {self.owner._count}' if self.owner._count else ''} "
                                 f"({clock(part.start_s)}–{clock(part.end_s)}): {self.reasoning[index]}", turn=self.turn)
            yield replace(part.progress("answered", self.owner._count, self.answers[index]), turn=self.turn)


def _let_go(clip: Clip | None) -> None:
    """Free a part's features (92 MB per 30 minutes) once the engine is done with them, though the
    part's turn still refers to its clip: the clip is this module's alone, so at most two parts'
    features are ever held, however many parts are answering."""
    if clip is not None:
        clip.features.set_()


def part_question(question: str, index: int, parts: int | None, start_s: float, end_s: float) -> str:
    """A part's first question: where the part lies, then the question."""
    of = f" of {parts}" if parts else ""
    return (f"This clip is part {index + 1}{of} of a longer recording: it runs from {clock(start_s)} to "
            f"{clock(end_s)} of the whole. Answer from this part alone, and say so if it does not tell.\n"
            f"{question.strip()}")
