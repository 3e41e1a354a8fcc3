"""The store under a hostile disk (a review): full, damaged, or written by a newer version. Each ends in
one sentence a user can act on; nothing already kept is lost, and the conversation goes on once the
disk is right again."""

from __future__ import annotations

import errno
import sqlite3

import pytest

import afnext.store as kept_module
from afnext.journal import Journal, KeptError
from afnext.store import Store, StoredTurn, StoreError

FULL = "disk the history is kept on is full"


def _kept(folder) -> tuple[Store, str]:
    store = Store(folder)
    cid = store.create("talk", owner="o")
    store.add_exchange(cid, StoredTurn("user", "Hi.", audio=store.put_audio(b"RIFF one", ".wav")),
                       StoredTurn("assistant", "Hello.", token_ids=(1, 2)), at=0)
    return store, cid


class _FullDisk:
    """Every write the database makes fails as on a full disk (SQLITE_FULL); audio writes too (ENOSPC)."""

    def __init__(self, store: Store, monkeypatch) -> None:
        self.real, self.store = store._db, store
        monkeypatch.setattr(store, "_db", self)
        monkeypatch.setattr("afnext.store.open", self._open, raising=False)

    def execute(self, sql: str, *args):
        if sql.lstrip().split()[0].upper() in ("INSERT", "UPDATE", "DELETE", "COMMIT"):
            exc = sqlite3.OperationalError("database or disk is full")
            exc.sqlite_errorcode = 13  # SQLITE_FULL
            raise exc
        return self.real.execute(sql, *args)

    def __getattr__(self, name):
        return getattr(self.real, name)

    @staticmethod
    def _open(path, mode="r", *args, **kwargs):
        if "w" in mode:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return open(path, mode, *args, **kwargs)


def test_a_full_disk_is_one_sentence_for_every_change_and_loses_nothing(tmp_path, monkeypatch):
    """A full disk failed with sqlite3's "database or disk is full" (a recording's upload on the page said
    "could not be kept (OperationalError)" and logged a traceback as a bug; a delete answered 503 "could not
    be read, try again"): each change now raises StoreError with one sentence, nothing kept is lost, and
    the conversation goes on once there is room."""
    store, cid = _kept(tmp_path)
    wav = tmp_path / "long.wav"
    wav.write_bytes(b"RIFF long recording")
    with monkeypatch.context() as m:
        _FullDisk(store, m)
        for change in (lambda: store.create("recording", owner="o", audio=(b"RIFF two", ".wav")),
                       lambda: store.create("recording", owner="o", audio=wav),
                       lambda: store.create("talk", owner="o"),
                       lambda: store.put_audio(b"RIFF three", ".wav"),
                       lambda: store.add_exchange(cid, StoredTurn("user", "More?"), StoredTurn("assistant", "No."), at=1),
                       lambda: store.rename(cid, "Greeting", owner="o"),
                       lambda: store.touch(cid),
                       lambda: store.delete(cid, owner="o")):
            with pytest.raises(StoreError, match=FULL):
                change()
        journal = Journal(store, cid, 1)
        with pytest.raises(KeptError, match=FULL):
            journal.put((b"RIFF four", ".wav"))
    assert [t.text for t in store.turns(cid)] == ["Hi.", "Hello."] and len(store.list(owner="o")) == 1
    store.add_exchange(cid, StoredTurn("user", "More?"), StoredTurn("assistant", "No."), at=1)
    assert Store(tmp_path).exchanges(cid) == 2


def test_the_history_routes_answer_a_full_disk_with_its_sentence(tmp_path, monkeypatch):
    from starlette.applications import Starlette
    from starlette.testclient import TestClient

    from app.access import Access
    from app.history import HistoryRoutes

    store, _ = _kept(tmp_path)
    access = Access(None, local=True)
    owner = "ab" * 32
    with TestClient(Starlette(routes=HistoryRoutes(store, access).routes())) as client:
        headers = {"X-AFNext-Owner": owner}
        kept = client.get("/afnext/conversations", headers=headers).json()["conversations"]
        assert kept == [], "another owner's"
        theirs = store.create("talk", owner=access.owner({"x-afnext-owner": owner}))
        store.add_exchange(theirs, StoredTurn("user", "Hi."), StoredTurn("assistant", "Hello."))
        _FullDisk(store, monkeypatch)
        for method, body in (("DELETE", None), ("PATCH", {"title": "New name"})):
            answer = client.request(method, f"/afnext/conversations/{theirs}", headers=headers, json=body)
            assert answer.status_code == 507 and FULL in answer.json()["error"], (method, answer.text)
        assert client.get(f"/afnext/conversations/{theirs}", headers=headers).status_code == 200, "reading still works"


def test_a_damaged_database_is_said_as_such_and_the_app_still_starts(tmp_path):
    """A store whose database is not one (a disk error, a file copied over it): the app said "start with
    --data DIR to choose a writable folder", though the folder was writable."""
    from app.history import open_store

    store, _ = _kept(tmp_path / "kept")
    store.close()
    (tmp_path / "kept" / "afnext.sqlite3").write_bytes(b"not a database" * 500)
    for leftover in ("afnext.sqlite3-wal", "afnext.sqlite3-shm"):
        (tmp_path / "kept" / leftover).unlink(missing_ok=True)
    with pytest.raises(StoreError, match="is damaged"):
        Store(tmp_path / "kept")
    fallback, notice = open_store(str(tmp_path / "kept"))
    assert fallback.path != tmp_path / "kept" and "is damaged" in notice and "writable" not in notice, notice
    assert (tmp_path / "kept" / "audio").is_dir() and any((tmp_path / "kept" / "audio").rglob("*.wav")), "kept aside"


def test_a_store_from_a_newer_version_is_refused_with_one_sentence_and_left_as_it_is(tmp_path):
    """There was no schema version: a store a newer release had changed was opened, and written, as if it
    were this release's. Now each store carries PRAGMA user_version; a newer one is refused, untouched."""
    store, _ = _kept(tmp_path)
    assert store._db.execute("PRAGMA user_version").fetchone() == (kept_module.SCHEMA_VERSION,)
    store._db.execute(f"PRAGMA user_version = {kept_module.SCHEMA_VERSION + 1}")
    store.close()
    with pytest.raises(StoreError, match="newer version of AF-Next"):
        Store(tmp_path)
    db = sqlite3.connect(tmp_path / "afnext.sqlite3")
    assert db.execute("PRAGMA user_version").fetchone() == (kept_module.SCHEMA_VERSION + 1,)
    assert db.execute("SELECT COUNT(*) FROM turns").fetchone() == (2,)
