"""Elastic blocks (`kdlora.elastic.blocks`) on their own, and the family registry.

Each block at a sub-network size is compared with the plain functional op on the leading slices
of its weights; permutations must keep the function; used-parameter counts are computed by hand.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_decoders import DECODERS
from test_elastic import FAMILIES, make_model
from torch import nn

from kdlora.elastic import ElasticTransformer, SubnetConfig
from kdlora.elastic.blocks import (AdditiveMask, ElasticAttention, ElasticEmbedding, ElasticFFN, ElasticLayerNorm,
                                   ElasticLinear, ElasticRMSNorm, LoraStages)
from kdlora.elastic.families import FAMILIES as REGISTRY
from kdlora.elastic.families import SUPPORTED_FAMILIES


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


def lora_linear(in_features: int, out_features: int, stages: int = 2, rank: int = 3, scale: float = 2.0) -> ElasticLinear:
    linear = ElasticLinear(nn.Linear(in_features, out_features), LoraStages(), scale=scale)
    for _ in range(stages):
        linear.add_stage(rank)
    with torch.no_grad():
        for B in linear.lora.B:
            B.normal_(0, 0.5)
    return linear


def test_sliced_linear_is_f_linear_on_the_leading_block_of_the_merged_weight():
    linear = lora_linear(12, 10)
    full = linear.base.weight + 2.0 * sum(B @ A for A, B in linear.adapters())
    x = torch.randn(2, 5, 7)
    linear.set_sub_network(7, 4)
    torch.testing.assert_close(linear(x), F.linear(x, full[:4, :7], linear.base.bias[:4]), atol=1e-5, rtol=0)
    weight, bias = linear.merged_weight()
    torch.testing.assert_close(weight, full[:4, :7], atol=1e-6, rtol=0)
    assert set(linear.sliced_state()) == {"weight", "bias"} and linear.sliced_state()["weight"].shape == (4, 7)
    linear.reset_super_network()
    assert linear(torch.randn(3, 12)).shape == (3, 10)
    # Only the newest stage trains.
    assert [A.requires_grad for A, _ in linear.adapters()] == [False, True]


def test_used_parameter_counts_by_hand():
    linear = lora_linear(12, 10, stages=2, rank=3)
    linear.base.requires_grad_(False)
    linear.set_sub_network(7, 4)
    assert linear.parameter_count() == 4 * 7 + 4  # adapters are merged in the deployed model
    assert linear.parameter_count(trainable_only=True) == 3 * 7 + 4 * 3  # newest stage's A[:, :7] and B[:4]
    norm = ElasticLayerNorm(nn.LayerNorm(10))
    norm.set_sub_network(6)
    assert norm.parameter_count() == 12
    rms = ElasticRMSNorm(nn.RMSNorm(10))
    rms.set_sub_network(6)
    assert rms.parameter_count() == 6  # weight only
    table = ElasticEmbedding(nn.Embedding(50, 10))
    table.set_sub_network(6)
    assert table.parameter_count() == 50 * 6


def test_encoder_parameter_count_by_hand_for_a_padded_subnet():
    """A subnet whose attention is narrower than its hidden width (the export would pad it)."""
    encoder = ElasticTransformer(make_model("bert"))
    vocab, positions, types, labels = 100, 160, 2, 2
    h, (w0, w1), (f0, f1) = 24, (8, 16), (40, 8)  # heads of size 8: 1 and 2 heads
    cfg = SubnetConfig(h, (1, 2), (f0, f1), (0, 3))
    embeddings = (vocab + positions + types) * h + 2 * h
    layer = lambda w, f: 3 * (w * h + w) + (h * w + h) + (f * h + f) + (h * f + h) + 2 * 2 * h  # noqa: E731
    head = (h * h + h) + (labels * h + labels)
    assert encoder.parameter_count(cfg) == embeddings + layer(w0, f0) + layer(w1, f1) + head


def test_layer_norm_normalises_over_the_sliced_width():
    base = nn.LayerNorm(10)
    with torch.no_grad():
        base.weight.normal_()
        base.bias.normal_()
    norm = ElasticLayerNorm(base)
    x = torch.randn(3, 6)
    norm.set_sub_network(6)
    torch.testing.assert_close(norm(x), F.layer_norm(x, (6,), base.weight[:6], base.bias[:6], base.eps), atol=0, rtol=0)


def test_rms_norm_equals_llama_rms_norm_and_normalises_over_the_slice():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    base = LlamaRMSNorm(10, eps=1e-6)
    with torch.no_grad():
        base.weight.normal_()
    norm = ElasticRMSNorm(base)
    x = torch.randn(2, 3, 10)
    torch.testing.assert_close(norm(x), base(x), atol=0, rtol=0)
    norm.set_sub_network(4)
    small = x[..., :4]
    expected = base.weight[:4] * small * torch.rsqrt(small.pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(norm(small), expected, atol=1e-6, rtol=0)


def test_embedding_reads_the_leading_columns():
    table = ElasticEmbedding(nn.Embedding(20, 8))
    table.set_sub_network(3)
    ids = torch.tensor([[1, 5, 19]])
    torch.testing.assert_close(table(ids), table.base.weight[ids][..., :3], atol=0, rtol=0)


def attention(heads: int = 4, kv_heads: int = 4, d: int = 4, hidden: int = 16) -> ElasticAttention:
    return ElasticAttention(lora_linear(hidden, heads * d), lora_linear(hidden, kv_heads * d),
                            lora_linear(hidden, kv_heads * d), lora_linear(heads * d, hidden), head_dim=d).eval()


def reference_attention(block: ElasticAttention, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Plain multi-head attention on the blocks' sliced merged weights, key/value heads repeated per group."""
    heads, kv, d = block.num_heads, block.num_kv_heads, block.head_dim

    def project(linear, t, n):
        w, b = linear.merged_weight()
        return F.linear(t, w, b).view(t.shape[0], t.shape[1], n, d).transpose(1, 2)

    q, k, v = project(block.query, x, heads), project(block.key, x, kv), project(block.value, x, kv)
    group = block.query.base.out_features // block.key.base.out_features
    k, v = k.repeat_interleave(group, 1)[:, :heads], v.repeat_interleave(group, 1)[:, :heads]
    scores = q @ k.transpose(-1, -2) / d ** 0.5 + torch.zeros_like(mask, dtype=x.dtype).masked_fill(mask == 0, -1e9)[:, None, None]
    context = (scores.softmax(-1) @ v).transpose(1, 2).reshape(x.shape[0], x.shape[1], heads * d)
    w, b = block.output.merged_weight()
    return F.linear(context, w, b)


