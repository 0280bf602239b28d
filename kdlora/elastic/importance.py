"""Importance reordering: permute heads and FFN neurons so the leading slices are the most important.

Importance is the gradient of the training loss with respect to a multiplicative mask ξ on each
head's context / each FFN neuron's activation, averaged as E|∂L/∂ξ| over training batches (Michel
et al., 2019, as in DynaBERT). No mask is needed in the forward: with output projection W_o, the
derivative is ∂L/∂ξ = Σ (W_o ⊙ ∂L/∂W_o) over the columns the head/neuron feeds, per batch.

Decoders rank on the next-token loss of their training batches (labels = input ids, -100 at padding).
Grouped-query attention (Llama) shares key/value heads, so its heads move in whole groups: groups are
ranked by the summed importance of their query heads, and heads by their own within a group (slices keep
the leading query heads, hence the leading key/value heads). Use training batches only, never dev data. Permuting rows of Q/K/V (per head block), intermediate
rows and the matching columns of the output projections (and LoRA A/B slices) leaves the maxnet's
function unchanged. Reorder before training: optimizer state is not permuted.
"""

from __future__ import annotations

import logging
from typing import Iterable, Iterator, Optional

import torch
from torch import nn

from kdlora.elastic.blocks import permute_axes
from kdlora.elastic.model import ElasticTransformer
from kdlora.losses import causal_lm_loss, task_loss

log = logging.getLogger(__name__)

_INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids")


def _root(t: torch.Tensor) -> torch.Tensor:
    """The parameter a view reads (a GPT-2 `ConvView` weight), or `t` itself."""
    return t._base if t._base is not None else t


def _view_of(root_grad: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The gradient of view `t`: the same window of its root's gradient (a root's is itself)."""
    root = _root(t)
    if root is t:
        return root_grad
    return root_grad.as_strided(t.shape, t.stride(), t.storage_offset() - root.storage_offset())


def _maxnet_gradients(encoder: ElasticTransformer, dataloader: Iterable[dict], tensors: list[torch.Tensor],
                      num_batches: Optional[int]) -> Iterator[tuple[torch.Tensor, ...]]:
    """Per training batch, ∂L/∂t for each of `tensors`, with the encoder as a deterministic maxnet.

    Dropout is off and the maxnet is active while iterating; requires_grad flags, train mode and
    the sub-network are restored afterwards. Fails clearly on unlabelled or empty loaders.
    """
    roots = list({id(_root(t)): _root(t) for t in tensors}.values())  # GPT-2 leaves are views of Conv1D weights
    flags = [t.requires_grad for t in roots]
    was_training, previous = encoder.training, encoder.sub_network
    device = tensors[0].device
    seen = 0
    try:
        encoder.eval()  # no dropout: importance of the deterministic maxnet
        encoder.reset_super_network()
        for t in roots:
            t.requires_grad_(True)
        for batch in dataloader:
            if num_batches is not None and seen >= num_batches:
                break
            labels = batch.get("labels", batch.get("label"))
            if labels is None:
                raise ValueError("importance reordering needs labelled training batches (a 'labels' entry)")
            inputs = {k: v.to(device) for k, v in batch.items() if k in _INPUT_KEYS}
            logits = encoder(**inputs).logits
            if encoder.is_causal_lm:
                loss = causal_lm_loss(logits, labels.to(device), inputs.get("attention_mask"))
            else:
                loss = task_loss(logits, labels.to(device), is_regression=logits.shape[-1] == 1)
            root_grads = dict(zip(map(id, roots), torch.autograd.grad(loss, roots)))
            yield tuple(_view_of(root_grads[id(_root(t))], t) for t in tensors)
            seen += 1
    finally:
        for t, flag in zip(roots, flags):
            t.requires_grad_(flag)
        encoder.train(was_training)
        encoder.set_sub_network(previous)
    if seen == 0:
        raise ValueError("importance reordering got no batches from the dataloader")


def importance_scores(encoder: ElasticTransformer, dataloader: Iterable[dict], num_batches: Optional[int] = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(head importance [layers, heads], neuron importance [layers, ffn]) of the maxnet on `dataloader`."""
    L, d = len(encoder.max_config.layers), encoder.head_dim
    heads, ffn = max(encoder.max_config.heads_per_layer()), max(encoder.max_config.ffn_per_layer())
    outputs = [encoder.linear_module(i, role).weight for i in range(L) for role in ("attention_output", "output")]
    head_score = torch.zeros(L, heads, dtype=torch.float64)
    neuron_score = torch.zeros(L, ffn, dtype=torch.float64)
    seen = 0
    for grads in _maxnet_gradients(encoder, dataloader, outputs, num_batches):
        with torch.no_grad():
            for i in range(L):
                # Adapters change W_o too: the mask derivative uses the effective (merged) weight.
                w_attn, _ = encoder.merged_weight(i, "attention_output")
                w_out, _ = encoder.merged_weight(i, "output")
                g_attn, g_out = grads[2 * i], grads[2 * i + 1]
                head_score[i] += (w_attn * g_attn).sum(0).view(heads, d).sum(-1).abs().double().cpu()
                neuron_score[i] += (w_out * g_out).sum(0).abs().double().cpu()
        seen += 1
    return head_score / seen, neuron_score / seen


