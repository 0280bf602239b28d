#!/usr/bin/env bash
# The real runs behind the closing notes: MiniLM-L6 (real weights) on local GLUE files.
#   bash scripts/minilm_glue_runs.sh KIND TASK [extra LightningCLI args]
# KIND: fft | lora (teachers/baselines, 3 epochs), student (KD-LoRA MiniLM-L3 from the fft export),
#       supernet (MLFS palette from the fft export). TASK: rte, mrpc, stsb, cola, sst2 ...
# Runs land in runs/minilm/TASK/METHOD (METHOD: fft, lora, kdlora, mlfs), as configs/local/*.yaml say:
# TensorBoard logs, checkpoints and results.json in version_N/, the model(s) in export/; the student
# and the supernet read the teacher from runs/minilm/TASK/fft/export.
# Then: python -m kdlora.experiments.report --runs runs/minilm --out runs/minilm/report.md
set -euo pipefail
cd "$(dirname "$0")/.."
kind=$1; task=$2; shift 2
GLUE="${GLUE:-../shared/glue}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
case $kind in
  fft|lora|supernet) extra=() ;;
  student) extra=(--model.init_args.export.enabled false) ;;  # the students are scored, not reused: no export
  *) echo "unknown kind '$kind' (fft, lora, student, supernet)" >&2; exit 2 ;;
esac
exec "${PYTHON:-.venv/bin/python}" train.py fit --config "configs/local/minilm-$kind.yaml" --data.task "$task" \
  --data.data_dir "$GLUE" --trainer.enable_progress_bar false ${extra[@]+"${extra[@]}"} "$@"
