"""Random-weight AF-Next-shaped checkpoints, built offline in seconds.

`python -m afnext.tiny OUT_DIR [--size tiny|mid]` writes a folder laid out like the hub checkpoints
(`nvidia/audio-flamingo-next-hf`): config.json of model_type musicflamingo, safetensors weights, a
byte-level BPE tokenizer with the AF-Next special tokens, the AF-Next chat template, a processor config
with max_audio_len 1800 and a generation_config. It loads through `afnext.load` like a real checkpoint.

Sizes: `tiny` ≈ 0.3 M parameters (tests), `mid` ≈ 20 M (CPU benchmarks), `full` is the real AF-Next
shape (8.3 B) and is only built in memory by the GPU benchmark. Weight values are random: anything
such a model says is noise, and every caller must say so to the user.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .cores import in_own_thread

SYSTEM_PROMPT = (
    "You are Audio Flamingo-Next, a multimodal assistant for language and audio. On each turn you "
    "receive an optional audio clip which may contain speech, music, or ambient sounds and optional "
    "text, you will receive at least one or both; use your world knowledge and reasoning to help the "
    "user with any task. Interpret the entirety of the content of any input audio\u2014regardless of "
    "whether the user calls it audio, speech, music, or sound."
)

# The AF-Next chat template as FACTS.md describes it: a default system prompt, ChatML turns, one
# `<sound>` per message that has audio (before its text), `<|im_start|>assistant\n` to generate.
CHAT_TEMPLATE = (
    "{%- if not messages or messages[0]['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\n" + SYSTEM_PROMPT + "<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}"
    "{%- if message['content'] | selectattr('type', 'equalto', 'audio') | list -%}{{- '<sound>' -}}{%- endif -%}"
    "{%- for part in message['content'] if part['type'] == 'text' -%}{{- part['text'] -}}{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<sound>", "<|sound_bos|>", "<|sound_eos|>"]
BPE_VOCAB = 512  # byte alphabet (256) + merges, before the special tokens

# Architecture per size. Encoder fields follow AudioFlamingo3EncoderConfig, decoder fields Qwen2Config.
# The small sizes use a larger init scale than the library's 0.02: with it, attention is near-uniform
# and a random model's next token hardly depends on its context, so equality tests would prove little.
INIT_STD = {"tiny": 0.25, "mid": 0.08, "full": 0.02}
SIZES: dict[str, dict[str, dict]] = {
    "tiny": {
        "audio": dict(hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=128),
        "text": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     intermediate_size=128),
    },
    "mid": {
        "audio": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024),
        "text": dict(hidden_size=512, num_hidden_layers=5, num_attention_heads=8, num_key_value_heads=2,
                     intermediate_size=1408),
    },
    "full": {  # AF-Whisper (large-v3 shape) + Qwen2.5-7B, as FACTS.md lists them
        "audio": dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=20, intermediate_size=5120),
        "text": dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                     intermediate_size=18944),
    },
}

# Text a byte-level BPE learns its 256 merges from: enough English, digits and timestamps that
# prompts tokenize into words rather than bytes.
_CORPUS = [
    SYSTEM_PROMPT,
    "What is said in this recording? Summarize the meeting. Who is speaking, and when?",
    "Reason step by step with timestamps, then give the final answer.",
    "<think> The speaker greets at roughly 0.5s to 1.2s. Around the 30-second mark a dog barks. </think>",
    "From 1:00 to 1:30 the music gets louder. [11.0 - 14.0] the chorus starts. At 12.5 seconds.",
    "The quick brown fox jumps over the lazy dog. This is a test of the voice assistant.",
    "music speech sound noise silence piano guitar drums voice laughter applause knock clap bird",
    "0 1 2 3 4 5 6 7 8 9 10 15 20 30 45 60 90 seconds minutes hours the a an and of to in is it",
]


def build_tokenizer():
    """A byte-level BPE with the AF-Next special tokens, as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", model_max_length=131072
    )
    fast.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS})
    return fast


