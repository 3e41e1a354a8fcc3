"""`python -m app`: the assistant's front door.

The web app is not built yet; until it is, this answers one question about a recording (by default
the speech sample in assets/) and shows what a turn costs. If the configured model cannot be loaded
(no network, not cached), it says so and uses the offline demo model, whose weights are random.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from afnext import AudioError, Engine, GenerationOptions, Session, load_or_demo
from afnext.events import ReasoningDelta, TextDelta, TurnDone
from afnext.model import DEFAULT_MODEL, LICENCE_NOTE

ASSETS = Path(__file__).resolve().parents[1] / "assets"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m app", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=DEFAULT_MODEL, help="hub id, local folder, or instruct|think|captioner|tiny")
    p.add_argument("--device", default="auto")
    p.add_argument("--audio", default=str(ASSETS / "speech.wav"), help="the recording to ask about")
    p.add_argument("--question", default="What is said in this recording?")
    p.add_argument("--think", action="store_true", help="reason step by step with timestamps")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    loaded, notice = load_or_demo(args.model, device=args.device)
    print(f"\n{notice}\n" if notice else f"\n{LICENCE_NOTE}\n")
    if loaded.random_weights:
        print("The model in use has RANDOM weights: expect noise as the answer.\n")
    engine = Engine(loaded)
    print(f"Q: {args.question}  [{Path(args.audio).name}]\nA: ", end="", flush=True)
    try:
        for event in Session(engine).ask(args.question, args.audio, think=args.think,
                                         options=GenerationOptions(max_new_tokens=64)):
            if isinstance(event, (TextDelta, ReasoningDelta)):
                print(event.text, end="", flush=True)
            elif isinstance(event, TurnDone):
                t = event.reply.timings
                print(f"\n\n({t.new_tokens} tokens; audio {t.audio_s * 1000:.0f} ms, encode {t.encode_s * 1000:.0f} ms, "
                      f"prefill {t.prefill_s * 1000:.0f} ms, first token after {t.ttft_s * 1000:.0f} ms, "
                      f"{t.decode_tok_s:.0f} tokens/s on {loaded.device.type})")
    except AudioError as exc:
        print(f"\nerror: {exc}", file=sys.stderr)
        return 1
    finally:
        engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
