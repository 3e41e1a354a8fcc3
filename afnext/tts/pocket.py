"""Kyutai's Pocket TTS through transformers, truly streaming: one latent frame at a time, decoded at once.

Pocket TTS (~100 M parameters, 24 kHz) writes 12.5 latent frames per second of speech; its codec (a
Mimi with continuous latents, `PocketTTSAudioTokenizerModel`) turns each frame into 1,920 samples (80 ms).
`generate()` only returns audio once the whole text is spoken, so this module runs the same loop
itself (prefill, then one backbone step + flow-head sample per frame, the same end-of-speech rule)
and decodes as it goes. In transformers the codec streams only its encoder (a padding cache for the
causal convolutions); its decoder takes a key-value cache for its transformer but not convolution
state. `StreamingDecoder` adds that state: it keeps each causal convolution's last inputs and each
transposed convolution's overlap, so decoding frame by frame gives the same samples as decoding all
frames at once (tests check it), with no re-decoded context.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..events import AudioChunk
from . import TTSError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "eustlb/pocket-tts"  # the checkpoint transformers' docs and configs use
SAMPLE_RATE = 24000  # Hz: the codec's output rate
MAX_SEGMENT_TOKENS = 50  # longer texts are cut into sentence groups (the processor's split_text)
# Pocket TTS's runtime knobs, the released checkpoints' values, for a generation config without them.
GENERATION_DEFAULTS = {"num_flow_steps": 1, "eos_threshold": -4.0, "min_frames_before_eos": 6}


@dataclass(frozen=True)
class PocketOptions:
    """How Pocket TTS speaks; None means the checkpoint's generation config."""

    voice: str | None = None  # a voice to clone: a wav file, or a .safetensors of voice latents [frames, dim]
    temperature: float | None = None  # variance of the flow noise; 0 = deterministic
    eos_threshold: float | None = None  # end-of-speech logit above which the utterance closes
    first_chunk_frames: int = 1  # frames (80 ms each) in the first chunk: speech starts after one frame
    chunk_frames: int = 2  # frames per later chunk (160 ms): fewer, larger codec calls


