"""The benchmark runs end to end on the tiny model and reports every figure issue-level targets name."""

from __future__ import annotations

import json

from afnext import bench


def test_bench_reports_ours_and_stock_side_by_side(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench.main(["--size", "tiny", "--durations", "5,31", "--tokens", "4", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["command"].startswith("python -m afnext.bench --size tiny") and result["limits"] == {}
    five, longer = result["runs"]
    assert five["features"]["audio_tokens"] == 125 and longer["features"]["audio_tokens"] == 775
    assert longer["encode_per_window_s"] == longer["encode_s"] / 2  # 31 s is two windows
    for run in result["runs"]:
        assert run["first_turn"]["ttft_s"] > 0 and run["first_turn"]["stock_ttft_s"] > 0
        assert run["follow_up_ttft_s"]["cached"] > 0 and run["decode_tok_s"]["tokens"] == 4
        assert run["peak_gpu_gib"] == {"ours": None, "stock_generate": None}  # CPU: no GPU memory to report
    voice = result["voice_turn"]
    assert voice["turns_before"] == 10 and voice["prompt_tokens"] > 10 * 125 and voice["ours_ttft_s"] > 0
