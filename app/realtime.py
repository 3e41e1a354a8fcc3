"""The Realtime voice WebSocket, `/v1/realtime?model=…`: OpenAI's Realtime protocol around afnext's
`Assistant` (endpointer → session → speech, with barge-in).

One socket is one conversation. Client events go, in order, to a feeder thread that drives the
assistant; a reader thread turns the assistant's events into server events. With server VAD (the
default) microphone audio streams in and turns end on silence; with `turn_detection: null` the
client commits its audio (or creates a text or audio item) and asks for a response. Speech over a
reply cancels it at once (`response.done` with status `cancelled`); `conversation.item.truncate`
then makes the model remember only the part of the reply that was heard.

A socket that names its owner (the page's `afnext-owner.TOKEN` subprotocol, or the API key) keeps its
conversation in the store, turn by turn; `?conversation=ID` goes on with one of the owner's kept
conversations (session.created's extra `conversation` field names the socket's conversation and the
turns it holds). Its session stays live in the server's `Live` registry after the socket closes, so a
page that reloads goes on without rebuilding it; one the registry let go of is rebuilt from the store.
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import threading
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
from starlette.websockets import WebSocket, WebSocketDisconnect

from afnext.assistant import Assistant, AssistantOptions, Stamped, UserTurn, VoiceTurnDone
from afnext.audio import AudioError, to_mono_16k
from afnext.events import AudioChunk, Error, Interrupted, ReasoningDelta, TextDelta
from afnext.journal import KeptError, open_conversation
from afnext.live import Live, matches_store
from afnext.sampling import GenerationOptions
from afnext.session import Session
from afnext.store import Store, StoreError, check_id
from afnext.tts import SpeechResampler
from afnext.vad import EndpointerOptions, SpeechStarted

from . import realtime_wire as wire
from .access import KEY_PROTOCOL, PAGE_PROTOCOL, Access, client_group
from .backend import BackendLoader, BackendUnavailable

log = logging.getLogger(__name__)

ROUTE = wire.ROUTE
MAX_SESSIONS = 64  # sockets at once; more are refused with 1013 (try again later)
MAX_PER_ADDRESS = 8  # sockets from one client address: a fair share of MAX_SESSIONS
MAX_BUFFER_S = 30.0  # seconds of audio a client may append before committing (one turn's limit)
MIN_COMMIT_MS = 100  # the shortest buffer a commit takes, as OpenAI's (the model needs more than 20 ms)
MAX_PENDING_EVENTS = 512  # client events waiting for the feeder (~50 s of 100 ms appends); more: the socket ends
MAX_ITEMS = 16  # user items created and not yet answered
IDLE_TIMEOUT_S = 600.0  # a socket whose client sends nothing this long is closed: it holds a session slot
TRUNCATE_WAIT_S = 5.0  # a reply cut off by truncate winds down within a step; this is the safety net
# One client event: a 30 s clip in one conversation.item.create or append is 1.9 MB of base64. Uvicorn
# buffers up to WS_MAX_QUEUE of them per socket before the handler reads one, so the worst case is
# MAX_SESSIONS × (WS_MAX_QUEUE + 1) × MAX_MESSAGE_BYTES (800 MiB), and 1/8 of it per address.
MAX_MESSAGE_BYTES = 5 << 19  # 2.5 MiB
WS_MAX_QUEUE = 4


class _Mute:
    """A synthesizer that says nothing: text-only sessions."""

    sample_rate = wire.AUDIO_RATE

    def stream(self, text: str, cancel=None):
        return iter(())


@dataclass(frozen=True)
class Kept:
    """Where a socket's conversation is kept: conversation `cid` of `owner` in `store`, live in `live`."""

    store: Store
    live: Live  # live conversations by id (the app's one registry)
    owner: str
    cid: str
    kind: str  # "talk" (the page) or "api"
    group: str  # the client address, for the registry's fair shares
    turns: int = 0  # completed turns the conversation held when the socket opened
    system: str | None = None  # its instructions, when it was kept before


