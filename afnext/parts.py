"""A conversation about a recording longer than the model hears: each part asked, the answers merged.

AF-Next hears 30 minutes at most. A longer recording (up to 4 hours, split.py) is cut at quiet
moments into parts of at most 30 minutes, and the conversation about it is held as one `Session` per
part plus a text-only merge session:

1. The first question reads the recording part by part. Each part's session is asked the question
   with the part's clip and where the part lies in the whole; the parts are in flight together on
   the engine, whose steps batch their decodes (their encodes and prefills share each step's
   budgets). A part is handed over once the one before it has begun answering, so at most
   two parts' features (92 MB each) are ever in memory, however long the recording.
2. Each part's answer, its times made absolute (`times.shift_times`), goes into one turn of the
   merge session, which answers the question for the whole recording; that answer streams as the
   turn's answer. In Think mode the parts reason, their `ThinkStep`s carry absolute times and their
   part, and the merge answers plainly from their findings.
3. A follow-up asks every part's session again, without its clip: each KV cache holds its part, so
   nothing is encoded or prefilled again but the question; then the merge.

Why not all parts as clips of one context, which the 131,072-token context would allow up to ~80
minutes (45,000 tokens per 30 minutes)? Every answer would attend over all of it: a follow-up's
decode reads the whole KV cache per token (2.4 GiB per 30 minutes on AF-Next in bf16), the prefill
cost grows with the square of the length, the model was trained on one clip of at most 30 minutes
per turn (its Rotary Time Embeddings restart at 0 for every clip, so two clips' "0:10" look alike),
and past ~80 minutes it cannot work at all. Parts keep each answer within what the model was trained
on, bound every attention to 30 minutes, run side by side, and scale to any length; the price is
that no single forward pass sees two parts at once — the merge sees what each part found, not
the audio, so a question about how the beginning relates to the end is answered from the parts'
words about each.

A turn cut short (cancelled, or a part failed) leaves each session as a cut `Session.ask` does: a
part that had begun answering keeps its answer as far as it got, one that had not is as before the
turn. A part that never heard its clip hears it with the next question (the recording is read again
to find it; parts already heard are not encoded again).
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace

from . import prompt, split
from .audio import MAX_AUDIO_S
from .clip import Clip, prepare_clip
from .engine import Engine
from .events import Interrupted, PartProgress, ReasoningDelta, TextDelta, ThinkStep, TurnDone, clock
from .journal import Journal, KeptError
from .sampling import GenerationOptions
from .scheduler import Cancel
from .session import MAX_TEXT_CHARS, Session
from .store import StoredTurn
from .times import shift_step, shift_times

log = logging.getLogger(__name__)

MAX_QUESTION_CHARS = MAX_TEXT_CHARS // 2  # the merge's question holds the question and every part's answer
JOIN_S = 5.0
# Recordings read at once in the process: each holds a part's samples and features (up to ~300 MB)
# while it is read, so a hundred first questions at once wait here instead of exhausting memory.
MAX_READING = 2
_reading = threading.BoundedSemaphore(MAX_READING)  # how long a finished turn waits for its part threads to end (they end within a step)
_turn_ids = itertools.count(1_000_000_001)  # turn ids of parted turns: apart from Session's


@dataclass(frozen=True)
class PartOptions:
    """How a recording heard in parts is asked about."""

    part_tokens: int = 384  # reply tokens per part's answer: notes for the merge, not the final answer
    think_part_tokens: int = 2048  # per part in Think mode (reasoning, then its answer)
    part_s: float = MAX_AUDIO_S  # the longest part, seconds (the model's limit)
    parallel: bool = True  # False: a part waits for the previous part's whole answer (the benchmark's baseline)


@dataclass(frozen=True)
class _Asked:
    """A completed turn, as each part heard it."""

    question: str
    think: bool
    ids: tuple[tuple[int, ...], ...]  # each part's reply, as generated


@dataclass
class _Part:
    index: int  # 0-based
    start_s: float
    end_s: float
    session: Session
    heard: bool = False  # its session holds its clip, encoded (a turn with it began answering)
    before: int = 0  # messages its session held before the turn in flight: what a turn not kept goes back to
    clip_at: int | None = None  # the message its clip came with

    def progress(self, stage: str, parts: int | None, text: str = "") -> PartProgress:
        return PartProgress(stage, self.index + 1, parts, self.start_s, self.end_s, text)


class PartedSession:
    """One conversation about one long recording (a path, bytes, a (rate, samples) pair, a 16 kHz
    array, or a `split.Decoded`: one decoded already, whose parts are read back without decoding), on one
    engine. One `ask` at a time."""

    def __init__(self, engine: Engine, recording, *, system: str | None = None, base: Session | None = None,
                 options: PartOptions = PartOptions()) -> None:
        """`base`: a conversation held so far (settled, cached), which the recording joins: every part
        starts from a copy of it (`Session.fork`), and it goes on as the merge session."""
        self.engine, self.options, self.system = engine, options, system
        self._recording = recording  # read (again) until every part has heard its clip
        self._parts: list[_Part] = []
        self._count: int | None = None  # parts the recording has, once known
        self._read_all = False  # the recording has been read to its end once
        # What every part starts from: the conversation as it was when the recording joined (ValueError
        # now, not in a part's thread, when it cannot be copied).
        self._base_copy = base.fork(len(base.messages)) if base is not None and base.messages else None
        self._merge = base if base is not None else Session(engine, system=system)
        self.encoded_windows = 0  # 30 s windows prepared for the encoder so far (a follow-up adds none)
        self.journal: Journal | None = None  # where its turns are kept (open_conversation sets it)
        self.kept: str | None = None  # with a journal: the recording's key in its store (the first turn's audio)
        self._history: list[_Asked] = []  # completed turns: what a part hearing its clip later is brought up to
        self._cuts: list[tuple[float, float]] = []  # a rebuilt conversation's parts, as they were cut when kept

    @property
    def cached_tokens(self) -> int:
        """Tokens of the merge session already in its KV cache (the merged turn's prompt)."""
        return self._merge.cached_tokens

    def extend(self, role: str, text: str) -> None:
        """An earlier turn, as a client resending a conversation holds it (text): the merge session
        hears it; the parts, which never answered it, do not."""
        self._merge.extend(role, text)

    @property
    def _complete(self) -> bool:
        """Every part is read and holds its clip: a question needs no reading."""
        return self._read_all and all(p.heard for p in self._parts)

    @property
    def heard(self) -> bool:
        """Whether some part has heard its clip (a first turn that failed before may be dropped)."""
        return any(p.heard for p in self._parts)

    def replay(self, turns: list[StoredTurn]) -> None:
        """Rebuild a kept conversation (journal.restore calls this): the merge session at once (text only),
        each part when the next question reads it again, from the same cuts of the same samples. ValueError
        for turns that are not this kind of conversation."""
        if self._history or self._merge.messages or self._parts:
            raise ValueError("Only a new conversation can be rebuilt from the store.")
        for user, reply in zip(turns[0::2], turns[1::2]):
            if not reply.parts or reply.token_ids is None:
                raise ValueError("a turn was not answered in parts; it was kept by another kind of conversation")
            ids = tuple(tuple(part) for part in reply.parts["ids"])
            if self._history and len(ids) != len(self._history[0].ids):
                raise ValueError("its turns were answered over different numbers of parts")
            self._cuts = [tuple(cut) for cut in reply.parts.get("cuts", ())]
            self._merge.extend("user", reply.parts["merge"])
            self._merge.extend_reply(list(reply.token_ids))
            self._history.append(_Asked(user.text, user.think, ids))

    def _bring_up(self, part: _Part, clip: Clip) -> None:
        """A new part session in a conversation that has had turns: each turn as the part heard it (its
        clip with the first), so its next question sees what a session kept alive all along would."""
        if self._cuts and (part.index >= len(self._cuts) or
                           max(abs(a - b) for a, b in zip(self._cuts[part.index], (part.start_s, part.end_s))) > 0.01):
            raise ValueError("The recording is cut into parts differently now than when this conversation was kept "
                             "(another version of the app); ask about it in a new conversation.")
        part.clip_at = len(part.session.messages)
        for i, asked in enumerate(self._history):
            text = part_question(asked.question, part.index, self._count, part.start_s, part.end_s) if i == 0 \
                else asked.question
            part.session.extend("user", text, clip if i == 0 else None, think=asked.think)
            part.session.extend_reply(list(asked.ids[part.index]), think=asked.think)

    def _keep(self, runs: _Runs, reply, merge_question: str, audio_key: str | None) -> None:
        """Keep a completed turn in the journal: the merged reply, and each part's ids to rebuild it."""
        runs.kept = True
        ids = tuple(runs.ids.get(p.index, ()) for p in self._parts)
        self._history.append(_Asked(runs.text, runs.think, ids))
        if all(p.heard for p in self._parts) and not isinstance(self._recording, (str, os.PathLike)):
            self._recording = None  # in memory (an upload's bytes): never read again, every part holds its clip
        if self.journal is None:
            return
        try:
            self.journal.commit(runs.text, runs.think, audio_key, reply, parts={
                "ids": [list(i) for i in ids], "merge": merge_question,
                "cuts": [[p.start_s, p.end_s] for p in self._parts]})
        except KeptError:  # the journal is broken now: the reader sees this, later turns the same sentence
            log.exception("conversation %s: a turn could not be kept", self.journal.cid)
            raise

    def _new_part_session(self) -> Session:
        if self._base_copy is None:
            return Session(self.engine, system=self.system)
        return self._base_copy.fork(len(self._base_copy.messages))

    @property
    def parts(self) -> list[tuple[float, float]]:
        """(start_s, end_s) of each part read so far, in the whole recording."""
        return [(p.start_s, p.end_s) for p in self._parts]

    @property
    def cache_bytes(self) -> int:
        return sum(p.session.cache_bytes for p in self._parts) + self._merge.cache_bytes

    def ask(self, text: str, *, think: bool = False, options: GenerationOptions = GenerationOptions(),
            cancel: threading.Event | None = None) -> Iterator:
        """Ask about the whole recording; streams `PartProgress` as parts are read, heard and answered,
        `ReasoningDelta` with each part's findings, `ThinkStep`s at absolute times, then the merged
        answer's `TextDelta`s, `Interrupted` if cut short, and `TurnDone`. Closing the stream or setting
        `cancel` stops every part. Raises AudioError (the recording), ValueError (the question)."""
        prompt.check_text(text)
        if not text.strip():
            raise ValueError("Ask a question about the recording.")
        if len(text) > MAX_QUESTION_CHARS:  # the parts' questions and the merge's notes need the rest
            raise ValueError(f"The question is {len(text):,} characters long; about a recording heard in parts "
                             f"the limit is {MAX_QUESTION_CHARS:,}.")
        prompt.check_control_tokens(self.engine.loaded, text)
        audio_key = None
        if self.journal is not None:
            self.journal.check()
            if not self._history and self.journal.turns == 0:
                if self.kept is None:
                    raise ValueError("A kept conversation about a recording needs the recording's key in the store.")
                audio_key = self.journal.put(self.kept)  # held until the turn is kept or dropped
        unread = self.journal.unread(audio_key) if self.journal is not None else None
        return self._turn(next(_turn_ids), text, think, options, Cancel(cancel), audio_key, unread)

    def _turn(self, turn: int, text: str, think: bool, options: GenerationOptions, cancel: Cancel,
              audio_key: str | None = None, unread=None):
        if unread is not None:
            unread.started()  # this body lets the recording's audio go from here (see Journal.unread)
        t0 = time.perf_counter()
        runs = _Runs(self, text, think, options, cancel, turn)
        try:
            yield from runs.parts()
            if cancel.is_set():
                yield Interrupted("cancelled before the parts had answered", turn=turn)
                return
            yield PartProgress("merging", 0, len(self._parts), turn=turn)
            yield from self._merged(runs, text, options, cancel, t0, turn, audio_key)
            audio_key = None  # kept with the turn (commit lets go of it)
        finally:
            if runs.running():  # the stream was closed early: every part stops before its next step
                cancel.set()
            runs.join()
            if not runs.kept:
                runs.roll_back()
            if self.journal is not None:
                self.journal.release(audio_key)

    def _merged(self, runs: _Runs, text: str, options: GenerationOptions, cancel: Cancel, t0: float, turn: int,
                audio_key: str | None = None):
        """The merge session's turn on the parts' answers; its answer is the turn's answer."""
        question = merge_question(text, [(p.start_s, p.end_s, runs.answers.get(p.index, "")) for p in self._parts],
                                  runs.total_s)
        reply, reasoning = None, ""
        for event in self._merge.ask(question, options=options, cancel=cancel):
            if isinstance(event, TurnDone):
                reply = event.reply
            elif isinstance(event, ReasoningDelta):
                yield replace(event, text=("" if reasoning else "\n\n") + event.text, turn=turn)
                reasoning += event.text
            elif isinstance(event, (TextDelta, Interrupted)):
                yield replace(event, turn=turn)
        if reply is None:  # cancelled before the merge began answering
            return
        ttft = reply.timings.ttft_s + (runs.t_merge - t0)
        notes = runs.notes() + (f"\n\n{reply.reasoning}" if reply.reasoning else "")
        steps = tuple(sorted(runs.steps, key=lambda s: (s.start, s.part)))  # in time order, whichever part finished first
        whole = replace(reply, reasoning=notes, steps=steps, timings=replace(
            reply.timings, audio_s=runs.audio_s, encode_s=runs.encode_s, prefill_s=runs.prefill_s, ttft_s=ttft))
        self._keep(runs, whole, question, audio_key)  # before TurnDone: a turn reported done is kept
        yield TurnDone(whole, turn=turn)


def merge_question(question: str, answers: list[tuple[float, float, str]], total_s: float) -> str:
    """The merge session's turn: each part's answer with its place in the recording, then the question."""
    room = max(200, (MAX_TEXT_CHARS - len(question) - 1000) // max(1, len(answers)))  # characters per part
    notes = "\n\n".join(f"Part {i} of {len(answers)} ({clock(start)}–{clock(end)}): {_cut(answer.strip(), room) or '(no answer)'}"
                        for i, (start, end, answer) in enumerate(answers, 1))
    return (f"A recording of {clock(total_s)} was too long to hear at once, so it was heard in {len(answers)} parts. "
            f"Here is what each part gave for the question below (times are in the whole recording).\n\n{notes}\n\n"
            f"Question: {question.strip()}\nAnswer it for the whole recording in one answer, from what the parts "
            "found; give times as above.")


class _Runs:
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
        self.reasoning: dict[int, str] = {}
        self.steps: list[ThinkStep] = []
        self.audio_s = self.encode_s = self.prefill_s = 0.0
        self.t_merge = 0.0
        self._threads: list[threading.Thread] = []
        self._began: dict[int, threading.Event] = {}
        self.kept = False  # the turn was kept (its merge began answering): else every part goes back
        self._launched: list[_Part] = []

    def roll_back(self) -> None:
        """A turn that was not kept counts in no part: each goes back to before it (a part that heard its
        clip only with it will hear it again), so the parts, the store and a rebuilt conversation agree."""
        for part in self._launched:
            if len(part.session.messages) > part.before:
                part.session.truncate(part.before)
            if part.clip_at is not None and part.clip_at >= part.before:
                part.heard, part.clip_at = False, None

    @property
    def total_s(self) -> float:
        return self.owner._parts[-1].end_s if self.owner._parts else 0.0

    def running(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    def join(self) -> None:
        for thread in self._threads:
            thread.join(JOIN_S)

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
                part = _Part(piece.index, piece.start_s, piece.end_s, owner._new_part_session())
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

    def _launch(self, part: _Part, clip, release: Clip | None = None) -> None:
        """Ask part `part` (with its clip the first time it hears it); `release`: a clip it was brought up
        with, whose features are let go like its own."""
        if self.cancel.is_set():
            return
        self._began[part.index] = threading.Event()
        question = self.text if clip is None else part_question(self.text, part.index, self.owner._count,
                                                                part.start_s, part.end_s)
        part.before = len(part.session.messages)
        if clip is not None:
            part.clip_at = part.before
        self._launched.append(part)
        stream = part.session.ask(question, clip, think=self.think, options=self.part_options, cancel=self.cancel)
        self.out.put((part.index, part.progress("listening", self.owner._count)))
        self._start(self._drain, f"afnext-part-{part.index + 1}", part, stream, clip or release)

    def _drain(self, part: _Part, stream, clip: Clip | None) -> None:
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


def _cut(text: str, chars: int) -> str:
    return text if len(text) <= chars else text[: chars - 1].rstrip() + "…"


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
