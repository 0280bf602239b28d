"""The MLFS search space, subnet sampler and palette: stage rules, determinism, resume, processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kdlora.elastic.config import SubnetConfig, evenly_spread_layers
from kdlora.mlfs.search_space import SearchSpace, SubnetSampler, palette_members

REPO = Path(__file__).resolve().parents[1]
BERT_BASE = SubnetConfig(768, 12, 3072, tuple(range(12)))
TINY = SubnetConfig(32, 4, 64, tuple(range(4)))


def test_default_space_is_fractions_of_the_maxnet():
    space = SearchSpace.build(BERT_BASE)
    assert space.hidden_sizes == (768, 576, 384, 192)  # multiples of head size 64
    assert space.num_heads == (12, 9, 6, 3)
    assert space.intermediate_sizes == (3072, 2304, 1536, 768)
    assert space.depths == (12, 9, 6, 3)
    tiny = SearchSpace.build(TINY)
    assert (tiny.hidden_sizes, tiny.num_heads, tiny.intermediate_sizes, tiny.depths) == (
        (32, 24, 16, 8), (4, 3, 2, 1), (64, 48, 32, 16), (4, 3, 2, 1))


def test_space_from_yaml_dict_and_its_errors():
    space = SearchSpace.build(BERT_BASE, {"hidden_sizes": [768, 384], "depths": [12, 6], "fractions": [1.0, 0.5]})
    assert space.hidden_sizes == (768, 384) and space.depths == (12, 6)
    assert space.num_heads == (12, 6) and space.intermediate_sizes == (3072, 1536)
    with pytest.raises(ValueError, match="unknown keys"):
        SearchSpace.build(BERT_BASE, {"widths": [1]})
    with pytest.raises(ValueError, match="head size 64"):
        SearchSpace.build(BERT_BASE, {"hidden_sizes": [768, 500]})
    with pytest.raises(ValueError, match="depths"):
        SearchSpace.build(BERT_BASE, {"depths": [13]})


def meta_encoder(config):
    """An ElasticTransformer over a model of `config`'s shape on the meta device (no weights, any size)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from kdlora.elastic import ElasticTransformer

    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(config)
    return ElasticTransformer(model, 8, 16, 0.0, ("query", "key", "value", "intermediate", "output"))


@pytest.mark.parametrize("shape", ["bert-base", "minilm-l6"])
def test_paper_preset_minnet_has_41_percent_of_the_maxnet(shape):
    """MLFS's minnet is 45M of BERT-base's 110M; the preset's, counted independently here from the
    model's own tensors (deployed size: every parameter a subnet reads), is within 0.03 of 0.41."""
    from transformers import BertConfig

    from kdlora.experiments import report

    config = (report.load_config("bert-base-uncased") if shape == "bert-base" else
              BertConfig(hidden_size=384, num_attention_heads=12, intermediate_size=1536, num_hidden_layers=6, vocab_size=30522))
    enc = meta_encoder(config)
    space = SearchSpace.build(enc.max_config, "paper", count=enc.parameter_count)
    assert SearchSpace.build(enc.max_config, {"preset": "paper"}, count=enc.parameter_count) == space
    total = sum(p.numel() for p in enc.model.parameters())  # the maxnet is the whole model
    assert enc.parameter_count(enc.max_config) == total
    minnet = space.smallest()
    H, L = config.hidden_size, config.num_hidden_layers
    head_dim = H // config.num_attention_heads
    h, w, f, d = minnet.hidden_size, minnet.num_heads * head_dim, minnet.intermediate_size, len(minnet.layers)
    # By hand: embeddings (word, position, token type) and their norm, per layer Q/K/V/O + FFN + 2 norms, pooler, classifier.
    by_hand = ((config.vocab_size + config.max_position_embeddings + config.type_vocab_size) * h + 2 * h
               + d * (3 * (w * h + w) + h * w + h + f * h + f + h * f + h + 4 * h) + h * h + h + 2 * h + 2)
    assert enc.parameter_count(minnet) == by_hand
    assert abs(by_hand / total - 0.41) <= 0.03, (minnet.name, by_hand / total)
    assert space.num_heads[-1] * 2 == space.num_heads[0] and space.depths[-1] * 2 == L  # 1/2 of heads and depth
    if shape == "bert-base":
        assert (space.hidden_sizes, space.num_heads, space.intermediate_sizes, space.depths) == (
            (768,), (12, 9, 6), (3072, 2304, 1536), (12, 9, 6))  # 45.7M of 109.5M