class RealtimeLink:
    """One socket's conversation: client events in (any thread, kept in order), server events out."""

    def __init__(self, engine, synthesizer, model: str, send: Callable[[dict], None], page: bool = False,
                 kept: Kept | None = None) -> None:
        self.engine, self.synthesizer, self.model, self.send = engine, synthesizer, model, send
        self.page = page  # opened with the page's token: only what the page does (app/access.py)
        self.kept = kept  # where its turns are kept (None: nowhere)
        self.think = model == "think"  # the Think model reasons first: shown as reasoning_text, never spoken
        self.config = wire.Config.for_model(model)
        self.session: Session | None = None  # made at the first turn, with the instructions then in force
        self.assistant: Assistant | None = None
        self._inbox: queue.Queue = queue.Queue(MAX_PENDING_EVENTS)
        self._buffer: list[np.ndarray] = []  # appended audio (24 kHz int16) awaiting a commit, manual mode
        # User items awaiting a response: (id, text, 16 kHz float32 audio or None); the reader thread adds
        # turns the server VAD heard when create_response is off, so under a lock.
        self._items: list[tuple[str, str, np.ndarray | None]] = []
        self._items_lock = threading.Lock()
        self._last_item: str | None = None
        self._ids: set[str] = set()  # every item's id, so a client's own ids stay unique
        self._out = _Responses(self)
        self._closing, self._closed = threading.Lock(), False
        if kept is not None and kept.system is not None:  # a kept conversation goes on with its instructions
            self.config = replace(self.config, instructions=kept.system or None)
        self._feeder = threading.Thread(target=self._feed, name="afnext-realtime-feed", daemon=True)
        self._feeder.start()
        extra = {} if kept is None else {"conversation": {"id": kept.cid, "turns": kept.turns}}
        self.id = wire.new_id("sess")
        send(wire.event("session.created", session={"id": self.id, **self.config.describe(model)}, **extra))

    def receive(self, event: dict) -> None:
        """Queue a client event (never blocks). OverflowError when MAX_PENDING_EVENTS already wait."""
        try:
            self._inbox.put_nowait(event)
        except queue.Full:
            raise OverflowError("The client sent events faster than the server could act on them.") from None

    def close(self) -> None:
        """End the conversation: its turn is cancelled. Idempotent; a second call waits for the first."""
        with self._closing:
            if self._closed:
                return
            self._closed = True
            while True:  # make room for the end mark: what still waits is not acted on
                try:
                    self._inbox.put_nowait(None)
                    break
                except queue.Full:
                    self._inbox.get_nowait()
            self._feeder.join(5)
            if self.assistant is not None:
                self.assistant.close()
                self._out.join()

    # ---- client events (feeder thread) ----

    def _feed(self) -> None:
        while (event := self._inbox.get()) is not None:
            try:
                getattr(self, "_on_" + event["type"].replace(".", "_"))(event)
            except wire.ProtocolError as exc:
                exc.event_id = exc.event_id or (event.get("event_id") if isinstance(event.get("event_id"), str) else None)
                self.send(wire.error(exc))
            except Exception:  # ours, not the client's: say so and go on
                log.exception("realtime: could not handle %s", event.get("type"))
                self.send(wire.error(wire.ProtocolError("The server could not handle that event.", "server_error")))

    def _on_session_update(self, event: dict) -> None:
        config = wire.updated(self.config, event.get("session"))
        if self.page and (config.instructions != self.config.instructions or not config.audio_out
                          or config.max_output_tokens != self.config.max_output_tokens):
            raise wire.ProtocolError("The page's session takes turn detection settings only; other clients send "
                                     "the API key.", "page_session")
        if config.instructions != self.config.instructions and (self.session is not None or (
                self.kept is not None and self.kept.turns)):
            raise wire.ProtocolError("instructions can only be set before the first turn.")
        if self.assistant is not None and _voice_changed(self.config, config):
            self.assistant.close()  # the next turn starts on an assistant with the new settings
            self._out.join()
            self._out.abandon()  # a reply cut off by the swap is done, as cancelled
            self.assistant = None
        self.config = config
        self.send(wire.event("session.updated", session={"id": self.id, **config.describe(self.model)}))

    def _on_input_audio_buffer_append(self, event: dict) -> None:
        pcm = wire.pcm16(event.get("audio"))
        if self.config.server_vad:
            self._assistant().push(pcm, wire.AUDIO_RATE)
        elif sum(map(len, self._buffer)) + len(pcm) > MAX_BUFFER_S * wire.AUDIO_RATE:
            raise wire.ProtocolError(f"The audio buffer holds {MAX_BUFFER_S:g} s at most; commit it first.",
                                     "buffer_too_large")
        else:
            self._buffer.append(pcm)

    def _on_input_audio_buffer_commit(self, event: dict) -> None:
        if self.config.server_vad:
            raise wire.ProtocolError("With server VAD the server commits turns; set turn_detection to null first.")
        held_ms = 1000 * sum(map(len, self._buffer)) / wire.AUDIO_RATE
        if held_ms < MIN_COMMIT_MS:
            raise wire.ProtocolError(f"The audio buffer holds {held_ms:.0f} ms of audio; commit at least "
                                     f"{MIN_COMMIT_MS} ms.", "input_audio_buffer_commit_empty")
        audio, self._buffer = np.concatenate(self._buffer), []
        item, before = self._add_user("", audio)
        self.send(wire.event("input_audio_buffer.committed", item_id=item, previous_item_id=before))

    def _on_input_audio_buffer_clear(self, event: dict) -> None:
        self._buffer = []
        if self.config.server_vad and self.assistant is not None:
            self.assistant.forget_speech()  # speech heard so far is no turn
        self.send(wire.event("input_audio_buffer.cleared"))

    def _on_conversation_item_create(self, event: dict) -> None:
        if self.page:
            raise wire.ProtocolError("The page's session takes microphone audio only; other clients send the API key.",
                                     "page_session")
        item = event.get("item")
        text, audio = wire.user_item(item)
        self._add_user(text, audio, item.get("id"), after=event.get("previous_item_id"))

    def _on_response_create(self, event: dict) -> None:
        tokens = wire.check_response(self.config, event.get("response"))
        # being made: announced (answering), or asked for and not announced yet (busy)
        if self._out.answering() or (self.assistant is not None and self.assistant.busy):
            raise wire.ProtocolError("A response is already in progress; wait for its response.done, or send "
                                     "response.cancel.", "conversation_already_has_active_response")
        with self._items_lock:
            items, self._items = self._items, []
        if not items:
            raise wire.ProtocolError("There is no user item to respond to; append and commit audio, or create an item.")
        text = "\n".join(t for _, t, _ in items if t)
        clips = [a for _, _, a in items if a is not None]
        own = None if tokens is None else GenerationOptions(max_new_tokens=tokens)  # this response's limit
        if tokens is not None:
            self._out.limits[items[-1][0]] = tokens
        self._assistant().say(np.concatenate(clips) if clips else None, text, tag=items[-1][0], generation=own)

    def _on_response_cancel(self, event: dict) -> None:
        if self.assistant is None or not self._out.answering():
            raise wire.ProtocolError("There is no response to cancel.", "response_cancel_not_active")
        named = event.get("response_id")
        if named is not None and not self._out.answering(named):
            raise wire.ProtocolError(f"{str(named)[:80]!r} is not the response in progress.", "response_cancel_not_active")
        self._out.cancelled_by_client()
        self.assistant.interrupt()

    def _on_conversation_item_truncate(self, event: dict) -> None:
        item, ms = event.get("item_id"), event.get("audio_end_ms")
        if not isinstance(ms, int) or isinstance(ms, bool) or ms < 0:
            raise wire.ProtocolError("audio_end_ms must be a whole number of milliseconds.")
        if self._out.running(item) and self.assistant is not None:
            self._out.cancelled_by_client()
            self.assistant.interrupt()  # truncating a reply still being made: the user stopped listening
        heard = self._out.heard(item, ms)
        if heard is None:
            raise wire.ProtocolError("Only the latest reply can be truncated, once it is done or cancelled.",
                                     "item_truncate_invalid_item_id")
        text, messages, reply = heard
        self.session.wait()
        cut = reply.get("cut_ms")
        # the reply is still the conversation's last (no turn has begun since), and not cut as short already
        if len(self.session.messages) == messages and (cut is None or ms < cut):
            try:
                self.session.rewrite_reply(text)
            except KeptError as exc:
                raise wire.ProtocolError(str(exc), "server_error") from None
            reply["cut_ms"] = ms
        self.send(wire.event("conversation.item.truncated", item_id=item, content_index=0, audio_end_ms=ms))

    def _add_user(self, text: str, audio: np.ndarray | None, item: str | None = None,
                  after: object = None) -> tuple[str, str | None]:
        """A user item made (its id: the client's, or a new one) and announced; (its id, the one before it)."""
        item = item or wire.new_id("item")
        content = ([{"type": "input_audio", "transcript": None}] if audio is not None else []) + \
                  ([{"type": "input_text", "text": text}] if text else [])
        shown = wire.Item(item, "user", content).shown()
        before = self.hold(item, text, None if audio is None else to_mono_16k(audio, wire.AUDIO_RATE), after)
        self.send(wire.event("conversation.item.added", previous_item_id=before, item=shown))
        self.send(wire.event("conversation.item.done", previous_item_id=before, item=shown))
        return item, before

    def hold(self, item: str, text: str, audio: np.ndarray | None, after: object = None) -> str | None:
        """Keep a user item (audio at 16 kHz) for the next response.create; the item before it. Any
        thread; ProtocolError when MAX_ITEMS wait already, when the item's id is taken, or when `after`
        (a client's previous_item_id) is not the last item: items go at the end."""
        with self._items_lock:
            last = self._last_item
            if after is not None and after != last and not (after == "root" and last is None):
                raise wire.ProtocolError("Items are added at the end of the conversation: previous_item_id must be "
                                         "the last item's id, or be left out.")
            if len(self._items) >= MAX_ITEMS:
                raise wire.ProtocolError(f"{MAX_ITEMS} items wait for a response already; send response.create.")
            if item in self._ids:
                raise wire.ProtocolError(f"The conversation already has an item {item!r}; ids must be unique.",
                                         "item_id_duplicate")
            self._items.append((item, text, audio))
            self._ids.add(item)
            before, self._last_item = self._last_item, item
        return before

    def chain(self, item: str) -> str | None:
        """`item` is now the conversation's last; the one before it. Any thread."""
        with self._items_lock:
            before, self._last_item = self._last_item, item
            self._ids.add(item)
        return before

    def _assistant(self) -> Assistant:
        if self.assistant is None:
            if self.session is None:
                self.session = self._open_session()
            complete, longest = wire.EAGERNESS[self.config.eagerness]
            endpointer = EndpointerOptions(hangover_ms=self.config.silence_ms, semantic=self.config.semantic,
                                           complete=complete, max_silence_ms=longest)
            options = AssistantOptions(uninterruptible=not self.config.interrupt, think=self.think,
                                       answer=self.config.create_response,
                                       generation=GenerationOptions(max_new_tokens=self.config.max_output_tokens),
                                       endpointer=endpointer)
            voice = self.synthesizer if self.config.audio_out else _Mute()
            self.assistant = Assistant(self.session, voice, options)
            self._out.follow(self.assistant)
        return self.assistant


    def _open_session(self) -> Session:
        """The conversation's session: a new one, or (kept) the live one, or one rebuilt from the store."""
        kept, system = self.kept, self.config.instructions or None
        if kept is None:
            return Session(self.engine, system=system)

        def rebuild() -> Session:
            session = Session(self.engine, system=system)
            open_conversation(kept.store, kept.cid, session, model=self.engine.loaded.name, kind=kept.kind,
                              owner=kept.owner, system=system or "")
            return session
        try:
            session = kept.live.open(kept.cid, kept.owner, kept.group, rebuild, current=matches_store)
            if not isinstance(session, Session):  # the id of a recording the owner has open elsewhere
                raise StoreError("that id names a recording, not a voice conversation.")
            return session
        except (StoreError, AudioError, ValueError) as exc:
            raise wire.ProtocolError(f"The conversation could not be opened again: {exc}", "conversation_unavailable") \
                from None


