#!/usr/bin/env bash
# Set up (see setup.sh) and run the test suite: offline, on CPU, with random-weight models.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh requirements-dev.txt
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# Two workers, each taking whole test files (a file's servers and fixtures stay in one process): most
# tests wait on a server, a browser or a subprocess, so two at a time fit two cores.
exec .venv/bin/python -m pytest -q -n 2 --dist loadfile --durations=30 tests "$@"
