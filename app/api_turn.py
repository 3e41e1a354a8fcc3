"""A chat request in afnext terms: the model it names (`Target`) and the turn it asks (`Turn`).

Each request, parsed once (app/openai_wire.py), is translated here: the messages before the last user
turn are the history, which the engine's `SessionPool` finds in a kept session (only the new turn is
prefilled; `usage.prompt_tokens_details.cached_tokens` says how much was not), and the last user turn
is asked on it. Its mistakes are refused here as OpenAI's error shape (400), before the engine sees it.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from afnext.audio import AudioTooLong
from afnext.clip import prepare_clip
from afnext.engine import Engine
from afnext import split
from afnext.pool import Message, SessionPool, audio_key
from afnext.sampling import GenerationOptions
from app import openai_wire as wire

MAX_CLIPS = 32  # audio clips in one request: 131,072 tokens of context hold about 87 minutes of audio anyway
MAX_SPOKEN = 4096  # spoken replies whose transcripts are kept for their `audio.id` (a few MB of text at most)
# The API's names of the sampling options GenerationOptions checks (its errors name its own fields).
OPTION_PARAMS = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens", "temperature": "temperature",
                 "top_p": "top_p", "repetition_penalty": "repetition_penalty", "seed": "seed"}


class SpokenReplies:
    """The transcripts of spoken replies by their `audio.id`, for `expires_at` (an hour) and MAX_SPOKEN
    at most: OpenAI's clients send a spoken reply back as `{"role": "assistant", "audio": {"id"}}`, and
    the model must hear that turn as the words it said (and the kept session must be found by them)."""

    def __init__(self, limit: int = MAX_SPOKEN) -> None:
        self.limit, self._kept, self._lock = limit, OrderedDict(), threading.Lock()

    def keep(self, audio_id: str, transcript: str) -> None:
        with self._lock:
            self._kept[audio_id] = (time.monotonic() + wire.AUDIO_KEPT_S, transcript)
            while len(self._kept) > self.limit:
                self._kept.popitem(last=False)

    def transcript(self, audio_id: str) -> str | None:
        with self._lock:
            expires, text = self._kept.get(audio_id, (0.0, None))
            return text if time.monotonic() < expires else None


SPOKEN = SpokenReplies()  # this process's spoken replies (a replica's own: `x-session-id` pins a conversation)


@dataclass(frozen=True)
class Target:
    """What a model id names: an engine, its kept sessions, whether it reasons by default."""

    name: str
    engine: Engine
    pools: tuple[SessionPool, SessionPool]  # kept sessions of plain turns, and of Think turns
    think: bool
    synthesizer: object  # the voice, for replies asked for with audio


@dataclass
class Turn:
    """A request in afnext terms."""

    history: list[Message]
    asked: Message
    options: GenerationOptions
    think: bool
    stops: list[str]
    audio: wire.AudioOut | None  # speak the reply too, in this format


def turn_of(body: wire.ChatRequest, target: Target) -> Turn:
    """The request's messages and options in afnext terms (decodes the audio: run off the event loop)."""
    if body.n != 1:
        raise wire.WireError(400, "n must be 1: one reply per request.", param="n")
    if (refused := body.refused()) is not None:
        raise wire.WireError(400, refused[1], param=refused[0])
    audio = _audio_out(body)
    clips = sum(1 for m in body.messages if isinstance(m.content, list)
                for p in m.content if not isinstance(p, wire.TextPart))
    if clips > MAX_CLIPS:
        raise wire.WireError(400, f"The request holds {clips} audio clips; the limit is {MAX_CLIPS}.",
                             param="messages")
    last = len(body.messages) - 1
    messages = [_message(m, i, target.engine, now=i == last) for i, m in enumerate(body.messages)]
    if messages[-1].role != "user":
        raise wire.WireError(400, "The last message must be the user's.", param="messages")
    think = target.think if body.think is None else body.think
    return Turn(messages[:-1], messages[-1], _options(body), think, body.stops(), audio)


