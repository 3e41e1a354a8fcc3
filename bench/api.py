"""The OpenAI-compatible API against the library it wraps, in one run; prints JSON.

    python bench/api.py [--size mid] [--overhead-size tiny] [--recording-seconds 600] [--requests 100]
                        [--tokens 32] [--out FILE]

Two measurements, each through a real server (`python -m app --model FOLDER`, a child process awaited
on its /health) and the `openai` SDK, streamed, timed on the client:

1. Recording follow-up (`--size`, default mid: the size whose prefill of a long recording costs
   what a real CPU deployment's would). The first question sends a WAV of `--recording-seconds` as
   input_audio; the follow-up resends the whole history (that audio, the reply, a new question).
   TTFT = request sent → first chunk with content. Target: the follow-up >= 50x faster.
2. Overhead over the library (`--overhead-size`, default tiny: its model time is a few ms, so the
   API's own milliseconds are not lost in the model's noise; a server of its own, both sides on one
   torch thread, for the same reason: OVERHEAD_THREADS). The same short question, greedy, of
   exactly n tokens, is asked of an in-process Engine (Session.ask) on the same checkpoint and
   through the API, in turn (the server and this process share the CPUs: each side runs while the
   other idles), at two lengths: n = 2 and n = `--tokens`. A request's overhead is its API wall
   time less the library's, paired turn by turn (median over `--requests` rounds); it grows with
   the reply's chunks, so the two lengths give a line: its slope is the cost per streamed chunk,
   its intercept the fixed cost of a request (parsing, the session, the HTTP exchange), each with a
   95% interval (bootstrap over the rounds). Targets: <= 5 ms per request (its fixed part: a request
   of n chunks costs that plus n times the per-chunk figure), <= 1 ms per chunk. The API side is
   the openai SDK, whose own work (request building, a pydantic model per chunk) a user of the API
   pays too; `raw_http` repeats it with a bare HTTP client (httpx, one json.loads per chunk), which
   leaves the server's own share.

Random weights: what the model says is noise; only the timings mean something.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers loads: never reach a hub

import openai
import soundfile
import torch

from afnext.bench import machine, write_json
from afnext.engine import Engine
from afnext.events import TextDelta
from afnext.model import load
from afnext.pool import audio_key
from afnext.sampling import GenerationOptions
from afnext.session import Session
from afnext.tiny import param_count, write_checkpoint
from app.guard import REQUESTS_PER_S
from tests.web.running import free_port, running

QUESTION, FOLLOW_UP = "What happens in this recording?", "And what happens after that?"
SHORT = "What is the quick brown fox?"
RECORDING_TOKENS = 8  # reply length of both recording turns: only their first chunk is timed
TARGET_SPEEDUP, TARGET_REQUEST_MS, TARGET_CHUNK_MS = 50.0, 5.0, 1.0
SETTLE_S = 0.05  # pause between sides, so one side's spinning threads do not slow the other's turn
RATE = 16_000
WARM_UP = 5  # overhead rounds run before the measured ones: the first few API requests are slower
API_INTERVAL_S = 1.5 / REQUESTS_PER_S  # at least this long between two API requests
SHORT_TOKENS = 2  # the shorter of the two reply lengths the overhead line goes through
# Torch threads of both sides of the overhead part. With two, a turn after an idle pause waits for
# torch's second thread to wake (measured on 2 cores: a 2-token turn 4.8 ms back to back, 5-22 ms
# after a 50 ms pause, 17.7 ms median), noise that would bury the API's own milliseconds; with one,
# 5.9 ms (5.2-7.8).
OVERHEAD_THREADS = 1


def write_recording(path: Path, seconds: float, seed: int = 0) -> Path:
    """A 16 kHz mono 16-bit WAV of a tone and noise: any audio times the same."""
    rng = np.random.default_rng(seed)
    n = int(seconds * RATE)
    with soundfile.SoundFile(path, "w", RATE, 1, "PCM_16") as f:
        for start in range(0, n, RATE * 60):  # a minute at a time: no 600 s float64 array
            t = np.arange(start, min(n, start + RATE * 60)) / RATE
            f.write((0.2 * np.sin(2 * np.pi * 220 * t) + 0.05 * rng.standard_normal(len(t))).astype(np.float32))
    return path


@contextmanager
def serve(folder: Path, workdir: Path, torch_threads: int | None = None):
    """`python -m app --model FOLDER` on a free port; yields an openai client once /health is 200."""
    port = str(free_port())
    env = dict(os.environ, HF_HUB_OFFLINE="1", **({"OMP_NUM_THREADS": str(torch_threads)} if torch_threads else {}))
    args = ["-m", "app", "--model", str(folder), "--device", "cpu", "--port", port]
    with running(args, workdir / f"app-{port}.log", env=env) as (_, url):
        with urllib.request.urlopen(url + "v1/models", timeout=30) as response:
            roots = {m["root"] for m in json.load(response)["data"]}
        # The app falls back to its demo model when a checkpoint fails to load: that would time the wrong model.
        assert roots == {str(folder)}, f"the server runs {roots}, not {folder}"
        yield openai.OpenAI(base_url=url + "v1", api_key="unused", max_retries=0, timeout=900)


def api_turn(client: openai.OpenAI, messages: list[dict], tokens: int) -> dict:
    """One streamed request of exactly `tokens` greedy tokens; client-side times of its content chunks."""
    t0 = time.perf_counter()
    stream = client.chat.completions.create(
        model="instruct", messages=messages, max_tokens=tokens, stream=True, stream_options={"include_usage": True},
        extra_body={"ignore_eos": True, "repetition_penalty": 1.0})  # the library side's options, on the wire
    times, text, usage = [], [], None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            times.append(time.perf_counter())
            text.append(chunk.choices[0].delta.content)
        usage = chunk.usage or usage
    return _figures(t0, times, time.perf_counter(), "".join(text)) | {"usage": usage}


def raw_turn(http: httpx.Client, messages: list[dict], tokens: int) -> dict:
    """The same request as `api_turn` with a bare HTTP client: what the server costs, without the
    SDK's own work (its request building and a pydantic model per chunk)."""
    body = {"model": "instruct", "messages": messages, "max_tokens": tokens, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True, "repetition_penalty": 1.0}
    t0 = time.perf_counter()
    times, text = [], []
    with http.stream("POST", "chat/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith("data: {"):
                choices = json.loads(line[6:]).get("choices")
                if choices and choices[0]["delta"].get("content"):
                    times.append(time.perf_counter())
                    text.append(choices[0]["delta"]["content"])
    return _figures(t0, times, time.perf_counter(), "".join(text))


def library_turn(engine: Engine, text: str, tokens: int) -> dict:
    """The same turn on a fresh in-process Session: times of its TextDeltas."""
    options = GenerationOptions(max_new_tokens=tokens, min_new_tokens=tokens, repetition_penalty=1.0)
    t0 = time.perf_counter()
    times, pieces = [], []
    for event in Session(engine).ask(text, options=options):
        if isinstance(event, TextDelta) and event.text:
            times.append(time.perf_counter())
            pieces.append(event.text)
    return _figures(t0, times, time.perf_counter(), "".join(pieces))


def _figures(t0: float, times: list[float], end: float, text: str) -> dict:
    assert times, "the reply had no content: nothing to time"
    return {"ttft_s": times[0] - t0, "first_to_last_s": times[-1] - times[0], "wall_s": end - t0,
            "chunks": len(times), "text": text}


def user_with_audio(path: Path, text: str) -> dict:
    data = base64.b64encode(path.read_bytes()).decode()
    return {"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": data, "format": "wav"}},
                                        {"type": "text", "text": text}]}


