"""Conversations kept on disk: an embedded SQLite database and the turns' audio as files, crash-safe.

    store = Store("~/.local/share/afnext")             # or AFNEXT_DATA, or --store PATH
    cid = store.create("cli")                           # or store.get(cid) for one kept before

A live session keeps its turns here through a `Journal`, and a new one is rebuilt from them by
`restore` (both in afnext/journal.py).

Durability (../shared/FACTS.md): WAL with `synchronous=NORMAL` survives a killed process (kill -9)
without corruption, and a committed transaction is there afterwards. An exchange is written in one
transaction, after its audio file is on disk (written to a temporary name, flushed, renamed), so a
crash at any moment leaves either the whole turn or none of it, and never a turn without its audio.

Audio is kept as the bytes the turn came in (a recording's own file, content-addressed by its
SHA-256): decoding the same bytes again gives the same samples, so a resumed conversation hears
exactly what the uninterrupted one heard, and a file used by many conversations is stored once. Two
kinds are compressed losslessly first, to FLAC, by the journal (afnext/journal.py).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import sqlite3
import threading
import time
import unicodedata
import uuid
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

log = logging.getLogger(__name__)

DATA_ENV = "AFNEXT_DATA"  # where conversations are kept when no path is given
SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id TEXT PRIMARY KEY, kind TEXT NOT NULL, title TEXT NOT NULL DEFAULT '', owner TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL, updated REAL NOT NULL, model TEXT NOT NULL DEFAULT '', system TEXT NOT NULL DEFAULT '',
    audio TEXT);
CREATE TABLE IF NOT EXISTS turns (
    conversation TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    idx INTEGER NOT NULL, role TEXT NOT NULL, text TEXT NOT NULL, think INTEGER NOT NULL DEFAULT 0,
    audio TEXT, reasoning TEXT NOT NULL DEFAULT '', steps TEXT NOT NULL DEFAULT '[]',
    token_ids TEXT, timings TEXT NOT NULL DEFAULT '{}', interrupted INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL, parts TEXT, instructions TEXT, PRIMARY KEY (conversation, idx));
CREATE INDEX IF NOT EXISTS conversations_by_owner ON conversations(owner, updated);
"""
# PRAGMA user_version: raised with each change to the tables above. A store a newer release wrote (and may
# have changed in ways this one cannot tell) is refused, untouched, rather than read or written wrongly.
SCHEMA_VERSION = 1
SQLITE_FULL = 13  # sqlite3's error codes: a full disk; a database that is damaged, or not one at all
SQLITE_DAMAGED = frozenset({11, 26})  # SQLITE_CORRUPT, SQLITE_NOTADB
FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})  # no room: disk, quota, file-size limit
FULL = "The disk the history is kept on is full, so nothing more can be kept or changed there until space is freed."
COPY_BLOCK_BYTES = 1 << 20  # a file kept from its path is copied this much at a time
BUSY_TIMEOUT_MS = 10_000  # how long a write waits while another process writes to the same store
PART_MAX_AGE_S = 3600.0  # an audio copy's .part file this old was cut short by a crash: deleted on open
MAX_ID_CHARS = 64
MAX_TITLE_CHARS = 200
CONVERSATIONS = ("SELECT c.id, c.kind, c.title, c.owner, c.created, c.updated, c.model, c.system, c.audio, "
                 "(SELECT COUNT(*) FROM turns t "
                 "WHERE t.conversation = c.id AND t.role = 'assistant') FROM conversations c ")  # → Conversation


class StoreError(ValueError):
    """A conversation that cannot be had (unknown id, another owner's); the message says so."""


class StoreFull(StoreError):
    """The disk the store is on has no room: nothing was changed (what is kept stays as it was)."""


@contextlib.contextmanager
def _room():
    """A change to the store; a full disk (sqlite's SQLITE_FULL, or ENOSPC writing audio) → StoreFull."""
    try:
        yield
    except sqlite3.OperationalError as exc:
        if getattr(exc, "sqlite_errorcode", 0) & 0xFF != SQLITE_FULL:
            raise
        raise StoreFull(FULL) from exc
    except OSError as exc:
        if exc.errno not in FULL_ERRNOS:
            raise
        raise StoreFull(FULL) from exc


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
    # An answer about a recording heard in parts (afnext/parts.py): {"ids": each part's generated ids,
    # "merge": the merge turn's question}; the turn's own token_ids are the merge's reply.
    parts: dict | None = None
    # A user turn's: system messages the conversation took just before it (instructions changed
    # mid-conversation), in order.
    instructions: tuple[str, ...] = ()

    @property
    def answer(self) -> str:
        """An assistant turn's part meant for the user: its text after the reasoning, if any."""
        if "</think>" in self.text:
            return self.text.split("</think>", 1)[1].strip()
        return "" if self.reasoning else self.text.strip()


