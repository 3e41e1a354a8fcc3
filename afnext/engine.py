"""The engine: owns the model and its device, runs one job at a time on one worker thread.

A job is a function run on the worker; what it emits streams back to the caller through a queue.
Closing the caller's generator (or setting the job's cancel event) stops the job within one
decoding step. The building blocks jobs use live here too: encoding a clip (encoder → rotary time
embedding → projector, window-batched) and chunked prefill of embeddings into a KV cache. Clips are
prepared in clip.py, next tokens picked in sampling.py.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial

import torch

from . import audio
from . import decode as decoding
from .clip import Clip
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
