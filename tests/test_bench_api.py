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


def test_overhead_is_computed_from_paired_turns(result):
    over = result["overhead"]
    lib, api = over["library"], over["api"]
    assert over["requests"] == REQUESTS and over["tokens"] == 16
    assert over["same_text"], "the library and the API did not run the same turn"
    for side in (lib, api):
        assert len(side["wall_s"]) == REQUESTS
        assert all(0 < t <= w for t, w in zip(side["ttft_s"], side["wall_s"]))
        assert all(0 <= s < w for s, w in zip(side["first_to_last_s"], side["wall_s"]))
        assert all(0 < c <= 16 for c in side["chunks"])
    assert lib["chunks"] == api["chunks"]  # one SSE chunk per text delta
    assert over["per_request_s"] == pytest.approx([a - b for a, b in zip(api["wall_s"], lib["wall_s"])])
    per_chunk = [(a - b) / c for a, b, c in zip(api["first_to_last_s"], lib["first_to_last_s"], api["chunks"])]
    assert over["per_chunk_s"] == pytest.approx(per_chunk)
    fixed = [d - (a - b) for d, a, b in zip(over["per_request_s"], api["first_to_last_s"], lib["first_to_last_s"])]
    assert over["per_request_fixed_s"] == pytest.approx(fixed)
    assert over["per_request_fixed_ms"] == pytest.approx(statistics.median(fixed) * 1e3)
    assert over["per_request_ms"] == pytest.approx(statistics.median(over["per_request_s"]) * 1e3)
    assert over["per_chunk_ms"] == pytest.approx(statistics.median(per_chunk) * 1e3)
    assert over["met"] == (over["per_request_fixed_ms"] <= 5 and over["per_chunk_ms"] <= 1)
    raw = over["raw_http"]
    assert raw["same_text"] and raw["per_request_ms"] > raw["per_request_fixed_ms"] - 50, raw  # the bare client's run
    assert result["targets_met"] == {"follow_up_speedup": result["recording"]["met"], "overhead": over["met"]}
