"""What the web app serves with: the loaded models, their engines, the voice, and what fell back.

Loaded once at start. Every fallback (model not reachable → tiny demo model, no GPU → CPU, Pocket TTS
unavailable → espeak) becomes a plain-words notice, logged and shown in the page's banner.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from afnext.engine import Engine, default_kv, pool_tokens
from afnext.model import DEMO_FALLBACK, LICENCE_NOTE, LoadedModel, load_or_demo
from afnext.tts import Mute, Synthesizer, TTSError, load_synthesizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BackendOptions:
    """What to load; the CLI maps its flags onto these fields."""

    model: str = "instruct"  # hub id, folder, or instruct|think|captioner|tiny
    think_model: str | None = None  # a second checkpoint for Think mode; None: Think uses `model`
    device: str = "auto"  # auto | cpu | cuda[:n]
    tts: str = "espeak"  # espeak | pocket
    tts_model: str | None = None  # the engine's voice or checkpoint (its default when None)
    kv: str | None = None  # buffers | paged: how the engines keep KV caches; None: engine.default_kv


@dataclass
class Backend:
    """The engines and the voice, shared by every browser session (each has its own sessions)."""

    main: Engine  # the Instruct model: Talk, and Recordings without Think
    think: Engine  # Think mode's model: `main` itself unless a Think checkpoint was loaded
    synthesizer: Synthesizer
    notices: list[str] = field(default_factory=list)  # fallbacks, in plain words, for the banner

    @property
    def random_weights(self) -> bool:
        return self.main.loaded.random_weights or self.think.loaded.random_weights

    def describe(self) -> str:
        """One line: which models run where."""
        def one(loaded: LoadedModel) -> str:
            return f"{loaded.name} ({loaded.device.type}, {str(loaded.dtype).removeprefix('torch.')}, {loaded.attn})"
        think = "" if self.think is self.main else f"; Think: {one(self.think.loaded)}"
        return f"Model: {one(self.main.loaded)}{think}; voice: {type(self.synthesizer).__name__}"

    def close(self) -> None:
        for engine in {id(e): e for e in (self.main, self.think)}.values():
            engine.close()


def start_backend(options: BackendOptions, engine_factory: Callable[[LoadedModel], Engine] = Engine) -> Backend:
    """Load the models and the voice; never fails for want of network (see the module docstring).

    `engine_factory` builds an engine around a loaded model (tests swap in a scripted one).
    """
    notices: list[str] = []
    if options.device == "auto" and not torch.cuda.is_available():
        notices.append("No GPU was found, so the model runs on the CPU: replies from a real-size model will be slow.")
        log.warning(notices[-1])
    # Both models load before either engine, and a paged pool sized from the free memory leaves the
    # other engine its half: the first engine's pool would otherwise take what the second model needs.
    loaded = [_model(options.model, options.device, notices)]
    if options.think_model:
        loaded.append(_model(options.think_model, options.device, notices))
    if engine_factory is Engine:
        # a pool for each, both measured before either takes its own
        kv = options.kv or default_kv(loaded[0].device)
        sizes = [pool_tokens(one, 1 / len(loaded)) if kv == "paged" else None for one in loaded]
        threads = cpu_threads(loaded)
        engines = [Engine(one, kv=kv, kv_pool_tokens=size, threads=threads) for one, size in zip(loaded, sizes)]
    else:
        engines = [engine_factory(one) for one in loaded]
    main = engines[0]
    think = engines[1] if options.think_model else main
    return Backend(main, think, _voice(options, notices), notices)


def cpu_threads(loaded: list[LoadedModel]) -> int | None:
    """Each engine's share of the CPU's threads when both models run on it; None: an engine's default.

    Each engine's worker keeps its own OpenMP team, and two teams of every thread each make libgomp
    put its workers to sleep after every parallel region (afnext/cores.py). Two `mid` engines on 2
    cores (bench/two_engines.py, bench/results/cpu-two-engines.json): an 8-row step took 15.3 ms on
    one thread each against 20.8 ms on both while the other engine idled, one row 7.5 against 8.3 ms,
    and 8 rows 22.6 against 26.3 ms while both decoded."""
    if len(loaded) < 2 or any(one.device.type != "cpu" for one in loaded):
        return None
    total = torch.get_num_threads()
    share = max(1, total // len(loaded))
    log.info("%d models on the CPU: each engine computes on %d of its %d threads", len(loaded), share, total)
    return share


def _model(model: str, device: str, notices: list[str]) -> LoadedModel:
    loaded, notice = load_or_demo(model, device=device)
    if notice:
        notices.append(notice)
        log.warning(notice)
    return loaded


def _voice(options: BackendOptions, notices: list[str]) -> Synthesizer:
    """The voice asked for; else espeak-ng, else none (`Mute`), each said in the banner and the log:
    a missing voice takes the speech away, never the model's text."""
    try:
        return load_synthesizer(options.tts, model=options.tts_model, device=options.device)
    except (TTSError, ValueError) as exc:
        if options.tts == "espeak" and isinstance(exc, ValueError):
            raise  # a voice or rate that does not exist: the command line is wrong, and says so
        reasons = [f"{options.tts}: {str(exc).rstrip('.')}"]
        if options.tts != "espeak":
            try:
                fallback = load_synthesizer("espeak")
            except TTSError as second:
                reasons.append(f"espeak-ng: {str(second).rstrip('.')}")
                exc = second
            else:
                notices.append(f"The {options.tts} voice could not be loaded ({exc}); replies are spoken with "
                               "espeak-ng instead.")
                log.warning(notices[-1])
                return fallback
        notices.append(f"No voice could be loaded ({'; '.join(reasons)}). Replies are text only.")
        log.warning(notices[-1])
        return Mute(str(exc))


