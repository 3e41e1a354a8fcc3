#!/usr/bin/env bash
# Idempotent set-up for a fresh Debian/Ubuntu machine with Python >= 3.11:
# the Debian packages the project needs, a virtualenv in .venv, and the Python packages.
# Usage: scripts/setup.sh [requirements file]   (default: requirements.txt)
set -euo pipefail
cd "$(dirname "$0")/.."
reqs="${1:-requirements.txt}"
py="${PYTHON:-python3}"

"$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
  echo "Python >= 3.11 is needed; $($py --version 2>&1) was found." >&2; exit 1; }

apt_install() {  # install Debian packages if missing, as root or through sudo; 1 if it could not
  command -v dpkg >/dev/null || return 1
  local missing=()
  for pkg in "$@"; do dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  local sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  if [ -n "$sudo" ] && ! command -v sudo >/dev/null; then
    echo "Please install these Debian packages: ${missing[*]}" >&2; return 1
  fi
  # Wait for another apt or dpkg run (a machine's own start-up updates) instead of failing at once.
  local wait=(-o DPkg::Lock::Timeout=300)
  $sudo apt-get "${wait[@]}" update -qq \
    && $sudo env DEBIAN_FRONTEND=noninteractive apt-get "${wait[@]}" install -y -qq "${missing[@]}"
}

if [ ! -x .venv/bin/python ]; then
  "$py" -c 'import ensurepip, venv' 2>/dev/null \
    || apt_install "python$("$py" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')-venv" \
    || exit 1
  "$py" -m venv .venv
fi
# PortAudio for the desktop microphone loop (sounddevice); everything else runs without it.
apt_install libportaudio2 || echo "Without libportaudio2 the desktop loop (python -m app.desktop) cannot open audio devices." >&2
# Headless Chromium for the browser tests (tests/test_browser.py), only when setting up for tests.
if [ "$(basename "$reqs")" = requirements-dev.txt ]; then
  apt_install chromium || echo "Without chromium the browser tests are skipped." >&2
fi
pip=(.venv/bin/python -m pip install -q --disable-pip-version-check)

# torch first: without an NVIDIA GPU take the CPU build (PyPI's default build brings GBs of CUDA).
if ! .venv/bin/python -c 'import torch' 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    "${pip[@]}" torch==2.13.0
  else
    "${pip[@]}" --timeout 20 --retries 1 --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
      || "${pip[@]}" torch==2.13.0
  fi
fi

# The rest, only when the requirements changed since the last successful install.
stamp=".venv/.installed-$(basename "$reqs")"
sum=$(cat requirements*.txt | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$sum" ]; then
  "${pip[@]}" -r "$reqs"
  echo "$sum" > "$stamp"
fi
# Smart Turn's model (semantic end of turn, afnext/turn.py) ships inside pipecat-ai's wheel: the wheel
# alone, none of its dependencies (only the .onnx file in it is used; pipecat is never imported).
if ! .venv/bin/python -c 'import importlib.util as u, sys; sys.exit(u.find_spec("pipecat") is None)'; then
  "${pip[@]}" --no-deps pipecat-ai==1.14.0 \
    || echo "Without pipecat-ai's Smart Turn model, turns end on silence alone (python -m afnext.turn fetch gets it)." >&2
fi
