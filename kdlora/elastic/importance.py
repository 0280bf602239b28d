"""Importance reordering: permute heads and FFN neurons so the leading slices are the most important.

Importance is the gradient of the training loss with respect to a multiplicative mask ξ on each
head's context / each FFN neuron's activation, averaged as E|∂L/∂ξ| over training batches (Michel
et al., 2019, as in DynaBERT). No mask is needed in the forward: with output projection W_o, the
derivative is ∂L/∂ξ = Σ (W_o ⊙ ∂L/∂W_o) over the columns the head/neuron feeds, per batch.

Use training batches only, never dev data. Permuting rows of Q/K/V (per head block), intermediate
rows and the matching columns of the output projections (and LoRA A/B slices) leaves the maxnet's
function unchanged. Reorder before training: optimizer state is not permuted.
"""

from __future__ import annotations

import logging
from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from kdlora.elastic.model import ElasticEncoder

log = logging.getLogger(__name__)

_INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids")


def _loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if logits.shape[-1] == 1:
        return F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype))
    return F.cross_entropy(logits, labels.long())


@torch.no_grad()
def _permute_rows(t: torch.Tensor, index: torch.Tensor) -> None:
    t.copy_(t.index_select(0, index))


@torch.no_grad()
def _permute_cols(t: torch.Tensor, index: torch.Tensor) -> None:
    t.copy_(t.index_select(1, index))


