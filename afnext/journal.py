"""A live session's side of a kept conversation (afnext/store.py): the `Journal` that keeps each of its
completed turns in the store, and `restore`, which rebuilds a new session from the turns kept before.

    store = Store("~/.local/share/afnext")             # or AFNEXT_DATA, or --store PATH
    cid = store.create("cli")                           # or store.get(cid) for one kept before
    session = Session(engine, journal=Journal(store, cid))   # each completed turn is kept as it ends
    restore(session, store, cid)                        # or: a session rebuilt from the turns kept before

`open_conversation` does either for a conversation id: creates it if there is none, else restores it.

A session with a `Journal` commits each completed turn to the store on the engine's thread as the
turn is settled, so it is on disk before the turn's `TurnDone` reaches anyone, and a turn whose
reader went away (a barge-in) is kept as far as it got, as the session keeps it.

A turn's audio is kept as the bytes it came in, but two kinds are compressed losslessly first, to
FLAC: an integer-PCM WAV (the same samples, about half the bytes) and microphone audio, which is
16-bit FLAC at 16 kHz and which the model hears as it is kept (its float samples rounded to 16 bits,
96 dB below full scale: inaudible, and the same after a restart).
"""

from __future__ import annotations

import dataclasses
import io
import os
import sqlite3
import threading
import weakref

import numpy as np

from .store import Store, StoredTurn, StoreError, check_id


def restore(session, store: Store, cid: str) -> int:
    """Rebuild a new session from conversation `cid`'s completed turns: each clip decoded from the
    bytes it came in, each reply by its generated token ids (or its text, where the user cut it
    short), so the next turn sees exactly the tokens an uninterrupted session would (its KV cache is
    computed once, with that turn). `session` is a Session, or a callable giving the session an
    exchange goes to from its user turn (the Recordings tab's Think turns may have a model of their
    own). Returns the number of turns restored."""
    turns = store.turns(cid)
    route = session if callable(session) else (lambda _user: session)
    try:
        if hasattr(session, "replay"):  # a conversation about a recording heard in parts: it rebuilds itself
            session.replay(turns)
        else:
            _replay(route, store, turns)
    except ValueError as exc:  # AudioError and ContextFullError are ValueErrors too: each its sentence
        raise StoreError(f"The conversation {cid!r} cannot be opened again: {exc}") from exc
    return len(turns) // 2


def _replay(route, store: Store, turns: list[StoredTurn]) -> None:
    from .clip import prepare_clip

    for user, reply in zip(turns[0::2], turns[1::2]):
        target = route(user)
        loaded, clip = target.engine.loaded, None
        if user.audio is not None:
            clip = prepare_clip(store.audio_path(user.audio).read_bytes(), loaded.mel_filters,
                                max_seconds=loaded.max_audio_s)
        for instructions in user.instructions:  # changed mid-conversation, just before this turn
            target.extend("system", instructions)
        if user.text or clip is not None:  # (neither: a reply the assistant began with, `Session.respond`)
            target.extend("user", user.text, clip, think=user.think)
        if reply.token_ids is None:
            target.extend("assistant", reply.text)
        else:
            target.extend_reply(list(reply.token_ids), think=user.think)


def open_conversation(store: Store, cid: str, session, *, model: str, kind: str = "cli", owner: str = "",
                      title: str = "", system: str = "") -> Journal:
    """Conversation `cid` of `owner` for `session` (new, as `restore` takes it): created if there is none
    (with `kind`, `title` and `system`), else restored. Returns its `Journal` (`turns`: how many it
    holds), which a Session given here keeps its turns in already; a router's sessions are the caller's
    to give it. `model` names the checkpoint(s) the replies come from: a conversation held with another
    cannot go on (its replies' token ids mean nothing to this one). StoreError for a bad id, another
    owner's conversation, or another model's."""
    conversation = store.get(check_id(cid), owner=owner)
    if conversation is None:
        try:
            store.create(kind, id=cid, model=model, owner=owner, title=title, system=system)
        except StoreError:  # another owner's, or another process created it just now
            conversation = store.get(cid, owner=owner)
            if conversation is None:
                raise StoreError(f"There is no conversation {cid!r} of yours here.") from None
    turns = 0
    if conversation is not None:
        store.touch(cid)  # in use now: no prune, here or in another process, takes it
        if not conversation.turns and conversation.model != model:
            store.set_model(cid, model)  # a recording opened before any question: held with this model from now
        elif conversation.turns and conversation.model and conversation.model != model:
            raise StoreError(f"The conversation {cid!r} was held with {conversation.model}: its replies' token ids "
                             f"mean something to that model only; resume it with --model {conversation.model}.")
        turns = restore(session, store, cid)
    journal = Journal(store, cid, turns)
    if not callable(session):
        session.journal = journal
    return journal


