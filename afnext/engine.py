"""The engine: owns the model and its device, runs one job at a time on one worker thread.

A job is a function run on the worker; what it emits streams back to the caller through a queue.
Closing the caller's generator (or setting the job's cancel event) stops the job within one
decoding step. The building blocks jobs use live here too: encoding a clip (encoder → rotary time
embedding → projector, window-batched), chunked prefill of embeddings into a KV cache, and picking
the next token (repetition penalty, temperature, top-p) exactly as transformers' `generate` does.
"""

from __future__ import annotations

import logging
import numbers
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch

from . import audio
from . import decode as decoding
from .kvcache import CacheKeeper, kv_bytes_per_token
from .model import LoadedModel

log = logging.getLogger(__name__)

ENCODE_BATCH_WINDOWS = 16  # 30 s windows per encoder call: 8 min of audio, bounds activation memory
# Tokens per prefill forward on a GPU: bounds activations on 45k-token prompts (and lets a cancel in).
# On CPU the prompt goes in at once: memory is plentiful there, and a chunk after the first needs an
# explicit offset mask that takes sdpa off its fused causal kernel (measured 15% slower, 10 min of audio).
PREFILL_CHUNK_TOKENS = 8192
JOIN_TIMEOUT_S = 30.0  # how long a closed stream waits for the worker to notice the cancel
AUDIO_STEP_S = 0.04  # one audio token = 4 mel frames of 10 ms (conv stride 2, pooling stride 2)
MAX_NEW_TOKENS = 131_072  # tokens: AF-Next's whole context, so no reply can be longer
# Logits span about ±30; divided by 100 they give a softmax that is nearly uniform over the
# vocabulary, so a larger temperature is noise either way and more likely a typo (700 for 0.7).
MAX_TEMPERATURE = 100.0
# Below this, sampling is greedy in all but name, and logits / 1e-300 overflow float32 to inf,
# which softmax turns into NaN (a crash in torch.multinomial).
MIN_TEMPERATURE = 1e-4
# A penalty of 100 already rules a seen token out (or, as 1/100, all but forces it); beyond that
# range the scaled scores, over MIN_TEMPERATURE, could overflow float32 the same way.
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 0.01, 100.0
MAX_SEED = 2**64 - 1  # the largest seed torch.Generator.manual_seed takes


@dataclass(frozen=True)
class GenerationOptions:
    """How a reply is generated. Defaults follow the AF-Next model cards."""

    max_new_tokens: int = 1024  # upper bound on reply tokens (Instruct card: 1024; Think: 4096)
    min_new_tokens: int = 0  # end of turn is forbidden before this many (benchmarks: fixed-length replies)
    temperature: float = 0.0  # 0 = greedy; > 0 samples from softmax(logits / temperature)
    top_p: float = 1.0  # nucleus sampling mass (used only when temperature > 0)
    repetition_penalty: float = 1.2  # as the model cards use; 1.0 switches it off
    seed: int | None = None  # sampling seed, for reproducible sampled replies

    def __post_init__(self) -> None:
        """Refuse values the sampler cannot use (a NaN penalty repeats one token forever)."""
        _check_whole("max_new_tokens", self.max_new_tokens, 1, MAX_NEW_TOKENS)
        _check_whole("min_new_tokens", self.min_new_tokens, 0, MAX_NEW_TOKENS)
        _check_number("temperature", self.temperature, MIN_TEMPERATURE, MAX_TEMPERATURE, or_zero=True)
        _check_number("top_p", self.top_p, 0.0, 1.0, above_low=True)
        _check_number("repetition_penalty", self.repetition_penalty, MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY)
        if self.seed is not None:
            _check_whole("seed", self.seed, 0, MAX_SEED)


def _check_whole(name: str, value, low: int, high: int) -> None:
    whole = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if not (whole and low <= value <= high):
        raise ValueError(f"{name} must be a whole number from {low:,} to {high:,}; got {_shown(value)}.")


def _check_number(name: str, value, low: float, high: float, *, above_low: bool = False,
                  or_zero: bool = False) -> None:
    allowed = f"above {low:g} and at most {high:g}" if above_low else f"from {low:g} to {high:g}"
    error = ValueError(f"{name} must be {'0 or ' if or_zero else ''}a number {allowed}; got {_shown(value)}.")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise error
    # NaN fails every comparison and ±inf the bounds: no finiteness test, which would overflow on a huge int.
    in_range = (low < value if above_low else low <= value) and value <= high
    if not (in_range or or_zero and value == 0):
        raise error


def _shown(value) -> str:
    """A value as an error message quotes it: one line (ascii escapes), at most 40 characters."""
    text = ascii(value)
    return text if len(text) <= 40 else text[:39] + "…"


