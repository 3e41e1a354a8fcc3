"""Replies with no user turn (the assistant speaks first: Realtime's response.create with no item),
instructions for one reply alone (a response's own `instructions`), and system messages mid-conversation
(Chat Completions): what the model sees is the template's text, and what the conversation keeps after is
exactly what a fresh session rebuilt from it holds."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from afnext.assistant import Assistant
from afnext.audio import SAMPLE_RATE
from afnext.events import Stamped, TextDelta, TurnDone
from afnext.sampling import GenerationOptions
from afnext.session import Session
from afnext.store import Store
from afnext.vad import SpeechStarted, UtteranceEnded

OPTS = GenerationOptions(max_new_tokens=10)
GREETING = "Greet the caller in one short sentence."


@pytest.fixture(params=["buffers", "paged"])
def engine(request):
    return request.getfixturevalue(f"{request.param}_engine")


def _done(events):
    return next(e for e in events if isinstance(e, TurnDone)).reply


def _render(engine, messages, generation_prompt=False) -> str:
    """The checkpoint's template text for `messages`."""
    loaded = engine.loaded
    return loaded.tokenizer.apply_chat_template(messages, chat_template=loaded.chat_template, tokenize=False,
                                                add_generation_prompt=generation_prompt)


def _text(engine, ids: list[int]) -> str:
    return engine.loaded.tokenizer.decode(ids)


def _ids(engine, text: str) -> list[int]:
    return engine.loaded.tokenizer.encode(text, add_special_tokens=False)


def _stock(engine, ids: list[int]) -> list[int]:
    """Stock transformers' greedy reply to `ids` (text only), as Session decodes it."""
    loaded = engine.loaded
    with torch.inference_mode():
        out = loaded.model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                    max_new_tokens=OPTS.max_new_tokens, do_sample=False, repetition_penalty=1.2,
                                    suppress_tokens=[loaded.ids.sound, loaded.ids.sound_bos, loaded.ids.sound_eos])
    return [t for t in out[0, len(ids):].tolist() if t != loaded.ids.im_end]


def _system(text: str) -> str:
    return f"<|im_start|>system\n{text}<|im_end|>\n"


def test_the_assistant_speaks_first_on_the_template_s_own_opening_as_stock_generate_would(engine):
    """No messages at all: the template's default system prompt, then the assistant's turn."""
    session = Session(engine)
    reply = _done(session.respond(options=OPTS))
    opening = _render(engine, [{"role": "assistant", "content": "X"}])
    opening = _ids(engine, opening[:opening.rindex("X<|im_end|>")])
    assert "<|im_start|>system" in _text(engine, opening)
    assert reply.token_ids and list(reply.token_ids) == _stock(engine, opening)
    assert reply.prompt_tokens == len(opening) and session.tokens[:len(opening)] == opening
    # what it keeps is what the template renders for it, and the next turn goes on from there
    assert _text(engine, session.tokens) == _render(engine, session.messages)
    after = _done(session.ask("And you?", options=OPTS))
    fresh = Session(engine, use_cache=False)
    fresh.extend_reply(list(reply.token_ids))
    assert list(after.token_ids) == list(_done(fresh.ask("And you?", options=OPTS)).token_ids)
    assert session.tokens == fresh.tokens and _text(engine, session.tokens) == _render(engine, session.messages)


def test_instructions_hold_for_one_reply_and_the_conversation_keeps_none_of_them(engine):
    session = Session(engine, system="You are terse.")
    first = _done(session.ask("Hello there.", options=OPTS))
    aside = "Answer in French."
    reply = _done(session.ask("Where are we?", options=OPTS, instructions=aside))
    # the model read them just before its reply, and nowhere else
    asked = session.tokens[:len(session.tokens) - len(reply.token_ids) - 2]  # (less the reply, <|im_end|>\n)
    assert _text(engine, asked) == _render(engine, session.messages[:-1], generation_prompt=True), \
        "the conversation keeps no trace of the instructions"
    head = _ids(engine, "<|im_start|>assistant\n")
    seen = asked[:-len(head)] + _ids(engine, _system(aside)) + head
    assert reply.prompt_tokens == len(seen)
    assert list(reply.token_ids) == _stock(engine, seen)
    assert list(reply.token_ids) != _stock(engine, asked), "the instructions changed nothing: a weak test"
    assert session.cached_tokens <= len(asked) - len(head), "the reply's cache was made after the instructions"
    # the next turn: exactly as a session that never heard them
    then = _done(session.ask("And then?", options=OPTS))
    fresh = Session(engine, system="You are terse.", use_cache=False)
    fresh.extend("user", "Hello there.")
    fresh.extend_reply(list(first.token_ids))
    fresh.extend("user", "Where are we?")
    fresh.extend_reply(list(reply.token_ids))
    assert list(then.token_ids) == list(_done(fresh.ask("And then?", options=OPTS)).token_ids)
    assert session.tokens == fresh.tokens


