"""What coming back to a kept conversation costs: a 10-minute recording's conversation, stored after
its first turn, resumed in a new session (as after a restart), against a follow-up in the session
that never stopped. Prints JSON.

    python bench/store_resume.py [--size mid] [--recording-seconds 600] [--out FILE]

1. The live path: a session asks about the recording (the first question, timed), then a follow-up
   (its time to the first token: what a conversation that never stopped pays).
2. The kept path: that first turn goes into a store (`afnext/store.py`); a new session is rebuilt
   from it (`restore`: the recording decoded again from its stored bytes, its features made, the
   reply put back as its token ids) and asked the same follow-up. Resume cost = rebuilding + that
   follow-up's time to the first token, which computes the whole KV cache again (the cache is not
   stored). The follow-up's reply must equal the live one's (greedy): same tokens, same answer.

Random weights: what the model says is noise; only the timings mean something.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import soundfile
import torch

from afnext.bench import machine, write_json
from afnext.engine import Engine
from afnext.events import TextDelta, TurnDone
from afnext.journal import restore
from afnext.model import load
from afnext.sampling import GenerationOptions
from afnext.session import Session
from afnext.store import Store, StoredTurn
from afnext.tiny import param_count, write_checkpoint

OPTIONS = GenerationOptions(max_new_tokens=8, temperature=0.0)
QUESTION, FOLLOW_UP = "What happens in this recording?", "And what happens after that?"


def turn(session: Session, text: str, audio=None) -> tuple[float, object]:
    """(seconds to the first text, the reply) of one greedy turn."""
    t0, first, reply = time.perf_counter(), None, None
    for event in session.ask(text, audio, options=OPTIONS):
        if isinstance(event, TextDelta) and first is None:
            first = time.perf_counter() - t0
        elif isinstance(event, TurnDone):
            reply = event.reply
    return (first if first is not None else time.perf_counter() - t0), reply


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python bench/store_resume.py", description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=["tiny", "mid"], default="mid")
    p.add_argument("--recording-seconds", type=float, default=600.0)
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        folder = write_checkpoint(work / args.size, args.size)
        engine = Engine(load(str(folder), device="cpu"))
        try:
            rng = np.random.default_rng(0)
            wav = work / "recording.wav"
            soundfile.write(wav, (0.1 * rng.standard_normal(int(args.recording_seconds * 16000))).astype(np.float32),
                            16000, subtype="PCM_16")
            data = wav.read_bytes()
            turn(Session(engine), "Warm up.", (16000, np.zeros(32000, np.float32)))  # first-call costs timed nowhere
            live = Session(engine)
            first_s, first = turn(live, QUESTION, data)
            live_follow_s, live_follow = turn(live, FOLLOW_UP)

            store = Store(work / "store")
            cid = store.create("cli", model=engine.loaded.name)
            store.add_exchange(cid, StoredTurn("user", QUESTION), StoredTurn("assistant", first.text,
                                                                             token_ids=first.token_ids),
                               audio=(data, ".wav"))
            t0 = time.perf_counter()
            kept = Session(engine)
            restore(kept, Store(work / "store"), cid)  # a store opened afresh, as after a restart
            rebuild_s = time.perf_counter() - t0
            kept_follow_s, kept_follow = turn(kept, FOLLOW_UP)
        finally:
            engine.close()
        result = {
            "command": "python bench/store_resume.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "date": datetime.date.today().isoformat(), "machine": machine(torch.device("cpu")),
            "model": {"size": args.size, "parameters": param_count(folder), "dtype": "float32", "weights": "random"},
            "recording_s": args.recording_seconds, "recording_mb": round(len(data) / 1e6, 1),
            "first_question_ttft_s": first_s, "conversation_tokens": len(live.tokens),
            "live_follow_up_ttft_s": live_follow_s,
            "resume_rebuild_s": rebuild_s, "resumed_follow_up_ttft_s": kept_follow_s,
            "resume_total_s": rebuild_s + kept_follow_s,
            "resume_vs_first_question": (rebuild_s + kept_follow_s) / first_s,
            "same_reply": kept_follow.token_ids == live_follow.token_ids
                          and kept_follow.prompt_tokens == live_follow.prompt_tokens,
        }
    write_json(result, args.out)
    return 0 if result["same_reply"] else 1


if __name__ == "__main__":
    sys.exit(main())