def _options(body: wire.ChatRequest) -> GenerationOptions:
    """The request's sampling options, or a 400 naming the field the sampler cannot use."""
    limit = body.max_completion_tokens or body.max_tokens or GenerationOptions().max_new_tokens
    # top_p 0 keeps no mass but the likeliest token (OpenAI allows it): greedy decoding.
    greedy = body.temperature is None or body.top_p == 0
    try:
        return GenerationOptions(
            max_new_tokens=limit, min_new_tokens=limit if body.ignore_eos else min(body.min_tokens, limit),
            temperature=0.0 if greedy else body.temperature, top_p=1.0 if greedy or body.top_p is None else body.top_p,
            repetition_penalty=body.repetition_penalty,
            seed=None if body.seed is None else body.seed % 2**64)  # a negative int64 seed: still its own seed
    except ValueError as exc:
        name = str(exc).split(" ", 1)[0]
        raise wire.WireError(400, str(exc).replace(name, OPTION_PARAMS.get(name, name), 1),
                             param=OPTION_PARAMS.get(name)) from None


def _audio_out(body: wire.ChatRequest) -> wire.AudioOut | None:
    """How the reply is to be spoken, if at all; streamed speech is pcm16, as OpenAI streams it."""
    if "audio" not in (body.modalities or []):
        return None
    audio = body.audio or wire.AudioOut(format="pcm16" if body.stream else "wav")
    if body.stream and audio.format != "pcm16":
        raise wire.WireError(400, "Streamed audio output is pcm16 (24 kHz); set audio.format to pcm16, or do not "
                                  "stream.", param="audio.format")
    return audio


def _message(message: wire.ChatMessage, index: int, engine: Engine, now: bool) -> Message:
    """A request's message in afnext terms. A clip is keyed by its base64 text and decoded `now` (the
    new turn) or only if no kept session holds it already: a follow-up resending a 30-minute
    recording would otherwise pay its decoding and features again (measured 1.5 s of a 1.65 s TTFT)."""
    role = "system" if message.role == "developer" else message.role
    parts = [wire.TextPart(type="text", text=message.content)] if isinstance(message.content, str) else (message.content or [])
    text = "\n".join(p.text for p in parts if isinstance(p, wire.TextPart))
    if role == "assistant" and not text and message.audio is not None:  # a spoken reply, named by its id
        text = SPOKEN.transcript(message.audio.id)
        if text is None:
            raise wire.WireError(400, f"messages.{index}.audio.id {message.audio.id[:60]!r} names no spoken reply of "
                                      "this server's last hour; send the reply's transcript as content instead.",
                                 param=f"messages.{index}.audio.id")
    audio = [p for p in parts if not isinstance(p, wire.TextPart)]
    if len(audio) > 1:
        raise wire.WireError(400, f"messages.{index}: one audio clip per message; send the next one in another "
                                  "user message.", param=f"messages.{index}.content")
    if audio and role != "user":
        raise wire.WireError(400, f"messages.{index}: only user messages may hold audio.",
                             param=f"messages.{index}.content")
    if not audio:
        return Message(role, text)
    data = wire.audio_base64(audio[0])
    loaded = engine.loaded

    def clip():
        return prepare_clip(wire.decode_base64(data), loaded.mel_filters, max_seconds=loaded.max_audio_s)

    def recording():  # the bytes of a clip over the limit (heard in parts), else None
        raw = wire.decode_base64(data)
        return raw if split.longer_than(raw, loaded.max_audio_s) else None

    key = audio_key(data.encode("ascii", "replace"))
    if not now:
        return Message(role, text, None, key, clip, recording)
    raw = wire.decode_base64(data)
    try:
        made = prepare_clip(raw, loaded.mel_filters, max_seconds=loaded.max_audio_s)
    except AudioTooLong:  # over the limit: heard in parts. Known without decoding it again (an MP3 that
        # states no length was decoded up to the limit already); over 4 hours by its header is refused now.
        split.split_recording(raw).close()
        return Message(role, text, None, key, clip, lambda: raw)
    return Message(role, text, made, key, clip, lambda: None)
