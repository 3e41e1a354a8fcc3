"""OpenAI's Realtime protocol on the wire: the client events we take, parsed strictly, and the server
events we send, built in one place.

The subset voice clients use (the openai SDK, Pipecat, LiveKit): GA event names, with the beta
session shape accepted too (`modalities`, `input_audio_format`, `turn_detection` at the top level,
`max_response_output_tokens`). Audio is pcm16 mono at 24 kHz both ways, base64 in JSON.
"""

from __future__ import annotations

import base64
import binascii
import uuid
from dataclasses import asdict, dataclass, replace

import numpy as np

from afnext import strict_json

ROUTE = "/v1/realtime"
AUDIO_RATE = 24_000  # Hz of pcm16 in and out, as OpenAI's Realtime API speaks
CLIENT_EVENTS = ("session.update", "input_audio_buffer.append", "input_audio_buffer.commit",
                 "input_audio_buffer.clear", "conversation.item.create", "conversation.item.truncate",
                 "conversation.item.retrieve", "conversation.item.delete", "response.create", "response.cancel")
MAX_OUTPUT_TOKENS = 4096  # a spoken reply; the Think card's limit
DEFAULT_OUTPUT_TOKENS = 256  # spoken replies stay short (the voice loop's default)
THINK_OUTPUT_TOKENS = 1024  # the Think model reasons before it answers: a longer default reply


class ProtocolError(ValueError):
    """A client event we cannot take: answered with an `error` event, the session goes on."""

    def __init__(self, message: str, code: str = "invalid_request_error", event_id: str | None = None) -> None:
        super().__init__(message)
        self.code, self.event_id = code, event_id


@dataclass(frozen=True)
class Config:
    """The session as the client configured it."""

    instructions: str | None = None  # the system prompt (before the first turn only)
    server_vad: bool = True  # turns end on silence (our endpointer); False: the client commits them
    silence_ms: int = 600  # silence that ends a turn (the endpointer's hangover)
    semantic: bool = False  # semantic_vad: Smart Turn decides in pauses whether the speaker has finished
    eagerness: str = "auto"  # semantic_vad: low (waits longer) | medium | high (ends sooner) | auto (medium)
    interrupt: bool = True  # speech while the reply plays cancels it (barge-in)
    create_response: bool = True  # a turn the server VAD ends is answered; False: it waits for response.create
    audio_out: bool = True  # speak replies (with their transcript); False: text only
    max_output_tokens: int = DEFAULT_OUTPUT_TOKENS

    @classmethod
    def for_model(cls, model: str) -> Config:
        """A new session's config on `model` (instruct or think)."""
        return cls(max_output_tokens=THINK_OUTPUT_TOKENS if model == "think" else DEFAULT_OUTPUT_TOKENS)

    def describe(self, model: str) -> dict:
        """The GA `session` object for session.created/updated."""
        return {"type": "realtime", "object": "realtime.session", "model": model, **self.settings(),
                "instructions": self.instructions or ""}

    def settings(self) -> dict:
        """The `session` of a session.update that asks for this config (instructions only when set)."""
        detection = None
        if self.server_vad:
            kind = ({"type": "semantic_vad", "eagerness": self.eagerness} if self.semantic else
                    {"type": "server_vad", "silence_duration_ms": self.silence_ms})
            detection = {**kind, "create_response": self.create_response, "interrupt_response": self.interrupt}
        pcm = {"type": "audio/pcm", "rate": AUDIO_RATE}
        return {"type": "realtime", "output_modalities": ["audio"] if self.audio_out else ["text"],
                **({"instructions": self.instructions} if self.instructions is not None else {}),
                "max_output_tokens": self.max_output_tokens,
                "audio": {"input": {"format": pcm, "turn_detection": detection},
                          "output": {"format": pcm, "voice": "default"}}}


def parse(text: str | bytes) -> dict:
    """A client event: a JSON object with a known `type`, or ProtocolError."""
    if isinstance(text, bytes):
        raise ProtocolError("Send Realtime events as JSON text messages.")
    event = _typed_object(text, "The message is not valid JSON.", "A client event must be a JSON object with a \"type\".")
    if event["type"] not in CLIENT_EVENTS:
        raise ProtocolError(f"Unknown or unsupported client event type {event['type'][:60]!r}.",
                            event_id=client_event_id(event))
    return event


