#!/usr/bin/env bash
# Set up (if needed) and run the demonstration on the packaged all-MiniLM-L6-v2 and real data.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mergeshield demo "$@"
