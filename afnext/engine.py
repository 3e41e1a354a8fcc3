"""The engine: owns the model and its device, and runs every session's turns in batched steps.

One worker thread runs the loop, vLLM-style: schedule → execute → update, one step at a time.
- schedule (scheduler.py, planner.py): every decoding request, plus the requests not decoding yet,
  most urgent first (interactive turns), sharing the step's budgets of audio frames to encode and
  prompt tokens to prefill; a waiting one is admitted (`_admit`) when its KV cache fits
  (`CacheKeeper` moves idle sessions' caches to CPU memory to make room; none is ever dropped).
- execute: the audio encoder on the planned windows (several turns' windows share a call; a long
  ingest's window may take its layers over several steps, encoder.py), then one forward pass over
  the packed step — one token per decoding request and each planned prefill chunk, a turn whose
  clip was encoded in this step included (attention.py).
- update: every row that needs a token gets it in one batched pick (sampling.py); tokens stream to
  their callers; finished, cancelled and failed requests are settled with their sessions.

Cancels are applied between steps; a caller never waits for the worker. A failure in a step fails
the requests in it with the error, rolls their sessions back, and the loop goes on serving.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass

import torch

from . import cores, encoder, linear
from . import decode as decoding
from .attention import NO_MASKS, Segment, StepCache, install
from .clip import Clip
from .kvcache import CacheKeeper, SessionCache, kv_bytes_per_token
from .paged import BlockPool, PagedCache, PoolFull, flash_kernel, plan_step
from .model import LoadedModel
from .planner import Budgets, Planner
from .sampling import TokenPicker, pick
from .scheduler import MAX_BATCH, PREFILLING, Request, Scheduler

log = logging.getLogger(__name__)

IDLE_WAIT_S = 0.5  # how long the idle worker sleeps between looks at its stop flag
# How sessions' KV caches are kept: a buffer per session (kvcache.py) or blocks of one pool (paged.py);
# `default_kv` picks one when none is named.
KV_LAYOUTS = ("buffers", "paged")
# The paged pool's size when not given: in CPU memory a quarter of the machine's RAM (pages are taken
# as tokens are first written, so an idle pool costs nothing), at most POOL_TOKENS_MAX; on a GPU the
# free memory after the weights, less what a step's activations and the encoder's windows need.
POOL_RAM_SHARE = 0.25
POOL_TOKENS_MAX = 1 << 20
POOL_HEADROOM_BYTES = 6 << 30


PREFILLED = "prefilled"  # emitted when a request's prompt is in the cache and its reply begins
NOT_NUMBERS = ("The model's scores for the next word of this reply were not numbers (an overflow), so the "
               "reply was stopped and nothing of it kept; ask again.")


class ContextFullError(ValueError):
    """The conversation no longer fits the model's context, or a turn the server's KV memory; the
    message says what to do."""


@dataclass(frozen=True)
class Finished:
    """A request's outcome, emitted after its last token."""

    request: Request
    interrupted: bool  # cancelled while decoding (never with started False)
    error: BaseException | None = None  # the step failed; the session has been rolled back
    started: bool = True  # its reply began and no error ended it (False: nothing was kept, all rolled back)


