"""Kept sessions for stateless clients: a request that resends a conversation continues the session
that already holds it.

OpenAI-style clients send the whole conversation with every request. Prefilling it all again would
cost a 30-minute recording's 45,000 tokens on every follow-up; instead each finished turn leaves its
session here, keyed by what it holds — each message's role, text and clip (by a hash of its audio) —
and the next request takes the session that shares the most leading messages with its own history,
adds the messages it lacks without generating (`Session.extend`) and asks only the new turn. A kept
session that went on past where the request branches off (a regenerated answer, another question
after the same turns) is forked: the request gets a copy of its KV cache up to there, and the kept
branch stays as it was. A reply keeps
the token ids the model generated as long as the client sends back the same text, so a greedy reply
equals the one the same turns get in one live session (the CLI's).

A session is lent to one request at a time; a second request on the same history meanwhile gets a
fresh session. The least recently used sessions are dropped beyond `max_sessions` or `max_bytes` of
KV cache; the engine's `CacheKeeper` decides which kept caches stay on the GPU.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from .clip import Clip
from .engine import Engine
from .conversation import ONE_RECORDING
from .parts import PartedSession
from .session import Session

MAX_SESSIONS = 256  # kept conversations per engine: a few dozen voice chats and recordings, with room
# bytes of KV cache the kept sessions may hold in all, wherever the CacheKeeper has put them (an idle
# cache moved off the GPU still takes CPU memory): three 30-minute recordings on AF-Next in bf16,
# or some 150 voice chats of a thousand tokens
MAX_KEPT_BYTES = 8 << 30
MAX_PARTED = 8  # kept conversations about recordings over the limit: each holds up to 4 hours of KV cache


@dataclass(frozen=True)
class Message:
    """One message of a conversation as a client sends it."""

    role: str  # "system" | "user" | "assistant"
    text: str = ""
    clip: Clip | None = None  # a user message's audio
    audio_key: str = ""  # a hash of the clip's source bytes: equal audio, equal key
    # Makes the clip when the message is not held by a kept session already (decoding is skipped
    # for history a session holds): a zero-argument callable, or None.
    make_clip: Callable[[], Clip] | None = field(default=None, compare=False, repr=False)
    # The clip's file bytes if it runs over the model's limit and is heard in parts (`PartedPool`), else
    # None: a zero-argument callable (decoding is skipped while a kept session holds the conversation).
    recording: Callable[[], bytes | None] | None = field(default=None, compare=False, repr=False)

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.role, self.text, self.audio_key)


def audio_key(data: bytes) -> str:
    """The key a clip's encoded bytes give it (a client resends the same bytes with each request)."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


@dataclass
class Lease:
    """A session lent to one request: it holds `history` and had `cached_tokens` in its KV cache
    before the request's own tokens."""

    session: Session
    history: tuple[tuple[str, str, str], ...]
    cached_tokens: int


def _shared(a: tuple, b: tuple) -> int:
    """How many leading messages two histories share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class SessionPool:
    """Sessions of one engine keyed by the conversations they hold. Thread-safe."""

    def __init__(self, engine: Engine, max_sessions: int = MAX_SESSIONS, max_bytes: int = MAX_KEPT_BYTES) -> None:
        self.engine, self.max_sessions, self.max_bytes = engine, max_sessions, max_bytes
        self._kept: OrderedDict[tuple, Session] = OrderedDict()  # history key → session, least recent first
        # Bytes of each kept session's cache, measured when it was kept (an idle cache keeps its size
        # wherever the CacheKeeper moves it), and their sum: no sweep over every kept cache per turn,
        # which the API's event loop would pay.
        self._sizes: dict[tuple, int] = {}
        self._bytes = 0
        self._lock = threading.Lock()

    def lease(self, history: list[Message]) -> Lease:
        """A session holding `history` (every message before the new user turn): the kept one with
        the longest matching prefix, extended by the rest, or a new one. Raises as `Session.extend`."""
        if history and history[0].role == "system" and not history[0].text:
            history = history[1:]  # an empty system prompt is none (as `Session` holds it): the model's default
        keys = tuple(m.key for m in history)
        system = history[0].text if history and history[0].role == "system" else None
        with self._lock:  # the kept session sharing the most messages with `history`; whole ones first
            shared, kept = max(((_shared(keys, k), -len(k), k) for k in self._kept), default=(0, 0, None))[::2]
            session = self._take(kept) if shared else None
        if session is not None and shared < len(kept):  # it went on past where `history` branches off
            try:
                twin = session.fork(shared)
            except ValueError:  # it holds clips not encoded yet: start afresh instead
                twin = None
            finally:
                self._put(kept, session)  # the other branch stays kept, unchanged
            session = twin
        if session is None:
            session, shared = Session(self.engine, system=system), 1 if system is not None else 0
        cached, held = session.cached_tokens, shared
        try:
            for message in history[shared:]:
                clip = message.clip if message.clip is not None or message.make_clip is None else message.make_clip()
                session.extend(message.role, message.text, clip)
                held += 1
        except BaseException:
            # A bad message: the session stays kept if nothing was added to it yet. (What `extend` adds
            # waits to be encoded, in memory the pool does not count.)
            if held and held == shared and not session.unencoded_clips:
                self._put(keys[:held], session)
            raise
        return Lease(session, keys, cached)

    def keep(self, lease: Lease, asked: Message, reply_text: str) -> None:
        """Give the session back after a completed turn: it now holds the lease's history, the asked
        message and the reply as the client received it."""
        self._put(lease.history + (asked.key, ("assistant", reply_text, "")), lease.session)

    def give_back(self, lease: Lease) -> None:
        """Give the session back unchanged: its turn failed before it began (the session rolled back).
        Not kept if it holds clips not encoded yet: their features take memory the pool does not count."""
        if not lease.session.unencoded_clips:
            self._put(lease.history, lease.session)

    def _put(self, key: tuple, session: Session) -> None:
        size = session.cache_bytes
        with self._lock:
            if key in self._kept:
                self._take(key)
            self._kept[key], self._sizes[key] = session, size
            self._bytes += size
            while len(self._kept) > self.max_sessions or (len(self._kept) > 1 and self._bytes > self.max_bytes):
                self._take(next(iter(self._kept)))

    def _take(self, key: tuple) -> Session:
        """Remove a kept session (the caller holds the lock)."""
        self._bytes -= self._sizes.pop(key)
        return self._kept.pop(key)

    def kept_bytes(self) -> int:
        """KV cache bytes the kept sessions hold (buffers with their spare room)."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._kept)


