"""A step's few rows through the decoder's projections as W·xᵀ (afnext/linear.py)."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F

from afnext import linear
from afnext.engine import Engine
from afnext.events import TurnDone
from afnext.sampling import GenerationOptions
from afnext.session import Session
from afnext.tiny import build_in_memory
from tests.conftest import noise


def in_thread(fn, engaged: bool):
    """`fn()` in a new thread, engaged or not; its result."""
    out = []

    def run():
        if engaged:
            linear.engage()
        out.append(fn())

    t = threading.Thread(target=run)
    t.start()
    t.join()
    return out[0]


def layer_with(bias: bool, packed: bool) -> linear.RowsLinear:
    torch.manual_seed(0)
    layer = linear.RowsLinear(96, 160, bias=bias)
    if packed:
        layer.packed = torch.ops.mkldnn._reorder_linear_weight(layer.weight.detach(), linear.PACK_ROWS)
    return layer


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_each_row_count_takes_its_path_in_an_engaged_thread_and_f_linear_elsewhere(bias, packed):
    """One or two rows: W·xᵀ (one padded to two). More: the packed copy through oneDNN when there is
    one, else W·xᵀ up to ROWS_MAX and F.linear past it. Any other thread: F.linear. Every figure is
    computed in a new thread, so all run on the same number of threads (the sums' split, and so their
    rounding, depends on it; earlier tests may have changed the test thread's)."""
    layer, differs = layer_with(bias, packed), False
    for rows in (1, 2, 3, 8, linear.ROWS_MAX, linear.ROWS_MAX + 1, 200):
        x = torch.randn(1, rows, 96)

        def references():
            stock = F.linear(x, layer.weight, layer.bias)
            if packed and rows >= linear.PACKED_FROM_ROWS:
                return stock, torch.ops.mkldnn._linear_pointwise(x[0], layer.packed, layer.bias, "none", [], "")
            if rows > linear.ROWS_MAX:
                return stock, stock[0]
            padded = torch.cat([x[0], x.new_zeros(1, 96)]) if rows == 1 else x[0]
            product = layer.weight @ padded.T
            return stock, (product if layer.bias is None else product + layer.bias[:, None]).T[:rows]

        with torch.no_grad():
            stock, expected = in_thread(references, engaged=False)
            ours = in_thread(lambda: layer(x), engaged=True)
            elsewhere = in_thread(lambda: layer(x), engaged=False)
        assert ours.shape == stock.shape == (1, rows, 160) and ours.is_contiguous()
        assert torch.equal(elsewhere, stock), "a thread that is not the engine's runs stock"
        torch.testing.assert_close(ours, stock, rtol=1e-5, atol=1e-5)
        assert torch.equal(ours[0], expected), f"{rows} rows took another path"
        differs |= not torch.equal(ours, stock)
    assert differs, "the engaged paths' sums round differently from F.linear's: the checks above can tell them apart"


def test_install_swaps_the_decoders_large_projections_and_packs_them_if_they_fit():
    loaded, _ = build_in_memory("tiny")
    model = loaded.model
    assert linear.install(model).layers == 0, "tiny's weights are all below the size that gains"
    unpacked = linear.install(model, min_elements=0, pack_max_bytes=0)
    layers = model.config.get_text_config().num_hidden_layers
    assert unpacked == linear.Installed(7 * layers + 1, 0)  # q, k, v, o, gate, up, down per layer, the lm_head
    assert type(model.get_output_embeddings()) is linear.RowsLinear
    assert not any(isinstance(m, linear.RowsLinear) for m in model.model.audio_tower.modules())
    assert all(m.packed is None for m in model.modules() if isinstance(m, linear.RowsLinear))
    packed = linear.install(model, min_elements=0)
    swapped = [m for m in model.modules() if isinstance(m, linear.RowsLinear)]
    assert packed.layers == len(swapped) and packed.packed_bytes == sum(m.weight.numel() * 4 for m in swapped)
    assert all(m.packed is not None and m.packed.is_mkldnn for m in swapped)
    assert linear.install(model, min_elements=0) == packed, "idempotent"
    half, _ = build_in_memory("tiny", dtype=torch.bfloat16)
    assert linear.install(half.model, min_elements=0) == linear.Installed(0, 0)


def test_the_engine_decodes_through_the_fast_paths_and_its_tokens_equal_stock_generate(monkeypatch):
    """On a tiny model whose every projection is made `RowsLinear` with a packed copy: the engine's
    worker takes W·xᵀ for one decoding row and oneDNN for three at once and for the prompts, stock
    `generate` in the test's thread takes `F.linear`, and the greedy tokens are the same all round."""
    loaded, processor = build_in_memory("tiny")
    linear.install(loaded.model, min_elements=0)
    calls: list[tuple[str, int, bool]] = []
    forward = linear.RowsLinear.forward

    def spy(self, x):
        calls.append((threading.current_thread().name, x.numel() // x.shape[-1], getattr(linear._engaged, "on", False)))
        return forward(self, x)

    monkeypatch.setattr(linear.RowsLinear, "forward", spy)
    options = GenerationOptions(max_new_tokens=12, min_new_tokens=12)
    clips = [noise(4.0, seed=i) for i in range(3)]
    engine = Engine(loaded)
    try:
        def reply(clip):
            events = Session(engine).ask("What is this?", clip, options=options)
            return [e for e in events if isinstance(e, TurnDone)][0].reply.token_ids

        alone = [reply(c) for c in clips]
        together: dict[int, tuple[int, ...]] = {}
        threads = [threading.Thread(target=lambda i=i: together.update({i: reply(clips[i])})) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        engine.close()
    assert [together[i] for i in range(3)] == alone
    worker = [(rows, on) for name, rows, on in calls if name == "afnext-engine"]
    assert all(on for _, on in worker), "the engine's worker is engaged"
    assert {1, 3} <= {rows for rows, _ in worker}, "decoding steps of one row and of three went through RowsLinear"
    assert max(rows for rows, _ in worker) > linear.ROWS_MAX, "and the prompts"

    calls.clear()
    messages = [{"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": "What is this?"}]}]
    prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = processor(text=[prompt], audio=[clips[0]])
    ids = loaded.ids
    with torch.inference_mode():
        out = loaded.model.generate(**inputs, max_new_tokens=12, min_new_tokens=12, do_sample=False,
                                    repetition_penalty=1.2, suppress_tokens=[ids.sound, ids.sound_bos, ids.sound_eos])
    assert out[0, inputs["input_ids"].shape[1]:].tolist() == list(alone[0])
    assert calls and not any(on for _, _, on in calls), "stock generate ran stock"


def test_the_linear_bench_times_both_ways_side_by_side(tmp_path):
    from tests.conftest import bench_script
    import json

    out = tmp_path / "linear.json"
    result = bench_script("linear").main(["--size", "tiny", "--repeats", "1", "--steps", "40", "--cold-mb", "0.1",
                                            "--prompts", "1", "--out", str(out)])
    assert json.loads(out.read_text()) == result
    layers = {tuple(p["weight"]) for p in result["products"]}
    assert len(layers) == 4 and {p["rows"] for p in result["products"]} == {1, 2, 4, 8, 16, 32, 64, 128, 512}
    assert all(p[f"{way}_us"] > 0 for p in result["products"] for way in ("f_linear", "w_xt", "packed"))
    steps = result["steps"]
    for figure in ("decode_1_rows_ms", "decode_8_rows_ms", "prefill_30s_clip_ms"):
        assert set(steps[figure]) == {"f_linear", "w_xt", "packed"} and min(steps[figure].values()) > 0
    assert min(steps["decode_8_rows_steps"].values()) >= 1