class PocketSynthesizer:
    """A `Synthesizer` over a loaded Pocket TTS model and its processor (which holds the codec)."""

    def __init__(self, model, processor, options: PocketOptions = PocketOptions()):
        self.model, self.processor, self.options = model, processor, options
        self.codec = processor.audio_tokenizer.to(model.device).eval()
        self.sample_rate = int(processor.feature_extractor.sampling_rate)
        self.frames_generated = 0  # frames made by the current (or last) stream so far
        self._voice = _load_voice(options.voice, self.sample_rate) if options.voice else None
        config = model.generation_config
        self._knobs = {key: default if (value := getattr(config, key, None)) is None else value
                       for key, default in GENERATION_DEFAULTS.items()}
        if options.eos_threshold is not None:
            self._knobs["eos_threshold"] = options.eos_threshold
        temperature = options.temperature
        if temperature is None:
            temperature = (config.temperature or 1.0) if config.do_sample else 0.0
        self._noise_std = math.sqrt(temperature)  # the flow head starts each frame from N(0, temperature)

    def stream(self, text: str, cancel: threading.Event | None = None) -> Iterator[AudioChunk]:
        """Yield 24 kHz float32 chunks of `text`: the first after `first_chunk_frames` frames (80 ms).

        Generation and decoding happen here, between yields: closing the generator or setting
        `cancel` (checked before every frame) stops the work.
        """
        self.frames_generated = 0
        if not text.strip():
            return
        for segment in self._segments(text):
            yield from self._stream_segment(segment, cancel)
            if _is_set(cancel):
                return

    def _segments(self, text: str) -> list[str]:
        if len(self.processor.tokenizer.encode(text, add_special_tokens=False)) <= MAX_SEGMENT_TOKENS:
            return [text]
        return self.processor.split_text(text, max_tokens=MAX_SEGMENT_TOKENS)

    def _stream_segment(self, text: str, cancel: threading.Event | None) -> Iterator[AudioChunk]:
        decoder, pending, first = StreamingDecoder(self.codec), [], True
        for latent in self._frames(self._inputs(text), cancel):
            pending.append(latent)
            self.frames_generated += 1
            if len(pending) >= (self.options.first_chunk_frames if first else self.options.chunk_frames):
                chunk = self._chunk(decoder, pending, fade_in=first)
                if _is_set(cancel):  # set while the frame was made (most of the time is spent there)
                    return
                yield chunk
                pending, first = [], False
        if pending and not _is_set(cancel):
            yield self._chunk(decoder, pending, fade_in=first)

    def _chunk(self, decoder: StreamingDecoder, latents: list[torch.Tensor], fade_in: bool) -> AudioChunk:
        samples = decoder(torch.stack(latents, dim=1))[0].float().cpu().numpy()
        # An overflow (half precision, a bad checkpoint) is silence or full scale, never NaN: np.clip keeps
        # NaN, the player and int16 conversion make it noise, and a resampler spreads it over the reply.
        samples = np.nan_to_num(samples, nan=0.0, posinf=1.0, neginf=-1.0)
        if fade_in:  # a fresh decoder starts with a step, heard as a click (as the processor's decode does)
            fade = min(int(self.processor.fade_in_duration * self.sample_rate), len(samples))
            samples[:fade] *= np.linspace(0.0, 1.0, fade, dtype=np.float32)
        return AudioChunk(self.sample_rate, np.clip(samples, -1.0, 1.0).astype(np.float32, copy=False))

    def _inputs(self, text: str):
        content = [{"type": "text", "text": text}]
        kwargs = {}
        if isinstance(self._voice, np.ndarray):
            content.insert(0, {"type": "audio"})
            kwargs = {"audio": [self._voice], "sampling_rate": self.sample_rate}
        elif self._voice is not None:
            content.insert(0, {"type": "audio"})
            kwargs = {"audio_prompt_latents": [self._voice]}
        prompt = self.processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False)
        return self.processor(text=prompt, return_tensors="pt", **kwargs).to(self.model.device)

    def _frames(self, inputs, cancel: threading.Event | None) -> Iterator[torch.Tensor]:
        """Latent frames [1, latent_dim] in the codec's space, one per step, until end of speech."""
        config = self.model.config
        placeholders = torch.tensor([config.audio_prompt_bos_token_id, config.audio_prompt_token_id,
                                     config.audio_bos_token_id, config.audio_latent_token_id], device=self.model.device)
        text_tokens = int((~torch.isin(inputs["input_ids"], placeholders)).sum())
        budget = math.ceil((text_tokens / 3 + 2) * config.frame_rate)  # the original runtime's frame budget
        after_eos = int(inputs.pop("frames_after_eos", torch.tensor([1]))[0])
        outputs = self._forward(**inputs, use_cache=True)
        remaining = -1  # frames still to make after end of speech; -1 until it is seen
        step_ids = torch.full((1, 1), config.audio_latent_token_id, device=self.model.device)
        for index in range(budget):
            if _is_set(cancel):
                return
            latent = self._sample(outputs.last_hidden_state[:, -1])
            yield self.model.denormalize_latents(latent)  # out before the next step runs
            may_end = index >= self._knobs["min_frames_before_eos"]
            if remaining < 0 and may_end and float(outputs.logits[0, -1, 0]) > self._knobs["eos_threshold"]:
                remaining = after_eos
            if remaining == 0:
                return  # the frame that crossed the threshold and the ones after it are kept
            if remaining > 0:
                remaining -= 1
            outputs = self._forward(input_ids=step_ids, audio_latents=latent[:, None], cache=outputs.cache,
                                    use_cache=True)

    @torch.inference_mode()
    def _forward(self, **inputs):
        return self.model(**inputs)

    @torch.inference_mode()
    def _sample(self, condition: torch.Tensor) -> torch.Tensor:
        noise = torch.randn(1, self.model.config.latent_dim, device=condition.device, dtype=condition.dtype)
        return self.model.sample_latent(condition, noise * self._noise_std, self._knobs["num_flow_steps"])

    def warm_up(self) -> None:
        """One short sentence through every step, so the first real turn pays no one-off costs."""
        stream = self.stream("Hello.")
        for _ in zip(range(2), stream):
            pass
        stream.close()