def bench_recording(client: openai.OpenAI, path: Path, folder: Path, seconds: float) -> dict:
    """First question on the recording, then the follow-up resending the whole history."""
    warm = write_recording(path.with_name("warm.wav"), 2.0)  # first-call costs (lazy imports, allocator) timed nowhere
    api_turn(client, [user_with_audio(warm, QUESTION)], RECORDING_TOKENS)
    history = [user_with_audio(path, QUESTION)]  # encoded before the clock starts: a client's file, read once
    first = api_turn(client, history, RECORDING_TOKENS)
    history += [{"role": "assistant", "content": first["text"]}, {"role": "user", "content": FOLLOW_UP}]
    follow = api_turn(client, history, RECORDING_TOKENS)
    cached = follow["usage"].prompt_tokens_details.cached_tokens
    speedup = first["ttft_s"] / follow["ttft_s"]
    costs = resent_audio_costs(history)
    return {"audio_s": seconds, "wav_mb": round(path.stat().st_size / 1e6, 1),
            "request_mb": round(len(json.dumps(history)) / 1e6, 1),
            "first_ttft_s": first["ttft_s"], "first_prompt_tokens": first["usage"].prompt_tokens,
            "first_cached_tokens": first["usage"].prompt_tokens_details.cached_tokens,
            "follow_up_ttft_s": follow["ttft_s"], "follow_up_prompt_tokens": follow["usage"].prompt_tokens,
            "cached_tokens": cached, "new_tokens_prefilled": follow["usage"].prompt_tokens - cached,
            "follow_up_resent_audio_s": costs, "follow_up_resent_audio_total_s": sum(costs.values()),
            "speedup": speedup, "target_speedup": TARGET_SPEEDUP, "met": speedup >= TARGET_SPEEDUP}


