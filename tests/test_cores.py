"""The CPU's cores belong to the engine's thread (afnext/cores.py): other threads start no OpenMP team.

A team is worker threads, so it shows in /proc/self/task. The checks run in a fresh interpreter, where
no other test's engine or thread comes and goes while the threads are counted."""

import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self/task") or (os.cpu_count() or 1) < 2,
                                reason="counts threads in /proc (Linux), on 2 cores or more")

SCRIPT = textwrap.dedent("""
    import os, threading, time
    import numpy as np
    import torch
    from afnext.clip import prepare_clip
    from afnext.cores import one_core
    from afnext.engine import Engine
    from afnext.session import Session
    from afnext.sampling import GenerationOptions
    from afnext.tiny import build_in_memory

    def tasks():
        return len(os.listdir("/proc/self/task"))

    def settled(target=None):  # threads that ended leave /proc a moment later
        last = -1
        for _ in range(100):
            now = tasks()
            if (target is not None and now <= target) or (target is None and now == last):
                return now
            last = now
            time.sleep(0.1)
        return tasks()

    def added_by(fn):
        box = {}
        def run():
            before = tasks()
            fn()
            box["added"] = tasks() - before
        thread = threading.Thread(target=run)
        thread.start()
        thread.join()
        return box["added"]

    build_in_memory("tiny")  # the tokenizer's own threads start here, and stay
    before = settled()
    loaded, _ = build_in_memory("mid")
    print("load", settled(before) - before)
    engine = Engine(loaded)
    session = Session(engine)
    for _ in session.ask("Hi", audio=np.random.default_rng(0).standard_normal(16000 * 40).astype(np.float32) * 0.1,
                         options=GenerationOptions(max_new_tokens=2)):
        pass
    settled()
    print("clip", added_by(lambda: prepare_clip(np.ones(16000 * 40, np.float32) * 0.1, loaded.mel_filters)))
    settled()
    print("fork", added_by(lambda: session.fork(2)))
    print("before", torch.get_num_threads())
    with one_core():
        pass
    print("after", torch.get_num_threads())
    engine.close()
""")


def test_loading_clips_and_forks_leave_no_openmp_team_behind():
    """Found profiling 8 conversations on 2 cores: every asking thread's log-mel features, and the
    loading thread, kept an OpenMP team; past one team per core libgomp's workers sleep between
    parallel regions, and the engine's 8-row decoding step took 1.5× as long."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.getcwd()}
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = dict(line.split() for line in done.stdout.splitlines() if line.split()[0] in ("load", "clip", "fork", "before", "after"))
    if seen["before"] == "1":
        pytest.skip("torch runs on one thread here: no thread starts a team")
    assert seen["load"] == "0", "loading the model left an OpenMP team in the loading thread"
    assert seen["clip"] == "0", "preparing a clip left an OpenMP team in the asking thread"
    assert seen["fork"] == "0", "forking a session left an OpenMP team in the forking thread"
    assert seen["after"] == seen["before"], "one_core did not give the thread its count back"