class KeptError(RuntimeError):
    """A completed turn could not be written to the store: the conversation stops there, so that it
    never differs from what is kept. The message says so in one sentence."""


class Journal:
    """Where a live session keeps its turns: conversation `cid` of `store`, holding `turns` exchanges.

    The session calls `audio` when a turn is asked (the file is written then, off the engine's
    thread) and `commit` when the engine has settled the turn; a failed commit breaks the journal,
    and the session refuses further turns with its sentence (KeptError)."""

    def __init__(self, store: Store, cid: str, turns: int = 0) -> None:
        self.store, self.cid, self.turns = store, cid, turns
        self.broken: str | None = None
        self._lock = threading.Lock()

    def check(self) -> None:
        if self.broken is not None:
            raise KeptError(self.broken)

    def check_not_behind(self) -> None:
        """Before a turn is asked (the session's last one settled): KeptError if the store holds turns
        this session does not (another process, a replica, went on with the conversation). Its commit
        would be refused all the same; refused now, no answer is made (or spoken) from a conversation
        that is not the one kept. Breaks the journal, as a refused commit does."""
        with self._lock:
            self.check()
            try:
                held = self.store.exchanges(self.cid)
            except sqlite3.Error:  # the commit says what is wrong with the store, if anything is
                return
            if held > self.turns:
                self.broken = (f"The conversation {self.cid!r} went on elsewhere meanwhile (it holds {held} turns, "
                               f"this one {self.turns}); the conversation stops here: open it again to go on from there.")
                raise KeptError(self.broken)

    def current(self) -> bool:
        """Whether the session this journal keeps holds what the store holds: not broken, and no turn
        kept meanwhile by another process on the same conversation (a replica it moved to and back from)."""
        with self._lock:
            return self.broken is None and self.store.exchanges(self.cid) == self.turns

    def audio(self, source, kept: tuple[bytes, str] | str | None = None):
        """A turn's audio → (what the model hears, what to keep with `put`). `source` is what `Session.ask`
        takes: a path or a file's bytes are kept as they are (an integer-PCM WAV as FLAC: the same
        samples), a float array (16 kHz) as 16-bit FLAC, which the model then hears. A prepared `Clip`
        needs `kept`: the (bytes, suffix) it was decoded from, or their key in the store already."""
        from .audio import SAMPLE_RATE, load_file
        from .clip import Clip

        if isinstance(source, Clip):
            if kept is None:
                raise ValueError("A kept conversation needs the bytes a prepared clip came from.")
            if isinstance(kept, str):
                return source, kept
            data, suffix = kept
        elif isinstance(source, np.ndarray) or isinstance(source, tuple):
            rate, samples = source if isinstance(source, tuple) else (SAMPLE_RATE, source)
            data, suffix = flac16(np.asarray(samples), rate), ".flac"
        elif isinstance(source, (bytes, bytearray, memoryview)):
            data, suffix = bytes(source), ""
        else:
            data, suffix = load_file(source), os.path.splitext(os.fspath(source))[1]
        data, suffix = lossless(data, suffix)
        return (source if isinstance(source, Clip) else data), (data, suffix)

    def put(self, kept: tuple[bytes, str] | str) -> str:
        """Keep a turn's audio file (or, given a key, see that it is still kept); its key. KeptError if it
        cannot be (the turn is then not asked)."""
        try:
            if isinstance(kept, str):
                self.store.touch_audio(kept)  # fresh again: no prune elsewhere takes it before the commit
                self.store.hold_audio(kept)  # until the turn commits or is dropped (`release`)
                return kept
            return self.store.put_audio(*kept, hold=True)
        except StoreError as exc:
            raise KeptError(f"{exc} The turn was not asked.") from exc
        except OSError as exc:
            raise KeptError(f"The turn's audio could not be kept ({exc.strerror or exc}); nothing was asked.") from exc

    def release(self, audio: str | None) -> None:
        """A turn that held `audio` (from `put`) will not be committed: it never began, or failed."""
        if audio is not None:
            self.store.release_audio(audio)

    def unread(self, audio: str | None) -> Unread:
        """A token for the stream of a turn holding `audio` to take as an argument. A generator closed
        or dropped before its first read runs none of its body, its `finally` included, so it would
        hold the audio for the process's life: the token lets it go when it is collected with the
        stream, unless the stream `started` (from then on the stream's own paths let it go)."""
        token = Unread()
        if audio is not None:
            token.finalizer = weakref.finalize(token, self.release, audio)
        return token

    def commit(self, text: str, think: bool, audio: str | None, reply, parts: dict | None = None,
               instructions: tuple[str, ...] = ()) -> None:
        """Keep a completed exchange (the session's thread settling it); KeptError if it cannot be.
        `parts`: an answer about a recording heard in parts (StoredTurn.parts); `instructions`, system
        messages the conversation took just before it. Any failure breaks the journal: the session
        holds a turn the store does not, so the conversation stops here."""
        try:
            self._commit(text, think, audio, reply, parts, instructions)
        except KeptError:
            raise
        except Exception as exc:  # unforeseen: broken all the same, with the same kind of sentence
            self.broken = self.broken or "The turn could not be kept in the store; the conversation stops here."
            raise KeptError(self.broken) from exc
        finally:
            self.release(audio)

    def _commit(self, text: str, think: bool, audio: str | None, reply, parts: dict | None,
                instructions: tuple[str, ...]) -> None:
        self._add(StoredTurn("user", text, think, audio, instructions=instructions),
                  StoredTurn("assistant", reply.text, reasoning=reply.reasoning, token_ids=reply.token_ids,
                             steps=[dataclasses.asdict(s) for s in reply.steps],
                             timings=dataclasses.asdict(reply.timings), interrupted=reply.interrupted, parts=parts))

    def _add(self, user: StoredTurn, assistant: StoredTurn) -> None:
        """One exchange into the store, after the turns this journal holds; KeptError (and broken) if not."""
        with self._lock:
            self.check()
            try:
                self.store.add_exchange(self.cid, user, assistant, at=self.turns)
            except (StoreError, sqlite3.Error, OSError) as exc:
                self.broken = (f"The turn could not be kept in the store ({' '.join(str(exc).split())}); the "
                               "conversation stops here, so that it never differs from what is kept.")
                raise KeptError(self.broken) from exc
            self.turns += 1

    def commit_given(self, text: str, audio: str | None, reply: str, instructions: tuple[str, ...] = ()) -> None:
        """Keep an exchange a client gave whole (`Session.add_exchange`): its question (none: "" and no
        audio), and the reply by its text. KeptError as `commit`."""
        try:
            self._add(StoredTurn("user", text, audio=audio, instructions=instructions), StoredTurn("assistant", reply))
        finally:
            self.release(audio)

    def rewrite(self, text: str) -> None:
        """The last reply is now `text` (cut short where the user spoke over it)."""
        with self._lock:
            self.check()
            try:
                self.store.rewrite_reply(self.cid, self.turns - 1, text)
            except (StoreError, sqlite3.Error) as exc:
                self.broken = f"The cut reply could not be kept in the store ({exc}); the conversation stops here."
                raise KeptError(self.broken) from exc


