"""Loading an AF-Next checkpoint: hub id, short name or local folder → a `LoadedModel`.

Any checkpoint laid out like `nvidia/audio-flamingo-next-hf` works (model_type musicflamingo, the
AF-Next special tokens, a Whisper-style feature extractor); nothing here assumes ids or sizes.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import cores
from .checkpoints import CHECKPOINTS, DEFAULT_MODEL

log = logging.getLogger(__name__)

LICENCE_NOTE = "AF-Next weights are released by NVIDIA under a non-commercial licence (see the model card)."
TINY_DIR_ENV = "AFNEXT_TINY_DIR"  # where `--model tiny` keeps its offline random-weight checkpoint


class ModelLoadError(RuntimeError):
    """The model could not be loaded; the message says why and what to do instead."""


@dataclass(frozen=True)
class SpecialIds:
    """Token ids the engine needs, read from the checkpoint's tokenizer (never hard-coded)."""

    sound: int  # <sound>: one per audio token
    sound_bos: int  # <|sound_bos|>
    sound_eos: int  # <|sound_eos|>
    im_start: int  # <|im_start|>
    im_end: int  # <|im_end|>: end of turn, the eos
    newline: tuple[int, ...]  # "\n" after <|im_end|>


@dataclass(frozen=True)
class LoadedModel:
    """A model ready for the engine: weights on their device, tokenizer and audio front end."""

    name: str  # what the user asked for (hub id or folder)
    model: torch.nn.Module  # MusicFlamingoForConditionalGeneration, eval mode
    tokenizer: object  # the checkpoint's fast tokenizer
    chat_template: str  # the checkpoint's Jinja chat template
    mel_filters: np.ndarray  # [n_fft // 2 + 1, n_mels] from the checkpoint's feature extractor
    max_audio_s: float  # the longest clip the checkpoint takes (processor max_audio_len), seconds
    ids: SpecialIds
    device: torch.device
    dtype: torch.dtype
    attn: str  # attention implementation in use: flash_attention_2 or sdpa
    is_think: bool  # the Think checkpoint: its turns are pre-filled with "<think>\n"
    random_weights: bool  # a checkpoint written by afnext.tiny: outputs are noise

    @property
    def context_tokens(self) -> int:
        """The decoder's context length in tokens."""
        return int(self.model.config.text_config.max_position_embeddings)


def resolve(model: str) -> str:
    """Short names (instruct, think, captioner, tiny) → hub id or folder; anything else unchanged."""
    if model in CHECKPOINTS:
        return CHECKPOINTS[model]
    if model == "tiny":
        return str(ensure_tiny())
    return model


def tiny_root() -> Path:
    """Where offline random-weight checkpoints are kept: $AFNEXT_TINY_DIR, else ~/.cache/afnext."""
    return Path(os.environ.get(TINY_DIR_ENV) or Path.home() / ".cache" / "afnext")


def ensure_tiny(size: str = "tiny") -> Path:
    """The offline random-weight demo checkpoint, written once into a cache folder."""
    from .tiny import write_checkpoint

    path = tiny_root() / f"{size}-random"
    if not (path / "config.json").exists():
        write_checkpoint(path, size)
    return path


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"Device {device} was asked for, but PyTorch sees no CUDA GPU; use --device cpu.")
    return torch.device(device)


