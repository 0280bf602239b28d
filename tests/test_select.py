"""`kdlora.mlfs.select`: search a trained supernet's space for the best subnet under a budget."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from kdlora.data.glue import GLUEDataModule
from kdlora.elastic.config import SubnetConfig
from kdlora.mlfs.glue import SuperTransformer
from kdlora.mlfs.search_space import SearchSpace
from kdlora.mlfs.select import Budget, Candidate, best_within, main, pareto_front, search

MAX = SubnetConfig(32, 4, 64, (0, 1, 2, 3))
SPACE = SearchSpace.build(MAX, {"hidden_sizes": [32, 24, 16, 8], "num_heads": [4, 3, 2, 1],
                                "intermediate_sizes": [64, 48, 32, 16], "depths": [4, 3, 2, 1]})


def cand(name_score_latency):
    name, score, ms = name_score_latency
    return Candidate(SubnetConfig.from_name(name), 0, ms, ms / 10, score)


def test_pareto_front_by_hand():
    cs = [cand(x) for x in [("h32-a4-f64-l4", 0.9, 10.0), ("h24-a3-f48-l4", 0.85, 7.0), ("h16-a2-f32-l4", 0.86, 8.0),
                            ("h8-a1-f16-l4", 0.5, 2.0), ("h8-a1-f16-l1", 0.4, 2.0), ("h16-a2-f32-l2", 0.6, 5.0)]]
    # Sorted by latency: h8-l4 (2ms .5) front; h8-l1 (2ms .4) dominated; h16-l2 (5ms .6) front; h24 (7ms .85) front;
    # h16-l4 (8ms .86) front; h32 (10ms .9) front.
    assert [c.config.name for c in pareto_front(cs)] == ["h8-a1-f16-l4", "h16-a2-f32-l2", "h24-a3-f48-l4",
                                                         "h16-a2-f32-l4", "h32-a4-f64-l4"]


def test_budget_is_validated():
    with pytest.raises(ValueError, match="give a budget"):
        Budget()
    with pytest.raises(ValueError, match="positive"):
        Budget(max_latency_ratio=-0.5)


def test_search_evaluates_each_config_once_and_picks_the_best_under_budget():
    calls = []
    rng = np.random.default_rng(1)
    truth = {}

    def evaluate(cfg, source):
        calls.append(cfg)
        params = cfg.hidden_size * cfg.depth * max(cfg.ffn_per_layer())
        truth.setdefault(cfg, float(rng.random()))
        return Candidate(cfg, params, params / 100.0, params / (32 * 4 * 64), truth[cfg], source=source)

    budget = Budget(max_params=0.5 * 32 * 4 * 64)
    out = search(evaluate, SPACE, budget, [(MAX, "corner"), (SPACE.smallest(), "corner")], num_random=6,
                 generations=3, population=4, children=5, seed=0)
    assert len(calls) == len(set(calls)) == len(out)  # every config evaluated once
    assert len(out) > 8  # the generations added candidates
    assert {c.source for c in out} >= {"corner", "random"} and {c.source for c in out} & {"mutation", "crossover"}
    best = best_within(out)
    assert best.params <= budget.max_params and best.within_budget
    assert all(c.score <= best.score for c in out if c.params <= budget.max_params)
    assert all(c.within_budget == (c.params <= budget.max_params) for c in out)


@pytest.fixture(scope="module")
def trained_checkpoint(tiny_bert_dir, small_glue_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("select_ckpt")
    module = SuperTransformer(str(tiny_bert_dir), "mrpc", stages={"epochs": [0, 0, 1]}, lora={"r": 4}, evaluation={"measure_latency": False}, export={"enabled": False}, sampling={"sampler_seed": 0, "search_space": {"hidden_sizes": [32, 16], "num_heads": [4, 2], "intermediate_sizes": [64, 32],
                                            "depths": [4, 2]}})
    dm = GLUEDataModule("mrpc", str(tiny_bert_dir), data_dir=str(small_glue_dir), batch_size=8, max_seq_length=32,
                        holdout_fraction=0.25, cache_dir=str(root / "tok"))
    trainer = L.Trainer(accelerator="cpu", max_steps=3, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=str(root))
    trainer.fit(module, dm)
    path = root / "supernet.ckpt"
    trainer.save_checkpoint(path)
    return path


def _reference_scores(ckpt, glue_dir, names):
    """Held-out scores recomputed independently: a plain transformers export of each subnet on the same split."""
    from kdlora.eval.metrics import glue_score, task_metrics

    module = SuperTransformer.load_from_checkpoint(ckpt, map_location="cpu").eval()
    hp = torch.load(ckpt, weights_only=True, map_location="cpu")["datamodule_hyper_parameters"]
    dm = GLUEDataModule(**hp)
    dm.setup("validate")
    scores = {}
    for name in names:
        plain = module.encoder.materialize(SubnetConfig.from_name(name)).eval()
        metrics = task_metrics(dm.spec)
        with torch.no_grad():
            for batch in dm.val_dataloader():
                logits = plain(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               token_type_ids=batch["token_type_ids"]).logits
                metrics.update(logits.argmax(-1), batch["labels"])
        scores[name] = glue_score({k: float(v) for k, v in metrics.compute().items()})
    return scores


def test_select_by_params_meets_budget_scores_on_holdout_and_exports(trained_checkpoint, small_glue_dir, tmp_path):
    module = SuperTransformer.load_from_checkpoint(trained_checkpoint, map_location="cpu")
    max_params = module.encoder.parameter_count(module.encoder.max_config)
    limit = int(0.8 * max_params)
    out = tmp_path / "chosen"
    code = main(["--checkpoint", str(trained_checkpoint), "--max-params", str(limit), "--out", str(out), "--repeats", "2",
                 "--seq-len", "16", "--random", "3", "--generations", "1", "--children", "2", "--report-dev"])
    assert code == 0
    report = json.loads((out / "search.json").read_text())
    rows, best = report["candidates"], report["best"]
    assert best["params"] <= limit and best["within_budget"]
    assert all(r["score"] <= best["score"] for r in rows if r["params"] <= limit)
    assert any(r["params"] > limit and not r["within_budget"] for r in rows)  # the maxnet was measured and excluded
    assert len({r["name"] for r in rows}) == len(rows) >= 6
    # Every candidate lies in the space the supernet was trained on (hidden 32/16, FFN 64/32), not a default one.
    assert all((c.hidden_size, c.intermediate_size) in {(32, 64), (32, 32), (16, 64), (16, 32)}
               for c in (SubnetConfig.from_name(r["name"]) for r in rows))
    assert (out / "pareto.png").stat().st_size > 1000 and "Pareto" in (out / "search.md").read_text()
    # Held-out scores match an independent evaluation of exported subnets (the run's holdout split, not dev).
    want = _reference_scores(trained_checkpoint, small_glue_dir, [r["name"] for r in rows[:3]])
    for r in rows[:3]:
        assert r["score"] == pytest.approx(want[r["name"]], abs=1e-6)
    # The chosen subnet is a standalone HF model equal to the supernet sliced to it.
    from transformers import AutoModelForSequenceClassification

    plain = AutoModelForSequenceClassification.from_pretrained(out / "model").eval()
    cfg = SubnetConfig.from_name(best["name"])
    exported = sum(p.numel() for p in plain.parameters())
    # An HF model needs heads × head size = hidden size, so fewer heads are exported zero-padded (more parameters,
    # the same function); the count of what the subnet uses is best["params"]. Which one wins a tie is timing noise.
    padded = min(cfg.heads_per_layer()) * module.encoder.head_dim < cfg.hidden_size
    assert exported > best["params"] if padded else exported == best["params"]
    info = json.loads((out / "model" / "subnet.json").read_text())
    assert info["selected_by"]["split"] == "holdout" and "dev_score" in info
    ids = torch.randint(5, 100, (2, 12))
    mask = torch.ones_like(ids)
    module.encoder.eval().set_sub_network(cfg)
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=ids, attention_mask=mask).logits,
                              module.encoder(ids, mask).logits, atol=1e-5)


def test_select_by_latency_ratio(trained_checkpoint, tmp_path, monkeypatch):
    # Latency is timed by kdlora.eval.latency.measure_latency_ms; here a stand-in with a known, noise-free
    # cost (a model's parameter count) replaces it, so the ratios and the choice have one correct outcome.
    import kdlora.eval.latency as latency

    calls = []

    def cost_ms(model, vocab_size, batch_size=1, seq_len=128, repeats=10, warmup=2, device=None):
        calls.append((batch_size, seq_len, repeats))
        return sum(p.numel() for p in model.parameters()) / 1000.0

    monkeypatch.setattr(latency, "measure_latency_ms", cost_ms)
    out = tmp_path / "fast"
    code = main(["--checkpoint", str(trained_checkpoint), "--max-latency-ratio", "0.9", "--out", str(out),
                 "--repeats", "3", "--seq-len", "32", "--batch-size", "4", "--random", "2", "--generations", "1",
                 "--children", "2"])
    assert code == 0
    assert calls and set(calls) == {(4, 32, 3)}  # the command's batch, length and repeats reach the timing
    report = json.loads((out / "search.json").read_text())
    rows, best = report["candidates"], report["best"]
    # Each row's latency and ratio, recomputed here from the exported models' sizes.
    encoder = SuperTransformer.load_from_checkpoint(trained_checkpoint, map_location="cpu").encoder
    size_ms = {r["name"]: sum(p.numel() for p in encoder.materialize(SubnetConfig.from_name(r["name"])).parameters()) / 1000.0
               for r in rows}
    max_ms = sum(p.numel() for p in encoder.materialize(encoder.max_config).parameters()) / 1000.0
    assert encoder.max_config.name in size_ms and len(rows) >= 4
    for r in rows:
        assert r["latency_ms"] == pytest.approx(size_ms[r["name"]])
        assert r["latency_ratio"] == pytest.approx(size_ms[r["name"]] / max_ms)
        assert r["within_budget"] == (size_ms[r["name"]] <= 0.9 * max_ms)
    assert any(r["latency_ratio"] < 1.0 for r in rows)  # a ratio that is not the maxnet's own
    under = [r for r in rows if r["within_budget"]]
    assert best["name"] == max(under, key=lambda r: (r["score"], -r["latency_ms"]))["name"]
    info = json.loads((out / "model" / "subnet.json").read_text())
    assert info["selected_by"]["latency_ratio"] == pytest.approx(size_ms[best["name"]] / max_ms)


def test_select_refuses_a_nonempty_out_and_leaves_it(trained_checkpoint, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert main(["--checkpoint", str(trained_checkpoint), "--max-params", "1000", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_select_reads_a_checkpoint_saved_under_the_training_cli(trained_checkpoint, tmp_path):
    """A checkpoint written by `train.py fit` carries Lightning's `_instantiator` among the data module's
    hyperparameters; selection rebuilds the data module from the rest."""
    saved = torch.load(trained_checkpoint, weights_only=True, map_location="cpu")
    saved["datamodule_hyper_parameters"]["_instantiator"] = "lightning.pytorch.cli.instantiate_module"
    ckpt = tmp_path / "cli.ckpt"
    torch.save(saved, ckpt)
    out = tmp_path / "chosen"
    code = main(["--checkpoint", str(ckpt), "--max-params", "1e12", "--out", str(out), "--repeats", "1",
                 "--seq-len", "8", "--random", "0", "--generations", "0"])
    assert code == 0 and (out / "model" / "subnet.json").is_file()


def test_select_reads_a_checkpoint_with_the_flat_keys_of_before_the_argument_groups(trained_checkpoint, tmp_path):
    """lora_r, search_space, stage_epochs, ... at the top of the hyperparameters (no groups) still mean what they
    meant: the adapters load at their rank and the candidates lie in the space the run trained."""
    saved = torch.load(trained_checkpoint, weights_only=True, map_location="cpu")
    hp = saved["hyper_parameters"]
    saved["hyper_parameters"] = {"model_name_or_path": hp["model_name_or_path"], "task": hp["task"], "lora_r": 4,
                                 "stage_epochs": [0, 0, 1], "search_space": hp["sampling"]["search_space"],
                                 "palette": ["max", "min"], "measure_latency": False, "export": False, "beta": 0.1}
    ckpt = tmp_path / "flat.ckpt"
    torch.save(saved, ckpt)
    out = tmp_path / "chosen"
    code = main(["--checkpoint", str(ckpt), "--max-params", "1e12", "--out", str(out), "--repeats", "1",
                 "--seq-len", "8", "--random", "2", "--generations", "0"])
    assert code == 0
    rows = json.loads((out / "search.json").read_text())["candidates"]
    assert all(SubnetConfig.from_name(r["name"]).hidden_size in (32, 16) for r in rows)