def updated(config: Config, session: object) -> Config:
    """`config` changed by a session.update's `session` (GA or beta shape); ProtocolError for what we
    cannot do, naming it."""
    if not isinstance(session, dict):
        raise ProtocolError("session.update needs a \"session\" object.")
    changes: dict = {}
    if session.get("type", "realtime") != "realtime":
        raise ProtocolError("This server holds conversations (session type \"realtime\"), not transcription sessions.")
    if session.get("tools"):
        raise ProtocolError("This server's models call no tools; send session.update without tools.")
    if session.get("tool_choice", "auto") not in ("auto", "none"):
        raise ProtocolError("This server's models call no tools; tool_choice can only be auto or none.")
    if "instructions" in session:
        changes["instructions"] = _text(session["instructions"], "instructions")
    modalities = session.get("output_modalities", session.get("modalities"))
    if modalities is not None:
        if (not isinstance(modalities, list) or not modalities or not all(isinstance(m, str) for m in modalities)
                or not set(modalities) <= {"text", "audio"}):
            raise ProtocolError("output_modalities must be [\"text\"] or [\"audio\"].")
        changes["audio_out"] = "audio" in modalities
    audio = session.get("audio") if isinstance(session.get("audio"), dict) else {}
    given = audio.get("input", {}) if isinstance(audio.get("input"), dict) else {}
    _check_format(given.get("format", session.get("input_audio_format")))
    output = audio.get("output") if isinstance(audio.get("output"), dict) else {}
    _check_format(output.get("format", session.get("output_audio_format")))
    if "turn_detection" in given or "turn_detection" in session:
        changes.update(_detection(given["turn_detection"] if "turn_detection" in given else session["turn_detection"]))
    tokens = session.get("max_output_tokens", session.get("max_response_output_tokens"))
    if tokens is not None:
        changes["max_output_tokens"] = MAX_OUTPUT_TOKENS if tokens == "inf" else _whole(tokens, "max_output_tokens")
    return replace(config, **changes)


def check_response(config: Config, response: object) -> int | None:
    """A response.create's own `response` settings: its max_output_tokens, if it sets them (None: the
    session's); ProtocolError for any other setting that would differ from the session's (its metadata
    is `response_metadata`'s)."""
    if response is None:
        return None
    if not isinstance(response, dict):
        raise ProtocolError("response.create's \"response\" must be an object.")
    for key in ("input", "tools", "prompt"):
        if response.get(key):
            raise ProtocolError(f"response.create takes no {key} of its own here; set them for the session, or "
                                "add the turn as a conversation item.")
    if response.get("conversation", "auto") != "auto":
        raise ProtocolError("Every response here is part of the conversation; conversation can only be auto.")
    modalities = response.get("output_modalities", response.get("modalities"))
    if modalities is not None and (not isinstance(modalities, list) or ("audio" in modalities) != config.audio_out):
        raise ProtocolError("A response's output_modalities are the session's; change them with session.update.")
    audio = response.get("audio") if isinstance(response.get("audio"), dict) else {}
    output = audio.get("output") if isinstance(audio.get("output"), dict) else {}
    _check_format(output.get("format", response.get("output_audio_format")))
    tokens = response.get("max_output_tokens", response.get("max_response_output_tokens"))
    if tokens is None:
        return None
    return MAX_OUTPUT_TOKENS if tokens == "inf" else _whole(tokens, "max_output_tokens")


def response_instructions(response: object) -> str | None:
    """A response.create's own `instructions`: for that response alone (the session's stay as they are,
    and the conversation does not keep these); None when it sets none."""
    instructions = response.get("instructions") if isinstance(response, dict) else None
    if instructions is None or isinstance(instructions, str) and not instructions.strip():
        return None  # blank: none (a system message of spaces would only cost tokens)
    return _text(instructions, "A response's instructions")


MAX_METADATA_KEYS = 16  # a response's metadata, as OpenAI takes it: 16 pairs of short strings
MAX_METADATA_KEY_CHARS, MAX_METADATA_VALUE_CHARS = 64, 512