class BackendUnavailable(RuntimeError):
    """The model is still loading, or failed to load; the message says which in one sentence."""


class BackendLoader:
    """Loads the backend on its own thread, so the page is served while a 16 GB model loads.

    `wait()` gives the backend once it is ready; the page's banner says what is happening meanwhile.
    """

    def __init__(self, load: Callable[[], Backend], name: str) -> None:
        self.name = name  # what is loading, for the banner
        self.notices: list[str] = []  # the app's own notices (where history is kept), shown above the model's
        self._backend: Backend | None = None
        self._error: str | None = None
        self._ready = threading.Event()
        threading.Thread(target=self._load, args=(load,), name="afnext-load", daemon=True).start()

    @classmethod
    def ready_made(cls, backend: Backend) -> BackendLoader:
        loader = cls(lambda: backend, backend.main.loaded.name)
        loader._ready.wait()
        return loader

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def wait(self, timeout: float | None = None) -> Backend:
        """The backend; raises BackendUnavailable if loading failed or `timeout` passed."""
        if not self._ready.wait(timeout):
            raise BackendUnavailable("The model is still loading; try again in a moment.")
        if self._backend is None:
            raise BackendUnavailable(f"The model could not be loaded: {self._error}")
        return self._backend

    def banner(self) -> str:
        own = "".join(f"⚠️ {text}\n\n" for text in self.notices)
        if not self.ready:
            return f"{own}⏳ Loading {self.name}… The page works already; answers start once the model is ready."
        if self._backend is None:
            return f"{own}⚠️ The model could not be loaded: {self._error} Restart the app with another --model."
        return own + banner(self._backend)

    def _load(self, load: Callable[[], Backend]) -> None:
        try:
            self._backend = load()
            log.info(self._backend.describe())
        except Exception as exc:  # even the offline fallback failed: said on the page and in the log
            log.exception("the backend could not be loaded")
            self._error = str(exc)
        finally:
            self._ready.set()


def banner(backend: Backend) -> str:
    """Markdown for the top of the page: fallbacks first, then the licence."""
    lines = [f"⚠️ {text}" for text in backend.notices]
    if backend.random_weights and not any(DEMO_FALLBACK in text for text in backend.notices):  # said once
        lines.append("⚠️ The model in use has **random weights** (the offline demo model): its answers are noise.")
    lines.append(f"{LICENCE_NOTE} {backend.describe()}.")
    return "\n\n".join(lines)


def int16(samples: np.ndarray) -> np.ndarray:
    """float32 in [-1, 1] → int16 PCM (what the page and Gradio's audio player take)."""
    return (np.clip(samples, -1.0, 1.0) * 32767.0).astype(np.int16)
