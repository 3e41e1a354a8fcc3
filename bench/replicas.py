"""What Ray Serve replicas cost and give, in one run; prints JSON.

    python bench/replicas.py [--size tiny] [--requests 40] [--conversations 8] [--turns 3] [--tokens 16]
                             [--out FILE]

Three servers of the same checkpoint, one after another (each alone on the machine while measured):
`python -m app` (one process), `python -m app --replicas 1` and `python -m app --replicas 2` (CPU
replicas on a local Ray cluster). Against each, through a bare HTTP client (httpx), streamed:

1. `--requests` short requests one after another, each its own conversation with an `x-session-id`:
   medians of wall time and time to the first content chunk. The difference between one process
   and one replica is what the Serve proxy and its router add to a request.
2. `--conversations` conversations at once, `--turns` turns each (the whole history resent, as the
   API is used), `--tokens` greedy tokens a reply: wall time of the whole load and tokens a second.
   One replica against two: what a second replica gives on this machine (CPU replicas share its
   cores: on 2 cores the gain is what a second process's parallelism finds, not a second GPU's).

Random weights: only the timings mean something.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from afnext.bench import machine, write_json  # noqa: E402
from afnext.tiny import param_count, write_checkpoint  # noqa: E402
from tests.web.running import free_port, running  # noqa: E402

QUESTIONS = ("What is the quick brown fox?", "And what does it jump over?", "Say it once more, shorter.")


def ask(http: httpx.Client, session: str, messages: list[dict], tokens: int) -> dict:
    """One streamed request; its wall time, first-content time, answer and replica."""
    body = {"model": "instruct", "messages": messages, "max_tokens": tokens, "stream": True, "ignore_eos": True,
            "repetition_penalty": 1.0}
    t0, first, text = time.perf_counter(), None, []
    with http.stream("POST", "chat/completions", json=body, headers={"x-session-id": session}) as response:
        response.raise_for_status()
        replica = response.headers.get("x-afnext-replica")
        for line in response.iter_lines():
            if line.startswith("data: {"):
                choices = json.loads(line[6:]).get("choices")
                if choices and choices[0]["delta"].get("content"):
                    first = first or time.perf_counter()
                    text.append(choices[0]["delta"]["content"])
    assert first is not None, "a reply without content: nothing to time"
    return {"wall_s": time.perf_counter() - t0, "ttft_s": first - t0, "text": "".join(text), "replica": replica}


def one_by_one(http: httpx.Client, requests: int, tokens: int, tag: str) -> dict:
    runs = [ask(http, f"{tag}-single-{i}", [{"role": "user", "content": QUESTIONS[0]}], tokens)
            for i in range(requests)]
    return {"wall_ms_median": statistics.median(r["wall_s"] for r in runs) * 1e3,
            "ttft_ms_median": statistics.median(r["ttft_s"] for r in runs) * 1e3,
            "replicas_seen": len({r["replica"] for r in runs})}


def at_once(http: httpx.Client, conversations: int, turns: int, tokens: int, tag: str) -> dict:
    def converse(i: int) -> list[dict]:
        messages, out = [], []
        for question in QUESTIONS[:turns]:
            messages.append({"role": "user", "content": f"{question} ({i})"})  # each conversation its own
            run = ask(http, f"{tag}-conversation-{i}", messages, tokens)
            messages.append({"role": "assistant", "content": run["text"]})
            out.append(run)
        return out

    t0 = time.perf_counter()
    with ThreadPoolExecutor(conversations) as pool:
        runs = [r for conversation in pool.map(converse, range(conversations)) for r in conversation]
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "tokens_per_s": conversations * turns * tokens / wall,
            "ttft_ms_p50": statistics.median(r["ttft_s"] for r in runs) * 1e3,
            "replicas_seen": len({r["replica"] for r in runs})}


def measure(folder: Path, work: Path, replicas: int | None, args: argparse.Namespace) -> dict:
    port = str(free_port())
    argv = ["-m", "app", "--model", str(folder), "--device", "cpu", "--port", port, "--data", str(work / f"data-{port}")]
    if replicas is not None:
        argv += ["--replicas", str(replicas)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", AFNEXT_RAY_DASHBOARD="0", RAY_USAGE_STATS_ENABLED="0")
    started = time.perf_counter()
    with running(argv, work / f"app-{port}.log", env=env) as (_, url):
        ready_s = time.perf_counter() - started
        with httpx.Client(base_url=url + "v1", timeout=300) as http:
            tag = f"r{replicas}"
            ask(http, f"{tag}-warm", [{"role": "user", "content": QUESTIONS[0]}], args.tokens)  # first-call costs
            if replicas and replicas > 1:  # both replicas up before the clock starts
                deadline = time.monotonic() + 120
                while len({ask(http, f"{tag}-probe-{i}", [{"role": "user", "content": "hi"}], 1)["replica"]
                           for i in range(8)}) < replicas:
                    assert time.monotonic() < deadline, "not every replica came up"
            return {"start_to_healthy_s": ready_s,
                    "one_by_one": one_by_one(http, args.requests, args.tokens, tag),
                    "at_once": at_once(http, args.conversations, args.turns, args.tokens, tag)}


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python bench/replicas.py", description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=["tiny", "mid"], default="tiny")
    p.add_argument("--requests", type=int, default=40)
    p.add_argument("--conversations", type=int, default=8)
    p.add_argument("--turns", type=int, default=3, choices=[1, 2, 3])
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--out", help="also write the JSON here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args, started = parse(argv), time.perf_counter()
    result = {"command": "python bench/replicas.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "date": datetime.date.today().isoformat(), "machine": machine(torch.device("cpu")),
              "load_average_at_start": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        folder = write_checkpoint(work / args.size, args.size)
        result["model"] = {"size": args.size, "parameters": param_count(folder), "dtype": "float32", "weights": "random"}
        for name, replicas in (("one_process", None), ("replicas_1", 1), ("replicas_2", 2)):
            result[name] = measure(folder, work, replicas, args)
            print(f"done: {name}", file=sys.stderr, flush=True)
    single, one, two = (result[k] for k in ("one_process", "replicas_1", "replicas_2"))
    result["proxy_ms_per_request"] = one["one_by_one"]["wall_ms_median"] - single["one_by_one"]["wall_ms_median"]
    result["proxy_ms_to_first_token"] = one["one_by_one"]["ttft_ms_median"] - single["one_by_one"]["ttft_ms_median"]
    result["two_replicas_over_one"] = two["at_once"]["tokens_per_s"] / one["at_once"]["tokens_per_s"]
    result["run_s"], result["load_average_at_end"] = time.perf_counter() - started, os.getloadavg()[0]
    write_json(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
