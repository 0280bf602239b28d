"""Every training loss of kdlora: task, language modelling, logit distillation, feature distillation. Plain functions, no Lightning.

- KD-LoRA student (`kdlora.kd.KDLoRAStudent`): ``task_weight·task + (1 − task_weight)·KD``
  (`distillation_loss`), plus ``feature_weight·Σ_l feature_loss(U_s h_s^l, U_t h_t^l)``.
- MLFS supernet (`kdlora.mlfs.SuperTransformer`): per subnet j
  ``(1 − distill_weight)·task + distill_weight·(KD(z_j, z_1) + β·Σ_l ‖U^l[:, :h_j] h_j^l − U^l h_1^l‖²)``
  (`subnet_loss`, `projected_feature_loss`).
- MLFS causal-LM supernet (`kdlora.mlfs.CausalLMSuperTransformer`): the maxnet on next-token
  cross-entropy (`causal_lm_loss`), each subnet on ``(1 − distill_weight)·LM + distill_weight·(token KD
  + β·Σ_l ‖U^l[:, :h_j] h_j^l − U^l h_1^l‖²)`` (`decoder_subnet_loss`, `token_kd_loss`).

One feature-loss definition (`feature_loss`): the squared L2 norm over the projected dimensions
(a sum, as in the MLFS paper), averaged over non-padding tokens. The projections are orthonormal-row
matrices (`orthonormal_projection`): a free projection trained against a stop-gradient target is
minimised by shrinking it to zero, which switches feature distillation off.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import orthogonal


def check_weight(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


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


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, is_regression: bool,
            temperature: float = 1.0) -> torch.Tensor:
    """Output distillation: `logit_kd_loss` for classification, MSE to the teacher's output for regression."""
    if is_regression:
        return F.mse_loss(student_logits.squeeze(-1).float(), teacher_logits.squeeze(-1).float())
    return logit_kd_loss(student_logits, teacher_logits, temperature)


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    is_regression: bool,
    task_weight: float = 0.5,
    temperature: float = 2.0,
) -> torch.Tensor:
    """KD-LoRA objective: task_weight·task + (1 − task_weight)·KD.

    Classification: w·CE(s, y) + (1−w)·T²·KL(t/T ‖ s/T). Regression: w·MSE(s, y) + (1−w)·MSE(s, t).
    """
    check_weight("task_weight", task_weight)
    hard = task_loss(student_logits, labels, is_regression)
    soft = kd_loss(student_logits, teacher_logits, is_regression, temperature)
    return task_weight * hard + (1.0 - task_weight) * soft


def orthonormal_projection(in_features: int, out_features: int) -> nn.Module:
    """A bias-free linear map R^in → R^out whose weight keeps orthonormal rows while it trains.

    Its weight, [out, in], is parametrised (`torch.nn.utils.parametrizations.orthogonal`; orthonormal
    columns instead when out > in): ‖U‖_F stays √min(out, in), so a feature loss cannot be minimised by
    shrinking U. State-dict keys: ``parametrizations.weight.original`` and ``parametrizations.weight.0.base``.

    The Cayley map, not torch's default Householder map for non-square weights: that one multiplies by
    the integer part of the diagonal of ``original``, so one AdamW step with weight decay (1 → 0.99999)
    turns U into exactly 0. Under Cayley weight decay only pulls U back towards its base rotation.
    """
    return orthogonal(nn.Linear(in_features, out_features, bias=False), orthogonal_map="cayley")


FEATURE_NORMALIZATIONS = ("none", "relative")


def check_feature_normalization(value: str, name: str = "feature_normalization") -> None:
    if value not in FEATURE_NORMALIZATIONS:
        raise ValueError(f"{name} must be one of {FEATURE_NORMALIZATIONS} (none: the paper's squared L2 norm; "
                         f"relative: divided by the target feature's squared norm), got {value!r}")


def feature_loss(projected: torch.Tensor, target: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                 normalization: str = "none") -> torch.Tensor:
    """‖projected − target‖² summed over the last (projected) dimension, averaged over non-padding tokens.

    `projected`, `target`: [B, T, d]; `attention_mask`: [B, T] (1 = real token) or None (every token counts).
    `normalization`: "none" (the paper's squared L2 norm) or "relative", each token's ‖projected − target‖²
    divided by its ‖target‖² (+1e-6): scale-free, so a layer whose hidden states are large (decoders' residual
    streams grow with depth to norms in the hundreds) cannot outweigh the rest of the objective.
    """
    check_feature_normalization(normalization, "feature normalization")
    sq = (projected.float() - target.float()).pow(2).sum(-1)  # [B, T]
    if normalization == "relative":
        sq = sq / (target.float().pow(2).sum(-1) + 1e-6)
    if attention_mask is None:
        return sq.mean()
    mask = attention_mask.to(sq.dtype)
    return (sq * mask).sum() / mask.sum().clamp_min(1.0)


