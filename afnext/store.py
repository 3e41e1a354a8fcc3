"""Conversations kept on disk: an embedded SQLite database and the turns' audio as files, crash-safe.

    store = Store("~/.local/share/afnext")             # or AFNEXT_DATA, or --store PATH
    cid = store.create("cli")                           # or store.get(cid) for one kept before
    store.add_exchange(cid, user, assistant)            # one completed turn: both messages, one transaction
    for turn in store.turns(cid): ...                   # what `Session.restore` rebuilds a session from

Durability (../shared/FACTS.md): WAL with `synchronous=NORMAL` survives a killed process (kill -9)
without corruption, and a committed transaction is there afterwards. An exchange is written in one
transaction, after its audio file is on disk (written to a temporary name, flushed, renamed), so a
crash at any moment leaves either the whole turn or none of it, and never a turn without its audio.

Audio is kept as the bytes the turn came in (a recording's own file, content-addressed by its
SHA-256): decoding the same bytes again gives the same samples, so a resumed conversation hears
exactly what the uninterrupted one heard, and a file used by many conversations is stored once.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path

DATA_ENV = "AFNEXT_DATA"  # where conversations are kept when no path is given
SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id TEXT PRIMARY KEY, kind TEXT NOT NULL, title TEXT NOT NULL DEFAULT '', owner TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL, updated REAL NOT NULL, model TEXT NOT NULL DEFAULT '');
CREATE TABLE IF NOT EXISTS turns (
    conversation TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    idx INTEGER NOT NULL, role TEXT NOT NULL, text TEXT NOT NULL, think INTEGER NOT NULL DEFAULT 0,
    audio TEXT, reasoning TEXT NOT NULL DEFAULT '', steps TEXT NOT NULL DEFAULT '[]',
    token_ids TEXT, timings TEXT NOT NULL DEFAULT '{}', interrupted INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL, PRIMARY KEY (conversation, idx));
CREATE INDEX IF NOT EXISTS conversations_by_owner ON conversations(owner, updated);
"""
MAX_ID_CHARS = 64
CONVERSATIONS = ("SELECT c.id, c.kind, c.title, c.owner, c.created, c.updated, c.model, (SELECT COUNT(*) FROM turns t "
                 "WHERE t.conversation = c.id AND t.role = 'assistant') FROM conversations c ")  # → Conversation


class StoreError(ValueError):
    """A conversation that cannot be had (unknown id, another owner's); the message says so."""


@dataclass(frozen=True)
class StoredTurn:
    """One message of a kept conversation."""

    role: str  # "user" | "assistant"
    text: str  # the user's question, or the assistant's whole text (reasoning included)
    think: bool = False  # a user turn asked in Think mode (its prompt and reply header differ)
    audio: str | None = None  # the user turn's audio: its key in the store
    reasoning: str = ""
    steps: list = field(default_factory=list)  # [{"start", "end", "text"}]
    token_ids: tuple[int, ...] | None = None  # an assistant turn's generated ids, as generated
    timings: dict = field(default_factory=dict)
    interrupted: bool = False


@dataclass(frozen=True)
class Conversation:
    id: str
    kind: str  # "cli" | "talk" | "recording" | "api"
    title: str
    owner: str
    created: float
    updated: float
    model: str  # the checkpoint its replies came from: their token ids mean something only to it
    turns: int  # completed exchanges


def default_path() -> Path:
    """$AFNEXT_DATA, else the per-user data folder ($XDG_DATA_HOME/afnext or ~/.local/share/afnext)."""
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV]).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "afnext"


