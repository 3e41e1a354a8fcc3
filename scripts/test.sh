#!/usr/bin/env bash
# Set up (see setup.sh) and run the test suite: offline, on CPU, with random-weight models.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh requirements-dev.txt
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest -q --durations=30 tests "$@"