def response_metadata(response: object) -> dict | None:
    """A response.create's own `metadata`, given back on its response.created and response.done (LiveKit
    finds the response its generate_reply asked for by the `client_event_id` in it); ProtocolError for
    anything but up to 16 pairs of short strings."""
    metadata = response.get("metadata") if isinstance(response, dict) else None
    if metadata is None:
        return None
    if not (isinstance(metadata, dict) and len(metadata) <= MAX_METADATA_KEYS and all(
            isinstance(k, str) and isinstance(v, str) and len(k) <= MAX_METADATA_KEY_CHARS
            and len(v) <= MAX_METADATA_VALUE_CHARS for k, v in metadata.items())):
        raise ProtocolError(f"A response's metadata must map at most {MAX_METADATA_KEYS} keys of up to "
                            f"{MAX_METADATA_KEY_CHARS} characters to strings of up to {MAX_METADATA_VALUE_CHARS}.")
    return dict(metadata)


def _detection(value: object) -> dict:
    if value is None:
        return {"server_vad": False}
    if not isinstance(value, dict) or value.get("type") not in ("server_vad", "semantic_vad"):
        raise ProtocolError("turn_detection must be null, server_vad or semantic_vad.")
    silence = value.get("silence_duration_ms", 600)
    semantic = value["type"] == "semantic_vad"
    eagerness = value.get("eagerness", "auto") if semantic else "auto"
    if not isinstance(eagerness, str) or eagerness not in EAGERNESS:
        raise ProtocolError("eagerness must be low, medium, high or auto.")
    return {"server_vad": True, "interrupt": value.get("interrupt_response", True) is not False,
            "create_response": value.get("create_response", True) is not False,
            "silence_ms": _whole(silence, "silence_duration_ms", low=100, high=5000),
            "semantic": semantic, "eagerness": eagerness}


# semantic_vad's eagerness → (Smart Turn's probability that ends a turn, the longest silence waited for).
EAGERNESS = {"low": (0.7, 3000), "medium": (0.5, 2000), "auto": (0.5, 2000), "high": (0.3, 1000)}


def _check_format(value: object) -> None:
    if value is None or value == "pcm16":
        return
    if isinstance(value, dict) and value.get("type") == "audio/pcm" and value.get("rate", AUDIO_RATE) == AUDIO_RATE:
        return
    raise ProtocolError(f"Only pcm16 at {AUDIO_RATE} Hz ({{\"type\": \"audio/pcm\", \"rate\": {AUDIO_RATE}}}) "
                        "is supported.", code="unsupported_format")


def _text(value: object, name: str, limit: int = 32_000) -> str:
    if not isinstance(value, str) or len(value) > limit:
        raise ProtocolError(f"{name} must be text of at most {limit:,} characters.")
    return value


def _whole(value: object, name: str, low: int = 1, high: int = MAX_OUTPUT_TOKENS) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ProtocolError(f"{name} must be a whole number from {low} to {high}.")
    return value


def pcm16(b64: object) -> np.ndarray:
    """Base64 pcm16 → int16 samples; ProtocolError for anything else."""
    if not isinstance(b64, str):
        raise ProtocolError("audio must be a base64 string of pcm16 samples.")
    try:
        data = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError("audio is not valid base64.") from None
    if len(data) % 2:  # a cut mid-sample would shift every later sample by a byte: noise, not speech
        raise ProtocolError(f"audio must hold whole 16-bit samples; {len(data):,} bytes is an odd count.")
    return np.frombuffer(data, np.int16)


def b64_pcm16(samples: np.ndarray) -> str:
    """float32 in [-1, 1] (or int16 as it is) → base64 pcm16."""
    pcm = samples if samples.dtype == np.int16 else (np.clip(samples, -1, 1) * 32767)
    return base64.b64encode(pcm.astype("<i2").tobytes()).decode()


# ---- what a client sends (app/remote.py; the page's talk.js speaks the same in JavaScript) ----

def session_update(config: Config) -> dict:
    return event("session.update", session=config.settings())


def append(samples: np.ndarray) -> dict:
    """input_audio_buffer.append of 24 kHz samples (float in [-1, 1] or int16)."""
    return event("input_audio_buffer.append", audio=b64_pcm16(samples))


def truncate(item_id: str, audio_end_ms: int) -> dict:
    return event("conversation.item.truncate", item_id=item_id, content_index=0, audio_end_ms=audio_end_ms)


def server_event(text: str | bytes) -> dict:
    """A server event as a client reads it: a JSON object with a string `type`, or ProtocolError."""
    return _typed_object(text, "The server sent a message that is not JSON.",
                         "The server sent a message that is not a Realtime event.")


