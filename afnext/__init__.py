"""AF-Next voice assistant library: audio in → sessions on the model → streamed, spoken replies.

Data flows audio → clip → prompt → session → engine (scheduler, batched steps) → think; see DESIGN.md
in the project notes.

The names below load on first use: a client of a remote server (`python -m app.desktop --server`)
imports `afnext.events` and `afnext.audio` without pulling in torch or transformers.
"""

import importlib
import sys

_EXPORTS = {
    "audio": ("SAMPLE_RATE", "AudioError"),
    "conversation": ("Conversation",),
    "engine": ("Engine",),
    "events": ("AudioChunk", "Error", "Interrupted", "PartProgress", "ReasoningDelta", "Reply", "TextDelta",
               "ThinkStep", "Timings", "TurnDone"),
    "media": ("load_audio",),
    "model": ("LoadedModel", "ModelLoadError", "load", "load_or_demo"),
    "parts": ("PartOptions", "PartedSession"),
    "sampling": ("GenerationOptions",),
    "session": ("PENDING", "ContextFullError", "Session"),
    "think": ("ThinkParser", "split_think"),
}
_HOME = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = list(_HOME)


# The import names of requirements.txt: a command that finds one missing was run outside the set-up.
REQUIRED = frozenset({"torch", "transformers", "numpy", "av", "soxr", "soundfile", "sounddevice", "onnxruntime",
                      "silero_vad", "webrtcvad", "espeakng_loader", "gradio", "websockets"})


def say_missing_setup() -> None:
    """For a command (`python -m afnext.vad`, `python -m app.desktop`, …): a requirement missing at any
    import ends it with the sentence saying how to set up, not a traceback; anything else is as before.
    Each command imports only what it needs (a remote desktop client runs without torch)."""
    previous = sys.excepthook

    def hook(kind, exc, tb):
        name = (getattr(exc, "name", None) or "").split(".")[0]
        if isinstance(exc, ModuleNotFoundError) and name in REQUIRED:
            print(_missing(name), file=sys.stderr)
            return
        previous(kind, exc, tb)

    sys.excepthook = hook


if sys.argv[:1] == ["-m"]:  # `python -m afnext.X` (or app.X) is starting: Python names it "-m" until it runs
    say_missing_setup()


def check_setup() -> None:
    """Say how to get numpy, torch and transformers if one is missing (entry points that run the model
    call this before importing it), instead of a bare ModuleNotFoundError."""
    import importlib.util

    for name in ("numpy", "torch", "transformers"):
        try:
            found = name in sys.modules and sys.modules[name] is not None or importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            raise ModuleNotFoundError(_missing(name), name=name)


def _missing(name: str) -> str:
    return (f"{name} is not installed in this Python ({sys.executable}); run `bash scripts/setup.sh`, then "
            "`source .venv/bin/activate` (or call .venv/bin/python).")


def __getattr__(name: str):
    module = _HOME.get(name)
    if module is None:
        raise AttributeError(f"module 'afnext' has no attribute {name!r}")
    try:
        value = getattr(importlib.import_module(f".{module}", __name__), name)
    except ModuleNotFoundError as missing:  # the set-up was skipped: say how to get it
        if missing.name not in ("numpy", "torch", "transformers"):
            raise
        raise ModuleNotFoundError(_missing(missing.name), name=missing.name) from None
    globals()[name] = value
    return value
