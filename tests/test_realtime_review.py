"""/v1/realtime reviewed against OpenAI's GA Realtime protocol where clients order, truncate and keep
talking over replies: where a reply's item stands among items created as it began, what a truncate
answers, and a reply that begins while the user still speaks with interrupt_response off. In-process
sockets on the tiny model (tests/test_realtime_hostile.py's fixtures)."""

from __future__ import annotations

import json
import threading

from app.realtime_replies import Responses
from tests import test_realtime_hostile as hostile
from tests import test_realtime_protocol as protocol
from tests.test_realtime_protocol import _said, message, text_socket

backend, serve = hostile.backend, hostile.serve  # its fixtures: /v1/realtime in process, on the tiny model


def until(ws, kind: str, **fields) -> list[dict]:
    """tests/test_realtime_protocol.py's `until`; "conversation.item.truncate_answered": up to the
    truncate's answer, conversation.item.truncated or an error."""
    if kind != "conversation.item.truncate_answered":
        return protocol.until(ws, kind, **fields)
    got = []
    while not got or got[-1]["type"] not in ("conversation.item.truncated", "error"):
        got.append(json.loads(hostile.receive(ws)["text"]))
        protocol.SERVER_EVENT.validate_python(got[-1])
    return got


def inserted(events: list[dict]) -> list[str]:
    """Item ids in the order a client that inserts each conversation.item.added after its previous_item_id
    keeps them (LiveKit's remote chat context; OpenAI: previous_item_id "is used to maintain ordering when
    items are inserted"); None: first. An id it does not hold fails (LiveKit drops that item)."""
    order: list[str] = []
    for event in events:
        if event["type"] == "conversation.item.added":
            after = event.get("previous_item_id")
            assert after is None or after in order, event
            order.insert(0 if after is None else order.index(after) + 1, event["item"]["id"])
    return order


def slow_reader(monkeypatch) -> threading.Event:
    """The socket's reader thread waits, as a busy one does, before it begins a response: an event the test
    sets lets it go on."""
    go, begin = threading.Event(), Responses._begin

    def waiting(self, turn) -> None:
        go.wait(10)
        begin(self, turn)
    monkeypatch.setattr(Responses, "_begin", waiting)
    return go


def test_a_reply_stands_where_its_conversation_put_it_though_items_came_as_it_began(serve, monkeypatch):
    """Items a client creates right after response.create go after that response in the conversation;
    the response's item, announced once it begins, names the item it follows there (OpenAI's items are
    inserted after their previous_item_id), so a client that inserts by previous_item_id (LiveKit) keeps
    the model's order, and its next item, created after the last one it holds, is taken."""
    client = serve()
    go = slow_reader(monkeypatch)
    with text_socket(client) as ws:
        seen = []
        ws.send_json({"type": "response.create"})  # a greeting: no user item waits
        ws.send_json(message("user", "Hello?", "u1"))
        seen += until(ws, "conversation.item.done")
        go.set()
        seen += until(ws, "response.done")
        greeting = seen[-1]["response"]["output"][0]["id"]
        assert inserted(seen) == [greeting, "u1"], inserted(seen)

        go.clear()
        ws.send_json({"type": "response.create"})  # answers u1
        ws.send_json(message("assistant", "Later.", "a1"))
        seen += until(ws, "conversation.item.done")
        go.set()
        seen += until(ws, "response.done")
        reply = seen[-1]["response"]["output"][0]["id"]
        assert inserted(seen) == [greeting, "u1", reply, "a1"], inserted(seen)
        assert [role for role, _ in _said(client)] == ["assistant", "user", "assistant"]

        ws.send_json({**message("user", "Again.", "u2"), "previous_item_id": "a1", "event_id": "after_a1"})
        added = until(ws, "conversation.item.done")
        assert not [e for e in added if e["type"] == "error"], added
        ws.send_json({"type": "response.create"})
        until(ws, "response.done")
        assert [text for _, text in _said(client)][3:5] == ["Later.", "Again."], _said(client)


def _link(client):
    (link,) = client.app.routes[0].endpoint.__self__._links
    return link


def test_a_truncate_that_cuts_nothing_leaves_the_reply_as_it_was_generated(serve):
    """OpenAI answers every truncate it takes with conversation.item.truncated, one that keeps the whole
    reply too (audio_end_ms at or past its end, a text reply that has no audio). Keeping the whole reply
    must not rewrite it: the conversation keeps the token ids the model generated, and its KV cache."""
    client = serve()
    with text_socket(client) as ws:
        ws.send_json(message("user", "Hello there."))
        ws.send_json({"type": "response.create"})
        reply = until(ws, "response.done")[-1]["response"]["output"][0]["id"]
        session = _link(client).session
        tokens, cached = list(session.tokens), session.cached_tokens
        for ms in (10_000_000, 0):  # past the end of its (no) audio; a text reply keeps its words either way
            ws.send_json({"type": "conversation.item.truncate", "item_id": reply, "content_index": 0,
                          "audio_end_ms": ms})
            assert until(ws, "conversation.item.truncated")[-1]["item_id"] == reply
        assert session.tokens == tokens and session.cached_tokens == cached, "a truncate that cut nothing rewrote it"


