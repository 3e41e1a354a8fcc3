"""A conversation with AF-Next: any number of turns, each with its own optional audio clip.

The session keeps the conversation as the model sees it (`tokens`) and a KV cache of it, so a new
turn encodes only its own clip and prefills only its own tokens. The token layout is exactly what the
checkpoint's chat template and processor produce for the messages (prompt.py). The session builds
each turn as a request for the engine, whose scheduler runs it beside every other session's turns;
the session commits or rolls back the turn when the engine reports on it (on the engine's thread, so
a stream closed by its reader still leaves the conversation right).

A cancelled reply stays in the conversation as far as it got, closed with `<|im_end|>`, so the model
knows what it had said before it was interrupted. A turn cancelled before its reply began, or one
that failed, leaves the session exactly as it was before the turn.

A session given a `Journal` (afnext/journal.py) keeps each completed turn in the store at the moment
it commits it, so the store and the session never differ, and a turn is on disk before its
`TurnDone` is sent.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import partial

from . import cores, prompt
from .clip import Clip, prepare_clip
from .engine import PREFILLED, ContextFullError, Engine, Finished
from .events import Interrupted, ReasoningDelta, Reply, TextDelta, ThinkStep, Timings, TurnDone
from .journal import Journal, Unread
from .prompt import MAX_TEXT_CHARS, THINK_PREFILL, THINK_PROMPT, THINK_PROMPT_INSTRUCT  # noqa: F401 (public here too)
from .sampling import GenerationOptions
from .scheduler import WAITING, Cancel, Request
from .think import ThinkParser

log = logging.getLogger(__name__)

TurnEvent = TextDelta | ReasoningDelta | ThinkStep | Interrupted | TurnDone


class _Pending:
    def __repr__(self) -> str:
        return "PENDING"


PENDING = _Pending()  # what a stream asked with `wake` yields while the engine has nothing new for it
CANCEL_POLL_S = 0.01  # how often a queued turn's stream looks at the caller's cancel event
_turn_ids = itertools.count(1)  # turn ids, unique in the process: events carry them


class Session:
    """One conversation. One `ask` at a time: a new ask waits until the engine has settled the
    previous turn (at most one engine step after that turn was cancelled)."""

    def __init__(self, engine: Engine, *, system: str | None = None, use_cache: bool = True,
                 journal: Journal | None = None) -> None:
        self.engine = engine
        self.journal = journal  # where completed turns are kept (None: nowhere)
        self.use_cache = use_cache  # False: recompute everything every turn (the reference path)
        self.messages: list[dict] = [{"role": "system", "content": system}] if system else []
        self._opening_system = bool(system)  # messages[0] is the conversation's system prompt
        self.tokens: list[int] = []  # the whole conversation as token ids
        self._cache = None  # KV cache holding tokens[:self._cached]
        self._cached = 0
        self._clips: list[Clip] = []  # every clip so far, kept for the no-cache path only
        self._pending: list[Clip] = []  # clips of tokens[_cached:], added by `extend`: encoded with the next turn
        self._reply_at: int | None = None  # where the last generated reply's "<|im_start|>assistant" begins
        self._last_clip_s: float | None = None  # duration of the latest clip: what Think steps point into
        # Per message: (tokens up to its end, _last_clip_s after it), so `fork` can cut at any message.
        self._marks: list[tuple[int, float | None]] = [(0, None)] * len(self.messages)
        self._settled = threading.Event()  # no turn of this session is in the engine
        self._settled.set()
        self._request: Request | None = None
        # One turn handed to the engine at a time, and no change to the conversation (another thread's
        # `extend`, `rewrite_reply`, …) while a turn is built and handed over (`_between_turns`).
        self._submitting = threading.RLock()

    @property
    def ahead(self) -> int | None:
        """Requests of other sessions the engine will start before this session's waiting turn;
        None when no turn of this session is waiting."""
        request = self._request
        return None if request is None else self.engine.ahead(request)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the engine has settled this session's last turn (committed or rolled back);
        False on timeout. A closed or cancelled stream returns at once; this is how to see its result."""
        return self._settled.wait(timeout)

    @contextmanager
    def _between_turns(self) -> Iterator[None]:
        """Held while the conversation changes outside a turn: no turn runs, and none is handed to the
        engine until the change is whole (a turn's thread and a socket's reader may both change it)."""
        while True:
            self._settled.wait()
            self._submitting.acquire()
            if self._settled.is_set():
                break
            self._submitting.release()  # a turn was handed over meanwhile: wait for it too
        try:
            yield
        finally:
            self._submitting.release()

    def extend(self, role: str, text: str = "", audio=None, *, think: bool = False) -> None:
        """Append an earlier message without generating: a user turn (text and/or a clip; `think`: it
        was asked in Think mode), an assistant reply (text) or a system message (text: instructions
        given mid-conversation), as a client resending a conversation's history holds it. Its tokens
        are prefilled, and its clip encoded, with the next turn. Raises as `ask` does for bad input."""
        prompt.check_text(text, {"user": "A user message", "system": "A system message"}.get(role, "A reply"))
        if role not in ("user", "assistant", "system") or (role != "user" and audio is not None):
            raise ValueError("Only user turns (text and/or audio), assistant replies (text) and system messages "
                             "(text) can be added.")
        loaded = self.engine.loaded
        prompt.check_control_tokens(loaded, text)
        clip = audio if isinstance(audio, Clip) or audio is None else prepare_clip(
            audio, loaded.mel_filters, max_seconds=loaded.max_audio_s)
        if role == "user":
            message = prompt.user_message(text, has_clip=clip is not None, think=think, is_think=loaded.is_think)
        else:
            message = (prompt.assistant_message if role == "assistant" else prompt.system_message)(text)
        with self._between_turns():
            ids = prompt.message_ids(loaded, self.messages, message, clip.tokens if clip else None)
            self._budget(len(ids), GenerationOptions(max_new_tokens=1))  # ContextFullError if it cannot fit
            if role == "assistant":  # now the last reply: what `rewrite_reply` cuts back
                self._reply_at = len(self.tokens)
            self.tokens += ids
            self.messages.append(message)
            if clip is not None:
                self._last_clip_s = clip.duration_s
                (self._pending if self.use_cache else self._clips).append(clip)
            self._marks.append((len(self.tokens), self._last_clip_s))

    def add_exchange(self, text: str, audio, reply: str) -> None:
        """Append an exchange a client gives whole, without generating (its own conversation items): a
        user turn (text and/or audio; neither: the reply stands alone, as one the assistant began
        with) and the reply to it, as text. Prefilled with the next turn. A journal keeps it as a
        completed turn, the reply by its text. Raises as `extend` for bad input, KeptError if it cannot
        be kept; either way the session is as before."""
        with self._between_turns():
            prompt.check_text(text)
            prompt.check_text(reply, "A reply")
            loaded = self.engine.loaded
            prompt.check_control_tokens(loaded, text + "\n" + reply)
            keep = audio_key = None
            if self.journal is not None:
                self.journal.check_not_behind()
                if audio is not None:
                    audio, keep = self.journal.audio(audio)
            clip = audio if isinstance(audio, Clip) or audio is None else prepare_clip(
                audio, loaded.mel_filters, max_seconds=loaded.max_audio_s)
            before = (len(self.tokens), len(self.messages), len(self._clips), list(self._pending), self._last_clip_s,
                      self._reply_at)
            user = bool(text.strip()) or clip is not None
            try:
                if user:
                    self.extend("user", text, clip)
                self.extend("assistant", reply)
                if self.journal is not None:
                    audio_key = self.journal.put(keep) if keep is not None else None
                    given, audio_key = audio_key, None  # commit_given lets it go, kept or not
                    self.journal.commit_given(text if user else "", given, reply, self._instructions_before(user))
            except BaseException:
                if self.journal is not None:
                    self.journal.release(audio_key)
                tokens, messages, clips, self._pending, self._last_clip_s, self._reply_at = before
                del self.tokens[tokens:], self.messages[messages:], self._marks[messages:], self._clips[clips:]
                raise

    def extend_reply(self, token_ids: list[int], *, think: bool = False) -> None:
        """Append an earlier reply by the token ids it was generated as (a kept conversation coming
        back: its text might tokenize otherwise), after the user turn it answered (`think`: asked in
        Think mode, so its header held the Think prefill) or after whatever came last (a reply the
        assistant spoke first, or went on with: `respond`). The tokens are those the live turn had."""
        with self._between_turns():
            loaded = self.engine.loaded
            markers = {loaded.ids.sound, loaded.ids.sound_bos, loaded.ids.sound_eos}
            if markers.intersection(token_ids):  # they would be taken for audio slots (never generated now)
                raise ValueError("A kept reply holds an audio marker token, which a reply cannot hold.")
            prefill = THINK_PREFILL if think and loaded.is_think else ""
            ids = prompt.turn_ids(loaded, self.messages, None, None, prefill)[0] + list(token_ids) + prompt.reply_tail(loaded)
            # The live reply may have filled the context to its last token, and its closing tokens go
            # past it: that conversation was as it is, and can be reopened (its next turn will not fit).
            if len(self.tokens) + len(ids) > loaded.context_tokens + len(prompt.reply_tail(loaded)):
                raise ContextFullError(f"This reply would bring the conversation past the model's {loaded.context_tokens}-"
                                       "token context; it cannot have been generated on this model.")
            self._reply_at = len(self.tokens)
            self.tokens += ids
            self.messages.append(prompt.assistant_message(loaded.tokenizer.decode(token_ids, skip_special_tokens=True)))
            self._marks.append((len(self.tokens), self._last_clip_s))

    def rewrite_reply(self, text: str, *, messages: int | None = None) -> bool:
        """Replace the last reply with `text` — what the user heard of it before speaking over it — so
        the model remembers only that. The cache keeps everything before the reply. With `messages`,
        only while the conversation holds that many (the reply is still the one the caller means):
        False, and nothing changes, once another thread has added to it."""
        with self._between_turns():
            if messages is not None and len(self.messages) != messages:
                return False
            if not self.messages or self.messages[-1]["role"] != "assistant" or self._reply_at is None:
                raise ValueError("There is no reply to rewrite: the conversation does not end with one.")
            prompt.check_text(text, "The reply")  # before anything changes: bad text leaves the reply as it was
            prompt.check_control_tokens(self.engine.loaded, text)
            del self.tokens[self._reply_at:]
            self.messages.pop()
            self._marks.pop()
            if self._cache is not None and self._cached > self._reply_at:
                with self.engine.keeper.lock:  # not while the engine thread moves this idle cache
                    self._cache.crop_to(self._reply_at)
                self._cached = self._reply_at
            self.extend("assistant", text)  # the reply's place stays known: a later, shorter cut rewrites it again
            if self.journal is not None:  # the session first: bad text changes neither; a failed write stops it
                self.journal.rewrite(text)
            return True

    def fork(self, n_messages: int) -> Session:
        """A new session holding this one's first `n_messages`, its KV cache copied up to there (a
        copy costs far less than computing it again): a client that branches off a kept conversation
        — a regenerated answer, another question after the same turns — reuses what they share. This
        session is left as it was. ValueError when a clip added by `extend` is not encoded yet."""
        with self._between_turns():
            if self._pending or not self.use_cache or not 0 <= n_messages <= len(self.messages):
                raise ValueError("Only a settled, cached session with every clip encoded can be forked.")
            cut, clip_s = self._marks[n_messages - 1] if n_messages else (0, None)
            twin = Session(self.engine)
            twin.messages, twin.tokens = list(self.messages[:n_messages]), self.tokens[:cut]
            twin._marks, twin._last_clip_s = self._marks[:n_messages], clip_s
            twin._opening_system = self._opening_system and n_messages > 0
            kept = min(self._cached, cut)
            if self._cache is not None and kept:
                # the engine thread may be moving this idle cache off the GPU; the copy leaves the cores to it
                with self.engine.keeper.lock, cores.one_core():
                    twin._cache, twin._cached = self._cache.copy(kept), kept
                self.engine.keeper.track(twin._cache)  # a copy that never speaks may still be moved out
            return twin

    def truncate(self, n_messages: int) -> None:
        """Drop every message after the first `n_messages`, with their tokens and the KV cache past them:
        a turn that must not count (a recording heard in parts keeps all its parts' turns or none). The
        session must be cached, and every clip it holds encoded. ValueError otherwise."""
        with self._between_turns():
            if self._pending or not self.use_cache or not 0 <= n_messages <= len(self.messages):
                raise ValueError("Only a settled, cached session with every clip encoded can be cut back.")
            cut, clip_s = self._marks[n_messages - 1] if n_messages else (0, None)
            del self.tokens[cut:], self.messages[n_messages:], self._marks[n_messages:]
            if self._cache is not None and self._cache.get_seq_length() > cut:
                with self.engine.keeper.lock:  # not while the engine thread moves this idle cache
                    self._cache.crop_to(cut)
            self._cached, self._last_clip_s, self._reply_at = min(self._cached, cut), clip_s, None

    @property
    def cache_bytes(self) -> int:
        """Bytes the session's KV cache takes, wherever it is (device or CPU memory)."""
        return 0 if self._cache is None else self._cache.nbytes

    @property
    def held_bytes(self) -> int:
        """What a Live registry counts for it: its KV cache."""
        return self.cache_bytes

    @property
    def unencoded_clips(self) -> int:
        """Clips added by `extend` and not encoded yet (they are, with the next turn): features in memory."""
        return len(self._pending)

    @property
    def cached_tokens(self) -> int:
        """Tokens of the conversation already in the KV cache: what the next turn need not prefill."""
        return self._cached if self.use_cache else 0

    def ask(self, text: str = "", audio=None, *, think: bool = False,
            options: GenerationOptions = GenerationOptions(), cancel=None,
            kept: tuple[bytes, str] | str | None = None, wake: Callable[[], None] | None = None,
            instructions: str | None = None) -> Iterator[TurnEvent]:
        """Add a user turn (text and/or audio) and stream the reply.

        `audio` is a path, bytes, `(sample_rate, array)`, a 16 kHz float32 array, or a `Clip` made
        earlier by `prepare_clip` (a recording decoded once, asked about in several sessions). Yields
        `ReasoningDelta`/`TextDelta`/`ThinkStep` as the reply is generated, then `Interrupted` if it was
        cancelled, then `TurnDone`; every event carries the turn's id (`turn`). Raises `AudioError`,
        `ContextFullError` or `ValueError` for bad input before anything changes. Closing the
        generator, or setting `cancel` (a threading.Event), stops the reply before the engine's next
        step, and returns at once. Nothing runs on the model until the stream is iterated.

        With `wake`, reading the stream never blocks, for an event loop that reads it on its own
        thread: when the engine has nothing new for the turn, the stream yields `PENDING`, and the
        engine calls `wake()` (on its thread: it must only schedule the next read) each time it has.
        A set `cancel` takes a queued turn out when the stream is next read.

        With a journal, the turn's audio is kept when it is asked (a `Clip` needs `kept`: the bytes and
        suffix of the file it came from, or their key in the journal's store) and the turn when it is
        done; KeptError if it cannot be.

        `instructions` hold for this reply alone: the model reads them as a system message just before
        its reply, and the conversation does not keep them (the reply's KV cache, computed after them,
        is computed again with the next turn).
        """
        if not isinstance(text, str) or (not text.strip() and audio is None):
            prompt.check_text(text)
            raise ValueError("A turn needs a question, an audio clip, or both.")
        return self._turn(text, audio, think=think, options=options, cancel=cancel, kept=kept, wake=wake,
                          instructions=instructions)

    def respond(self, *, options: GenerationOptions = GenerationOptions(), cancel=None,
                wake: Callable[[], None] | None = None, instructions: str | None = None) -> Iterator[TurnEvent]:
        """Stream a reply with no new user turn: the assistant speaks first (a greeting, on the system
        prompt and `instructions` alone), or goes on after its last reply. Everything else is as `ask`;
        a journal keeps the turn with an empty question."""
        return self._turn("", None, think=False, options=options, cancel=cancel, kept=None, wake=wake,
                          instructions=instructions, user=False)

    def _turn(self, text: str, audio, *, think: bool, options: GenerationOptions, cancel,
              kept: tuple[bytes, str] | str | None, wake: Callable[[], None] | None, instructions: str | None,
              user: bool = True) -> Iterator[TurnEvent]:
        t0 = time.perf_counter()
        prompt.check_text(text)
        loaded = self.engine.loaded
        prompt.check_control_tokens(loaded, text)
        if instructions is not None:
            prompt.check_text(instructions, "The instructions")
            prompt.check_control_tokens(loaded, instructions)
        keep = None
        if self.journal is not None:
            self.journal.check()
            if audio is not None:
                audio, keep = self.journal.audio(audio, kept)
        clip = audio if isinstance(audio, Clip) or audio is None else prepare_clip(
            audio, loaded.mel_filters, max_seconds=loaded.max_audio_s)
        audio_key = None if keep is None else self.journal.put(keep)
        try:
            # the previous turn's reply is in `messages` before this one is built, and no other thread
            # changes them while it is (a `rewrite_reply` meanwhile had the template rendered twice on
            # two different conversations)
            with self._between_turns():
                if self.journal is not None:
                    self.journal.check_not_behind()
                plan = self._plan(next(_turn_ids), text, clip, think, options, t0, audio_key, instructions, user)
        except BaseException:
            if audio_key is not None:
                self.journal.release(audio_key)
            raise
        clip_s = clip.duration_s if clip else self._last_clip_s
        parser = ThinkParser(started=bool(plan.prefill), clip_duration_s=clip_s, steps_from_answer=think)
        unread = self.journal.unread(audio_key) if self.journal is not None else None
        return self._stream(plan, parser, Cancel(cancel), wake, unread)

    def _plan(self, turn: int, text: str, clip: Clip | None, think: bool, options: GenerationOptions,
              t0: float, audio_key: str | None = None, instructions: str | None = None, user: bool = True) -> _Plan:
        loaded = self.engine.loaded
        prefill = THINK_PREFILL if think and loaded.is_think else ""
        message = prompt.user_message(text, has_clip=clip is not None, think=think, is_think=loaded.is_think) \
            if user else None
        ids, aside = prompt.turn_ids(loaded, self.messages, message, clip.tokens if clip else None, prefill,
                                     instructions)
        return _Plan(turn, ids, clip, message, options, t0, self._budget(len(ids), options), prefill,
                     len(self.messages), (text, think), audio_key, instructions, aside,
                     len(ids) - aside - len(prompt.reply_head(loaded, prefill)))

    def _stream(self, plan: _Plan, parser: ThinkParser, cancel: Cancel,
                wake: Callable[[], None] | None, unread: Unread | None = None) -> Iterator[TurnEvent]:
        if unread is not None:
            unread.started()  # this body lets the turn's audio go from here
        out: queue.Queue = queue.Queue() if wake is None else _WakingQueue(wake)
        try:
            if cancel.is_set():
                raise _NotAsked
            request, plan = self._request_for(plan, cancel, out)
        except BaseException as exc:  # the turn never reached the engine: its kept audio is let go
            if self.journal is not None:
                self.journal.release(plan.audio_key)
            if not isinstance(exc, _NotAsked):
                raise
            yield Interrupted("cancelled before the reply started", turn=plan.turn)
            return
        prefill = plan.prefill
        detok, finished = Detokenizer(self.engine.loaded.tokenizer), None
        try:
            while finished is None:
                item = self._next(out, request) if wake is None else self._ready(out, request)
                if item is PENDING:
                    yield PENDING
                elif isinstance(item, Finished):
                    finished = item
                elif isinstance(item, int) and (piece := detok.feed(item)):
                    yield from _stamped(parser.feed(piece), plan.turn)
        finally:
            if finished is None:
                self.engine.cancel(request)  # returns at once; the engine settles the session
        if finished.error is not None:
            raise finished.error
        if finished.started and self.journal is not None:
            self.journal.check()  # the turn was not kept: it is not done (KeptError says why)
        yield from _stamped([*parser.feed(detok.flush()), *parser.close()], plan.turn)
        if not finished.started:  # cancelled before its reply began: the turn did not happen
            yield Interrupted("cancelled before the reply started", turn=plan.turn)
            return
        if finished.interrupted:
            yield Interrupted(turn=plan.turn)
        yield TurnDone(self._reply(plan, request, prefill + detok.text, parser, finished), turn=plan.turn)

    def _next(self, out: queue.Queue, request: Request):
        """The engine's next item for this turn. While the turn waits in the queue, a set cancel
        event takes it out at once; once it runs, the engine itself checks the event every step
        (so a running turn's reader sleeps until its next token instead of polling)."""
        while True:
            try:
                return out.get(timeout=CANCEL_POLL_S if request.state == WAITING else None)
            except queue.Empty:
                if request.cancel.is_set():
                    self.engine.cancel(request)

    def _ready(self, out: queue.Queue, request: Request):
        """`_next` for a stream that must not block: the engine's next item, or PENDING."""
        if request.state == WAITING and request.cancel.is_set():
            self.engine.cancel(request)  # a queued turn is dropped at once: its Finished is in `out` now
        try:
            return out.get_nowait()
        except queue.Empty:
            return PENDING

    def _request_for(self, plan: _Plan, cancel: Cancel, out: queue.Queue) -> tuple[Request, _Plan]:
        """Hand the turn to the engine; from here until it is settled, the engine's thread owns the session.

        Two asks made before either stream started (a voice turn overtaken by the next one) take
        their turns in the order their streams start: a turn built on a conversation that has moved
        on since is built again."""
        with self._submitting:
            self._settled.wait()
            if plan.messages_seen != len(self.messages):
                text, think = plan.question
                plan = self._plan(plan.turn, text, plan.clip, think, plan.options, plan.t0, plan.audio_key,
                                  plan.instructions, plan.message is not None)
            return self._submit(plan, cancel, out), plan

    def _submit(self, plan: _Plan, cancel: Cancel, out: queue.Queue) -> Request:
        clips = (self._pending if self.use_cache else self._clips) + ([plan.clip] if plan.clip else [])
        ids = (self.tokens[self._cached:] if self.use_cache else self.tokens) + plan.ids
        cache = self._cache if self.use_cache and self._cache is not None else self.engine.new_cache()
        saved = _Saved(len(self.tokens), len(self.messages), len(self._clips), self._cached, self._cache,
                       self._last_clip_s, list(self._pending), self._reply_at)
        request = Request(plan.turn, cache, ids, clips, plan.options, plan.budget, self.tokens + plan.ids, cancel,
                          emit=None, kept=self.use_cache, t0=plan.t0)
        request.emit = partial(self._on_engine, plan, saved, out)
        self._settled.clear()
        self._request = request
        try:
            self.engine.submit(request)
        except BaseException:  # a closed engine: the turn never began, the session is as it was
            self._request = None
            self._settled.set()
            raise
        return request

    # ---- the engine's reports (engine thread) ----

    def _on_engine(self, plan: _Plan, saved: _Saved, out: queue.Queue, item) -> None:
        if item is PREFILLED:
            self._commit_user(plan, self._request.cache)
            return
        if isinstance(item, Finished):
            try:
                if item.started:
                    text = self._commit_reply(plan, item.request.generated, item.request.cache)
                    if self.journal is not None:
                        self._keep(plan, item, text)
                else:
                    self._restore(saved)
                    if self.journal is not None:
                        self.journal.release(plan.audio_key)
            finally:  # the reader and the next turn must never wait for ever
                self._request = None
                self._settled.set()
                out.put(item)
            return
        out.put(item)

    def _budget(self, new: int, options: GenerationOptions) -> int:
        """Reply tokens allowed: max_new_tokens, cut to what is left of the context."""
        limit = self.engine.loaded.context_tokens
        used = len(self.tokens) + new
        if used >= limit:
            raise ContextFullError(f"This turn would bring the conversation to {used} tokens, over the model's "
                                   f"{limit}-token context; start a new conversation.")
        return max(1, min(options.max_new_tokens, limit - used))

    def _commit_user(self, plan: _Plan, cache) -> None:
        self._pending = []  # encoded and prefilled with this turn
        start = len(self.tokens)
        self.tokens += plan.ids
        if plan.clip:
            self._last_clip_s = plan.clip.duration_s
            if not self.use_cache:
                self._clips.append(plan.clip)
        if plan.message is None:  # no user turn: what the template opens it with (a first reply's system
            self._reply_at = start  # prompt) is the reply's own, as `extend("assistant")` would render it
        else:
            self._reply_at = start + plan.opening
            self.messages.append(plan.message)
            self._marks.append((self._reply_at, self._last_clip_s))  # the reply's header belongs to the reply
        self._cache, self._cached = cache, len(self.tokens)

    def _keep(self, plan: _Plan, finished: Finished, text: str) -> None:
        """Keep the settled turn in the journal (the engine's thread): the reply parsed as its reader
        parses it. A failure breaks the journal; the reader and later turns see it."""
        parser = ThinkParser(started=bool(plan.prefill), clip_duration_s=self._last_clip_s,
                             steps_from_answer=plan.question[1])
        parser.feed(plan.prefill + text)
        parser.close()
        before = self.journal.broken  # already broken: deleted meanwhile (a user's doing), or an earlier failure
        try:
            self.journal.commit(*plan.question, plan.audio_key,
                                self._reply(plan, finished.request, plan.prefill + text, parser, finished),
                                instructions=self._instructions_before(plan.message is not None))
        except Exception:  # KeptError, or the reply could not be built: the journal is broken, and says so
            if self.journal.broken is None:
                self.journal.broken = "The turn could not be kept in the store; the conversation stops here."
            if before is not None:
                log.info("conversation %s: a turn was not kept: %s", self.journal.cid, before)
            else:
                log.exception("conversation %s: a turn could not be kept", self.journal.cid)

    def _instructions_before(self, user: bool) -> tuple[str, ...]:
        """The system messages just before the last exchange (its user message, or with none its reply):
        instructions given mid-conversation, which the journal keeps with it (the opening system prompt
        is the conversation's own)."""
        at = len(self.messages) - (2 if user else 1)
        found = []
        lowest = 1 if self._opening_system else 0
        while at - 1 >= lowest and self.messages[at - 1]["role"] == "system":
            at -= 1
            found.append(prompt.text_of(self.messages[at]))
        return tuple(reversed(found))

    def _commit_reply(self, plan: _Plan, generated: list[int], cache) -> str:
        loaded = self.engine.loaded
        text = loaded.tokenizer.decode(generated, skip_special_tokens=True)
        self.messages.append(prompt.assistant_message(text))
        self._cached = cache.get_seq_length()  # the prompt and every reply token fed back (not the last)
        self.tokens += generated + prompt.reply_tail(loaded)
        if plan.aside:  # this reply's own instructions go: the cache keeps what came before them, and
            # the reply's tokens (computed after them) are computed again, without them, with the next turn
            at = self._reply_at + (plan.opening if plan.message is None else 0)
            del self.tokens[at:at + plan.aside]
            if self._cached > at:
                cache.crop_to(at)
                self._cached = at
        self._marks.append((len(self.tokens), self._last_clip_s))
        if not self.use_cache:
            self._cache, self._cached = None, 0
        return text

    def _restore(self, saved: _Saved) -> None:
        del self.tokens[saved.tokens:], self.messages[saved.messages:], self._clips[saved.clips:]
        del self._marks[saved.messages:]
        if saved.cache is not None:
            saved.cache.crop_to(saved.cached)
        self._cache, self._cached, self._last_clip_s = saved.cache, saved.cached, saved.last_clip_s
        self._pending, self._reply_at = saved.pending, saved.reply_at

    def _reply(self, plan: _Plan, request: Request, text: str, parser: ThinkParser, finished: Finished) -> Reply:
        generated, t_end = request.generated, request.t_end or time.perf_counter()
        t_first = request.t_first
        decoding = (len(generated) - 1) / (t_end - t_first) if len(generated) > 1 else 0.0
        timings = Timings(audio_s=plan.clip.load_s if plan.clip else 0.0, encode_s=request.encode_s,
                          prefill_s=request.prefill_s, ttft_s=(t_first or t_end) - plan.t0, decode_tok_s=decoding,
                          new_tokens=len(generated))
        return Reply(text=text, reasoning=parser.reasoning, answer=parser.answer, steps=tuple(parser.steps),
                     token_ids=tuple(generated), prompt_tokens=len(request.seen), timings=timings,
                     interrupted=finished.interrupted,
                     # what the turn was built on, its user message and this reply: the engine owned the
                     # session from then until the reply went in (the next turn may have begun since)
                     messages=plan.messages_seen + (plan.message is not None) + 1)