def _voice_changed(old: wire.Config, new: wire.Config) -> bool:
    keys = ("server_vad", "silence_ms", "semantic", "eagerness", "interrupt", "create_response", "audio_out",
            "max_output_tokens")
    return any(getattr(old, k) != getattr(new, k) for k in keys)


class _Responses:
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
                before = self.link.hold(item, "", inner.audio)
            except wire.ProtocolError:
                self.send(wire.event("input_audio_buffer.speech_stopped", audio_end_ms=round(inner.end * 1000),
                                     item_id=item))
                self.send(wire.error(wire.ProtocolError(f"{MAX_ITEMS} items wait for a response already, so that "
                                                        "utterance was dropped; send response.create.")))
                return
            self._announce(inner, item, before)
        elif isinstance(inner, UserTurn):
            self._begin(inner)
        elif not self._replies:
            return
        elif isinstance(inner, ReasoningDelta):
            reply = self._replies[-1]
            reply["reasoning"] += inner.text
            self.send(wire.event("response.reasoning_text.delta", **_where(reply), delta=inner.text))
        elif isinstance(inner, TextDelta):
            reply = self._replies[-1]
            reply["transcript"] += inner.text
            kind = "response.output_audio_transcript.delta" if self.link.config.audio_out else "response.output_text.delta"
            self.send(wire.event(kind, **_where(reply), delta=inner.text))
        elif isinstance(inner, AudioChunk):
            self._audio(self._replies[-1], self._voice.push(inner))
        elif isinstance(inner, Interrupted):
            self._replies[-1]["status"] = "cancelled"
            self._voice.drop()
        elif isinstance(inner, Error):
            self._replies[-1]["status"], self._replies[-1]["error"] = "failed", inner.message
            self.send(wire.error(wire.ProtocolError(inner.message, "server_error")))
        elif isinstance(inner, VoiceTurnDone):
            self._finish(inner)

    def _announce(self, turn: UserTurn, item: str | None = None, before: str | None = None) -> str:
        """A turn the endpointer heard: its item (after `before`), committed from the audio buffer."""
        if item is None:
            item = self._speech_item or wire.new_id("item")
            before = self.link.chain(item)
        self.send(wire.event("input_audio_buffer.speech_stopped", audio_end_ms=round(turn.end * 1000), item_id=item))
        self.send(wire.event("input_audio_buffer.committed", item_id=item, previous_item_id=before))
        shown = wire.Item(item, "user", [{"type": "input_audio", "transcript": None}]).shown()
        self.send(wire.event("conversation.item.added", previous_item_id=before, item=shown))
        self.send(wire.event("conversation.item.done", previous_item_id=before, item=shown))
        return item

    def _begin(self, turn: UserTurn) -> None:
        item = turn.tag  # the client's items it asked an answer for (announced when they were made)
        if item is None:
            item = self._announce(turn)
        reply = {"id": wire.new_id("resp"), "item": wire.new_id("item"), "transcript": "", "reasoning": "", "audio_ms": 0.0,
                 "status": "completed", "done": threading.Event(),
                 "limit": self.limits.pop(turn.tag, None) or self.link.config.max_output_tokens}
        self._replies.append(reply)
        self.link.chain(reply["item"])
        self.send(wire.event("response.created", response=_shown(reply, "in_progress")))
        self.send(wire.event("response.output_item.added", response_id=reply["id"], output_index=0,
                             item=self._item(reply, "in_progress").shown()))
        self.send(wire.event("conversation.item.added", previous_item_id=item,
                             item=self._item(reply, "in_progress").shown()))
        self.send(wire.event("response.content_part.added", **_where(reply), part=self._part(reply)))

    def _audio(self, reply: dict, samples: np.ndarray) -> None:
        if len(samples) and reply["status"] != "cancelled":
            reply["audio_ms"] += 1000 * len(samples) / wire.AUDIO_RATE
            self.send(wire.event("response.output_audio.delta", **_where(reply), delta=wire.b64_pcm16(samples)))

    def _finish(self, done: VoiceTurnDone) -> None:
        reply = self._replies.popleft()
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
        self.send(wire.event("response.output_item.done", response_id=reply["id"], output_index=0, item=item))
        self.send(wire.event("conversation.item.done", item=item))
        usage = None
        if done.reply is not None:
            prompt, out = done.reply.prompt_tokens, len(done.reply.token_ids)
            usage = {"total_tokens": prompt + out, "input_tokens": prompt, "output_tokens": out}
        timings = None if done.timings is None else {  # an extension: where the turn's time went
            "endpoint_s": done.timings.endpoint_s, "ttft_s": done.timings.ttft_s, "first_audio_s": done.timings.first_audio_s}
        self.send(wire.event("response.done", response={**_shown(reply, reply["status"]), "output": [item],
                                                         "usage": usage}, timings=timings))
        if done.reply is not None:  # committed by now (a reply that failed or never began is not in the session)
            reply["messages"] = len(self.link.session.messages)
            self._latest = reply
        reply["done"].set()

    def _part(self, reply: dict) -> dict:
        """The reply's one content part as `response.content_part.*` show it (its text so far)."""
        if self.link.config.audio_out:
            return {"type": "audio", "transcript": reply["transcript"]}
        return {"type": "text", "text": reply["transcript"]}

    def _item(self, reply: dict, status: str) -> wire.Item:
        kind = "output_audio" if self.link.config.audio_out else "output_text"
        key = "transcript" if kind == "output_audio" else "text"
        return wire.Item(reply["item"], "assistant", [{"type": kind, key: reply["transcript"]}], status)