def _typed_object(text: str | bytes, not_json: str, untyped: str) -> dict:
    """An event either way: strict JSON, an object with a string `type`; ProtocolError with the sentence."""
    try:
        value = strict_json.loads(text)
    except (ValueError, RecursionError):
        raise ProtocolError(not_json) from None
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise ProtocolError(untyped)
    return value


MAX_ID_CHARS = 32  # a client's own item ids, as OpenAI takes them


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:20]}"


def event(kind: str, **fields) -> dict:
    """A server event with its own id."""
    return {"type": kind, "event_id": new_id("event"), **fields}


def error(exc: ProtocolError) -> dict:
    kind = "server_error" if exc.code == "server_error" else "invalid_request_error"  # ours, or the client's
    return event("error", error={"type": kind, "code": exc.code, "message": str(exc), "param": None,
                                 "event_id": exc.event_id})


@dataclass(frozen=True)
class Item:
    """A conversation item as the protocol shows it."""

    id: str
    role: str  # "user" | "assistant"
    content: list  # [{"type": "input_audio" | "input_text" | "output_audio" | "output_text", ...}]
    status: str = "completed"

    def shown(self) -> dict:
        return {"type": "message", "object": "realtime.item", **asdict(self)}


def user_item(item: dict) -> tuple[str, np.ndarray | None]:
    """A conversation.item.create's user message → (text, 24 kHz pcm16 or None)."""
    if not isinstance(item, dict) or item.get("type") != "message" or item.get("role") not in ("user", "assistant",
                                                                                                 "system"):
        raise ProtocolError("conversation.item.create takes messages of the user, the assistant or the system.")
    if "id" in item and not (isinstance(item["id"], str) and 0 < len(item["id"]) <= MAX_ID_CHARS):
        raise ProtocolError(f"An item's id must be a string of 1 to {MAX_ID_CHARS} characters.")
    parts = item.get("content")
    if not isinstance(parts, list) or not parts:
        raise ProtocolError("A user message needs content: input_text and/or input_audio parts.")
    texts = [_text(p.get("text"), "input_text") for p in parts if isinstance(p, dict) and p.get("type") == "input_text"]
    audio = [pcm16(p.get("audio")) for p in parts if isinstance(p, dict) and p.get("type") == "input_audio"]
    if len(texts) + len(audio) != len(parts) or len(audio) > 1:
        raise ProtocolError("A user message holds input_text parts and at most one input_audio part.")
    if any(not len(a) for a in audio) or not (audio or any(t.strip() for t in texts)):
        raise ProtocolError("A user message needs words or audio; this one is empty.")  # nothing to answer
    return "\n".join(texts), (audio[0] if audio else None)


# What an assistant or a system message a client creates may hold: its words (an assistant's spoken
# reply by its transcript: the model hears replies as text).
GIVEN_PARTS = {"assistant": {"output_text": "text", "text": "text", "output_audio": "transcript", "audio": "transcript"},
               "system": {"input_text": "text"}}


def given_item(item: dict) -> tuple[str, str]:
    """A conversation.item.create's assistant or system message (the client's own history, or
    instructions where they stand) → (role, text); ProtocolError for anything else."""
    role = item.get("role") if isinstance(item, dict) else None
    if role not in GIVEN_PARTS or item.get("type") != "message":
        raise ProtocolError("conversation.item.create takes messages of the user, the assistant or the system.")
    if "id" in item and not (isinstance(item["id"], str) and 0 < len(item["id"]) <= MAX_ID_CHARS):
        raise ProtocolError(f"An item's id must be a string of 1 to {MAX_ID_CHARS} characters.")
    parts, kinds, named = item.get("content"), GIVEN_PARTS[role], "An assistant" if role == "assistant" else "A system"
    if not isinstance(parts, list) or not parts or not all(isinstance(p, dict) and p.get("type") in kinds for p in parts):
        raise ProtocolError(f"{named} message holds {', '.join(kinds)} parts only.")
    texts = [_text(p.get(kinds[p["type"]]), f"{named} message's {kinds[p['type']]}") for p in parts]
    if not "".join(texts).strip():
        raise ProtocolError(f"{named} message needs words; this one has none (an audio reply goes by its transcript).")
    return role, "\n".join(texts)


def client_event_id(event: dict) -> str | None:
    """The client's own id of `event`, which an `error` about it names (cut to 80 characters)."""
    value = event.get("event_id")
    return value[:80] if isinstance(value, str) else None

