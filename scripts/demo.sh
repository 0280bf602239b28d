#!/usr/bin/env bash
# The README demo: both methods end to end on a fresh machine (under 20 minutes on 2 CPU cores):
#   1. set up .venv and fetch real MiniLM weights into models/ (once),
#   2. fully fine-tune the teacher (all-MiniLM-L6-v2) on the embedded SST-2 data,
#   3. train the KD-LoRA student (paraphrase-MiniLM-L3-v2 + LoRA) from that teacher,
#   4. train an MLFS palette (a weight-sharing super-transformer over the teacher),
#   5. pick the best palette member at half the maxnet's latency and export it (kdlora.mlfs.select),
#   6. print one report: the KD-LoRA tables, the palette, the chosen member and where every artifact is.
# Everything is written under runs/demo/sst2/; the report is runs/demo/sst2/report.md.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
step() { printf '\n=== [%s/6] %s (%dm%02ds elapsed)\n' "$1" "$2" $(((SECONDS - start) / 60)) $(((SECONDS - start) % 60)); }
step 1 "environment and MiniLM weights"
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
for m in minilm minilm-l3; do
  [ -f "models/$m/model.safetensors" ] || bash scripts/fetch_models.sh "$m" "models/$m"
done
PY=.venv/bin/python
DEMO=runs/demo/sst2
# A fresh demo each time: remove only what this script makes under runs/demo/sst2 (the teacher-target
# cache inside kdlora/ too); anything else under runs/ is left alone.
rm -rf "$DEMO/fft" "$DEMO/kdlora" "$DEMO/mlfs" "$DEMO/select" "$DEMO/report.md" "$DEMO/report.json"
step 2 "teacher: full fine-tuning of all-MiniLM-L6-v2"
$PY train.py fit --config configs/demo/teacher.yaml
step 3 "KD-LoRA student: paraphrase-MiniLM-L3-v2 + LoRA, distilled from the teacher"
$PY train.py fit --config configs/demo/student.yaml
step 4 "MLFS palette: one super-transformer over the teacher, four members"
$PY train.py fit --config configs/demo/supernet.yaml
step 5 "select: the best member at <= 0.5x the maxnet's latency, exported"
ckpt=$(ls "$DEMO"/mlfs/version_*/checkpoints/best-*.ckpt | head -n 1)
$PY -m kdlora.mlfs.select --checkpoint "$ckpt" --max-latency-ratio 0.5 --out "$DEMO/select" \
    --max-samples 256 --random 8 --generations 2 --children 4 --population 4 --report-dev
step 6 "report"
$PY -m kdlora.experiments.report --runs "$DEMO/fft" "$DEMO/kdlora" "$DEMO/mlfs" --selection "$DEMO/select" \
    --out "$DEMO/report.md" --pair minilm=models/minilm:models/minilm-l3 > /dev/null
echo
echo "=== kdlora demo: all-MiniLM-L6-v2 teacher (FFT), KD-LoRA MiniLM-L3 student and an MLFS palette, SST-2 dev ==="
cat "$DEMO/report.md"
printf '\n=== demo done in %dm%02ds; report: %s/report.md\n' $(((SECONDS - start) / 60)) $(((SECONDS - start) % 60)) "$DEMO"