@dataclass(frozen=True)
class Clip:
    """One audio clip, featurized and ready to encode."""

    features: torch.Tensor = field(repr=False)  # [windows, n_mels, 3000] float32 log-mel, CPU
    frames: tuple[int, ...]  # valid mel frames per window (10 ms each)
    duration_s: float  # seconds of audio the model hears
    load_s: float  # seconds spent decoding, resampling and featurizing

    @property
    def tokens(self) -> int:
        """Audio tokens the clip occupies in the sequence (25 per second)."""
        return sum(audio.audio_tokens(f) for f in self.frames)


def prepare_clip(source, mel_filters: np.ndarray, *, max_seconds: float = audio.MAX_AUDIO_S) -> Clip:
    """Path, bytes, (sample_rate, array) or 16 kHz float32 array → `Clip`. Raises `AudioError`.

    A last window of 1-320 samples would give zero audio tokens (stock transformers crashes on it),
    so that ≤ 20 ms tail is dropped; a clip with no audio token at all is refused as too short.
    """
    t0 = time.perf_counter()
    if isinstance(source, np.ndarray):
        source = (audio.SAMPLE_RATE, source)
    samples = audio.load_audio(source, max_seconds=max_seconds)
    features, frames = audio.log_mel_windows(samples, mel_filters)
    keep = [i for i, f in enumerate(frames) if audio.audio_tokens(f) > 0]
    if not keep:
        raise audio.AudioError(f"The clip is too short ({len(samples) / audio.SAMPLE_RATE * 1000:.0f} ms); "
                               "the model needs more than 20 ms of audio.")
    features, frames = features[keep], [frames[i] for i in keep]
    duration = min(len(samples), sum(frames) * audio.HOP_LENGTH) / audio.SAMPLE_RATE
    return Clip(features, tuple(frames), duration, time.perf_counter() - t0)


class Engine:
    """Owns a `LoadedModel`; runs jobs one at a time on its worker thread."""

    def __init__(self, loaded: LoadedModel, *, decode: str = "eager") -> None:
        if decode not in decoding.MODES:
            raise ValueError(f"Unknown decode mode {decode!r}; choose one of {', '.join(decoding.MODES)}.")
        if decode == "graphs" and loaded.device.type != "cuda":
            raise ValueError("CUDA graphs need the model on a CUDA device.")
        self.loaded = loaded
        self.decode = decode  # eager | static | graphs: how decoding steps run (afnext/decode.py)
        self.keeper = CacheKeeper(loaded.device)  # the sessions' KV caches under memory pressure
        self.kv_bytes_per_token = kv_bytes_per_token(loaded.model.config, loaded.dtype)
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._worker = threading.Thread(target=self._serve, name="afnext-engine", daemon=True)
        self._worker.start()

    def stream(self, fn: Callable[[Cancel, Callable[[object], None]], None],
               cancel: threading.Event | None = None) -> Iterator[object]:
        """Run `fn(cancel, emit)` on the worker; yield what it emits. Closing this cancels it."""
        job = _Job(fn, cancel)
        self._jobs.put(job)
        try:
            while (item := job.out.get()) is not _END:
                if isinstance(item, _Failure):
                    raise item.exc
                yield item
        finally:
            job.cancel.closed.set()
            if not job.done.wait(JOIN_TIMEOUT_S):
                log.error("engine job did not stop within %.0f s of its cancel", JOIN_TIMEOUT_S)

    @property
    def waiting(self) -> int:
        """Jobs queued behind the one running (approximate: read without a lock)."""
        return self._jobs.qsize()

    def close(self) -> None:
        """Stop the worker after the jobs already queued."""
        self._jobs.put(None)
        self._worker.join(JOIN_TIMEOUT_S)

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                with torch.inference_mode():
                    job.fn(job.cancel, job.out.put)
            except Exception as exc:  # the caller gets it; the worker keeps serving
                log.debug("engine job failed", exc_info=True)
                job.out.put(_Failure(exc))
            finally:
                job.out.put(_END)
                job.done.set()

    # ---- building blocks for jobs (worker thread only) ----

    def encode(self, clip: Clip) -> torch.Tensor:
        """Clip → audio embeddings `[clip.tokens, text_hidden]` in the model dtype on its device.

        Windows are encoded in batches; each window's tokens are rotated by their absolute time in
        the clip (window index × 30 s + 40 ms × position), as the checkpoint was trained.
        """
        net, dev, dt = self.loaded.model.model, self.loaded.device, self.loaded.dtype
        out = []
        for first in range(0, len(clip.frames), ENCODE_BATCH_WINDOWS):
            feats = clip.features[first:first + ENCODE_BATCH_WINDOWS].to(dev, dt)
            frames = torch.tensor(clip.frames[first:first + ENCODE_BATCH_WINDOWS], device=dev)
            mask = torch.arange(feats.shape[-1], device=dev)[None, :] < frames[:, None]
            hidden = net.audio_tower(feats, input_features_mask=mask, return_dict=True).last_hidden_state
            hidden = self._rotate_by_time(hidden, first)
            embeds = net.multi_modal_projector(hidden)
            for row, f in enumerate(frames.tolist()):
                out.append(embeds[row, :audio.audio_tokens(f)])
        return torch.cat(out)

    def _rotate_by_time(self, hidden: torch.Tensor, first_window: int) -> torch.Tensor:
        from transformers.models.musicflamingo.modeling_musicflamingo import apply_rotary_time_emb

        net = self.loaded.model.model
        per_window = hidden.shape[-2]  # 750 tokens per 30 s window
        windows = torch.arange(first_window, first_window + hidden.shape[0], device=hidden.device)
        offsets = torch.arange(per_window, device=hidden.device, dtype=torch.float32) * AUDIO_STEP_S
        stamps = windows.unsqueeze(1) * per_window * AUDIO_STEP_S + offsets  # seconds, as the stock code does
        cos, sin = net.pos_emb(stamps, seq_len=per_window)
        return apply_rotary_time_emb(hidden, cos, sin)

    def prefill(self, ids: list[int], audio_embeds: torch.Tensor | None, cache, cancel: Cancel) -> torch.Tensor | None:
        """Run `ids` (their `<sound>` slots filled from `audio_embeds`) into `cache`; last logits [vocab].

        Returns None if cancelled between chunks (the cache then holds a prefix of `ids`).
        """
        lm = self.loaded.model
        ids_t = torch.tensor(ids, device=self.loaded.device)
        embeds = lm.get_input_embeddings()(ids_t)
        slots = ids_t == self.loaded.ids.sound
        n_slots = int(slots.sum())
        n_audio = 0 if audio_embeds is None else audio_embeds.shape[0]
        assert n_slots == n_audio, f"{n_slots} <sound> slots but {n_audio} audio embeddings"
        if n_audio:
            embeds[slots] = audio_embeds.to(embeds.dtype)
        logits = None
        step = PREFILL_CHUNK_TOKENS if self.loaded.device.type == "cuda" else len(ids)
        for start in range(0, len(ids), step):
            if start and cancel.is_set():
                return None
            chunk = embeds[None, start:start + step]
            logits = lm(inputs_embeds=chunk, cache=cache, use_cache=True, logits_to_keep=1).logits
        return logits[0, -1]

    def decoder(self, cache, capacity: int) -> decoding.Step:
        """The step function for one turn's decoding on `cache` (at most `capacity` tokens by its end)."""
        if self.decode != "eager":
            decoding.begin(cache, self.decode, capacity)
        if self.decode == "graphs":
            return decoding.graphed(self.loaded.model, cache)
        return partial(self.step, cache=cache)

    def end_decoding(self, cache) -> None:
        decoding.end(cache)

    def step(self, token: int, cache) -> torch.Tensor:
        """Feed one token; logits for the next [vocab]."""
        ids = torch.tensor([[token]], device=self.loaded.device)
        return self.loaded.model(input_ids=ids, cache=cache, use_cache=True).logits[0, -1]


