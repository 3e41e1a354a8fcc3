"""A conversation about a recording longer than the model hears: each part asked, the answers merged.

AF-Next hears 30 minutes at most. A longer recording (up to 4 hours, split.py) is cut at quiet
moments into parts of at most 30 minutes, and the conversation about it is held as one `Session` per
part plus a text-only merge session:

1. The first question reads the recording part by part. Each part's session is asked the question
   with the part's clip and where the part lies in the whole; the parts are in flight together on
   the engine, whose steps batch their decodes (their encodes and prefills share each step's
   budgets); at most two parts' features (92 MB each) are in memory at a time.
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

One turn over the parts (the threads that read the recording and ask each part, their events) runs in
part_runs.py. A turn cut short before the merge began answering (cancelled, or a part failed) is not
kept and counts in no part: every part goes back to before it, so the parts, the store and a rebuilt
conversation agree. A part that never heard its clip hears it with the next question (the recording is
read again to find it; parts already heard are not encoded again).
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace

from . import prompt
from .audio import MAX_AUDIO_S
from .clip import Clip
from .engine import Engine
from .events import Interrupted, PartProgress, ReasoningDelta, TextDelta, TurnDone, clock
from .journal import Journal, KeptError
from .part_runs import Part, Runs, part_question
from .sampling import GenerationOptions
from .scheduler import Cancel
from .session import MAX_TEXT_CHARS, Session
from .store import StoredTurn

log = logging.getLogger(__name__)

MAX_QUESTION_CHARS = MAX_TEXT_CHARS // 2  # the merge's question holds the question and every part's answer
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
        self._parts: list[Part] = []
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

    def _bring_up(self, part: Part, clip: Clip) -> None:
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

    def _keep(self, runs: Runs, reply, merge_question: str, audio_key: str | None) -> None:
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
        runs = Runs(self, text, think, options, cancel, turn)
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

    def _merged(self, runs: Runs, text: str, options: GenerationOptions, cancel: Cancel, t0: float, turn: int,
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
        whole = replace(reply, reasoning=notes, steps=steps, parts=runs.usage(), timings=replace(
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


def _cut(text: str, chars: int) -> str:
    return text if len(text) <= chars else text[: chars - 1].rstrip() + "…"