def test_paper_preset_errors():
    with pytest.raises(ValueError, match="unknown preset 'papper'"):
        SearchSpace.build(BERT_BASE, "papper", count=lambda c: 1)
    with pytest.raises(ValueError, match="needs the maxnet's parameter counts"):
        SearchSpace.build(BERT_BASE, "paper")
    with pytest.raises(ValueError, match="fixes the fractions"):
        SearchSpace.build(BERT_BASE, {"preset": "paper", "fractions": [1.0, 0.5]}, count=lambda c: 1)


def sample_names(sampler: SubnetSampler, stage: int, steps) -> list[list[str]]:
    return [[c.name for c in sampler.sample(stage, step)] for step in steps]


def test_stage_rules_sandwich_and_validity():
    space = SearchSpace.build(BERT_BASE)
    sampler = SubnetSampler(space, num_subnets=3, sandwich=True, seed=7)
    assert sampler.sample(0, 5) == []  # stage 0 trains the maxnet alone
    depths_seen = set()
    for stage in (1, 2):
        for step in range(200):
            subnets = sampler.sample(stage, step)
            assert len(subnets) == 3
            assert subnets[0] == space.smallest(full_depth=stage == 1)  # sandwich rule
            for cfg in subnets:
                cfg.validate(BERT_BASE)  # heads x head size fits the hidden size, etc.
                assert cfg != BERT_BASE  # the maxnet is trained anyway, never drawn
                assert cfg.hidden_size in space.hidden_sizes and cfg.intermediate_size in space.intermediate_sizes
                assert cfg.layers == evenly_spread_layers(12, cfg.depth)
                if stage == 1:
                    assert cfg.layers == tuple(range(12))
                else:
                    depths_seen.add(cfg.depth)
    assert depths_seen == {12, 9, 6, 3}
    no_sandwich = SubnetSampler(space, num_subnets=2, sandwich=False, seed=7)
    firsts = {no_sandwich.sample(1, s)[0] for s in range(50)}
    assert len(firsts) > 5  # without the rule the first slot is random too


def test_per_layer_sampling():
    space = SearchSpace.build(BERT_BASE)
    cfgs = [c for s in range(30) for c in SubnetSampler(space, 2, sandwich=False, per_layer=True, seed=1).sample(2, s)]
    assert any(isinstance(c.num_heads, tuple) for c in cfgs)
    for c in cfgs:
        assert len(c.heads_per_layer()) == len(c.ffn_per_layer()) == c.depth
        c.validate(BERT_BASE)


def test_deterministic_in_seed_and_step_and_resumes_identically():
    space = SearchSpace.build(TINY)
    uninterrupted = SubnetSampler(space, 2, seed=3)
    full_run = sample_names(uninterrupted, 2, range(40))
    # A "resumed" run is a fresh sampler that starts at global step 20.
    resumed = SubnetSampler(SearchSpace.build(TINY), 2, seed=3)
    assert sample_names(resumed, 2, range(20, 40)) == full_run[20:]
    assert len({tuple(n) for n in full_run}) > 5  # steps differ
    assert sample_names(SubnetSampler(space, 2, seed=4), 2, range(40)) != full_run  # seeds differ


def test_identical_across_processes():
    """A separate interpreter (different hash seed) samples the same subnets: what DDP ranks rely on."""
    code = (
        "import json; from kdlora.elastic.config import SubnetConfig; from kdlora.mlfs.search_space import SearchSpace, SubnetSampler;"
        "s = SubnetSampler(SearchSpace.build(SubnetConfig(768, 12, 3072, tuple(range(12)))), 3, per_layer=True, seed=11);"
        "print(json.dumps([[c.name for c in s.sample(st, i)] for st in (1, 2) for i in range(25)]))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "123", "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True, cwd=REPO)
    here = SubnetSampler(SearchSpace.build(BERT_BASE), 3, per_layer=True, seed=11)
    assert json.loads(out.stdout) == [n for st in (1, 2) for n in sample_names(here, st, range(25))]


def test_palette_members():
    space = SearchSpace.build(BERT_BASE)
    names = [c.name for c in palette_members(space)]
    assert names == ["h768-a12-f3072-l12", "h576-a9-f2304-l0.1.3.4.6.7.8.10.11", "h384-a6-f1536-l0.2.4.7.9.11", "h192-a3-f768-l0.6.11"]
    explicit = palette_members(space, ["max", {"hidden_size": 384, "num_heads": 6, "intermediate_size": 1536, "depth": 6}, "min", "max"])
    assert [c.name for c in explicit] == [names[0], names[2], names[3]]  # duplicates dropped
    with pytest.raises(ValueError, match="palette member"):
        palette_members(space, ["huge"])
    with pytest.raises(ValueError, match="exceeds hidden_size"):
        palette_members(space, [{"hidden_size": 192, "num_heads": 12, "intermediate_size": 768, "depth": 3}])