def _stamped(events, turn: int) -> Iterator[TurnEvent]:
    for event in events:
        yield replace(event, turn=turn)


class Detokenizer:
    """Token ids → text deltas, holding back bytes of a character split across tokens."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""
        self._prefix = self._read = 0  # ids[_prefix:_read] is the context already turned into text

    def feed(self, token: int) -> str:
        self.ids.append(token)
        return self._advance(final=False)

    def flush(self) -> str:
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        decode = partial(self.tokenizer.decode, skip_special_tokens=True)
        seen = decode(self.ids[self._prefix:self._read])
        full = decode(self.ids[self._prefix:])
        if len(full) <= len(seen) or (full.endswith("\ufffd") and not final):
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        self.text += full[len(seen):]
        return full[len(seen):]


class _WakingQueue(queue.Queue):
    """A queue that calls `wake()` after each item is in it (the engine's reports to a stream that is
    read without blocking: `Session.ask`'s `wake`)."""

    def __init__(self, wake: Callable[[], None]) -> None:
        super().__init__()
        self.wake = wake

    def put(self, item, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self.wake()


class _NotAsked(Exception):
    """A turn cancelled before it was handed to the engine."""


@dataclass(frozen=True)
class _Saved:
    """What a session held before a turn (lengths of its lists): a turn that does not happen puts it back."""
    tokens: int
    messages: int
    clips: int
    cached: int  # tokens in the KV cache
    cache: object
    last_clip_s: float | None
    pending: list  # clips added by `extend`, not encoded yet
    reply_at: int | None  # where the last reply begins (`rewrite_reply`)


@dataclass(frozen=True)
class _Plan:
    turn: int  # the turn's id, carried by its events
    ids: list[int]  # tokens the turn adds before the reply
    clip: Clip | None
    message: dict | None  # the user message as the chat template sees it; None: a reply with no user turn
    options: GenerationOptions
    t0: float  # perf_counter at the request
    budget: int  # reply tokens allowed
    prefill: str  # text the reply starts with (THINK_PREFILL on the Think checkpoint in Think mode)
    messages_seen: int  # len(messages) the turn was built on
    question: tuple[str, bool]  # (text, think) as asked: to build the turn again
    audio_key: str | None = None  # the turn's audio in the journal's store
    instructions: str | None = None  # for this reply alone (`aside`: their tokens, before the reply's head)
    aside: int = 0
    opening: int = 0  # tokens before the aside: the user message's (or, with none, the template's opening)
