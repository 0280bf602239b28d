#!/usr/bin/env bash
# The accelerator check (benchmarks/gpu_check.py): a KD-LoRA student and an MLFS supernet on tiny random
# models (no network), bf16-mixed, DDP over every GPU (NCCL), peak memory, inference latency, exports,
# and OUT/report.md saying what ran and what it measured. Finishes within 8 minutes or is stopped.
#   bash scripts/gpu_check.sh OUT [benchmarks/gpu_check.py options, e.g. --devices 2 --epochs 2]
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:?usage: scripts/gpu_check.sh OUT [options]   (OUT: a new directory)}"
shift
python="${PYTHON:-}"
if [ -z "$python" ]; then
  if [ -x "$repo/.venv/bin/python" ]; then python="$repo/.venv/bin/python"; else python=python3; fi
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# Two fits of at most 200 s each, then the exports: well inside 480 s; the outer limit is a backstop.
exec timeout --kill-after=10 480 "$python" "$repo/benchmarks/gpu_check.py" --out "$out" --timeout 200 "$@"
