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

COUNTING = textwrap.dedent("""
    import os, threading, time
    import numpy as np
    import torch
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
""")

SCRIPT = COUNTING + textwrap.dedent("""
    from afnext.clip import prepare_clip
    from afnext.cores import one_core

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


ONE_THREAD_ENGINE = COUNTING + textwrap.dedent("""
    print("threads", torch.get_num_threads())
    loaded, _ = build_in_memory("mid")
    engine = Engine(loaded, threads=1)
    time.sleep(0.5)
    before = settled()
    # this thread's features run in one_core, which puts this thread's count back (all of them)
    # before the engine's first step
    for _ in Session(engine).ask("Hi", audio=np.full(16000 * 5, 0.1, np.float32), options=GenerationOptions(max_new_tokens=2)):
        pass
    print("added", settled() - before)
    engine.close()
""")


def test_an_engine_on_one_thread_stays_on_one_whatever_other_threads_set():
    """Found measuring two engines on 2 cores (bench/two_engines.py): an engine told to use one thread
    ran its steps on two, with a team, because ATen sets a thread's count up at its first parallel op
    to the count some other thread set last, and setting it first did not count as that first use."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.getcwd()}
    done = subprocess.run([sys.executable, "-c", ONE_THREAD_ENGINE], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = dict(line.split() for line in done.stdout.splitlines() if line.split()[0] in ("threads", "added"))
    if seen["threads"] == "1":
        pytest.skip("torch runs on one thread here: no thread starts a team")
    assert seen["added"] == "0", "the one-thread engine's first step started an OpenMP team"
