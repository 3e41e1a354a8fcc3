"""The speech detectors the endpointer (afnext/vad.py) runs frame by frame, and the choice between them.

Speech probability comes from Silero VAD's ONNX model (the file inside the `silero-vad` wheel) run
on onnxruntime alone, in 32 ms frames, each seen with the last 4 ms of the one before; the process
shares one session. webrtcvad says speech or not per 30 ms frame; it calls steady tones and loud noise
speech, Silero does not. "auto" runs Silero where it can, else webrtcvad alone with a logged warning.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import threading

import numpy as np

from .audio import SAMPLE_RATE

log = logging.getLogger(__name__)

BACKENDS = ("auto", "silero", "webrtc")
SILERO_FRAME_SAMPLES = 512  # 32 ms at 16 kHz: the only frame size Silero VAD takes at this rate
SILERO_CONTEXT_SAMPLES = 64  # samples of the previous frame Silero sees again before each frame
WEBRTC_FRAME_SAMPLES = 480  # 30 ms: the longest frame webrtcvad accepts (10/20/30 ms)
MAX_FRAMES_PER_CALL = 512  # Silero frames per onnxruntime call (16 s): bounds the call's memory

# silero-vad >= 6.2.2 ships a "sequence" export that runs many frames per call with the same
# numbers as the per-frame model (bit-exact, checked in the tests): on a whole file it measured
# ~450x real time against ~230x for one call per frame, whose cost is mostly call overhead.
# Older wheels have only the per-frame model, which is used then.
_SEQUENCE_MODEL = "silero_vad_16k_sequence.onnx"
_FRAME_MODEL = "silero_vad.onnx"
SILERO_STATE_SHAPE = (2, 1, 128)  # LSTM (h, c) carried from frame to frame


class _SileroModel:
    """Silero VAD on onnxruntime: [n, 576] frames (64 context + 512 new samples) → n probabilities."""

    def __init__(self, path: str) -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = 1  # a 32 ms frame is too small to split across threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # the sequence export warns about unused initializers
        self.session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.sequence = os.path.basename(path) == _SEQUENCE_MODEL

    def run(self, frames: np.ndarray, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities [n] of consecutive frames and the state after the last one.

        Sessions are safe to run from several threads; the state is the caller's.
        """
        probabilities = []
        if self.sequence:
            for i in range(0, len(frames), MAX_FRAMES_PER_CALL):
                block = np.ascontiguousarray(frames[i : i + MAX_FRAMES_PER_CALL])
                values, h, c = self.session.run(None, {"input": block, "h": state[:1], "c": state[1:]})
                probabilities.append(values.reshape(-1))
                state = np.concatenate([h, c])
        else:
            rate = np.array(SAMPLE_RATE, np.int64)
            for frame in frames:
                value, state = self.session.run(None, {"input": frame[None], "state": state, "sr": rate})
                probabilities.append(value.reshape(-1))
        return np.concatenate(probabilities), state


_model_lock = threading.Lock()
_model: _SileroModel | None = None


def silero_model() -> _SileroModel:
    """The process's one Silero session, created on first use."""
    global _model
    with _model_lock:
        if _model is None:
            _model = _SileroModel(_silero_path())
        return _model


def _silero_path(names: tuple[str, ...] = (_SEQUENCE_MODEL, _FRAME_MODEL)) -> str | None:
    """The first of `names` in the installed silero-vad wheel's data folder, or None.

    Found with find_spec, which locates the package without running its __init__ (that imports
    torch and loads the TorchScript model).
    """
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or not spec.submodule_search_locations:
        return None
    for name in names:
        path = os.path.join(list(spec.submodule_search_locations)[0], "data", name)
        if os.path.isfile(path):
            return path
    return None


def _silero_missing() -> str | None:
    """Why the Silero backend cannot run here, or None when it can."""
    if importlib.util.find_spec("onnxruntime") is None:
        return "onnxruntime is not installed (pip install onnxruntime)"
    if _silero_path() is None:
        return "the silero-vad wheel with its ONNX model is not installed (pip install silero-vad)"
    return None


def choose_backend(backend: str) -> str:
    """The backend "auto", "silero" or "webrtc" runs on here: "silero" or "webrtc" (see Endpointer)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "webrtc":
        return backend
    missing = _silero_missing()
    if missing is None:
        return "silero"
    if backend == "silero":
        raise RuntimeError(f"The silero VAD backend cannot run: {missing}.")
    log.warning("Silero VAD cannot run: %s; using webrtcvad alone, which calls steady tones speech.", missing)
    return "webrtc"


def load_webrtcvad():
    """The `webrtcvad` module, or RuntimeError naming the package to install when it is missing."""
    try:
        import webrtcvad
    except ImportError as error:
        raise RuntimeError("webrtcvad is not installed; run `pip install webrtcvad-wheels`.") from error
    return webrtcvad
