"""KD-LoRA's own hyperparameter groups: what the student distils (`DistillationArgs`) and where the
teacher's targets come from (`TeacherTargetsArgs`), and the student's old flat keys (`kdlora.training.args.RENAMED`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from kdlora.training.args import register_renamed


@dataclass(frozen=True)
class DistillationArgs:
    """The student's objective: ``task_weight·task + (1 − task_weight)·KD + feature_weight·features``."""

    task_weight: float = 0.5
    """weight of the task loss; 1 − task_weight weighs the distillation term (paper: 0.5)"""
    temperature: float = 2.0
    """softmax temperature of the KD term (classification)"""
    feature_weight: float = 0.0
    """weight of feature distillation (MLFS, Algorithm 2); 0 = off; needs online teacher targets"""
    feature_layer_map: Optional[list[list[int]]] = None
    """[[student_hidden, teacher_hidden], ...] hidden-state indices (0 = embeddings, i = output of layer i);
    default: kept layers map to themselves, else uniformly"""
    feature_dim: int = 128
    """rank of the learned projections U_s, U_t (orthonormal rows, so they cannot collapse to 0)"""


@dataclass(frozen=True)
class TeacherTargetsArgs:
    """Where the teacher's logits come from."""

    mode: Literal["online", "cached"] = "online"
    """online: the teacher runs on every batch; cached: its logits are computed once over the training set,
    keyed by example idx, and reused across epochs and reruns"""
    cache_dir: Optional[str] = None
    """where cached targets live (default ``<runs>/<name>/teacher_targets`` beside the run directories;
    without a run directory, as under fast_dev_run, beside the data module's tokenized cache)"""


register_renamed({
    "task_weight": "distillation.task_weight",
    "temperature": "distillation.temperature",
    "feature_distill_beta": "distillation.feature_weight",
    "feature_layer_map": "distillation.feature_layer_map",
    "feature_dim": "distillation.feature_dim",
    "teacher_targets": "teacher_targets.mode",
    "teacher_cache_dir": "teacher_targets.cache_dir",
    "alpha": "distillation.task_weight",
}, module="KDLoRAStudent", meaning={"alpha": "the weight of the task loss; distillation gets 1 − task_weight"})