def pick_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """bf16 on CUDA, fp32 on CPU (bf16 matmul on CPU is ~100x slower than fp32)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
            "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}[dtype]


def pick_attention(device: torch.device) -> str:
    """flash_attention_2 when the package and a GPU are there, else sdpa; never eager (45k² scores)."""
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def load(model: str = DEFAULT_MODEL, device: str = "auto", dtype: str | torch.dtype = "auto",
         *, think: bool | None = None) -> LoadedModel:
    """Load an AF-Next checkpoint from the hub (or its cache) or a local folder.

    `think` marks the Think checkpoint (its turns are pre-filled with `<think>\\n`); by default a
    name containing "think" is taken as one. It loads on a thread of its own (cores.py).
    """
    return cores.in_own_thread(_load, model, device, dtype, think)


def _load(model: str, device: str, dtype: str | torch.dtype, think: bool | None) -> LoadedModel:
    from transformers import AutoProcessor, MusicFlamingoForConditionalGeneration

    source = resolve(model)
    dev = pick_device(device)
    attn = pick_attention(dev)
    local = is_local(source)
    if not local and not hub_reachable():
        raise ModelLoadError(_load_failure(model, source, OSError("hub unreachable")))
    try:
        processor = AutoProcessor.from_pretrained(source, local_files_only=local)
        net = MusicFlamingoForConditionalGeneration.from_pretrained(
            source, dtype=pick_dtype(dtype, dev), attn_implementation=attn, local_files_only=local)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(_load_failure(model, source, exc)) from exc
    return assemble(model, net.to(dev).eval(), processor, attn=attn, think=think,
                    random_weights=has_file(source, "RANDOM_WEIGHTS.md"))


def assemble(name: str, net: torch.nn.Module, processor, *, attn: str, think: bool | None = None,
             random_weights: bool = False) -> LoadedModel:
    """A `LoadedModel` from a model already on its device and the checkpoint's processor."""
    param = next(net.parameters())
    loaded = LoadedModel(
        name=name, model=net, tokenizer=processor.tokenizer, chat_template=processor.chat_template,
        mel_filters=np.asarray(processor.feature_extractor.mel_filters, dtype=np.float32),
        max_audio_s=float(getattr(processor, "max_audio_len", 1800)), ids=_special_ids(processor.tokenizer),
        device=param.device, dtype=param.dtype, attn=attn,
        is_think="think" in str(name).lower() if think is None else think, random_weights=random_weights,
    )
    log.info("loaded %s on %s (%s, %s attention)%s", name, loaded.device, str(loaded.dtype).removeprefix("torch."),
             attn, " — RANDOM WEIGHTS: outputs are noise" if random_weights else "")
    return loaded


def is_local(source: str) -> bool:
    """A folder, or a hub id already downloaded: then it loads without touching the network."""
    return Path(source).is_dir() or has_file(source, "config.json")


def has_file(source: str, name: str) -> bool:
    """Whether a checkpoint folder, or the cached snapshot of a hub id, holds `name`."""
    return cached_file(source, name) is not None


def cached_file(source: str, name: str) -> Path | None:
    """A checkpoint folder's file `name`, or the cached snapshot's of a hub id; None if it is not on this
    machine (nothing is downloaded)."""
    from huggingface_hub import try_to_load_from_cache

    if Path(source).is_dir():
        path = Path(source) / name
        return path if path.exists() else None
    try:
        found = try_to_load_from_cache(source, name)
    except ValueError:  # not a valid repo id
        return None
    return Path(found) if isinstance(found, str) else None


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """One quick connection to the hub: without it, huggingface_hub's retries take minutes to give up."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout_s).close()
        return True
    except OSError:
        return False


def _special_ids(tokenizer) -> SpecialIds:
    def one(token: str) -> int:
        idx = tokenizer.convert_tokens_to_ids(token)
        if idx is None or idx == tokenizer.unk_token_id:
            raise ModelLoadError(f"The checkpoint's tokenizer has no {token} token; it is not an AF-Next checkpoint.")
        return int(idx)

    return SpecialIds(sound=one("<sound>"), sound_bos=one("<|sound_bos|>"), sound_eos=one("<|sound_eos|>"),
                      im_start=one("<|im_start|>"), im_end=one("<|im_end|>"),
                      newline=tuple(tokenizer.encode("\n", add_special_tokens=False)))


def _load_failure(model: str, source: str, exc: Exception) -> str:
    if Path(source).is_dir():
        return f"The folder {source} is not a loadable AF-Next checkpoint ({type(exc).__name__}: {exc})."
    if Path(source).suffix or source.startswith((".", "/")):
        return f"No checkpoint folder at {source}."
    from huggingface_hub import constants

    offline = constants.HF_HUB_OFFLINE
    return (f"Could not load {source}: it is not in the local Hugging Face cache and the hub "
            f"{'is switched off (HF_HUB_OFFLINE=1)' if offline else 'cannot be reached'}; download it once with "
            f"`hf download {source}` where there is network{DEMO_ADVICE}.")


DEMO_ADVICE = ", or use --model tiny for the offline demo model (random weights, answers are noise)"
DEMO_FALLBACK = ("Running the offline demo model instead, which has random weights: its answers are noise, and "
                 "everything else works as with the real model.")


def load_or_demo(model: str = DEFAULT_MODEL, device: str = "auto", dtype: str | torch.dtype = "auto") -> tuple[LoadedModel, str | None]:
    """Load `model`; if it cannot be loaded, fall back to the offline tiny demo model.

    Returns the model and, after a fallback, a plain-words notice: the caller shows it to the user
    (and logs it, if it logs).
    """
    try:
        return load(model, device=device, dtype=dtype), None
    except ModelLoadError as exc:  # the advice to run the demo model is taken: the notice leaves it out
        notice = f"{str(exc).replace(DEMO_ADVICE, '')} {DEMO_FALLBACK}"
        return load("tiny", device=device, dtype=dtype), notice