class StreamingDecoder:
    """Decodes codec latents chunk by chunk into exactly the samples one `codec.decode` call gives.

    State per stream: the transformer's key-value cache (sliding window included), the last
    `padding_total` inputs of every causal convolution (what its left zero padding stands for in one
    shot) and the unfinished tail of every transposed convolution (its `kernel - stride` extra outputs,
    added to the next call's first ones). No frame is decoded twice.
    """

    def __init__(self, codec) -> None:
        from transformers.cache_utils import DynamicCache
        from transformers.models.pocket_tts_audio_tokenizer import modeling_pocket_tts_audio_tokenizer as parts

        self.codec, self.decoder, self._parts = codec, codec.decoder, parts
        self.cache = DynamicCache(config=self.decoder.config)
        self._inputs: dict[int, torch.Tensor] = {}  # id(conv) → its last padding_total input columns
        self._tails: dict[int, torch.Tensor] = {}  # id(transposed conv) → pending overlap, bias removed

    @torch.inference_mode()
    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        """[batch, frames, latent_dim] latents → [batch, frames × frame_size] samples (1,920 per frame)."""
        hidden = self.codec.latent_proj(latents.to(self.codec.dtype).transpose(1, 2))
        if self.decoder.upsample is not None:
            hidden = self._layer(self.decoder.upsample, hidden)
        hidden = self.decoder.decoder_transformer(hidden.transpose(1, 2), cache=self.cache, use_cache=True)
        hidden = hidden.last_hidden_state.transpose(1, 2)
        for layer in self.decoder.decoder_seanet.layers:
            hidden = self._layer(layer, hidden)
        return hidden[:, 0]

    def _layer(self, layer, hidden: torch.Tensor) -> torch.Tensor:
        parts = self._parts
        if isinstance(layer, parts.PocketTTSAudioTokenizerConv1d):
            return self._conv(layer, hidden)
        if isinstance(layer, parts.PocketTTSAudioTokenizerConvTranspose1d):
            return self._transposed(layer, hidden)
        if isinstance(layer, parts.PocketTTSAudioTokenizerResnetBlock):
            residual = hidden
            for inner in layer.block:
                hidden = self._layer(inner, hidden)
            return hidden + self._layer(layer.shortcut, residual)
        return layer(hidden)  # ELU, Identity: no state

    def _conv(self, layer, hidden: torch.Tensor) -> torch.Tensor:
        """A causal stride-1 convolution whose left padding is the previous call's last inputs."""
        assert layer.causal and layer.conv.stride[0] == 1, "the codec decoder's convolutions are causal, stride 1"
        width = int(layer.padding_total)
        past = self._inputs.get(id(layer))
        if past is None:  # the first call sees what one-shot decoding pads with
            past = (hidden[..., :1].expand(-1, -1, width) if layer.pad_mode == "replicate"
                    else hidden.new_zeros(*hidden.shape[:2], width))
        joined = torch.cat([past, hidden], dim=-1)
        self._inputs[id(layer)] = joined[..., joined.shape[-1] - width:]
        return layer.conv(joined)

    def _transposed(self, layer, hidden: torch.Tensor) -> torch.Tensor:
        """A causal transposed convolution: stride × inputs samples out, the overlap kept for the next call."""
        assert layer.padding_left == 0, "streaming needs the causal transposed convolution (trim_right_ratio 1)"
        out = layer.conv(hidden)
        emitted = hidden.shape[-1] * layer.conv.stride[0]
        tail = self._tails.get(id(layer))
        if tail is not None:
            out = torch.cat([out[..., : tail.shape[-1]] + tail, out[..., tail.shape[-1]:]], dim=-1)
        rest = out[..., emitted:]  # bias is added once per sample: keep the overlap without it
        self._tails[id(layer)] = rest if layer.conv.bias is None else rest - layer.conv.bias[:, None]
        return out[..., :emitted]


