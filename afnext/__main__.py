"""Command line: `python -m afnext ask …` for one question, `python -m afnext chat --jsonl` for a session.

    python -m afnext ask --model tiny assets/speech.wav "What is said?" [--think]
    echo '{"text": "Hi", "audio": "assets/speech.wav"}' | python -m afnext chat --model tiny --jsonl

chat reads one JSON turn per line, {"text", "audio", "think", "max_new_tokens", "temperature",
"repetition_penalty"} (all optional; a turn needs text or audio), and writes one JSON line per turn:
the reply, or {"error": "…"} (one sentence) after which the session goes on.

    python -m afnext chat --model tiny --jsonl --conversation notes [--store PATH]

keeps the conversation on disk (afnext/store.py): the first line out is {"conversation": ID,
"turns": N}, N completed turns kept already, and the conversation goes on where it was.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sqlite3
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from . import check_setup, strict_json

check_setup()  # before anything imports torch: a missing one is a sentence saying how to get it

try:  # torch and transformers take seconds to import: a Ctrl-C then ends the command like one later does
    from .audio import AudioError, check_path
    from .cli import KEEP_DAYS, add_model_flags, keep_days, pipe_closed, quiet_progress_bars
    from .engine import Engine
    from .events import PartProgress, ReasoningDelta, TextDelta, TurnDone
    from .journal import KeptError
    from .model import LICENCE_NOTE, ModelLoadError, load
    from .conversation import Conversation, open_kept
    from .sampling import GenerationOptions
    from .session import ContextFullError, Session
    from .store import Store, StoreError, check_id
    from .store import default_path as default_store_path
except KeyboardInterrupt:
    if __name__ != "__main__":
        raise
    print("\nInterrupted.", file=sys.stderr)
    sys.exit(130)

log = logging.getLogger("afnext")
OPTION_FIELDS = ("max_new_tokens", "min_new_tokens", "temperature", "repetition_penalty")  # GenerationOptions a line may set
TURN_FIELDS = {"text", "audio", "think", *OPTION_FIELDS}
# bytes of one JSON line: a question at the session's limit with every character \u-escaped (6
# bytes each) fits five times over; a longer line is skipped in pieces, never held in memory whole.
MAX_LINE_BYTES = 1 << 20
MAX_NUMBER_DIGITS = 20  # digits of a JSON integer: 2**64 has 20, and Python refuses 4,300+ in a long message
MAX_KEY_CHARS = 40  # characters of an unknown field's name quoted back in an error
DTYPES = ("auto", "bf16", "bfloat16", "fp16", "float16", "fp32", "float32")  # what model.pick_dtype knows


@dataclass(frozen=True)
class Turn:
    """One `chat --jsonl` line, parsed and checked."""

    text: str = ""  # the question; may be empty when there is audio
    audio: str | None = None  # path of the turn's audio file
    think: bool = False  # reason step by step before answering
    options: GenerationOptions = GenerationOptions()  # max_new_tokens, temperature, repetition_penalty


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "chat" and args.store is not None and args.conversation is None:
        args.chat_parser.error("--store keeps a conversation only with --conversation ID; add one, or leave --store out")
    try:
        return _run(args)
    except KeyboardInterrupt:  # Ctrl-C: a turn in progress stops; the turns answered before are as they were
        print(f"\n{_interrupted(args)}", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `| head`: nobody reads any more (with --conversation, what was printed is kept)
        return pipe_closed()


def _run(args: argparse.Namespace) -> int:
    if args.command == "conversations":
        return conversations(args)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:  # what the user typed is checked before the model loads (a real one takes a minute)
        _check_args(args)
    except (AudioError, StoreError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if not args.verbose:
        quiet_progress_bars()
    try:
        loaded = load(args.model, device=args.device, dtype=args.dtype)
    except ModelLoadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    _notice(loaded)
    engine = Engine(loaded, kv=args.kv)
    try:
        return ask(engine, args) if args.command == "ask" else chat(engine, args)
    finally:
        engine.close()


def _check_args(args: argparse.Namespace) -> None:
    """Raise AudioError, StoreError or ValueError (one sentence) for an argument that cannot work."""
    if args.command == "ask":
        check_path(args.audio)
        GenerationOptions(max_new_tokens=args.max_new_tokens, temperature=args.temperature)
        return
    if sys.stdin is None:  # started with stdin closed (`<&-`): there is nothing to read turns from
        raise ValueError("Standard input is closed; send one JSON turn per line on it.")
    if args.conversation is not None:
        check_id(args.conversation)


def _interrupted(args: argparse.Namespace) -> str:
    if args.command == "chat" and args.conversation is not None:
        # a reply cut off once it had begun stays in the conversation as far as it got, as a voice turn's does
        return (f"Interrupted; the conversation is kept, a reply cut off as far as it got: go on with "
                f"--conversation {args.conversation}"
                + (f" --store {args.store}." if args.store else "."))
    return "Interrupted; the answer above is incomplete." if args.command == "ask" else "Interrupted."


def ask(engine: Engine, args: argparse.Namespace) -> int:
    """Stream one answer to stdout: reasoning first (set apart), then the answer, then the steps."""
    conversation = Conversation(Session(engine))
    in_reasoning = False
    try:
        options = GenerationOptions(max_new_tokens=args.max_new_tokens, temperature=args.temperature)
        for event in conversation.ask(args.question, args.audio, think=args.think, options=options):
            if isinstance(event, PartProgress):  # a recording over 30 minutes, heard in parts
                print(event.message, file=sys.stderr, flush=True)
            elif isinstance(event, ReasoningDelta):
                if not in_reasoning:
                    print("── reasoning ──", flush=True)
                    in_reasoning = True
                print(event.text, end="", flush=True)
            elif isinstance(event, TextDelta):
                if in_reasoning:
                    print("\n── answer ──", flush=True)
                    in_reasoning = False
                print(event.text, end="", flush=True)
            elif isinstance(event, TurnDone):
                _print_steps(event.reply.steps)
    except (AudioError, ContextFullError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def conversations(args: argparse.Namespace) -> int:
    """The kept conversations, the most recent first: id, turns, last update, title (or JSON lines)."""
    where = Path(args.store).expanduser() if args.store else default_store_path()
    if not (where / "afnext.sqlite3").exists():
        print(f"No conversations are kept at {where}.", file=sys.stderr)
        return 0
    try:
        store = _open_store(args.store)
        store.prune(args.keep_days)
        kept = store.list()
    except StoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if not kept and not args.json:  # a store whose conversations were all deleted: say so, not nothing
        print(f"No conversations are kept at {where}.", file=sys.stderr)
    for c in kept:
        if args.json:
            print(json.dumps({"id": c.id, "title": c.title, "turns": c.turns, "updated": c.updated, "kind": c.kind},
                             ensure_ascii=False))
        else:
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(c.updated))
            print(f"{c.id:<34} {c.turns:>4} turns  {when}  {c.title}")
    return 0


def _print_steps(steps) -> None:
    print()
    if steps:
        print("── steps ──")
    for step in steps:
        span = _clock(step.start) + (f"–{_clock(step.end)}" if step.end is not None else "")
        part = f"  (part {step.part})" if step.part else ""
        print(f"{span:>21}  {step.text}{part}")


def _clock(seconds: float) -> str:
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{int(hours)}:{int(minutes):02d}:{secs:04.1f}" if hours >= 1 else f"{int(minutes)}:{secs:04.1f}"


def chat(engine: Engine, args: argparse.Namespace) -> int:
    """One JSON turn per stdin line → one JSON result per stdout line; errors don't end the session.
    With --conversation, the conversation is kept in the store and resumed where it was: each
    completed turn is committed there before its result line is printed."""
    session = Session(engine, use_cache=not args.no_cache)
    conversation = Conversation(session)
    if args.conversation is not None:
        try:
            store = _open_store(args.store)
            store.touch(args.conversation)  # in use now: the prune below and any elsewhere leave it alone
            store.prune(args.keep_days, keep=args.conversation)
            conversation, journal = open_kept(store, args.conversation, session, model=engine.loaded.name)
            turns = journal.turns
        except (StoreError, AudioError, ContextFullError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(json.dumps({"conversation": args.conversation, "turns": turns}), flush=True)
    if sys.stdin.isatty():  # a person at a terminal, not a program: say what to type
        print('Type one JSON turn per line, e.g. {"text": "Hello"}; Ctrl-D ends the session.', file=sys.stderr)
    # Bytes, decoded per line: one line that is not UTF-8 is refused, it does not end the session.
    for line in _lines(getattr(sys.stdin, "buffer", sys.stdin)):
        if line is None:
            result = {"error": f"The line is over the {MAX_LINE_BYTES:,}-byte limit and was skipped."}
        elif line.strip():
            try:
                result = _chat_turn(conversation, line)
            except KeptError as exc:  # the session holds a turn the store does not: it must not go on
                print(json.dumps({"error": str(exc)}, ensure_ascii=False), flush=True)
                return 1
        else:
            continue
        print(json.dumps(result, ensure_ascii=False), flush=True)
    return 0


def _open_store(path: str | None) -> Store:
    try:
        return Store(path)
    except (OSError, sqlite3.Error) as exc:
        where = path or default_store_path()
        raise StoreError(f"The store at {where} could not be opened ({exc}); check that the folder is writable "
                         "and the database is an afnext store, or give another --store.") from None


def _lines(stream) -> Iterator[str | bytes | None]:
    """The lines of `stream` (bytes, or str from a text stream), with None in place of each one over
    MAX_LINE_BYTES: that one is read in pieces and dropped, so a line without an end cannot fill
    the memory."""
    while line := stream.readline(MAX_LINE_BYTES + 1):
        if len(line) <= MAX_LINE_BYTES or line[-1:] in (b"\n", "\n"):
            yield line
            continue
        while (rest := stream.readline(MAX_LINE_BYTES)) and rest[-1:] not in (b"\n", "\n"):
            pass
        yield None


def _chat_turn(conversation: Conversation, line: str | bytes) -> dict:
    try:
        turn = _read_turn(line)
        reply = None  # with --conversation, the turn is kept by the session before its TurnDone
        for event in conversation.ask(turn.text, turn.audio, think=turn.think, options=turn.options):
            if isinstance(event, TurnDone):
                reply = event.reply
    except (AudioError, ContextFullError, ValueError) as exc:
        return {"error": _one_line(str(exc))}
    except KeptError as exc:
        if conversation.journal is not None and conversation.journal.broken:
            raise  # the session holds a turn the store does not: the conversation must stop (chat says so)
        return {"error": _one_line(str(exc))}  # its audio could not be written: the turn was not asked
    except Exception as exc:  # a model failure: log it fully, tell the client in one line, keep serving
        log.exception("turn failed")
        return {"error": _one_line(f"The model failed on this turn ({type(exc).__name__}: {exc}).")}
    return {"text": reply.text, "reasoning": reply.reasoning, "answer": reply.answer,
            "steps": [dataclasses.asdict(s) for s in reply.steps], "token_ids": list(reply.token_ids),
            "prompt_tokens": reply.prompt_tokens, "timings": dataclasses.asdict(reply.timings),
            **({"parts": dataclasses.asdict(reply.parts)} if reply.parts is not None else {})}


def _read_turn(line: str | bytes) -> Turn:
    """One JSON line → `Turn`. Raises ValueError with one sentence for anything else; the option
    values are checked by GenerationOptions itself, so its messages are the ones the client sees."""
    fields = _json_object(line)
    unknown = sorted(set(fields) - TURN_FIELDS)
    if unknown:
        names = ", ".join(json.dumps(key)[:MAX_KEY_CHARS] for key in unknown[:5])
        raise ValueError(f"Unknown field(s) {names}; expected some of {', '.join(sorted(TURN_FIELDS))}.")
    text, audio, think = fields.get("text", ""), fields.get("audio"), fields.get("think", False)
    if not isinstance(text, str):
        raise ValueError("\"text\" must be a string.")
    if audio is not None and not isinstance(audio, str):
        raise ValueError("\"audio\" must be a file path or null.")
    if not isinstance(think, bool):  # "no" would be truthy
        raise ValueError("\"think\" must be true or false.")
    options = GenerationOptions(**{key: fields[key] for key in OPTION_FIELDS if key in fields})
    if options.min_new_tokens > options.max_new_tokens:  # the reply would stop at max, short of what was asked
        raise ValueError(f"min_new_tokens ({options.min_new_tokens:,}) is more than max_new_tokens "
                         f"({options.max_new_tokens:,}); ask for at most as many as the reply may have.")
    return Turn(text, audio, think, options)


def _json_object(line: str | bytes) -> dict:
    """Strict JSON: no NaN/Infinity literals, no integers longer than MAX_NUMBER_DIGITS."""
    try:
        value = strict_json.loads(line, max_digits=MAX_NUMBER_DIGITS)
    except json.JSONDecodeError as exc:
        raise ValueError(f"The line is not valid JSON ({exc.msg} at column {exc.colno}).") from None
    except UnicodeDecodeError as exc:
        byte = exc.object[exc.start]
        raise ValueError(f"The line is not valid UTF-8 (byte {byte:#04x} at offset {exc.start}).") from None
    except RecursionError:
        raise ValueError("The line nests JSON too deeply; send one flat object.") from None
    if not isinstance(value, dict):
        raise ValueError("Each line must be a JSON object such as {\"text\": \"Hello\"}.")
    return value


def _one_line(message: str) -> str:
    """A message as one line: a model error's text can hold newlines."""
    return " ".join(message.split())