class Unread:
    """See `Journal.unread`."""

    finalizer: weakref.finalize | None = None

    def started(self) -> None:
        if self.finalizer is not None:
            self.finalizer.detach()


def flac16(samples: np.ndarray, rate: int) -> bytes:
    """Audio as 16-bit FLAC bytes: int16 samples as they are, others scaled to [-1, 1] and rounded."""
    import soundfile

    from .audio import mono_float32

    if samples.dtype != np.int16:
        samples = (np.clip(mono_float32(samples), -1.0, 1.0) * 32767.0).round().astype(np.int16)
    out = io.BytesIO()
    soundfile.write(out, samples, rate, format="FLAC", subtype="PCM_16")
    return out.getvalue()


def lossless(data: bytes, suffix: str) -> tuple[bytes, str]:
    """An integer-PCM WAV → FLAC of the same samples (about half the bytes); anything else as it is."""
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return data, suffix
    import soundfile

    try:
        info = soundfile.info(io.BytesIO(data))
        if info.subtype not in ("PCM_16", "PCM_24") or info.channels > 8 or info.samplerate > 655350:
            return data, suffix
        samples, rate = soundfile.read(io.BytesIO(data), dtype="int32", always_2d=True)
        out = io.BytesIO()
        soundfile.write(out, samples, rate, format="FLAC", subtype=info.subtype)
        return out.getvalue(), ".flac"
    except (RuntimeError, soundfile.LibsndfileError, ValueError):
        return data, suffix
