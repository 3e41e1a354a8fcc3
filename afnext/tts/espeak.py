"""espeak-ng speech through ctypes, from the `espeakng-loader` wheel (library and voice data).

No system espeak and no model weights: this is the always-available, robotic-sounding voice, and
the one tests use. espeak-ng is GPL-3.0, so it stays an optional dependency, loaded on first use.

`synthesize` returns a whole clip; `EspeakSynthesizer.stream` streams: espeak-ng runs on a worker
thread and its synth callback hands every ~100 ms block to the caller through a queue as it is made,
so the first chunk is out after one block (well under a millisecond of work) instead of a sentence.
"""

from __future__ import annotations

import ctypes
import queue
import threading
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterator

import numpy as np

from ..events import AudioChunk
from . import TTSError

OUTPUT_SAMPLE_RATE = 22050  # Hz: espeak-ng's fixed output rate (espeak_Initialize reports it)
RATE_WPM_RANGE = (80, 450)  # words per minute espeak-ng accepts (espeakRATE_MINIMUM/MAXIMUM)

# From espeak-ng's speak_lib.h.
_AUDIO_OUTPUT_SYNCHRONOUS = 2  # espeak_Synth returns when done; samples come through the callback
_INITIALIZE_DONT_EXIT = 0x8000  # report missing data with -1 instead of exit()
_PARAMETER_RATE = 1  # espeakRATE
_CHARS_UTF8 = 1  # espeakCHARS_UTF8
_POSITION_CHARACTER = 1  # POS_CHARACTER
_BUFFER_MS = 100  # ms of audio per callback: the size of a streamed chunk (2205 samples)
_INT16_SCALE = 1.0 / 32768.0
_POLL_S = 0.02  # how often a waiting stream looks at its cancel event, seconds
_JOIN_S = 2.0  # longest wait for the worker after a stream stops (espeak aborts at its next block)

# Scripts espeak-ng's voices for other scripts spell letter by letter ("Chinese letter" per character):
# the voice a piece mostly in one is read with → (Unicode name prefixes of its letters, voice-name
# prefixes that read it themselves). Latin voices switch to Hindi, Korean and a few more on their own.
SCRIPT_VOICES = {
    "ja": (("HIRAGANA", "KATAKANA"), ("ja",)),  # kana; the kanji beside them count as Japanese too
    "cmn": (("CJK UNIFIED",), ("cmn", "yue", "hak", "ja")),
    "ar": (("ARABIC",), ("ar", "fa", "ur", "ps", "sd", "ug", "ku")),
    "he": (("HEBREW",), ("he",)),
    "ru": (("CYRILLIC",), ("ru", "uk", "be", "bg", "mk", "sr", "kk", "ky", "tt", "ba", "cv", "mn")),
    "el": (("GREEK",), ("el", "grc")),
    "th": (("THAI",), ("th",)),
}

# int callback(short *wav, int numsamples, espeak_EVENT *events); returning 1 aborts synthesis.
_SynthCallback = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p
)

# espeak-ng keeps one global engine per process, so every call holds this lock, and the callback
# (which has no user pointer in synchronous mode) hands each block to `_sink`, set under the lock.
# The sink never blocks (a list append or a queue put) and returns True to abort synthesis.
_lock = threading.Lock()
_sink: Callable[[bytes], bool] | None = None
_engine: _Engine | None = None


class _Engine:
    """The loaded library, its output rate and the callback object ctypes must keep alive."""

    def __init__(self) -> None:
        try:
            import espeakng_loader
        except ImportError as error:
            raise TTSError(
                "espeak-ng is not installed; run `pip install espeakng-loader` (GPL-3.0) to use it."
            ) from error
        try:
            self.lib = ctypes.CDLL(espeakng_loader.get_library_path())
        except OSError as error:  # another platform's wheel, a broken install
            raise TTSError(f"espeak-ng is installed but could not load the espeak-ng library ({error}); "
                           "reinstall it with `pip install --force-reinstall espeakng-loader`.") from error
        _declare(self.lib)
        data_path = espeakng_loader.get_data_path().encode()
        self.sample_rate = self.lib.espeak_Initialize(
            _AUDIO_OUTPUT_SYNCHRONOUS, _BUFFER_MS, data_path, _INITIALIZE_DONT_EXIT
        )
        if self.sample_rate <= 0:
            raise TTSError(f"espeak-ng could not start with its data at {data_path.decode()}.")
        self.callback = _SynthCallback(_collect)  # referenced here so it is never collected
        self.lib.espeak_SetSynthCallback(self.callback)
        self.voice: str | None = None


