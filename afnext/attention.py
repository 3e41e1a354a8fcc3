"""One forward pass over many conversations: the seam between the scheduler and transformers' model.

A step packs its segments — one token for each decoding request, a chunk of each prefill planned
for the step — into one sequence of embeddings [1, T], each token with its own position. transformers'
decoder runs it unchanged: the projections, MLPs and lm_head read the weights once for all segments,
which is what batching buys (a decode step is bound by reading 16.5 GB of weights). At each layer's
attention, `StepCache.update` splits the packed keys and values back into their segments and writes
each into its own session cache; `segment_attention` then attends each segment's queries over that
cache alone.

Two KV layouts, `engine.default_kv` picking one per device. Per-session buffers (kvcache.py, a
GPU's default): a session's cache is one growing buffer per layer, read as a view, so a 45,000-token
recording and 500-token voice chats decode side by side while each pays only for its own length,
with no gather or copy per step; the cost is one attention call and one cache write per segment and
layer, noise beside the matmuls on CPU, but on a GPU B × 28 small launches a step, more than an H200
needs to read the weights (bench/host.py). The paged pool (paged.py, the CPU's default):
`PagedStep.update` writes the whole step's keys with one `index_copy_` per layer and
`paged_attention` attends every decoding row in one call per layer — flash-attn's paged kernel where
installed, else a gather per class of similar lengths, and a view of the pool for a long row in
consecutive blocks — and each prefill chunk in one call of its own; its fixed addresses let a
decoding step be captured as a CUDA graph per batch bucket (decode.py).

The model keeps its own attention for everything else (stock `generate`, the audio tower): our
function, registered under ATTENTION, hands any call that is not a step of ours to the
implementation the model was loaded with.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .paged import DecodeClass, PagedKV, PrefillChunk, flash_kernel

ATTENTION = "afnext_segments"
NO_MASKS = {"full_attention": None, "sliding_attention": None}  # the decoder skips its mask building


@dataclass
class Segment:
    """A run of consecutive tokens of one session in a step."""

    cache: object  # the session's SessionCache: receives the segment's keys and values
    past: int  # tokens already in the cache before this segment
    length: int  # tokens in this segment (1 for a decoding request)


class _SegmentKV(list):
    """Per-segment (keys, values) views handed from `StepCache.update` to `segment_attention`,
    with each segment's query length."""

    def __init__(self, lengths: list[int]) -> None:
        super().__init__()
        self.lengths = lengths


class StepCache:
    """The `cache` a step passes to the model: routes each segment's keys and values to its own
    session cache. Only what the decoder calls is here (update)."""

    def __init__(self, segments: list[Segment]) -> None:
        self.segments = segments
        self.lengths = [seg.length for seg in segments]

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args, **kwargs):
        """keys/values: [1, kv_heads, T, head_dim], segments in order → views of each session's cache."""
        out, start = _SegmentKV(self.lengths), 0
        for seg in self.segments:
            k, v = keys.narrow(2, start, seg.length), values.narrow(2, start, seg.length)
            if layer_idx < len(seg.cache.layers):  # the layer itself: Cache.update adds only its checks
                out.append(seg.cache.layers[layer_idx].update(k, v))
            else:  # a new cache's first step makes its layers
                out.append(seg.cache.update(k, v, layer_idx))
            start += seg.length
        return out, out


def segment_attention(module: torch.nn.Module, query: torch.Tensor, key, value, attention_mask, dropout: float = 0.0,
                      scaling: float | None = None, **kwargs):
    """Attention for a packed step: each segment's queries [1, heads, n, dim] over its own cache.

    A decoding token sees its whole cache; a prefill chunk is causal within itself and sees all of
    its session's earlier tokens (a mask is needed only when there are some: sdpa's own causal flag
    aligns the chunk to the first keys, not the last).
    """
    if isinstance(key, PagedKV):
        return paged_attention(module, query, key, scaling), None
    base = module.config._afnext_base_attention  # read once a layer: a config attribute costs microseconds
    if not isinstance(key, _SegmentKV):
        return ALL_ATTENTION_FUNCTIONS[base](module, query, key, value, attention_mask, dropout=dropout,
                                             scaling=scaling, **kwargs)
    outs, start = [], 0
    for (k, v), n in zip(key, key.lengths):
        outs.append(_one(module, base, query[:, :, start:start + n], k, v, scaling))
        start += n
    return torch.cat(outs, dim=1), None


def _one(module, base: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling) -> torch.Tensor:
    n, total = q.shape[-2], k.shape[-2]
    if n == 1 and base == "sdpa" and k.shape[-1] == v.shape[-1] <= 256:
        # A decoding token, attended directly: without transformers' sdpa wrapper and its checks (an
        # environment lookup, config reads), for it runs once per session and layer, 0.9k times a
        # step for 32 sessions of AF-Next's 28 layers: host time a GPU cannot hide (bench/host.py).
        return decode_attention(q[0, :, 0][None], k, v, scaling).view(1, 1, *q.shape[1:2], q.shape[-1])
    if base.startswith("flash"):  # flash aligns causal to the last keys
        fn = ALL_ATTENTION_FUNCTIONS[base]
        return fn(module, q, k, v, None, scaling=scaling, is_causal=n > 1)[0]
    if 1 < n < total and q.device.type == "cpu":
        return chunk_attention(q, k, v, scaling)
    mask = None
    if 1 < n < total:  # a chunk after earlier tokens: row i sees the past and the chunk up to i
        mask = torch.ones(n, total, dtype=torch.bool, device=q.device).tril(total - n)
    return sdpa_attention_forward(module, q, k, v, mask, scaling=scaling, is_causal=n > 1 and mask is None)[0]


