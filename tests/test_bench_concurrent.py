"""The concurrency benchmark runs end to end on the tiny model and reports every figure its targets name."""

from __future__ import annotations

import json

import pytest

from afnext import bench_concurrent
from tests.conftest import bench_script


def test_bench_concurrent_reports_batching_and_ingest(tmp_path):
    out = tmp_path / "concurrent.json"
    argv = ["--size", "tiny", "--conversations", "3", "--tokens", "16", "--repeats", "2", "--long-seconds", "300", "--out", str(out)]
    assert bench_concurrent.main(argv) == 0
    result = json.loads(out.read_text())
    assert result["command"].startswith("python -m afnext.bench_concurrent --size tiny")
    assert result["model"]["size"] == "tiny" and result["machine"]["cpus"] > 0

    assert len(result["batching"]["rounds"]) == 2
    batching = result["batching"]["rounds"][0]
    assert result["batching"]["median_run_speedup"] == pytest.approx(
        (batching["run_speedup"] + result["batching"]["rounds"][1]["run_speedup"]) / 2)
    assert batching["conversations"] == 3 and batching["tokens"] == 16
    for mode in ("sequential", "concurrent"):
        figures = batching[mode]
        assert figures["new_tokens"] == 3 * 16 and figures["decode_tokens"] == 3 * 15  # fixed-length replies
        assert 0 < figures["ttft_p50_s"] <= figures["ttft_p95_s"] < figures["run_s"]
        assert 0 < figures["decode_s"] <= figures["run_s"] and figures["steps"] > 0
        assert figures["decode_tok_s"] == pytest.approx(figures["decode_tokens"] / figures["decode_s"])
        assert figures["run_tok_s"] == pytest.approx(figures["new_tokens"] / figures["run_s"])
        assert figures["tokens_per_step"] == pytest.approx(figures["new_tokens"] / figures["steps"])
    one, together = batching["sequential"], batching["concurrent"]
    assert one["steady_decode_tok_s"] == one["decode_tok_s"]  # one reply per step: all of decoding is steady
    assert together["steady_steps"] >= 2 and together["step_ms"] > 0  # 16 tokens: the 3 replies overlap (8 left
    # too short a window on a loaded machine, where a reader thread notes its first token late)
    assert together["steady_decode_tok_s"] == pytest.approx(3 * 1e3 / together["step_ms"])
    assert batching["steady_decode_speedup"] == pytest.approx(together["steady_decode_tok_s"] / one["decode_tok_s"])
    assert batching["decode_speedup"] == pytest.approx(together["decode_tok_s"] / one["decode_tok_s"])
    assert batching["run_speedup"] == pytest.approx(together["run_tok_s"] / one["run_tok_s"])
    assert together["steps"] < one["steps"]  # batched: the replies shared steps

    ingest = result["ingest"]
    assert ingest["long_audio_s"] == 300 and ingest["long_audio_tokens"] == 7500
    assert ingest["prefill_chunk_tokens"] == 128 and ingest["prefill_step_tokens"] == 512 and ingest["encode_frames_per_step"] == 3000
    assert ingest["encode_chunk_frames"] == 1500  # the CPU defaults
    assert any(ingest["ingest_outlasted_short"]), "no short turn ran while the recording was still being read"
    assert len(ingest["short_idle_all_s"]) == 3 and 1 <= len(ingest["short_during_all_s"]) <= 3
    assert ingest["short_idle_ttft_s"] > 0 and ingest["short_during_ingest_ttft_s"] > 0
    assert ingest["ttft_ratio"] == pytest.approx(ingest["short_during_ingest_ttft_s"] / ingest["short_idle_ttft_s"])
    assert ingest["long_ttft_s"] >= ingest["long_encode_s"] + ingest["long_prefill_s"] > 0


def test_busy_time_counts_overlaps_once():
    assert bench_concurrent.busy_time([(0, 2), (1, 3), (5, 6)]) == 4
    assert bench_concurrent.busy_time([(0, 10), (2, 3)]) == 10


def test_bench_concurrent_without_a_long_recording_leaves_the_ingest_figure_out(tmp_path):
    out = tmp_path / "concurrent.json"
    argv = ["--size", "tiny", "--conversations", "2", "--tokens", "16", "--repeats", "1", "--long-seconds", "0", "--out", str(out)]
    assert bench_concurrent.main(argv) == 0
    result = json.loads(out.read_text())
    assert result["ingest"] is None and len(result["batching"]["rounds"]) == 1


def test_the_two_engines_bench_times_both_thread_plans_in_fresh_processes(tmp_path):
    two, out = bench_script("two_engines"), tmp_path / "two.json"
    result = two.main(["--size", "tiny", "--repeats", "1", "--tokens", "24", "--out", str(out)])
    assert json.loads(out.read_text()) == result
    assert result["threads"]["split"] == max(1, result["threads"]["full"] // 2)
    keys = {"a_8_rows_b_idle_ms", "a_1_row_b_idle_ms", "a_8_rows_b_8_rows_ms", "b_8_rows_a_8_rows_ms"}
    for kind in ("full", "split"):
        (run,) = result["runs"][kind]
        assert set(run) == keys and all(v > 0 for v in run.values())
        assert result["median"][kind] == run
