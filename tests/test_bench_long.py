"""The long-recording benchmark runs end to end on the tiny model (4 minutes in 1-minute parts): both
modes answer over the same parts, one after another means one after another, and the follow-up
encodes nothing."""

from __future__ import annotations

import json

import pytest

from tests.conftest import bench_script


def test_long_bench_times_parts_in_parallel_against_one_after_another(tmp_path):
    bench = bench_script("long")
    out = tmp_path / "long.json"
    argv = ["--model", "tiny", "--minutes", "4", "--part-s", "60", "--reply-tokens", "4", "--out", str(out)]
    assert bench.main(argv) == 0
    result = json.loads(out.read_text())
    assert result["command"] == "python bench/long.py " + " ".join(argv)
    assert result["model"]["name"] == "tiny" and result["model"]["random_weights"]
    assert result["machine"]["cpus"] > 0 and result["machine"]["torch"]
    assert result["recording"]["seconds"] == 240 and result["part_s"] == 60 and result["reply_tokens"] == 4

    serial, parallel, follow = result["serial"], result["parallel"], result["follow_up"]
    assert result["same_parts"] and serial["parts"] == parallel["parts"] == 6  # ceil(240 / (60 - 15)) even parts
    for mode in (serial, parallel):
        assert 0 < mode["ttft_s"] <= mode["turn_done_s"] and mode["merge_new_tokens"] == 4  # fixed length
        assert mode["encode_s"] > 0 and mode["prefill_s"] > 0 and mode["encoded_windows"] == 12  # two per part
        assert [row["part"] for row in mode["timeline"]] == [1, 2, 3, 4, 5, 6]
        assert mode["timeline"][-1]["end_s"] == 240
        for row in mode["timeline"]:
            assert row["read_at_s"] <= row["listening_at_s"] <= row["answered_at_s"] <= mode["merging_at_s"]
    for before, after in zip(serial["timeline"], serial["timeline"][1:]):
        assert before["answered_at_s"] <= after["listening_at_s"]  # one after another: each waits for the last
    assert result["ratios"]["serial_over_parallel_ttft"] == pytest.approx(serial["ttft_s"] / parallel["ttft_s"])

    assert follow["encoded_nothing"] and follow["encode_s"] == 0 and follow["encoded_windows_added"] == 0
    assert 0 < follow["ttft_s"] and follow["merge_new_tokens"] == 4 and follow["parts"] == 6
    assert all("read_at_s" not in row and "answered_at_s" in row for row in follow["timeline"])  # nothing read again

    memory = result["memory"]
    assert memory["windows_whole"] == 8 and memory["whole_recording_float32_mb"] == pytest.approx(15.4)
    assert memory["whole_recording_and_features_mb"] == pytest.approx(15.36 + 8 * 128 * 3000 * 4 / 1e6, abs=0.1)
    assert memory["peak_rss_mb"] >= memory["peak_rss_after_load_mb"] > 0
