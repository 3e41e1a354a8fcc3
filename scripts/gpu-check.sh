#!/usr/bin/env bash
# The GPU checks, as one prepared run for a machine lent for a few minutes (an H200 here).
#
#   bash scripts/gpu-check.sh wheels    # here, with network: the packages that machine lacks, into .whl/
#   bash scripts/gpu-check.sh run       # there (its python3 holds a CUDA torch): tests, then benchmarks
#
# That machine's image has torch and most of our needs but transformers 5.17 (the AF-Next classes
# need 5.24) and neither PyAV nor soxr: `wheels` fetches those three (about 48 MB, for Python 3.12),
# and `run` installs them into /tmp/site first. flash-attn is not among them (its wheels are larger
# than what travels), so the paged pool runs with the gather there. Every stage has its own time limit,
# so one that hangs leaves time for the others; results go to $OUT (or bench/results/ when unset).
set -uo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in
wheels)
    mkdir -p .whl
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl transformers==5.24.0 av soxr
    ls -l .whl
    ;;
run)
    out="${OUT:-bench/results}"
    mkdir -p "$out"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:. HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu-machine.txt"
    # Graph and paged decoding against eager, a 30-minute recording under a 24 GB cap.
    timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tail -40 | tee "$out/gpu-tests.log"
    # The issue-10 targets: 32 voice conversations on the real-size model (random weights, bf16), the
    # paged pool with a CUDA graph per batch bucket against the per-session buffers, eager.
    for way in "paged graphs" "buffers eager"; do
        set -- $way
        timeout 150 python3 -m afnext.bench_concurrent --size full --device cuda --conversations 32 --tokens 64 \
            --repeats 2 --kv "$1" --decode "$2" --out "$out/h200-concurrent-$1-$2.json" 2>&1 | tail -5
    done
    ;;
*)
    echo "usage: bash scripts/gpu-check.sh wheels|run" >&2
    exit 2
    ;;
esac
