"""The history routes (app/history.py) as a client uses them: each owner sees and changes only their
own conversations, bad requests get one sentence, and where the app keeps its store."""

from __future__ import annotations

import json

import pytest
from starlette.applications import Starlette
from starlette.testclient import TestClient

from afnext.store import Store, StoredTurn
from app import history
from app.access import Access, key_owner, owner_of

ALICE, BOB = "a1" * 32, "b2" * 32


@pytest.fixture
def kept(tmp_path):
    store = Store(tmp_path)
    talk = store.create("talk", owner=owner_of(ALICE))
    store.add_exchange(talk, StoredTurn("user", "", audio=store.put_audio(b"fLaC voice", ".flac")),
                       StoredTurn("assistant", "<think>\nhmm\n</think>\nHello.", reasoning="hmm", token_ids=(1, 2)))
    recording = store.create("recording", owner=owner_of(ALICE), title="meeting.m4a", audio=(b"m4a bytes", ".m4a"))
    from types import SimpleNamespace

    from afnext.live import Live

    live = Live()
    held = SimpleNamespace(journal=SimpleNamespace(broken=None))  # what another tab holds of the recording
    live.put(recording, owner_of(ALICE), "10.0.0.1", held)
    routes = history.HistoryRoutes(store, Access("sesame"), live)
    return TestClient(Starlette(routes=routes.routes())), store, talk, recording, (live, held)


def _as(owner: str) -> dict:
    return {"X-AFNext-Owner": owner}


def test_an_owner_lists_reads_renames_and_deletes_their_own_conversations(kept):
    client, store, talk, recording, (live, held) = kept
    listed = client.get("/afnext/conversations", headers=_as(ALICE)).json()
    assert {c["id"] for c in listed["conversations"]} == {talk, recording} and listed["disk_bytes"] > 0
    assert [c["id"] for c in client.get("/afnext/conversations?kind=talk", headers=_as(ALICE)).json()["conversations"]] \
        == [talk]
    one = client.get(f"/afnext/conversations/{talk}", headers=_as(ALICE)).json()
    assert one["title"] == "“Hello.”" and one["turns"][1]["text"] == "Hello." \
        and one["turns"][1]["reasoning"] == "hmm" and one["turns"][0]["audio"] is True
    audio = client.get(f"/afnext/conversations/{talk}/audio/0", headers=_as(ALICE))
    assert audio.content == b"fLaC voice" and audio.headers["cache-control"].startswith("private")
    assert client.get(f"/afnext/conversations/{recording}/audio/recording", headers=_as(ALICE)).content == b"m4a bytes"
    renamed = client.patch(f"/afnext/conversations/{talk}", headers=_as(ALICE), json={"title": "  Pizza \u202e\u0000 order "})
    assert renamed.json()["title"] == "Pizza order" and store.get(talk, owner=owner_of(ALICE)).title == "Pizza order"
    long = client.patch(f"/afnext/conversations/{talk}", headers=_as(ALICE), json={"title": "x" * 500})
    assert long.json()["title"] == "x" * 200, "the title as kept is the one echoed"
    assert client.delete(f"/afnext/conversations/{recording}", headers=_as(ALICE)).status_code == 200
    assert live.get(recording, owner_of(ALICE)) is None, "its live state is let go of too"
    assert "was deleted" in held.journal.broken, "and whoever holds it is told at its next turn"
    assert store.get(recording, owner=owner_of(ALICE)) is None


def deleted_once_renamed(store: Store, monkeypatch) -> None:
    """Another tab's delete lands just after each rename of `store` (and before its answer)."""
    renaming = store.rename

    def renamed_then_deleted(cid, title, owner):
        done = renaming(cid, title, owner=owner)
        store.delete(cid, owner=owner)
        return done
    monkeypatch.setattr(store, "rename", renamed_then_deleted)


def test_a_delete_from_another_tab_between_finding_and_answering_gets_a_404_not_a_500(kept, monkeypatch):
    client, store, talk, _, _ = kept
    found = history.audio_file

    def deleted_meanwhile(*args):
        path = found(*args)
        store.delete(talk, owner=owner_of(ALICE))  # the other tab's delete lands just after the lookup
        return path
    monkeypatch.setattr(history, "audio_file", deleted_meanwhile)
    audio = client.get(f"/afnext/conversations/{talk}/audio/0", headers=_as(ALICE))
    assert audio.status_code == 404 and audio.json()["error"] == "That audio was deleted a moment ago."

    other = store.create("talk", owner=owner_of(ALICE), title="to rename")
    deleted_once_renamed(store, monkeypatch)
    renamed = client.patch(f"/afnext/conversations/{other}", headers=_as(ALICE), json={"title": "new"})
    assert renamed.status_code == 404 and "of yours" in renamed.json()["error"]


