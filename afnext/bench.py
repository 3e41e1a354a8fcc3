"""Benchmark: our sessions vs stock transformers, side by side in one run; prints JSON.

    python -m afnext.bench [--size mid] [--device cpu] [--durations 30,600,1800] [--out FILE]

For each recording length it measures, on a random-weight AF-Next-shaped model (speed does not
depend on weight values):
- features: decode + resample + log-mel of a 44.1 kHz stereo WAV; ours vs the stock processor
  (which has no decoder: it gets our decoded 16 kHz audio and adds its own features and prompt);
- encode: audio encoder + projector, ours;
- first-turn TTFT: from the request (file path) to the first token, ours;
- follow-up TTFT: a text question after the first answer: cached (ours), full recompute (ours with
  use_cache=False), and stock `generate` on the whole conversation (it re-reads the recording);
- decode tokens/s on that follow-up: ours vs stock `generate` (fixed length, end of turn ignored);
- encoder seconds per 30 s window, and on CUDA the peak GPU memory of ours and of stock;
and once per run the voice-turn TTFT: a 5 s clip asked on a session already 10 voice turns long
(stock transformers cannot hold a second clip; its figure is a lone 5 s clip's first turn).
On CUDA each figure is also set against the machine's limits (see `limits`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from .clip import prepare_clip
from .cores import in_own_thread
from .engine import Engine
from .events import TurnDone
from .media import load_audio
from .sampling import GenerationOptions
from .session import Session

FILE_RATE_HZ = 44_100  # the benchmark recording: CD-rate stereo, as people's files usually are
QUESTION = "What happens in this recording?"
FOLLOW_UP = "And what happens after that?"


def synth_recording(path: Path, seconds: float, seed: int = 0) -> Path:
    """A 16-bit 44.1 kHz stereo WAV of tones and noise: any audio times the same."""
    import soundfile as sf

    rng = np.random.default_rng(seed)
    n = int(seconds * FILE_RATE_HZ)
    with sf.SoundFile(path, "w", FILE_RATE_HZ, 2, "PCM_16") as f:
        for start in range(0, n, FILE_RATE_HZ * 60):  # a minute at a time: 30 min would be 600 MB of float64
            t = np.arange(start, min(n, start + FILE_RATE_HZ * 60)) / FILE_RATE_HZ
            tone = 0.2 * np.sin(2 * np.pi * 220 * t) + 0.05 * rng.standard_normal(len(t))
            f.write(np.stack([tone, tone[::-1]], axis=1).astype(np.float32))
    return path


def run_turn(session: Session, text: str, audio=None, options: GenerationOptions = GenerationOptions()):
    reply = None
    for event in session.ask(text, audio, options=options):
        if isinstance(event, TurnDone):
            reply = event.reply
    return reply


def bench_features(path: Path, loaded, processor) -> dict:
    t0 = time.perf_counter()
    clip = prepare_clip(str(path), loaded.mel_filters)
    ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    samples = load_audio(str(path))
    decode = time.perf_counter() - t0
    prompt = _stock_prompt(processor, [QUESTION])
    t0 = time.perf_counter()
    inputs = in_own_thread(processor, text=[prompt], audio=[samples])  # stock on every core (cores.py)
    stock = decode + time.perf_counter() - t0
    assert inputs["input_features"].shape[0] == len(clip.frames)
    return {"ours_s": ours, "stock_s": stock, "decode_resample_s": decode, "speedup": stock / ours,
            "audio_tokens": clip.tokens}


def bench_stock_follow_up(loaded, processor, samples: np.ndarray, first_answer: str, n_tokens: int) -> dict:
    """Stock `generate` on the whole conversation, with a streamer clocking each token."""
    t0, times = _stock_generate(loaded, processor, [QUESTION, first_answer, FOLLOW_UP], samples, n_tokens,
                                repetition_penalty=1.2)
    first, last = times[1], times[-1]  # times[0] is the prompt being handed over
    return {"ttft_s": first - t0, "decode_tok_s": (len(times) - 2) / (last - first)}


def bench_stock_first(loaded, processor, samples: np.ndarray) -> dict:
    """Stock `generate` on one question about `samples`: its time to the first token."""
    t0, times = _stock_generate(loaded, processor, [QUESTION], samples, 2)
    return {"ttft_s": times[1] - t0}


class _TokenClock:
    """A `generate` streamer noting when each piece arrives (the first piece is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def _stock_generate(loaded, processor, turns: list[str], samples: np.ndarray, n_tokens: int,
                    **options) -> tuple[float, list[float]]:
    """The stock processor and `generate` (exactly `n_tokens`, greedy) on a conversation about
    `samples`; returns the start time and each piece's arrival time. On every core, in a thread of
    its own, so the OpenMP team it starts ends with it and does not slow the engine after (cores.py)."""
    return in_own_thread(_stock_run, loaded, processor, turns, samples, n_tokens, **options)


def _stock_run(loaded, processor, turns: list[str], samples: np.ndarray, n_tokens: int,
               **options) -> tuple[float, list[float]]:
    clock, t0 = _TokenClock(), time.perf_counter()
    inputs = processor(text=[_stock_prompt(processor, turns)], audio=[samples])
    inputs["input_features"] = inputs["input_features"].to(loaded.dtype)
    with torch.inference_mode():
        loaded.model.generate(**inputs.to(loaded.device), max_new_tokens=n_tokens, min_new_tokens=n_tokens,
                              do_sample=False, streamer=clock, **options)
    return t0, clock.times


def bench_voice_turn(engine: Engine, processor, workdir: Path, turns: int = 10) -> dict:
    """TTFT of a 5 s voice turn on a session that already holds `turns` voice turns."""
    session, short = Session(engine), GenerationOptions(max_new_tokens=8)
    clips = [load_audio(str(synth_recording(workdir / f"voice{i}.wav", 5.0, seed=i))) for i in range(turns + 1)]
    for clip in clips[:-1]:
        run_turn(session, "", clip, short)
    reply = run_turn(session, "", clips[-1], short)
    stock = bench_stock_first(engine.loaded, processor, clips[-1])
    return {"ours_ttft_s": reply.timings.ttft_s, "prompt_tokens": reply.prompt_tokens, "turns_before": turns,
            "stock_single_clip_ttft_s": stock["ttft_s"],
            "note": "stock transformers cannot hold a second clip: its figure is a lone 5 s clip's first turn"}


def limits(loaded, device: torch.device) -> dict:
    """What the hardware allows at batch 1: decode is bound by reading every weight once per token."""
    if device.type != "cuda":
        return {}
    n = 1 << 28  # 512 MiB of bf16: measured device-to-device copy bandwidth (read + write)
    a, b = torch.empty(n, dtype=torch.bfloat16, device=device), torch.empty(n, dtype=torch.bfloat16, device=device)
    b.copy_(a)
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(10):
        b.copy_(a)
    torch.cuda.synchronize(device)
    bandwidth = 10 * 2 * a.numel() * a.element_size() / (time.perf_counter() - t0)
    weight_bytes = sum(t.numel() * t.element_size() for t in loaded.model.parameters())
    return {"copy_bandwidth_gb_s": bandwidth / 1e9, "weight_gb": weight_bytes / 1e9,
            "decode_tok_s_limit": bandwidth / weight_bytes}


def _peak_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    peak = torch.cuda.max_memory_allocated(device) / 2**30
    torch.cuda.reset_peak_memory_stats(device)
    return peak


def _stock_prompt(processor, turns: list[str]) -> str:
    messages = []
    for i, text in enumerate(turns):
        role = "user" if i % 2 == 0 else "assistant"
        content = [{"type": "text", "text": text}]
        messages.append({"role": role, "content": ([{"type": "audio"}] if i == 0 else []) + content})
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def bench_duration(engine: Engine, processor, seconds: float, workdir: Path, n_tokens: int) -> dict:
    loaded = engine.loaded
    path = synth_recording(workdir / f"rec_{int(seconds)}s.wav", seconds)
    row: dict = {"audio_s": seconds, "features": bench_features(path, loaded, processor)}
    first = GenerationOptions(max_new_tokens=8)
    fixed = GenerationOptions(max_new_tokens=n_tokens, min_new_tokens=n_tokens)

    device = loaded.device
    _peak_gib(device)
    cached = Session(engine)
    reply = run_turn(cached, QUESTION, str(path), first)
    row["encode_s"] = reply.timings.encode_s
    row["encode_per_window_s"] = reply.timings.encode_s / -(-seconds // 30)
    row["first_turn"] = {"ttft_s": reply.timings.ttft_s, "audio_s": reply.timings.audio_s,
                         "prefill_s": reply.timings.prefill_s, "prompt_tokens": reply.prompt_tokens}
    follow = run_turn(cached, FOLLOW_UP, options=fixed)
    row["peak_gpu_gib"] = {"ours": _peak_gib(device)}
    del cached

    recompute = Session(engine, use_cache=False)
    run_turn(recompute, QUESTION, str(path), first)
    full = run_turn(recompute, FOLLOW_UP, options=GenerationOptions(max_new_tokens=1))

    del recompute
    _peak_gib(device)
    t0 = time.perf_counter()
    samples = load_audio(str(path))
    decode_s = time.perf_counter() - t0  # stock has no decoder: it is charged ours, as ours is
    stock = bench_stock_follow_up(loaded, processor, samples, reply.answer, n_tokens)
    row["peak_gpu_gib"]["stock_generate"] = _peak_gib(device)
    row["first_turn"]["stock_ttft_s"] = decode_s + bench_stock_first(loaded, processor, samples)["ttft_s"]
    ttft = follow.timings.ttft_s
    row["follow_up_ttft_s"] = {"cached": ttft, "full_recompute": full.timings.ttft_s, "stock_generate": stock["ttft_s"],
                               "speedup_vs_recompute": full.timings.ttft_s / ttft, "speedup_vs_stock": stock["ttft_s"] / ttft}
    row["decode_tok_s"] = {"ours": follow.timings.decode_tok_s, "stock_generate": stock["decode_tok_s"],
                           "ratio": follow.timings.decode_tok_s / stock["decode_tok_s"], "tokens": n_tokens,
                           "context_tokens": follow.prompt_tokens}
    path.unlink()
    return row


def warm_up(engine: Engine, processor, workdir: Path) -> None:
    """One short pass through both pipelines, so first-call costs land in no measured figure."""
    path = synth_recording(workdir / "warm.wav", 2.0)
    bench_features(path, engine.loaded, processor)
    run_turn(Session(engine), QUESTION, str(path), GenerationOptions(max_new_tokens=2))
    path.unlink()


def write_json(result: dict, out: str | None) -> None:
    """Print a benchmark's figures, and keep them in `out` when given."""
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")


def machine(device: torch.device) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu_threads": torch.get_num_threads(),
            "cpus": os.cpu_count(), "platform": platform.platform()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m afnext.bench", description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=["tiny", "mid", "full"], default="mid")
    p.add_argument("--device", default="cpu")
    p.add_argument("--durations", default="5,600,1800", help="recording lengths in seconds, comma-separated")
    p.add_argument("--tokens", type=int, default=32, help="tokens per decode-speed measurement")
    p.add_argument("--decode", default="eager", choices=["eager", "static", "graphs"],
                   help="how our decoding steps run (graphs: CUDA graphs, CUDA only)")
    p.add_argument("--kv", choices=["buffers", "paged"], help="how KV caches are kept (afnext/paged.py; default: engine.default_kv)")
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args(argv)
    from .tiny import build_in_memory

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    loaded, processor = build_in_memory(args.size, args.device, dtype)
    engine = Engine(loaded, decode=args.decode, kv=args.kv)
    result = {"command": "python -m afnext.bench " + " ".join(argv if argv is not None else sys.argv[1:]),
              "date": datetime.date.today().isoformat(), "machine": machine(device),
              "model": {"size": args.size, "parameters": sum(t.numel() for t in loaded.model.parameters()),
                        "dtype": str(dtype).removeprefix("torch."), "attention": loaded.attn, "weights": "random",
                        "decode": args.decode, "kv": engine.kv},
              "limits": limits(loaded, device), "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        warm_up(engine, processor, Path(tmp))
        result["voice_turn"] = bench_voice_turn(engine, processor, Path(tmp))
        for seconds in (float(s) for s in args.durations.split(",")):
            result["runs"].append(bench_duration(engine, processor, seconds, Path(tmp), args.tokens))
            print(f"done: {seconds:.0f} s of audio", file=sys.stderr, flush=True)
    engine.close()
    if result["limits"]:
        top = result["limits"]["decode_tok_s_limit"]
        for run in result["runs"]:
            run["decode_tok_s"]["fraction_of_limit"] = run["decode_tok_s"]["ours"] / top
    write_json(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
