"""End of turn, silence vs Smart Turn, on sentences espeak-ng says here. Prints JSON.

    python bench/turn.py [--out FILE]

For each finished sentence (and each unfinished one, followed by 2.5 s of silence), the endpointer
runs twice over the same audio: `silence` (the 600 ms hangover) and `semantic` (Smart Turn asked 192
and 288 ms into the pause). Reported: end of speech → decision (median, by audio time), how often
Smart Turn calls each kind right, and what one ask costs (features + model) against the bare ONNX
model on the same input, one thread each.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

from afnext import turn  # noqa: E402
from afnext.audio import SAMPLE_RATE, to_mono_16k  # noqa: E402
from afnext.tts.espeak import synthesize  # noqa: E402
from afnext.vad import Endpointer, EndpointerOptions, UtteranceEnded  # noqa: E402

FINISHED = ["Order a large pizza with mushrooms.", "Please call my mother tonight.", "I need a taxi to the airport.",
            "Set an alarm for seven tomorrow.", "How far is the moon from the earth?", "Thank you, that is all.",
            "What is the weather like today?", "Can you play some jazz?"]
UNFINISHED = ["I would like to", "So I was thinking that maybe we could", "Let me think, I need", "The meeting is on",
              "and then", "Can you tell me about the", "I want to order a", "My favourite color is"]
RATES_WPM = (170, 140)  # espeak's default pace, and slower


def spoken(text: str, wpm: int) -> np.ndarray:
    rate, samples = synthesize(text, rate_wpm=wpm)
    audio = to_mono_16k(samples, rate)
    loud = np.flatnonzero(np.abs(audio) > 0.01)
    return audio[loud[0]:loud[-1] + 1]


def first_turn(audio: np.ndarray, options: EndpointerOptions, model) -> UtteranceEnded:
    endpointer = Endpointer(options, turn_model=model)
    events = [e for e in endpointer.push(audio, SAMPLE_RATE) + endpointer.flush() if isinstance(e, UtteranceEnded)]
    return events[0]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None)
    args = p.parse_args()
    model = turn.load_turn_model()
    if model is None:
        sys.exit("Smart Turn is not installed: run scripts/setup.sh or python -m afnext.turn fetch")
    lead, tail = np.zeros(SAMPLE_RATE // 2, np.float32), np.zeros(int(2.5 * SAMPLE_RATE), np.float32)
    rows = {"finished": [], "unfinished": []}
    for kind, texts in (("finished", FINISHED), ("unfinished", UNFINISHED)):
        for wpm in RATES_WPM:
            for text in texts:
                audio = np.concatenate([lead, spoken(text, wpm), tail])
                quiet = first_turn(audio, EndpointerOptions(), None)
                smart = first_turn(audio, EndpointerOptions(semantic=True), model)
                rows[kind].append({"text": text, "wpm": wpm, "silence_s": round(quiet.t - quiet.end, 3),
                                   "semantic_s": round(smart.t - smart.end, 3), "complete": smart.complete})
    sample = np.concatenate([lead, spoken(FINISHED[0], 170), np.zeros(SAMPLE_RATE // 5, np.float32)])
    inputs = turn.features(sample)[None]
    ask, bare = [], []
    for _ in range(30):
        t0 = time.perf_counter()
        model.complete(sample)
        ask.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        model._session.run(None, {model._input: inputs})
        bare.append(time.perf_counter() - t0)
    finished, unfinished = rows["finished"], rows["unfinished"]
    report = {
        "command": "python bench/turn.py", "date": datetime.date.today().isoformat(), "cpus": os.cpu_count(),
        "model": f"Smart Turn v3.2 ({turn.WHEEL}), onnxruntime, 1 thread", "speech": "espeak-ng en-us at 170 and 140 wpm",
        "end_of_speech_to_decision_median_s": {
            "silence": statistics.median(r["silence_s"] for r in finished),
            "semantic": statistics.median(r["semantic_s"] for r in finished)},
        "target_median_s": 0.35,
        "finished_called_complete": f"{sum(r['complete'] is not None for r in finished)}/{len(finished)}",
        "unfinished_called_incomplete": f"{sum(r['complete'] is None for r in unfinished)}/{len(unfinished)}",
        "ask_ms_median": round(1000 * statistics.median(ask), 1),
        "bare_onnx_ms_median": round(1000 * statistics.median(bare), 1),
        "ask_over_bare": round(statistics.median(ask) / statistics.median(bare), 2),
        "target_ask_over_bare": 1.5,
        "rows": rows,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
