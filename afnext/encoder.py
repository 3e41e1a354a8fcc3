"""Audio windows → the embeddings that fill a prompt's `<sound>` slots.

The checkpoint's encoder reads 30 s windows of log-mel frames. The stock forward always runs the
whole 3,000 frames, padding included, and masks the padding out of attention; a 5 s voice turn pays
for 30 s. Here each call runs only as many frames as its longest window needs — its valid frames,
the two after them that the convolutions reach, rounded up to `FRAME_STEP` so a few lengths cover
every clip — through the checkpoint's own modules. Valid positions come out as the stock forward's:
their convolutions read the same frames, their attention sees the same keys (padding is masked
either way), and positions, pooling, the time rotation and the projector act per position (the
equality is tested against `get_audio_features`; floating-point sums over fewer masked keys may
differ in the last bits).

Windows of different clips may share a call: each row is rotated by its own window's place in its
own clip (window index × 30 s + 40 ms × position), as the checkpoint was trained.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import mel
from .clip import Clip

BATCH_FRAMES = 16 * mel.WINDOW_FRAMES  # frames run per encoder call (8 min of audio): bounds its activations
CONV_REACH = 2  # frames past the valid ones that the last valid position's convolutions read
FRAME_STEP = 200  # call lengths are multiples of this (2 s): few shapes, at most 2 s of padding run
AUDIO_STEP_S = 0.04  # one audio token = 4 mel frames of 10 ms (conv stride 2, pooling stride 2)

Window = tuple[Clip, int]  # a clip and the index of one of its 30 s windows


def run_frames(frames: int) -> int:
    """Mel frames an encoder call runs for a window with `frames` valid ones."""
    needed = frames + CONV_REACH
    return min(mel.WINDOW_FRAMES, -(-needed // FRAME_STEP) * FRAME_STEP)


def batches(items: Sequence[tuple], max_frames: int = BATCH_FRAMES) -> list[list[tuple]]:
    """Windows grouped into encoder calls: windows of one run length together (a full window never
    pads a short one to 30 s), at most `max_frames` run per call (one window at least), the order of
    first appearance kept. Each item starts with (clip, window index); what follows rides along."""
    groups: dict[int, list[tuple]] = {}
    for item in items:
        groups.setdefault(run_frames(item[0].frames[item[1]]), []).append(item)
    calls = []
    for length, group in groups.items():
        per_call = max(1, max_frames // length)
        calls += [group[i:i + per_call] for i in range(0, len(group), per_call)]
    return calls


class EncoderPass:
    """One encoder call over `windows` (of any clips), which may run a few layers at a time: the
    convolutions and positions when it is made, `advance` through the layers, then `finish` pools,
    rotates by time and projects. A long ingest's 30 s window can so take two steps on CPU, and a
    voice turn arriving meanwhile waits out half a window, not a whole one."""

    def __init__(self, model, windows: Sequence[Window], device: torch.device, dtype: torch.dtype) -> None:
        from transformers.masking_utils import create_bidirectional_mask

        self.net, self.windows = model.model, list(windows)
        tower = self.net.audio_tower
        self.valid_frames = [clip.frames[index] for clip, index in self.windows]
        length = max(run_frames(f) for f in self.valid_frames)
        self.frames = length * len(self.windows)  # frames run through each layer: a layer's cost
        feats = torch.stack([clip.features[index, :, :length] for clip, index in self.windows]).to(device, dtype)
        valid = (torch.tensor(self.valid_frames, device=device) - 1) // 2 + 1  # positions after conv2's stride
        hidden = torch.nn.functional.gelu(tower.conv1(feats))
        hidden = torch.nn.functional.gelu(tower.conv2(hidden)).permute(0, 2, 1)
        self.hidden = hidden + tower.embed_positions.weight[:hidden.shape[1]]
        keep = torch.arange(hidden.shape[1], device=device)[None, :] < valid[:, None]
        self.mask = create_bidirectional_mask(config=tower.config, inputs_embeds=self.hidden, attention_mask=keep)
        self.layers_done = 0

    @property
    def layers_left(self) -> int:
        return len(self.net.audio_tower.layers) - self.layers_done

    def advance(self, layers: int) -> None:
        """Run the next `layers` of the tower's layers."""
        for layer in self.net.audio_tower.layers[self.layers_done:self.layers_done + layers]:
            self.hidden = layer(self.hidden, self.mask)
        self.layers_done = min(self.layers_done + layers, len(self.net.audio_tower.layers))

    def finish(self) -> list[torch.Tensor]:
        """Each window's embeddings [tokens, text hidden], once every layer has run."""
        assert self.layers_left == 0, "the pass has layers left to run"
        tower = self.net.audio_tower
        hidden = tower.layer_norm(tower.avg_pooler(self.hidden.permute(0, 2, 1)).permute(0, 2, 1))
        indices = torch.tensor([index for _, index in self.windows], device=hidden.device)
        embeds = self.net.multi_modal_projector(_rotate_by_time(self.net, hidden, indices))
        return [embeds[row, :mel.audio_tokens(f)] for row, f in enumerate(self.valid_frames)]


def encode_windows(model, windows: Sequence[Window], device: torch.device, dtype: torch.dtype) -> list[torch.Tensor]:
    """One encoder call over `windows` (of any clips), every layer at once; each window's embeddings."""
    run = EncoderPass(model, windows, device, dtype)
    run.advance(run.layers_left)
    return run.finish()


def encode_clip(model, clip: Clip, windows: range, device: torch.device, dtype: torch.dtype,
                max_frames: int = BATCH_FRAMES) -> torch.Tensor:
    """Some consecutive windows of one clip → their embeddings in order [tokens, text hidden]."""
    out = {}
    for batch in batches([(clip, w) for w in windows], max_frames):
        for (_, index), embeds in zip(batch, encode_windows(model, batch, device, dtype)):
            out[index] = embeds
    return torch.cat([out[w] for w in windows])


def _rotate_by_time(net, hidden: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
    """Rotate each row's tokens by their time in its clip; `windows` [b] is each row's window index.
    The angles are those of a whole window (750 tokens), cut to the tokens run."""
    from transformers.models.musicflamingo.modeling_musicflamingo import apply_rotary_time_emb

    per_window = mel.audio_tokens(mel.WINDOW_FRAMES)
    offsets = torch.arange(per_window, device=hidden.device, dtype=torch.float32) * AUDIO_STEP_S
    stamps = windows[:, None].to(torch.float32) * per_window * AUDIO_STEP_S + offsets  # seconds, as stock does
    cos, sin = net.pos_emb(stamps, seq_len=per_window)
    n = hidden.shape[-2]
    return apply_rotary_time_emb(hidden, cos[:, :n], sin[:, :n])
