"""Speak a text to a wav file and measure the stream: `python -m afnext.tts "Hello there." --out hi.wav --json`.

    python -m afnext.tts "Hello there, how are you?" --engine espeak --out hi.wav --json
    python -m afnext.tts "Hello there." --engine pocket --model tiny --device cpu --out hi.wav --json

The text goes through the same `SpeechChunker` as an answer does (markdown stripped, pieces spoken in
order). With --json it prints {"first_chunk_s", "audio_s", "rtf", "sample_rate"}: wall time from the
start to the first chunk, seconds of audio made, synthesis time / audio duration, and Hz. Loading and
warm-up are not counted.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

import numpy as np

from ..events import TextDelta
from . import ENGINES, TTSError, check_wav_path, load_synthesizer
from .chunker import SpeechChunker


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        check_wav_path(args.out)
        synth = load_synthesizer(args.engine, model=args.model, device=args.device)
    except (TTSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    chunker = SpeechChunker()
    pieces = chunker.feed(TextDelta(args.text)) + chunker.flush()
    if not pieces:
        print("error: nothing to speak in that text", file=sys.stderr)
        return 1
    samples, first_chunk_s, total_s = speak(synth, pieces)
    _write(args.out, samples, synth.sample_rate)
    audio_s = len(samples) / synth.sample_rate
    figures = {"first_chunk_s": round(first_chunk_s, 4), "audio_s": round(audio_s, 3),
               "rtf": round(total_s / audio_s, 4) if audio_s else None, "sample_rate": synth.sample_rate}
    if args.json:
        print(json.dumps(figures))
    else:
        print(f"wrote {audio_s:.2f} s of {args.engine} speech to {args.out}: first chunk after "
              f"{first_chunk_s * 1000:.1f} ms, real-time factor {figures['rtf']}")
    return 0


def speak(synth, pieces: list[str]) -> tuple[np.ndarray, float, float]:
    """Stream every piece: (all samples, seconds to the first chunk, seconds in all)."""
    chunks, first = [], None
    start = time.perf_counter()
    for piece in pieces:
        for chunk in synth.stream(piece):
            if first is None:
                first = time.perf_counter() - start
            chunks.append(chunk.samples)
    total = time.perf_counter() - start
    samples = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
    return samples, total if first is None else first, total


def _write(path: str, samples: np.ndarray, sample_rate: int) -> None:
    import soundfile as sf

    sf.write(path, samples, sample_rate, format="WAV", subtype="PCM_16")  # whatever the name's extension


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m afnext.tts", description=__doc__.splitlines()[0])
    p.add_argument("text", help="what to say (markdown symbols are not spoken)")
    p.add_argument("--engine", choices=ENGINES, default="espeak")
    p.add_argument("--model", help="pocket: hub id, folder or 'tiny' (random weights); espeak: voice name")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:n] (pocket only)")
    p.add_argument("--out", required=True, help="wav file to write")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    return p


if __name__ == "__main__":
    sys.exit(main())
