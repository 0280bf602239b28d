"""Elastic slicing: maxnet == HF model, Π(Φ) == exported plain HF model, LoRA slices, importance, sizes, errors.

Models are tiny random classifiers of every supported family (conftest `tiny_config`, vocabulary
of 100 so inputs exercise many embedding rows). References are independent: the unmodified HF
model, an HF copy with LoRA merged by hand, and exports reloaded from disk by plain
`AutoModelForSequenceClassification.from_pretrained`.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import tiny_config
from transformers import AutoModelForSequenceClassification

from kdlora.elastic import ElasticTransformer, SubnetConfig, evenly_spread_layers, maxnet_config
from kdlora.elastic.importance import importance_scores, reorder_by_importance
from kdlora.elastic.model import ROLES

# "deberta-v3": DeBERTa-v2 code with the v3 options (shared attention keys, normed relative embeddings, token types).
FAMILIES = ("bert", "roberta", "xlm-roberta", "mpnet", "distilbert", "deberta-v2", "deberta-v3")
ATOL = 1e-5
# Tiny maxnet: hidden 32, 4 heads of size 8, FFN 64, 4 layers.
SUBNETS = [
    SubnetConfig(16, 2, 32, (0, 3)),  # narrower and shallower, uniform
    SubnetConfig(24, (3, 1, 2), (64, 10, 40), (1, 2, 3)),  # per-layer heads and FFN
    SubnetConfig(8, 1, 8, (2,)),  # one middle layer
    SubnetConfig(32, 4, 64, evenly_spread_layers(4, 3)),  # full width, depth only
]


@pytest.fixture(autouse=True)
def single_thread():
    """Tiny matrices: intra-op threads only add synchronisation (100x slower on a loaded 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_model(family: str, seed: int = 0, num_labels: int = 2):
    if family == "xlm-roberta":  # not among conftest's families: same shapes as its RoBERTa, XLM-R's padding id 1
        from transformers import XLMRobertaConfig

        torch.manual_seed(seed)
        config = XLMRobertaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=160, type_vocab_size=1, pad_token_id=1,
                                  num_labels=num_labels)
        return AutoModelForSequenceClassification.from_config(config).eval()
    config = tiny_config("deberta-v2" if family == "deberta-v3" else family, vocab_size=100, num_labels=num_labels)
    if family == "deberta-v3":
        config.share_att_key, config.norm_rel_ebd, config.type_vocab_size = True, "layer_norm", 2
    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_config(config).eval()


