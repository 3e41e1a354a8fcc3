"""Events that flow from the model towards the shells.

Every producer in afnext is a generator of these small frozen dataclasses. Reasoning and
answer text are different types on purpose: only `TextDelta` may ever reach a synthesizer.
"""

from __future__ import annotations

import queue
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class TextDelta:
    """A piece of the answer: text meant for the user, safe to speak."""

    text: str
    turn: int = 0  # the turn it belongs to (0: not from a session turn); stale turns' events are dropped


@dataclass(frozen=True)
class ReasoningDelta:
    """A piece of the model's reasoning (Think mode): shown, never spoken."""

    text: str
    turn: int = 0


@dataclass(frozen=True)
class ThinkStep:
    """One timestamped step of reasoning, located on the clip it talks about."""

    start: float  # seconds from the start of the clip, clamped to the clip
    end: float | None  # seconds, or None when the text names a single moment
    text: str  # the sentence of reasoning that mentions the time
    turn: int = 0


@dataclass(frozen=True)
class AudioChunk:
    """Synthesized speech, ready to play."""

    sample_rate: int  # Hz
    samples: np.ndarray = field(repr=False)  # float32 mono in [-1, 1]


@dataclass(frozen=True)
class Interrupted:
    """The turn was cancelled (barge-in, closed stream, or a cancel event)."""

    reason: str = "cancelled"
    turn: int = 0


@dataclass(frozen=True)
class Error:
    """A failure the user caused or must know about, in one sentence."""

    message: str


@dataclass(frozen=True)
class Timings:
    """Where one turn's time went, in seconds unless the name says otherwise."""

    audio_s: float = 0.0  # decoding, resampling and featurizing this turn's clip (0 without one)
    encode_s: float = 0.0  # audio encoder + rotary time embedding + projector
    prefill_s: float = 0.0  # running this turn's new tokens into the KV cache
    ttft_s: float = 0.0  # from the request to the first generated token
    decode_tok_s: float = 0.0  # tokens per second after the first
    new_tokens: int = 0  # tokens generated


@dataclass(frozen=True)
class Reply:
    """One finished assistant turn."""

    text: str  # everything the model wrote, reasoning included
    reasoning: str  # the part inside <think>…</think> (Think mode), else ""
    answer: str  # the part meant for the user
    steps: tuple[ThinkStep, ...]  # timestamped steps found in the reasoning
    token_ids: tuple[int, ...]  # generated ids, without the closing <|im_end|>
    prompt_tokens: int  # conversation tokens the reply was generated after
    timings: Timings
    interrupted: bool = False  # cancelled before the model finished


@dataclass(frozen=True)
class TurnDone:
    """The turn is over; `reply` holds all of it."""

    reply: Reply
    turn: int = 0


# ---- the voice loop's events (afnext.assistant emits them; a remote client rebuilds them) ----


@dataclass(frozen=True)
class UserTurn:
    """The user finished speaking; their utterance becomes the next turn."""

    t: float  # seconds on the microphone timeline when the end of turn was decided
    start: float  # speech onset, seconds
    end: float  # end of speech, seconds
    audio: np.ndarray = field(repr=False)  # float32 mono 16 kHz, with pre-roll
    answered: bool = True  # False: heard and kept, to be answered when asked (AssistantOptions.answer)
    tag: object = None  # what the caller named a turn it gave with `Assistant.say`


@dataclass(frozen=True)
class StateChanged:
    """listening → thinking → speaking → listening."""

    t: float
    state: str  # "listening" | "thinking" | "speaking"


@dataclass(frozen=True)
class VoiceTimings:
    endpoint_s: float | None  # end of speech → end-of-turn decision (mostly the endpointer's hangover)
    ttft_s: float | None  # decision → first reply text
    first_audio_s: float | None  # decision → first reply audio


@dataclass(frozen=True)
class VoiceTurnDone:
    t: float
    timings: VoiceTimings
    reply: object | None  # the session's Reply (None if the turn never started)


@dataclass(frozen=True)
class Stamped:
    """An event from the turn (TextDelta, AudioChunk, …) with its time on the microphone timeline."""

    t: float
    event: object


END_OF_EVENTS = object()  # put on an event queue by its producer when it is done


def drain(events: queue.Queue, timeout: float | None = None) -> Iterator[object]:
    """A producer's queued events as they come; ends at END_OF_EVENTS (left in place, so later
    readers end too) or after `timeout` seconds without one (None: wait for ever)."""
    while True:
        try:
            event = events.get(timeout=timeout)
        except queue.Empty:
            return
        if event is END_OF_EVENTS:
            events.put(END_OF_EVENTS)
            return
        yield event