def importance_scores(encoder: ElasticEncoder, dataloader: Iterable[dict], num_batches: Optional[int] = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(head importance [layers, heads], neuron importance [layers, ffn]) of the maxnet on `dataloader`."""
    L, d = len(encoder.max_config.layers), encoder.head_dim
    heads, ffn = max(encoder.max_config.heads_per_layer()), max(encoder.max_config.ffn_per_layer())
    outputs = [encoder.linear_module(i, role).weight for i in range(L) for role in ("attention_output", "output")]
    was_training, previous = encoder.training, encoder.sub_network
    flags = [w.requires_grad for w in outputs]
    head_score = torch.zeros(L, heads, dtype=torch.float64)
    neuron_score = torch.zeros(L, ffn, dtype=torch.float64)
    device = outputs[0].device
    seen = 0
    try:
        encoder.eval()  # no dropout: importance of the deterministic maxnet
        encoder.reset_super_network()
        for w in outputs:
            w.requires_grad_(True)
        for batch in dataloader:
            if num_batches is not None and seen >= num_batches:
                break
            labels = batch.get("labels", batch.get("label"))
            if labels is None:
                raise ValueError("importance reordering needs labelled training batches (a 'labels' entry)")
            inputs = {k: v.to(device) for k, v in batch.items() if k in _INPUT_KEYS}
            loss = _loss(encoder(**inputs).logits, labels.to(device))
            grads = torch.autograd.grad(loss, outputs)
            with torch.no_grad():
                for i in range(L):
                    # Adapters change W_o too: the mask derivative uses the effective (merged) weight.
                    w_attn, _ = encoder.merged_weight(i, "attention_output")
                    w_out, _ = encoder.merged_weight(i, "output")
                    g_attn, g_out = grads[2 * i], grads[2 * i + 1]
                    head_score[i] += (w_attn * g_attn).sum(0).view(heads, d).sum(-1).abs().double().cpu()
                    neuron_score[i] += (w_out * g_out).sum(0).abs().double().cpu()
            seen += 1
    finally:
        for w, flag in zip(outputs, flags):
            w.requires_grad_(flag)
        encoder.train(was_training)
        encoder.set_sub_network(previous)
    if seen == 0:
        raise ValueError("importance reordering got no batches from the dataloader")
    return head_score / seen, neuron_score / seen


@torch.no_grad()
def permute_heads(encoder: ElasticEncoder, layer: int, order: torch.Tensor, permute_shared_bias: bool = True) -> None:
    """Make head order[j] of `layer` the new head j (Q/K/V rows, attention-output columns, adapters)."""
    d = encoder.head_dim
    rows = (order[:, None] * d + torch.arange(d)[None, :]).reshape(-1).to(encoder.linear_module(layer, "query").weight.device)
    for role in ("query", "key", "value"):
        linear = encoder.linear_module(layer, role)
        _permute_rows(linear.weight, rows)
        if linear.bias is not None:
            _permute_rows(linear.bias, rows)
        for _, B in encoder.adapters(layer, role):
            _permute_rows(B, rows)
    deberta = encoder._layout.deberta
    if deberta is not None:
        for proj in (deberta.pos_key_proj[layer], deberta.pos_query_proj[layer]):
            if proj is not None:
                _permute_rows(proj.weight, rows)
                _permute_rows(proj.bias, rows)
    _permute_cols(encoder.linear_module(layer, "attention_output").weight, rows)
    for A, _ in encoder.adapters(layer, "attention_output"):
        _permute_cols(A, rows)
    bias = encoder._layout.relative_bias
    if bias is not None and permute_shared_bias:
        _permute_cols(bias.weight, order.to(bias.weight.device))


@torch.no_grad()
def permute_neurons(encoder: ElasticEncoder, layer: int, order: torch.Tensor) -> None:
    """Make FFN neuron order[j] of `layer` the new neuron j (intermediate rows, output columns, adapters)."""
    inner = encoder.linear_module(layer, "intermediate")
    order = order.to(inner.weight.device)
    _permute_rows(inner.weight, order)
    if inner.bias is not None:
        _permute_rows(inner.bias, order)
    for _, B in encoder.adapters(layer, "intermediate"):
        _permute_rows(B, order)
    _permute_cols(encoder.linear_module(layer, "output").weight, order)
    for A, _ in encoder.adapters(layer, "output"):
        _permute_cols(A, order)


def reorder_by_importance(encoder_or_hf_model: ElasticEncoder | nn.Module, dataloader: Iterable[dict],
                          num_batches: Optional[int] = None) -> dict[str, list[list[int]]]:
    """Rank heads and FFN neurons on training batches and permute weights, most important first.

    Accepts an ElasticEncoder or a supported HF sequence classifier (permuted in place; its
    requires_grad flags are left as they were). The maxnet's function is unchanged. MPNet shares one
    relative-position bias across layers, so its heads get one permutation (importance summed over
    layers). Returns the applied orders: {"heads": [per layer], "neurons": [per layer]}, where
    order[j] is the old index of the new j-th head/neuron.
    """
    if isinstance(encoder_or_hf_model, ElasticEncoder):
        encoder, flags = encoder_or_hf_model, None
    else:
        flags = [p.requires_grad for p in encoder_or_hf_model.parameters()]
        was_training = encoder_or_hf_model.training
        encoder = ElasticEncoder(encoder_or_hf_model).train(was_training)
    try:
        head_score, neuron_score = importance_scores(encoder, dataloader, num_batches)
        shared_bias = encoder._layout.relative_bias is not None
        if shared_bias:
            head_score = head_score.sum(0, keepdim=True).expand_as(head_score)
        # Stable sort: ties keep the original order (so an all-zero layer is left as it is).
        head_orders = [torch.sort(s, descending=True, stable=True).indices for s in head_score]
        neuron_orders = [torch.sort(s, descending=True, stable=True).indices for s in neuron_score]
        for layer, (ho, no) in enumerate(zip(head_orders, neuron_orders)):
            permute_heads(encoder, layer, ho, permute_shared_bias=(not shared_bias or layer == 0))
            permute_neurons(encoder, layer, no)
    finally:
        if flags is not None:
            for p, flag in zip(encoder_or_hf_model.parameters(), flags):
                p.requires_grad_(flag)
    log.info("reordered heads and FFN neurons of %d layers by importance", len(head_orders))
    return {"heads": [o.tolist() for o in head_orders], "neurons": [o.tolist() for o in neuron_orders]}
