"""Elastic decoders: tiny random Llama (RMSNorm, rotary, grouped-query attention, SwiGLU) and GPT-2 (Conv1D
with a fused q/k/v, learned positions, LayerNorm, gelu_new, tied LM head) as maxnet and as sub-networks,
against Hugging Face's own model, the exported plain model and its `generate()`.

Every test runs on every family of `DECODERS`: adding a decoder family is one adapter plus one entry here.
"""

from __future__ import annotations

import copy

import pytest
import torch
from test_elastic import randomize_adapters, single_thread  # noqa: F401 (single_thread: autouse, one intra-op thread)
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from kdlora.elastic import ElasticTransformer, SubnetConfig
from kdlora.elastic.blocks import ROLES

ATOL = 1e-5
VOCAB = 100


def make_llama(seed: int = 0) -> LlamaForCausalLM:
    """Hidden 32, 4 query heads of size 8 sharing 2 key/value heads, SwiGLU FFN 64, 4 layers."""
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def make_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    """Hidden 32, 4 heads of size 8, FFN 64, 4 layers, LM head tied to the word embeddings."""
    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_inner=64, n_layer=4, n_head=4, n_positions=64, bos_token_id=1,
                        eos_token_id=2)
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config).eval()


MAKE_DECODER = {"llama": make_llama, "gpt2": make_gpt2}
DECODERS = tuple(MAKE_DECODER)  # test_blocks checks every elastic family is tested
SUBNETS = [SubnetConfig(16, 2, 32, (0, 3)), SubnetConfig(32, 4, 24, (1, 2, 3))]


@pytest.fixture(params=DECODERS)
def family(request) -> str:
    return request.param


