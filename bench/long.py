"""A recording over 30 minutes: time to the first answer with its parts in flight together vs one
after another, and a follow-up's time to the first token. Prints JSON.

    python bench/long.py [--model mid] [--minutes 120] [--part-s S] [--reply-tokens 32] [--out FILE]

The figures in bench/results/cpu-long.json come from

    python bench/long.py --out bench/results/cpu-long.json

1. A speech-like recording (250 ms noise "words" with 60 ms quieter gaps, and a 0.5 s pause every
   8 s) of `--minutes` is written as a 16-bit WAV file in a temp folder, block by block: it is never
   whole in memory, here or in the library (split.py reads it part by part).
2. One `Engine` on the CPU, one warm-up turn; then the first question, "What happens in this
   recording?", on a fresh `PartedSession` per mode: `serial` (PartOptions(parallel=False): a part
   waits for the previous part's whole answer) then `parallel` (a part is handed over once the
   previous one has begun answering, and their decodes batch). Each part answers up to
   `--reply-tokens` tokens, the merged answer exactly that many (min = max), greedy, so the two
   modes do the same work. Reported per mode: time to the merged answer's first token
   (`reply.timings.ttft_s`, and as the reader saw it), time to `TurnDone`, encode and prefill
   seconds summed over the parts, and when each part was read, listened to and answered.
3. A follow-up, "And who speaks last?", on the parallel session: its time to the first token, and
   that it encoded nothing (encode_s 0, no new 30 s window prepared): each part's KV cache holds it.
4. Memory: the process's peak RSS, against what reading the recording whole would hold (its
   samples in float32 plus its log-mel features, 128 x 3000 float32 per 30 s window).

Random weights (tiny/mid): what the model says is noise; only the timings and the memory mean something.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import math
import os
import resource
import shlex
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import soundfile  # noqa: E402
import torch  # noqa: E402

from afnext.audio import SAMPLE_RATE  # noqa: E402
from afnext.bench import machine, write_json  # noqa: E402
from afnext.engine import Engine  # noqa: E402
from afnext.events import PartProgress, TextDelta, TurnDone  # noqa: E402
from afnext.mel import WINDOW_FRAMES, WINDOW_SAMPLES  # noqa: E402
from afnext.model import ensure_tiny, load  # noqa: E402
from afnext.parts import PartedSession, PartOptions  # noqa: E402
from afnext.sampling import GenerationOptions  # noqa: E402
from afnext.session import Session  # noqa: E402

QUESTION, FOLLOW_UP = "What happens in this recording?", "And who speaks last?"
N_MELS = 128  # AF-Whisper's mel bins: the features of one 30 s window are 128 x 3000 float32
BLOCK_S = 60.0  # seconds of audio generated and written at a time
MB = 1e6


def speech_blocks(seconds: float, seed: int = 0, block_s: float = BLOCK_S):
    """Blocks of speech-like audio: 250 ms "words" of loud noise with 60 ms quieter gaps between them
    (too short to count as a pause), and a 0.5 s near-silent pause every 8 s, as between sentences."""
    rng = np.random.default_rng(seed)
    word, gap = round(0.25 * SAMPLE_RATE), round(0.06 * SAMPLE_RATE)
    sentence, pause = 8 * SAMPLE_RATE, SAMPLE_RATE // 2
    total, done = round(seconds * SAMPLE_RATE), 0
    while done < total:
        n = min(round(block_s * SAMPLE_RATE), total - done)
        index = np.arange(done, done + n)
        level = np.where((index % (word + gap)) < word, 0.3, 0.02)
        level[(index % sentence) >= sentence - pause] = 0.0002
        yield (rng.standard_normal(n) * level).astype(np.float32)
        done += n


def write_recording(path: Path, seconds: float) -> int:
    """The recording as a 16-bit mono 16 kHz WAV, written block by block; returns its samples."""
    samples = 0
    with soundfile.SoundFile(path, "w", SAMPLE_RATE, 1, "PCM_16") as out:
        for block in speech_blocks(seconds):
            out.write(block)
            samples += block.size
    return samples


def peak_rss_bytes() -> int:
    """The process's peak resident set so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def rss_bytes() -> int | None:
    """The process's resident set now (Linux), else None."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def mb(n: int | None) -> float | None:
    return None if n is None else round(n / MB, 1)


def timed_turn(parted: PartedSession, text: str, options: GenerationOptions) -> dict:
    """One parted turn, timed as its reader sees it: when each PartProgress came, the first merged
    text, TurnDone; with the reply's own timings."""
    windows = parted.encoded_windows
    t0 = time.perf_counter()
    progress, answers, first_text, done_s, reply = [], {}, None, None, None
    for event in parted.ask(text, options=options):
        now = time.perf_counter() - t0
        if isinstance(event, PartProgress):
            progress.append((event.stage, event.part, round(now, 3), event.start_s, event.end_s))
            if event.stage == "answered":
                answers[event.part] = event.text
        elif isinstance(event, TextDelta) and event.text and first_text is None:
            first_text = now
        elif isinstance(event, TurnDone):
            reply, done_s = event.reply, now
    if reply is None:
        raise RuntimeError(f"the turn {text!r} ended without an answer")
    parts = []
    for index, (start, end) in enumerate(parted.parts, 1):
        row = {"part": index, "start_s": round(start, 3), "end_s": round(end, 3)}
        for stage, part, at, _, _ in progress:
            if part == index:
                row[f"{stage}_at_s"] = at
        parts.append(row)
    merging = [at for stage, _, at, _, _ in progress if stage == "merging"]
    t = reply.timings
    return {
        "ttft_s": t.ttft_s, "first_text_s": first_text, "turn_done_s": done_s,
        "merging_at_s": merging[0] if merging else None,
        "audio_s": t.audio_s, "encode_s": t.encode_s, "prefill_s": t.prefill_s,
        "merge_prompt_tokens": reply.prompt_tokens, "merge_new_tokens": t.new_tokens,
        "merge_decode_tok_s": t.decode_tok_s,
        "parts": len(parted.parts), "encoded_windows_added": parted.encoded_windows - windows,
        "timeline": parts, "_answers": [answers.get(i + 1, "") for i in range(len(parted.parts))],
    }