class Store:
    """A folder holding `afnext.sqlite3` and `audio/`. Thread-safe: one connection, one lock."""

    def __init__(self, path: str | os.PathLike | None = None) -> None:
        self.path = Path(path).expanduser() if path is not None else default_path()
        (self.path / "audio").mkdir(parents=True, exist_ok=True)
        for stale in (self.path / "audio").glob("*/.*.part"):  # a write a crash cut short
            stale.unlink(missing_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path / "afnext.sqlite3", check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(SCHEMA)
        if "model" not in {row[1] for row in self._db.execute("PRAGMA table_info(conversations)")}:
            self._db.execute("ALTER TABLE conversations ADD COLUMN model TEXT NOT NULL DEFAULT ''")  # an older store

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ---- conversations ----

    def create(self, kind: str, *, owner: str = "", title: str = "", id: str | None = None, model: str = "") -> str:
        """A new conversation's id (`id` if given: a name the caller chose)."""
        cid = _check_id(id) if id is not None else uuid.uuid4().hex
        now = time.time()
        with self._lock:
            try:
                self._db.execute("INSERT INTO conversations VALUES (?, ?, ?, ?, ?, ?, ?)",
                                 (cid, kind, title, owner, now, now, model))
            except sqlite3.IntegrityError:
                raise StoreError(f"A conversation named {cid!r} exists already.") from None
        return cid

    def get(self, cid: str, *, owner: str = "") -> Conversation | None:
        """The conversation `cid` of `owner`, or None: another owner's is as good as missing."""
        with self._lock:
            row = self._db.execute(
                CONVERSATIONS + "WHERE c.id = ? AND c.owner = ?", (cid, owner)).fetchone()
        return Conversation(*row) if row else None

    def touch(self, cid: str) -> None:
        """`cid` is in use now: no prune, here or in another process, takes it as unused."""
        with self._lock:
            self._db.execute("UPDATE conversations SET updated = ? WHERE id = ?", (time.time(), cid))

    def list(self, *, owner: str = "") -> list[Conversation]:
        """`owner`'s conversations, the most recently updated first."""
        with self._lock:
            rows = self._db.execute(
                CONVERSATIONS + "WHERE c.owner = ? ORDER BY c.updated DESC", (owner,)).fetchall()
        return [Conversation(*row) for row in rows]

    def turns(self, cid: str) -> list[StoredTurn]:
        with self._lock:
            rows = self._db.execute("SELECT role, text, think, audio, reasoning, steps, token_ids, timings, interrupted "
                                    "FROM turns WHERE conversation = ? ORDER BY idx", (cid,)).fetchall()
        return [StoredTurn(role, text, bool(think), audio, reasoning, json.loads(steps),
                           None if ids is None else tuple(json.loads(ids)), json.loads(timings), bool(interrupted))
                for role, text, think, audio, reasoning, steps, ids, timings, interrupted in rows]

    def add_exchange(self, cid: str, user: StoredTurn, assistant: StoredTurn, *, at: int | None = None,
                     audio: tuple[bytes, str] | None = None) -> None:
        """A completed turn, both its messages, in one transaction (all of it or nothing survives a
        crash). `at`: the turns the caller's session held before it — StoreError if the conversation
        went on elsewhere meanwhile (another process on the same id). `audio`: the user turn's file
        (bytes, suffix), kept first, under the same lock as `delete`, so no delete can take it away."""
        now = time.time()
        with self._lock:
            if audio is not None:
                user = replace(user, audio=self._put_audio(*audio))
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                (n,) = db.execute("SELECT COUNT(*) FROM turns WHERE conversation = ?", (cid,)).fetchone()
                if at is not None and n != 2 * at:
                    raise StoreError(f"The conversation {cid!r} went on elsewhere meanwhile (it holds {n // 2} turns, "
                                     f"this one {at}); open it again to go on from there.")
                for i, turn in enumerate((user, assistant)):
                    db.execute("INSERT INTO turns VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                               (cid, n + i, turn.role, turn.text, int(turn.think), turn.audio, turn.reasoning,
                                json.dumps(turn.steps), None if turn.token_ids is None else json.dumps(list(turn.token_ids)),
                                json.dumps(turn.timings), int(turn.interrupted), now))
                title = (user.text.strip().splitlines() or [""])[0][:80]
                db.execute("UPDATE conversations SET updated = ?, title = CASE WHEN title = '' THEN ? ELSE title END "
                           "WHERE id = ?", (now, title, cid))
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:  # a failed COMMIT (a full disk) has rolled back already
                    db.execute("ROLLBACK")
                raise

    def delete(self, cid: str, *, owner: str = "") -> bool:
        """Delete `owner`'s conversation `cid` and the audio no other conversation uses; False if none."""
        with self._lock:
            audio = [a for (a,) in self._db.execute("SELECT DISTINCT audio FROM turns WHERE conversation = ? "
                                                     "AND audio IS NOT NULL", (cid,))]
            deleted = self._db.execute("DELETE FROM conversations WHERE id = ? AND owner = ?", (cid, owner)).rowcount
            if deleted:
                for key in audio:
                    if not self._db.execute("SELECT 1 FROM turns WHERE audio = ? LIMIT 1", (key,)).fetchone():
                        self._audio_path(key).unlink(missing_ok=True)
        return bool(deleted)

    def prune(self, keep_days: float, *, keep: str | None = None) -> int:
        """Delete the conversations not updated for `keep_days` (but `keep`, the one being opened),
        then every audio file no turn refers to; the number of conversations deleted."""
        cutoff = time.time() - keep_days * 86400
        with self._lock:
            gone = self._db.execute("DELETE FROM conversations WHERE updated < ? AND id IS NOT ?",
                                    (cutoff, keep)).rowcount
            used = {key for (key,) in self._db.execute("SELECT DISTINCT audio FROM turns WHERE audio IS NOT NULL")}
            for path in (self.path / "audio").glob("*/*"):
                # Not a file touched in the last hour: another process may be about to commit a turn with it.
                try:
                    if not path.name.startswith(".") and path.name not in used and path.stat().st_mtime < time.time() - 3600:
                        path.unlink(missing_ok=True)
                except FileNotFoundError:  # another process's prune took it first
                    continue
        return gone

    # ---- audio ----

    def put_audio(self, data: bytes, suffix: str = "") -> str:
        """Keep an audio file's bytes; its key (SHA-256, with the file's suffix). Written to a temporary
        name, flushed to disk and renamed: the key's file is whole or absent, whatever happens. A file
        no turn refers to may be removed by `delete`: give it to `add_exchange` to keep it with a turn."""
        with self._lock:
            return self._put_audio(data, suffix)

    def _put_audio(self, data: bytes, suffix: str) -> str:
        key = hashlib.sha256(data).hexdigest() + (suffix.lower()[:8] if suffix.startswith(".") else "")
        path = self._audio_path(key)
        try:
            os.utime(path)  # kept already: fresh again, so no `prune` elsewhere takes it before our commit
        except FileNotFoundError:
            path.parent.mkdir(exist_ok=True)
            part = path.with_name(f".{path.name}.{uuid.uuid4().hex}.part")
            try:
                with open(part, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(part, path)
            finally:
                part.unlink(missing_ok=True)  # a write that failed (a full disk) leaves nothing behind
        return key

    def audio_path(self, key: str) -> Path:
        """Where the audio of `key` is; StoreError if it is not kept."""
        path = self._audio_path(key)
        if not path.exists():
            raise StoreError(f"The audio {key[:16]}… of this conversation is missing from {self.path}.")
        return path

    def _audio_path(self, key: str) -> Path:
        if not key or "/" in key or key.startswith("."):
            raise StoreError("That is not an audio key of this store.")
        return self.path / "audio" / key[:2] / key


def _check_id(cid: str) -> str:
    if not cid or len(cid) > MAX_ID_CHARS or not all(c.isascii() and (c.isalnum() or c in "-_.") for c in cid):
        raise StoreError(f"A conversation id is 1-{MAX_ID_CHARS} letters, digits, '-', '_' or '.'.")
    return cid


def restore(session, store: Store, cid: str) -> int:
    """Rebuild `session` (a new one) from conversation `cid`'s completed turns: each clip decoded
    from the bytes it came in, each reply by its generated token ids, so the next turn sees exactly
    the tokens an uninterrupted session would (its KV cache is computed once, with that turn).
    Returns the number of turns restored."""
    from .clip import prepare_clip

    turns, loaded = store.turns(cid), session.engine.loaded
    for user, reply in zip(turns[0::2], turns[1::2]):
        clip = None
        if user.audio is not None:
            clip = prepare_clip(store.audio_path(user.audio).read_bytes(), loaded.mel_filters,
                                max_seconds=loaded.max_audio_s)
        session.extend("user", user.text, clip, think=user.think)
        session.extend_reply(list(reply.token_ids or ()), think=user.think)
    return len(turns) // 2
