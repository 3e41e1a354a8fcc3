"""Command line: `python -m afnext ask …` for one question, `python -m afnext chat --jsonl` for a session.

    python -m afnext ask --model tiny assets/speech.wav "What is said?" [--think]
    echo '{"text": "Hi", "audio": "assets/speech.wav"}' | python -m afnext chat --model tiny --jsonl

chat reads one JSON turn per line, {"text", "audio", "think", "max_new_tokens", "temperature",
"repetition_penalty"} (all but text optional), and writes one JSON line per turn: the reply, or
{"error": "…"} after which the session goes on.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys

from .audio import AudioError
from .engine import Engine, GenerationOptions
from .events import ReasoningDelta, TextDelta, TurnDone
from .model import DEFAULT_MODEL, LICENCE_NOTE, ModelLoadError, load
from .session import ContextFullError, Session

log = logging.getLogger("afnext")
TURN_FIELDS = {"text", "audio", "think", "max_new_tokens", "temperature", "repetition_penalty"}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        loaded = load(args.model, device=args.device, dtype=args.dtype)
    except ModelLoadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    _notice(loaded)
    engine = Engine(loaded)
    try:
        return ask(engine, args) if args.command == "ask" else chat(engine, args)
    finally:
        engine.close()


def ask(engine: Engine, args: argparse.Namespace) -> int:
    """Stream one answer to stdout: reasoning first (set apart), then the answer, then the steps."""
    options = GenerationOptions(max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    session = Session(engine)
    in_reasoning = False
    try:
        for event in session.ask(args.question, args.audio, think=args.think, options=options):
            if isinstance(event, ReasoningDelta):
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


def _print_steps(steps) -> None:
    print()
    if steps:
        print("── steps ──")
    for step in steps:
        span = _clock(step.start) + (f"–{_clock(step.end)}" if step.end is not None else "")
        print(f"{span:>17}  {step.text}")


def _clock(seconds: float) -> str:
    minutes, secs = divmod(seconds, 60)
    return f"{int(minutes)}:{secs:04.1f}"


def chat(engine: Engine, args: argparse.Namespace) -> int:
    """One JSON turn per stdin line → one JSON result per stdout line; errors don't end the session."""
    session = Session(engine, use_cache=not args.no_cache)
    for line in sys.stdin:
        if line.strip():
            print(json.dumps(_chat_turn(session, line), ensure_ascii=False), flush=True)
    return 0


def _chat_turn(session: Session, line: str) -> dict:
    try:
        turn = _read_turn(line)
        options = GenerationOptions(**{k: turn[k] for k in ("max_new_tokens", "temperature", "repetition_penalty") if k in turn})
        reply = None
        for event in session.ask(turn.get("text", ""), turn.get("audio"), think=bool(turn.get("think")), options=options):
            if isinstance(event, TurnDone):
                reply = event.reply
    except (AudioError, ContextFullError, ValueError) as exc:
        return {"error": str(exc)}
    except Exception as exc:  # a model failure: log it fully, tell the client in one line, keep serving
        log.exception("turn failed")
        return {"error": f"The model failed on this turn ({type(exc).__name__}: {exc})."}
    return {"text": reply.text, "reasoning": reply.reasoning, "answer": reply.answer,
            "steps": [dataclasses.asdict(s) for s in reply.steps], "token_ids": list(reply.token_ids),
            "prompt_tokens": reply.prompt_tokens, "timings": dataclasses.asdict(reply.timings)}


def _read_turn(line: str) -> dict:
    try:
        turn = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"The line is not valid JSON ({exc.msg} at column {exc.colno}).") from None
    if not isinstance(turn, dict):
        raise ValueError("Each line must be a JSON object such as {\"text\": \"Hello\"}.")
    unknown = set(turn) - TURN_FIELDS
    if unknown:
        raise ValueError(f"Unknown field(s) {', '.join(sorted(unknown))}; expected some of {', '.join(sorted(TURN_FIELDS))}.")
    if not isinstance(turn.get("text", ""), str) or not isinstance(turn.get("audio") or "", str):
        raise ValueError("\"text\" must be a string and \"audio\" a file path or null.")
    for key, kind in (("max_new_tokens", int), ("temperature", (int, float)), ("repetition_penalty", (int, float))):
        if key in turn and (not isinstance(turn[key], kind) or isinstance(turn[key], bool) or turn[key] < 0):
            raise ValueError(f"\"{key}\" must be a non-negative number.")
    return turn


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
        s.add_argument("--model", default=DEFAULT_MODEL, help="hub id, local folder, or instruct|think|captioner|tiny")
        s.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 …")
        s.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), bf16, fp16, fp32")
        s.add_argument("-v", "--verbose", action="store_true")
    ask_p = sub.choices["ask"]
    ask_p.add_argument("audio", help="audio file: wav, flac, mp3, ogg/opus, webm, m4a …")
    ask_p.add_argument("question")
    ask_p.add_argument("--think", action="store_true", help="reason step by step with timestamps")
    ask_p.add_argument("--max-new-tokens", type=int, default=GenerationOptions.max_new_tokens)
    ask_p.add_argument("--temperature", type=float, default=0.0)
    chat_p = sub.choices["chat"]
    chat_p.add_argument("--jsonl", action="store_true", required=True, help="JSON lines in and out (the only format)")
    chat_p.add_argument("--no-cache", action="store_true", help="recompute the whole conversation every turn (reference)")
    return p


if __name__ == "__main__":
    sys.exit(main())