def synthesize(text: str, *, voice: str = "en-us", rate_wpm: int = 170) -> tuple[int, np.ndarray]:
    """Speak `text` with espeak-ng: (22050, float32 mono samples in [-1, 1]).

    `voice` is an espeak-ng voice name ("en-us", "en-gb", "fr", ...); text mostly in a script it would
    spell letter by letter is read with that script's voice (`voice_for`). Raises TTSError (a
    RuntimeError) when the `espeakng-loader` wheel is missing and ValueError for an unknown voice or rate.
    """
    _check_rate(rate_wpm)
    if not text.strip():
        return OUTPUT_SAMPLE_RATE, np.zeros(0, np.float32)
    blocks: list[bytes] = []
    engine = _run(text, voice, rate_wpm, lambda pcm: blocks.append(pcm) or False)
    return engine.sample_rate, _to_float(b"".join(blocks))


class EspeakSynthesizer:
    """A `Synthesizer` over espeak-ng: 22,050 Hz float32 chunks of ~100 ms, streamed as made."""

    def __init__(self, voice: str = "en-us", rate_wpm: int = 170) -> None:
        _check_rate(rate_wpm)
        with _lock:
            _use_voice(_started(), voice)  # fail here, not mid-turn, on a missing wheel or voice
        self.voice, self.rate_wpm = voice, rate_wpm
        self.sample_rate = OUTPUT_SAMPLE_RATE

    def stream(self, text: str, cancel: threading.Event | None = None) -> Iterator[AudioChunk]:
        """Yield `AudioChunk`s of `text` while espeak-ng makes them.

        Stops within one block when `cancel` is set or the generator is closed: the callback then
        tells espeak-ng to abort, and the worker thread is joined before this returns.
        """
        if not text.strip():
            return
        blocks: queue.Queue = queue.Queue()
        stop = threading.Event()

        def sink(pcm: bytes) -> bool:
            blocks.put(pcm)
            return stop.is_set() or (cancel is not None and cancel.is_set())

        worker = threading.Thread(target=self._work, args=(text, sink, blocks), name="espeak", daemon=True)
        worker.start()
        try:
            while not (cancel is not None and cancel.is_set()):
                try:
                    item = blocks.get(timeout=_POLL_S)
                except queue.Empty:
                    continue
                if item is None or (cancel is not None and cancel.is_set()):  # set while we waited: not one more
                    return
                if isinstance(item, BaseException):
                    raise item
                yield AudioChunk(self.sample_rate, _to_float(item))
        finally:
            stop.set()
            worker.join(_JOIN_S)

    def _work(self, text: str, sink: Callable[[bytes], bool], blocks: queue.Queue) -> None:
        """Worker thread: run espeak-ng to the end (or an abort), then post None, or the error."""
        try:
            _run(text, self.voice, self.rate_wpm, sink)
            blocks.put(None)
        except Exception as exc:  # handed to the consumer, raised there
            blocks.put(exc)


def voice_for(text: str, voice: str) -> str:
    """The voice to read `text` with: `voice`, unless over half of its letters are in a script that
    `voice` would spell letter by letter (SCRIPT_VOICES); then that script's voice."""
    scripts = Counter(_script(char) for char in text if char.isalpha())
    if scripts["ja"]:
        scripts["ja"] += scripts.pop("cmn", 0)
    script, count = max(scripts.items(), key=lambda item: item[1], default=(None, 0))
    if script is None or 2 * count <= scripts.total():
        return voice
    return voice if voice.startswith(SCRIPT_VOICES[script][1]) else script


def _script(char: str) -> str | None:
    """The SCRIPT_VOICES key of a letter's script; None for the rest (Latin among them)."""
    name = unicodedata.name(char, "")
    return next((key for key, (prefixes, _) in SCRIPT_VOICES.items() if name.startswith(prefixes)), None)


def _run(text: str, voice: str, rate_wpm: int, sink: Callable[[bytes], bool]) -> _Engine:
    """One espeak_Synth call with `sink` receiving its blocks; returns the engine."""
    global _sink
    with _lock:
        engine = _started()
        _use_voice(engine, voice_for(text, voice))
        engine.lib.espeak_SetParameter(_PARAMETER_RATE, rate_wpm, 0)
        data = text.encode("utf-8")
        _sink = sink
        try:
            status = engine.lib.espeak_Synth(
                data, len(data) + 1, 0, _POSITION_CHARACTER, 0, _CHARS_UTF8, None, None
            )
        finally:
            _sink = None
    if status != 0:
        raise TTSError(f"espeak-ng failed to synthesize (status {status}).")
    return engine


def _check_rate(rate_wpm: int) -> None:
    low, high = RATE_WPM_RANGE
    if not low <= rate_wpm <= high:
        raise ValueError(f"rate_wpm must be between {low} and {high}, got {rate_wpm}")


def _to_float(pcm: bytes) -> np.ndarray:
    return np.frombuffer(pcm, dtype=np.int16).astype(np.float32) * _INT16_SCALE


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
    """Synthesis callback: copy the int16 block out (espeak reuses the buffer); 1 = abort."""
    if wav and n_samples > 0 and _sink is not None:
        return int(_sink(ctypes.string_at(wav, n_samples * 2)))
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
