"""A conversation changed from two threads at once: a turn being built on one thread, a change to the
conversation (`rewrite_reply`, `extend`, ...) made on another (a Realtime socket's reader, a turn's thread)."""

from __future__ import annotations

import threading

from afnext import prompt
from afnext.events import TurnDone
from afnext.sampling import GenerationOptions
from afnext.session import Session

FIVE = GenerationOptions(max_new_tokens=5, min_new_tokens=5)


def _ids(stream) -> tuple[int, ...]:
    return [e for e in stream if isinstance(e, TurnDone)][0].reply.token_ids


def test_a_reply_rewritten_while_the_next_turn_is_built_waits_for_it(engine, monkeypatch):
    """`ask` builds its turn (`_plan`) on the caller's thread from `messages`: a `rewrite_reply` made
    meanwhile (a Realtime truncate on the socket's reader) popped and re-added the reply under it, so
    the turn's template text was rendered on two different conversations (an AssertionError in
    prompt.turn_ids, the turn failed). The rewrite now waits until the turn is built."""
    session = Session(engine)
    session.extend("user", "Hello there.")
    session.extend("assistant", "A long reply the user did not hear to its end.")
    asker = threading.current_thread()
    building, go = threading.Event(), threading.Event()
    real_before = prompt._before

    def paused_before(loaded, history):  # the asking thread, between the two renders of turn_ids
        text = real_before(loaded, history)
        if threading.current_thread() is asker and not building.is_set():
            building.set()
            assert go.wait(10)
        return text

    monkeypatch.setattr(prompt, "_before", paused_before)
    rewrote = threading.Event()
    rewriter = threading.Thread(target=lambda: (session.rewrite_reply("A long"), rewrote.set()))

    def release_when_building():
        assert building.wait(10)
        rewriter.start()
        rewrote.wait(0.5)  # done by now if nothing holds it back
        go.set()

    helper = threading.Thread(target=release_when_building)
    helper.start()
    stream = session.ask("And now?", options=FIVE)  # builds the turn here, pausing in _before
    helper.join(10)
    rewritten_while_built = rewrote.is_set()
    rewriter.join(30)
    _ids(stream)
    assert not rewritten_while_built, "the reply was rewritten while the next turn was being built"
    assert [m["role"] for m in session.messages] == ["user", "assistant", "user", "assistant"]
    assert prompt.text_of(session.messages[1]) == "A long"


def test_changes_from_other_threads_during_turns_end(engine):
    """No deadlock: turns asked and read on one thread while another extends, rewrites and truncates."""
    session = Session(engine)
    _ids(session.ask("Hello there.", options=FIVE))
    errors: list[BaseException] = []

    def asker():
        try:
            for i in range(6):
                _ids(session.ask(f"Question {i}?", options=FIVE))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    def changer():
        try:
            for i in range(6):
                session.rewrite_reply("Short.", messages=len(session.messages))
                session.extend("system", f"Rule {i}.")
                session.add_exchange(f"Given {i}", None, "Given reply.")
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=asker), threading.Thread(target=changer)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a thread is stuck: deadlock"
    assert not errors, errors
    assert session.wait(5)
    assert len(session._marks) == len(session.messages)
    assert session._marks[-1][0] == len(session.tokens)