def chunk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling) -> torch.Tensor:
    """A prompt chunk after earlier tokens, on CPU: q [1, heads, n, dim] over k/v [1, kv_heads, past + n,
    dim], causal within the chunk → [1, n, heads, dim].

    sdpa would need a mask [n, past + n] for it; with one, torch's CPU flash kernel adds the mask to
    every score and takes short chunks in small query blocks, each reading all the past keys again:
    a 10-minute recording's prefill in 256-token chunks spent 1.5x a single causal pass's time in
    attention (`mid`, 2 cores). Instead, two calls of that kernel merged by their log-sum-exp: the
    past with no mask, a key head's query heads stacked as rows of one query (as `decode_attention`,
    so the past is read once per key head), and the chunk over its own keys with the kernel's causal
    flag, which aligns correctly when queries and keys are the same tokens. The merge is exact up to
    rounding (tests/test_paged.py compares it with masked sdpa)."""
    _, heads, n, dim = q.shape
    kv_heads, past = k.shape[1], k.shape[2] - n
    group = heads // kv_heads  # query heads per key head
    kernel = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    early, early_lse = kernel(q.reshape(1, kv_heads, group * n, dim), k[:, :, :past], v[:, :, :past], scale=scaling)
    own_k, own_v = (t[:, :, past:].repeat_interleave(group, dim=1) for t in (k, v))
    own, own_lse = kernel(q, own_k, own_v, is_causal=True, scale=scaling)
    early_lse = early_lse.reshape(1, heads, n)
    both = torch.logaddexp(early_lse, own_lse)
    out = early.reshape(1, heads, n, dim) * (early_lse - both).exp_()[..., None].to(q.dtype)
    out.addcmul_(own, (own_lse - both).exp_()[..., None].to(q.dtype))
    return out.transpose(1, 2).contiguous()


def paged_attention(module: torch.nn.Module, query: torch.Tensor, where: PagedKV, scaling) -> torch.Tensor:
    """Attention for a step over the paged pool (paged.py): query [1, heads, T, dim] → [1, T, heads, dim].
    The decoding rows attend in one call per class; each prefill chunk in one call of its own."""
    step, layer = where.step, where.layer
    pool = step.pool
    out = query.new_empty(1, query.shape[2], query.shape[1], query.shape[3])
    for rows in step.classes:
        attended = _decode_rows(query, rows, pool, layer, scaling, step.flash)  # [b, heads, dim]
        if rows.contiguous:
            out[0].narrow(0, rows.first, attended.shape[0]).copy_(attended)
        else:
            out[0].index_copy_(0, rows.rows, attended)
    for chunk in step.prefills:
        out[:, chunk.start:chunk.start + chunk.length] = _prefill_chunk(module, query, chunk, pool, layer, scaling, step.flash)
    return out


def _decode_rows(query: torch.Tensor, rows: DecodeClass, pool, layer: int, scaling, flash: bool) -> torch.Tensor:
    """One query token per row over its session's keys: [b, heads, dim]."""
    q = (query[0].narrow(1, rows.first, rows.rows.shape[0]) if rows.contiguous else query[0].index_select(1, rows.rows))
    q = q.transpose(0, 1)  # [b, heads, dim]
    if flash:
        return flash_kernel()(q[:, None], pool.keys[layer], pool.values[layer], cache_seqlens=rows.lengths, block_table=rows.table,
                              softmax_scale=scaling, causal=True)[:, 0]
    if rows.span is not None:  # one row in consecutive blocks: its keys are a view of the pool
        return decode_attention(q, *(t[None] for t in pool.span(layer, *rows.span)), scaling)
    return decode_attention(q, *pool.gather_rows(layer, rows.index), scaling, rows.mask)  # [b, kv_heads, width, dim] each


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling, mask: torch.Tensor | None = None) -> torch.Tensor:
    """One query token per row over its keys: q [b, heads, dim], k/v [b, kv_heads, n, dim] → [b, heads, dim].

    A key head's query heads attend as rows of one query sequence ([b, kv_heads, group, dim]): one
    token has no causal order to keep, and the kernel reads each key head once for the whole group
    instead of once per query head (`enable_gqa`), which halves a long row's time on CPU
    (bench/results/cpu-kv-views.json)."""
    b, heads, dim = q.shape
    grouped = q.reshape(b, k.shape[1], heads // k.shape[1], dim)
    out = torch.nn.functional.scaled_dot_product_attention(grouped, k, v, attn_mask=mask, scale=scaling)
    return out.reshape(b, heads, dim)


def _prefill_chunk(module, query: torch.Tensor, chunk: PrefillChunk, pool, layer: int, scaling, flash: bool) -> torch.Tensor:
    """A prompt chunk's queries over its session's past and itself: [1, n, heads, dim]."""
    q = query[:, :, chunk.start:chunk.start + chunk.length]
    if flash:
        lengths = torch.full((1,), chunk.total, dtype=torch.int32, device=q.device)
        return flash_kernel()(q.transpose(1, 2), pool.keys[layer], pool.values[layer], cache_seqlens=lengths,
                              block_table=chunk.table, softmax_scale=scaling, causal=True)
    if chunk.span is not None:
        k, v = pool.span(layer, chunk.span, chunk.total)
    else:
        k, v = pool.gather(layer, chunk.index)
    return _one(module, "sdpa", q, k[None], v[None], scaling)


def install(model: torch.nn.Module) -> None:
    """Route the model's decoder attention through `segment_attention` (idempotent)."""
    text = model.config.get_text_config(decoder=True)
    if text._attn_implementation == ATTENTION:
        return
    base = text._attn_implementation
    AttentionInterface.register(ATTENTION, segment_attention)
    AttentionMaskInterface.register(ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS[base])  # stock calls keep their masks
    text._afnext_base_attention = base
    text._attn_implementation = ATTENTION