def resent_audio_costs(history: list[dict]) -> dict:
    """Work redone for the resent recording on every follow-up, timed in-process with the functions
    the client and server use, while the server idles: the client encodes the whole history, the
    server parses it and keys the clip by a hash of its base64 text (the pool then finds the session
    that holds it, so the clip is neither decoded nor featurized again). Timed apart from the request
    (the client's encoding is json.dumps, not the SDK's), so an estimate of that share of the TTFT."""
    marks = [time.perf_counter()]
    body = json.dumps({"model": "instruct", "messages": history})  # the client's encoding (the SDK's is similar)
    marks.append(time.perf_counter())
    parsed = json.loads(body)
    marks.append(time.perf_counter())
    audio_key(parsed["messages"][0]["content"][0]["input_audio"]["data"].encode("ascii", "replace"))
    marks.append(time.perf_counter())
    names = ("client_json_encode_s", "server_json_parse_s", "hash_s")
    return dict(zip(names, np.diff(marks).tolist()))


def bench_overhead(client: openai.OpenAI, engine: Engine, requests: int, tokens: int) -> dict:
    """Library, SDK and bare-HTTP turns of SHORT_TOKENS and `tokens` tokens, taken in turn; the
    overhead line through the two lengths' medians (see the module docstring)."""
    question = [{"role": "user", "content": SHORT}]
    http = httpx.Client(base_url=str(client.base_url), timeout=900)
    sides = {"library": lambda n: library_turn(engine, SHORT, n), "api": lambda n: api_turn(client, question, n),
             "raw_http": lambda n: raw_turn(http, question, n)}
    lengths = (SHORT_TOKENS, tokens)
    for _ in range(WARM_UP):  # first-call costs (imports, allocator, connection) in no figure
        for turn in sides.values():
            turn(tokens)
    runs = {side: {n: [] for n in lengths} for side in sides}
    last_request = time.monotonic()
    for _ in range(requests):
        for n in lengths:
            for side, turn in sides.items():
                time.sleep(SETTLE_S)
                if side != "library":  # within the API's per-address rate (app/guard.py): no 429 mid-run
                    time.sleep(max(0.0, last_request + API_INTERVAL_S - time.monotonic()))
                    last_request = time.monotonic()
                runs[side][n].append(turn(n))
    lib = runs["library"]
    result = {"requests": requests, "tokens": list(lengths),
              "library": {str(n): _side(lib[n]) for n in lengths}}
    for client_side in ("api", "raw_http"):
        mine = runs[client_side]
        figures = overhead_line({n: [c["wall_s"] - b["wall_s"] for b, c in zip(lib[n], mine[n])] for n in lengths},
                                {n: statistics.median(c["chunks"] for c in mine[n]) for n in lengths})
        figures |= {"runs": {str(n): _side(mine[n]) for n in lengths},
                    # the same turn on both sides: the same text, one SSE chunk per text delta
                    "same_text": all(b["text"] == c["text"] and b["chunks"] == c["chunks"]
                                     for n in lengths for b, c in zip(lib[n], mine[n]))}
        result[client_side] = figures
    api = result["api"]
    result |= {"target_request_ms": TARGET_REQUEST_MS, "target_chunk_ms": TARGET_CHUNK_MS,
               # A request's overhead is its fixed part plus its chunks' (each target on its own part).
               "met": api["per_request_fixed_ms"] <= TARGET_REQUEST_MS and api["per_chunk_ms"] <= TARGET_CHUNK_MS}
    return result


