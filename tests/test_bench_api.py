"""bench/api.py runs end to end on the tiny model with a short recording and reports consistent figures."""

from __future__ import annotations

import json
import statistics

import pytest

from tests.conftest import bench_script

REQUESTS = 3


def bench_api():
    return bench_script("api")


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-api") / "api.json"
    argv = ["--size", "tiny", "--recording-seconds", "40", "--requests", str(REQUESTS), "--tokens", "16",
            "--out", str(out)]
    assert bench_api().main(argv) == 0
    return json.loads(out.read_text())


def test_header_names_the_run(result):
    assert result["command"] == ("python bench/api.py --size tiny --recording-seconds 40 --requests 3 --tokens 16 "
                                 "--out " + result["command"].split("--out ")[1])
    assert result["machine"]["cpus"] > 0 and result["date"]
    for part in ("recording", "overhead"):
        assert result["models"][part]["size"] == "tiny" and result["models"][part]["parameters"] > 0
    assert result["run_s"] > 0


def test_recording_follow_up_reuses_the_cache(result):
    rec = result["recording"]
    assert rec["audio_s"] == 40 and rec["wav_mb"] == pytest.approx(40 * 16000 * 2 / 1e6, abs=0.1)
    assert rec["first_ttft_s"] > 0 and rec["follow_up_ttft_s"] > 0
    assert rec["speedup"] == pytest.approx(rec["first_ttft_s"] / rec["follow_up_ttft_s"])
    assert rec["met"] == (rec["speedup"] >= rec["target_speedup"] == 50)
    assert rec["first_cached_tokens"] == 0 and rec["first_prompt_tokens"] > 40 * 25  # 25 audio tokens a second
    # The follow-up found the first turn's session: its whole prompt is cached, only the new turn prefilled.
    assert rec["cached_tokens"] >= rec["first_prompt_tokens"]
    assert rec["new_tokens_prefilled"] == rec["follow_up_prompt_tokens"] - rec["cached_tokens"]
    assert 0 < rec["new_tokens_prefilled"] < 100
    costs = rec["follow_up_resent_audio_s"]
    assert set(costs) == {"client_json_encode_s", "server_json_parse_s", "hash_s"} and all(v > 0 for v in costs.values())
    assert rec["follow_up_resent_audio_total_s"] == pytest.approx(sum(costs.values()))


def test_overhead_is_a_line_through_two_reply_lengths(result):
    """The overhead figures come from paired turns at two lengths: the median differences, the slope
    between them per chunk, the intercept as the fixed part, and intervals around them."""
    over = result["overhead"]
    short, long = over["tokens"]
    assert over["requests"] == REQUESTS and (short, long) == (2, 16) and over["torch_threads"] == 1
    for name in ("library",):
        for n in (short, long):
            side = over[name][str(n)]
            assert len(side["wall_s"]) == REQUESTS
            assert all(0 < t <= w for t, w in zip(side["ttft_s"], side["wall_s"]))
            assert all(0 < c <= n for c in side["chunks"])
    for name in ("api", "raw_http"):
        fig = over[name]
        assert fig["same_text"], f"{name}: the library and the API did not run the same turns"
        lib = {n: over["library"][str(n)]["wall_s"] for n in (short, long)}
        for n in (short, long):
            mine = fig["runs"][str(n)]["wall_s"]
            assert fig["per_request_s"][str(n)] == pytest.approx([a - b for a, b in zip(mine, lib[n])])
        d_short = statistics.median(fig["per_request_s"][str(short)]) * 1e3
        d_long = statistics.median(fig["per_request_s"][str(long)]) * 1e3
        chunks = fig["chunks"]
        slope = (d_long - d_short) / (chunks[str(long)] - chunks[str(short)])
        assert fig["per_chunk_ms"] == pytest.approx(slope)
        assert fig["per_request_fixed_ms"] == pytest.approx(d_short - chunks[str(short)] * slope)
        assert fig["per_request_ms"] == pytest.approx(d_long)
        for key in ("per_request_fixed_ms", "per_chunk_ms"):
            low, high = fig["ci95"][key]
            assert low <= high
    api = over["api"]
    assert over["met"] == (api["per_request_fixed_ms"] <= 5 and api["per_chunk_ms"] <= 1)
    assert result["targets_met"] == {"follow_up_speedup": result["recording"]["met"], "overhead": over["met"]}


def test_the_overhead_line_is_fitted_as_documented():
    """overhead_line on made-up differences: 1 ms fixed and 0.5 ms a chunk come back exactly, and the
    bootstrap interval holds them."""
    line = bench_api().overhead_line({2: [0.002] * 9, 32: [0.0165] * 9}, {2: 2.0, 32: 31.0})
    assert line["per_chunk_ms"] == pytest.approx(0.5) and line["per_request_fixed_ms"] == pytest.approx(1.0)
    assert line["ci95"]["per_request_fixed_ms"] == pytest.approx([1.0, 1.0])
    with pytest.raises(AssertionError, match="no slope"):
        bench_api().overhead_line({2: [0.001], 32: [0.002]}, {2: 2.0, 32: 2.0})
