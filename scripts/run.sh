#!/usr/bin/env bash
# Set up (see setup.sh) and start the assistant. Arguments go to `python -m app`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh requirements.txt
exec .venv/bin/python -m app "$@"
