#!/usr/bin/env bash
# The README demo, end to end on a fresh machine (about 10 minutes on 2 CPU cores):
#   1. set up .venv and fetch real MiniLM weights into models/ (once),
#   2. fully fine-tune the teacher (all-MiniLM-L6-v2) on the embedded SST-2 data,
#   3. train the KD-LoRA student (paraphrase-MiniLM-L3-v2 + LoRA) from that teacher,
#   4. print the comparison table (scores, trainable parameters, memory, latency).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
for m in minilm minilm-l3; do
  [ -f "models/$m/model.safetensors" ] || bash scripts/fetch_models.sh "$m" "models/$m"
done
PY=.venv/bin/python
# A fresh demo each time: remove only the two runs this script makes (runs/demo/sst2/{fft,kdlora}, the
# teacher-target cache inside kdlora/ too); anything else under runs/ is left alone.
rm -rf runs/demo/sst2/fft runs/demo/sst2/kdlora
$PY train.py fit --config configs/demo/teacher.yaml
$PY train.py fit --config configs/demo/student.yaml
$PY -m kdlora.report --runs runs/demo/sst2/fft runs/demo/sst2/kdlora --out runs/demo/sst2/report.md \
    --pair minilm=models/minilm:models/minilm-l3
echo
echo "=== kdlora demo: all-MiniLM-L6-v2 teacher (full fine-tuning) vs KD-LoRA MiniLM-L3 student, SST-2 dev ==="
cat runs/demo/sst2/report.md
