"""Replay a recording as a microphone through the voice loop; one JSON line per event.

    python -m afnext.voice --model tiny --input question.wav [--realtime] [--out reply.wav] --json

Events: {"event": "speech_start" | "turn_end" | "first_token" | "first_audio" | "interrupted" |
"turn_done", "t": seconds on the input's timeline, ...}; turn_done carries
"timings": {"endpoint_s", "ttft_s", "first_audio_s"} — endpoint_s from the end of speech to the
end-of-turn decision, the other two measured from that decision.

Without --realtime the file is pushed as fast as possible and the input pauses while a turn is
generated (so its reply is placed right after the decision on the input's timeline); with
--realtime it is pushed at the pace of a live microphone, and speech in the file can barge in.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
import time

import numpy as np

from .assistant import Assistant, AssistantOptions, Stamped, UserTurn, VoiceTurnDone
from .audio import SAMPLE_RATE, AudioError
from .cli import add_model_flags, add_tts_flags, add_turn_flag
from .engine import Engine
from .events import AudioChunk, Error, Interrupted, ReasoningDelta, TextDelta
from .media import load_audio
from .model import ModelLoadError, load
from .session import Session
from .vad import EndpointerOptions, SpeechStarted

MIC_CHUNK_S = 0.02  # seconds per pushed chunk: a typical audio-callback size


def replay(assistant: Assistant, samples: np.ndarray, *, realtime: bool) -> None:
    """Push 16 kHz `samples` into the assistant as a microphone would."""
    step = int(MIC_CHUNK_S * SAMPLE_RATE)
    start = time.perf_counter()
    for i in range(0, len(samples), step):
        assistant.push(samples[i:i + step], SAMPLE_RATE)
        if realtime:
            time.sleep(max(0.0, start + (i + step) / SAMPLE_RATE - time.perf_counter()))
        elif assistant.busy:
            assistant.wait()
    assistant.flush()
    assistant.wait()


def describe(event, seen: dict) -> dict | None:
    """Assistant event → the JSON line for it (None for events that are not reported)."""
    if isinstance(event, SpeechStarted):
        return {"event": "speech_start", "t": event.t}
    if isinstance(event, UserTurn):
        seen.clear()
        return {"event": "turn_end", "t": event.t, "speech_start": event.start, "speech_end": event.end}
    if isinstance(event, VoiceTurnDone):
        reply = event.reply
        return {"event": "turn_done", "t": event.t, "timings": vars(event.timings),
                # a turn cut off before its reply began has no reply, but was interrupted all the same
                "answer": reply.answer if reply else "",
                "interrupted": bool(reply and reply.interrupted) or seen.get("interrupted", False)}
    if not isinstance(event, Stamped):
        return None
    inner = event.event
    if isinstance(inner, (TextDelta, ReasoningDelta)) and "token" not in seen:
        seen["token"] = True
        return {"event": "first_token", "t": event.t}
    if isinstance(inner, AudioChunk) and "audio" not in seen:
        seen["audio"] = True
        return {"event": "first_audio", "t": event.t}
    if isinstance(inner, Interrupted):
        seen["interrupted"] = True
        return {"event": "interrupted", "t": event.t}
    if isinstance(inner, Error):
        return {"event": "error", "t": event.t, "message": inner.message}
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m afnext.voice", description=__doc__.splitlines()[0])
    add_model_flags(p)
    p.add_argument("--input", required=True, help="the recording to play as the microphone")
    p.add_argument("--realtime", action="store_true", help="push audio at the pace of a live microphone")
    p.add_argument("--out", help="write the assistant's speech to this wav file")
    add_tts_flags(p)
    p.add_argument("--half-duplex", action="store_true", help="ignore the input while the assistant speaks")
    p.add_argument("--think", action="store_true")
    add_turn_flag(p)
    p.add_argument("--json", action="store_true", required=True, help="JSON lines (the only format)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from .tts import check_wav_path, load_synthesizer

    try:
        if args.out:
            check_wav_path(args.out)
        samples = load_audio(args.input)
        synthesizer = load_synthesizer(args.tts, model=args.tts_model, device=args.device)
        engine = Engine(load(args.model, device=args.device), kv=args.kv)
    except (AudioError, ModelLoadError, RuntimeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    options = AssistantOptions(half_duplex=args.half_duplex, think=args.think,
                               endpointer=EndpointerOptions(semantic=args.turn == "semantic"))
    assistant = Assistant(Session(engine), synthesizer, options)
    speech: list[AudioChunk] = []
    printer = threading.Thread(target=_print_events, args=(assistant, speech), daemon=True)
    printer.start()
    replay(assistant, samples, realtime=args.realtime)
    assistant.close()  # ends the printer's event stream
    printer.join()
    engine.close()
    if args.out and speech:
        import soundfile as sf

        sf.write(args.out, np.concatenate([c.samples for c in speech]), speech[0].sample_rate, format="WAV")
    return 0


def _print_events(assistant: Assistant, speech: list[AudioChunk]) -> None:
    seen: dict = {}
    for event in assistant.events():
        if isinstance(event, Stamped) and isinstance(event.event, AudioChunk):
            speech.append(event.event)
        line = describe(event, seen)
        if line is not None:
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    sys.exit(main())
