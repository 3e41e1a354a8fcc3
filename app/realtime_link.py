"""One Realtime socket's conversation (`RealtimeLink`): its client events drive afnext's `Assistant`,
and `Kept` says where its turns are kept.

Client events go, in order, to a feeder thread that drives the assistant; app/realtime_replies.py reads
the assistant's events back out as server events. With server VAD (the default) microphone audio
streams in and turns end on silence; with `turn_detection: null` the client commits its audio (or
creates a text or audio item) and asks for a response. Speech over a reply cancels it at once
(`response.done` with status `cancelled`); `conversation.item.truncate` then makes the model remember
only the part of the reply that was heard. `conversation.item.retrieve` shows any item of the socket's;
`conversation.item.delete` takes back one still waiting for a response (the model has not heard it).

A kept conversation's session is the one live in the server's `Live` registry, or one rebuilt from the
store, and it goes on with the instructions it was kept with.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from afnext.assistant import Assistant, AssistantOptions
from afnext.audio import AudioError, to_mono_16k
from afnext.journal import KeptError, open_conversation
from afnext.live import Live, matches_store
from afnext.prompt import check_control_tokens, text_of
from afnext.sampling import GenerationOptions
from afnext.session import Session
from afnext.store import Store, StoreError
from afnext.vad import EndpointerOptions

from . import realtime_wire as wire
from .realtime_replies import AUTO, MAX_ITEMS, Responses

log = logging.getLogger(__name__)

MAX_GIVEN = 512  # assistant and system messages a client created, waiting for the next turn
MAX_BUFFER_S = 30.0  # seconds of audio a client may append before committing (one turn's limit)
MIN_COMMIT_MS = 100  # the shortest buffer a commit takes, as OpenAI's (the model needs more than 20 ms)
MAX_PENDING_EVENTS = 512  # client events waiting for the feeder (~50 s of 100 ms appends); more: the socket ends


class _FirstTurn:
    """The session an assistant answers in: the link's, opened when its first turn is asked, not when
    the first audio is heard, so a client may set instructions until then (Pipecat sends its context's
    while the microphone streams already)."""

    def __init__(self, link: RealtimeLink) -> None:
        self.link = link

    def ask(self, text: str = "", audio=None, **kwargs):
        text, audio = self.link.with_waiting(text, audio)
        return self.link.instructed().ask(text, audio, **kwargs)

    def respond(self, **kwargs):
        self.link.begins()
        return self.link.instructed().respond(**kwargs)


def _joined(items: list[tuple[str, str, np.ndarray | None]]) -> tuple[str, np.ndarray | None]:
    """User items (id, text, 16 kHz audio) as one turn: their words a line each, their audio end to end."""
    clips = [a for _, _, a in items if a is not None]
    return "\n".join(t for _, t, _ in items if t), (np.concatenate(clips) if clips else None)


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
    system: str | None = None  # its system prompt, when it was kept before
    instructions: str | None = None  # the instructions it was kept with last: changed since it began, else None


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
        self._session_lock = threading.Lock()  # opening it (a turn's thread) vs. changing the instructions
        # One turn's thread at a time brings new instructions in (`instructed`): a turn begun while a
        # cut-off one still waits to add them would see them missing too, and add them a second time.
        self._instructing = threading.Lock()
        self.assistant: Assistant | None = None
        self._inbox: queue.Queue = queue.Queue(MAX_PENDING_EVENTS)
        self._buffer: list[np.ndarray] = []  # appended audio (24 kHz int16) awaiting a commit, manual mode
        # User items awaiting a response: (id, text, 16 kHz float32 audio or None); the reader thread adds
        # turns the server VAD heard when create_response is off, so under a lock.
        self._items: list[tuple[str, str, np.ndarray | None]] = []
        # Assistant and system messages the client created, with the user items they followed: (users, id,
        # role, text), waiting for the next turn; those a turn was asked after, for it to bring in (`_due`).
        # `_asked`: turns a response.create asked whose thread has not begun (it took its items already).
        self._given: list[tuple[list[tuple[str, str, np.ndarray | None]], str, str, str]] = []
        self._due: list[tuple[list[tuple[str, str, np.ndarray | None]], str, str, str]] = []
        self._asked = 0
        # The session's instructions (config.instructions) as the session holds them: a client's own system
        # message does not change them. None: not known yet (the session's last system message, at first).
        self._in_force: str | None = None
        self._items_lock = threading.Lock()
        # Every item of the conversation as the protocol shows it, in order (the last is the latest), for
        # conversation.item.retrieve; and every id ever used, so a client's own ids stay unique.
        self._shown: dict[str, dict] = {}
        self._ids: set[str] = set()
        self._out = Responses(self)
        self._closing, self._closed = threading.Lock(), False
        if kept is not None and kept.system is not None:  # a kept conversation goes on with its instructions
            self.config = replace(self.config, instructions=kept.instructions or kept.system or None)
        self._feeder = threading.Thread(target=self._feed, name="afnext-realtime-feed", daemon=True)
        self._feeder.start()
        extra = {} if kept is None else {"conversation": {"id": kept.cid, "turns": kept.turns}}
        self.id = wire.new_id("sess")
        # The socket's one conversation, as OpenAI names its default one; a kept one's id is the store's,
        # which `?conversation=ID` goes on with.
        self.conversation_id = kept.cid if kept is not None else wire.new_id("conv")
        send(wire.event("session.created", session={"id": self.id, **self.config.describe(model)}, **extra))
        send(wire.event("conversation.created", conversation={"id": self.conversation_id,
                                                               "object": "realtime.conversation"}))

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
                exc.event_id = exc.event_id or wire.client_event_id(event)
                self.send(wire.error(exc))
            except Exception:  # ours, not the client's: say so (naming the event, as every error does) and go on
                log.exception("realtime: could not handle %s", event.get("type"))
                self.send(wire.error(wire.ProtocolError("The server could not handle that event.", "server_error",
                                                        wire.client_event_id(event))))

    def _on_session_update(self, event: dict) -> None:
        config = wire.updated(self.config, event.get("session"))
        if self.page and (config.instructions != self.config.instructions or not config.audio_out
                          or config.max_output_tokens != self.config.max_output_tokens):
            raise wire.ProtocolError("The page's session takes turn detection settings only; other clients send "
                                     "the API key.", "page_session")
        if config.instructions:
            try:
                check_control_tokens(self.engine.loaded, config.instructions)
            except ValueError as exc:
                raise wire.ProtocolError(f"The instructions cannot be used: {exc}") from None
        with self._session_lock:  # a turn that begins now opens the session with these instructions
            # (empty ones where none are in force change nothing: the session object we describe says
            # "instructions": "", and a client may send it back)
            if self.config.instructions and not config.instructions and (
                    self.session is not None or (self.kept is not None and self.kept.turns)):
                raise wire.ProtocolError("Instructions can be changed mid-conversation but not removed: the "
                                         "conversation holds them already. Send new ones instead.")
            self.config = replace(self.config, instructions=config.instructions)
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
        self._add_user("", audio, committed=True)

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
        given = isinstance(item, dict) and item.get("role") in ("assistant", "system")
        role, text, audio = (*wire.given_item(item), None) if given else ("user", *wire.user_item(item))
        try:  # refused now, naming this event, not when the turn it goes in with is asked
            check_control_tokens(self.engine.loaded, text)
        except ValueError as exc:
            raise wire.ProtocolError(f"The message cannot be used: {exc}") from None
        if given:
            self._add_given(role, text, item.get("id"), after=event.get("previous_item_id"))
        else:
            self._add_user(text, audio, item.get("id"), after=event.get("previous_item_id"))

    def _add_given(self, role: str, text: str, item: str | None, after: object = None) -> None:
        """An assistant or system message the client created (its own history, as Pipecat and LiveKit send a
        context's messages): it goes into the conversation with the next turn, after the user items waiting
        now (which it takes with it: an assistant message is their reply)."""
        item = item or wire.new_id("item")
        shown = wire.Item(item, role, [{"type": "output_text" if role == "assistant" else "input_text",
                                        "text": text}]).shown()
        with self._items_lock:
            if role == "system" and self._items:
                raise wire.ProtocolError("A system message cannot come between user messages and their response "
                                         "here; send response.create first, or create it before them.")
            self._place(item, after, given=True)
            waiting, self._items = self._items, []
            self._given.append((waiting, item, role, text))
            before = next(reversed(self._shown), None)
            self._shown[item] = shown
            self._ids.add(item)
        self.send(wire.event("conversation.item.added", previous_item_id=before, item=shown))
        self.send(wire.event("conversation.item.done", previous_item_id=before, item=shown))

    def _on_conversation_item_retrieve(self, event: dict) -> None:
        item = event.get("item_id")
        with self._items_lock:
            shown = self._shown.get(item) if isinstance(item, str) else None
        if shown is None:
            raise wire.ProtocolError(f"There is no item {str(item)[:80]!r} in the conversation.",
                                     "item_retrieve_invalid_item_id")
        self.send(wire.event("conversation.item.retrieved", item=shown))

    def _on_conversation_item_delete(self, event: dict) -> None:
        """Deletes an item still waiting for a response (a user item, or a message the client created that
        goes in with the next turn); one the model has heard stays (its tokens are the conversation's, and
        its KV cache was built on them)."""
        item = event.get("item_id")
        with self._items_lock:
            if isinstance(item, str) and self._unwait(item):
                del self._shown[item]
                self._ids.discard(item)
            elif isinstance(item, str) and item in self._shown:
                raise wire.ProtocolError(f"Only items still waiting for a response can be deleted; the model has "
                                         f"heard {item[:80]!r} already.", "item_delete_invalid_item_id")
            else:
                raise wire.ProtocolError(f"There is no item {str(item)[:80]!r} in the conversation.",
                                         "item_delete_invalid_item_id")
        self.send(wire.event("conversation.item.deleted", item_id=item))

    def _unwait(self, item: str) -> bool:
        """Take waiting item `item` out (the caller holds `_items_lock`); False when none waits by that id.
        The user items a deleted assistant message took go on waiting, for the next one or the response."""
        for users in [self._items] + [users for users, _, _, _ in self._given]:
            held = [user for user in users if user[0] == item]
            if held:
                users.remove(held[0])
                return True
        at = next((i for i, (_, given, _, _) in enumerate(self._given) if given == item), None)
        if at is None:
            return False
        users = self._given[at][0]
        later = self._given[at + 1:]
        if users and later and later[0][2] == "system":
            raise wire.ProtocolError("That message answers user messages that a system message follows; it cannot "
                                     "be deleted alone (a system message cannot come between user messages and "
                                     "their response here).", "item_delete_invalid_item_id")
        if users and later:
            later[0][0][:0] = users
        elif users:
            self._items[:0] = users
        del self._given[at]
        return True

    def _on_response_create(self, event: dict) -> None:
        if event.get(AUTO):  # the server's own, for a turn heard as a reply ran on
            if self.assistant is not None:
                self.assistant.wait(5)  # that reply's thread ends just after its response.done
            if self._out.answering() or (self.assistant is not None and self.assistant.busy) or not self._items:
                return  # the client asked for one meanwhile (it took the turn), as OpenAI's may not create one
        tokens = wire.check_response(self.config, event.get("response"))
        metadata = wire.response_metadata(event.get("response"))
        instructions = wire.response_instructions(event.get("response"))
        if self.page and (instructions is not None or tokens is not None):
            raise wire.ProtocolError("The page's responses take the session's settings; other clients send the API "
                                     "key.", "page_session")
        if instructions is not None:
            try:
                check_control_tokens(self.engine.loaded, instructions)
            except ValueError as exc:
                raise wire.ProtocolError(f"The response's instructions cannot be used: {exc}") from None
        # being made: announced (answering), or asked for and not announced yet (busy)
        if self._out.answering() or (self.assistant is not None and self.assistant.busy):
            raise wire.ProtocolError("A response is already in progress; wait for its response.done, or send "
                                     "response.cancel.", "conversation_already_has_active_response")
        assistant = self._assistant()
        with self._items_lock:  # what was created before it goes in with this turn; what comes after, later
            items, self._items = self._items, []
            anchor = next(reversed(self._shown), None)  # its reply goes after the last item there is now
            self._due += self._given
            self._given = []
            self._asked += 1
        # with no user item waiting, the assistant speaks first (a greeting), or goes on after its reply
        key = items[-1][0] if items else wire.new_id("event")  # what the response's own settings go by
        own = None if tokens is None else GenerationOptions(max_new_tokens=tokens)  # this response's limit
        if tokens is not None:
            self._out.limits[key] = tokens
        if metadata is not None:
            self._out.metadata[key] = metadata
        self._out.anchors[key] = anchor
        try:
            if items:
                text, audio = _joined(items)
                assistant.say(audio, text, tag=key, generation=own, instructions=instructions)
            else:
                assistant.respond(tag=key, generation=own, instructions=instructions)
        except BaseException:
            with self._items_lock:
                self._asked -= 1
            raise

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
        cut = reply.get("cut_ms")
        # A cut that keeps the whole reply (at or past its audio's end, a text reply) changes nothing: the
        # conversation keeps the token ids the model generated, and their KV cache. Another is made only
        # while the reply is still the conversation's last (no turn has begun since, none of the client's
        # own messages gone in: checked as the rewrite is made), and not cut as short already.
        if text != reply["transcript"] and (cut is None or ms < cut):
            try:
                if not self.session.rewrite_reply(text, messages=messages):
                    raise wire.ProtocolError("That reply can no longer be truncated: the conversation has gone "
                                             "on since it was made.", "item_truncate_invalid_item_id")
                reply["cut_ms"] = ms
            except KeptError as exc:
                raise wire.ProtocolError(str(exc), "server_error") from None
        self.send(wire.event("conversation.item.truncated", item_id=item, content_index=0, audio_end_ms=ms))

    def _add_user(self, text: str, audio: np.ndarray | None, item: str | None = None,
                  after: object = None, committed: bool = False) -> None:
        """A user item made (its id: the client's, or a new one) and announced: `committed` from the audio
        buffer, which OpenAI's server says before the item is added."""
        item = item or wire.new_id("item")
        content = ([{"type": "input_audio", "transcript": None}] if audio is not None else []) + \
                  ([{"type": "input_text", "text": text}] if text else [])
        shown = wire.Item(item, "user", content).shown()
        before = self.hold(item, text, None if audio is None else to_mono_16k(audio, wire.AUDIO_RATE), after, shown)
        if committed:
            self.send(wire.event("input_audio_buffer.committed", item_id=item, previous_item_id=before))
        self.send(wire.event("conversation.item.added", previous_item_id=before, item=shown))
        self.send(wire.event("conversation.item.done", previous_item_id=before, item=shown))

    def hold(self, item: str, text: str, audio: np.ndarray | None, after: object = None,
             shown: dict | None = None) -> str | None:
        """Keep a user item (audio at 16 kHz; `shown` as the protocol shows it) for the next
        response.create; the item before it. Any thread; ProtocolError when MAX_ITEMS wait already, when
        the item's id is taken, or when `after` (a client's previous_item_id) is not the last item:
        items go at the end."""
        with self._items_lock:
            last = self._place(item, after)
            self._items.append((item, text, audio))
            self._ids.add(item)
            self._shown[item] = shown or wire.Item(item, "user", []).shown()
        return last

    def _place(self, item: str, after: object, given: bool = False) -> str | None:
        """Check that a client's new item can go at the end (the caller holds `_items_lock`); the last item.
        User items wait MAX_ITEMS at most, unanswered or holding audio (held in memory); the client's other
        messages, with the user items they answered, MAX_GIVEN (a framework sends a whole context's history
        at once: a user message its history answered counts there only)."""
        last = next(reversed(self._shown), None)
        if after is not None and after != last and not (after == "root" and last is None):
            raise wire.ProtocolError("Items are added at the end of the conversation: previous_item_id must be "
                                     "the last item's id, or be left out.")
        answered = [user for users, _, _, _ in self._given + self._due for user in users]
        if given and len(self._given) + len(self._due) + len(answered) + len(self._items) >= MAX_GIVEN:
            raise wire.ProtocolError(f"{MAX_GIVEN} messages wait to go into the conversation already; send "
                                     "response.create.")
        if not given and len(self._items) + sum(audio is not None for _, _, audio in answered) >= MAX_ITEMS:
            raise wire.ProtocolError(f"{MAX_ITEMS} user items wait to go into the conversation already (unanswered, "
                                     "or holding audio); send response.create.")
        if item in self._ids:
            raise wire.ProtocolError(f"The conversation already has an item {item!r}; ids must be unique.",
                                     "item_id_duplicate")
        return last

    def chain(self, item: str, shown: dict, after: object = ...) -> str | None:
        """`item` (as the protocol shows it) goes in after item `after` (None: first; left out: last),
        where the session holds it: a reply after the items its response.create found, before those
        created since. The item before it. Any thread."""
        with self._items_lock:
            if after is ... or after not in (None, *self._shown):
                after = next(reversed(self._shown), None)
            ids = list(self._shown)
            at = 0 if after is None else ids.index(after) + 1
            self._shown = {**{i: self._shown[i] for i in ids[:at]}, item: shown,
                           **{i: self._shown[i] for i in ids[at:]}}
            self._ids.add(item)
        return after

    def show(self, item: str, shown: dict) -> None:
        """An item changed (a reply is done): what conversation.item.retrieve shows from now on."""
        with self._items_lock:
            if item in self._shown:
                self._shown[item] = shown

    def with_waiting(self, text: str, audio: np.ndarray | None) -> tuple[str, np.ndarray | None]:
        """A turn the server VAD ended and answers at once takes the user items created since the last
        response with it, as OpenAI's server answers them: their words before the turn's, their audio
        (16 kHz) before its speech; and the client's other messages go in before it. A response.create
        has taken its items already, as it was asked: what the client created after it (before its turn's
        thread got here) waits for the turn after. The turn's thread."""
        with self._items_lock:
            if self._begins() or not (self.config.server_vad and self.config.create_response):
                return text, audio
            items, self._items = self._items, []
        return _joined([*items, ("", text, audio)]) if items else (text, audio)

    def begins(self) -> None:
        """A turn with no user item (`Session.respond`) begins: the turn's thread."""
        with self._items_lock:
            self._begins()

    def _begins(self) -> bool:
        """A turn begins (its thread; the caller holds `_items_lock`): whether a response.create asked it.
        That one took the client's messages as it was asked; a turn the server VAD ended takes those
        created until now."""
        if self._asked:
            self._asked -= 1
            return True
        self._due += self._given
        self._given = []
        return False

    def opened(self) -> Session:
        """The conversation's session, opened at its first turn. Any thread."""
        with self._session_lock:
            if self.session is None:
                self.session = self._open_session()
            return self.session

    def instructed(self) -> Session:
        """The session, for a turn asked now, with the instructions now in force: changed since the
        conversation began (a session.update mid-conversation, as an agent handing over to another
        sends), they come into it here, as a system message before the turn."""
        session = self.opened()
        with self._instructing:
            if self._in_force is None:
                self._in_force = next((text_of(m) for m in reversed(session.messages) if m["role"] == "system"), "")
            with self._items_lock:
                given, self._due = self._due, []
            for at, (users, _, role, text) in enumerate(given):  # the client's own messages first: they came before
                try:
                    if role == "system":
                        session.extend("system", text)
                    else:
                        session.add_exchange(*(_joined(users) if users else ("", None)), text)
                except BaseException:
                    # this one fails the turn (its sentence); those after it wait for the next turn, as they
                    # are still shown (retrieved, deleted), not dropped unsaid; before any a turn asked since
                    with self._items_lock:
                        (self._due if self._due else self._given)[:0] = given[at + 1:]
                    raise
            wanted = self.config.instructions
            if wanted and wanted.strip() and wanted != self._in_force:  # (blank ones: none, as no instructions)
                session.extend("system", wanted)
                self._in_force = wanted
        return session

    def _assistant(self) -> Assistant:
        if self.assistant is None:
            if self.kept is not None and self.kept.turns:  # rebuilt now, while the user speaks: its
                self.opened()  # instructions are the kept ones, and a long conversation takes a while
            complete, longest = wire.EAGERNESS[self.config.eagerness]
            endpointer = EndpointerOptions(hangover_ms=self.config.silence_ms, semantic=self.config.semantic,
                                           complete=complete, max_silence_ms=longest)
            # speech that does not interrupt: a turn heard as a reply runs on is answered after it
            # (Responses asks for it), never started over the reply, which it would cut short
            options = AssistantOptions(uninterruptible=not self.config.interrupt, think=self.think,
                                       answer=self.config.create_response and self.config.interrupt,
                                       generation=GenerationOptions(max_new_tokens=self.config.max_output_tokens),
                                       endpointer=endpointer)
            voice = self.synthesizer if self.config.audio_out else _Mute()
            self.assistant = Assistant(_FirstTurn(self), voice, options)
            self._out.follow(self.assistant)
        return self.assistant

    def _open_session(self) -> Session:
        """The conversation's session: a new one, or (kept) the live one, or one rebuilt from the store."""
        # a kept conversation goes on from its own system prompt (instructions changed since come after it)
        kept = self.kept
        system = (kept.system if kept is not None and kept.turns else self.config.instructions) or None
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