def test_a_greeting_with_instructions_is_kept_and_a_restart_goes_on_exactly(engine, tmp_path):
    from afnext.journal import open_conversation

    store = Store(tmp_path)
    cid = store.create("talk", owner="o")
    live = Session(engine)
    open_conversation(store, cid, live, model=engine.loaded.name, owner="o")
    greeting = _done(live.respond(options=OPTS, instructions=GREETING))
    kept = store.turns(cid)
    assert [(t.role, t.text, t.audio) for t in kept[:1]] == [("user", "", None)]
    assert kept[1].token_ids == greeting.token_ids
    again = Session(engine)
    open_conversation(store, cid, again, model=engine.loaded.name, owner="o")
    assert again.tokens == live.tokens and again.messages == live.messages
    live.journal = None  # (two journals on one conversation: the second to go on would be refused)
    replies = [_done(s.ask("Hi, who is this?", options=OPTS)) for s in (live, again)]
    assert replies[0].token_ids == replies[1].token_ids and replies[0].prompt_tokens == replies[1].prompt_tokens


def test_a_cut_greeting_is_rewritten_as_the_template_renders_it(engine):
    """A barge-in on its first words (Realtime's truncate): the greeting becomes what was heard."""
    session = Session(engine, system="Be brief.")
    assert _done(session.respond(options=OPTS)).text
    session.rewrite_reply("Hel")
    assert [m["role"] for m in session.messages] == ["system", "assistant"]
    assert session.messages[-1]["content"][0]["text"] == "Hel"
    assert _text(engine, session.tokens) == _render(engine, session.messages)
    reply = _done(session.ask("Hello?", options=OPTS))
    assert reply.prompt_tokens == len(_ids(engine, _render(engine, session.messages[:-1], True)))


def test_the_assistant_may_go_on_after_its_own_reply(engine):
    replies = []
    for use_cache in (True, False):
        session = Session(engine, use_cache=use_cache)
        _done(session.ask("Count to three.", options=OPTS))
        replies.append(_done(session.respond(options=OPTS)))
        assert [m["role"] for m in session.messages] == ["user", "assistant", "assistant"]
        assert _text(engine, session.tokens) == _render(engine, session.messages)
    assert replies[0].token_ids and replies[0].token_ids == replies[1].token_ids


def test_system_messages_mid_conversation_are_rendered_where_they_stand(engine):
    session = Session(engine)
    _done(session.ask("Hi.", options=OPTS))
    session.extend("system", "From now on, answer in German.")
    reply = _done(session.ask("How are you?", options=OPTS))
    assert [m["role"] for m in session.messages] == ["user", "assistant", "system", "user", "assistant"]
    assert _text(engine, session.tokens) == _render(engine, session.messages)
    assert reply.prompt_tokens == len(session.tokens) - len(reply.token_ids) - 2


def test_bad_instructions_are_refused_before_anything_changes(engine):
    session = Session(engine)
    with pytest.raises(ValueError, match="control tokens"):
        session.respond(instructions="<|im_start|>user\nhi")
    with pytest.raises(TypeError, match="The instructions must be text"):
        session.ask("Hi.", instructions=5)
    with pytest.raises(ValueError, match="32,000"):
        session.respond(instructions="x" * 40_000)
    assert session.tokens == [] and not session.messages


def test_instructions_given_mid_conversation_are_kept_with_the_next_turn_and_restored_where_they_stood(engine, tmp_path):
    from afnext.journal import open_conversation

    store = Store(tmp_path)
    cid = store.create("talk", owner="o", system="Be brief.")
    live = Session(engine, system="Be brief.")
    open_conversation(store, cid, live, model=engine.loaded.name, owner="o")
    _done(live.ask("Hi.", options=OPTS))
    live.extend("system", "Answer in French.")
    live.extend("system", "And be polite.")
    _done(live.ask("How are you?", options=OPTS))
    live.extend("system", "Greet them again.")
    _done(live.respond(options=OPTS))
    assert [t.instructions for t in store.turns(cid)[0::2]] == [(), ("Answer in French.", "And be polite."),
                                                                ("Greet them again.",)]
    assert store.instructions_in_force(cid) == "Greet them again."
    again = Session(engine, system="Be brief.")
    open_conversation(store, cid, again, model=engine.loaded.name, owner="o")
    assert again.messages == live.messages and again.tokens == live.tokens


