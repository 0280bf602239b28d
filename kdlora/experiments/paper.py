"""What the KD-LoRA and MLFS papers report, for printing beside our numbers (`kdlora.experiments.report`).

KD-LoRA: Azimi, Rishav, Teichmann, Kahou: "KD-LoRA: A Hybrid Approach to Efficient Fine-Tuning with
LoRA and Knowledge Distillation", arXiv 2410.20777 (ENLSP-IV workshop at NeurIPS 2024). Its Table 1
(GLUE dev scores ×100 per task, per teacher → student pair, per method; the median of the top 6
configurations) and Table 2 (trainable parameters per LoRA rank, GPU memory during inference,
inference time over CoLA validation, A100) are carried below as the paper prints them, and its
headline ratios as ``CLAIMS``. `tests/test_paper.py` checks the tables against each other (the
"Score" row is the mean of the task columns, the headline ratios follow from the tables).

MLFS: "Multistage Low-rank Fine-tuning of Super-transformers". Its BERT-base GLUE results are only
plotted (Figures 1 and 2: size and latency against accuracy on 6 GLUE tasks); the text gives no
per-task, per-member number, so only what the text states is carried (``MLFS_GLUE``).
"""

from __future__ import annotations

import statistics

SOURCE = "Azimi et al., KD-LoRA, arXiv 2410.20777 (2024)"

# key -> (what it measures, the paper's value as a fraction, where the value comes from)
CLAIMS: dict[str, tuple[str, float, str]] = {
    "score_vs_fft": ("GLUE score, KD-LoRA / FFT", 0.97, "Table 1 caption and text"),
    "score_vs_lora": ("GLUE score, KD-LoRA / LoRA", 0.98, "abstract; Table 1 caption"),
    "params_vs_lora": ("trainable parameters, KD-LoRA vs LoRA", -0.49, "Table 2 caption (r=8; the abstract: '40% more compact')"),
    "memory_vs_lora": ("GPU memory during inference, KD-LoRA vs LoRA", -0.30, "abstract; Table 2 caption (memory during inference)"),
    "time_vs_fft": ("inference time, KD-LoRA vs FFT", -0.30, "abstract; Table 2 caption (100 runs over CoLA validation)"),
    "time_vs_lora": ("inference time, KD-LoRA vs LoRA", -0.30, "abstract; Table 2 caption (100 runs over CoLA validation)"),
}

METHODS = ("FFT", "LoRA", "KD-LoRA")

# family -> (teacher, student) as the paper names them; FFT and LoRA train the teacher, KD-LoRA the student.
PAIRS: dict[str, tuple[str, str]] = {
    "BERT": ("BERT-base", "DistilBERT-base"),
    "DeBERTa-v3": ("DeBERTa-v3-base", "DeBERTa-v3-small"),
    "RoBERTa": ("RoBERTa-base", "DistilRoBERTa-base"),
}

# Table 1, column by column as printed: BERT-b FFT, LoRA, DBERT-b KD-LoRA; DeB-b FFT, LoRA, DeB-s
# KD-LoRA; RoB-b FFT, LoRA, DRoB-b KD-LoRA. Column names are the report's (`kdlora.experiments.report.columns`).
_TABLE1_ORDER = [(family, method) for family in ("BERT", "DeBERTa-v3", "RoBERTa") for method in METHODS]
_TABLE1_ROWS: dict[str, tuple[float, ...]] = {
    "CoLA": (57.7, 56.9, 56.3, 67.8, 69.1, 68.1, 60.9, 59.4, 56.8),
    "MNLI-m": (84.5, 83.4, 82.0, 90.3, 90.3, 88.8, 87.7, 87.2, 83.3),
    "MNLI-mm": (84.9, 83.9, 82.4, 90.6, 90.2, 89.0, 87.4, 86.9, 83.4),
    "MRPC": (89.0, 89.2, 88.3, 91.9, 90.9, 90.7, 91.1, 89.9, 89.3),
    "QNLI": (91.8, 91.1, 89.7, 94.1, 94.3, 93.4, 92.7, 92.8, 90.7),
    "QQP": (89.7, 87.9, 89.1, 91.2, 90.4, 89.9, 89.8, 88.6, 87.3),
    "RTE": (71.6, 70.1, 64.0, 85.0, 84.0, 78.8, 74.8, 71.8, 65.3),
    "SST-2": (92.8, 92.6, 92.0, 95.9, 96.0, 95.7, 94.3, 94.2, 92.9),
    "STS-B": (89.5, 88.9, 88.7, 91.5, 91.1, 89.8, 90.8, 90.3, 87.9),
    "WNLI": (56.3, 56.9, 56.3, 66.9, 56.3, 56.3, 56.3, 56.3, 56.3),
    "Score": (80.8, 80.1, 78.9, 86.5, 85.3, 84.1, 82.6, 81.7, 79.3),
}
TABLE1_COLUMNS = [c for c in _TABLE1_ROWS if c != "Score"]