def _where(reply: dict) -> dict:
    return {"response_id": reply["id"], "item_id": reply["item"], "output_index": 0, "content_index": 0}


def _shown(reply: dict, status: str) -> dict:
    """The response object; once done, `status_details` says why one did not complete, as OpenAI's does."""
    details = {"cancelled": {"type": "cancelled", "reason": reply.get("reason", "turn_detected")},
               "incomplete": {"type": "incomplete", "reason": "max_output_tokens"},
               "failed": {"type": "failed", "error": {"type": "server_error", "message": reply.get("error")}}}.get(status)
    return {"id": reply["id"], "object": "realtime.response", "status": status, "status_details": details,
            "output": []}


class RealtimeServer:
    """The route: checks access, caps the sockets, runs one link per socket."""

    def __init__(self, loader: BackendLoader, access: Access | None = None, store: Store | None = None,
                 live: Live | None = None) -> None:
        self.loader, self.access, self.store = loader, access or Access(), store
        # Kept conversations' sessions, live past their socket (a reload goes on without a rebuild); the
        # app shares one registry between its tabs.
        self.live = live if live is not None else Live(per_group=MAX_PER_ADDRESS, most=MAX_SESSIONS)
        self._open: dict[str, int] = {}  # client address → open sockets (touched on the event loop only)
        self._links: set[RealtimeLink] = set()
        self._lock = threading.Lock()  # _links: the server's thread shuts them down

    def shutdown(self) -> None:
        """Close every live conversation (the server is stopping): their turns are cancelled."""
        with self._lock:
            links, self._links = list(self._links), set()
        for link in links:
            link.close()

    async def __call__(self, ws: WebSocket) -> None:
        offered = [p.strip() for p in ws.headers.get("sec-websocket-protocol", "").split(",") if p.strip()]
        model = ws.query_params.get("model", "instruct")
        address = client_group(ws.client.host if ws.client else None)
        grant = self.access.socket(ws.headers, offered)
        refusal, code = grant.refusal, 1008
        if refusal is None and model not in ("instruct", "think"):
            refusal = f"Unknown model {model[:40]!r}; use instruct or think."
        if refusal is None and grant.page and model != "instruct":
            refusal = "The page's token opens the instruct model only; other clients send the API key."
        if refusal is None and (sum(self._open.values()) >= MAX_SESSIONS or self._open.get(address, 0) >= MAX_PER_ADDRESS):
            refusal, code = "Too many voice sessions are open; try again later.", 1013
        # Counted from the check on, before the first await: a burst of handshakes cannot all pass it.
        counted = refusal is None
        if counted:
            self._open[address] = self._open.get(address, 0) + 1
        try:
            kept = None
            if refusal is None:
                try:
                    kept = await asyncio.to_thread(self._kept, grant, ws.query_params.get("conversation"), address)
                except StoreError as exc:
                    refusal = str(exc)
            if refusal is None:
                try:
                    backend = self.loader.wait(0)
                except BackendUnavailable as exc:
                    refusal, code = str(exc), 1013
            # Accepted even to refuse: a browser sees neither an HTTP status nor a reason given before the
            # handshake, and the page must be able to say why. A browser that offered subprotocols needs
            # one of them chosen back: "realtime" as OpenAI's clients offer it, a key or token only if
            # nothing else was offered (the response header would carry it).
            plain = [p for p in offered if not p.startswith((KEY_PROTOCOL, PAGE_PROTOCOL))]
            await ws.accept(subprotocol="realtime" if "realtime" in offered else (plain or offered or [None])[0])
            if refusal is not None:
                await _refuse(ws, refusal, code)
                return
            await self._serve(ws, backend.think if model == "think" else backend.main, backend.synthesizer, model,
                              grant.page, kept)
        finally:
            if counted:
                self._open[address] -= 1
                if not self._open[address]:
                    del self._open[address]

    def _kept(self, grant, cid: str | None, address: str) -> Kept | None:
        """Where the socket's conversation is kept: nowhere without an owner (or a store); a new
        conversation, or the owner's conversation `cid`. StoreError (one sentence) for a `cid` the
        owner does not have."""
        if cid is not None and (grant.owner is None or self.store is None):
            raise StoreError("Going on with a kept conversation needs an owner token (the page's) or the API key.")
        if grant.owner is None or self.store is None:
            return None
        kind = "talk" if grant.page or grant.owner.startswith("owner:") else "api"
        if cid is None:
            return Kept(self.store, self.live, grant.owner, uuid.uuid4().hex, kind, address)
        found = self.store.get(check_id(cid), owner=grant.owner)
        if found is None or found.kind not in ("talk", "api"):
            raise StoreError(f"There is no voice conversation {cid[:64]!r} of yours here.")
        return Kept(self.store, self.live, grant.owner, cid, found.kind, address, found.turns, found.system)

    async def _serve(self, ws: WebSocket, engine, synthesizer, model: str, page: bool, kept: Kept | None) -> None:
        loop, outbox = asyncio.get_running_loop(), asyncio.Queue()
        def send(event: dict) -> None:  # from the link's threads
            try:
                loop.call_soon_threadsafe(outbox.put_nowait, event)
            except RuntimeError:  # the event loop has closed (the server stopped): nobody is listening
                pass

        link = await asyncio.to_thread(RealtimeLink, engine, synthesizer, model, send, page, kept)
        sender = asyncio.create_task(_send_all(ws, outbox))
        with self._lock:
            self._links.add(link)
        refusal = None
        try:
            while True:
                try:
                    message = await asyncio.wait_for(ws.receive(), IDLE_TIMEOUT_S)
                except TimeoutError:
                    refusal = (f"The session closed after {IDLE_TIMEOUT_S / 60:g} minutes without a message.", 1000)
                    break
                if message["type"] == "websocket.disconnect":
                    break
                data = message.get("text") if message.get("text") is not None else message.get("bytes")
                if len(data or "") > MAX_MESSAGE_BYTES:  # uvicorn refuses these first; other servers may not
                    refusal = (f"A client event was over the {MAX_MESSAGE_BYTES / (1 << 20):g} MiB limit; send audio "
                               "in smaller appends.", 1009)
                    break
                try:
                    link.receive(wire.parse(data))
                except wire.ProtocolError as exc:
                    outbox.put_nowait(wire.error(exc))
        except OverflowError as exc:
            refusal = (str(exc), 1008)
        except WebSocketDisconnect:
            pass
        finally:
            sender.cancel()
            with self._lock:
                self._links.discard(link)
            await asyncio.to_thread(link.close)
        if refusal is not None:
            await asyncio.wait({sender})  # one writer at a time on the socket
            await _refuse(ws, *refusal)


async def _refuse(ws: WebSocket, message: str, code: int) -> None:
    """An `error` event with the sentence, then the close (its reason repeats it, cut to the protocol's limit)."""
    try:
        await ws.send_text(json.dumps(wire.error(wire.ProtocolError(message, "session_refused"))))
        await ws.close(code=code, reason=message.encode()[:120].decode(errors="ignore"))
    except (WebSocketDisconnect, RuntimeError, OSError):
        pass  # the client has gone already


async def _send_all(ws: WebSocket, outbox: asyncio.Queue) -> None:
    while True:
        event = await outbox.get()
        try:
            await ws.send_text(json.dumps(event))
        except (WebSocketDisconnect, RuntimeError):
            return
