"""The conversation store: owners kept apart, audio kept once, many writers at once, exact resumes,
and a real SIGKILL of the CLI at several moments of a turn."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile

from afnext.events import TurnDone
from afnext.journal import restore
from afnext.sampling import GenerationOptions
from afnext.session import Session
from afnext.store import Store, StoredTurn, StoreError
from tests.conftest import noise

ROOT = Path(__file__).resolve().parents[1]
GREEDY = GenerationOptions(max_new_tokens=8, temperature=0.0)


def test_conversations_belong_to_their_owner_and_deleting_one_frees_its_own_audio(tmp_path):
    store = Store(tmp_path)
    shared, own = store.put_audio(b"RIFF shared", ".wav"), store.put_audio(b"RIFF mine", ".WAV")
    assert store.put_audio(b"RIFF shared", ".wav") == shared, "the same bytes are kept once"
    a = store.create("talk", owner="alice")
    b = store.create("talk", owner="bob", title="Bob's")
    for cid, audio in ((a, [shared, own]), (b, [shared])):
        for key in audio:
            store.add_exchange(cid, StoredTurn("user", "What is it?", audio=key),
                               StoredTurn("assistant", "A note.", token_ids=(1, 2)))
    assert [c.id for c in store.list(owner="alice")] == [a] and store.get(a, owner="alice").turns == 2
    assert store.get(a, owner="bob") is None and not store.delete(a, owner="bob"), "an id alone grants nothing"
    assert store.get(a, owner="alice").title == "What is it?"
    assert store.delete(a, owner="alice")
    assert store.audio_path(shared).exists(), "bob's conversation still uses it"
    with pytest.raises(StoreError, match="missing"):
        store.audio_path(own)
    with pytest.raises(StoreError, match="letters, digits"):
        store.create("cli", id="../escape")
    with pytest.raises(StoreError, match="exists already"):
        store.create("cli", id=b)


def test_eight_conversations_writing_at_once_lose_nothing(tmp_path):
    store = Store(tmp_path)
    ids = [store.create("api") for _ in range(8)]

    def write(cid: str) -> None:
        for i in range(25):
            store.add_exchange(cid, StoredTurn("user", f"q{i}"), StoredTurn("assistant", f"a{i}", token_ids=(i,)))

    threads = [threading.Thread(target=write, args=(cid,)) for cid in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    reopened = Store(tmp_path)  # what a restart finds
    for cid in ids:
        turns = reopened.turns(cid)
        assert [t.text for t in turns] == [x for i in range(25) for x in (f"q{i}", f"a{i}")]
        assert [t.token_ids for t in turns[1::2]] == [(i,) for i in range(25)]


def _reply(session: Session, text: str, audio=None, think: bool = False):
    return [e for e in session.ask(text, audio, think=think, options=GREEDY) if isinstance(e, TurnDone)][0].reply


def test_a_restored_conversation_goes_on_with_the_tokens_of_an_uninterrupted_one(engine, tmp_path):
    wav = tmp_path / "clip.wav"
    soundfile.write(wav, noise(3.0, seed=4), 16000)
    turns = [("What is this?", wav.read_bytes(), False), ("Think about it.", None, True), ("And now?", None, False)]
    live = Session(engine)
    replies = [_reply(live, text, audio, think) for text, audio, think in turns]

    store = Store(tmp_path / "store")
    cid = store.create("cli")
    kept = Session(engine)
    for (text, audio, think), reply in zip(turns[:2], replies):
        key = store.put_audio(audio, ".wav") if audio else None
        assert _reply(kept, text, audio, think).token_ids == reply.token_ids
        store.add_exchange(cid, StoredTurn("user", text, think, key), StoredTurn("assistant", reply.text,
                                                                                 token_ids=reply.token_ids))
    resumed = Session(engine)
    assert restore(resumed, Store(tmp_path / "store"), cid) == 2
    assert resumed.tokens == kept.tokens, "the rebuilt conversation holds the very tokens of the live one"
    last = _reply(resumed, *turns[2])
    assert last.token_ids == replies[2].token_ids and last.prompt_tokens == replies[2].prompt_tokens
    assert all(r.token_ids for r in replies), "replies were empty: the comparison would prove nothing"


# ---- a real SIGKILL of `python -m afnext chat --conversation` ----

LONG = {"text": "Tell me everything.", "max_new_tokens": 3000, "min_new_tokens": 3000, "temperature": 0}


def _cli(tiny_dir, store: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "afnext", "chat", "--model", str(tiny_dir), "--jsonl",
                             "--conversation", "kept", "--store", str(store)], cwd=ROOT, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def _say(proc: subprocess.Popen, turn: dict) -> None:
    proc.stdin.write(json.dumps(turn) + "\n")
    proc.stdin.flush()


def test_a_sigkill_at_any_moment_loses_at_most_the_turn_in_progress(tiny_dir, tmp_path):
    """Killed between turns, and 0.05 s, 0.2 s and 1 s into a turn (here: while its 2-minute clip is
    decoded, while it is encoded and prefilled, and while a 3,000-token reply is decoded; a slower
    machine only moves the first two later in the same turn): after each restart every completed
    turn is there, the store opens cleanly, and the conversation goes on with the token ids of a run
    that was never interrupted."""
    wav = tmp_path / "long.wav"
    soundfile.write(wav, noise(120.0, seed=2), 16000)  # two minutes: its decoding and prefill take a while
    first = {"text": "What is it?", "audio": str(wav), "max_new_tokens": 6, "temperature": 0}
    follow = {"text": "And then?", "max_new_tokens": 6, "temperature": 0}
    store = tmp_path / "store"

    proc = _cli(tiny_dir, store)
    assert json.loads(proc.stdout.readline()) == {"conversation": "kept", "turns": 0}
    _say(proc, first)
    done = json.loads(proc.stdout.readline())
    os.kill(proc.pid, signal.SIGKILL)  # between turns
    proc.wait()
    moments = {"between turns": 1}
    for name, delay, turn in (("while the clip is decoded", 0.05, {**first, "text": "Again?"}),
                              ("while it is prefilled", 0.2, {**first, "text": "Once more?"}),
                              ("while decoding", 1.0, LONG)):
        proc = _cli(tiny_dir, store)
        assert json.loads(proc.stdout.readline()) == {"conversation": "kept", "turns": 1}, name
        _say(proc, turn)
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        moments[name] = 1
    proc = _cli(tiny_dir, store)
    assert json.loads(proc.stdout.readline()) == {"conversation": "kept", "turns": 1}, "only completed turns are kept"
    _say(proc, follow)
    resumed = json.loads(proc.stdout.readline())
    proc.stdin.close()
    assert proc.wait(60) == 0

    reference = subprocess.run([sys.executable, "-m", "afnext", "chat", "--model", str(tiny_dir), "--jsonl"], cwd=ROOT,
                               input=json.dumps(first) + "\n" + json.dumps(follow) + "\n", capture_output=True,
                               text=True, timeout=300)
    expected = [json.loads(line) for line in reference.stdout.splitlines()]
    assert done["token_ids"] == expected[0]["token_ids"]
    assert resumed["token_ids"] == expected[1]["token_ids"] and resumed["prompt_tokens"] == expected[1]["prompt_tokens"]
    assert len(moments) == 4
    listed = subprocess.run([sys.executable, "-m", "afnext", "conversations", "--store", str(store), "--json"],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert [(c["id"], c["turns"], c["title"]) for c in map(json.loads, listed.stdout.splitlines())] == [
        ("kept", 2, "What is it?")]
    cut = list(store.rglob("*.part"))  # a copy a kill cut short: left while another process might be at it
    for part in cut:
        os.utime(part, (time.time() - 7200, time.time() - 7200))
    fresh = store / "audio" / "ab" / ".in-progress.part"  # another process's copy, begun a moment ago
    fresh.parent.mkdir(exist_ok=True)
    fresh.write_bytes(b"RIFF")
    turns = Store(store).turns("kept")
    assert [t.role for t in turns] == ["user", "assistant"] * 2 and list(store.rglob("*.part")) == [fresh]
    assert np.array_equal(np.asarray(turns[3].token_ids), np.asarray(resumed["token_ids"]))


def test_the_cli_never_lets_the_store_and_its_session_differ(tiny_dir, tmp_path):
    """A second process on the same conversation, a resume on another model, audio that is not audio:
    each is one sentence, and the store holds only what a session really had."""
    store = tmp_path / "store"
    junk = tmp_path / "junk.wav"
    junk.write_bytes(os.urandom(4000))
    a, b = _cli(tiny_dir, store), _cli(tiny_dir, store)
    for proc in (a, b):
        assert json.loads(proc.stdout.readline())["turns"] == 0
    _say(a, {"text": "First?", "max_new_tokens": 2})
    assert "token_ids" in json.loads(a.stdout.readline())
    _say(a, {"text": "Noise?", "audio": str(junk)})
    assert json.loads(a.stdout.readline())["error"]  # refused: the turn is not kept
    _say(b, {"text": "Meanwhile?", "max_new_tokens": 2})  # b never saw a's turn: it must not be kept after it
    refusal = json.loads(b.stdout.readline())["error"]
    assert "went on elsewhere" in refusal and "stops here" in refusal, refusal
    assert b.wait(60) == 1
    a.stdin.close()
    assert a.wait(60) == 0
    kept = Store(store)
    assert [t.text for t in kept.turns("kept")][0::2] == ["First?"]
    assert not [p for p in (store / "audio").rglob("*") if p.is_file()], "audio of a refused turn is not kept"
    other = subprocess.run([sys.executable, "-m", "afnext", "chat", "--model", "tiny", "--jsonl", "--conversation",
                            "kept", "--store", str(store)], cwd=ROOT, input="", capture_output=True, text=True,
                           timeout=300)
    assert other.returncode == 1 and f"was held with {tiny_dir}" in other.stderr, other.stderr


def test_a_conversation_that_filled_the_context_can_be_reopened(engine, tmp_path, monkeypatch):
    from afnext.session import ContextFullError

    probe = Session(engine)
    _reply(probe, "Hi")
    limit = len(probe.tokens) + 30
    monkeypatch.setattr(type(engine.loaded), "context_tokens", property(lambda self: limit))
    live = Session(engine)
    reply = [e for e in live.ask("Tell me everything.", options=GenerationOptions(max_new_tokens=500, min_new_tokens=500))
             if isinstance(e, TurnDone)][0].reply
    assert len(live.tokens) > limit, "the reply ran to the end of the context, its closing tokens past it"
    store = Store(tmp_path)
    cid = store.create("cli")
    store.add_exchange(cid, StoredTurn("user", "Tell me everything."),
                       StoredTurn("assistant", reply.text, token_ids=reply.token_ids))
    reopened = Session(engine)
    assert restore(reopened, store, cid) == 1 and reopened.tokens == live.tokens
    with pytest.raises(ContextFullError):  # as the live one: its next turn cannot fit
        _reply(reopened, "And?")


def test_conversations_unused_for_keep_days_go_with_the_audio_only_they_used(tmp_path):
    import sqlite3

    store = Store(tmp_path)
    old, new, opened = (store.create("cli") for _ in range(3))
    for cid, data in ((old, b"RIFF old"), (new, b"RIFF new"), (opened, b"RIFF opened")):
        store.add_exchange(cid, StoredTurn("user", "Hi"), StoredTurn("assistant", "Hello", token_ids=(1,)),
                           audio=(data, ".wav"))
    month_ago = time.time() - 40 * 86400
    with sqlite3.connect(tmp_path / "afnext.sqlite3") as db:  # two of them were last used 40 days ago
        db.execute("UPDATE conversations SET updated = ? WHERE id IN (?, ?)", (month_ago, old, opened))
    files = {p.name: p for p in (tmp_path / "audio").rglob("*.wav")}
    for path in files.values():
        os.utime(path, (month_ago, month_ago))
    assert store.prune(30, keep=opened) == 1, "the one being opened is not old"
    assert store.get(old) is None and store.get(new) and store.get(opened)
    left = {p.name for p in (tmp_path / "audio").rglob("*.wav")}
    assert len(left) == 2 and all(store.turns(c)[0].audio in left for c in (new, opened))


# ---- a session's journal: turns kept as the session commits them ----

def _journaled(engine, store: Store, cid: str | None = None, **create) -> Session:
    from afnext.journal import open_conversation

    session, owner = Session(engine), create.setdefault("owner", "o")
    open_conversation(store, cid or store.create("talk", **create), session, model=engine.loaded.name, owner=owner)
    return session


def test_a_journal_keeps_voice_turns_cut_replies_and_abandoned_streams_so_a_restart_goes_on_exactly(engine, tmp_path):
    """Microphone audio (float) is kept as 16-bit FLAC and heard as kept; a reply the user cut short is
    kept by the text heard; a stream whose reader left mid-reply is kept as far as the session has it."""
    from afnext.journal import open_conversation

    store = Store(tmp_path)
    cid = store.create("talk", owner="o")
    live = _journaled(engine, store, cid, owner="o")
    voice = noise(2.0, seed=9) * 0.3  # float32 16 kHz, as the endpointer hands an utterance over
    first = _reply(live, "", voice)
    assert store.get(cid, owner="o").turns == 1, "kept before its TurnDone was read"
    kept = store.turns(cid)
    assert kept[0].audio.endswith(".flac") and kept[1].token_ids == first.token_ids
    answer = " ".join(first.answer.split())
    assert not answer or store.get(cid, owner="o").title.startswith("“" + answer[:20]), \
        "a spoken first question: named by the start of its answer"
    live.rewrite_reply(first.text[: len(first.text) // 2])  # the user spoke over the second half
    assert store.turns(cid)[1].token_ids is None and store.turns(cid)[1].interrupted
    stream = live.ask("Tell me more.", options=GenerationOptions(max_new_tokens=40, min_new_tokens=40))
    next(e for e in stream if not isinstance(e, TurnDone))
    stream.close()  # the reader goes (a barge-in); the engine settles the turn, as far as it got
    assert live.wait(10)
    assert store.get(cid, owner="o").turns == 2 and store.turns(cid)[-1].interrupted

    resumed = Session(engine)
    assert open_conversation(Store(tmp_path), cid, resumed, model=engine.loaded.name, owner="o").turns == 2
    assert resumed.tokens == live.tokens, "the rebuilt conversation holds the very tokens of the live one"
    assert _reply(resumed, "And now?").token_ids == _reply(live.fork(len(live.messages)), "And now?").token_ids
    assert store.get(cid, owner="o").turns == 3, "the resumed turn was kept; a fork keeps nothing"


def test_an_integer_wav_is_kept_as_flac_of_the_same_samples(tmp_path):
    from afnext.journal import Journal
    from afnext.media import load_audio

    wav = tmp_path / "speech.wav"
    soundfile.write(wav, noise(3.0, seed=2) * 0.5, 44100, subtype="PCM_16")
    heard, (data, suffix) = Journal(Store(tmp_path / "s"), "x").audio(str(wav))
    assert suffix == ".flac" and data[:4] == b"fLaC" and len(data) < wav.stat().st_size
    assert np.array_equal(load_audio(heard), load_audio(str(wav))), "lossless: the model hears the same samples"


def test_a_conversation_whose_turn_cannot_be_kept_stops_with_one_sentence(engine, tmp_path):
    from afnext.journal import KeptError

    store = Store(tmp_path)
    live = _journaled(engine, store)
    store._db.execute("CREATE TRIGGER full BEFORE INSERT ON turns BEGIN SELECT RAISE(ABORT, 'disk full'); END")
    with pytest.raises(KeptError, match="could not be kept.*disk full"):
        _reply(live, "Hello?")
    with pytest.raises(KeptError, match="stops here"):
        live.ask("Still there?")


def test_a_conversation_deleted_while_it_answers_says_so_and_logs_no_error(engine, tmp_path, caplog):
    """Deleting a conversation in another tab while it answers is a user's doing, not a failure: the
    turn is not kept, the reader is told in one sentence, and the log has no error or traceback."""
    import logging

    from afnext.journal import KeptError

    live = _journaled(engine, Store(tmp_path))
    deleted = "This conversation was deleted (here or in another tab); start a new one."
    with caplog.at_level(logging.INFO), pytest.raises(KeptError, match="was deleted"):
        stream = live.ask("Hello?", options=GREEDY)  # asked, and deleted before the answer is kept
        live.journal.broken = deleted  # what the history route does (app/history.py)
        list(stream)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    assert "a turn was not kept" in caplog.text


def test_a_cut_reply_with_bad_text_changes_neither_the_session_nor_the_store(engine, tmp_path):
    store = Store(tmp_path)
    live = _journaled(engine, store)
    _reply(live, "Hello?")
    tokens, kept = list(live.tokens), store.turns(live.journal.cid)
    with pytest.raises(ValueError, match="control"):
        live.rewrite_reply("I said <|im_start|> then")
    assert live.tokens == tokens and store.turns(live.journal.cid) == kept


def test_audio_a_turn_is_about_to_commit_with_survives_another_conversations_delete(engine, tmp_path):
    from afnext.journal import Journal

    store = Store(tmp_path)
    a = store.create("talk", owner="o")
    key = store.put_audio(b"fLaC clip", ".flac")
    store.add_exchange(a, StoredTurn("user", "", audio=key), StoredTurn("assistant", "Hi.", token_ids=(1,)))
    b = Journal(store, store.create("talk", owner="o"))
    assert b.put((b"fLaC clip", ".flac")) == key  # b's turn is asked with the same clip…
    assert store.delete(a, owner="o")  # …and a is deleted while it runs
    assert store.audio_path(key).exists(), "the audio b's turn will commit with was deleted"
    reply = type("R", (), {"text": "Yes.", "reasoning": "", "token_ids": (2,), "steps": (), "interrupted": False,
                           "timings": __import__("afnext.events", fromlist=["Timings"]).Timings()})()
    b.commit("", False, key, reply)
    assert store.delete(b.cid, owner="o") and not (tmp_path / "audio" / key[:2] / key).exists(), \
        "once committed and deleted, it goes"


def test_a_turns_stream_closed_before_its_first_read_lets_its_audio_go(engine, tmp_path):
    """A page that goes away while a question's first event is on its way closes a generator that never
    ran, so none of its code lets the recording's audio go: the stream's token does, and deleting the
    conversation then deletes its recording (found in review: it stayed for the process's life)."""
    import gc
    import io

    from afnext.clip import prepare_clip
    from afnext.journal import Journal

    store, audio = Store(tmp_path), noise(2.0, seed=7)
    flac = io.BytesIO()
    soundfile.write(flac, audio, 16_000, format="FLAC")
    cid = store.create("recording", owner="o", audio=(flac.getvalue(), ".flac"))
    key = store.get(cid, owner="o").audio
    session = Session(engine, journal=Journal(store, cid))
    stream = session.ask("What is it?", prepare_clip(audio, engine.loaded.mel_filters), kept=key)
    assert store._in_flight[key] == 1
    stream.close()
    del stream
    gc.collect()
    assert key not in store._in_flight, "an unread stream still holds its audio"
    assert store.delete(cid, owner="o") and not store._audio_path(key).exists()


def test_a_session_behind_the_store_is_refused_before_it_answers(engine, tmp_path, monkeypatch):
    """Two processes (replicas) on one conversation: one keeps a turn; the other's live session, asked
    next, is refused at once with the sentence its commit would end in, before a token is made — so a
    voice socket never speaks an answer from a conversation that is not the one kept — and its audio
    is not held. The conversation opened again goes on from all the store holds."""
    from afnext.journal import KeptError, open_conversation

    here, there = Store(tmp_path), Store(tmp_path)
    cid = here.create("talk", owner="o")
    mine, theirs = _journaled(engine, here, cid), _journaled(engine, there, cid)
    _reply(theirs, "Over there?")
    forwards = []
    real = type(engine)._forward
    monkeypatch.setattr(type(engine), "_forward", lambda self, *a: forwards.append(1) or real(self, *a))
    with pytest.raises(KeptError, match="went on elsewhere meanwhile .*open it again"):
        mine.ask("Here?", noise(1.0, seed=3))
    assert not forwards and not here._in_flight, "nothing was made, and the turn's audio is not held"
    with pytest.raises(KeptError, match="went on elsewhere"):
        mine.ask("Still here?")  # it stays refused, as after a refused commit
    monkeypatch.undo()
    again = Session(engine)
    assert open_conversation(here, cid, again, model=engine.loaded.name, owner="o").turns == 1
    _reply(again, "Here, now?")
    assert [t.text for t in here.turns(cid)][0::2] == ["Over there?", "Here, now?"]


def test_audio_another_process_is_asking_with_survives_a_delete_here(tmp_path):
    """Replicas share a store: one deletes a conversation whose audio no row refers to any more while
    another has just put the same bytes for a turn it is asking (its hold is in its own memory). The
    file was put again after the deleted conversation's last change: it stays (found in review)."""
    from afnext.journal import Journal

    here, there = Store(tmp_path), Store(tmp_path)
    old = here.create("talk", owner="o")
    key = here.put_audio(b"RIFF clip bytes", ".wav")
    here.add_exchange(old, StoredTurn("user", "q", audio=key), StoredTurn("assistant", "r"))
    time.sleep(0.01)
    asking = Journal(there, there.create("talk", owner="o"))
    assert asking.put((b"RIFF clip bytes", ".wav")) == key
    assert here.delete(old, owner="o") and there.audio_path(key).exists()
    alone = here.create("talk", owner="o")  # a conversation of its own: its audio goes with it
    mine = here.put_audio(b"RIFF other bytes", ".wav")
    here.add_exchange(alone, StoredTurn("user", "q", audio=mine), StoredTurn("assistant", "r"))
    assert here.delete(alone, owner="o") and not (tmp_path / "audio" / mine[:2] / mine).exists()


def test_a_put_in_another_process_at_the_instant_of_a_delete_here_keeps_its_file(tmp_path, monkeypatch):
    """The delete has found the file unused and not put again; the other replica puts the same bytes
    (finding the file there, it only touches it) just before the file is removed: its turn must not
    refer to a file that is gone."""
    from pathlib import Path

    here, there = Store(tmp_path), Store(tmp_path)
    old = here.create("talk", owner="o")
    key = here.put_audio(b"RIFF clip bytes", ".wav")
    here.add_exchange(old, StoredTurn("user", "q", audio=key), StoredTurn("assistant", "r"))
    time.sleep(0.01)
    other = there.create("talk", owner="o")
    removing, put = Path.unlink, []

    def unlink(path, *args, **kwargs):
        if key in path.name and not put:  # the instant before the removal
            put.append(True)
            there.add_exchange(other, StoredTurn("user", "q"), StoredTurn("assistant", "r"),
                               audio=(b"RIFF clip bytes", ".wav"))
        return removing(path, *args, **kwargs)
    monkeypatch.setattr(Path, "unlink", unlink)
    assert here.delete(old, owner="o") and put
    assert there.audio_path(key).read_bytes() == b"RIFF clip bytes"
    assert there.turns(other)[0].audio == key


def test_a_full_store_lets_go_of_the_conversations_unused_longest_and_never_of_recent_ones(tmp_path):
    store = Store(tmp_path, max_bytes=2500)
    old = [store.create("recording", owner="o", audio=(bytes([i]) * 1000, ".wav")) for i in range(2)]
    store._db.execute("UPDATE conversations SET updated = updated - 7200 * (2 - rowid)")  # two hours and one ago… old first
    store._db.execute("UPDATE conversations SET updated = updated - 7200")
    for path in (tmp_path / "audio").glob("*/*"):  # their files are as old (a delete takes no file put since)
        os.utime(path, (time.time() - 4 * 7200,) * 2)
    fresh = store.create("recording", owner="o", audio=(b"n" * 1000, ".wav"))  # room made: the oldest went
    assert store.get(old[0], owner="o") is None and store.get(old[1], owner="o") is not None
    assert store.get(fresh, owner="o") is not None
    store._db.execute("UPDATE conversations SET updated = ?", (time.time(),))  # all in use now
    with pytest.raises(StoreError, match="history is full"):
        store.create("recording", owner="o", audio=(b"x" * 2000, ".wav"))
    assert store.disk_bytes() < 2500 + 200_000  # the audio within its limit (plus the database itself)


def test_a_full_store_counts_what_other_replicas_deleted_before_it_deletes_anyones(tmp_path):
    """Replica B deletes a recording; replica A's count of the audio held still has it. An upload on A
    that fits what is really on disk takes no other user's conversation and is kept (found in review:
    A deleted an old conversation of another user, then refused the upload as full anyway)."""
    a, b = Store(tmp_path, max_bytes=10_000), Store(tmp_path, max_bytes=10_000)
    other = a.create("talk", owner="carol")
    a.add_exchange(other, StoredTurn("user", "q", audio=a.put_audio(b"c" * 100, ".wav")), StoredTurn("assistant", "r"))
    big = a.create("recording", owner="bob", audio=(b"b" * 6_000, ".wav"))
    with a._lock:
        a._make_room(0)  # A has counted the 6,100 bytes
    a._db.execute("UPDATE conversations SET updated = updated - 7200")  # both unused for two hours
    for kept in (tmp_path / "audio").glob("*/*"):
        os.utime(kept, (time.time() - 7300, time.time() - 7300))
    assert b.delete(big, owner="bob")
    mine = a.create("recording", owner="alice", audio=(b"a" * 5_000, ".wav"))
    assert a.get(other, owner="carol") is not None, "another user's conversation stays"
    assert a.get(mine, owner="alice") is not None


def test_a_journal_behind_the_store_says_so_and_never_rewrites_another_process_reply(tmp_path):
    """Two processes on one store (replicas): one keeps a turn the other's journal has not seen. That
    journal is no longer current (its live session is rebuilt), cannot commit over the turn, and
    cutting its own last reply short would rewrite the other's: refused, the other's reply kept."""
    from afnext.live import Live, matches_store
    from afnext.journal import Journal, KeptError

    here, there = Store(tmp_path), Store(tmp_path)
    cid = here.create("talk", owner="o")
    journal = Journal(here, cid)
    reply = StoredTurn("assistant", "Mine.", token_ids=(1,))
    here.add_exchange(cid, StoredTurn("user", "Here."), reply, at=0)
    journal.turns = 1
    assert journal.current()
    there.add_exchange(cid, StoredTurn("user", "There."), StoredTurn("assistant", "Theirs.", token_ids=(2,)), at=1)
    assert not journal.current() and here.exchanges(cid) == 2
    with pytest.raises(KeptError, match="does not end with reply 1"):
        journal.rewrite("Mi")
    assert [t.text for t in here.turns(cid)] == ["Here.", "Mine.", "There.", "Theirs."]

    live, made = Live(), []

    class Held:
        def __init__(self, journal):
            self.journal = journal
    live.put(cid, "o", "g", Held(journal))
    fresh = live.open(cid, "o", "g", lambda: made.append(Held(Journal(here, cid, 2))) or made[-1], matches_store)
    assert made and fresh is made[0] and fresh.journal.current()
    assert live.open(cid, "o", "g", lambda: pytest.fail("rebuilt a current one"), matches_store) is fresh


def test_replicas_opening_an_older_store_at_the_same_moment_upgrade_it_once(tmp_path):
    """Eight connections (as eight replica processes) open a store made before the `parts`, `instructions`
    and `audio` columns, all at once: one upgrades it, the others wait and find it done — none fails on a column
    another has just added."""
    for round in range(8):  # the race is one of timing: several rounds, each on a fresh old store
        _open_an_older_store_from_eight_at_once(tmp_path / f"round-{round}")


def _open_an_older_store_from_eight_at_once(folder: Path) -> None:
    import sqlite3
    from concurrent.futures import ThreadPoolExecutor

    folder.mkdir()
    old = sqlite3.connect(folder / "afnext.sqlite3")
    old.executescript("""
        CREATE TABLE conversations (id TEXT PRIMARY KEY, kind TEXT NOT NULL, title TEXT NOT NULL DEFAULT '',
            owner TEXT NOT NULL DEFAULT '', created REAL NOT NULL, updated REAL NOT NULL);
        CREATE TABLE turns (conversation TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
            idx INTEGER NOT NULL, role TEXT NOT NULL, text TEXT NOT NULL, think INTEGER NOT NULL DEFAULT 0,
            audio TEXT, reasoning TEXT NOT NULL DEFAULT '', steps TEXT NOT NULL DEFAULT '[]', token_ids TEXT,
            timings TEXT NOT NULL DEFAULT '{}', interrupted INTEGER NOT NULL DEFAULT 0, created REAL NOT NULL,
            PRIMARY KEY (conversation, idx));
        INSERT INTO conversations VALUES ('old', 'talk', 'Before', 'o', 1.0, 1.0);""")
    old.close()
    start = threading.Barrier(8)

    def open_at_once(_: int) -> Store:
        start.wait()
        return Store(folder)

    with ThreadPoolExecutor(8) as pool:
        stores = list(pool.map(open_at_once, range(8)))
    assert all(s.get("old", owner="o").title == "Before" for s in stores)
    stores[0].add_exchange("old", StoredTurn("user", "Hi.", instructions=("Be brief.",)),
                           StoredTurn("assistant", "Hello.", parts={"ids": []}))
    assert stores[-1].turns("old")[1].parts == {"ids": []}
    assert stores[-1].turns("old")[0].instructions == ("Be brief.",)
