"""Training losses: task loss and knowledge distillation. Plain functions, no Lightning."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def task_loss(logits: torch.Tensor, labels: torch.Tensor, is_regression: bool) -> torch.Tensor:
    """Cross-entropy for classification, MSE for regression (STS-B)."""
    if is_regression:
        return F.mse_loss(logits.squeeze(-1).float(), labels.float())
    return F.cross_entropy(logits.float(), labels.long())


def logit_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """T²·KL(softmax(t/T) ‖ softmax(s/T)), averaged over the batch (Hinton et al.).

    The T² factor keeps gradient magnitudes comparable across temperatures.
    """
    t = temperature
    log_p_student = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / t, dim=-1)
    return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True) * t * t


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    is_regression: bool,
    alpha: float = 0.5,
    temperature: float = 2.0,
) -> torch.Tensor:
    """KD-LoRA objective: α·task + (1−α)·KD.

    Classification: α·CE(s, y) + (1−α)·T²·KL(t/T ‖ s/T). Regression: α·MSE(s, y) + (1−α)·MSE(s, t).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    hard = task_loss(student_logits, labels, is_regression)
    if is_regression:
        soft = F.mse_loss(student_logits.squeeze(-1).float(), teacher_logits.squeeze(-1).float())
    else:
        soft = logit_kd_loss(student_logits, teacher_logits, temperature)
    return alpha * hard + (1.0 - alpha) * soft
