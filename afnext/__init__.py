"""AF-Next voice assistant library: audio in → sessions on the model → streamed, spoken replies.

Data flows audio → clip → prompt → session → engine (scheduler, batched steps) → think; see DESIGN.md
in the project notes.
"""

try:  # the one import that needs the set-up: say how to get it instead of a bare ModuleNotFoundError
    import numpy  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
except ModuleNotFoundError as missing:
    raise ModuleNotFoundError(
        f"{missing.name} is not installed in this Python ({__import__('sys').executable}); run "
        "`bash scripts/setup.sh`, then `source .venv/bin/activate` (or call .venv/bin/python).",
        name=missing.name) from None

from .audio import SAMPLE_RATE, AudioError, load_audio
from .engine import Engine
from .events import AudioChunk, Error, Interrupted, ReasoningDelta, Reply, TextDelta, ThinkStep, Timings, TurnDone
from .model import LoadedModel, ModelLoadError, load, load_or_demo
from .sampling import GenerationOptions
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