def make_inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (3, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # right padding: compare the real positions
    return {"input_ids": ids, "attention_mask": mask}


def trained_encoder(family: str) -> ElasticTransformer:
    """Two LoRA stages on every role, with non-zero B (so the adapters change every subnet)."""
    encoder = ElasticTransformer(MAKE_DECODER[family](), lora_r=4, lora_targets=ROLES).eval()
    randomize_adapters(encoder, stages=2)
    return encoder


def test_maxnet_equals_hf_model(family):
    model = MAKE_DECODER[family]()
    reference = copy.deepcopy(model)
    encoder = ElasticTransformer(model).eval()
    assert encoder.family == family and encoder.is_causal_lm
    inputs = make_inputs()
    real = inputs["attention_mask"].bool()
    with torch.no_grad():
        logits = encoder(**inputs).logits
        expected = reference(**inputs).logits
    assert logits.shape == (3, 11, VOCAB)
    torch.testing.assert_close(logits[real], expected[real], atol=ATOL, rtol=0)
    assert encoder.parameter_count() == sum(p.numel() for p in reference.parameters())  # a tied head counts once


@pytest.mark.parametrize("cfg", SUBNETS, ids=lambda c: c.name)
def test_subnet_with_lora_equals_exported_model(family, cfg):
    encoder = trained_encoder(family)
    inputs = make_inputs()
    real = inputs["attention_mask"].bool()
    encoder.set_sub_network(cfg)
    plain = encoder.materialize(cfg)
    if family == "llama":
        assert plain.config.num_key_value_heads == cfg.hidden_size // 8 // 2 and plain.config.head_dim == 8
    if family == "gpt2":  # the export keeps the LM head tied to the (sliced) word embeddings
        assert plain.lm_head.weight is plain.transformer.wte.weight and plain.config.tie_word_embeddings
        torch.testing.assert_close(plain.transformer.wte.weight, encoder.model.transformer.wte.weight[:, :cfg.hidden_size])
    with torch.no_grad():
        torch.testing.assert_close(encoder(**inputs).logits[real], plain(**inputs).logits[real], atol=ATOL, rtol=0)
    assert encoder.parameter_count(cfg) == sum(p.numel() for p in plain.parameters())


def test_gpt2_fused_attention_splits_into_query_key_value_roles():
    """Each role of c_attn is its own column block of the Conv1D weight (read as [out, in]) with its own adapters."""
    model = make_gpt2()
    encoder = ElasticTransformer(model, lora_r=4, lora_targets=["c_attn.query", "c_attn.value", "mlp.c_proj"])
    assert encoder.lora_targets == ("query", "value", "output")
    c_attn = model.transformer.h[0].attn.c_attn.weight  # [in 32, out 3·32]
    for k, role in enumerate(("query", "key", "value")):
        linear = encoder.linear(0, role)
        assert linear.base.weight.shape == (32, 32)
        assert torch.equal(linear.base.weight, c_attn[:, 32 * k: 32 * (k + 1)].T)
        assert linear.base.weight.untyped_storage().data_ptr() == c_attn.untyped_storage().data_ptr()  # a view, not a copy
    assert torch.equal(encoder.linear(0, "output").base.weight, model.transformer.h[0].mlp.c_proj.weight.T)
    encoder.add_lora_stage()
    assert [bool(encoder.adapters(0, r)) for r in ROLES] == [True, False, True, False, False, True]
    assert encoder.adapters(0, "query")[0][1].shape == (32, 4)  # B: one role's 32 outputs, not c_attn's 96


def test_subnet_names_round_trip(family):
    encoder = ElasticTransformer(MAKE_DECODER[family]())
    for cfg in SUBNETS + [encoder.max_config, SubnetConfig(24, (3, 2), (40, 16), (0, 2))]:
        cfg.validate(encoder.max_config)
        assert SubnetConfig.from_name(cfg.name) == cfg
    assert encoder.max_config.name == "h32-a4-f64-l4"


def greedy(encoder: ElasticTransformer, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding from the (sliced) supernet's logits, one full forward per step (no cache)."""
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.cat([ids, encoder(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


@pytest.mark.parametrize("cfg", [None] + SUBNETS, ids=lambda c: "max" if c is None else c.name)
def test_export_loads_as_a_causal_lm_that_generates_greedily(family, cfg, tmp_path):
    encoder = trained_encoder(family)
    cfg = cfg or encoder.max_config
    encoder.set_sub_network(cfg)
    out = encoder.export_hf(cfg, tmp_path / cfg.name)
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(loaded) is type(encoder.model)
    inputs = make_inputs()
    real = inputs["attention_mask"].bool()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits[real], encoder(**inputs).logits[real], atol=ATOL, rtol=0)
    prompt = inputs["input_ids"][:, :6]
    generated = loaded.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=5, do_sample=False)
    assert generated.shape == (3, 11)
    assert torch.equal(generated, greedy(encoder, prompt, 5))


def test_importance_reordering_of_decoders(family):
    """Heads (Llama: in whole grouped-query groups), neurons and hidden dimensions are reordered, the
    maxnet is unchanged and a reordered subnet still equals its export."""
    from kdlora.elastic.importance import reorder_by_importance

    encoder = trained_encoder(family)
    g = torch.Generator().manual_seed(5)
    batches = []
    for _ in range(2):
        ids = torch.randint(0, VOCAB, (2, 9), generator=g)
        mask = torch.ones_like(ids)
        mask[0, 6:] = 0
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    inputs = make_inputs()
    real = inputs["attention_mask"].bool()
    with torch.no_grad():
        before = encoder(**inputs).logits[real]
    orders = reorder_by_importance(encoder, batches, hidden=True)
    assert any(o != sorted(o) for o in orders["heads"]) and orders["hidden"] != sorted(orders["hidden"])
    with torch.no_grad():
        torch.testing.assert_close(encoder(**inputs).logits[real], before, atol=ATOL, rtol=0)
    cfg = SUBNETS[0]  # the reordered subnet still equals its export
    encoder.set_sub_network(cfg)
    with torch.no_grad():
        torch.testing.assert_close(encoder(**inputs).logits[real], encoder.materialize(cfg)(**inputs).logits[real],
                                   atol=ATOL, rtol=0)


def test_grouped_query_head_order_moves_whole_groups():
    """Groups ranked by summed importance, heads within a group by their own (hand-computed); an order that
    splits a key/value group is refused, naming the problem."""
    from kdlora.elastic.importance import head_order

    score = torch.tensor([1.0, 5.0, 2.0, 0.0, 0.0, 9.0])  # group sums 8 and 9: the second group first
    assert head_order(score, group=3).tolist() == [5, 3, 4, 1, 2, 0]
    assert head_order(score, group=1).tolist() == [5, 1, 2, 0, 3, 4]
    encoder = trained_encoder("llama")
    attention = encoder.layers[0].attention
    assert attention.group == 2
    with pytest.raises(ValueError, match="splits a group"):
        attention.permute_heads(torch.tensor([0, 2, 1, 3]))
    with pytest.raises(ValueError, match="permutation"):
        attention.permute_heads(torch.tensor([0, 0, 1, 2]))


def test_llama_with_tied_embeddings_slices_and_exports_tied():
    """SmolLM2-style Llama (LM head = word embedding table): the maxnet equals the HF model, a subnet with
    LoRA equals its export, which keeps the head tied and counts the table once."""
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=64, num_hidden_layers=4, num_attention_heads=6,
                         num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    reference = copy.deepcopy(model)
    encoder = ElasticTransformer(model, lora_r=4, lora_targets=ROLES).eval()
    inputs = make_inputs()
    real = inputs["attention_mask"].bool()
    with torch.no_grad():
        torch.testing.assert_close(encoder(**inputs).logits[real], reference(**inputs).logits[real], atol=ATOL, rtol=0)
    assert encoder.parameter_count() == sum(p.numel() for p in reference.parameters())
    randomize_adapters(encoder, stages=1)
    cfg = SubnetConfig(48, 6, 32, (0, 3))  # narrower FFN, 2 of 4 layers
    encoder.set_sub_network(cfg)
    plain = encoder.materialize(cfg)
    assert plain.config.tie_word_embeddings and plain.lm_head.weight is plain.model.embed_tokens.weight
    assert (plain.config.num_attention_heads, plain.config.num_key_value_heads, plain.config.num_hidden_layers) == (6, 2, 2)
    with torch.no_grad():
        torch.testing.assert_close(encoder(**inputs).logits[real], plain(**inputs).logits[real], atol=ATOL, rtol=0)
    assert encoder.parameter_count(cfg) == sum(p.numel() for p in plain.parameters())


def test_llama_whose_config_and_weights_disagree_on_tying_is_refused():
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())  # untied by hand
    with pytest.raises(ValueError, match="tie_word_embeddings is True but the LM head is not the word embedding table"):
        ElasticTransformer(model)


@pytest.mark.parametrize("heads", [3, (6, 3)])
def test_llama_export_keeps_the_subnets_own_heads(heads):
    """A Llama config carries its head size, so a subnet with fewer heads exports with that many (and whole
    key/value groups), not zero-padded to hidden/head size: the export's parameter count is the subnet's
    (layers that differ in heads pad to the widest one), its logits and greedy tokens are the sliced supernet's."""
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=64, num_hidden_layers=4, num_attention_heads=6,
                         num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    encoder = ElasticTransformer(LlamaForCausalLM(config).eval(), lora_r=4, lora_targets=ROLES).eval()
    randomize_adapters(encoder, stages=1)
    cfg = SubnetConfig(48, heads, 32, (0, 3))
    encoder.set_sub_network(cfg)
    plain = encoder.materialize(cfg)
    widest = max(cfg.heads_per_layer())
    assert (plain.config.num_attention_heads, plain.config.num_key_value_heads, plain.config.head_dim) == (widest, widest // 3, 8)
    assert plain.model.layers[0].self_attn.q_proj.weight.shape == (widest * 8, 48)
    assert plain.model.layers[0].self_attn.o_proj.weight.shape == (48, widest * 8)
    padding = sum(2 * 48 * (widest - h) * 8 + 2 * 48 * (widest - h) // 3 * 8 for h in cfg.heads_per_layer())  # q, o + k, v
    assert sum(p.numel() for p in plain.parameters()) == encoder.parameter_count(cfg) + padding
    assert plain.config == encoder.export_config(cfg)
    inputs = make_inputs()
    real = inputs["attention_mask"].bool()
    with torch.no_grad():
        torch.testing.assert_close(encoder(**inputs).logits[real], plain(**inputs).logits[real], atol=ATOL, rtol=0)
    prompt = inputs["input_ids"][:1, :4]
    with torch.no_grad():
        ids = prompt
        for _ in range(3):  # greedy from the sliced supernet, one token at a time
            ids = torch.cat([ids, encoder(input_ids=ids).logits[:, -1:].argmax(-1)], dim=1)
        torch.testing.assert_close(plain.generate(prompt, max_new_tokens=3, do_sample=False), ids)


def test_with_head_count_pads_exactly_and_refuses_to_drop_real_heads():
    """Resizing a Llama export's heads: zero-padding 3 heads to 6 leaves the logits unchanged; dropping
    heads that carry weights is one clear error, not a silently different model."""
    from kdlora.elastic.model import with_head_count

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=6,
                         num_key_value_heads=2, head_dim=8, max_position_embeddings=64, bos_token_id=1, eos_token_id=2)
    encoder = ElasticTransformer(LlamaForCausalLM(config).eval()).eval()
    small = encoder.materialize(SubnetConfig(48, 3, 64, (0, 1)))
    assert small.config.num_attention_heads == 3
    padded = with_head_count(small, encoder.export_config(SubnetConfig(48, 3, 64, (0, 1)), padded=True)).eval()
    assert padded.config.num_attention_heads == 6 and padded.model.layers[0].self_attn.q_proj.weight.shape == (48, 48)
    inputs = make_inputs()
    real = inputs["attention_mask"].bool()
    with torch.no_grad():
        torch.testing.assert_close(padded(**inputs).logits[real], small(**inputs).logits[real], atol=ATOL, rtol=0)
    with pytest.raises(RuntimeError, match="resizing to 3 heads would drop non-zero weights of model.layers.0.self_attn"):
        with_head_count(encoder.materialize(encoder.max_config), small.config)
