"""The resume benchmark runs end to end on the tiny model: a stored conversation comes back with the
very reply the live one gave, and every figure is there."""

from __future__ import annotations

import json

import pytest

from tests.conftest import bench_script


def test_resume_bench_reports_the_cost_of_coming_back(tmp_path):
    bench = bench_script("store_resume")
    out = tmp_path / "resume.json"
    assert bench.main(["--size", "tiny", "--recording-seconds", "30", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["same_reply"] and result["model"]["size"] == "tiny" and result["recording_s"] == 30
    assert result["conversation_tokens"] > 30 * 25  # 25 audio tokens a second
    assert 0 < result["live_follow_up_ttft_s"] and 0 < result["resume_rebuild_s"]
    assert result["resume_total_s"] == pytest.approx(result["resume_rebuild_s"] + result["resumed_follow_up_ttft_s"])
    assert result["resume_vs_first_question"] == pytest.approx(result["resume_total_s"] / result["first_question_ttft_s"])
