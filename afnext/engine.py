"""The engine: owns the model and its device, and runs every session's turns in batched steps.

One worker thread runs the loop, vLLM-style: schedule → execute → update, one step at a time.
- schedule (scheduler.py): every decoding request, plus at most one request's next unit of prefill
  work — interactive turns first; a waiting one is admitted when its KV cache fits (`CacheKeeper`
  moves idle sessions' caches to CPU memory to make room; none is ever dropped).
- execute: the audio encoder on a batch of the prefill request's windows, or one forward pass over
  the packed step — one token per decoding request and a chunk of the prefill (attention.py).
- update: every row that needs a token gets it in one batched pick (sampling.py); tokens stream to
  their callers; finished, cancelled and failed requests are settled with their sessions.

Cancels are applied between steps; a caller never waits for the worker. A failure in a step fails
the requests in it with the error, rolls their sessions back, and the loop goes on serving.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import torch

from . import audio
from . import decode as decoding
from .attention import NO_MASKS, Segment, StepCache, install
from .clip import Clip
from .kvcache import CacheKeeper, kv_bytes_per_token
from .model import LoadedModel
from .sampling import TokenPicker, pick
from .scheduler import MAX_BATCH, WAITING, Request, Scheduler

log = logging.getLogger(__name__)

ENCODE_BATCH_WINDOWS = 16  # 30 s windows per encoder call: 8 min of audio, bounds activation memory
# Prefill tokens per step: what a long ingest may delay every other request by. On a GPU 2,048 tokens
# of AF-Next take tens of ms; on CPU a chunk of the 20 M `mid` model about as long as a voice turn's own
# prefill, the most the benchmark's "short turn during an ingest" target allows.
PREFILL_CHUNK_TOKENS = {"cuda": 2048, "cpu": 512}
ENCODE_WINDOWS_PER_STEP = {"cuda": ENCODE_BATCH_WINDOWS, "cpu": 1}  # windows encoded per step, likewise
IDLE_WAIT_S = 0.5  # how long the idle worker sleeps between looks at its stop flag
AUDIO_STEP_S = 0.04  # one audio token = 4 mel frames of 10 ms (conv stride 2, pooling stride 2)


PREFILLED = "prefilled"  # emitted when a request's prompt is in the cache and its reply begins


@dataclass(frozen=True)
class Finished:
    """A request's outcome, emitted after its last token."""

    request: Request
    interrupted: bool  # cancelled while decoding
    error: BaseException | None = None  # the step failed; the session has been rolled back
    started: bool = True  # False: cancelled or failed before its reply began (nothing was kept)


