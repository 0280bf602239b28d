"""kdlora.eval.perplexity: a split's perplexity is exp(Σ next-token losses / Σ predicted tokens) over every
batch, the same number the decoder module's validation logs (TokenMeanLoss)."""

import math

import pytest
import torch
import torch.nn.functional as F

from kdlora.eval.perplexity import TokenMeanLoss, heldout_perplexity
from kdlora.losses import lm_token_losses


def _batches():
    g = torch.Generator().manual_seed(0)
    batches = []
    for length in (5, 7):  # batches of different sizes: a mean of per-batch perplexities would differ
        labels = torch.randint(0, 11, (2, length), generator=g)
        mask = torch.ones_like(labels)
        mask[1, -2:] = 0  # padding: not predicted
        labels = labels.masked_fill(mask == 0, -100)
        batches.append({"input_ids": labels.clamp_min(0), "labels": labels, "attention_mask": mask,
                        "logits": torch.randn(2, length, 11, generator=g)})
    return batches


def test_heldout_perplexity_is_the_exp_of_the_token_mean_loss_over_the_split():
    batches = _batches()
    result = heldout_perplexity(lambda b: b["logits"], batches)
    # Independently: every predicted token's loss, by hand from log-softmax, pooled over both batches.
    losses = []
    for b in batches:
        log_p = F.log_softmax(b["logits"][:, :-1].double(), dim=-1)
        for i in range(2):
            for t in range(b["labels"].shape[1] - 1):
                y = int(b["labels"][i, t + 1])
                if y != -100:
                    losses.append(-float(log_p[i, t, y]))
    assert result["tokens"] == len(losses) == 4 + 6 + 4 + 6 - 2 - 2
    assert result["nll"] == pytest.approx(sum(losses), rel=1e-6)
    assert result["perplexity"] == pytest.approx(math.exp(sum(losses) / len(losses)), rel=1e-6)
    assert result["loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-6)


def test_heldout_perplexity_equals_the_validation_metric():
    batches = _batches()
    metric = TokenMeanLoss()
    for b in batches:
        metric.update(*lm_token_losses(b["logits"], b["labels"], b["attention_mask"]))
    assert heldout_perplexity(lambda b: b["logits"], batches)["perplexity"] == float(metric.compute()["perplexity"])


def test_a_loader_without_predicted_tokens_is_an_error():
    empty = [{"labels": torch.full((1, 3), -100), "logits": torch.zeros(1, 3, 5)}]
    with pytest.raises(ValueError, match="no predicted tokens"):
        heldout_perplexity(lambda b: b["logits"], empty)