class TokenPicker:
    """Chooses each next token like `generate`: repetition penalty over every token of the
    conversation so far, then temperature and top-p (or argmax when temperature is 0)."""

    def __init__(self, options: GenerationOptions, vocab: int, seen: list[int], device: torch.device,
                 eos: int) -> None:
        self.options, self.eos, self.picked = options, eos, 0
        self.seen = torch.zeros(vocab, dtype=torch.bool, device=device)
        self.seen[torch.tensor(seen, dtype=torch.long, device=device)] = True
        self.generator = None
        if options.temperature > 0:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(options.seed if options.seed is not None else torch.seed())

    def __call__(self, logits: torch.Tensor) -> int:
        scores = logits.float().clone()
        if self.picked < self.options.min_new_tokens:
            scores[self.eos] = -float("inf")
        self.picked += 1
        penalty = self.options.repetition_penalty
        if penalty != 1.0:  # over the whole vocabulary: a boolean-mask gather would sync the GPU every token
            scores = torch.where(self.seen, torch.where(scores < 0, scores * penalty, scores / penalty), scores)
        # The one host sync per token: the streamer needs the id.
        token = int(scores.argmax()) if self.generator is None else self._sample(scores)
        self.seen[token] = True
        return token

    def _sample(self, scores: torch.Tensor) -> int:
        probs = torch.softmax(scores / self.options.temperature, dim=-1)
        if self.options.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            outside = sorted_probs.cumsum(0) - sorted_probs > self.options.top_p  # keep the top one always
            probs = probs.scatter(0, order, sorted_probs.masked_fill(outside, 0.0))
        return int(torch.multinomial(probs, 1, generator=self.generator))


class Cancel:
    """Set when the caller closed the stream or set its own cancel event; checked every step."""

    def __init__(self, external: threading.Event | None) -> None:
        self.closed = threading.Event()
        self.external = external

    def is_set(self) -> bool:
        return self.closed.is_set() or (self.external is not None and self.external.is_set())


class _Job:
    def __init__(self, fn: Callable, external: threading.Event | None) -> None:
        self.fn, self.cancel = fn, Cancel(external)
        self.out: queue.Queue = queue.Queue()
        self.done = threading.Event()


@dataclass(frozen=True)
class _Failure:
    exc: BaseException


_END = object()