class PartedPool:
    """Conversations about a recording over the model's limit (afnext/parts.py), kept for stateless
    clients as `SessionPool` keeps sessions: a follow-up that resends the conversation goes on with the
    parted session holding it, so no part is read or encoded again. Thread-safe.

    The recording must be the conversation's first user clip. A history no kept session holds (another
    server, a pruned one, an edited one) starts afresh: the parts hear the recording with the new
    question, and the merge session hears the turns before it as text."""

    def __init__(self, engine: Engine, max_sessions: int = MAX_PARTED, max_bytes: int = MAX_KEPT_BYTES) -> None:
        self.engine, self.max_sessions, self.max_bytes = engine, max_sessions, max_bytes
        self._kept: OrderedDict[tuple, _Parted] = OrderedDict()
        self._short: OrderedDict[str, None] = OrderedDict()  # audio keys of clips within the limit
        self._lock = threading.Lock()

    def lease(self, history: list[Message], asked: Message) -> Lease | None:
        """The parted conversation holding `history`, to ask `asked` in; None when the conversation
        holds no recording over the limit in its first user clip."""
        keys = tuple(m.key for m in history)
        if any(audio for _, _, audio in keys):  # kept ones are keyed by their recording: no other history matches
            with self._lock:
                kept = self._kept.pop(keys, None)
            if kept is not None:
                return Lease(kept, keys, kept.cached_tokens)
        messages = [*history, asked]
        first = next((m for m in messages if m.role == "user" and m.audio_key), None)
        recording = self._recording(first) if first is not None else None
        if recording is None:
            return None
        system = messages[0].text if messages[0].role == "system" else None
        parted = _Parted(PartedSession(self.engine, recording, system=system))
        for message in history[1 if system is not None else 0:]:
            parted.session.extend(message.role, message.text)
        return Lease(parted, keys, parted.cached_tokens)

    def keep(self, lease: Lease, asked: Message, reply_text: str) -> None:
        self._put(lease.history + (asked.key, ("assistant", reply_text, "")), lease.session)

    def give_back(self, lease: Lease) -> None:
        """A turn that did not begin: kept only if the conversation holds its recording already."""
        if any(audio for _, _, audio in lease.history) and lease.session.session.heard:
            self._put(lease.history, lease.session)

    def _recording(self, message: Message) -> bytes | None:
        """The message's clip bytes if it is over the limit; clips found within it are remembered by key,
        so a conversation with a short first clip does not decode it again with every request."""
        if message.recording is None or message.audio_key in self._short:
            return None
        recording = message.recording()
        if recording is None:
            with self._lock:
                self._short[message.audio_key] = None
                while len(self._short) > MAX_SESSIONS:
                    self._short.popitem(last=False)
        return recording

    def _put(self, key: tuple, parted: _Parted) -> None:
        with self._lock:
            self._kept[key] = parted
            self._kept.move_to_end(key)
            while len(self._kept) > self.max_sessions or (
                    len(self._kept) > 1 and sum(p.session.cache_bytes for p in self._kept.values()) > self.max_bytes):
                self._kept.popitem(last=False)


class _Parted:
    """A parted session as a lease holds it: asked like a `Session` (the recording is its own)."""

    def __init__(self, session: PartedSession) -> None:
        self.session = session

    @property
    def cached_tokens(self) -> int:
        return self.session.cached_tokens

    def ask(self, text: str = "", audio=None, **kw):
        if audio is not None:
            raise ValueError(ONE_RECORDING)
        return self.session.ask(text, **kw)
