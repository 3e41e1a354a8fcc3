"""The command line as a user runs it: `ask` and the JSON-lines `chat`, errors included."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "afnext", *args], input=stdin, capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=300)


def wav(path: Path, seconds: float, seed: int = 0) -> str:
    sf.write(path, np.random.default_rng(seed).uniform(-0.1, 0.1, round(seconds * 16000)), 16000)
    return str(path)


def test_chat_jsonl_session_goes_on_after_errors(tiny_dir, tmp_path):
    turns = [
        {"text": "What is this?", "audio": wav(tmp_path / "a.wav", 5), "max_new_tokens": 8},
        "this line is not json",
        {"text": "And this?", "audio": str(tmp_path / "missing.wav")},
        {"text": "Think about it.", "think": True, "max_new_tokens": 8, "repetition_penalty": 1.0},
        {"text": "Bad option", "temperature": "hot"},
        {"text": "Last", "audio": wav(tmp_path / "b.wav", 30.013, seed=1), "max_new_tokens": 8},
    ]
    lines = "\n".join(t if isinstance(t, str) else json.dumps(t) for t in turns) + "\n"
    outs = {}
    for flag in ([], ["--no-cache"]):
        proc = cli("chat", "--model", str(tiny_dir), "--jsonl", *flag, stdin=lines)
        assert proc.returncode == 0, proc.stderr
        assert "RANDOM weights" in proc.stderr
        outs[bool(flag)] = [json.loads(x) for x in proc.stdout.splitlines()]
    got = outs[False]
    assert len(got) == 6
    assert [("error" in r) for r in got] == [False, True, True, False, True, False]
    assert "not valid JSON" in got[1]["error"] and "missing.wav" in got[2]["error"]
    for r in (got[0], got[3], got[5]):
        assert set(r) == {"text", "reasoning", "answer", "steps", "token_ids", "prompt_tokens", "timings"}
        assert set(r["timings"]) == {"audio_s", "encode_s", "prefill_s", "ttft_s", "decode_tok_s", "new_tokens"}
        assert len(r["token_ids"]) == r["timings"]["new_tokens"] <= 8
    assert got[0]["prompt_tokens"] < got[3]["prompt_tokens"] < got[5]["prompt_tokens"]
    assert got[0]["timings"]["audio_s"] > 0 and got[3]["timings"]["audio_s"] == 0
    assert [r.get("token_ids") for r in got] == [r.get("token_ids") for r in outs[True]]


def test_ask_prints_the_answer(tiny_dir, tmp_path):
    proc = cli("ask", "--model", str(tiny_dir), wav(tmp_path / "a.wav", 2), "What is said?", "--max-new-tokens", "6")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() and "RANDOM weights" in proc.stderr


def test_ask_bad_audio_and_unavailable_model_are_one_line_errors(tiny_dir, tmp_path):
    bad = tmp_path / "x.mp3"
    bad.write_bytes(b"\x00" * 1000)
    proc = cli("ask", "--model", str(tiny_dir), str(bad), "What?")
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1].startswith("error: ")
    proc = cli("ask", "--model", "nvidia/audio-flamingo-next-hf", str(bad), "What?")
    assert proc.returncode == 2 and "--model tiny" in proc.stderr and "Traceback" not in proc.stderr


def test_a_clip_over_30_minutes_just_works_in_chat_and_ask(tiny_dir, tmp_path):
    long = str(tmp_path / "long.wav")
    sf.write(long, (np.random.default_rng(0).uniform(-0.1, 0.1, 31 * 60 * 16000) * 32767).astype(np.int16), 16000)
    turns = [{"text": "What happens?", "audio": long, "max_new_tokens": 6},
             {"text": "And then?", "max_new_tokens": 6},
             {"text": "Another clip", "audio": wav(tmp_path / "a.wav", 2)}]
    store = str(tmp_path / "store")  # kept: it goes on in a later run, its parts brought up to the turns before
    proc = cli("chat", "--model", str(tiny_dir), "--jsonl", "--conversation", "lecture", "--store", store,
               stdin="\n".join(map(json.dumps, turns)) + "\n")
    assert proc.returncode == 0, proc.stderr
    first, follow, other = [json.loads(x) for x in proc.stdout.splitlines()[1:]]
    assert first["timings"]["audio_s"] > 0 and first["token_ids"]
    assert "Part 1 of 2 (0:00–15:30)" in first["reasoning"] and "Part 2 of 2 (15:30–31:00)" in first["reasoning"]
    assert follow["timings"]["encode_s"] == 0 and follow["timings"]["audio_s"] == 0 and follow["token_ids"]
    assert "heard in parts" in other["error"]
    proc = cli("ask", "--model", str(tiny_dir), long, "What is said?", "--max-new-tokens", "6")
    assert proc.returncode == 0, proc.stderr
    assert "Listening to part 2 of 2 (15:30–31:00)…" in proc.stderr and proc.stdout.strip()
    later = cli("chat", "--model", str(tiny_dir), "--jsonl", "--conversation", "lecture", "--store", store,
                stdin=json.dumps({"text": "And at the end?", "max_new_tokens": 6}) + "\n")
    assert later.returncode == 0, later.stderr
    head, third = [json.loads(x) for x in later.stdout.splitlines()]
    assert head == {"conversation": "lecture", "turns": 2} and third["token_ids"] and third["timings"]["audio_s"] > 0