# (maxnet heads, key/value heads), (subnet hidden, heads, the key/value heads those read)
@pytest.mark.parametrize("heads, kv_heads, sub", [(4, 4, (12, 2, 2)), (4, 2, (12, 2, 1)), (4, 2, (12, 3, 2)), (4, 2, (16, 4, 2))])
def test_attention_on_leading_heads_with_grouped_key_value_heads(heads, kv_heads, sub):
    block = attention(heads, kv_heads)
    hidden, sub_heads, sub_kv = sub
    block.set_sub_network(hidden, sub_heads)
    x = torch.randn(2, 5, hidden)
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, 3:] = 0
    with torch.no_grad():
        torch.testing.assert_close(block(x, AdditiveMask(mask)), reference_attention(block, x, mask), atol=1e-5, rtol=0)
    assert block.num_kv_heads == sub_kv and block.key.sub_out == block.value.sub_out == sub_kv * 4
    assert block.query.sub_out == block.output.sub_in == sub_heads * 4


def test_permuting_heads_and_neurons_keeps_the_function():
    block = attention()
    ffn = ElasticFFN(lora_linear(16, 24), lora_linear(24, 16), F.gelu).eval()
    x, mask = torch.randn(2, 5, 16), AdditiveMask(torch.ones(2, 5))
    with torch.no_grad():
        before = block(x, mask), ffn(x)
        block.permute_heads(torch.tensor([2, 0, 3, 1]))
        ffn.permute_neurons(torch.randperm(24))
        torch.testing.assert_close(block(x, mask), before[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(ffn(x), before[1], atol=1e-5, rtol=0)
    grouped = attention(4, 2).eval()  # 2 query heads per key/value head: whole groups move, with their kv head
    with torch.no_grad():
        before = grouped(x, mask)
        grouped.permute_heads(torch.tensor([3, 2, 0, 1]))
        torch.testing.assert_close(grouped(x, mask), before, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="grouped-query.*splits a group"):
        grouped.permute_heads(torch.tensor([0, 2, 1, 3]))


def test_swiglu_ffn_on_the_leading_neurons():
    gate, up, down = lora_linear(16, 24), lora_linear(16, 24), lora_linear(24, 16)
    ffn = ElasticFFN(up, down, F.silu, gate=gate).eval()
    ffn.set_sub_network(8, 10)
    x = torch.randn(2, 3, 8)
    merged = {name: linear.merged_weight() for name, linear in (("gate", gate), ("up", up), ("down", down))}
    inner = F.silu(F.linear(x, *merged["gate"])) * F.linear(x, *merged["up"])
    with torch.no_grad():
        torch.testing.assert_close(ffn(x), F.linear(inner, *merged["down"]), atol=1e-5, rtol=0)
        ffn.set_sub_network(8, 24)
        before = ffn(x)
        ffn.permute_neurons(torch.randperm(24))  # gate and up rows move together
        torch.testing.assert_close(ffn(x), before, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_blocks_add_no_state_dict_keys(family):
    """Blocks are views: checkpoints name only the HF model's and the adapters' tensors, as before the blocks."""
    encoder = ElasticTransformer(make_model(family), lora_stages=2)
    keys = list(encoder.state_dict())
    assert keys == [f"model.{k}" for k in encoder.model.state_dict()] + [f"lora.{k}" for k in encoder.lora.state_dict()]
    assert {k.split(".")[1] for k in keys if k.startswith("lora.")} == {f"layer{i}_{r}" for i in range(4) for r in encoder.lora_targets}


def test_the_registry_is_the_one_source_of_family_names():
    from kdlora.training.lora import LORA_TARGETS

    tested = {"deberta-v2" if f == "deberta-v3" else f for f in FAMILIES + DECODERS}
    assert set(SUPPORTED_FAMILIES) <= tested  # every elastic family has its equivalence tests
    assert LORA_TARGETS["bert"] == ["query", "value"] and LORA_TARGETS["distilbert"] == ["q_lin", "v_lin"]
    assert LORA_TARGETS["deberta-v2"] == ["query_proj", "value_proj"] and LORA_TARGETS["deberta"] == ["in_proj"]
    assert set(LORA_TARGETS) == set(REGISTRY)
    encoder = ElasticTransformer(make_model("distilbert"), lora_targets=("q_lin", "lin1"))
    assert encoder.lora_targets == ("query", "intermediate")
