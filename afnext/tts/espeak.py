"""espeak-ng speech through ctypes, from the `espeakng-loader` wheel (library and voice data).

No system espeak and no model weights: this is the always-available, robotic-sounding voice, and
the one tests use. espeak-ng is GPL-3.0, so it stays an optional dependency, loaded on first use.
"""

from __future__ import annotations

import ctypes
import threading

import numpy as np

OUTPUT_SAMPLE_RATE = 22050  # Hz: espeak-ng's fixed output rate (espeak_Initialize reports it)
RATE_WPM_RANGE = (80, 450)  # words per minute espeak-ng accepts (espeakRATE_MINIMUM/MAXIMUM)

# From espeak-ng's speak_lib.h.
_AUDIO_OUTPUT_SYNCHRONOUS = 2  # espeak_Synth returns when done; samples come through the callback
_INITIALIZE_DONT_EXIT = 0x8000  # report missing data with -1 instead of exit()
_PARAMETER_RATE = 1  # espeakRATE
_CHARS_UTF8 = 1  # espeakCHARS_UTF8
_POSITION_CHARACTER = 1  # POS_CHARACTER
_BUFFER_MS = 100  # ms of audio per callback; only sets how often the callback runs
_INT16_SCALE = 1.0 / 32768.0

# int callback(short *wav, int numsamples, espeak_EVENT *events); returning 1 aborts synthesis.
_SynthCallback = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p
)

# espeak-ng keeps one global engine per process, so every call holds this lock, and the
# callback (which has no user pointer in synchronous mode) appends to `_chunks` under it.
_lock = threading.Lock()
_chunks: list[bytes] = []
_engine: _Engine | None = None


class _Engine:
    """The loaded library, its output rate and the callback object ctypes must keep alive."""

    def __init__(self) -> None:
        try:
            import espeakng_loader
        except ImportError as error:
            raise RuntimeError(
                "espeak-ng is not installed; run `pip install espeakng-loader` (GPL-3.0) to use it."
            ) from error
        self.lib = ctypes.CDLL(espeakng_loader.get_library_path())
        _declare(self.lib)
        data_path = espeakng_loader.get_data_path().encode()
        self.sample_rate = self.lib.espeak_Initialize(
            _AUDIO_OUTPUT_SYNCHRONOUS, _BUFFER_MS, data_path, _INITIALIZE_DONT_EXIT
        )
        if self.sample_rate <= 0:
            raise RuntimeError(f"espeak-ng could not start with its data at {data_path.decode()}.")
        self.callback = _SynthCallback(_collect)  # referenced here so it is never collected
        self.lib.espeak_SetSynthCallback(self.callback)
        self.voice: str | None = None


def synthesize(text: str, *, voice: str = "en-us", rate_wpm: int = 170) -> tuple[int, np.ndarray]:
    """Speak `text` with espeak-ng: (22050, float32 mono samples in [-1, 1]).

    `voice` is an espeak-ng voice name ("en-us", "en-gb", "fr", ...). Raises RuntimeError when the
    `espeakng-loader` wheel is missing and ValueError for an unknown voice or rate.
    """
    low, high = RATE_WPM_RANGE
    if not low <= rate_wpm <= high:
        raise ValueError(f"rate_wpm must be between {low} and {high}, got {rate_wpm}")
    if not text.strip():
        return OUTPUT_SAMPLE_RATE, np.zeros(0, np.float32)
    with _lock:
        engine = _started()
        _use_voice(engine, voice)
        engine.lib.espeak_SetParameter(_PARAMETER_RATE, rate_wpm, 0)
        _chunks.clear()
        data = text.encode("utf-8")
        status = engine.lib.espeak_Synth(
            data, len(data) + 1, 0, _POSITION_CHARACTER, 0, _CHARS_UTF8, None, None
        )
        pcm = b"".join(_chunks)
        _chunks.clear()
    if status != 0:
        raise RuntimeError(f"espeak-ng failed to synthesize (status {status}).")
    samples = np.frombuffer(pcm, dtype=np.int16).astype(np.float32) * _INT16_SCALE
    return engine.sample_rate, samples


def _started() -> _Engine:
    global _engine
    if _engine is None:
        _engine = _Engine()
    return _engine


def _use_voice(engine: _Engine, voice: str) -> None:
    if voice == engine.voice:
        return
    if engine.lib.espeak_SetVoiceByName(voice.encode()) != 0:
        raise ValueError(f"espeak-ng has no voice named {voice!r}")
    engine.voice = voice


def _collect(wav, n_samples: int, events) -> int:
    """Synthesis callback: copy the int16 block out (espeak reuses the buffer); 0 = continue."""
    if wav and n_samples > 0:
        _chunks.append(ctypes.string_at(wav, n_samples * 2))
    return 0


def _declare(lib: ctypes.CDLL) -> None:
    """Argument and result types, so ctypes passes pointers and sizes at full width."""
    lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    lib.espeak_Initialize.restype = ctypes.c_int
    lib.espeak_SetSynthCallback.argtypes = [_SynthCallback]
    lib.espeak_SetSynthCallback.restype = None
    lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
    lib.espeak_SetVoiceByName.restype = ctypes.c_int
    lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.espeak_SetParameter.restype = ctypes.c_int
    lib.espeak_Synth.argtypes = [
        ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
        ctypes.c_uint, ctypes.POINTER(ctypes.c_uint), ctypes.c_void_p,
    ]
    lib.espeak_Synth.restype = ctypes.c_int
