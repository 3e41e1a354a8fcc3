"""AF-Next voice assistant library: audio in → sessions on the model → streamed, spoken replies.

Data flows audio → engine/session → think; see DESIGN.md in the project notes.
"""

from .audio import SAMPLE_RATE, AudioError, load_audio
from .engine import Engine, GenerationOptions
from .events import AudioChunk, Error, Interrupted, ReasoningDelta, Reply, TextDelta, ThinkStep, Timings, TurnDone
from .model import LoadedModel, ModelLoadError, load, load_or_demo
from .session import ContextFullError, Session
from .think import ThinkParser, split_think

__all__ = [
    "SAMPLE_RATE", "AudioError", "load_audio",
    "Engine", "GenerationOptions",
    "AudioChunk", "Error", "Interrupted", "ReasoningDelta", "Reply", "TextDelta", "ThinkStep", "Timings", "TurnDone",
    "LoadedModel", "ModelLoadError", "load", "load_or_demo",
    "ContextFullError", "Session",
    "ThinkParser", "split_think",
]