def overhead_line(differences: dict[int, list[float]], chunks: dict[int, float], resamples: int = 2000,
                  seed: int = 0) -> dict:
    """Per length n, the paired wall-time differences (API - library) and the reply's chunks → the
    line through the two lengths' medians: per_chunk_ms (slope), per_request_fixed_ms (intercept),
    per_request_ms (the median difference at the longer length), and a 95% bootstrap interval of
    the first two (rounds resampled, each round's pair of lengths kept together)."""
    short, long = sorted(differences)
    d = {n: np.asarray(differences[n]) * 1e3 for n in (short, long)}
    span = chunks[long] - chunks[short]
    assert span > 0, "the two lengths gave replies of as many chunks: no slope to measure"

    def line(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
        slope = (float(np.median(b)) - float(np.median(a))) / span
        return float(np.median(a)) - chunks[short] * slope, slope

    fixed, per_chunk = line(d[short], d[long])
    rng, rounds = np.random.default_rng(seed), len(d[short])
    draws = np.array([line(d[short][i], d[long][i]) for i in rng.integers(0, rounds, (resamples, rounds))])
    low, high = np.percentile(draws, [2.5, 97.5], axis=0)
    return {"per_request_ms": float(np.median(d[long])), "per_request_fixed_ms": fixed, "per_chunk_ms": per_chunk,
            "ci95": {"per_request_fixed_ms": [low[0], high[0]], "per_chunk_ms": [low[1], high[1]]},
            "chunks": {str(n): chunks[n] for n in (short, long)},
            "per_request_s": {str(n): differences[n] for n in (short, long)}}


def _side(runs: list[dict]) -> dict:
    return {key: [r[key] for r in runs] for key in ("wall_s", "first_to_last_s", "ttft_s", "chunks")}


def overhead(folder: Path, workdir: Path, args: argparse.Namespace) -> dict:
    """The overhead part: a server of its own and an in-process engine on the same checkpoint, both
    on OVERHEAD_THREADS torch threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(OVERHEAD_THREADS)
    engine = Engine(load(str(folder), device="cpu"))
    try:
        with serve(folder, workdir, torch_threads=OVERHEAD_THREADS) as client:
            return {"torch_threads": OVERHEAD_THREADS} | bench_overhead(client, engine, args.requests, args.tokens)
    finally:
        engine.close()
        torch.set_num_threads(threads)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python bench/api.py", description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=["tiny", "mid"], default="mid", help="model for the recording follow-up")
    p.add_argument("--overhead-size", choices=["tiny", "mid"], default="tiny", help="model for the overhead")
    p.add_argument("--recording-seconds", type=float, default=600.0)
    p.add_argument("--requests", type=int, default=100, help="rounds of paired turns for the overhead medians")
    p.add_argument("--tokens", type=int, default=32, help="reply tokens of the longer overhead turn")
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args(argv)
    if args.tokens <= SHORT_TOKENS or args.requests < 1:
        p.error(f"--tokens must be over {SHORT_TOKENS} (the shorter length) and --requests at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args, started = parse(argv), time.perf_counter()
    result = {"command": "python bench/api.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "date": datetime.date.today().isoformat(), "machine": machine(torch.device("cpu")), "models": {},
              "load_average_at_start": os.getloadavg()[0]}  # other work on the CPUs skews every figure
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        folders = {size: write_checkpoint(work / size, size) for size in {args.size, args.overhead_size}}
        for part, size in (("recording", args.size), ("overhead", args.overhead_size)):
            result["models"][part] = {"size": size, "parameters": param_count(folders[size]), "dtype": "float32",
                                      "weights": "random"}
        path = write_recording(work / "recording.wav", args.recording_seconds)
        with serve(folders[args.size], work) as client:
            result["recording"] = bench_recording(client, path, folders[args.size], args.recording_seconds)
            print("done: recording", file=sys.stderr, flush=True)
        # The recording's server is gone: it takes no CPU from this part.
        result["overhead"] = overhead(folders[args.overhead_size], work, args)
    result["targets_met"] = {"follow_up_speedup": result["recording"]["met"], "overhead": result["overhead"]["met"]}
    result["run_s"], result["load_average_at_end"] = time.perf_counter() - started, os.getloadavg()[0]
    write_json(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
