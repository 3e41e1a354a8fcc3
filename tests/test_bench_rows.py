"""The decoding-rows benchmarks run end to end and leave the engine as they found it."""

from __future__ import annotations

import json

from afnext import attention, paged
from afnext.engine import Engine
from tests.conftest import bench_script


def test_the_ways_rows_attend_take_turns_inside_the_engine_and_are_put_back(tmp_path):
    bench, out = bench_script("decode_rows"), tmp_path / "rows.json"
    step, rows, view_min = Engine._step, attention._decode_rows, paged.VIEW_MIN_TOKENS
    result = bench.main(["--clips", "1,3", "--conversations", "3", "--tokens", "12", "--rounds", "1", "--out", str(out)])
    assert json.loads(out.read_text()) == result
    assert (Engine._step, attention._decode_rows, paged.VIEW_MIN_TOKENS) == (step, rows, view_min)
    assert result["view_min_tokens"] == view_min and [r["clip_s"] for r in result["runs"]] == [1.0, 3.0]
    short, longer = result["runs"]
    assert short["row_tokens"][0] < longer["row_tokens"][0], "a longer clip is more audio tokens in every row"
    for run in result["runs"]:
        low, high = run["row_tokens"]
        assert high - low <= 12 + 8, "rows of one round differ by their replies so far (and their questions' lengths)"
        for way in bench.WAYS:
            assert run[f"{way}_steps"] >= 2 and run[f"{way}_step_ms"] > 0, f"{way} ran steps of every row"


def test_one_layers_attention_is_timed_cold_or_warm_with_every_way_agreeing(tmp_path):
    views, out = bench_script("views"), tmp_path / "views.json"
    result = views.main(["--rows", "3", "--lengths", "40,300", "--cold", "--out", str(out)])
    assert "caches flushed" in result["what"] and [r["tokens"] for r in result["rows"]] == [40, 300]
    for row in result["rows"]:
        assert {"gather_us", "gather_head_first_us", "view_us", "buffer_us"} <= row.keys()
