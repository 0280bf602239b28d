#!/usr/bin/env bash
# Create .venv (once) and install kdlora with its test extra. Safe to run again: it only installs
# what is missing. The CPU build of torch goes in first, pinned: an unpinned torch would pull
# several GB of CUDA wheels. Override with TORCH_SPEC (e.g. TORCH_SPEC=torch on a GPU machine).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
VPY=.venv/bin/python
if ! "$VPY" -c "import kdlora, torch, lightning, peft, transformers, datasets, torchmetrics, pytest, nbclient, ipykernel" 2>/dev/null; then
  "$VPY" -m pip install --quiet --upgrade pip
  "$VPY" -c "import torch" 2>/dev/null || "$VPY" -m pip install --quiet "$TORCH_SPEC"
  "$VPY" -m pip install --quiet -e ".[dev]"
fi
"$VPY" -c "import torch, transformers, lightning; print(f'kdlora env: torch {torch.__version__}, transformers {transformers.__version__}, lightning {lightning.__version__}')"
