"""Perplexity of a causal LM over a split: exp(Σ next-token losses / Σ predicted tokens) over every batch
(and every DDP rank), never a mean of per-batch values. `TokenMeanLoss` accumulates it (a torchmetrics
Metric, as the decoder module's validation uses it); `heldout_perplexity` runs a model over a loader."""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
from torchmetrics import Metric

from kdlora.losses import lm_token_losses


class TokenMeanLoss(Metric):
    """A split's token-mean loss and perplexity: exp(Σ token losses / Σ tokens) over every batch (and
    every DDP rank), not a mean of per-batch values. Update with `kdlora.losses.lm_token_losses`."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, total: torch.Tensor, count: torch.Tensor) -> None:
        self.total += total.detach().double()
        self.count += count.detach().long()

    def compute(self) -> dict[str, torch.Tensor]:
        loss = self.total / self.count.clamp_min(1)
        return {"loss": loss, "perplexity": loss.exp()}


@torch.no_grad()
def heldout_perplexity(logits_of: Callable[[dict], torch.Tensor], loader: Iterable[dict]) -> dict[str, float]:
    """``{"nll", "tokens", "loss", "perplexity"}`` of the logits ``logits_of(batch)`` [B, T, V] over every batch
    of `loader` (``input_ids``, ``labels``, optionally ``attention_mask``): the summed next-token loss, the
    predicted tokens, their mean and its exp (`kdlora.losses.lm_token_losses`, accumulated in float64)."""
    metric = TokenMeanLoss()
    for batch in loader:
        metric.update(*lm_token_losses(logits_of(batch), batch["labels"], batch.get("attention_mask")))
    nll, tokens = float(metric.total), int(metric.count)
    if tokens == 0:
        raise ValueError("no predicted tokens in the loader: perplexity is undefined")
    return {"nll": nll, "tokens": tokens, "loss": nll / tokens, "perplexity": math.exp(nll / tokens)}