def test_a_truncate_that_comes_after_the_conversation_went_on_says_so(serve, monkeypatch):
    """A reply the next turn has followed already cannot be cut here (its tokens are under the next turn's
    KV cache): the truncate is refused in one sentence, never answered conversation.item.truncated while
    the model keeps the whole reply; the socket goes on."""
    go, finish, finished = threading.Event(), Responses._finish, []

    def slow_finish(self, done) -> None:  # the reader is slow to close the second reply
        finished.append(done)
        if len(finished) == 2:
            go.wait(10)
        finish(self, done)
    monkeypatch.setattr(Responses, "_finish", slow_finish)
    client = serve()
    with text_socket(client) as ws:
        ws.send_json({"type": "session.update", "session": {"type": "realtime", "output_modalities": ["audio"],
                                                            "max_output_tokens": 8}})
        until(ws, "session.updated")
        ws.send_json(message("user", "Hello there."))
        ws.send_json({"type": "response.create"})
        done = until(ws, "response.done")
        first = done[-1]["response"]["output"][0]["id"]
        assert any(e["type"] == "response.output_audio.delta" for e in done), "the reply was not spoken"
        ws.send_json(message("user", "Go on."))
        ws.send_json({"type": "response.create"})
        until(ws, "response.created")
        while len(finished) < 2:  # the second turn is in the conversation, its response not done yet
            threading.Event().wait(0.01)
        ws.send_json({"type": "conversation.item.truncate", "item_id": first, "content_index": 0,
                      "audio_end_ms": 0, "event_id": "late_cut"})
        seen = until(ws, "conversation.item.truncate_answered")  # either answer (see `until`)
        go.set()
        assert seen[-1]["type"] == "error", seen[-1]
        hostile.assert_sentence(seen[-1]["error"]["message"])
        assert seen[-1]["error"]["event_id"] == "late_cut"
        assert until(ws, "response.done")[-1]["response"]["status"] in {"completed", "incomplete"}


def test_a_reply_begun_while_the_user_speaks_runs_on_whole_when_speech_does_not_interrupt(serve):
    """interrupt_response false: OpenAI's ongoing response "will continue until complete"; the user's turn
    is still heard (its item committed) and answered after it. The reply the client asked for while the
    user spoke (a greeting, as Pipecat asks at start) must not lose words to the turn that ends meanwhile:
    what went out on the wire is what the conversation keeps, and the turn gets its own answer."""
    from pathlib import Path

    import numpy as np
    import soundfile
    import soxr

    from app import realtime_wire as wire

    speech, rate = soundfile.read(Path(__file__).parent.parent / "assets" / "speech.wav", dtype="float32")
    pcm = soxr.resample(np.concatenate([speech, np.zeros(rate * 2, np.float32)]), rate, wire.AUDIO_RATE)
    client = serve()
    with client.websocket_connect(hostile.URL) as ws:
        hostile.created(ws)
        ws.send_json({"type": "session.update", "session": {
            "type": "realtime", "output_modalities": ["text"], "max_output_tokens": 48,
            "audio": {"input": {"turn_detection": {"type": "server_vad", "interrupt_response": False}}}}})
        until(ws, "session.updated")
        step, begun = wire.AUDIO_RATE // 10, False
        for at in range(0, len(pcm), step):
            ws.send_json(wire.append(pcm[at:at + step]))
            if not begun and at >= 10 * step:  # once their speech is heard, a greeting is asked for
                until(ws, "input_audio_buffer.speech_started")
                ws.send_json({"type": "response.create"})
                begun = True
        seen = until(ws, "response.done")
        greeting = seen[-1]["response"]
        text = "".join(e["delta"] for e in seen if e["type"] == "response.output_text.delta"
                       and e["response_id"] == greeting["id"])
        seen += until(ws, "response.done")
        kinds = [e["type"] for e in seen]
        assert kinds.count("input_audio_buffer.committed") == 1 and kinds.count("response.done") == 2, kinds
        said = _said(client)
        assert said[0][0] == "assistant" and said[0][1].strip() == text.strip() != "" and greeting["status"] in {"completed", "incomplete"}, (said, text)
        assert [role for role, _ in said] == ["assistant", "user", "assistant"], said
