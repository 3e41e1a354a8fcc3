"""The command line as a user runs it: `ask` and the JSON-lines `chat`, errors included."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
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
    assert first["parts"]["prompt_tokens"] > 31 * 60 * 25 and first["parts"]["cached_tokens"] == 0
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


def test_argument_mistakes_are_one_line_before_the_model_loads(tmp_path, capsys):
    from afnext.__main__ import main

    cases = [  # (argv, exit status, what the sentence says); /nonexistent would fail only later, loading
        (["ask", "--model", "/nonexistent", str(tmp_path / "missing.wav"), "What?"], 1, "missing.wav was not found"),
        (["ask", "--model", "/nonexistent", "--max-new-tokens", "0", wav(tmp_path / "a.wav", 1), "Q"], 1,
         "max_new_tokens"),
        (["chat", "--model", "/nonexistent", "--jsonl", "--conversation", "../x"], 1, "conversation id"),
        (["ask", "--model", "tiny", "--device", "bogus", str(tmp_path / "a.wav"), "Q"], 2, "is not a device"),
        (["ask", "--model", "tiny", "--dtype", "bogus", str(tmp_path / "a.wav"), "Q"], 2, "invalid choice"),
        (["chat", "--model", "tiny", "--jsonl", "--store", str(tmp_path / "s")], 2, "--conversation ID"),
    ]
    for argv, status, says in cases:
        try:
            got = main(argv)
        except SystemExit as exit_:
            got = exit_.code
        err = capsys.readouterr().err
        assert got == status and says in err.strip().splitlines()[-1], (argv, err)
    assert not (tmp_path / "s").exists()  # --store without --conversation would have kept nothing there


def test_ctrl_c_mid_answer_and_a_closed_pipe_end_in_one_line(tiny_dir, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    store = str(tmp_path / "store")
    args = [sys.executable, "-m", "afnext", "chat", "--model", str(tiny_dir), "--jsonl", "--conversation", "c",
            "--store", store]
    proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=ROOT)
    assert json.loads(proc.stdout.readline()) == {"conversation": "c", "turns": 0}
    proc.stdin.write(json.dumps({"text": "Hi", "max_new_tokens": 2}) + "\n")
    proc.stdin.flush()
    assert json.loads(proc.stdout.readline())["token_ids"]
    proc.stdin.write(json.dumps({"text": "Go on", "min_new_tokens": 100000, "max_new_tokens": 100000}) + "\n")
    proc.stdin.flush()
    time.sleep(0.5)  # the long answer is under way
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith("Interrupted; the conversation is kept, a reply cut off as far")
    # the answered turn is there; then a reader that stops after the first line (| head -1)
    proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env, cwd=ROOT)
    assert json.loads(proc.stdout.readline())["turns"] >= 1
    proc.stdout.close()
    proc.stdin.write((json.dumps({"text": "More", "max_new_tokens": 2}) + "\n").encode() * 3)
    proc.stdin.close()
    proc.wait(timeout=60)
    err = proc.stderr.read().decode()
    assert proc.returncode == 141 and "Traceback" not in err and "Loading weights" not in err, err


def test_help_piped_to_a_closed_reader_is_quiet(capsys, monkeypatch):
    from afnext import cli

    class Gone(io.StringIO):
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(sys, "stdout", Gone())
    assert cli.main(["--help"]) == 141  # afnext --help | head -0


def test_chat_with_stdin_closed_or_at_a_terminal(tiny_dir, capsys, monkeypatch):
    from afnext.__main__ import main

    monkeypatch.setattr(sys, "stdin", None)  # started with `<&-`
    assert main(["chat", "--model", str(tiny_dir), "--jsonl"]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == "error: Standard input is closed; send one JSON turn per line on it."

    class Terminal(io.TextIOWrapper):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stdin", Terminal(io.BytesIO(b'{"text": "Hi", "max_new_tokens": 2}\n')))
    assert main(["chat", "--model", str(tiny_dir), "--jsonl"]) == 0
    out, err = capsys.readouterr()
    assert 'Type one JSON turn per line, e.g. {"text": "Hello"}' in err and json.loads(out)["token_ids"]


def test_conversations_says_when_there_are_none(tmp_path, capsys):
    from afnext.__main__ import main
    from afnext.store import Store

    Store(tmp_path / "store")  # a store whose conversations have all gone
    assert main(["conversations", "--store", str(tmp_path / "store")]) == 0
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("No conversations are kept at")


def test_tiny_cli_refuses_folders_it_would_spoil(tmp_path, capsys, monkeypatch):
    from afnext.tiny import main

    monkeypatch.chdir(tmp_path)  # `python -m afnext.tiny ""` wrote into the current folder
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text("my own")
    (tmp_path / "file").write_text("x")
    for argv, status, says in (([""], 2, "give a folder"), (["--seed", str(2**70), "new"], 2, "give a seed"),
                               ([str(mine)], 1, "already holds other files"), ([str(tmp_path / "file")], 1, "is a file"),
                               ([str(tmp_path / "file" / "sub")], 1, "Could not write the checkpoint")):
        try:
            got = main(argv)
        except SystemExit as exit_:
            got = exit_.code
        assert got == status and says in capsys.readouterr().err, argv
    assert (mine / "config.json").read_text() == "my own" and sorted(os.listdir(tmp_path)) == ["file", "mine"]


def test_vad_cli_hears_a_recording_over_30_minutes(tmp_path, capsys):
    from afnext import vad

    path = tmp_path / "long.wav"  # 1 s of noise (a turn for webrtc), then silence up to 31 minutes
    samples = np.zeros(31 * 60 * 16000, np.int16)
    samples[:16000] = np.random.default_rng(0).integers(-3000, 3000, 16000)
    sf.write(path, samples, 16000)
    assert vad.main([str(path), "--backend", "webrtc"]) == 0
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 1 and err.startswith("1 turn, webrtc backend")