def projected_feature_loss(sub_hidden: torch.Tensor, max_hidden: torch.Tensor, projection: torch.Tensor,
                           attention_mask: Optional[torch.Tensor] = None, normalization: str = "none") -> torch.Tensor:
    """MLFS feature term of one layer: `feature_loss` of U[:, :h_j]·h_j against sg(U)·sg(h_1).

    `projection` is U, [d_low, H] (the maxnet's, e.g. `orthonormal_projection(H, d_low).weight`); a
    subnet of hidden size h_j reads its first h_j columns. The target side is detached, so U learns
    only through the subnet side. `normalization`: as `feature_loss`.
    """
    h_sub = sub_hidden.shape[-1]
    projected = sub_hidden.float() @ projection[:, :h_sub].float().T
    target = max_hidden.detach().float() @ projection.detach().float().T
    return feature_loss(projected, target, attention_mask, normalization)


def mlfs_objective(hard: torch.Tensor, soft: torch.Tensor, feature_losses: list[torch.Tensor], distill_weight: float,
                   beta: float) -> tuple[torch.Tensor, dict]:
    """(1−w)·hard + w·(soft + β·Σ feature losses), w = distill_weight, and its detached parts (task, kd, features)."""
    feat = torch.stack(feature_losses).sum() if feature_losses else hard.new_zeros((), dtype=torch.float32)
    loss = (1.0 - distill_weight) * hard + distill_weight * (soft + beta * feat)
    return loss, {"task": hard.detach(), "kd": soft.detach(), "features": feat.detach()}


def subnet_loss(logits: torch.Tensor, max_logits: torch.Tensor, labels: torch.Tensor, is_regression: bool,
                distill_weight: float, temperature: float, feature_losses: list[torch.Tensor],
                beta: float) -> tuple[torch.Tensor, dict]:
    """MLFS subnet objective (1−w)·task + w·(KD + β·Σ feature losses), w = distill_weight, targets detached."""
    hard = task_loss(logits, labels, is_regression)
    soft = kd_loss(logits, max_logits.detach(), is_regression, temperature)
    return mlfs_objective(hard, soft, feature_losses, distill_weight, beta)


# ---- causal language models ----
def lm_token_losses(logits: torch.Tensor, labels: torch.Tensor, attention_mask: Optional[torch.Tensor] = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum, count) of next-token cross-entropy over the predicted tokens: position t of `logits`
    [B, T, V] predicts labels[:, t + 1] (the shift happens here); labels of -100, and with
    `attention_mask` [B, T] padding positions, are not predicted. A split's perplexity is
    exp(Σ sums / Σ counts), never a mean of per-batch perplexities."""
    targets = labels[:, 1:]
    if attention_mask is not None:
        targets = targets.masked_fill(attention_mask[:, 1:] == 0, -100)
    losses = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets.long(), ignore_index=-100, reduction="none")
    return losses.sum(), (targets != -100).sum()


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Next-token cross-entropy averaged over the predicted tokens (`lm_token_losses`)."""
    total, count = lm_token_losses(logits, labels, attention_mask)
    return total / count.clamp_min(1)


def token_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                  temperature: float = 1.0) -> torch.Tensor:
    """Token-level `logit_kd_loss`: T²·KL(softmax(t/T) ‖ softmax(s/T)) of the next-token distributions
    at every real position (`attention_mask` [B, T] is 1; every position without one), averaged over them."""
    t = temperature
    log_p_student = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / t, dim=-1)
    kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1)  # [B, T]
    if attention_mask is None:
        return kl.mean() * t * t
    mask = attention_mask.to(kl.dtype)
    return (kl * mask).sum() / mask.sum().clamp_min(1.0) * t * t


def decoder_subnet_loss(logits: torch.Tensor, max_logits: torch.Tensor, labels: torch.Tensor,
                        attention_mask: Optional[torch.Tensor], distill_weight: float, temperature: float,
                        feature_losses: list[torch.Tensor], beta: float) -> tuple[torch.Tensor, dict]:
    """MLFS subnet objective of a causal LM: (1−w)·LM + w·(token KD from the maxnet + β·Σ feature losses)."""
    hard = causal_lm_loss(logits, labels, attention_mask)
    soft = token_kd_loss(logits, max_logits.detach(), attention_mask, temperature)
    return mlfs_objective(hard, soft, feature_losses, distill_weight, beta)