def _notice(loaded) -> None:
    if loaded.random_weights:
        print(f"note: {loaded.name} has RANDOM weights (an offline test model); its answers are noise.", file=sys.stderr)
    else:
        print(f"note: {LICENCE_NOTE}", file=sys.stderr)
    if loaded.device.type == "cpu":
        log.info("running on CPU: no CUDA GPU is visible to PyTorch")




def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m afnext", description="Talk to AF-Next from the command line.")
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_ in (("ask", "ask one question about one audio file"), ("chat", "a multi-turn session over JSON lines")):
        s = sub.add_parser(name, help=help_)
        add_model_flags(s)
        s.add_argument("--dtype", default="auto", choices=DTYPES, metavar="DTYPE",
                       help="auto (bf16 on GPU, fp32 on CPU), bf16, fp16, fp32")
        s.add_argument("-v", "--verbose", action="store_true")
    ask_p = sub.choices["ask"]
    ask_p.add_argument("audio", help="audio file: wav, flac, mp3, ogg/opus, webm, m4a …")
    ask_p.add_argument("question")
    ask_p.add_argument("--think", action="store_true", help="reason step by step with timestamps")
    ask_p.add_argument("--max-new-tokens", type=int, default=GenerationOptions.max_new_tokens)
    ask_p.add_argument("--temperature", type=float, default=0.0)
    chat_p = sub.choices["chat"]
    chat_p.set_defaults(chat_parser=chat_p)  # for an error about how its flags go together
    chat_p.add_argument("--jsonl", action="store_true", required=True, help="JSON lines in and out (the only format)")
    chat_p.add_argument("--no-cache", action="store_true", help="recompute the whole conversation every turn (reference)")
    chat_p.add_argument("--conversation", metavar="ID", default=None,
                        help="keep this conversation in the store and go on where it was (created if new)")
    chat_p.add_argument("--store", metavar="PATH", default=None,
                        help="the store's folder (default: $AFNEXT_DATA, else ~/.local/share/afnext)")
    chat_p.add_argument("--keep-days", type=keep_days, default=KEEP_DAYS,
                        help=f"with --conversation: delete the others not used for this many days (default {KEEP_DAYS:g})")
    kept_p = sub.add_parser("conversations", help="list the kept conversations")
    kept_p.add_argument("--store", metavar="PATH", default=None,
                        help="the store's folder (default: $AFNEXT_DATA, else ~/.local/share/afnext)")
    kept_p.add_argument("--json", action="store_true", help="one JSON object per line")
    kept_p.add_argument("--keep-days", type=keep_days, default=KEEP_DAYS,
                        help=f"delete the conversations not used for this many days first (default {KEEP_DAYS:g})")
    return p


if __name__ == "__main__":
    sys.exit(main())