def load_pocket(model: str | None = None, *, device: str = "auto",
                options: PocketOptions = PocketOptions()) -> PocketSynthesizer:
    """Load a Pocket TTS checkpoint (hub id, its cache, a folder, or "tiny"), warmed up, on `device`."""
    from transformers import PocketTTSForConditionalGeneration, PocketTTSProcessor

    from ..model import ModelLoadError, has_file, hub_reachable, is_local, pick_device

    source = ensure_tiny() if model == "tiny" else str(model or DEFAULT_MODEL)
    try:
        dev = pick_device(device)
    except ModelLoadError as exc:
        raise TTSError(str(exc)) from exc
    local = is_local(source)
    if not local and not hub_reachable():
        raise TTSError(_load_failure(source, "hub unreachable"))
    try:
        processor = PocketTTSProcessor.from_pretrained(source, local_files_only=local)
        net = PocketTTSForConditionalGeneration.from_pretrained(source, dtype=torch.float32, local_files_only=local)
    except (OSError, ValueError) as exc:
        raise TTSError(_load_failure(source, f"{type(exc).__name__}: {exc}")) from exc
    if getattr(processor, "audio_tokenizer", None) is None or processor.audio_tokenizer.decoder is None:
        raise TTSError(f"The Pocket TTS processor of {source} has no audio tokenizer with a decoder: no audio.")
    if has_file(source, "RANDOM_WEIGHTS.md"):
        log.warning("Pocket TTS checkpoint %s has RANDOM WEIGHTS: its speech is noise", source)
    synth = PocketSynthesizer(net.to(dev).eval(), processor, options)
    synth.warm_up()
    return synth


def _load_failure(source: str, why: str) -> str:
    if Path(source).is_dir():
        return f"The folder {source} is not a loadable Pocket TTS checkpoint ({why})."
    if Path(source).suffix or source.startswith((".", "/")):
        return f"No Pocket TTS checkpoint folder at {source}."
    from huggingface_hub import constants

    where = "is switched off (HF_HUB_OFFLINE=1)" if constants.HF_HUB_OFFLINE else "cannot be reached"
    return (f"Could not load the Pocket TTS checkpoint {source} ({why}): it is not in the local Hugging Face cache "
            f"and the hub {where}. Download it once where there is network (`hf download {source}`, and the audio "
            "tokenizer repository its processor_config.json names), or use the espeak engine, or the model name 'tiny' "
            "for an offline random-weight Pocket TTS (its speech is noise).")


def _is_set(cancel: threading.Event | None) -> bool:
    return cancel is not None and cancel.is_set()


def _load_voice(voice: str, sample_rate: int) -> np.ndarray | torch.Tensor:
    """A voice to clone: wav samples at `sample_rate`, or voice latents [frames, latent_dim]."""
    path = Path(voice)
    if not path.is_file():
        raise TTSError(f"No voice file at {voice} (a wav to clone, or a .safetensors of voice latents).")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return next(iter(load_file(path).values())).float()
    import soundfile as sf
    import soxr

    samples, rate = sf.read(path, dtype="float32", always_2d=True)
    return soxr.resample(samples.mean(axis=1), rate, sample_rate).astype(np.float32)


def ensure_tiny() -> str:
    """The offline random-weight Pocket TTS, written once into afnext's cache folder."""
    from ..model import tiny_root

    path = tiny_root() / "pocket-tts-random"
    if not (path / "config.json").exists():
        write_tiny_checkpoint(path)
    return str(path)


# ---------------------------------------------------------------------------- tiny random checkpoint

TINY_SPECIAL_TOKENS = {  # tokenizer attribute → token, as PocketTTSProcessor reads them
    "audio_prompt_bos_token": "<|voice_bos|>",
    "audio_prompt_token": "<|voice|>",
    "audio_bos_token": "<|audio_bos|>",
    "audio_latent_token": "<|audio|>",
}
# The prompt layout the processor expects: voice BOS, the voice frames (when cloning), text, audio BOS.
TINY_CHAT_TEMPLATE = (
    "{{- audio_prompt_bos_token -}}"
    "{%- for message in messages -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'audio' -%}{{- audio_prompt_token -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endfor -%}"
    "{{- audio_bos_token -}}"
)
_TINY_CORPUS = [
    "Hello there, this is a test of the voice assistant. The quick brown fox jumps over the lazy dog.",
    "What is said in this recording? Summarize the meeting, and tell me who is speaking.",
    "It is sunny today, with a light breeze. The dose is 3.5 mg; visit the website at 1:30 p.m.",
]


