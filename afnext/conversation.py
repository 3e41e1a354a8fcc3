"""A conversation that may take a recording longer than the model hears: a `Session` until such a
clip comes, then a `PartedSession` about it (afnext/parts.py); and such a conversation kept in the store
and opened again (`open_kept`)."""

from __future__ import annotations

import os
from collections.abc import Iterator

from . import split
from .audio import AudioError, AudioTooLong
from .clip import Clip
from .journal import Journal, KeptError, open_conversation
from .parts import PartedSession, PartOptions
from .sampling import GenerationOptions
from .session import Session
from .store import Store, StoreError, check_id


ONE_RECORDING = ("This conversation is about a recording heard in parts; ask about it in text, or start a new "
                 "conversation for another clip.")


class Conversation:
    """A conversation whose turns may bring a recording longer than the model hears: a `Session` until
    one does, then a `PartedSession` about that recording, which carries the turns before it along.
    A kept session (one with a journal) takes such a recording only as its first turn."""

    def __init__(self, session: Session, options: PartOptions = PartOptions(),
                 parted: PartedSession | None = None) -> None:
        self.session = session
        self.options = options
        self.parted = parted

    @property
    def journal(self) -> Journal | None:
        """Where its turns are kept, if anywhere."""
        return self.parted.journal if self.parted is not None else self.session.journal

    def ask(self, text: str = "", audio=None, *, think: bool = False,
            options: GenerationOptions = GenerationOptions(), cancel=None) -> Iterator:
        """As `Session.ask`; a clip over the model's limit (up to split.MAX_RECORDING_S) is heard in parts,
        and so are the questions after it."""
        if self.parted is not None:
            if audio is not None:
                raise ValueError(ONE_RECORDING)
            return self.parted.ask(text, think=think, options=options, cancel=cancel)
        if audio is None or isinstance(audio, Clip):
            return self.session.ask(text, audio, think=think, options=options, cancel=cancel)
        over = split.longer_than(audio, self.session.engine.loaded.max_audio_s, decode=False)
        if over is None:  # a file that states no length: the session decodes it once, to hear it, and
            try:  # refuses it before anything changes if it runs over (decoded up to the limit, no further)
                return self.session.ask(text, audio, think=think, options=options, cancel=cancel)
            except AudioTooLong:
                over = True
        if not over:
            return self.session.ask(text, audio, think=think, options=options, cancel=cancel)
        if not self.session.use_cache:
            raise ValueError("A recording over the model's limit is heard in parts, which needs the KV cache.")
        parted = self._parted(audio)
        stream = parted.ask(text, think=think, options=options, cancel=cancel)
        self.parted = parted
        return self._first(parted, stream)

    def _parted(self, audio) -> PartedSession:
        journal = self.session.journal
        if journal is None:
            return PartedSession(self.session.engine, audio, base=self.session, options=self.options)
        if journal.turns or self.session.messages:
            raise ValueError("A kept conversation takes a recording over the model's limit only as its first turn; "
                             "keep it in a new conversation.")
        journal.check()
        parted = PartedSession(self.session.engine, audio, system=None, options=self.options)
        try:  # the file as it is, copied in blocks: a 4-hour recording is never in memory whole
            if isinstance(audio, (str, os.PathLike)):
                parted.kept = journal.store.put_audio_file(audio)
            else:
                parted.kept = journal.store.put_audio(*journal.audio(audio)[1])
        except (OSError, StoreError) as exc:
            raise KeptError(f"The recording could not be kept ({exc}); nothing was asked.") from exc
        parted.journal = journal
        return parted

    def _first(self, parted: PartedSession, stream: Iterator) -> Iterator:
        """The recording's first turn: one that fails before any part has heard its clip is dropped."""
        try:
            yield from stream
        except BaseException as exc:
            if not parted.heard or isinstance(exc, AudioError):  # nothing heard, or the recording is unusable
                self.parted = None
            raise


def open_kept(store: Store, cid: str, session: Session, *, model: str,
              options: PartOptions = PartOptions()) -> tuple[Conversation, Journal]:
    """`journal.open_conversation` for a conversation that may be about a recording heard in parts: such a
    conversation is rebuilt as a `PartedSession` on the kept recording, any other into `session`."""
    turns = store.turns(check_id(cid)) if store.get(cid) is not None else []
    if len(turns) >= 2 and turns[1].parts and turns[0].audio is not None:
        parted = PartedSession(session.engine, str(store.audio_path(turns[0].audio)), options=options)
        journal = open_conversation(store, cid, parted, model=model)
        parted.kept = turns[0].audio
        return Conversation(session, options, parted), journal
    return Conversation(session, options), open_conversation(store, cid, session, model=model)
