#!/usr/bin/env bash
# Install bnlab into ./.venv from scratch: torch (pinned CPU build) first, then bnlab with its test
# extras, then - when run as root on Debian - the offline Fashion-MNIST data, headless Chromium
# (used by the report test) and g++/ninja (for the fused BN kernels, built last). Safe to re-run:
# every step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# torch first and pinned: an unpinned torch (or one pulled in by another package) is a multi-GB CUDA build.
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test]"
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  missing=()
  [ -d /usr/share/datasets/fashion-mnist ] || missing+=(dataset-fashion-mnist)
  command -v chromium >/dev/null 2>&1 || missing+=(chromium)
  command -v g++ >/dev/null 2>&1 || missing+=(g++)          # compiles bnlab's fused CPU BN kernels
  command -v ninja >/dev/null 2>&1 || missing+=(ninja-build)
  if [ ${#missing[@]} -gt 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null \
      || echo "install.sh: could not apt-get install ${missing[*]} (tests that need them will say so)" >&2
  fi
fi
# Compile the fused BN kernels once (cached on disk); without a compiler bnlab uses its composite path.
.venv/bin/python -m bnlab.norm.kernels >/dev/null 2>&1 \
  || echo "install.sh: bnlab's fused CPU kernels were not built (needs g++ and ninja); bnlab uses its composite path" >&2
echo "bnlab installed in $(pwd)/.venv"