def write_tiny_checkpoint(out_dir: str | Path, *, seed: int = 0) -> Path:
    """Write a random-weight Pocket TTS checkpoint (33 k parameters + a 53 k codec) that loads like the real one.

    Same layout as the hub checkpoint: config, weights and generation config, a processor (feature
    extractor, a Unigram tokenizer trained here on a few sentences, the chat template) and the codec in
    `audio_tokenizer/`, which processor_config.json names by absolute path (rebuild, don't move it).
    Real shapes where they matter for streaming: 24 kHz, 12.5 frames per second, 1,920 samples per frame.
    """
    from transformers import (GenerationConfig, PocketTTSAudioTokenizerConfig, PocketTTSAudioTokenizerModel,
                              PocketTTSConfig, PocketTTSFeatureExtractor, PocketTTSForConditionalGeneration,
                              PocketTTSProcessor)

    out = Path(out_dir).resolve()
    tokenizer = _tiny_tokenizer()
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in TINY_SPECIAL_TOKENS.items()}
    torch.manual_seed(seed)
    latent_dim = 8
    config = PocketTTSConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        latent_dim=latent_dim, max_position_embeddings=4096, pad_token_id=tokenizer.pad_token_id,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        flow_head_config=dict(hidden_size=32, num_hidden_layers=1, latent_dim=latent_dim, condition_dim=32,
                              frequency_embedding_size=16),
        **{name.replace("_token", "_token_id"): idx for name, idx in ids.items()},
    )
    model = PocketTTSForConditionalGeneration(config).eval()
    # A random end-of-speech head stays far below 4, so speech runs the whole frame budget (~7 frames
    # per word): long enough to measure streaming; PocketOptions(eos_threshold=...) tests the ending.
    model.generation_config = GenerationConfig(do_sample=True, temperature=0.7, num_flow_steps=1, eos_threshold=4.0,
                                               min_frames_before_eos=6, pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(out)
    # The codec: real 24 kHz / 1,920-sample frames (ratios 6·5·4 × stride 16), few channels, and a
    # sliding window shorter than a sentence so the streamed decoder's window handling is exercised.
    codec_config = PocketTTSAudioTokenizerConfig(
        hidden_size=32, num_filters=4, upsample_groups=32, num_hidden_layers=1, intermediate_size=64,
        num_attention_heads=2, num_key_value_heads=2, latent_dim=latent_dim, sliding_window=40,
        max_position_embeddings=65536)
    PocketTTSAudioTokenizerModel(codec_config).eval().save_pretrained(out / "audio_tokenizer")
    codec = PocketTTSAudioTokenizerModel.from_pretrained(out / "audio_tokenizer")  # name_or_path = that folder
    features = PocketTTSFeatureExtractor(sampling_rate=SAMPLE_RATE, frame_size=codec_config.frame_size,
                                         pad_to_multiple_of=codec_config.frame_size)
    processor = PocketTTSProcessor(features, tokenizer, audio_tokenizer=codec, chat_template=TINY_CHAT_TEMPLATE)
    processor.save_pretrained(out)
    (out / "RANDOM_WEIGHTS.md").write_text(
        f"Random-weight Pocket TTS checkpoint written by `python -m afnext.tiny --tts` (seed {seed}).\n"
        "Its audio is noise: it exists to test and benchmark streaming, not to speak.\n")
    return out


def _tiny_tokenizer():
    """A SentencePiece-style Unigram tokenizer trained on a few sentences, with Pocket TTS's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=200, special_tokens=["<unk>", "<pad>"], unk_token="<unk>",
                                      show_progress=False)
    tok.train_from_iterator(_TINY_CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                   extra_special_tokens=TINY_SPECIAL_TOKENS)
