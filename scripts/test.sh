#!/usr/bin/env bash
# Set up the environment if needed, then run the test suite (CPU, tiny models, offline).
#   bash scripts/test.sh            # the default suite (slow tests deselected)
#   bash scripts/test.sh -m slow    # only the slow ones
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest -q "$@"
