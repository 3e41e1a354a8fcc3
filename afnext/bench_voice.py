"""Voice-loop benchmark: runs the voice CLIs as a user would and gathers their JSON into one.

    python -m afnext.bench_voice [--model tiny|DIR] [--out FILE]

- endpointer: `python -m afnext.vad FILE --json` on a minute of espeak speech and pauses (its
  realtime factor), and how long after each utterance's end its end of turn was decided;
- tts: `python -m afnext.tts … --json` for espeak and for the tiny random-weight Pocket TTS
  (on CPU that measures our overhead only; real weights need a download and a GPU);
- voice: `python -m afnext.voice --input … --json` with the tiny model and espeak, once per way of
  ending a turn (`--turn silence`: 600 ms of silence; `--turn semantic`: Smart Turn, asked in
  pauses): the turns it heard against the sentences spoken, when each turn's end was decided after
  its speech ended (only when every sentence made one turn: else the ends do not pair up), the
  endpointer's own wait per turn, and end of turn → first reply audio, per turn.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from .audio import SAMPLE_RATE, to_mono_16k

SENTENCES = [
    "Hello, can you hear me clearly today?",
    "I would like to know what the weather will be like tomorrow morning.",
    "Also, please remind me to call my sister in the evening.",
    "What was the name of that song we listened to yesterday?",
]
PAUSE_S = 1.5  # silence after each sentence: longer than the 600 ms hangover


def spoken_file(path: Path, sentences: list[str], repeat: int = 1) -> list[tuple[float, float]]:
    """Write espeak speech with pauses to `path` (16 kHz wav); returns the speech bounds in seconds."""
    import soundfile as sf

    from .tts.espeak import synthesize

    parts, bounds, t = [np.zeros(int(0.5 * SAMPLE_RATE), np.float32)], [], 0.5
    for text in sentences * repeat:
        voice = to_mono_16k(*reversed(synthesize(text)))
        loud = np.flatnonzero(np.abs(voice) > 0.01)
        voice = voice[loud[0]:loud[-1] + 1]
        bounds.append((t, t + len(voice) / SAMPLE_RATE))
        parts += [voice, np.zeros(int(PAUSE_S * SAMPLE_RATE), np.float32)]
        t = bounds[-1][1] + PAUSE_S
    sf.write(path, np.concatenate(parts), SAMPLE_RATE)
    return bounds


def run_json(args: list[str]) -> tuple[str, list[dict]]:
    """Run `python -m …` and return (the command, its JSON lines)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, env=env, check=True)
    return "python -m " + " ".join(args), [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m afnext.bench_voice", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny", help="the AF-Next model for the voice turns (default: tiny, random)")
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args(argv)
    result: dict = {"command": "python -m afnext.bench_voice " + " ".join(argv if argv is not None else sys.argv[1:]),
                    "date": datetime.date.today().isoformat(), "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        minute, voice_in = Path(tmp) / "minute.wav", Path(tmp) / "turns.wav"
        truth = spoken_file(minute, SENTENCES, repeat=3)
        cmd, (vad,) = run_json(["afnext.vad", str(minute), "--json"])
        result["endpointer"] = {"command": cmd, "realtime_factor": vad["realtime_factor"], "backend": vad["backend"],
                                "utterances": len(vad["segments"]), "expected": len(truth),
                                "start_error_s": max(abs(s["start"] - a) for s, (a, _) in zip(vad["segments"], truth)),
                                "end_error_s": max(abs(s["end"] - b) for s, (_, b) in zip(vad["segments"], truth))}
        result["tts"] = {}
        for engine, extra in (("espeak", []), ("pocket", ["--model", "tiny", "--device", "cpu"])):
            cmd, (figures,) = run_json(["afnext.tts", SENTENCES[1], "--engine", engine, *extra,
                                        "--out", str(Path(tmp) / f"{engine}.wav"), "--json"])
            result["tts"][engine] = {"command": cmd, **figures}
        result["tts"]["pocket"]["weights"] = "random (tiny): overhead only"
        turns_truth = spoken_file(voice_in, SENTENCES[:3])
        model = str(_tiny_dir(Path(tmp))) if args.model == "tiny" else args.model
        result["voice"] = {}
        for turn in ("silence", "semantic"):
            cmd, events = run_json(["afnext.voice", "--model", model, "--input", str(voice_in), "--turn", turn, "--json"])
            done = [e["timings"] for e in events if e["event"] == "turn_done"]
            ends = [e["t"] for e in events if e["event"] == "turn_end"]
            paired = len(ends) == len(turns_truth)  # one turn per sentence: each end pairs with its sentence's
            lags = [t - true_end for t, (_, true_end) in zip(ends, turns_truth)] if paired else None
            audio = [d["first_audio_s"] for d in done if d["first_audio_s"] is not None]
            result["voice"][turn] = {
                "command": cmd.replace(model, "<tiny checkpoint>"), "sentences": len(turns_truth), "turns": len(done),
                "turn_end_after_speech_s": lags, "endpoint_s": [d["endpoint_s"] for d in done],
                "ttft_s": [d["ttft_s"] for d in done], "first_audio_s": audio,
                "first_audio_median_s": statistics.median(audio) if audio else None}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


def _tiny_dir(tmp: Path) -> Path:
    from .tiny import write_checkpoint

    return write_checkpoint(tmp / "tiny", "tiny")


if __name__ == "__main__":
    sys.exit(main())
