"""Shared fixtures: everything offline, on CPU, with random-weight checkpoints built in seconds."""

from __future__ import annotations

import os
import shutil
import tempfile

_MADE: list[str] = []  # this run's folders, removed when it ends


def _folder(prefix: str) -> str:
    _MADE.append(tempfile.mkdtemp(prefix=prefix))
    return _MADE[-1]


os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported anywhere: never reach a hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# `--model tiny` writes its random-weight checkpoints here, not into the user's ~/.cache.
if "AFNEXT_TINY_DIR" not in os.environ:
    os.environ["AFNEXT_TINY_DIR"] = _folder("afnext-tiny-")
# Conversations the app and the CLI keep (afnext/store.py) go here, not into the user's ~/.local/share.
os.environ["AFNEXT_DATA"] = _folder("afnext-data-")


def pytest_sessionfinish(session, exitstatus):
    for folder in _MADE:
        shutil.rmtree(folder, ignore_errors=True)

import numpy as np
import pytest
from hypothesis import settings

# Fuzzing explores new inputs on developers' machines; CI (CI=true) replays the same ones every run,
# so a red CI names a real regression, not the luck of the draw. Examples that once failed are pinned
# in the tests with @example.
settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture(scope="session")
def tiny_dir():
    """A freshly written random-weight AF-Next-shaped checkpoint (≈0.3 M parameters): the one
    `--model tiny` uses too, in this run's AFNEXT_TINY_DIR, so it is written once."""
    from afnext.model import ensure_tiny

    return ensure_tiny()


@pytest.fixture(scope="session")
def loaded(tiny_dir):
    from afnext.model import load

    return load(str(tiny_dir), device="cpu")


@pytest.fixture(scope="session")
def engine(loaded):
    from afnext.engine import Engine

    eng = Engine(loaded)
    yield eng
    eng.close()


@pytest.fixture(scope="session")
def buffers_engine(loaded):
    """An engine keeping each session's KV cache in buffers of its own (afnext/kvcache.py), whatever
    the default is (the `engine` fixture has the default)."""
    from afnext.engine import Engine

    eng = Engine(loaded, kv="buffers")
    yield eng
    eng.close()


@pytest.fixture(scope="session")
def paged_engine(loaded):
    """An engine keeping KV caches in a paged pool (afnext/paged.py), small enough that a few
    conversations with clips fill it."""
    from afnext.engine import Engine

    eng = Engine(loaded, kv="paged", kv_pool_tokens=32 * 256)
    yield eng
    eng.close()


def bench_script(name: str):
    """bench/NAME.py as a module (bench/ is a folder of scripts, not a package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def noise(seconds: float, seed: int = 0) -> np.ndarray:
    """Quiet white noise at 16 kHz: any audio will do for a random-weight model."""
    return (np.random.default_rng(seed).standard_normal(round(seconds * 16000)) * 0.1).astype(np.float32)


@pytest.fixture
def decodes(monkeypatch) -> list[float]:
    """Seconds of 16 kHz audio each pass of the decoder gave: every file or upload decoded goes through
    afnext.media._decoded once per pass (load_audio, stream_audio, so split.py too)."""
    from afnext import media

    passes, decoded = [], media._decoded

    def counted(*args):
        passes.append(0.0)
        at = len(passes) - 1
        for block in decoded(*args):
            passes[at] += block.size / 16000
            yield block
    monkeypatch.setattr(media, "_decoded", counted)
    return passes
