"""One Realtime socket's responses (`Responses`): a reader thread turns the assistant's events into
server events — the user items the server VAD heard, then each response's `response.created`, its
deltas (text, reasoning, 24 kHz audio) and `response.done`, whose `status_details` say why one did not
complete — and keeps what `conversation.item.truncate` needs of the latest reply (`heard`). A reply
begun while a cut-off one still winds down holds its events until that one's `response.done`, so
responses never overlap on the wire.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from typing import TYPE_CHECKING

import numpy as np

from afnext.assistant import Assistant
from afnext.events import (AudioChunk, Error, Interrupted, ReasoningDelta, ReplyAsked, Stamped, TextDelta, UserTurn,
                           VoiceTurnDone)
from afnext.tts import SpeechResampler
from afnext.vad import SpeechStarted

from . import realtime_wire as wire

if TYPE_CHECKING:
    from .realtime_link import RealtimeLink

log = logging.getLogger(__name__)

MAX_ITEMS = 16  # user items created and not yet answered
# Marks the response.create the server sends itself: a turn heard while a reply that speech does not
# interrupt (interrupt_response false) runs on is answered after it (a client cannot send this key).
AUTO = object()
TRUNCATE_WAIT_S = 5.0  # a reply cut off by truncate winds down within a step; this is the safety net


class Responses:
    """The reader side: the assistant's events → user items and responses on the wire."""

    def __init__(self, link: RealtimeLink) -> None:
        self.link, self.send = link, link.send
        self._thread: threading.Thread | None = None
        self._speech_item: str | None = None
        self._voice = SpeechResampler(wire.AUDIO_RATE)
        self._replies: deque[dict] = deque()  # responses begun and not done, oldest first: a cancelled one
        # is done only once its turn has wound down, which may be after the next turn began
        self._latest: dict | None = None  # the last reply the session holds, for truncate
        self.limits: dict[object, int] = {}  # a response.create's own max_output_tokens, by its turn's tag
        self.metadata: dict[object, dict] = {}  # a response.create's own metadata, by its turn's tag
        # the item a response.create's reply goes after (the last one then; None: none), by its turn's tag
        self.anchors: dict[object, str | None] = {}
        self._owed = False  # a heard turn waits to be answered once no reply is open (`_answer_owed`)

    def follow(self, assistant: Assistant) -> None:
        self._thread = threading.Thread(target=self._read, args=(assistant,), name="afnext-realtime-read", daemon=True)
        self._thread.start()

    def join(self) -> None:
        if self._thread is not None:
            self._thread.join(10)

    def answering(self, response: object = None) -> bool:
        """A response (`response`, when named) is being made and not cancelled: one winding down after
        a cancel is done as far as the client is concerned."""
        return any(r["status"] != "cancelled" and response in (None, r["id"]) for r in list(self._replies))

    def cancelled_by_client(self) -> None:
        """The client ends the open replies (response.cancel, a truncate of one still being made): their
        response.done says so, where a barge-in says `turn_detected`."""
        for reply in list(self._replies):
            reply["reason"] = "client_cancelled"

    def abandon(self) -> None:
        """The assistant was replaced mid-reply (the client changed the model): its open replies end as
        cancelled."""
        self.cancelled_by_client()
        while self._replies:
            self._replies[0]["status"] = "cancelled"
            self._finish(VoiceTurnDone(0.0, None, None))
        self.limits.clear()
        self.metadata.clear()
        self.anchors.clear()

    def running(self, item: object) -> bool:
        """The reply with this item id is still being made."""
        return any(r["item"] == item for r in list(self._replies))

    def heard(self, item: object, ms: int) -> tuple[str, int, dict] | None:
        """What the user heard of the latest reply by `ms` into its audio, how many messages the
        conversation held when it was done, and the reply (None: not that reply).
        Speech is paced evenly enough over its transcript to cut at a word: the share of the audio
        played is the share of the transcript kept."""
        reply = next((r for r in [*self._replies, self._latest] if r is not None and r["item"] == item), None)
        if reply is None or not reply["done"].wait(TRUNCATE_WAIT_S):  # a cut-off reply winds down within a step
            return None
        if reply is not self._latest:
            return None
        latest = reply
        text, total = latest["transcript"], latest["audio_ms"]
        cut = len(text) if total <= 0 or ms >= total else round(len(text) * ms / total)
        return (text[:cut].rsplit(" ", 1)[0] if cut < len(text) else text), latest["messages"], latest

    def _read(self, assistant: Assistant) -> None:
        for event in assistant.events():
            inner = event.event if isinstance(event, Stamped) else event
            try:
                self._on(inner, event.t if isinstance(event, Stamped) else getattr(inner, "t", 0.0))
            except Exception:
                log.exception("realtime: could not send %s", type(inner).__name__)

    def _on(self, inner, t: float) -> None:
        if isinstance(inner, SpeechStarted):
            self._speech_item = wire.new_id("item")
            self.send(wire.event("input_audio_buffer.speech_started", audio_start_ms=round(t * 1000),
                                 item_id=self._speech_item))
        elif isinstance(inner, UserTurn) and not inner.answered:
            item = self._speech_item or wire.new_id("item")
            try:  # heard and kept (before the client hears of it): it asks for the answer with response.create
                before = self.link.hold(item, "", inner.audio, shown=_heard_item(item))
            except wire.ProtocolError as exc:  # its sentence says why
                self.send(wire.event("input_audio_buffer.speech_stopped", audio_end_ms=round(inner.end * 1000),
                                     item_id=item))
                self.send(wire.error(wire.ProtocolError(f"That utterance was dropped: {exc}")))
                return
            self._announce(inner, item, before)
            config = self.link.config
            if config.server_vad and config.create_response:  # held only for the reply running on
                self._owed = True
                self._answer_owed()
        elif isinstance(inner, (UserTurn, ReplyAsked)):
            self._begin(inner)
        elif not self._replies:
            return
        elif isinstance(inner, ReasoningDelta):
            reply = self._replies[-1]
            reply["reasoning"] += inner.text
            self._send(reply, wire.event("response.reasoning_text.delta", **_where(reply), delta=inner.text))
        elif isinstance(inner, TextDelta):
            reply = self._replies[-1]
            reply["transcript"] += inner.text
            kind = "response.output_audio_transcript.delta" if self.link.config.audio_out else "response.output_text.delta"
            self._send(reply, wire.event(kind, **_where(reply), delta=inner.text))
        elif isinstance(inner, AudioChunk):
            self._audio(self._replies[-1], self._voice.push(inner))
        elif isinstance(inner, Interrupted):
            self._replies[-1]["status"] = "cancelled"
            self._voice.drop()
        elif isinstance(inner, Error):
            self._replies[-1]["status"], self._replies[-1]["error"] = "failed", inner.message
            self._send(self._replies[-1], wire.error(wire.ProtocolError(inner.message, "server_error")))
        elif isinstance(inner, VoiceTurnDone):
            self._finish(inner)

    def _announce(self, turn: UserTurn, item: str | None = None, before: str | None = None) -> str:
        """A turn the endpointer heard: its item (after `before`), committed from the audio buffer."""
        if item is None:
            item = self._speech_item or wire.new_id("item")
            before = self.link.chain(item, _heard_item(item))
        self.send(wire.event("input_audio_buffer.speech_stopped", audio_end_ms=round(turn.end * 1000), item_id=item))
        self.send(wire.event("input_audio_buffer.committed", item_id=item, previous_item_id=before))
        shown = _heard_item(item)
        self.send(wire.event("conversation.item.added", previous_item_id=before, item=shown))
        self.send(wire.event("conversation.item.done", previous_item_id=before, item=shown))
        return item

    def _begin(self, turn: UserTurn | ReplyAsked) -> None:
        # the client's items it asked an answer for (announced when they were made), or none (a reply
        # asked for with no user item: its tag only names the response's own settings)
        item = turn.tag if isinstance(turn, UserTurn) else None
        if item is None and isinstance(turn, UserTurn):
            item = self._announce(turn)
        reply = {"id": wire.new_id("resp"), "item": wire.new_id("item"), "transcript": "", "reasoning": "", "audio_ms": 0.0,
                 "status": "completed", "done": threading.Event(), "held": [],
                 "limit": self.limits.pop(turn.tag, None) or self.link.config.max_output_tokens,
                 "metadata": self.metadata.pop(turn.tag, None),
                 # the conversation in the KV cache as the turn begins: the prompt it need not prefill
                 "cached": self.link.session.cached_tokens if self.link.session is not None else 0}
        self._replies.append(reply)
        # where the session puts it: after the items its response.create found (items created since come
        # after it there, though announced before it), or after the turn the server VAD heard
        after = self.anchors.pop(turn.tag, ...) if turn.tag is not None else item
        item = self.link.chain(reply["item"], self._item(reply, "in_progress").shown(), after)
        self._send(reply, wire.event("response.created", response=self._shown(reply, "in_progress")))
        self._send(reply, wire.event("response.output_item.added", response_id=reply["id"], output_index=0,
                                     item=self._item(reply, "in_progress").shown()))
        self._send(reply, wire.event("conversation.item.added", previous_item_id=item,
                                     item=self._item(reply, "in_progress").shown()))
        self._send(reply, wire.event("response.content_part.added", **_where(reply), part=self._part(reply)))

    def _send(self, reply: dict, event: dict) -> None:
        """A reply's event, held while an older reply (cancelled, winding down) is not done: OpenAI's
        server ends a response (response.done) before the next one's response.created, and clients that
        follow one response at a time (LiveKit's, Pipecat's) would end the new one at the old one's done."""
        if reply["held"] is not None and self._replies[0] is not reply:  # (None: done, off the queue)
            reply["held"].append(event)
        else:
            self.send(event)

    def _audio(self, reply: dict, samples: np.ndarray) -> None:
        if len(samples) and reply["status"] != "cancelled":
            reply["audio_ms"] += 1000 * len(samples) / wire.AUDIO_RATE
            delta = wire.b64_pcm16(samples)
            self._send(reply, wire.event("response.output_audio.delta", **_where(reply), delta=delta))

    def _finish(self, done: VoiceTurnDone) -> None:
        reply = self._replies.popleft()
        reply["held"] = None  # the oldest: its events went out as they came, and its last ones go now
        if reply["status"] != "cancelled" and done.reply is not None and done.reply.interrupted:
            reply["status"] = "cancelled"
        if reply["status"] == "completed" and done.reply is not None and len(done.reply.token_ids) >= reply["limit"]:
            reply["status"] = "incomplete"  # cut off by its max_output_tokens
        if reply["status"] != "cancelled":
            self._audio(reply, self._voice.end())
        where, text = _where(reply), reply["transcript"]
        if reply["reasoning"]:
            self.send(wire.event("response.reasoning_text.done", **where, text=reply["reasoning"]))
        if self.link.config.audio_out:
            self.send(wire.event("response.output_audio.done", **where))
            self.send(wire.event("response.output_audio_transcript.done", **where, transcript=text))
        else:
            self.send(wire.event("response.output_text.done", **where, text=text))
        self.send(wire.event("response.content_part.done", **where, part=self._part(reply)))
        item = self._item(reply, "completed" if reply["status"] == "completed" else "incomplete").shown()
        self.link.show(reply["item"], item)
        self.send(wire.event("response.output_item.done", response_id=reply["id"], output_index=0, item=item))
        self.send(wire.event("conversation.item.done", item=item))
        usage = _usage(done.reply, reply["cached"])
        timings = None if done.timings is None else {  # an extension: where the turn's time went
            "endpoint_s": done.timings.endpoint_s, "ttft_s": done.timings.ttft_s, "first_audio_s": done.timings.first_audio_s}
        self.send(wire.event("response.done", response={**self._shown(reply, reply["status"]), "output": [item],
                                                         "usage": usage}, timings=timings))
        if done.reply is not None:  # committed by now (a reply that failed or never began is not in the session)
            reply["messages"] = done.reply.messages  # as it went in: the next turn may have added to it since
            self._latest = reply
        reply["done"].set()
        if self._replies:  # the next reply goes on the wire now, what it held first
            held, self._replies[0]["held"] = self._replies[0]["held"], []
            for event in held:
                self.send(event)
        self._answer_owed()

    def _answer_owed(self) -> None:
        """With interrupt_response false, a turn the server VAD heard while a reply ran on is answered
        once that reply is done (OpenAI's reply "will continue until complete"): the assistant does not
        start it itself, as its new turn would supersede the running one and drop the rest of its words."""
        if self._owed and not self._replies:
            self._owed = False
            try:
                self.link.receive({"type": "response.create", AUTO: True})
            except OverflowError:  # the socket is ending: its flood of events closes it
                pass

    def _shown(self, reply: dict, status: str) -> dict:
        """The response object; once done, `status_details` says why one did not complete, as OpenAI's does."""
        details = {"cancelled": {"type": "cancelled", "reason": reply.get("reason", "turn_detected")},
                   "incomplete": {"type": "incomplete", "reason": "max_output_tokens"},
                   "failed": {"type": "failed", "error": {"type": "server_error", "message": reply.get("error")}}}.get(status)
        return {"id": reply["id"], "object": "realtime.response", "status": status, "status_details": details,
                "output": [], "conversation_id": self.link.conversation_id,
                "output_modalities": ["audio"] if self.link.config.audio_out else ["text"],
                "max_output_tokens": reply["limit"], "metadata": reply.get("metadata")}

    def _part(self, reply: dict) -> dict:
        """The reply's one content part as `response.content_part.*` show it (its text so far)."""
        if self.link.config.audio_out:
            return {"type": "audio", "transcript": reply["transcript"]}
        return {"type": "text", "text": reply["transcript"]}

    def _item(self, reply: dict, status: str) -> wire.Item:
        kind = "output_audio" if self.link.config.audio_out else "output_text"
        key = "transcript" if kind == "output_audio" else "text"
        return wire.Item(reply["item"], "assistant", [{"type": kind, key: reply["transcript"]}], status)


def _heard_item(item: str) -> dict:
    """A user item the server VAD heard (audio only; no transcript is made)."""
    return wire.Item(item, "user", [{"type": "input_audio", "transcript": None}]).shown()


def _usage(reply, cached: int) -> dict:
    """response.done's usage, always an object (clients read its fields unguarded): zeros for a reply
    that never began. The model writes text tokens only; the speech is made from them."""
    prompt, out = (reply.prompt_tokens, len(reply.token_ids)) if reply is not None else (0, 0)
    return {"total_tokens": prompt + out, "input_tokens": prompt, "output_tokens": out,
            "input_token_details": {"cached_tokens": min(cached, prompt)},
            "output_token_details": {"text_tokens": out, "audio_tokens": 0}}


def _where(reply: dict) -> dict:
    return {"response_id": reply["id"], "item_id": reply["item"], "output_index": 0, "content_index": 0}