def test_another_owner_or_no_owner_reaches_nothing_of_it(kept):
    client, store, talk, _, _ = kept
    assert client.get("/afnext/conversations", headers=_as(BOB)).json()["conversations"] == []
    for method, path, body in (("GET", f"/afnext/conversations/{talk}", None),
                               ("GET", f"/afnext/conversations/{talk}/audio/0", None),
                               ("PATCH", f"/afnext/conversations/{talk}", {"title": "mine now"}),
                               ("DELETE", f"/afnext/conversations/{talk}", None)):
        answer = client.request(method, path, headers=_as(BOB), json=body)
        assert answer.status_code == 404 and "of yours" in answer.json()["error"] or "no such audio" in answer.json()["error"]
    assert client.get(f"/afnext/conversations/{talk}").status_code == 401
    assert client.get(f"/afnext/conversations/{talk}", headers={"Authorization": "Bearer sesame"}).status_code == 404, \
        "the key owns the key's conversations, not the page's"
    assert store.get(talk, owner=owner_of(ALICE)).title == "“Hello.”" and store.get(talk, owner=owner_of(ALICE)).turns == 1


def test_bad_requests_get_one_sentence(kept):
    client, _, talk, _, _ = kept
    cases = [("GET", "/afnext/conversations", {"X-AFNext-Owner": "../../etc"}, None, 400, "hexadecimal"),
             ("PATCH", f"/afnext/conversations/{talk}", _as(ALICE), b"{not json", 400, "not valid JSON"),
             ("PATCH", f"/afnext/conversations/{talk}", _as(ALICE), json.dumps({"title": 7}).encode(), 400, "title"),
             ("PATCH", f"/afnext/conversations/{talk}", _as(ALICE), json.dumps({"title": "  "}).encode(), 400, "letter"),
             ("PATCH", f"/afnext/conversations/{talk}", _as(ALICE), b"x" * 100_000, 413, "short JSON"),
             ("GET", f"/afnext/conversations/{talk}/audio/99", _as(ALICE), None, 404, "no such audio"),
             ("GET", f"/afnext/conversations/{talk}/audio/-1", _as(ALICE), None, 404, "no such audio")]
    for method, path, headers, body, status, words in cases:
        answer = client.request(method, path, headers=headers, content=body)
        assert answer.status_code == status and words in answer.json()["error"], (path, body, answer.text)
    sneaky = client.get("/afnext/conversations/..%2F..%2Fafnext.sqlite3/audio/recording", headers=_as(ALICE))
    assert sneaky.status_code == 404 and b"SQLite" not in sneaky.content


def test_the_key_owns_the_api_conversations():
    access = Access("sesame")
    assert access.owner({"authorization": "Bearer sesame"}) == key_owner("sesame")
    assert access.owner({"authorization": "Bearer wrong"}) is None
    assert access.owner({"x-afnext-owner": ALICE}) == owner_of(ALICE) != owner_of(BOB)
    assert owner_of(ALICE.upper()) == owner_of(ALICE) and owner_of("abc") is None and owner_of("z" * 64) is None


def test_a_space_without_persistent_storage_is_told_history_ends_with_a_restart(monkeypatch, tmp_path):
    monkeypatch.delenv("AFNEXT_DATA", raising=False)
    monkeypatch.setenv("SPACE_ID", "someone/afnext")
    monkeypatch.setattr(history, "SPACES_DATA", tmp_path / "no-such-mount")
    store, notice = history.open_store(None)
    assert "no persistent storage" in notice and store.path.exists()
    monkeypatch.setattr(history, "SPACES_DATA", tmp_path)
    store, notice = history.open_store(None)
    assert notice is None and store.path == tmp_path / "afnext"
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    store, notice = history.open_store(str(blocked / "data"))
    assert "cannot be kept in" in notice and "--data" in notice and store.path.exists()


def test_an_audio_index_of_any_length_is_a_sentence(kept):
    client, _, talk, _, _ = kept
    answer = client.get(f"/afnext/conversations/{talk}/audio/{'9' * 5000}", headers=_as(ALICE))
    assert answer.status_code == 404 and "no such audio" in answer.json()["error"]


def test_one_conversation_is_rebuilt_once_however_many_ask_for_it_at_the_same_moment():
    import threading
    import time as clock

    from afnext.live import Live

    live, running, peak, made = Live(), [0], [0], []

    def make(fail: bool):
        running[0] += 1
        peak[0] = max(peak[0], running[0])
        clock.sleep(0.05)
        running[0] -= 1
        if fail:
            raise RuntimeError("the store was unreachable")
        made.append(1)
        return "session"

    def first():
        with pytest.raises(RuntimeError):
            live.open("c", "o", "g", lambda: make(True))
    threads = [threading.Thread(target=first)] + [
        threading.Thread(target=lambda: live.open("c", "o", "g", lambda: make(False))) for _ in range(4)]
    for t in threads:
        t.start()
        clock.sleep(0.01)
    for t in threads:
        t.join()
    assert peak[0] == 1 and made == [1] and live.get("c", "o") == "session"