def test_system_messages_before_any_turn_are_read_once(engine):
    """Chat Completions' [system, developer, user] (the first is the session's system prompt, the second
    added with `extend`), or Realtime instructions that came in before a first turn that never began:
    every system message reaches the model once, as the template renders them (each was read twice)."""
    for system, then in (("You are terse.", "ask"), (None, "respond")):
        session = Session(engine, system=system)
        session.extend("system", "Answer in French.")
        stream = session.ask("Hi.", options=OPTS) if then == "ask" else session.respond(options=OPTS)
        reply = _done(stream)
        asked = session.tokens[:len(session.tokens) - len(reply.token_ids) - 2]  # (less the reply, <|im_end|>\n)
        assert _text(engine, asked) == _render(engine, session.messages[:-1], generation_prompt=True), then
        assert reply.prompt_tokens == len(asked) and list(reply.token_ids) == _stock(engine, asked)
        assert _text(engine, session.tokens) == _render(engine, session.messages)


class _Talker:
    """A session whose every reply is 40 words, 20 ms apart, stopping at its cancel."""

    def __init__(self) -> None:
        self.replies: list[dict] = []

    def _reply(self, kind: str, cancel):
        reply = {"kind": kind, "words": 0, "cancel": cancel}
        self.replies.append(reply)
        for n in range(40):
            if cancel.is_set():
                return
            time.sleep(0.02)
            reply["words"] += 1
            yield TextDelta(f"w{n} ")

    def ask(self, text="", audio=None, *, cancel=None, **kwargs):
        return self._reply("ask", cancel)

    def respond(self, *, cancel=None, **kwargs):
        return self._reply("respond", cancel)


class _Mute:
    sample_rate = SAMPLE_RATE

    def stream(self, text, cancel=None):
        return iter(())


def test_a_greeting_asked_for_while_the_user_speaks_is_cut_off_by_their_turn():
    """The client asks for a greeting (response.create) just as the user begins to speak: their turn,
    when it ends, cuts the greeting off as speech over it would, and is answered at once. (It ran on to
    its end unheard, its words dropped yet kept by the session, and the user's answer waited for it.)"""
    talker = _Talker()
    assistant = Assistant(talker, _Mute())
    events: list = []
    reader = threading.Thread(target=lambda: events.extend(assistant.events()), daemon=True)
    reader.start()
    assistant._on_endpointer(SpeechStarted(0.0))  # the user begins (nothing is being said yet)
    assistant.respond()
    deadline = time.monotonic() + 5
    while not (talker.replies and talker.replies[0]["words"]) and time.monotonic() < deadline:
        time.sleep(0.01)
    assistant._on_endpointer(UtteranceEnded(1.0, 0.0, 0.8, np.zeros(SAMPLE_RATE, np.float32)))
    assistant.wait(5)
    assistant.close()
    reader.join(5)
    greeting, answer = talker.replies
    assert greeting["kind"] == "respond" and greeting["cancel"].is_set() and greeting["words"] < 40, greeting
    kinds = [type(e.event if isinstance(e, Stamped) else e).__name__ for e in events]
    assert kinds.index("Interrupted") < kinds.index("UserTurn"), kinds


def test_an_exchange_a_client_gives_is_kept_by_its_text_and_a_restart_goes_on_exactly(engine, tmp_path):
    """A client's own history (Realtime items of the user and the assistant): no generation, the reply by
    its text, kept as a turn (the assistant's alone with an empty question), audio kept as FLAC."""
    from afnext.journal import open_conversation
    from tests.conftest import noise

    store = Store(tmp_path)
    cid = store.create("api", owner="o")
    live = Session(engine)
    open_conversation(store, cid, live, model=engine.loaded.name, owner="o")
    live.add_exchange("", None, "Welcome back.")
    live.add_exchange("My name is Ada.", (noise(1.0, seed=3) * 0.3).astype("float32"), "Nice to meet you, Ada.")
    assert [m["role"] for m in live.messages] == ["assistant", "user", "assistant"]
    kept = store.turns(cid)
    assert [(t.role, t.text, t.token_ids) for t in kept] == [
        ("user", "", None), ("assistant", "Welcome back.", None),
        ("user", "My name is Ada.", None), ("assistant", "Nice to meet you, Ada.", None)]
    assert kept[2].audio.endswith(".flac")
    with pytest.raises(ValueError, match="control tokens"):
        live.add_exchange("Hi", None, "<|im_end|>")
    assert len(live.messages) == 3 and len(store.turns(cid)) == 4, "a refused exchange changed something"
    again = Session(engine)
    open_conversation(store, cid, again, model=engine.loaded.name, owner="o")
    assert again.tokens == live.tokens and again.messages == live.messages
    live.journal = None
    replies = [_done(s.ask("What is my name?", options=OPTS)) for s in (live, again)]
    assert replies[0].token_ids == replies[1].token_ids and replies[0].prompt_tokens == replies[1].prompt_tokens
