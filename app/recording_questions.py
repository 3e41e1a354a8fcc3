"""Asking about a `Recording` (app/recordings.py), and keeping it: questions and follow-ups streamed
into its chat, with its Think steps for the waveform (`ask`), the ask_recording API's one question
(`answer_once`), and the errors a user can cause. Gradio-free apart from the message dicts its chatbot
takes, so tests call it directly.

A recording is kept in the store from its upload on (`keep`: the recording's file, then each question and
answer as it completes), and rebuilt from the store with its questions and answers (`reopen`) when it is
opened again: after a reload, a restart, or once the app's `Live` registry has let go of it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from afnext.audio import AudioError, load_file
from afnext.engine import Engine
from afnext.events import PartProgress, ReasoningDelta, TextDelta, ThinkStep, TurnDone, clock
from afnext.conversation import Conversation
from afnext.journal import KeptError, lossless
from afnext.sampling import GenerationOptions
from afnext.session import MAX_TEXT_CHARS, ContextFullError, Session
from afnext.store import Store, StoreError

from .backend import Backend, BackendUnavailable
from .recordings import Recording, exchanges_in, length, model_for, open_recording, served_path

REASONING_TITLE = "Reasoning"


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
    served = served_path(str(kept), cache_dir, [])
    try:
        recording = open_recording(served, cache_dir, owned=True)
    except BaseException:
        Path(served).unlink(missing_ok=True)
        raise
    recording.name, recording.cid, recording.kept, recording.owner = conversation.title, cid, conversation.audio, owner
    recording.store = store
    recording.keeping.set()
    exchanges = exchanges_in(store.turns(cid))
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
    exchanges = exchanges_in(store.turns(cid))
    return exchanges[-1][1].answer if exchanges else ""


def ask(recording: Recording, question: str, think: bool, backend: Backend, store: Store | None = None) -> Iterator[str]:
    """Ask about the recording; streams status lines while `recording.chat`, `.steps` and `.answer`
    fill in. Raises one of USER_ERRORS, with one sentence, for what the user can fix. With `store`,
    the question and its answer are kept there before the answer is done."""
    question = _question(question)
    engine, options = model_for(backend, think)
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
        with _as_question_error():
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
        with _as_question_error():
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


@contextlib.contextmanager
def _as_question_error() -> Iterator[None]:
    """A question the model's conversation refuses before asking (longer than a recording heard in parts
    takes, a control token spelled out) is the user's to fix: one sentence, not a server failure."""
    try:
        yield
    except USER_ERRORS:
        raise
    except ValueError as exc:
        raise QuestionError(str(exc)) from exc


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
    engine, options = model_for(backend, think)
    for event in Conversation(Session(engine)).ask(question, path, think=think, options=options):
        if isinstance(event, TurnDone):
            return event.reply.answer
    raise RuntimeError("The turn ended without a reply.")


class QuestionError(ValueError):
    """A question the app cannot take as sent; the message says what to do."""


# What a user can cause (or the disk), each with its one sentence; anything else is a server fault (logged).
USER_ERRORS = (AudioError, ContextFullError, QuestionError, BackendUnavailable, KeptError, StoreError)
