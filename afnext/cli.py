"""The `afnext` command (installed by `pip install -e .`): one console script, one subcommand per
entry point, and the flags those entry points share.

    afnext serve --model instruct      ≡ python -m app
    afnext ask --model tiny assets/speech.wav "What is said?"   ≡ python -m afnext ask …
    afnext tiny /tmp/tiny              ≡ python -m afnext.tiny /tmp/tiny

Each subcommand hands the rest of the command line, untouched, to the `main(argv)` the matching
`python -m …` runs, so both spellings take the same flags and behave the same; neither is a copy.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass

from .checkpoints import DEFAULT_MODEL
from .tts import ENGINES

MODEL_HELP = "hub id, local folder, or instruct|think|captioner|tiny"
KV_HELP = ("how conversations' KV caches are kept: paged (blocks of one pool: one attention call per layer for "
           "every conversation decoding; the default on CPU) or buffers (one per conversation; the default on a "
           "GPU, where the pool has not run yet)")
DEVICE_HELP = "where the model runs: auto (CUDA when there is one), cpu, cuda, cuda:1 …"


def add_model_flags(parser: argparse.ArgumentParser, *, model_default: str = DEFAULT_MODEL) -> None:
    """--model, --device and --kv: which AF-Next checkpoint to load, where, and how its KV caches are
    kept. The web app keeps its own default, the short name "instruct"; the others default to that
    checkpoint's hub id."""
    parser.add_argument("--model", default=model_default, help=MODEL_HELP)
    parser.add_argument("--device", default="auto", type=device_name, help=DEVICE_HELP)
    parser.add_argument("--kv", choices=("buffers", "paged"), help=KV_HELP)


DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")  # where a model can run; torch also parses meta, hpu, …


def device_name(text: str) -> str:
    """--device: auto, cpu, cuda, cuda:N … (argparse's type). A name torch cannot parse, or a GPU index
    past the ones it sees, is refused here in one line rather than as a traceback from the loader."""
    if text == "auto" or importlib.util.find_spec("torch") is None:  # a remote client has no torch
        return text
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in DEVICE_TYPES:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device; use auto, cpu, cuda or cuda:N")
    index, seen = device.index, torch.cuda.device_count() if torch.cuda.is_available() else None
    if device.type == "cuda" and index is not None and seen is not None and index >= seen:
        raise argparse.ArgumentTypeError(f"{text} was asked for, but PyTorch sees {seen} CUDA GPU(s), from cuda:0")
    return text


KEEP_DAYS = 30.0  # conversations not used for this long are deleted, with the audio only they used


def keep_days(text: str) -> float:
    """--keep-days: a number of days above 0 (argparse's type)."""
    try:
        days = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of days") from None
    if not 0 < days < 1e5:
        raise argparse.ArgumentTypeError("give a number of days above 0")
    return days


def add_turn_flag(parser: argparse.ArgumentParser) -> None:
    """--turn: how the voice loop decides the speaker has finished."""
    parser.add_argument("--turn", default="semantic", choices=("semantic", "silence"),
                        help="end a turn when the speaker sounds finished (semantic: Smart Turn, asked in pauses; "
                             "falls back to silence when it is not installed) or after 600 ms of silence")


def add_tts_flags(parser: argparse.ArgumentParser) -> None:
    """--tts and --tts-model: the voice that speaks the answers."""
    parser.add_argument("--tts", default="espeak", choices=ENGINES,
                        help="speech engine: espeak (default, no weights) or pocket")
    parser.add_argument("--tts-model", default=None,
                        help="espeak voice name, or Pocket TTS checkpoint (hub id or folder)")


@dataclass(frozen=True)
class Command:
    """One subcommand: the module whose main(argv) runs it, and what it does."""

    module: str  # imported only when the command runs: app/ is not the library's to import
    summary: str
    prefix: tuple[str, ...] = ()  # words that module's main expects before the user's (ask, chat)


COMMANDS = {
    "serve": Command("app.__main__", "the web app and its OpenAI-compatible API (python -m app)"),
    "ask": Command("afnext.__main__", "ask one question about one audio file (python -m afnext ask)", ("ask",)),
    "chat": Command("afnext.__main__", "a multi-turn session over JSON lines (python -m afnext chat)", ("chat",)),
    "conversations": Command("afnext.__main__", "list the kept conversations (python -m afnext conversations)",
                             ("conversations",)),
    "voice": Command("afnext.voice", "replay a recording as a microphone through the voice loop (python -m afnext.voice)"),
    "vad": Command("afnext.vad", "print the speech turns of a recording (python -m afnext.vad)"),
    "tts": Command("afnext.tts.__main__", "speak a text to a wav file and time it (python -m afnext.tts)"),
    "tiny": Command("afnext.tiny", "write a random-weight checkpoint, offline, in seconds (python -m afnext.tiny)"),
    "bench": Command("afnext.bench", "benchmark our sessions against stock transformers (python -m afnext.bench)"),
    "desktop": Command("app.desktop", "talk through this computer's microphone and speaker (python -m app.desktop)"),
}


def usage() -> str:
    """The top-level help: every subcommand, one line each."""
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {command.summary}" for name, command in COMMANDS.items()]
    return "\n".join(["usage: afnext COMMAND [ARGS …]", "",
                      "AF-Next voice assistant. Each command has its own flags: afnext COMMAND --help.", "",
                      "commands:", *lines])


def run(main, argv: list[str] | None = None) -> int:
    """Run an entry point's `main(argv)` as a command: Ctrl-C (130) and a reader that went away, as with
    `| head` (141, as a shell reports SIGPIPE), end it with at most one line, never a traceback."""
    try:
        return main(argv) or 0  # afnext.tiny's main returned None on success
    except KeyboardInterrupt:
        print("\nInterrupted.", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return pipe_closed()


def pipe_closed() -> int:
    """stdout's reader is gone: point stdout at /dev/null so that the flush at exit cannot fail again."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # stdout closed or not a real file
        pass
    return 141


def quiet_progress_bars() -> None:
    """No "Loading weights" bars from transformers on stderr: there, a user looks for the one line that matters."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    """Run `afnext COMMAND ARGS…`; the exit status is the command's own."""
    return run(_main, argv)


def _main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # Parsed by hand, not by argparse: `afnext tiny --help` must reach tiny's own parser, and a
    # subparser's argparse.REMAINDER that starts with an option is refused ("unrecognized arguments").
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    command = COMMANDS.get(argv[0])
    if command is None:
        print(f"afnext: error: unknown command {argv[0]!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    entry = importlib.import_module(command.module).main
    return entry([*command.prefix, *argv[1:]]) or 0


if __name__ == "__main__":
    sys.exit(main())