@dataclass(frozen=True)
class Conversation:
    id: str
    kind: str  # "cli" | "talk" | "recording" | "api"
    title: str
    owner: str
    created: float
    updated: float
    model: str  # the checkpoint its replies came from: their token ids mean something only to it
    system: str  # its system prompt (instructions), "" for none
    audio: str | None  # a recording conversation's recording (its key in the store)
    turns: int  # completed exchanges


def default_path() -> Path:
    """$AFNEXT_DATA, else the per-user data folder ($XDG_DATA_HOME/afnext or ~/.local/share/afnext)."""
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV]).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "afnext"


class Store:
    """A folder holding `afnext.sqlite3` and `audio/`. Thread-safe: one connection, one lock."""

    def __init__(self, path: str | os.PathLike | None = None, *, max_bytes: int | None = None) -> None:
        self.path = Path(path).expanduser() if path is not None else default_path()
        # Audio this store may hold; beyond it the conversations least recently used go first (None: no limit).
        self.max_bytes = max_bytes
        self._audio_bytes: int | None = None  # what the audio holds, once measured (a limit needs it)
        (self.path / "audio").mkdir(parents=True, exist_ok=True)
        # A write a crash cut short; an hour old at least, so no other process's copy still in progress goes.
        for stale in (self.path / "audio").glob("*/.*.part"):
            try:
                if time.time() - stale.stat().st_mtime > PART_MAX_AGE_S:
                    stale.unlink()
            except FileNotFoundError:
                pass
        self._lock = threading.Lock()
        self._in_flight: Counter[str] = Counter()  # audio kept for turns not committed yet: no delete takes it
        self._touched: dict[str, float] = {}  # audio files' times as this process last wrote or touched them
        self._db = sqlite3.connect(self.path / "afnext.sqlite3", check_same_thread=False, isolation_level=None)
        try:
            self._open()
        except sqlite3.DatabaseError as exc:
            self._db.close()
            if getattr(exc, "sqlite_errorcode", 0) & 0xFF in SQLITE_DAMAGED:
                raise StoreError(f"The history database {self.path / 'afnext.sqlite3'} is damaged ({exc}): move it "
                                 "aside to begin a new one (the audio beside it stays), or use another folder.") from exc
            if getattr(exc, "sqlite_errorcode", 0) & 0xFF == SQLITE_FULL:
                raise StoreFull(FULL) from exc
            raise
        except BaseException:
            self._db.close()
            raise

    def _open(self) -> None:
        """The connection's settings, and the tables made or upgraded to SCHEMA_VERSION."""
        # First: several processes may share the folder (app replicas on one machine), and every statement
        # below may wait for another's write.
        self._db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        self._wal()
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.execute("BEGIN IMMEDIATE")  # one process at a time makes or upgrades the tables
        try:
            (version,) = self._db.execute("PRAGMA user_version").fetchone()
            if version > SCHEMA_VERSION:
                raise StoreError(f"The history in {self.path} was written by a newer version of AF-Next (its schema "
                                 f"{version}, this one's {SCHEMA_VERSION}): upgrade AF-Next, or keep this one's "
                                 "history in another folder.")
            for statement in filter(str.strip, SCHEMA.split(";")):
                self._db.execute(statement)
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(conversations)")}
            for column, kind in (("model", "TEXT NOT NULL DEFAULT ''"), ("system", "TEXT NOT NULL DEFAULT ''"),
                                 ("audio", "TEXT")):  # an older store
                if column not in columns:
                    self._db.execute(f"ALTER TABLE conversations ADD COLUMN {column} {kind}")
            held = {row[1] for row in self._db.execute("PRAGMA table_info(turns)")}
            for column in ("parts", "instructions"):  # an older store
                if column not in held:
                    self._db.execute(f"ALTER TABLE turns ADD COLUMN {column} TEXT")
            if version < SCHEMA_VERSION:
                self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise

    def _wal(self) -> None:
        """Write-ahead logging, which lets several processes read while one writes. A new store (or one
        from before it) is switched on first open; replicas opening it at the same moment may find the
        switch locked at once, without the busy wait: they try again for as long."""
        deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
        while True:
            try:
                self._db.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ---- conversations ----

    def create(self, kind: str, *, owner: str = "", title: str = "", id: str | None = None, model: str = "",
               system: str = "", audio: tuple[bytes, str] | str | os.PathLike | None = None) -> str:
        """A new conversation's id (`id` if given: a name the caller chose). `audio`: a recording's file
        (bytes, suffix), or its path (copied in blocks, as it is: a 4-hour recording is never in memory
        whole), kept with it whether or not any turn refers to it."""
        cid = check_id(id) if id is not None else uuid.uuid4().hex
        now = time.time()
        with _room():
            staged = self._stage(audio) if isinstance(audio, (str, os.PathLike)) else None
        with self._lock, _room():
            if staged is not None:
                key = self._place(*staged)
            else:
                key = None if audio is None else self._put_audio(*audio)
            try:
                self._db.execute("INSERT INTO conversations (id, kind, title, owner, created, updated, model, system, "
                                 "audio) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                                 (cid, kind, clean_title(title), owner, now, now, model, system, key))
            except sqlite3.IntegrityError:
                raise StoreError(f"A conversation named {cid!r} exists already.") from None
        return cid

    def get(self, cid: str, *, owner: str = "") -> Conversation | None:
        """The conversation `cid` of `owner`, or None: another owner's is as good as missing."""
        with self._lock:
            row = self._db.execute(
                CONVERSATIONS + "WHERE c.id = ? AND c.owner = ?", (cid, owner)).fetchone()
        return Conversation(*row) if row else None

    def set_model(self, cid: str, model: str) -> None:
        """The checkpoint(s) a conversation without turns will be held with."""
        with self._lock, _room():
            self._db.execute("UPDATE conversations SET model = ? WHERE id = ?", (model, cid))

    def touch(self, cid: str) -> None:
        """`cid` is in use now: no prune, here or in another process, takes it as unused."""
        with self._lock, _room():
            self._db.execute("UPDATE conversations SET updated = ? WHERE id = ?", (time.time(), cid))

    def list(self, *, owner: str = "", kind: str | None = None) -> list[Conversation]:
        """`owner`'s conversations (of `kind`, if given), the most recently updated first."""
        with self._lock:
            rows = self._db.execute(
                CONVERSATIONS + "WHERE c.owner = ? AND (? IS NULL OR c.kind = ?) ORDER BY c.updated DESC",
                (owner, kind, kind)).fetchall()
        return [Conversation(*row) for row in rows]

    def rename(self, cid: str, title: str, *, owner: str = "") -> bool:
        """Give `owner`'s conversation `cid` a title; False if there is none."""
        title = clean_title(title)
        if not title:
            raise StoreError("A title needs at least one letter.")
        with self._lock, _room():
            return bool(self._db.execute("UPDATE conversations SET title = ? WHERE id = ? AND owner = ?",
                                         (title, cid, owner)).rowcount)

    def disk_bytes(self, *, owner: str | None = None) -> int:
        """Bytes on disk: the audio `owner`'s conversations use (each file once), or (None) the whole store."""
        with self._lock:
            if owner is None:
                keys = None
            else:
                keys = [k for (k,) in self._db.execute(
                    "SELECT t.audio FROM turns t JOIN conversations c ON c.id = t.conversation "
                    "WHERE c.owner = ? AND t.audio IS NOT NULL UNION "
                    "SELECT audio FROM conversations WHERE owner = ? AND audio IS NOT NULL", (owner, owner))]
        if keys is None:
            files = [self.path / "afnext.sqlite3", *(self.path / "audio").glob("*/*")]
        else:
            files = [self._audio_path(k) for k in keys]
        total = 0
        for path in files:
            try:
                total += path.stat().st_size
            except FileNotFoundError:
                pass
        return total

    def turns(self, cid: str) -> list[StoredTurn]:
        with self._lock:
            rows = self._db.execute("SELECT role, text, think, audio, reasoning, steps, token_ids, timings, interrupted, "
                                    "parts, instructions FROM turns WHERE conversation = ? ORDER BY idx", (cid,)).fetchall()
        return [StoredTurn(role, text, bool(think), audio, reasoning, json.loads(steps),
                           None if ids is None else tuple(json.loads(ids)), json.loads(timings), bool(interrupted),
                           None if parts is None else json.loads(parts), tuple(json.loads(instructions or "[]")))
                for role, text, think, audio, reasoning, steps, ids, timings, interrupted, parts, instructions in rows]

    def instructions_in_force(self, cid: str) -> str | None:
        """The instructions conversation `cid` took last mid-conversation (StoredTurn.instructions), or
        None when they never changed from its system prompt."""
        with self._lock:
            row = self._db.execute("SELECT instructions FROM turns WHERE conversation = ? AND instructions IS NOT NULL "
                                   "ORDER BY idx DESC LIMIT 1", (cid,)).fetchone()
        return None if row is None else json.loads(row[0])[-1]

    def exchanges(self, cid: str) -> int:
        """How many exchanges (a question and its reply) conversation `cid` holds."""
        with self._lock:
            (n,) = self._db.execute("SELECT COUNT(*) FROM turns WHERE conversation = ? AND role = 'assistant'",
                                    (cid,)).fetchone()
        return n

    def add_exchange(self, cid: str, user: StoredTurn, assistant: StoredTurn, *, at: int | None = None,
                     audio: tuple[bytes, str] | None = None) -> None:
        """A completed turn, both its messages, in one transaction (all of it or nothing survives a
        crash). `at`: the turns the caller's session held before it — StoreError if the conversation
        went on elsewhere meanwhile (another process on the same id). `audio`: the user turn's file
        (bytes, suffix), kept first, under the same lock as `delete`, so no delete can take it away."""
        now = time.time()
        with self._lock, _room():
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
                    db.execute("INSERT INTO turns (conversation, idx, role, text, think, audio, reasoning, steps, "
                               "token_ids, timings, interrupted, created, parts, instructions) "
                               "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                               (cid, n + i, turn.role, turn.text, int(turn.think), turn.audio, turn.reasoning,
                                json.dumps(turn.steps), None if turn.token_ids is None else json.dumps(list(turn.token_ids)),
                                json.dumps(turn.timings), int(turn.interrupted), now,
                                None if turn.parts is None else json.dumps(turn.parts),
                                json.dumps(list(turn.instructions)) if turn.instructions else None))
                # Named by its first question; a spoken one (no text) by the start of its first answer.
                title = clean_title((user.text.strip().splitlines() or [""])[0])[:80]
                answer = clean_title(assistant.answer)
                if not title and answer:
                    title = f"“{answer[:60].rstrip()}{'…' if len(answer) > 60 else ''}”"
                db.execute("UPDATE conversations SET updated = ?, title = CASE WHEN title = '' THEN ? ELSE title END "
                           "WHERE id = ?", (now, title, cid))
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:  # a failed COMMIT (a full disk) has rolled back already
                    db.execute("ROLLBACK")
                raise

    def rewrite_reply(self, cid: str, at: int, text: str) -> None:
        """The reply of exchange `at` (0-based) is now `text` (what the user heard of it before speaking
        over it): kept by its text, no longer by its token ids. It must be the last reply: StoreError if
        the conversation went on meanwhile in another process (whose turn would be the one rewritten)."""
        with self._lock, _room():
            changed = self._db.execute(
                "UPDATE turns SET text = ?, token_ids = NULL, interrupted = 1 WHERE conversation = ? AND idx = ? "
                "AND role = 'assistant' AND (SELECT COUNT(*) FROM turns WHERE conversation = ?) = ?",
                (text, cid, 2 * at + 1, cid, 2 * at + 2)).rowcount
        if not changed:
            raise StoreError(f"The conversation {cid!r} does not end with reply {at + 1} (it went on elsewhere "
                             "meanwhile); open it again to go on from there.")

    def delete(self, cid: str, *, owner: str = "") -> bool:
        """Delete `owner`'s conversation `cid` and the audio no other conversation uses; False if none."""
        with self._lock, _room():
            return self._delete(cid, owner)

    def _delete(self, cid: str, owner: str | None) -> bool:
        """`delete` with the lock held; `owner` None: whoever owns it."""
        audio = {a for (a,) in self._db.execute(
            "SELECT audio FROM turns WHERE conversation = ? AND audio IS NOT NULL UNION SELECT audio FROM "
            "conversations WHERE id = ? AND (? IS NULL OR owner = ?) AND audio IS NOT NULL", (cid, cid, owner, owner))}
        updated = self._db.execute("SELECT updated FROM conversations WHERE id = ?", (cid,)).fetchone()
        deleted = self._db.execute("DELETE FROM conversations WHERE id = ? AND (? IS NULL OR owner = ?)",
                                   (cid, owner, owner)).rowcount
        if deleted:
            for key in audio - set(self._in_flight):
                if not self._db.execute("SELECT 1 FROM turns WHERE audio = ? UNION SELECT 1 FROM conversations "
                                        "WHERE audio = ? LIMIT 1", (key, key)).fetchone():
                    # not a file another process has put again since (this one's own touches are no sign)
                    self._unlink(self._audio_path(key), unless_touched_after=max(updated[0], self._touched.pop(key, 0.0)))
        return bool(deleted)

    def _unlink(self, path: Path, unless_touched_after: float | None = None) -> None:
        """Remove a kept file; with `unless_touched_after`, not one put again since then: another process
        sharing this store (a replica) is asking a turn with the same bytes (`prune` takes it later if
        that turn is never kept).

        The file is first renamed aside, and its time read after that: another process's put either
        touched it before (the time shows it, and it is put back) or finds it gone and writes it anew.
        Read before the removal, a put between the read and the removal lost its file."""
        if unless_touched_after is None:
            aside = path
        else:
            aside = path.with_name(f".{path.name}.{uuid.uuid4().hex}.part")  # swept on open if a crash leaves it
            try:
                path.rename(aside)
            except FileNotFoundError:
                return
        try:
            stat = aside.stat()
            if unless_touched_after is not None and stat.st_mtime > unless_touched_after:
                os.replace(aside, path)  # the same bytes as any file written there meanwhile
                return
            aside.unlink()
        except FileNotFoundError:
            return
        if self._audio_bytes is not None:
            self._audio_bytes -= stat.st_size

    def prune(self, keep_days: float, *, keep: str | None = None) -> int:
        """Delete the conversations not updated for `keep_days` (but `keep`, the one being opened),
        then every audio file no turn refers to; the number of conversations deleted."""
        cutoff = time.time() - keep_days * 86400
        with self._lock, _room():
            gone = self._db.execute("DELETE FROM conversations WHERE updated < ? AND id IS NOT ?",
                                    (cutoff, keep)).rowcount
            used = {key for (key,) in self._db.execute("SELECT audio FROM turns WHERE audio IS NOT NULL UNION "
                                                       "SELECT audio FROM conversations WHERE audio IS NOT NULL")}
            for path in (self.path / "audio").glob("*/*"):
                # Not a file touched in the last hour: another process may be about to commit a turn with it.
                try:
                    recent = time.time() - 3600
                    if (not path.name.startswith(".") and path.name not in used and path.name not in self._in_flight
                            and path.stat().st_mtime < recent):
                        self._unlink(path, unless_touched_after=recent)  # checked again once it is aside
                except FileNotFoundError:  # another process's prune took it first
                    continue
        return gone

    # ---- audio ----

    def put_audio(self, data: bytes, suffix: str = "", *, hold: bool = False) -> str:
        """Keep an audio file's bytes; its key (SHA-256, with the file's suffix). Written to a temporary
        name, flushed to disk and renamed: the key's file is whole or absent, whatever happens. A file
        no turn refers to may be removed by `delete`: give it to `add_exchange` to keep it with a turn,
        or `hold` it for one about to be (as `hold_audio`, in the same step: no delete comes between)."""
        with self._lock, _room():
            key = self._put_audio(data, suffix)
            if hold:
                self._in_flight[key] += 1
            return key

    def _put_audio(self, data: bytes, suffix: str) -> str:
        key = hashlib.sha256(data).hexdigest() + (suffix.lower()[:8] if suffix.startswith(".") else "")
        path = self._audio_path(key)
        try:
            self._touch(key)  # kept already: fresh again, so no `prune` elsewhere takes it before our commit
        except FileNotFoundError:
            self._make_room(len(data))
            path.parent.mkdir(exist_ok=True)
            part = path.with_name(f".{path.name}.{uuid.uuid4().hex}.part")
            try:
                with open(part, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(part, path)
                self._touched[key] = path.stat().st_mtime
            finally:
                part.unlink(missing_ok=True)  # a write that failed (a full disk) leaves nothing behind
            if self._audio_bytes is not None:
                self._audio_bytes += len(data)
        return key

    def put_audio_file(self, path: str | os.PathLike) -> str:
        """`put_audio` for a file, copied in blocks as it is (not converted): its key."""
        with _room():
            staged = self._stage(path)
        with self._lock, _room():
            return self._place(*staged)

    def _stage(self, path: str | os.PathLike) -> tuple[Path, str, int]:
        """Copy a file into the store's incoming folder in blocks, hashing it: (copy, key, bytes)."""
        incoming = self.path / "audio" / "incoming"
        incoming.mkdir(exist_ok=True)
        copy, digest, size = incoming / f".{uuid.uuid4().hex}.part", hashlib.sha256(), 0
        try:
            with open(path, "rb") as source, open(copy, "wb") as out:
                while block := source.read(COPY_BLOCK_BYTES):
                    digest.update(block)
                    out.write(block)
                    size += len(block)
                out.flush()
                os.fsync(out.fileno())
        except BaseException:
            copy.unlink(missing_ok=True)
            raise
        suffix = Path(path).suffix
        return copy, digest.hexdigest() + (suffix.lower()[:8] if suffix.startswith(".") else ""), size

    def _place(self, copy: Path, key: str, size: int) -> str:
        """A staged copy under its key (lock held), or dropped if the store has that file already."""
        path = self._audio_path(key)
        try:
            if path.exists():
                self._touch(key)
                return key
            self._make_room(size)
            path.parent.mkdir(exist_ok=True)
            os.replace(copy, path)
            self._touched[key] = path.stat().st_mtime
            if self._audio_bytes is not None:
                self._audio_bytes += size
            return key
        finally:
            copy.unlink(missing_ok=True)

    def _make_room(self, size: int) -> None:
        """Within `max_bytes` of audio, room for `size` more (lock held): the conversations least recently
        used go first, never one used in the last hour (it may be in use), nor audio a turn is about to
        commit with. StoreError if that is not enough."""
        if self.max_bytes is None:
            return
        # Measured when not known yet, and again when this process's count says over: other processes
        # sharing the store (replicas) delete files too, which it never saw. No conversation goes for room
        # on a count alone.
        if self._audio_bytes is None or self._audio_bytes + size > self.max_bytes:
            self._audio_bytes = self._measure()
        if self._audio_bytes + size <= self.max_bytes:
            return
        old = [cid for (cid,) in self._db.execute("SELECT id FROM conversations WHERE updated < ? ORDER BY updated",
                                                  (time.time() - 3600,))]
        for cid in old:
            self._delete(cid, None)
            log.info("the store is full: deleted conversation %s, the one unused longest", cid)
            if self._audio_bytes + size <= self.max_bytes:
                return
        raise StoreError(f"The history is full ({self.max_bytes / 1e9:.1f} GB, all of it used in the last hour), so "
                         "this is not kept; try again later, or give the store more room.")

    def _measure(self) -> int:
        """Bytes of the kept audio files, as they are on disk now."""
        total = 0
        for path in (self.path / "audio").glob("*/*"):
            try:
                total += path.stat().st_size
            except FileNotFoundError:  # another process's delete, meanwhile
                continue
        return total

    def touch_audio(self, key: str) -> None:
        """Mark a kept file fresh (no `prune` elsewhere takes it within the hour); StoreError if it is gone."""
        with self._lock, _room():
            self.audio_path(key)
            self._touch(key)

    def _touch(self, key: str) -> None:
        path = self._audio_path(key)
        os.utime(path)
        self._touched[key] = path.stat().st_mtime

    def hold_audio(self, key: str) -> None:
        """`key` is kept for a turn that will commit soon: no `delete` or `prune` of this store takes it
        meanwhile (in another process, `prune` leaves files touched in the last hour alone)."""
        with self._lock:
            self.audio_path(key)  # StoreError if it is gone already
            self._in_flight[key] += 1

    def release_audio(self, key: str) -> None:
        """The turn holding `key` committed (its row refers to it now) or never happened."""
        with self._lock:
            self._in_flight[key] -= 1
            if self._in_flight[key] <= 0:
                del self._in_flight[key]

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


def clean_title(title: str) -> str:
    """A title as shown: one line, no control or format characters (NUL, zero-width, right-to-left
    overrides), spaces collapsed, at most MAX_TITLE_CHARS."""
    shown = "".join(c if unicodedata.category(c)[0] != "C" else " " for c in title)
    return " ".join(shown.split())[:MAX_TITLE_CHARS]


def check_id(cid: str) -> str:
    if not cid or len(cid) > MAX_ID_CHARS or not all(c.isascii() and (c.isalnum() or c in "-_.") for c in cid):
        raise StoreError(f"A conversation id is 1-{MAX_ID_CHARS} letters, digits, '-', '_' or '.'.")
    return cid
