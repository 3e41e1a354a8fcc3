"""Memory held after 30 Recordings conversations (5-minute recordings, one question each on the tiny
model) are opened and closed, with and without handing freed memory back to the system (malloc_trim).

    python bench/recordings_memory.py trim      # what the app does
    python bench/recordings_memory.py notrim    # the same without malloc_trim

Prints one JSON line of resident memory (MB): before, with all 30 open, after closing them.
"""
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile

os.environ["HF_HUB_OFFLINE"] = "1"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from app import recording_questions, recordings
from app import desk as desk_module
from app.backend import Backend
from afnext.engine import Engine
from afnext.model import load
from afnext.tts import load_synthesizer

def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024

mode = sys.argv[1] if len(sys.argv) > 1 else "trim"
if mode == "notrim":
    desk_module._LIBC = None
tmp = Path(tempfile.mkdtemp())
src = tmp / "talk.wav"
soundfile.write(src, (np.random.default_rng(0).standard_normal(16000 * 300) * 0.1).astype(np.float32), 16000)
backend = Backend(Engine(load("tiny", device="cpu")), None, load_synthesizer("espeak"))
backend.think = backend.main
live = desk_module.live_conversations(per_group=100, most=100, max_bytes=1 << 40)  # holds all 30
rec = recordings.open_recording(str(src), tmp)  # warm-up: imports, first encode
list(recording_questions.ask(rec, "What?", False, backend)); del rec
desk_module.release_memory()
base = rss_mb()
for i in range(30):
    rec = recordings.open_recording(str(src), tmp)
    list(recording_questions.ask(rec, "What is said?", False, backend))
    live.put(f"s{i}", "bench", f"10.0.0.{i}", rec)
    del rec
peak = rss_mb()
for i in range(30):
    live.drop(f"s{i}")  # let go: the registry releases its memory (malloc_trim, unless notrim)
time.sleep(0.5)
after = rss_mb()
print(json.dumps({"mode": mode, "baseline_mb": round(base), "30_open_mb": round(peak), "after_close_mb": round(after),
                  "held_after_close_mb": round(after - base)}))
backend.main.close()