# {family: {method: {column: score ×100}}}, "Score" being the paper's average.
TABLE1: dict[str, dict[str, dict[str, float]]] = {}
for _i, (_family, _method) in enumerate(_TABLE1_ORDER):
    TABLE1.setdefault(_family, {})[_method] = {column: values[_i] for column, values in _TABLE1_ROWS.items()}

# Table 2: {family: {method: {"params": {rank: trainable parameters}, "memory_mb": GPU memory during
# inference, "inference_s": inference time over CoLA validation (mean of 100 runs)}}}.
_M = 1e6
TABLE2: dict[str, dict[str, dict]] = {
    "BERT": {
        "FFT": {"params": {8: 110 * _M, 16: 110 * _M, 32: 110 * _M, 64: 110 * _M}, "memory_mb": 1332.0, "inference_s": 6.10},
        "LoRA": {"params": {8: 2.9 * _M, 16: 5.9 * _M, 32: 11.8 * _M, 64: 23.6 * _M}, "memory_mb": 463.5, "inference_s": 6.22},
        "KD-LoRA": {"params": {8: 1.2 * _M, 16: 2.4 * _M, 32: 4.7 * _M, 64: 9.4 * _M}, "memory_mb": 296.8, "inference_s": 5.36},
    },
    "RoBERTa": {
        "FFT": {"params": {8: 125 * _M, 16: 125 * _M, 32: 125 * _M, 64: 125 * _M}, "memory_mb": 1515.9, "inference_s": 7.21},
        "LoRA": {"params": {8: 2.9 * _M, 16: 5.9 * _M, 32: 11.8 * _M, 64: 23.6 * _M}, "memory_mb": 531.9, "inference_s": 7.19},
        "KD-LoRA": {"params": {8: 1.5 * _M, 16: 2.9 * _M, 32: 5.9 * _M, 64: 11.8 * _M}, "memory_mb": 358.3, "inference_s": 4.44},
    },
    "DeBERTa-v3": {
        "FFT": {"params": {8: 183 * _M, 16: 183 * _M, 32: 183 * _M, 64: 183 * _M}, "memory_mb": 2234.5, "inference_s": 14.37},
        "LoRA": {"params": {8: 2.9 * _M, 16: 5.9 * _M, 32: 11.8 * _M, 64: 23.6 * _M}, "memory_mb": 763.4, "inference_s": 15.62},
        "KD-LoRA": {"params": {8: 1.5 * _M, 16: 2.9 * _M, 32: 5.9 * _M, 64: 11.8 * _M}, "memory_mb": 590.3, "inference_s": 10.38},
    },
}

MLFS_SOURCE = "MLFS: Multistage Low-rank Fine-tuning of Super-transformers (BERT-base on GLUE, Figures 1-2 and Section 7.1)"

# What the MLFS paper's text states about its BERT-base GLUE palettes (the per-task values are only plotted).
MLFS_GLUE: dict[str, float] = {
    "maxnet_params": 110 * _M,   # "a palette of models, from a 45M param. minnet to full-size 110M maxnet"
    "minnet_params": 45 * _M,
    "size_vs_teacher": 1 / 4,    # "accurate, smaller encoder models at 1/4 the size of the teacher
    "latency_vs_teacher": 1 / 3,  # and 1/3 its runtime latency on a single GPU"
}


def pair_label(family: str) -> str:
    """``BERT-base → DistilBERT-base``: the paper's teacher and its KD-LoRA student."""
    teacher, student = PAIRS[family]
    return f"{teacher} → {student}"


def table1_ratio(family: str, column: str, method: str = "KD-LoRA", baseline: str = "FFT") -> float:
    """The paper's `method` / `baseline` score ratio of one Table 1 column ("Score": the averages)."""
    return TABLE1[family][method][column] / TABLE1[family][baseline][column]


def mean_over_families(ratio) -> float:
    """The mean of ``ratio(family)`` over the paper's three families (how its headline ratios read)."""
    return statistics.fmean(ratio(family) for family in PAIRS)