def build_config(size: str, tokenizer):
    """MusicFlamingoConfig of the given size whose special-token ids come from `tokenizer`."""
    from transformers import MusicFlamingoConfig

    shape = SIZES[size]
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text = dict(shape["text"], initializer_range=INIT_STD[size], vocab_size=len(tokenizer), max_position_embeddings=131072,
                rope_parameters={"rope_type": "default", "rope_theta": 15.3e6}, model_type="qwen2",
                eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"], tie_word_embeddings=False)
    audio = dict(shape["audio"], initializer_range=INIT_STD[size], num_mel_bins=128, max_source_positions=1500, model_type="audioflamingo3_encoder")
    return MusicFlamingoConfig(
        audio_config=audio, text_config=text,
        audio_token_id=ids["<sound>"], audio_bos_token_id=ids["<|sound_bos|>"], audio_eos_token_id=ids["<|sound_eos|>"],
        rope_parameters={"rope_type": "default", "rope_theta": 1200.0, "partial_rotary_factor": 0.2},
        architectures=["MusicFlamingoForConditionalGeneration"],
    )


def build_model(config, *, seed: int = 0, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """A MusicFlamingoForConditionalGeneration with seeded random weights."""
    from transformers import MusicFlamingoForConditionalGeneration

    torch.manual_seed(seed)
    with torch.device(device):
        model = MusicFlamingoForConditionalGeneration(config)
    return model.to(dtype).eval()


def build_processor(tokenizer):
    """The AF-Next processor: Whisper-style 128-bin features, the chat template, 30-minute clips."""
    from transformers import MusicFlamingoProcessor, WhisperFeatureExtractor

    features = WhisperFeatureExtractor(feature_size=128, sampling_rate=16000, hop_length=160, chunk_length=30, n_fft=400)
    return MusicFlamingoProcessor(features, tokenizer, chat_template=CHAT_TEMPLATE, max_audio_len=1800)


def build_in_memory(size: str, device: str = "cpu", dtype: torch.dtype = torch.float32, *, seed: int = 0):
    """A random-weight model of `size` straight on `device` (nothing written): (LoadedModel, processor).
    Built on a thread of its own (cores.py)."""
    return in_own_thread(_build_in_memory, size, device, dtype, seed)


def _build_in_memory(size: str, device: str, dtype: torch.dtype, seed: int):
    from .model import assemble, pick_attention

    processor = build_processor(build_tokenizer())
    attn = pick_attention(torch.device(device))
    config = build_config(size, processor.tokenizer)
    config._attn_implementation = attn
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # allocate in the target dtype: 8.3 B fp32 parameters would need 33 GB
    try:
        model = build_model(config, seed=seed, dtype=dtype, device=device)
    finally:
        torch.set_default_dtype(previous)
    return assemble(f"random-{size}", model, processor, attn=attn, random_weights=True), processor


def write_checkpoint(out_dir: str | Path, size: str = "tiny", *, seed: int = 0) -> Path:
    """Write a random-weight AF-Next-shaped checkpoint folder and return its path."""
    from transformers import GenerationConfig

    if size not in ("tiny", "mid"):
        raise ValueError(f"size must be tiny or mid, not {size!r} (full is built in memory by the benchmark)")
    out = Path(out_dir)
    tokenizer = build_tokenizer()
    config = build_config(size, tokenizer)
    model = build_model(config, seed=seed)
    model.generation_config = GenerationConfig(
        max_new_tokens=2048, eos_token_id=config.text_config.eos_token_id, pad_token_id=config.text_config.pad_token_id
    )
    model.save_pretrained(out)
    build_processor(tokenizer).save_pretrained(out)
    (out / "RANDOM_WEIGHTS.md").write_text(
        f"Random-weight `{size}` AF-Next-shaped checkpoint written by `python -m afnext.tiny` (seed {seed}).\n"
        "Its outputs are noise: it exists to test and benchmark the code, not to answer anything.\n"
    )
    return out


def param_count(path: str | Path) -> int:
    """Parameters stored in a checkpoint folder (reads the safetensors headers only)."""
    total = 0
    for file in Path(path).glob("*.safetensors"):
        with open(file, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        for name, info in header.items():
            if name != "__metadata__":
                n = 1
                for dim in info["shape"]:
                    n *= dim
                total += n
    return total


MAX_SEED = 2**63 - 1  # torch.manual_seed takes a 64-bit integer


def main(argv: list[str] | None = None) -> int:
    """CLI: write a checkpoint folder; 1 with one sentence when the folder cannot take it."""
    parser = argparse.ArgumentParser(prog="python -m afnext.tiny", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=_out_dir, help="the folder to write: new, empty, or an earlier random checkpoint")
    parser.add_argument("--size", choices=["tiny", "mid"], default="tiny",
                        help="tiny ≈ 0.3 M parameters (tests, the default), mid ≈ 20 M (CPU benchmarks)")
    parser.add_argument("--seed", type=_seed, default=0, help=f"the random weights' seed, 0 to {MAX_SEED}")
    parser.add_argument("--tts", action="store_true", help="write a random-weight Pocket TTS checkpoint instead")
    args = parser.parse_args(argv)
    from .cli import quiet_progress_bars

    quiet_progress_bars()
    try:
        _check_folder(Path(args.out_dir))
        if args.tts:
            from .tts.pocket import write_tiny_checkpoint

            path = write_tiny_checkpoint(args.out_dir, seed=args.seed)
            what = "Pocket TTS checkpoint"
        else:
            path = write_checkpoint(args.out_dir, args.size, seed=args.seed)
            what = f"{args.size} AF-Next checkpoint"
    except (OSError, ValueError) as exc:
        print(f"error: {_unwritable(args.out_dir, exc)}", file=sys.stderr)
        return 1
    print(f"wrote a random-weight {what} ({param_count(path) / 1e6:.2f} M parameters) to {path}")
    return 0


def _out_dir(text: str) -> str:
    if not text.strip():  # "" would write into the current folder, over whatever is there
        raise argparse.ArgumentTypeError("give a folder to write the checkpoint to")
    return text


def _seed(text: str) -> int:
    try:
        seed = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 0 <= seed <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"give a seed from 0 to {MAX_SEED}")
    return seed


def _check_folder(out: Path) -> None:
    """Refuse a file, or a folder holding anything but an earlier random checkpoint: writing config.json,
    tokenizer files and weights into it would replace files of the same names."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file, not a folder; give a new folder")
    if out.is_dir() and any(out.iterdir()) and not (out / "RANDOM_WEIGHTS.md").exists():
        raise ValueError(f"the folder {out} already holds other files; give a new or empty folder "
                         "(only an earlier random checkpoint is written over)")


def _unwritable(out_dir: str, exc: Exception) -> str:
    if isinstance(exc, OSError):
        return f"Could not write the checkpoint to {out_dir} ({exc.strerror or exc}); give a folder you can write to."
    return f"{str(exc)[:1].upper()}{str(exc)[1:]}."


if __name__ == "__main__":
    from .cli import run

    sys.exit(run(main))
