#!/usr/bin/env bash
# The real runs behind the closing notes: MiniLM-L6 (real weights) on local GLUE files.
#   bash scripts/minilm_glue_runs.sh KIND TASK [extra LightningCLI args]
# KIND: fft | lora (teachers/baselines, 3 epochs), student (KD-LoRA MiniLM-L3 from the fft export),
#       supernet (MLFS palette from the fft export). TASK: rte, mrpc, stsb, cola, sst2 ...
# Runs land in $RUNS/minilm-KIND-TASK (default runs/glue), exports in $RUNS/export/minilm-KIND-TASK.
# Then: python -m kdlora.report --runs runs/glue --out runs/glue/report.md
set -euo pipefail
cd "$(dirname "$0")/.."
kind=$1; task=$2; shift 2
RUNS="${RUNS:-runs/glue}"
GLUE="${GLUE:-../shared/glue}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
case $kind in
  fft|lora) extra=(--model.init_args.export_dir "$RUNS/export/minilm-$kind-$task") ;;
  student) extra=(--model.init_args.teacher_path "$RUNS/export/minilm-fft-$task" --model.init_args.export false) ;;
  supernet) extra=(--model.init_args.model_name_or_path "$RUNS/export/minilm-fft-$task"
                   --model.init_args.export_dir "$RUNS/export/minilm-supernet-$task") ;;
  *) echo "unknown kind '$kind' (fft, lora, student, supernet)" >&2; exit 2 ;;
esac
exec "${PYTHON:-.venv/bin/python}" train.py fit --config "configs/local/minilm-$kind.yaml" --data.task "$task" \
  --data.data_dir "$GLUE" --trainer.enable_progress_bar false \
  --trainer.logger.init_args.save_dir "$RUNS" --trainer.logger.init_args.name "minilm-$kind-$task" \
  "${extra[@]}" "$@"