def head_order(score: torch.Tensor, group: int = 1) -> torch.Tensor:
    """Heads most important first; with `group` query heads per key/value head (grouped-query attention),
    whole groups ranked by their summed score, and the heads within each group by their own. Stable:
    ties keep the original order."""
    if group == 1:
        return torch.sort(score, descending=True, stable=True).indices
    per_group = score.view(-1, group)
    group_order = torch.sort(per_group.sum(-1), descending=True, stable=True).indices
    within = torch.sort(per_group, dim=-1, descending=True, stable=True).indices
    return (group_order[:, None] * group + within[group_order]).reshape(-1)


@torch.no_grad()
def permute_heads(encoder: ElasticTransformer, layer: int, order: torch.Tensor, permute_shared_bias: bool = True) -> None:
    """Make head order[j] of `layer` the new head j (Q/K/V rows, attention-output columns, adapters).

    With `permute_shared_bias`, also a per-head table all layers share (MPNet's relative bias).
    """
    encoder.layers[layer].attention.permute_heads(order)
    if permute_shared_bias and encoder.attention_inputs.shares_heads:
        encoder.attention_inputs.permute_heads(order)


@torch.no_grad()
def permute_neurons(encoder: ElasticTransformer, layer: int, order: torch.Tensor) -> None:
    """Make FFN neuron order[j] of `layer` the new neuron j (intermediate rows, output columns, adapters)."""
    encoder.layers[layer].ffn.permute_neurons(order)


def hidden_importance(encoder: ElasticTransformer, dataloader: Iterable[dict], num_batches: Optional[int] = None) -> torch.Tensor:
    """Importance [hidden] of each residual-stream dimension: Σ |W ⊙ ∂L/∂W| over the weights indexed by it."""
    axes = encoder.hidden_axes(adapters=False)
    tensors = list({id(t): t for t, _ in axes}.values())
    score = torch.zeros(encoder.max_config.hidden_size, dtype=torch.float64)
    seen = 0
    for grad_list in _maxnet_gradients(encoder, dataloader, tensors, num_batches):
        grads = dict(zip(map(id, tensors), grad_list))
        with torch.no_grad():
            for t, axis in axes:
                taylor = (t * grads[id(t)]).abs()
                score += taylor.sum(dim=[d for d in range(t.ndim) if d != axis]).double().cpu() if t.ndim > 1 else taylor.double().cpu()
        seen += 1
    return score / seen


@torch.no_grad()
def permute_hidden(encoder: ElasticTransformer, order: torch.Tensor) -> None:
    """Make hidden dimension order[j] the new dimension j everywhere (weights, norms, adapters, head).

    This leaves the maxnet's function unchanged: LayerNorm is permutation-equivariant, and every
    reader/writer of the residual stream (`ElasticTransformer.hidden_axes`) is permuted with it.
    """
    permute_axes(encoder.hidden_axes(), order)


def reorder_by_importance(encoder_or_hf_model: ElasticTransformer | nn.Module, dataloader: Iterable[dict],
                          num_batches: Optional[int] = None, hidden: bool = False) -> dict[str, list]:
    """Rank heads and FFN neurons on training batches and permute weights, most important first.

    Accepts an ElasticTransformer or a supported HF sequence classifier (permuted in place; its
    requires_grad flags are left as they were). The maxnet's function is unchanged. MPNet shares one
    relative-position bias across layers, so its heads get one permutation (importance summed over
    layers). With `hidden`, the residual-stream dimensions are ranked (first-order Taylor
    |W·∂L/∂W| summed over every weight they index) and permuted too, most important first.
    Returns the applied orders: {"heads": [per layer], "neurons": [per layer], "hidden": [...] if
    hidden}, where order[j] is the old index of the new j-th head/neuron/dimension.
    """
    if isinstance(encoder_or_hf_model, ElasticTransformer):
        encoder, flags = encoder_or_hf_model, None
    else:
        flags = [p.requires_grad for p in encoder_or_hf_model.parameters()]
        was_training = encoder_or_hf_model.training
        encoder = ElasticTransformer(encoder_or_hf_model).train(was_training)
    try:
        head_score, neuron_score = importance_scores(encoder, dataloader, num_batches)
        shared_bias = encoder.attention_inputs.shares_heads
        if shared_bias:
            head_score = head_score.sum(0, keepdim=True).expand_as(head_score)
        # Stable sort: ties keep the original order (so an all-zero layer is left as it is).
        groups = [encoder.layers[i].attention.group for i in range(len(head_score))]
        head_orders = [head_order(s, g) for s, g in zip(head_score, groups)]
        neuron_orders = [torch.sort(s, descending=True, stable=True).indices for s in neuron_score]
        for layer, (ho, no) in enumerate(zip(head_orders, neuron_orders)):
            permute_heads(encoder, layer, ho, permute_shared_bias=(not shared_bias or layer == 0))
            permute_neurons(encoder, layer, no)
        result = {"heads": [o.tolist() for o in head_orders], "neurons": [o.tolist() for o in neuron_orders]}
        if hidden:
            hidden_order = torch.sort(hidden_importance(encoder, dataloader, num_batches), descending=True, stable=True).indices
            permute_hidden(encoder, hidden_order)
            result["hidden"] = hidden_order.tolist()
    finally:
        if flags is not None:
            for p, flag in zip(encoder_or_hf_model.parameters(), flags):
                p.requires_grad_(flag)
    log.info("reordered heads and FFN neurons of %d layers%s by importance", len(head_orders), " and hidden dims" if hidden else "")
    return result