class Engine:
    """Owns a `LoadedModel`; runs requests in batched steps on its worker thread."""

    def __init__(self, loaded: LoadedModel, *, decode: str = "eager", max_batch: int = MAX_BATCH,
                 prefill_chunk_tokens: int | None = None, encode_windows_per_step: int | None = None) -> None:
        if decode not in decoding.MODES:
            raise ValueError(f"Unknown decode mode {decode!r}; choose one of {', '.join(decoding.MODES)}.")
        if decode == "graphs" and loaded.device.type != "cuda":
            raise ValueError("CUDA graphs need the model on a CUDA device.")
        install(loaded.model)
        kind = "cuda" if loaded.device.type == "cuda" else "cpu"
        self.loaded = loaded
        self.decode = decode  # eager | static | graphs: how a step with one decoding request alone runs (decode.py)
        self.prefill_chunk_tokens = prefill_chunk_tokens or PREFILL_CHUNK_TOKENS[kind]
        self.encode_windows_per_step = encode_windows_per_step or ENCODE_WINDOWS_PER_STEP[kind]
        self.keeper = CacheKeeper(loaded.device)  # the sessions' KV caches under memory pressure
        self.kv_bytes_per_token = kv_bytes_per_token(loaded.model.config, loaded.dtype)
        self.scheduler = Scheduler(max_batch)
        self.steps = 0  # steps run so far (tests and benchmarks read it)
        self._closed = threading.Event()
        self._worker = threading.Thread(target=self._serve, name="afnext-engine", daemon=True)
        self._worker.start()

    # ---- the callers' side (any thread) ----

    def submit(self, request: Request) -> None:
        """Queue a request; its tokens and `Finished` come through `request.emit` (worker thread)."""
        self.scheduler.add(request)  # raises RuntimeError once the engine is closed

    def cancel(self, request: Request) -> None:
        """Stop a request without waiting: a waiting one is dropped now (and emits `Finished` here),
        a running one stops before the next step."""
        request.cancel.set()
        if self.scheduler.cancel(request):
            self._tell(request, Finished(request, interrupted=False, started=False))

    def ahead(self, request: Request) -> int | None:
        """How many requests start before this one; None once it has started."""
        return self.scheduler.ahead(request)

    @property
    def waiting(self) -> int:
        """Requests not started yet."""
        return self.scheduler.n_waiting

    @property
    def alive(self) -> bool:
        """The worker runs and takes requests (a health check's question)."""
        return self._worker.is_alive() and not self._closed.is_set()

    def close(self) -> None:
        """Stop the worker (requests still in flight are cancelled)."""
        self._closed.set()
        self._worker.join(30)

    # ---- the loop (worker thread) ----

    def _serve(self) -> None:
        with torch.inference_mode():
            while not self._closed.is_set():
                try:
                    self._reap()
                    prefill = self._admit()
                    decodes = list(self.scheduler.decoding)
                    if not decodes and prefill is None:
                        self.scheduler.wait_for_work(IDLE_WAIT_S)
                        continue
                    self._step(decodes, prefill)
                except Exception:  # a bug of ours, not a request's: log it and keep serving
                    log.exception("engine step failed outside any request")
            for request in self.scheduler.running():
                request.cancel.set()
            self._reap()
            for request in self.scheduler.close():  # waiting ones never started: dropped, their callers told
                self._tell(request, Finished(request, interrupted=False, started=False))

    def _reap(self) -> None:
        """Settle requests cancelled since the last step."""
        for request in [r for r in self.scheduler.running() if r.cancel.is_set()]:
            self._finish(request, interrupted=bool(request.generated) or request.picker is not None)

    def _admit(self) -> Request | None:
        """The request that gets this step's prefill slot: the most urgent one, started if it was
        waiting and its KV cache fits; else the most urgent one already started, if any."""
        request = self.scheduler.next_prefill()
        if request is None or request.state != WAITING:
            return request
        if request.cancel.is_set():
            self.cancel(request)
            return None
        started = self.scheduler.started_prefills()
        try:
            extra = (len(request.ids) + request.budget) * self.kv_bytes_per_token
            busy = {id(r.cache) for r in self.scheduler.running()}
            fits = self.keeper.claim(request.cache, extra, busy=busy) if request.kept else True
            if not fits and self.scheduler.running():
                if not request.waited_for_memory:
                    log.info("KV memory is full: a turn waits until a running one finishes")
                    request.waited_for_memory = True
                return started  # no room until a running request finishes: it waits, the others go on
            if not self.scheduler.start(request):
                return started  # cancelled meanwhile
            request.start_len = request.cache.get_seq_length()
            request.cache.reserve(request.start_len + len(request.ids) + request.budget)  # one allocation per turn
        except Exception as exc:  # e.g. out of memory bringing its cache back: this request fails, not the engine
            log.exception("a turn could not be admitted")
            self._finish(request, error=exc)
            return started
        return request

    def _step(self, decodes: list[Request], prefill: Request | None) -> None:
        self.steps += 1
        if prefill is not None and not prefill.encoded:
            try:
                self._encode_some(prefill)
            except Exception as exc:  # its own failure: the decoding requests did not take part
                log.exception("encoding a clip failed; its turn is told and rolled back")
                self._finish(prefill, error=exc)
            prefill = None
        if prefill is not None and prefill.embeds is None:
            try:  # every clip is encoded: lay the turn's embeddings out once
                prefill.embeds = self.embed(prefill.ids, torch.cat(prefill.audio) if prefill.audio else None)
                prefill.audio = []
            except Exception as exc:  # its own failure: the decoding requests go on
                log.exception("a turn's embeddings could not be laid out")
                self._finish(prefill, error=exc)
                prefill = None
        try:
            rows = self._forward(decodes, prefill)
            tokens = pick([r.picker for r, _ in rows], torch.stack([logits for _, logits in rows])) if rows else []
        except Exception as exc:
            log.exception("engine step failed; its requests are told and rolled back")
            for request in decodes + ([prefill] if prefill is not None else []):
                self._finish(request, error=exc)
            return
        self._update([r for r, _ in rows], tokens)

    def _encode_some(self, request: Request) -> None:
        t0 = time.perf_counter()
        windows = [(c, w) for c in request.clips for w in range(len(c.frames))]
        batch = windows[request.windows_done:request.windows_done + self.encode_windows_per_step]
        clip = batch[0][0]
        same = [w for c, w in batch if c is clip]
        request.audio.append(self.encode(clip, windows=range(same[0], same[-1] + 1)))
        request.windows_done += len(same)
        request.encode_s += _sync(self.loaded.device) - t0

    def _forward(self, decodes: list[Request], prefill: Request | None) -> list[tuple[Request, torch.Tensor]]:
        """One forward pass; (request, next-token logits) for every request that needs a token now."""
        if self.decode != "eager" and len(decodes) == 1 and prefill is None:
            return [(decodes[0], self._static_step(decodes[0]))]
        segments, pieces, wanting = [], [], []
        if decodes:
            tokens = torch.tensor([r.generated[-1] for r in decodes], device=self.loaded.device)
            pieces.append(self.loaded.model.get_input_embeddings()(tokens))
            for r in decodes:
                segments.append(Segment(r.cache, r.cache.get_seq_length(), 1))
                wanting.append(r)
        t0 = time.perf_counter()
        if prefill is not None:
            n = min(self.prefill_chunk_tokens, len(prefill.ids) - prefill.fed)
            pieces.append(prefill.embeds[prefill.fed:prefill.fed + n])
            segments.append(Segment(prefill.cache, prefill.cache.get_seq_length(), n))
        if not segments:
            return []
        logits = self.run_segments(segments, torch.cat(pieces))
        rows = list(zip(wanting, logits))
        if prefill is not None:
            prefill.fed += segments[-1].length
            prefill.prefill_s += _sync(self.loaded.device) - t0
            if prefill.fed == len(prefill.ids):
                prefill.embeds = None
                self._prefilled(prefill)
                rows.append((prefill, logits[-1]))
        return rows

    def run_segments(self, segments: list[Segment], embeds: torch.Tensor) -> torch.Tensor:
        """The model over packed segments (`embeds` [tokens, hidden]); last-position logits per segment
        [segments, vocab]. Each segment's keys and values go into its own cache."""
        positions = torch.cat([torch.arange(s.past, s.past + s.length) for s in segments])
        ends = torch.tensor([s.length for s in segments]).cumsum(0) - 1
        dev = self.loaded.device
        out = self.loaded.model(inputs_embeds=embeds[None], position_ids=positions[None].to(dev),
                                attention_mask=dict(NO_MASKS), cache=StepCache(segments), use_cache=True,
                                logits_to_keep=ends.to(dev))
        return out.logits[0]

    def _static_step(self, request: Request) -> torch.Tensor:
        """A step of one decoding request alone in static mode: the cache's whole buffers with a
        device-side length, replayed from a CUDA graph in "graphs" mode (decode.py). Graphs per batch
        size need every batch's buffers at fixed addresses: a paged pool, the GPU step still to come."""
        cache, token = request.cache, request.generated[-1]
        decoding.begin(cache, self.decode, cache.reserved)  # reserved at admission for the whole turn
        try:
            if self.decode == "graphs":
                return decoding.graphed(self.loaded.model, cache)(token).clone()
            ids = torch.tensor([[token]], device=self.loaded.device)
            return self.loaded.model(input_ids=ids, cache=cache, use_cache=True).logits[0, -1]
        finally:
            decoding.end(cache)

    def _prefilled(self, request: Request) -> None:
        self.scheduler.prefilled(request)
        self._tell(request, PREFILLED)
        loaded = self.loaded
        ids = loaded.ids
        request.picker = TokenPicker(request.options, loaded.model.config.get_text_config().vocab_size,
                                     request.seen, loaded.device, ids.im_end, never=(ids.sound, ids.sound_bos, ids.sound_eos))

    def _update(self, requests: list[Request], tokens: list[int]) -> None:
        for request, token in zip(requests, tokens):
            if token == self.loaded.ids.im_end:
                self._finish(request, interrupted=False)
                continue
            request.generated.append(token)
            request.t_first = request.t_first or time.perf_counter()
            self._tell(request, token)
            if len(request.generated) >= request.budget or request.cancel.is_set():
                self._finish(request, interrupted=len(request.generated) < request.budget)

    def _finish(self, request: Request, *, interrupted: bool = False, error: BaseException | None = None) -> None:
        request.t_end = time.perf_counter()
        self.scheduler.finish(request)
        started = request.picker is not None and error is None
        if not started and request.start_len is not None and request.start_len < request.cache.get_seq_length():
            request.cache.crop(request.start_len - request.cache.get_seq_length())  # a partial prefill
        if request.start_len is not None:
            request.cache.release_spare()
        self._tell(request, Finished(request, interrupted=interrupted and started, error=error, started=started))

    @staticmethod
    def _tell(request: Request, item: object) -> None:
        """Hand an item to the request's caller; a failing callback is logged, not the engine's end."""
        try:
            request.emit(item)
        except Exception:
            log.exception("a turn's callback failed")

    # ---- building blocks ----

    def encode(self, clip: Clip, windows: range | None = None) -> torch.Tensor:
        """Clip (or some of its windows) → audio embeddings `[tokens, text_hidden]` in the model dtype.

        Windows are encoded in batches; each window's tokens are rotated by their absolute time in
        the clip (window index × 30 s + 40 ms × position), as the checkpoint was trained.
        """
        net, dev, dt = self.loaded.model.model, self.loaded.device, self.loaded.dtype
        windows = windows if windows is not None else range(len(clip.frames))
        out = []
        for first in range(windows.start, windows.stop, ENCODE_BATCH_WINDOWS):
            last = min(first + ENCODE_BATCH_WINDOWS, windows.stop)
            feats = clip.features[first:last].to(dev, dt)
            frames = torch.tensor(clip.frames[first:last], device=dev)
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

    def embed(self, ids: list[int], audio_embeds: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings of `ids` [len, hidden], their `<sound>` slots filled from `audio_embeds`."""
        ids_t = torch.tensor(ids, device=self.loaded.device, dtype=torch.long)
        embeds = self.loaded.model.get_input_embeddings()(ids_t)
        slots = ids_t == self.loaded.ids.sound
        n_slots, n_audio = int(slots.sum()), 0 if audio_embeds is None else audio_embeds.shape[0]
        assert n_slots == n_audio, f"{n_slots} <sound> slots but {n_audio} audio embeddings"
        if n_audio:
            embeds[slots] = audio_embeds.to(embeds.dtype)
        return embeds


def _sync(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