def first_question(engine: Engine, path: Path, *, parallel: bool, part_s: float, tokens: int,
                   options: GenerationOptions) -> tuple[dict, PartedSession]:
    parted = PartedSession(engine, str(path), options=PartOptions(parallel=parallel, part_tokens=tokens, part_s=part_s))
    rss_before = rss_bytes()
    figures = timed_turn(parted, QUESTION, options)
    figures.update(encoded_windows=parted.encoded_windows, cache_mb=mb(parted.cache_bytes),
                   rss_before_mb=mb(rss_before), rss_after_mb=mb(rss_bytes()), peak_rss_so_far_mb=mb(peak_rss_bytes()))
    return figures, parted


def load_model(name: str, device: str):
    source = str(ensure_tiny(name)) if name in ("tiny", "mid") else name
    return load(source, device=device)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python bench/long.py", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mid", help="tiny or mid (random weights, written once), or a checkpoint")
    p.add_argument("--device", default="cpu")
    p.add_argument("--minutes", type=float, default=120.0, help="length of the recording")
    p.add_argument("--part-s", type=float, default=None, help="the longest part, seconds (default: the model's limit)")
    p.add_argument("--reply-tokens", type=int, default=32, help="tokens per part's answer and in the merged answer")
    p.add_argument("--kv", choices=["buffers", "paged"], help="how KV caches are kept (afnext/paged.py; default: engine.default_kv)")
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv

    t0 = time.perf_counter()
    loaded = load_model(args.model, args.device)
    load_s = time.perf_counter() - t0
    part_s = min(args.part_s, loaded.max_audio_s) if args.part_s else loaded.max_audio_s
    tokens = args.reply_tokens
    options = GenerationOptions(max_new_tokens=tokens, min_new_tokens=tokens)
    engine = Engine(loaded, kv=args.kv)
    try:
        with tempfile.TemporaryDirectory(prefix="afnext-long-") as tmp:
            path = Path(tmp) / "recording.wav"
            t0 = time.perf_counter()
            samples = write_recording(path, args.minutes * 60)
            write_s = time.perf_counter() - t0
            recording_bytes = path.stat().st_size
            warm = Session(engine)  # first-call costs, timed nowhere
            for _ in warm.ask("Warm up.", (SAMPLE_RATE, np.zeros(2 * SAMPLE_RATE, np.float32)),
                              options=GenerationOptions(max_new_tokens=2)):
                pass
            del warm
            gc.collect()
            rss_after_load, peak_after_load = rss_bytes(), peak_rss_bytes()

            serial, parted = first_question(engine, path, parallel=False, part_s=part_s, tokens=tokens, options=options)
            del parted  # its parts' KV caches: only one mode's conversation is held at a time
            gc.collect()
            parallel, parted = first_question(engine, path, parallel=True, part_s=part_s, tokens=tokens, options=options)
            windows = parted.encoded_windows
            follow = timed_turn(parted, FOLLOW_UP, options)
            follow.update(encoded_nothing=follow["encode_s"] == 0 and parted.encoded_windows == windows,
                          cache_mb=mb(parted.cache_bytes))
            del follow["_answers"]
    finally:
        engine.close()

    same_answers = serial.pop("_answers") == parallel.pop("_answers")
    windows_whole = math.ceil(samples / WINDOW_SAMPLES)
    whole_bytes = samples * 4 + windows_whole * N_MELS * WINDOW_FRAMES * 4
    peak = peak_rss_bytes()
    result = {
        "command": shlex.join(["python", "bench/long.py", *argv]),
        "date": datetime.date.today().isoformat(), "machine": machine(torch.device(args.device)),
        "model": {"name": args.model, "random_weights": loaded.random_weights,
                  "parameters": sum(t.numel() for t in loaded.model.parameters()),
                  "dtype": str(loaded.dtype).removeprefix("torch."), "max_audio_s": loaded.max_audio_s,
                  "load_s": load_s, "kv": engine.kv},
        "recording": {"minutes": args.minutes, "seconds": samples / SAMPLE_RATE, "wav_mb": mb(recording_bytes),
                      "write_s": write_s, "kind": "speech-like noise: 250 ms words, 60 ms gaps, 0.5 s pause every 8 s"},
        "part_s": part_s, "reply_tokens": tokens,
        "question": QUESTION, "follow_up_question": FOLLOW_UP,
        "serial": serial, "parallel": parallel, "follow_up": follow,
        "ratios": {
            "serial_over_parallel_ttft": serial["ttft_s"] / parallel["ttft_s"],
            "serial_over_parallel_turn_done": serial["turn_done_s"] / parallel["turn_done_s"],
            "follow_up_over_parallel_ttft": follow["ttft_s"] / parallel["ttft_s"],
        },
        "same_parts": serial["parts"] == parallel["parts"] and serial["timeline"][-1]["end_s"] == parallel["timeline"][-1]["end_s"],
        "same_part_answers": same_answers,  # greedy: both modes' parts said the same (so did the same work)
        "memory": {
            "rss_after_load_mb": mb(rss_after_load), "peak_rss_after_load_mb": mb(peak_after_load),
            "peak_rss_mb": mb(peak), "peak_rss_over_load_mb": mb(peak - peak_after_load),
            "whole_recording_float32_mb": mb(samples * 4), "whole_features_mb": mb(windows_whole * N_MELS * WINDOW_FRAMES * 4),
            "whole_recording_and_features_mb": mb(whole_bytes), "windows_whole": windows_whole,
            "peak_rss_over_whole": peak / whole_bytes,
        },
    }
    write_json(result, args.out)
    answered = all(serial[k] and parallel[k] for k in ("ttft_s", "turn_done_s"))
    return 0 if answered and result["same_parts"] and follow["encoded_nothing"] else 1


if __name__ == "__main__":
    sys.exit(main())