class Engine:
    """Owns a `LoadedModel`; runs requests in batched steps on its worker thread."""

    def __init__(self, loaded: LoadedModel, *, decode: str = "eager", max_batch: int = MAX_BATCH,
                 prefill_chunk_tokens: int | None = None, prefill_step_tokens: int | None = None,
                 encode_frames_per_step: int | None = None, encode_chunk_frames: int | None = None,
                 encode_batch_frames: int = encoder.BATCH_FRAMES, kv: str | None = None,
                 kv_pool_tokens: int | None = None, threads: int | None = None) -> None:
        if decode not in decoding.MODES:
            raise ValueError(f"Unknown decode mode {decode!r}; choose one of {', '.join(decoding.MODES)}.")
        if decode == "graphs" and loaded.device.type != "cuda":
            raise ValueError("CUDA graphs need the model on a CUDA device.")
        kv = kv or default_kv(loaded.device)
        if kv not in KV_LAYOUTS:
            raise ValueError(f"Unknown KV layout {kv!r}; choose one of {', '.join(KV_LAYOUTS)}.")
        install(loaded.model)
        fast = linear.install(loaded.model)
        if fast.packed_bytes:
            log.info("%d decoder projections take one or two rows as W·xᵀ and more through oneDNN-packed copies "
                     "(%.0f MB; afnext/linear.py)", fast.layers, fast.packed_bytes / 2**20)
        elif fast.layers:
            log.info("%d decoder projections take up to %d rows as W·xᵀ (no packed copies: over %.0f GiB; "
                     "afnext/linear.py)", fast.layers, linear.ROWS_MAX, linear.PACK_MAX_BYTES / 2**30)
        kind = "cuda" if loaded.device.type == "cuda" else "cpu"
        self.loaded = loaded
        self.decode = decode  # eager | static | graphs: how a step with one decoding request alone runs (decode.py)
        # a step's budgets for the requests not decoding yet: what a long ingest may delay others by
        self.budgets = Budgets.default(kind, prefill_chunk_tokens=prefill_chunk_tokens,
                                       prefill_step_tokens=prefill_step_tokens,
                                       encode_frames_per_step=encode_frames_per_step,
                                       encode_chunk_frames=encode_chunk_frames)
        self.planner = Planner(self.budgets, len(loaded.model.model.audio_tower.layers))
        self.encode_batch_frames = encode_batch_frames  # frames run per encoder call: bounds its activations
        self.kv_bytes_per_token = kv_bytes_per_token(loaded.model.config, loaded.dtype)
        self.kv = kv
        # flash-attn's paged kernel reads the blocks where they lie, in its own layout; without it short
        # rows are gathered and long ones read in place (paged.py)
        self.flash = (kv == "paged" and loaded.device.type == "cuda"
                      and loaded.dtype in (torch.float16, torch.bfloat16) and flash_kernel() is not None)
        self.pool = BlockPool(loaded.model.config, kv_pool_tokens or pool_tokens(loaded), loaded.device,
                              loaded.dtype, flash_layout=self.flash) if kv == "paged" else None
        if self.pool is not None:
            log.info("KV caches: a paged pool of %d tokens (%.1f GiB), attention by %s", self.pool.capacity_tokens,
                     self.pool.blocks * self.pool.block_bytes / 2**30, "flash-attn" if self.flash else "sdpa")
        else:
            log.info("KV caches: a buffer per conversation")
        self.keeper = CacheKeeper(loaded.device, pool=self.pool)  # the sessions' KV caches under memory pressure
        self._buckets: dict[tuple[int, int], decoding.BucketStep] = {}  # paged static/graphs: steps per batch bucket
        self._graph_pool = None  # the captured buckets' shared memory
        self.scheduler = Scheduler(max_batch)
        self.steps = 0  # steps run so far (tests and benchmarks read it)
        self._closed = threading.Event()
        # The worker computes on `threads` threads, by default as many as the caller's torch had when the
        # engine was made (OMP_NUM_THREADS, torch.set_num_threads); other threads' work for it runs on
        # one (cores.py). Two engines on one CPU split its threads (app/backend.py).
        self.threads = threads or torch.get_num_threads()
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

    def new_cache(self) -> SessionCache | PagedCache:
        """An empty session cache in this engine's KV layout."""
        return PagedCache(self.pool) if self.pool is not None else SessionCache()


    # ---- the loop (worker thread) ----

    def _serve(self) -> None:
        cores.claim(self.threads)
        linear.engage()
        with torch.inference_mode():
            while not self._closed.is_set():
                try:
                    self._reap()
                    prefills = self._plan()
                    decodes = list(self.scheduler.decoding)
                    if not decodes and not prefills:
                        self.scheduler.wait_for_work(IDLE_WAIT_S)
                        continue
                    self._step(decodes, prefills)
                except Exception:  # a bug of ours, not a request's: log it and keep serving
                    log.exception("engine step failed outside any request")
            for request in self.scheduler.running():
                request.cancel.set()
            self._reap()
            for request in self.scheduler.close():  # waiting ones never started: dropped, their callers told
                self._tell(request, Finished(request, interrupted=False, started=False))

    def _reap(self) -> None:
        """Settle requests cancelled since the last step: running ones, and waiting ones. A turn put
        back to wait for KV memory may have a reader that looked while it was being started and now
        waits for the engine's next word (or a `wake`); its cancel must not wait for the memory."""
        for request in [r for r in self.scheduler.running() if r.cancel.is_set()]:
            self._finish(request, interrupted=True)  # a reply that had not begun is rolled back instead
        for request in self.scheduler.cancelled_waiting():
            self.cancel(request)  # dropped, and its reader told

    def _plan(self) -> list[Request]:
        """This step's prefill work (planner.py), waiting requests admitted as their turn comes."""
        return self.planner.plan(self.scheduler.candidates(), self._admit)

    def _admit(self, request: Request) -> bool:
        """Start a waiting request if its KV cache fits; False if it must wait (or failed, or was
        cancelled meanwhile). It is started first, so that only this thread ends it from here on (a
        caller's cancel now sets its flag), then its cache is brought back and room is made for the
        whole turn (prompt and reply budget): a started turn never runs short. A turn larger than the
        whole pool fails at once instead of holding the queue."""
        if request.cancel.is_set():
            self.cancel(request)
            return False
        if not self.scheduler.start(request):
            return False  # cancelled by its caller meanwhile, and told there
        cache = request.cache
        total = cache.get_seq_length() + len(request.ids) + request.budget
        try:
            if self.pool is not None and total > self.pool.capacity_tokens:
                raise PoolFull(f"{total} tokens")
            others = [r for r in self.scheduler.running() if r is not request]
            busy = {id(r.cache) for r in others}
            # a throwaway cache (the no-cache path) needs no room made in buffers, but blocks in a pool
            claims = request.kept or self.pool is not None
            for attempt in (1, 2):
                try:
                    # with nothing else running it goes ahead (forced); else it waits for room
                    if claims and not self.keeper.claim(cache, cache.bytes_to_hold(total, self.kv_bytes_per_token),
                                                        busy=busy, force=not others):
                        return self._wait_for_memory(request)
                    cache.reserve(total)  # one allocation per turn
                    break
                except PoolFull:
                    # a fork took the blocks made free before its cache came back or its room was
                    # reserved: wait, or (nothing else runs) move the fork out too and try again
                    if others:
                        return self._wait_for_memory(request)
                    if attempt == 2:
                        raise
            request.start_len = cache.get_seq_length()
            if request.cancel.is_set():  # cancelled while room was made: it ends before any work
                self._finish(request)
                return False
        except PoolFull:
            log.warning("a turn of %d tokens does not fit the KV pool of %d", total, self.pool.capacity_tokens)
            self._finish(request, error=ContextFullError(
                f"This turn needs room for {total:,} tokens of context but the server's KV memory holds "
                f"{self.pool.capacity_tokens:,}; ask for a shorter reply or start a new conversation."))
            return False
        except Exception as exc:  # e.g. out of memory bringing its cache back: this request fails, not the engine
            log.exception("a turn could not be admitted")
            self._finish(request, error=exc)
            return False
        return True

    def _wait_for_memory(self, request: Request) -> bool:
        """No room until a running request finishes: `request` goes back to its place among the
        waiting ones, the others go on (False)."""
        if not request.waited_for_memory:
            log.info("KV memory is full: a turn waits until a running one finishes")
            request.waited_for_memory = True
        self.scheduler.put_back(request)
        if request.cancel.is_set():  # cancelled while it was started: its caller's cancel told nobody
            self.cancel(request)
        return False

    def _step(self, decodes: list[Request], prefills: list[Request]) -> None:
        self.steps += 1
        self._encode_planned([r for r in prefills if r.step_windows or r.step_layers])
        ready = []
        for request in prefills:
            if not request.step_tokens or request.state != PREFILLING:
                continue
            if request.embeds is None:
                try:  # every clip is encoded: lay the turn's embeddings out once
                    audio_embeds = torch.cat([request.audio[k] for k in range(len(request.audio))]) if request.audio else None
                    request.embeds = self.embed(request.ids, audio_embeds)
                    request.audio = {}
                except Exception as exc:  # its own failure: the others go on
                    log.exception("a turn's embeddings could not be laid out")
                    self._finish(request, error=exc)
                    continue
            ready.append(request)
        try:
            rows = self._forward(decodes, ready)
            tokens = pick([r.picker for r, _ in rows], torch.stack([logits for _, logits in rows])) if rows else []
        except Exception as exc:
            log.exception("engine step failed; its requests are told and rolled back")
            for request in decodes + ready:
                self._finish(request, error=exc)
            return
        self._update([r for r, _ in rows], tokens)

    def _encode_planned(self, requests: list[Request]) -> None:
        """Run the encoder work planned for `requests`: whole windows of different turns share calls,
        a window going through the layers a few at a time advances its own pass. A failing call
        fails the turns whose windows were in it (their sessions are rolled back)."""
        jobs = []  # (clip, window index, request, window number in the request)
        for request in requests:
            windows = request.windows
            jobs += [(*windows[k], request, k) for k in range(request.windows_done, request.windows_done + request.step_windows)]
            request.windows_done += request.step_windows
        for batch in encoder.batches(jobs, self.encode_batch_frames):
            batch = [job for job in batch if job[2].state == PREFILLING]  # not one that failed in this step
            if batch:
                self._encoder_call([job[2] for job in batch], lambda b=batch: self._encode_whole(b))
        for request in requests:
            if request.step_layers and request.state == PREFILLING:
                self._encoder_call([request], lambda r=request: self._encode_layers(r))

    def _encoder_call(self, owners: list[Request], call) -> None:
        owners = list(dict.fromkeys(owners))
        t0 = time.perf_counter()
        try:
            call()
        except Exception as exc:  # their own failure: the decoding requests did not take part
            log.exception("encoding a clip failed; its turn is told and rolled back")
            for request in owners:
                self._finish(request, error=exc)
            return
        took = _sync(self.loaded.device) - t0
        for request in owners:
            request.encode_s += took

    def _encode_whole(self, batch: list[tuple]) -> None:
        for (_, _, request, k), rows in zip(batch, self.encode_windows([(clip, index) for clip, index, _, _ in batch])):
            request.audio[k] = rows

    def _encode_layers(self, request: Request) -> None:
        if request.encoding is None:  # its next window enters the encoder
            request.encoding = self.encoder_pass([request.windows[request.windows_done]])
            request.windows_done += 1  # no other window is handed over while this one is in its pass
        request.encoding.advance(request.step_layers)
        if not request.encoding.layers_left:
            request.audio[request.windows_done - 1] = request.encoding.finish()[0]
            request.encoding = None

    def _forward(self, decodes: list[Request], prefills: list[Request]) -> list[tuple[Request, torch.Tensor]]:
        """One forward pass; (request, next-token logits) for every request that needs a token now."""
        if self.decode != "eager" and self.pool is None and len(decodes) == 1 and not prefills:
            return [(decodes[0], self._static_step(decodes[0]))]
        if self.decode != "eager" and self.pool is not None and decodes and not prefills:
            rows = [(r.cache, r.generated[-1], r.cache.get_seq_length() + 1) for r in decodes]
            key = decoding.bucket_key(rows, self.flash)
            if key is not None:
                return list(zip(decodes, self._bucket(key).run(rows)))
        segments, pieces, wanting = [], [], []
        if decodes:
            tokens = torch.tensor([r.generated[-1] for r in decodes], device=self.loaded.device)
            pieces.append(self.loaded.model.get_input_embeddings()(tokens))
            for r in decodes:
                segments.append(Segment(r.cache, r.cache.get_seq_length(), 1))
                wanting.append(r)
        t0 = time.perf_counter()
        for request in prefills:
            n = request.step_tokens
            pieces.append(request.embeds[request.fed:request.fed + n])
            segments.append(Segment(request.cache, request.cache.get_seq_length(), n))
        if not segments:
            return []
        logits = self.run_segments(segments, torch.cat(pieces))
        rows = list(zip(wanting, logits))
        if prefills:
            took = _sync(self.loaded.device) - t0
            for request, row in zip(prefills, logits[len(decodes):]):
                request.fed += request.step_tokens
                request.prefill_s += took
                if request.fed == len(request.ids):
                    request.embeds = None
                    self._prefilled(request)
                    rows.append((request, row))
        return rows

    def run_segments(self, segments: list[Segment], embeds: torch.Tensor) -> torch.Tensor:
        """The model over packed segments (`embeds` [tokens, hidden]); last-position logits per segment
        [segments, vocab]. Each segment's keys and values go into its own cache."""
        positions = torch.cat([torch.arange(s.past, s.past + s.length) for s in segments])
        ends = torch.tensor([s.length for s in segments]).cumsum(0) - 1
        dev = self.loaded.device
        cache = plan_step(self.pool, segments, self.flash) if self.pool is not None else StepCache(segments)
        out = self.loaded.model(inputs_embeds=embeds[None], position_ids=positions[None].to(dev),
                                attention_mask=dict(NO_MASKS), cache=cache, use_cache=True,
                                logits_to_keep=ends.to(dev))
        return out.logits[0]

    def _bucket(self, key: tuple[int, int]) -> decoding.BucketStep:
        """The fixed-shape decoding step for `key` (rows, width): made, and in "graphs" mode captured,
        on first use; kept for the engine's life (every one reads and writes the same pool)."""
        if key not in self._buckets:
            capture = self.decode == "graphs"
            if capture and self._graph_pool is None:
                self._graph_pool = torch.cuda.graph_pool_handle()
            with self.keeper.lock:  # no fork copies this engine's blocks while a graph is captured
                self._buckets[key] = decoding.BucketStep(self.loaded.model, self.pool, *key, self.flash, capture,
                                                         self._graph_pool)
            log.info("decoding step for %d rows of up to %d %s made%s", *key, "blocks" if self.flash else "keys",
                     " and captured as a CUDA graph" if capture else "")
        return self._buckets[key]

    def _static_step(self, request: Request) -> torch.Tensor:
        """A step of one decoding request alone in static mode: the cache's whole buffers with a
        device-side length, replayed from a CUDA graph in "graphs" mode (decode.py). Graphs per batch
        size need every batch's buffers at fixed addresses: a paged pool, the GPU step still to come."""
        cache, token = request.cache, request.generated[-1]
        length = cache.get_seq_length() + 1  # after this step
        decoding.begin(cache, cache.reserved)  # reserved at admission for the whole turn
        try:
            if self.decode == "graphs":
                logits = decoding.graphed(self.loaded.model, cache)(token).clone()
            else:
                ids = torch.tensor([[token]], device=self.loaded.device)
                logits = self.loaded.model(input_ids=ids, cache=cache, use_cache=True).logits[0, -1]
        except BaseException:
            decoding.end(cache)  # as far as the device got
            raise
        decoding.end(cache, length)
        return logits

    def _prefilled(self, request: Request) -> None:
        self.scheduler.prefilled(request)
        self._tell(request, PREFILLED)
        loaded = self.loaded
        ids = loaded.ids
        request.picker = TokenPicker(request.options, loaded.model.config.get_text_config().vocab_size,
                                     request.seen, loaded.device, ids.im_end, never=(ids.sound, ids.sound_bos, ids.sound_eos))

    def _update(self, requests: list[Request], tokens: list[int | None]) -> None:
        for request, token in zip(requests, tokens):
            if token is None:  # its scores were not numbers: this turn fails, the batch goes on
                log.error("a turn's next-token scores held NaN or inf; it is stopped and rolled back")
                self._finish(request, error=RuntimeError(NOT_NUMBERS))
                continue
            if token == self.loaded.ids.im_end:
                self._finish(request, interrupted=False)
                continue
            request.generated.append(token)
            request.t_first = request.t_first or time.perf_counter()
            self._tell(request, token)
            if len(request.generated) >= request.budget or request.cancel.is_set():
                self._finish(request, interrupted=len(request.generated) < request.budget)

    def _finish(self, request: Request, *, interrupted: bool = False, error: BaseException | None = None) -> None:
        """End a started request, once: its cache cut back if its reply never began, the room reserved
        for it and not used given back, its caller told (always: a caller must never wait for ever)."""
        if not self.scheduler.finish(request):
            return  # ended already
        request.t_end = time.perf_counter()
        started = request.picker is not None and error is None
        try:
            if not started and request.start_len is not None:
                request.cache.crop_to(request.start_len)  # a partial prefill, or a step that failed part-way
            request.cache.release_spare()
        except Exception:  # the cache still holds what it held, spare room and all
            log.exception("a finished turn's spare KV room could not be given back")
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
        """Clip (or some of its windows) → audio embeddings `[tokens, text_hidden]` in the model dtype."""
        windows = windows if windows is not None else range(len(clip.frames))
        return encoder.encode_clip(self.loaded.model, clip, windows, self.loaded.device, self.loaded.dtype,
                                   self.encode_batch_frames)

    def encode_windows(self, windows: list[encoder.Window]) -> list[torch.Tensor]:
        """One encoder call over windows of any clips; each window's embeddings (encoder.py)."""
        return encoder.encode_windows(self.loaded.model, windows, self.loaded.device, self.loaded.dtype)

    def encoder_pass(self, windows: list[encoder.Window]) -> encoder.EncoderPass:
        """An encoder call to run a few layers at a time (encoder.py)."""
        return encoder.EncoderPass(self.loaded.model, windows, self.loaded.device, self.loaded.dtype)

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


def default_kv(device: torch.device) -> str:
    """The KV layout of an engine on `device` when none is named. On CPU the paged pool: with 8 voice
    conversations at once it decodes faster than per-session buffers, and beside long recordings as
    fast, as long rows are read in place (README, Performance). On a GPU the buffers, until the
    pool has run on one (README, GPU)."""
    return "buffers" if torch.device(device).type == "cuda" else "paged"


def pool_tokens(loaded: LoadedModel, share: float = 1.0) -> int:
    """A paged pool's default size in tokens: `share` of what the device has free now beyond the
    headroom (of a quarter of the RAM, at most POOL_TOKENS_MAX, in CPU memory). Two engines on one
    device (the Think model's) are sized before either takes its pool, each with half."""
    per_token = kv_bytes_per_token(loaded.model.config, loaded.dtype)
    if loaded.device.type != "cuda":
        ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return int(min(ram * POOL_RAM_SHARE // per_token, POOL_TOKENS_MAX) * share)
    free, _ = torch.cuda.mem_get_info(loaded.device)
    return int(max(free - POOL_HEADROOM_BYTES, 0) * share) // per_token


def _sync(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