def make_inputs(family: str, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 100, (3, 13), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # a padded row
    ids[1, 9:] = 1 if family in ("mpnet", "xlm-roberta") else 0  # the family's padding id
    inputs = {"input_ids": ids, "attention_mask": mask}
    if family in ("bert", "deberta-v3"):
        inputs["token_type_ids"] = (torch.arange(13) >= 6).long().expand(3, -1).clone()
    return inputs


def randomize_adapters(encoder: ElasticTransformer, stages: int = 2, seed: int = 3) -> None:
    torch.manual_seed(seed)
    for _ in range(stages):
        encoder.add_lora_stage()
    with torch.no_grad():
        for stage in encoder.lora.values():
            for B in stage.B:
                B.normal_(0, 0.2)


@pytest.mark.parametrize("family", FAMILIES)
def test_maxnet_equals_hf_model(family):
    model = make_model(family)
    reference = copy.deepcopy(model)
    encoder = ElasticTransformer(model).eval()
    inputs = make_inputs(family)
    with torch.no_grad():
        expected = reference(**inputs, output_hidden_states=True)
        out = encoder(**inputs, output_hidden_states=True)
    torch.testing.assert_close(out.logits, expected.logits, atol=ATOL, rtol=0)
    assert len(out.hidden_states) == 4
    # HF lists the embeddings first, then every layer's output.
    for mine, theirs in zip(out.hidden_states, expected.hidden_states[1:]):
        torch.testing.assert_close(mine, theirs, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert", "deberta-v3"])
def test_lora_stages_equal_hand_merged_hf_model(family):
    model = make_model(family)
    reference = copy.deepcopy(model)
    encoder = ElasticTransformer(model, lora_r=4, lora_alpha=8, lora_targets=ROLES).eval()
    randomize_adapters(encoder, stages=3)
    scale = 8 / 4
    # Merge W + scale·Σ_s B_s A_s into the reference by hand, finding its Linear by the same layout.
    ref_encoder_view = ElasticTransformer(reference)
    with torch.no_grad():
        for key, stage in encoder.lora.items():
            layer, role = key[len("layer"):].split("_", 1)
            target = ref_encoder_view.linear_module(int(layer), role)
            for A, B in zip(stage.A, stage.B):
                target.weight += scale * B @ A
    inputs = make_inputs(family)
    with torch.no_grad():
        torch.testing.assert_close(encoder(**inputs).logits, reference(**inputs).logits, atol=ATOL, rtol=0)
    assert encoder.num_stages == 3
    # Only the newest stage trains; the base never does.
    assert all(not A.requires_grad for s in encoder.lora.values() for A in list(s.A)[:2] + list(s.B)[:2])
    assert all(A.requires_grad for s in encoder.lora.values() for A in (s.A[2], s.B[2]))
    assert not any(p.requires_grad for p in encoder.model.parameters())


@pytest.mark.parametrize("family", FAMILIES)
def test_subnet_forward_equals_exported_model(family, tmp_path):
    encoder = ElasticTransformer(make_model(family)).eval()
    randomize_adapters(encoder)
    inputs = make_inputs(family)
    for cfg in SUBNETS + [encoder.max_config]:
        encoder.set_sub_network(cfg)
        with torch.no_grad():
            out = encoder(**inputs, output_hidden_states=True)
        out_dir = encoder.export_hf(cfg, tmp_path / cfg.name)
        exported = AutoModelForSequenceClassification.from_pretrained(out_dir).eval()
        assert exported.config.hidden_size == cfg.hidden_size
        assert exported.config.num_hidden_layers == len(cfg.layers)
        with torch.no_grad():
            expected = exported(**inputs, output_hidden_states=True)
        torch.testing.assert_close(out.logits, expected.logits, atol=ATOL, rtol=0)
        assert [tuple(h.shape) for h in out.hidden_states] == [(3, 13, cfg.hidden_size)] * len(cfg.layers)
        for mine, theirs in zip(out.hidden_states, expected.hidden_states[1:]):
            torch.testing.assert_close(mine, theirs, atol=ATOL, rtol=0)
        info = json.loads((out_dir / "subnet.json").read_text())
        assert SubnetConfig.from_dict(info["subnet"]) == cfg and info["name"] == cfg.name
    assert encoder.sub_network == encoder.max_config
    encoder.reset_super_network()
    assert encoder.sub_network == maxnet_config(encoder.model.config)


def test_subnets_differ_from_maxnet_and_share_its_weights():
    """Slicing really narrows the computation: a subnet's output changes, and reset restores the maxnet."""
    encoder = ElasticTransformer(make_model("bert")).eval()
    inputs = make_inputs("bert")
    with torch.no_grad():
        full = encoder(**inputs).logits
        encoder.set_sub_network(SUBNETS[0])
        small = encoder(**inputs).logits
        encoder.reset_super_network()
        again = encoder(**inputs).logits
    assert (full - small).abs().max() > 1e-3
    torch.testing.assert_close(full, again, atol=0, rtol=0)


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_lora_merge_then_slice_equals_slice_then_merge(family, tmp_path):
    encoder = ElasticTransformer(make_model(family), lora_r=4, lora_alpha=16, lora_targets=ROLES).eval()
    randomize_adapters(encoder, stages=2)
    scale, d = 16 / 4, encoder.head_dim
    cfg = SubnetConfig(24, 2, 40, (0, 2))
    exported = encoder.materialize(cfg)
    exported_layers = ElasticTransformer(copy.deepcopy(exported))
    for sub_index, layer in enumerate(cfg.layers):
        for role, (o, i) in {"query": (2 * d, 24), "value": (2 * d, 24), "attention_output": (24, 2 * d),
                             "intermediate": (40, 24), "output": (24, 40)}.items():
            linear = encoder.linear_module(layer, role)
            full = linear.weight.detach().clone()
            for A, B in encoder.adapters(layer, role):
                full += scale * B.detach() @ A.detach()
            expected = full[:o, :i]
            sliced_then_merged, bias = encoder.merged_weight(layer, role, o, i)
            torch.testing.assert_close(sliced_then_merged, expected, atol=1e-6, rtol=0)
            torch.testing.assert_close(bias, linear.bias[:o], atol=0, rtol=0)
            # The export holds the same weights (zero-padded to the export's square attention width).
            stored = exported_layers.linear_module(sub_index, role).weight
            torch.testing.assert_close(stored[:o, :i], expected, atol=1e-6, rtol=0)
            assert stored[o:].abs().sum() == 0 and stored[:, i:].abs().sum() == 0


def _batches(family: str, n: int = 3, seed: int = 5, regression: bool = False):
    batches = []
    for b in range(n):
        inputs = make_inputs(family, seed=seed + b)
        g = torch.Generator().manual_seed(seed + 100 + b)
        inputs["labels"] = torch.rand(3, generator=g) if regression else torch.randint(0, 2, (3,), generator=g)
        batches.append(inputs)
    return batches


@pytest.mark.parametrize("family", ["bert", "roberta", "mpnet", "deberta-v2", "deberta-v3"])
def test_importance_reordering_keeps_maxnet_and_sorts_slices(family):
    encoder = ElasticTransformer(make_model(family)).eval()
    randomize_adapters(encoder, stages=1)
    inputs = make_inputs(family, seed=42)
    probe = SubnetConfig(16, 2, 32, (0, 1, 2, 3))
    with torch.no_grad():
        before = encoder(**inputs).logits
        encoder.set_sub_network(probe)
        small_before = encoder(**inputs).logits
        encoder.reset_super_network()
    query_before = encoder.linear_module(1, "query").weight.detach().clone()
    inner_before = encoder.linear_module(1, "intermediate").weight.detach().clone()

    orders = reorder_by_importance(encoder, _batches(family), num_batches=2)

    with torch.no_grad():
        torch.testing.assert_close(encoder(**inputs).logits, before, atol=ATOL, rtol=0)
        encoder.set_sub_network(probe)
        small_after = encoder(**inputs).logits
        encoder.reset_super_network()
    assert any(o != sorted(o) for o in orders["heads"]) and any(o != sorted(o) for o in orders["neurons"])
    assert (small_after - small_before).abs().max() > 1e-4  # the leading slices now hold other units
    d = encoder.head_dim
    heads, neurons = torch.tensor(orders["heads"][1]), torch.tensor(orders["neurons"][1])
    rows = (heads[:, None] * d + torch.arange(d)).reshape(-1)
    torch.testing.assert_close(encoder.linear_module(1, "query").weight, query_before[rows], atol=0, rtol=0)
    torch.testing.assert_close(encoder.linear_module(1, "intermediate").weight, inner_before[neurons], atol=0, rtol=0)
    # Recomputed on the same batches, importance is now in descending order (per layer; MPNet: summed).
    head_score, neuron_score = importance_scores(encoder, _batches(family), num_batches=2)
    if family == "mpnet":
        head_score = head_score.sum(0, keepdim=True)
    for scores in list(head_score) + list(neuron_score):
        # (float32 rounding differs through the permuted matmuls: allow near-ties to swap)
        assert torch.all(scores[:-1] >= scores[1:] * (1 - 1e-4) - 1e-9)


def test_importance_reordering_of_plain_hf_regression_model():
    model = make_model("bert", num_labels=1)
    reference = copy.deepcopy(model)
    flags = [p.requires_grad for p in model.parameters()]
    reorder_by_importance(model, _batches("bert", regression=True))
    inputs = make_inputs("bert")
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, reference(**inputs).logits, atol=ATOL, rtol=0)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert not torch.equal(model.bert.encoder.layer[0].intermediate.dense.weight,
                           reference.bert.encoder.layer[0].intermediate.dense.weight)


@pytest.mark.parametrize("family", FAMILIES)
def test_parameter_count_matches_exported_model(family):
    encoder = ElasticTransformer(make_model(family), lora_r=4, train_head=True)
    randomize_adapters(encoder, stages=2)
    # Uniform layers whose attention width equals the hidden width export without padding.
    for cfg in (encoder.max_config, SubnetConfig(16, 2, 24, (1, 3)), SubnetConfig(8, 1, 8, (0,))):
        exported = encoder.materialize(cfg)
        assert encoder.parameter_count(cfg) == sum(p.numel() for p in exported.parameters())
    # Trainable: the newest stage's adapter slices (r·(in + out) per target) plus the sliced head.
    cfg = SubnetConfig(16, 2, 24, (1, 3))
    h, w, f, r, labels = 16, 16, 24, 4, 2
    per_layer = r * (h + w) * 3 + r * (h + f) + r * (f + h)  # query, key, value, intermediate, output
    head = (h * h + h) + (labels * h + labels)
    assert encoder.parameter_count(cfg, trainable_only=True) == 2 * per_layer + head
    encoder.set_sub_network(cfg)
    assert encoder.parameter_count() == encoder.parameter_count(cfg)
    # Padded exports (per-layer widths) are larger than what the subnet uses.
    padded = SUBNETS[1]
    assert encoder.parameter_count(padded) < sum(p.numel() for p in encoder.materialize(padded).parameters())


def test_materialize_is_cached_until_weights_change():
    encoder = ElasticTransformer(make_model("bert")).eval()
    randomize_adapters(encoder, stages=1)
    cfg = SUBNETS[0]
    first = encoder.materialize(cfg)
    assert encoder.materialize(cfg) is first
    with torch.no_grad():
        next(iter(encoder.lora.values())).B[0].add_(1.0)  # an optimizer step does the same, in place
    second = encoder.materialize(cfg)
    assert second is not first
    inputs = make_inputs("bert")
    encoder.set_sub_network(cfg)
    with torch.no_grad():
        torch.testing.assert_close(second(**inputs).logits, encoder(**inputs).logits, atol=ATOL, rtol=0)


def test_bad_configs_raise_clear_errors():
    encoder = ElasticTransformer(make_model("bert"))
    cases = {
        "hidden_size 40 not in 1..32": SubnetConfig(40, 4, 64, (0,)),
        "num_heads 5 not in 1..4": SubnetConfig(32, 5, 64, (0,)),
        "out of range for a 4-layer maxnet": SubnetConfig(32, 4, 64, (0, 4)),
        "keeps no layers": SubnetConfig(32, 4, 64, ()),
        "strictly increasing": SubnetConfig(32, 4, 64, (2, 1)),
        "at most 2 heads fit": SubnetConfig(16, 3, 64, (0,)),
        "not a multiple of the head size 8": SubnetConfig(20, 2, 64, (0,)),
        "intermediate_size 65 not in 1..64": SubnetConfig(32, 4, 65, (0,)),
        "num_heads has 2 values but the subnet keeps 3 layers": SubnetConfig(32, (4, 2), 64, (0, 1, 2)),
    }
    for message, cfg in cases.items():
        with pytest.raises(ValueError, match=message):
            encoder.set_sub_network(cfg)
        with pytest.raises(ValueError, match=message):
            encoder.export_hf(cfg, "/nonexistent/never-written")
    assert encoder.sub_network == encoder.max_config  # a rejected config leaves the current one
    from transformers import AlbertConfig

    albert = AlbertConfig(vocab_size=100, embedding_size=16, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                          num_hidden_layers=1)
    with pytest.raises(ValueError, match="families bert, roberta"):
        ElasticTransformer(AutoModelForSequenceClassification.from_config(albert))
    conv = tiny_config("deberta-v2", 100)
    conv.conv_kernel_size = 3
    with pytest.raises(ValueError, match="does not support conv_kernel_size"):
        ElasticTransformer(AutoModelForSequenceClassification.from_config(conv))
    with pytest.raises(ValueError, match="unknown elastic LoRA target 'dense'"):
        ElasticTransformer(make_model("bert"), lora_targets=("query", "dense"))
    with pytest.raises(ValueError, match="bad subnet name"):
        SubnetConfig.from_name("h32-a4-f64")


def test_config_names_and_layer_maps():
    cfg = SubnetConfig(256, (4, 4, 2), [1024, 512, 512], (0, 5, 11))
    assert cfg.name == "h256-a4.4.2-f1024.512.512-l0.5.11"
    assert SubnetConfig.from_name(cfg.name) == cfg
    assert SubnetConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert SubnetConfig(256, (4, 4), 512, (0, 1)).name == "h256-a4-f512-l2"  # uniform tuples collapse; l2 = first 2
    assert SubnetConfig.from_name("h256-a4-f512-l2").layers == (0, 1)
    assert hash(SubnetConfig(8, (2, 2), 16, [0, 1])) == hash(SubnetConfig(8, 2, 16, (0, 1)))
    assert evenly_spread_layers(6, 6) == (0, 1, 2, 3, 4, 5)
    assert evenly_spread_layers(6, 3) == (0, 3, 5)  # first and last always kept
    assert evenly_spread_layers(12, 6) == (0, 2, 4, 7, 9, 11)
    assert evenly_spread_layers(6, 1) == (5,)
    with pytest.raises(ValueError):
        evenly_spread_layers(6, 7)


def test_export_cli_writes_subnets_of_a_supernet_checkpoint(tiny_bert_dir, tmp_path, capsys):
    import lightning

    from kdlora.mlfs.export import main
    from kdlora.mlfs.glue import SuperTransformer

    module = SuperTransformer(model_name_or_path=str(tiny_bert_dir), task="mrpc", evaluation={"measure_latency": False}, export={"enabled": False})
    with torch.no_grad():
        for stage in module.encoder.lora.values():
            for B in stage.B:
                B.normal_(0, 0.2)
    checkpoint = tmp_path / "supernet.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                "pytorch-lightning_version": lightning.__version__}, checkpoint)
    (tmp_path / "small.yaml").write_text("hidden_size: 16\nnum_heads: [2, 1]\nintermediate_size: 32\nlayers: [1, 3]\n")

    # Errors: one line, exit 2, nothing written.
    assert main(["--checkpoint", str(tmp_path / "missing.ckpt"), "--subnet", "max", "--out", str(tmp_path / "x")]) == 2
    assert main(["--checkpoint", str(checkpoint), "--subnet", "h64-a4-f64-l4", "--out", str(tmp_path / "x")]) == 2
    assert "hidden_size 64 not in 1..32" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()

    assert main(["--checkpoint", str(checkpoint), "--subnet", "h16-a2-f32-l0.3", "--subnet", str(tmp_path / "small.yaml"),
                 "--out", str(tmp_path / "out")]) == 0
    module.encoder.eval()
    inputs = make_inputs("bert")
    inputs["input_ids"] = inputs["input_ids"] % module.encoder.model.config.vocab_size
    for cfg in (SubnetConfig(16, 2, 32, (0, 3)), SubnetConfig(16, (2, 1), 32, (1, 3))):
        exported = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out" / cfg.name).eval()
        module.encoder.set_sub_network(cfg)
        with torch.no_grad():
            torch.testing.assert_close(exported(**inputs).logits, module.encoder(**inputs).logits, atol=ATOL, rtol=0)
        assert (tmp_path / "out" / cfg.name / "tokenizer.json").is_file()


@pytest.mark.parametrize("family", ["bert", "mpnet", "deberta-v3"])
def test_forward_under_bf16_autocast(family):
    """Mixed precision (Trainer precision='bf16-mixed') lowers q/k/v; masks and biases must follow."""
    encoder = ElasticTransformer(make_model(family)).eval()
    encoder.set_sub_network(SUBNETS[1])
    inputs = make_inputs(family)
    with torch.no_grad():
        full_precision = encoder(**inputs).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = encoder(**inputs).logits
    torch.testing.assert_close(mixed.float(), full_precision, atol=2e-2, rtol=0)


def test_subnet_gradients_reach_only_the_sliced_trainable_adapters():
    encoder = ElasticTransformer(make_model("bert"), lora_r=4).train()
    randomize_adapters(encoder, stages=2)  # stage 0 frozen, stage 1 trains
    cfg = SubnetConfig(16, 2, 24, (1, 3))
    encoder.set_sub_network(cfg)
    inputs = make_inputs("bert")
    encoder(**inputs).logits.square().sum().backward()
    assert all(p.grad is None for p in encoder.model.parameters())  # frozen base
    for layer in range(4):
        A, B = encoder.adapters(layer, "intermediate")[1]
        A0, _ = encoder.adapters(layer, "intermediate")[0]
        assert A0.grad is None
        if layer not in cfg.layers:
            assert A.grad is None or A.grad.abs().sum() == 0
            continue
        # Only the leading slice is read: rows of B beyond FFN 24 and columns of A beyond hidden 16 get no gradient.
        assert B.grad[24:].abs().sum() == 0 and B.grad[:24].abs().sum() > 0
        assert A.grad[:, 16:].abs().sum() == 0 and A.grad[:, :16].abs().sum() > 0


def test_deepcopy_keeps_slicing_consistent():
    encoder = ElasticTransformer(make_model("roberta")).eval()
    randomize_adapters(encoder, stages=1)
    clone = copy.deepcopy(encoder)
    with torch.no_grad():
        clone.linear_module(0, "intermediate").weight.normal_()  # must touch the clone only
    inputs = make_inputs("roberta")
    with torch.no_grad():
        assert (clone(**inputs).logits - encoder(**inputs).logits).abs().max() > 1e-4
        torch.testing.assert_close(encoder(**inputs).logits, copy.deepcopy(encoder)(**inputs).logits, atol=0, rtol=0)


@pytest.mark.parametrize("family", ["bert", "mpnet", "distilbert", "deberta-v3"])
def test_hidden_dimension_reordering_keeps_maxnet(family):
    from kdlora.elastic.importance import hidden_importance

    encoder = ElasticTransformer(make_model(family)).eval()
    randomize_adapters(encoder, stages=1)
    inputs = make_inputs(family, seed=42)
    word_before = encoder._layout.word.weight.detach().clone()
    with torch.no_grad():
        before = encoder(**inputs).logits
    orders = reorder_by_importance(encoder, _batches(family), num_batches=2, hidden=True)
    with torch.no_grad():
        torch.testing.assert_close(encoder(**inputs).logits, before, atol=ATOL, rtol=0)
    hidden = orders["hidden"]
    assert sorted(hidden) == list(range(32)) and hidden != list(range(32))
    torch.testing.assert_close(encoder._layout.word.weight, word_before[:, hidden], atol=0, rtol=0)
    scores = hidden_importance(encoder, _batches(family), num_batches=2)
    assert torch.all(scores[:-1] >= scores[1:] * (1 - 1e-4) - 1e-9)


def test_subnet_names_round_trip_including_single_explicit_layer():
    # Regression: layers=(3,) was named "l3", which reads back as the first three layers.
    for layers in [(0, 1, 2), (3,), (0,), (1, 3), (0, 2, 3)]:
        cfg = SubnetConfig(16, 2, 32, layers)
        assert SubnetConfig.from_name(cfg.name) == cfg, cfg.name
    assert SubnetConfig(16, 2, 32, (3,)).name == "h16-a2-f32-l.3"
    assert SubnetConfig.from_name("h16-a2-f32-l3").layers == (0, 1, 2)
