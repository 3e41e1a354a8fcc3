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
    # A recording heard in parts: the 1-based part the step came from (its times are then in the
    # whole recording: the part's offset plus the model's time in the part); None when heard whole.
    part: int | None = None


@dataclass(frozen=True)
class PartProgress:
    """How far a turn about a recording heard in parts has got (afnext/parts.py)."""

    stage: str  # "read" (decoded and cut) | "listening" | "answered" | "merging"
    part: int  # 1-based part this is about; 0 with "merging"
    parts: int | None  # how many parts there are (None while a recording of unstated length is read)
    start_s: float = 0.0  # the part's place in the whole recording, seconds
    end_s: float = 0.0
    text: str = ""  # "answered": the part's answer, its times made absolute
    turn: int = 0

    @property
    def message(self) -> str:
        """One line for a status bar: "Listening to part 2 of 4 (25:03–50:10)…"."""
        of = f" of {self.parts}" if self.parts else ""
        where = f" ({clock(self.start_s)}–{clock(self.end_s)})"
        return {"read": f"Read part {self.part}{of}{where}.",
                "listening": f"Listening to part {self.part}{of}{where}…",
                "answered": f"Part {self.part}{of} answered.",
                "merging": (f"Putting the {self.parts} parts' answers together…" if (self.parts or 0) > 1
                            else "Putting the answer together…")}[self.stage]


def clock(seconds: float) -> str:
    """m:ss, or h:mm:ss from an hour on: the second a moment falls in, as a media player (and the
    page's waveform) shows it, so a 10.6 s recording is 0:10 in the chat and under its waveform."""
    minutes, rest = divmod(int(max(seconds, 0.0)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{rest:02d}" if hours else f"{minutes}:{rest:02d}"


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
class PartsUsage:
    """What the parts of a recording heard in parts read and wrote for one turn, beside its merge."""

    prompt_tokens: int  # every part's prompt: its question, and on a first turn its 30 minutes of audio
    cached_tokens: int  # of those, already in the parts' KV caches (a follow-up's recording)
    completion_tokens: int  # every part's answer


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
    parts: PartsUsage | None = None  # about a recording heard in parts: what its parts read and wrote
    messages: int = 0  # messages the conversation held once this reply was in it (`rewrite_reply(messages=)`)


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
class ReplyAsked:
    """A reply was asked for with no new user turn (`Assistant.respond`): the assistant speaks first, or
    goes on. It stands where a UserTurn would, before the reply's events."""

    t: float  # seconds on the microphone timeline when it was asked
    tag: object = None  # what the caller named it


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
