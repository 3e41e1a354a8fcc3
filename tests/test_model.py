"""Loading: local folders, short names, and one clear error when a hub checkpoint is not at hand."""

from __future__ import annotations

import pytest
import torch

from afnext.model import CHECKPOINTS, ModelLoadError, load, pick_attention, pick_dtype, resolve


def test_tiny_checkpoint_loads_like_a_hub_one(loaded, tiny_dir):
    cfg = loaded.model.config
    assert cfg.model_type == "musicflamingo"
    assert loaded.random_weights and not loaded.is_think
    assert loaded.max_audio_s == 1800
    assert loaded.dtype == torch.float32 and loaded.attn == "sdpa"
    assert loaded.mel_filters.shape == (201, 128)
    assert loaded.tokenizer.convert_ids_to_tokens(loaded.ids.sound) == "<sound>"
    assert cfg.audio_token_id == loaded.ids.sound  # ids come from the tokenizer, and agree with the config
    assert 0.2e6 < sum(p.numel() for p in loaded.model.parameters()) < 0.5e6
    assert (tiny_dir / "chat_template.jinja").exists() and (tiny_dir / "generation_config.json").exists()


def test_short_names_resolve_to_hub_ids():
    assert resolve("instruct") == "nvidia/audio-flamingo-next-hf"
    assert resolve("think") == CHECKPOINTS["think"] == "nvidia/audio-flamingo-next-think-hf"
    assert resolve("captioner") == "nvidia/audio-flamingo-next-captioner-hf"
    assert resolve("some/other-model") == "some/other-model"


def test_uncached_hub_checkpoint_offline_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache
    with pytest.raises(ModelLoadError) as err:
        load("think", device="cpu")
    message = str(err.value)
    assert "nvidia/audio-flamingo-next-think-hf" in message and "--model tiny" in message
    assert message.count(". ") == 0 and message.endswith(").")


def test_folder_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="not a loadable AF-Next checkpoint"):
        load(str(tmp_path), device="cpu")
    with pytest.raises(ModelLoadError, match="No checkpoint folder"):
        load(str(tmp_path / "nope"), device="cpu")


def test_device_and_precision_choices():
    assert pick_dtype("auto", torch.device("cpu")) == torch.float32
    assert pick_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert pick_attention(torch.device("cpu")) == "sdpa"


def test_mid_size_is_about_20m_parameters():
    from afnext.tiny import SIZES, build_config, build_tokenizer

    cfg = build_config("mid", build_tokenizer())
    with torch.device("meta"):
        from transformers import MusicFlamingoForConditionalGeneration

        n = sum(p.numel() for p in MusicFlamingoForConditionalGeneration(cfg).parameters())
    assert 15e6 < n < 25e6
    assert SIZES["full"]["text"]["hidden_size"] == 3584


def test_cached_hub_checkpoint_loads_offline_by_short_name(tiny_dir, tmp_path):
    """A hub id whose files are in the Hugging Face cache loads with no network, like a real download."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    repo = tmp_path / "hub" / "models--nvidia--audio-flamingo-next-think-hf"
    shutil.copytree(tiny_dir, repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    code = "from afnext import load; m = load('think', device='cpu'); print(m.name, m.is_think, m.random_weights)"
    env = {**__import__("os").environ, "HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["think", "True", "True"]
