"""Elastic decoders: a tiny random Llama (RMSNorm, rotary, grouped-query attention, SwiGLU) as maxnet
and as sub-networks, against Hugging Face's own `LlamaForCausalLM` and the exported plain model."""

from __future__ import annotations

import copy

import pytest
import torch
from test_elastic import single_thread  # noqa: F401 (autouse: one intra-op thread for tiny matrices)
from transformers import LlamaConfig, LlamaForCausalLM

from kdlora.elastic import ElasticEncoder, SubnetConfig

DECODERS = ("llama",)
ATOL = 1e-5


def make_llama(seed: int = 0) -> LlamaForCausalLM:
    """Hidden 32, 4 query heads of size 8 sharing 2 key/value heads, SwiGLU FFN 64, 4 layers."""
    config = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def make_inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 100, (3, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # right padding: compare the real positions
    return {"input_ids": ids, "attention_mask": mask}


def test_llama_maxnet_equals_hf_model():
    model = make_llama()
    reference = copy.deepcopy(model)
    encoder = ElasticEncoder(model).eval()
    inputs = make_inputs()
    real = inputs["attention_mask"].bool()
    with torch.no_grad():
        logits = encoder(**inputs).logits
        expected = reference(**inputs).logits
    assert logits.shape == (3, 11, 100)
    torch.testing.assert_close(logits[real], expected[real], atol=ATOL, rtol=0)


@pytest.mark.parametrize("cfg", [SubnetConfig(16, 2, 32, (0, 3)), SubnetConfig(32, 4, 24, (1, 2, 3))])
def test_llama_subnet_with_lora_equals_exported_model(cfg):
    encoder = ElasticEncoder(make_llama(), lora_r=4).eval()
    torch.manual_seed(3)
    for _ in range(2):
        encoder.add_lora_stage()
    with torch.no_grad():
        for stage in encoder.lora.values():
            for B in stage.B:
                B.normal_(0, 0.2)
    inputs = make_inputs()
    real = inputs["attention_mask"].bool()
    encoder.set_sub_network(cfg)
    plain = encoder.materialize(cfg)
    assert plain.config.num_key_value_heads == cfg.hidden_size // 8 // 2
    with torch.no_grad():
        torch.testing.assert_close(encoder(**inputs).logits[real], plain(**inputs).logits[real], atol=ATOL, rtol=0)
    assert encoder.parameter_count(cfg) == sum(p.numel() for p in plain.parameters())
