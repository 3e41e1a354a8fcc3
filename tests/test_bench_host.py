"""The host-overhead benchmark runs end to end on a small model and its figures agree with each other."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import bench_script


def test_bench_host_times_full_decoding_steps_in_both_kv_layouts(tmp_path):
    host, out = bench_script("host"), tmp_path / "host.json"
    assert host.main(["--batches", "1,2,3", "--tokens", "6", "--layers", "2", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["command"] == f"python bench/host.py --batches 1,2,3 --tokens 6 --layers 2 --out {out}"
    assert result["model"]["decoder_layers"] == 2 and result["tokens"] == 6
    for name in ("buffers", "paged"):
        figures = result[name]
        assert figures["kv"] == name, "each variant ran on the layout it is named after"
        assert [r["batch"] for r in figures["rows"]] == [1, 2, 3]
        for row in figures["rows"]:
            assert row["steps_timed"] >= 3, "most of a reply's steps have every conversation decoding"
            assert row["tok_s"] == pytest.approx(row["batch"] * 1e3 / row["ms_per_step"])
        slope, intercept = np.polyfit([1, 2, 3], [r["ms_per_step"] for r in figures["rows"]], 1)
        assert figures["us_per_session_layer"] == pytest.approx(slope * 1e3 / 2)
        assert figures["ms_per_step_fixed"] == pytest.approx(intercept)
