"""SuperTransformer (MLFS): gradient scaling, one step per batch, stage freezing, resume, palette, DDP, CLI."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger

from conftest import write_stsb_dir
from kdlora.data.glue import GLUEDataModule
from kdlora.elastic.config import SubnetConfig
from kdlora.mlfs.glue import SuperTransformer

REPO = Path(__file__).resolve().parents[1]
FIXED_SUBNET = SubnetConfig(16, 2, 32, (0, 1, 2, 3))
# A search space whose only stage-1 subnet is FIXED_SUBNET (and the only depth is 4).
FIXED_SPACE = {"hidden_sizes": [16], "num_heads": [2], "intermediate_sizes": [32], "depths": [4]}


@pytest.fixture(scope="module")
def tiny_bert_nodropout(tiny_bert_dir, tmp_path_factory) -> Path:
    """The tiny BERT with every dropout off, so two forwards of the same batch are identical."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path_factory.mktemp("tiny_bert_nodropout")
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_bert_dir).save_pretrained(out)
    return out


def datamodule(model_dir, glue_dir, batch_size=8) -> GLUEDataModule:
    return GLUEDataModule("mrpc", str(model_dir), data_dir=str(glue_dir), max_seq_length=32, batch_size=batch_size,
                          cache_dir=str(Path(glue_dir).parent / "cache"))


def trainer(tmp_path, **kw) -> L.Trainer:
    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, default_root_dir=str(tmp_path), num_sanity_val_steps=0)
    return L.Trainer(**{**defaults, **kw})


def supernet(model_dir, **kw) -> SuperTransformer:
    """A SuperTransformer on MRPC; the argument groups given as dicts of fields, merged into these defaults."""
    args = dict(model_name_or_path=str(model_dir), task="mrpc", lora={"r": 8}, evaluation={"measure_latency": False},
                export={"enabled": False}, sampling={"sampler_seed": 0})
    for key, value in kw.items():
        args[key] = {**args[key], **value} if isinstance(value, dict) and isinstance(args.get(key), dict) else value
    return SuperTransformer(**args)


class Recorder(L.Callback):
    """Records batches, pre-step states, gradients, optimizer steps and sampled subnets."""

    def __init__(self):
        self.states, self.batches, self.grads, self.sampled, self.epoch_end_states = [], [], [], [], []
        self.steps = 0

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.states.append(copy.deepcopy(module.state_dict()))
        self.batches.append({k: v.clone() for k, v in batch.items()})

    def on_before_optimizer_step(self, trainer, module, optimizer):
        self.steps += 1
        self.grads.append({n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None})

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.sampled.append((module.global_step, module.stage, [c.name for c in module.mlfs_step.last_sampled]))

    def on_train_epoch_end(self, trainer, module):
        self.epoch_end_states.append({k: v.clone() for k, v in module.state_dict().items()})


def test_loss_helpers_match_hand_computation():
    from kdlora.losses import projected_feature_loss, subnet_loss

    torch.manual_seed(0)
    hs, hm, U = torch.randn(2, 3, 4), torch.randn(2, 3, 6), torch.randn(5, 6)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    # The paper's squared L2 norm over the 5 projected dimensions, averaged over the 3 real tokens.
    expected = 0.0
    for b, t in [(0, 0), (0, 1), (1, 0)]:
        for k in range(5):
            d = sum(U[k, i] * hs[b, t, i] for i in range(4)) - sum(U[k, i] * hm[b, t, i] for i in range(6))
            expected += float(d) ** 2 / 3
    assert projected_feature_loss(hs, hm, U, mask).item() == pytest.approx(expected, rel=1e-5)
    # "relative": each token's squared error over the squared norm of its projected maxnet feature.
    relative = 0.0
    for b, t in [(0, 0), (0, 1), (1, 0)]:
        target = [float(sum(U[k, i] * hm[b, t, i] for i in range(6))) for k in range(5)]
        err = sum((float(sum(U[k, i] * hs[b, t, i] for i in range(4))) - target[k]) ** 2 for k in range(5))
        relative += err / (sum(x * x for x in target) + 1e-6) / 3
    assert projected_feature_loss(hs, hm, U, mask, "relative").item() == pytest.approx(relative, rel=1e-5)
    with pytest.raises(ValueError, match="normalization"):
        projected_feature_loss(hs, hm, U, mask, "l1")
    z, z1, y = torch.tensor([[1.0, -1.0], [0.5, 0.2]]), torch.tensor([[2.0, 0.0], [-1.0, 1.0]]), torch.tensor([0, 1])
    p1, pj = z1.softmax(-1), z.softmax(-1)
    kl = (p1 * (p1.log() - pj.log())).sum(-1).mean()
    ce = -(pj.log()[0, 0] + pj.log()[1, 1]) / 2
    loss, _ = subnet_loss(z, z1, y, False, 0.9, 1.0, [torch.tensor(2.0)], 0.1)
    assert torch.allclose(loss, 0.1 * ce + 0.9 * (kl + 0.1 * 2.0))


def test_feature_projections_do_not_collapse(tiny_bert_dir):
    """Feature distillation at small scale: random maxnet features, subnets = sliced maxnet features + noise
    (widths 32/24/16 of H 32), d_low 16, AdamW lr 1e-3 on the real loss for 300 steps. A free U shrinks
    towards 0 (the loss is minimised by U -> 0: feature distillation switches itself off); the
    supernet's orthonormal U keeps ‖U‖_F = √d_low and the loss of the differing subnets stays up."""
    from kdlora.losses import projected_feature_loss

    module = supernet(tiny_bert_dir, distillation={"feature_dim": 16})
    projection = module.projections[str(module.mlfs_step.distill_layers[0])]
    assert module.encoder.max_config.hidden_size == 32 and projection.weight.shape == (16, 32)
    opt = torch.optim.AdamW(projection.parameters(), lr=1e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    mask = torch.ones(4, 8)
    mask[:, 6:] = 0
    losses, norms = [], [float(projection.weight.detach().norm())]
    for _ in range(300):
        h_max = torch.randn(4, 8, 32, generator=gen)
        U = projection.weight
        loss = sum(projected_feature_loss(h_max[..., :h] + torch.randn(4, 8, h, generator=gen), h_max, U, mask)
                   for h in (32, 24, 16))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
        norms.append(float(projection.weight.detach().norm()))
    assert norms[0] == pytest.approx(4.0, abs=1e-4)
    assert min(norms) == pytest.approx(4.0, abs=1e-3) and max(norms) == pytest.approx(4.0, abs=1e-3)
    assert sum(losses[-20:]) / 20 > 0.5 * sum(losses[:20]) / 20


def test_subnet_gradient_is_scaled_by_parameter_ratio(tiny_bert_nodropout, small_glue_dir, tmp_path):
    """One real training step; its gradient = [∇L_1 + (n_1/n_j)^γ ∇L_j] / 2, recomputed independently."""
    kw = dict(stages={"epochs": [0, 1, 0]}, sampling={"num_subnets": 1, "sandwich": True, "search_space": FIXED_SPACE}, distillation={"gamma": 2.0}, optimizer={"gradient_clip": 0.0}, lora={"dropout": 0.0})
    rec = Recorder()
    module = supernet(tiny_bert_nodropout, **kw)
    trainer(tmp_path, max_steps=1, limit_val_batches=0, callbacks=[rec]).fit(module, datamodule(tiny_bert_nodropout, small_glue_dir))
    assert rec.sampled[0][2] == [FIXED_SUBNET.name]

    ref = supernet(tiny_bert_nodropout, **kw)
    ref.load_state_dict(rec.states[0])
    ref.schedule.enter(1, ref.projections, train_projections=True)
    enc, batch = ref.encoder, rec.batches[0]
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    params = {n: p for n, p in ref.named_parameters() if p.requires_grad}
    # Trainable parameters read, by hand: per layer Q,K,V: A 8xh + B wx8; FFN in: A 8xh + B fx8; out: A 8xf + B hx8.
    def n_trainable(h, w, f):
        return 4 * (3 * (8 * h + w * 8) + (8 * h + f * 8) + (8 * f + h * 8))
    scale = (n_trainable(32, 32, 64) / n_trainable(16, 16, 32)) ** 2
    assert scale == 4.0 and module.mlfs_step.gradient_scale(FIXED_SUBNET, module.stage) == scale

    enc.reset_super_network()
    out = enc(**inputs, output_hidden_states=True)
    g_max = torch.autograd.grad(F.cross_entropy(out.logits, batch["labels"]), list(params.values()), allow_unused=True)
    enc.set_sub_network(FIXED_SUBNET)
    sub = enc(**inputs, output_hidden_states=True)
    t, s = out.logits.detach().log_softmax(-1), sub.logits.log_softmax(-1)
    kl = (t.exp() * (t - s)).sum(-1).mean()
    m = batch["attention_mask"].float()
    feats = 0.0
    for layer in range(4):  # the smallest subnet keeps every layer here
        U = ref.projections[str(layer)].weight  # orthonormal-parametrised: grads reach its `original`
        d = ((sub.hidden_states[layer] @ U[:, :16].T - out.hidden_states[layer].detach() @ U.detach().T) ** 2).sum(-1)
        feats = feats + (d * m).sum() / m.sum()
    loss_j = 0.1 * F.cross_entropy(sub.logits, batch["labels"]) + 0.9 * (kl + 0.1 * feats)
    g_sub = torch.autograd.grad(loss_j, list(params.values()), allow_unused=True)

    got = rec.grads[0]
    checked = 0
    for (name, _), gm, gs in zip(params.items(), g_max, g_sub):
        gm = torch.zeros_like(params[name]) if gm is None else gm
        gs = torch.zeros_like(params[name]) if gs is None else gs
        expected = (gm + scale * gs) / 2
        assert torch.allclose(got.get(name, torch.zeros_like(expected)), expected, rtol=1e-4, atol=1e-7), name
        checked += int(gs.abs().sum() > 0)
    assert checked > 10  # subnet gradients actually flowed (stage-1 B and the projections)
    projection_grads = [g for n, g in got.items() if n.startswith("projections.")]
    assert len(projection_grads) == 4 and all(g.abs().sum() > 0 for g in projection_grads)
    assert set(got) <= set(params)  # nothing outside stage 1 received a gradient


def test_one_step_per_batch_stages_freeze_palette_and_export(tiny_bert_dir, small_glue_dir, tmp_path):
    rec = Recorder()
    module = supernet(tiny_bert_dir, stages={"epochs": [1, 1, 1]}, sampling={"num_subnets": 2}, export={"enabled": True}, evaluation={"measure_latency": True, "latency_seq_len": 16})
    logger = TensorBoardLogger(str(tmp_path), name="mlfs")
    fit = trainer(tmp_path, max_epochs=3, limit_train_batches=3, limit_val_batches=1, callbacks=[rec], logger=logger)
    fit.fit(module, datamodule(tiny_bert_dir, small_glue_dir))

    # Exactly one optimizer step per batch, though K+1 = 3 backward passes run per batch.
    assert rec.steps == 9 and fit.global_step == 9
    assert [s for _, s, _ in rec.sampled] == [0] * 3 + [1] * 3 + [2] * 3
    for _, stage, names in rec.sampled:
        cfgs = [SubnetConfig.from_name(n) for n in names]
        assert len(cfgs) == (0 if stage == 0 else 2)
        if stage == 1:
            assert all(c.layers == (0, 1, 2, 3) for c in cfgs)

    def adapters(state, stage):
        return {k: v for k, v in state.items() if k.startswith("encoder.lora.") and k.endswith(f".{stage}")}

    start, (e0, e1, e2) = rec.states[0], rec.epoch_end_states
    for stage, trained_in in ((0, e0), (1, e1), (2, e2)):
        before = start if stage == 0 else rec.epoch_end_states[stage - 1]
        changed = [k for k, v in adapters(trained_in, stage).items() if not torch.equal(v, before[k])]
        assert any(".B." in k for k in changed), f"stage {stage} adapters did not train"
        for later in rec.epoch_end_states[stage:]:  # frozen ever after: bit-identical
            assert all(torch.equal(later[k], v) for k, v in adapters(trained_in, stage).items())
        # ...and untouched before their stage (B stays zero, so earlier stages ran the same function)
        assert all(torch.equal(before[k], start[k]) for k in adapters(start, stage))
    base = [k for k in start if k.startswith("encoder.model.")]
    assert all(torch.equal(e2[k], start[k]) for k in base)  # pretrained weights never change

    # Palette validation: every member logged; val/score is the maxnet's.
    metrics = fit.callback_metrics
    for name in module.palette_run.names:
        for key in ("accuracy", "f1", "score", "params"):
            assert f"val/{name}/{key}" in metrics
    maxname = module.encoder.max_config.name
    assert float(metrics["val/score"]) == pytest.approx(float(metrics[f"val/{maxname}/score"]))
    assert float(metrics[f"val/{maxname}/params"]) > float(metrics[f"val/{module.palette_run.names[-1]}/params"])

    # Report + export of every member, loadable by plain transformers and equal to the supernet run as it.
    table = json.loads((Path(logger.log_dir) / "palette.json").read_text())
    assert [r["name"] for r in table] == module.palette_run.names and all(r["latency_ms"] > 0 for r in table)
    # Each member's trained_steps: the steps whose sampled subnets (recorded above) hold its exact slice; the maxnet every step.
    counted = {n: sum(n in names for _, _, names in rec.sampled) for n in module.palette_run.names}
    counted[maxname] = 9
    assert module.palette_run.trained_steps == counted and {r["name"]: r["trained_steps"] for r in table} == counted
    assert counted[module.palette_run.names[-1]] == 3  # the minnet: every stage-2 step (the sandwich rule)
    assert (Path(logger.log_dir) / "palette.png").stat().st_size > 1000
    from transformers import AutoModelForSequenceClassification

    export = Path(logger.log_dir) / "export"
    small = SubnetConfig.from_name(module.palette_run.names[-1])
    plain = AutoModelForSequenceClassification.from_pretrained(export / small.name).eval()
    batch = rec.batches[0]
    module.encoder.eval().set_sub_network(small)
    with torch.no_grad():
        want = module.encoder(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]).logits
        got = plain(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], token_type_ids=batch["token_type_ids"]).logits
    assert torch.allclose(got, want, atol=1e-5)


def test_resume_restores_stage_and_samples_like_an_uninterrupted_run(tiny_bert_dir, small_glue_dir, tmp_path):
    kw = dict(stages={"epochs": [1, 1, 0]}, sampling={"num_subnets": 2})
    first = trainer(tmp_path, max_epochs=1, limit_train_batches=2, limit_val_batches=0)
    first.fit(supernet(tiny_bert_dir, **kw), datamodule(tiny_bert_dir, small_glue_dir))
    ckpt = tmp_path / "epoch0.ckpt"
    first.save_checkpoint(ckpt)
    resumed = Recorder()
    module = supernet(tiny_bert_dir, **kw)
    trainer(tmp_path, max_epochs=2, limit_train_batches=2, limit_val_batches=0, callbacks=[resumed]).fit(
        module, datamodule(tiny_bert_dir, small_glue_dir), ckpt_path=str(ckpt))
    # Uninterrupted, steps 2 and 3 are stage 1 (epoch 1): a fresh sampler says what they sample.
    reference = supernet(tiny_bert_dir, **kw).sampler
    assert resumed.sampled == [(s + 1, 1, [c.name for c in reference.sample(1, s)]) for s in (2, 3)]
    assert module.stage == 1 and module.global_step == 4
    # The steps each member trained carry over: the maxnet all 4, the stage-1 smallest the 2 of stage 1.
    counted = {n: sum(n in names for _, _, names in resumed.sampled) for n in module.palette_run.names}
    counted[module.encoder.max_config.name] = 4
    assert module.palette_run.trained_steps == counted


def test_a_checkpoint_with_free_projections_is_refused_clearly(tiny_bert_dir, small_glue_dir, tmp_path):
    first, module = trainer(tmp_path, max_steps=1, limit_val_batches=0), supernet(tiny_bert_dir, stages={"epochs": [0, 1, 0]})
    first.fit(module, datamodule(tiny_bert_dir, small_glue_dir))
    ckpt = tmp_path / "new.ckpt"
    first.save_checkpoint(ckpt)
    state = torch.load(ckpt, weights_only=True)
    layer = module.mlfs_step.distill_layers[0]
    assert f"projections.{layer}.parametrizations.weight.original" in state["state_dict"]
    # What the earlier versions wrote: one free [d_low, H] matrix per distilled layer.
    state["state_dict"] = {k: v for k, v in state["state_dict"].items() if not k.startswith("projections.")}
    state["state_dict"].update({f"projections.{l}": torch.randn(128, 32) for l in module.mlfs_step.distill_layers})
    torch.save(state, tmp_path / "old.ckpt")
    with pytest.raises(ValueError, match="free feature projections"):
        trainer(tmp_path, max_steps=2, limit_val_batches=0).fit(
            supernet(tiny_bert_dir, stages={"epochs": [0, 1, 0]}), datamodule(tiny_bert_dir, small_glue_dir), ckpt_path=str(tmp_path / "old.ckpt"))


def test_bad_arguments_fail_early(tiny_bert_dir):
    with pytest.raises(ValueError, match="stages.epochs"):
        supernet(tiny_bert_dir, stages={"epochs": [1, 1]})
    with pytest.raises(ValueError, match="distill_weight must be in"):
        supernet(tiny_bert_dir, distillation={"distill_weight": 1.5})
    with pytest.raises(ValueError, match="unknown keys"):
        supernet(tiny_bert_dir, sampling={"search_space": {"width": [8]}})


def test_base_pretrained_trains_a_new_head_and_refuses_a_finetuned_checkpoint(tiny_bert_dir, tmp_path, caplog):
    from transformers import AutoModel, AutoTokenizer

    pretrained = tmp_path / "pretrained"  # the encoder alone, as a hub checkpoint such as bert-base-uncased
    AutoModel.from_pretrained(tiny_bert_dir).save_pretrained(pretrained)
    AutoTokenizer.from_pretrained(tiny_bert_dir).save_pretrained(pretrained)
    module = supernet(pretrained, base="pretrained", train_head=False)
    assert module.hparams.base == "pretrained" and "classifier.weight" in module.newly_initialised
    # Stage 0 (the LoRA fine-tuning of the pretrained model) trains the new head with its adapters.
    assert {"model.classifier.weight", "model.classifier.bias"} <= module.schedule.parameter_names[0]
    with pytest.raises(ValueError, match=r"base='pretrained' but .* already has a trained classifier head for mrpc"):
        supernet(tiny_bert_dir, base="pretrained")
    with pytest.raises(ValueError, match="base must be 'pretrained' or 'finetuned', got 'fft'"):
        supernet(tiny_bert_dir, base="fft")
    with caplog.at_level("WARNING", logger="kdlora.mlfs.glue"):
        finetuned = supernet(pretrained, base="finetuned")
    assert "base='finetuned' but" in caplog.text and "classifier.weight" in caplog.text
    assert {"model.classifier.weight", "model.classifier.bias"} <= finetuned.schedule.parameter_names[0]


def test_test_metrics_keep_the_dev_suffixes_when_validation_is_a_holdout(tiny_bert_dir):
    from types import SimpleNamespace

    module = supernet(tiny_bert_dir, task="mnli")
    module._trainer = SimpleNamespace(datamodule=GLUEDataModule("mnli", str(tiny_bert_dir), holdout_fraction=0.1))  # reads nothing yet
    assert module._eval_suffixes("val") == [""]  # the one held-out loader
    assert module._eval_suffixes("test") == ["_m", "_mm"]  # dev: matched and mismatched


def test_holdout_selection_reports_the_selected_and_the_final_palette_on_dev(tiny_bert_dir, small_glue_dir, tmp_path):
    """Checkpoint selection on held-out train; both palettes at fit end are the dev scores that
    `trainer.test` gives for those weights, and each row says which weights and split it is."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    class KeepFinal(L.Callback):
        def on_train_end(self, trainer, module):
            self.state = copy.deepcopy(module.state_dict())

    def dm():
        return GLUEDataModule("mrpc", str(tiny_bert_dir), data_dir=str(small_glue_dir), max_seq_length=32, batch_size=8,
                              holdout_fraction=0.25, cache_dir=str(tmp_path / "cache"))

    module = supernet(tiny_bert_dir, stages={"epochs": [1, 1, 1]}, sampling={"num_subnets": 1}, evaluation={"members": ["max", "min"]}, optimizer={"learning_rate": 1e-2})
    logger = TensorBoardLogger(str(tmp_path), name="mlfs")
    best, keep = ModelCheckpoint(monitor="val/palette_score", mode="max"), KeepFinal()
    fit = trainer(tmp_path, max_epochs=3, limit_train_batches=3, logger=logger, enable_checkpointing=True, callbacks=[best, keep])
    fit.fit(module, dm())
    run = Path(logger.log_dir)
    selected = json.loads((run / "palette.json").read_text())
    final = json.loads((run / "palette_final.json").read_text())
    saved = torch.load(best.best_model_path, weights_only=True)
    assert [r["name"] for r in selected] == [r["name"] for r in final] == module.palette_run.names
    for r in selected:
        assert (r["base"], r["split"], r["selected_on"]) == ("finetuned", "dev", "holdout")
        assert (r["weights"], r["epoch"], r["step"]) == (os.path.relpath(best.best_model_path, run), saved["epoch"], saved["global_step"])
        assert r["selection_palette_score"] == pytest.approx(float(best.best_model_score))
    assert all((r["weights"], r["stage"], r["step"], r["split"]) == ("end of fit", 2, 9, "dev") for r in final)
    assert "measured on dev" in (run / "palette_final.md").read_text() and "(finetuned base)" in (run / "palette.md").read_text()

    for name, state, rows in (("selected", saved["state_dict"], selected), ("final", keep.state, final)):
        module.load_state_dict(state)
        tester = trainer(tmp_path, logger=TensorBoardLogger(str(tmp_path), name=f"test-{name}"))
        tester.test(module, datamodule=dm())
        for r in rows:
            assert float(tester.callback_metrics[f"test/{r['name']}/score"]) == pytest.approx(r["score"]), (name, r["name"])
        tested = json.loads((Path(tester.logger.log_dir) / "palette_test.json").read_text())  # `train.py test` writes it
        assert [(t["name"], t["split"]) for t in tested] == [(r["name"], "dev") for r in rows]
        assert [t["score"] for t in tested] == pytest.approx([r["score"] for r in rows])


DDP_SCRIPT = r"""
import json, os, sys
import lightning as L
sys.path.insert(0, {repo!r})
from kdlora.data import GLUEDataModule
from kdlora.mlfs.glue import SuperTransformer

class Record(L.Callback):
    def __init__(self): self.rows = []
    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.rows.append([module.global_step, module.stage, [c.name for c in module.mlfs_step.last_sampled]])
    def on_fit_end(self, trainer, module):
        state = {{k: float(v.double().sum()) for k, v in module.state_dict().items() if ".lora." in k}}
        with open(os.path.join({out!r}, f"rank{{trainer.global_rank}}.json"), "w") as f:
            json.dump({{"sampled": self.rows, "adapters": state, "steps": trainer.global_step}}, f)

if __name__ == "__main__":
    L.seed_everything(1)
    dm = GLUEDataModule("mrpc", {model!r}, data_dir={glue!r}, max_seq_length=32, batch_size=4, cache_dir={cache!r})
    module = SuperTransformer({model!r}, "mrpc", stages={{"epochs": [1, 1, 1]}}, sampling={{"num_subnets": 2, "per_layer": True}},
                              evaluation={{"measure_latency": False}}, export={{"enabled": False}})
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_find_unused_parameters_true", max_epochs=3,
                        limit_train_batches=2, limit_val_batches=1, num_sanity_val_steps=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir={out!r}, callbacks=[Record()])
    trainer.fit(module, dm)
"""


@pytest.mark.slow  # two DDP processes over three stages: ~45 s on a busy 2-core machine
def test_ddp_two_processes_sample_identical_subnets(tiny_bert_dir, small_glue_dir, tmp_path):
    script = tmp_path / "ddp_fit.py"
    script.write_text(DDP_SCRIPT.format(repo=str(REPO), out=str(tmp_path), model=str(tiny_bert_dir), glue=str(small_glue_dir),
                                        cache=str(tmp_path / "cache")))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["steps"] == r1["steps"] == 6
    assert r0["sampled"] == r1["sampled"] and [row[1] for row in r0["sampled"]] == [0, 0, 1, 1, 2, 2]
    assert all(len(row[2]) == 2 for row in r0["sampled"][2:])
    # Gradients were all-reduced: both ranks hold the same adapters though they saw different batches.
    assert r0["adapters"].keys() == r1["adapters"].keys()
    for k in r0["adapters"]:
        assert r0["adapters"][k] == pytest.approx(r1["adapters"][k], rel=1e-5, abs=1e-6), k


@pytest.mark.slow  # train.py with the demo supernet config (the demo runs it in full): ~55 s on a busy 2-core machine
def test_cli_fast_dev_run(tiny_bert_dir, small_glue_dir, tmp_path):
    config = tmp_path / "supernet.yaml"
    text = (REPO / "configs" / "demo" / "supernet.yaml").read_text()
    assert "runs/demo/{task}/fft/export" in text and "kdlora/assets/glue" in text
    config.write_text(text.replace("runs/demo/{task}/fft/export", str(tiny_bert_dir)).replace("kdlora/assets/glue", str(small_glue_dir)))
    env = {**os.environ, "PYTHONPATH": str(REPO), "KDLORA_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, str(REPO / "train.py"), "fit", "--config", str(config), "--trainer.fast_dev_run=true",
           "--model.init_args.stages.epochs=[0, 0, 1]", "--data.max_seq_length=32", "--model.init_args.evaluation.latency_seq_len=16"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "palette report" in proc.stdout


@pytest.mark.parametrize("config_name, value, new_name", [("supernet", "0.9", "distillation.distill_weight"),
                                                          ("student", "0.5", "distillation.task_weight")])
def test_the_old_alpha_key_is_one_clear_error_naming_its_new_name(tiny_bert_dir, small_glue_dir, tmp_path, monkeypatch, capsys,
                                                                  config_name, value, new_name):
    """`alpha` weighed distillation in the supernet but the task in the student: never silently reinterpreted."""
    from kdlora.cli import cli_main

    config = tmp_path / "config.yaml"
    text = (REPO / "configs" / "demo" / f"{config_name}.yaml").read_text()
    config.write_text(text.replace("runs/demo/{task}/fft/export", str(tiny_bert_dir)).replace("kdlora/assets/glue", str(small_glue_dir)))
    monkeypatch.chdir(tmp_path)
    code = cli_main(["fit", "--config", str(config), f"--model.init_args.alpha={value}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err == [f"kdlora: error: model.init_args.alpha is now model.init_args.{new_name} (" + err[0].split("(", 1)[1]]
    assert "(the weight of " in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]


@pytest.mark.parametrize("old, new", [("beta", "distillation.feature_weight"), ("palette", "evaluation.members"),
                                      ("stage_epochs", "stages.epochs"), ("importance_reorder", "importance.reorder")])
def test_an_old_flat_mlfs_key_is_one_clear_error_naming_its_group(tiny_bert_dir, small_glue_dir, tmp_path, monkeypatch, capsys,
                                                                  old, new):
    """In a config file (the demo's, with the key put back flat) and on the command line: one line, nothing written."""
    import yaml

    from kdlora.cli import cli_main

    config = yaml.safe_load((REPO / "configs" / "demo" / "supernet.yaml").read_text())
    config["model"]["init_args"].update(model_name_or_path=str(tiny_bert_dir), **{old: [1, 1, 1] if old == "stage_epochs" else 0.1})
    config["data"]["data_dir"] = str(small_glue_dir)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    monkeypatch.chdir(tmp_path)
    for args in (["--config", "config.yaml"], ["--model", "kdlora.mlfs.SuperTransformer", f"--model.init_args.{old}", "1"]):
        assert cli_main(["fit", *args]) == 2
        assert capsys.readouterr().err.strip().splitlines() == [f"kdlora: error: model.init_args.{old} is now model.init_args.{new}"
                                                               + (" (the weight of the feature term inside a subnet's distillation terms)"
                                                                  if old == "beta" else "")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]


def test_new_regression_head_starts_at_the_mean_training_label(tiny_bert_dir, tmp_path):
    scores = [1.0, 2.5, 4.75, 0.5]
    glue = write_stsb_dir(tmp_path / "glue", scores)
    dm = GLUEDataModule("stsb", str(tiny_bert_dir), data_dir=str(glue), batch_size=4, cache_dir=str(tmp_path / "c"))
    module = supernet(tiny_bert_dir, task="stsb")  # the 2-label checkpoint gets a new 1-output head
    trainer(tmp_path, max_epochs=1, limit_train_batches=0, limit_val_batches=0).fit(module, dm)
    assert module.encoder._layout.classifier.bias.item() == pytest.approx(sum(scores) / len(scores))


@pytest.mark.parametrize("hidden", [False, True])
def test_importance_reorder_at_setup_permutes_weights_and_keeps_the_maxnet(tiny_bert_nodropout, small_glue_dir, tmp_path, hidden):
    rec = Recorder()
    kw = dict(stages={"epochs": [1, 0, 0]}, sampling={"num_subnets": 1})
    module = supernet(tiny_bert_nodropout, importance={"reorder": True, "hidden": hidden, "batches": 2}, **kw)
    trainer(tmp_path, max_epochs=1, limit_train_batches=1, limit_val_batches=0, callbacks=[rec]).fit(
        module, datamodule(tiny_bert_nodropout, small_glue_dir))
    original, reordered = supernet(tiny_bert_nodropout, **kw), supernet(tiny_bert_nodropout, **kw)
    reordered.load_state_dict(rec.states[0])  # as it was at the first step: reordered, not yet trained
    start, before = rec.states[0], original.state_dict()

    query = next(k for k in start if k.endswith("layer.0.attention.self.query.weight"))
    words = next(k for k in start if k.endswith("word_embeddings.weight"))
    assert not torch.equal(start[query], before[query])  # heads were reordered...
    assert torch.equal(start[query].flatten().sort().values, before[query].flatten().sort().values)  # same entries
    if hidden:  # the residual stream was permuted: embedding columns moved, and with them Q's columns
        assert not torch.equal(start[words], before[words])
        assert torch.equal(start[words].sort(1).values, before[words].sort(1).values)
    else:
        assert torch.equal(start[query].sort(0).values, before[query].sort(0).values)  # rows moved whole
        assert torch.equal(start[words], before[words])
    batch = rec.batches[0]
    with torch.no_grad():
        want, got = original.eval().logits(batch), reordered.eval().logits(batch)
    assert torch.allclose(got, want, atol=1e-5)


def test_validate_from_checkpoint_evaluates_the_palette_asked_for(tiny_bert_dir, small_glue_dir, tmp_path):
    from kdlora.cli import main

    base = ["--model", "kdlora.mlfs.SuperTransformer", "--model.model_name_or_path", str(tiny_bert_dir),
            "--data.data_dir", str(small_glue_dir), "--data.cache_dir", str(tmp_path / "cache"), "--data.max_seq_length", "32",
            "--trainer.logger.class_path", "lightning.pytorch.loggers.TensorBoardLogger",
            "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"), "--trainer.enable_progress_bar", "false"]
    fitted = main(["fit", *base, "--model.evaluation.members", "[max]", "--model.stages.epochs", "[1, 0, 0]", "--model.export.enabled", "false",
                   "--model.evaluation.measure_latency", "false", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1",
                   "--trainer.limit_val_batches", "0"])
    ckpt = tmp_path / "supernet.ckpt"
    fitted.trainer.save_checkpoint(ckpt)
    validate = ["validate", *base, "--trainer.limit_val_batches", "1", "--ckpt_path", str(ckpt)]
    # Without a palette on the command line, the checkpoint's (trained) arguments hold: the maxnet alone.
    assert main(validate).model.palette_run.names == ["h32-a4-f64-l4"]
    # A palette asked for is evaluated on the restored weights; training arguments still come from the checkpoint.
    cli = main(validate + ["--model.evaluation.members", "[max, {hidden_size: 16, num_heads: 2, intermediate_size: 32, depth: 2}]",
                           "--model.stages.epochs", "[1, 1, 1]"])
    assert cli.model.palette_run.names == ["h32-a4-f64-l4", "h16-a2-f32-l0.3"]
    assert list(cli.model.hparams.stages["epochs"]) == [1, 0, 0]
    assert "val/h16-a2-f32-l0.3/score" in cli.trainer.callback_metrics


def _headless(model_dir, out: Path) -> Path:
    """The encoder of `model_dir` alone, as a pretrained hub checkpoint (no task head)."""
    from transformers import AutoModel, AutoTokenizer

    AutoModel.from_pretrained(model_dir).save_pretrained(out)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    return out


def test_pretrained_base_ranks_importance_on_the_stage0_maxnet(tiny_bert_nodropout, small_glue_dir, tmp_path):
    """A pretrained base's head is random before stage 0, so heads/FFN are ranked when stage 1 begins:
    the weights trained in stage 0 are permuted then (not at setup), and the maxnet's function is kept."""
    pretrained = _headless(tiny_bert_nodropout, tmp_path / "pretrained")
    rec = Recorder()
    kw = dict(base="pretrained", stages={"epochs": [1, 1, 0]}, sampling={"num_subnets": 1})
    module = supernet(pretrained, importance={"reorder": True, "batches": 2}, **kw)
    trainer(tmp_path, max_epochs=2, limit_train_batches=2, limit_val_batches=0, callbacks=[rec]).fit(
        module, datamodule(pretrained, small_glue_dir))
    query = next(k for k in rec.states[0] if k.endswith("layer.0.attention.self.query.weight"))
    fresh = supernet(pretrained, **kw).state_dict()
    assert torch.equal(rec.states[0][query], fresh[query])  # not reordered before stage 0
    end_of_stage0, start_of_stage1 = rec.epoch_end_states[0], rec.states[2]
    assert not torch.equal(start_of_stage1[query], end_of_stage0[query])  # reordered when stage 1 began
    assert torch.equal(start_of_stage1[query].sort(0).values, end_of_stage0[query].sort(0).values)  # rows moved whole
    before, after = supernet(pretrained, **kw), supernet(pretrained, **kw)
    before.load_state_dict(end_of_stage0)
    after.load_state_dict(start_of_stage1)
    batch = rec.batches[2]
    with torch.no_grad():  # the stage-0 adapters moved with their weights: the maxnet is the same function
        assert torch.allclose(after.eval().logits(batch), before.eval().logits(batch), atol=1e-5)


def test_smallest_subnet_loss_is_logged_as_computed_by_hand(tiny_bert_nodropout, small_glue_dir, tmp_path):
    from kdlora.losses import task_loss

    rec = Recorder()
    module = supernet(tiny_bert_nodropout, stages={"epochs": [0, 1, 0]}, sampling={"num_subnets": 2, "sandwich": True})
    fit = trainer(tmp_path, max_epochs=1, limit_train_batches=1, limit_val_batches=0, callbacks=[rec])
    fit.fit(module, datamodule(tiny_bert_nodropout, small_glue_dir))
    smallest = module.space.smallest(full_depth=True)  # stage 1: widths only
    assert smallest.name in rec.sampled[0][2]
    reference = supernet(tiny_bert_nodropout, stages={"epochs": [0, 1, 0]})
    reference.load_state_dict(rec.states[0])
    reference.encoder.set_sub_network(smallest)
    batch = rec.batches[0]
    with torch.no_grad():
        want = task_loss(reference.eval().logits(batch), batch["labels"], False)
    assert fit.callback_metrics["train/smallest_task"].item() == pytest.approx(want.item(), rel=1e-5)
    assert fit.callback_metrics["train/smallest_loss"].item() > 0


def test_stage_palettes_are_measured_on_dev_and_change_nothing(tiny_bert_nodropout, small_glue_dir, tmp_path):
    def run(root: Path, stage_palettes: bool) -> SuperTransformer:
        L.seed_everything(0)
        module = supernet(tiny_bert_nodropout, stages={"epochs": [1, 1, 1]}, sampling={"num_subnets": 1}, evaluation={"stage_palettes": stage_palettes, "members": ["max", "min"]})
        dm = GLUEDataModule("mrpc", str(tiny_bert_nodropout), data_dir=str(small_glue_dir), max_seq_length=32, batch_size=8,
                            holdout_fraction=0.25, cache_dir=str(small_glue_dir.parent / "cache"))
        trainer(root, max_epochs=3, limit_train_batches=2, logger=TensorBoardLogger(str(root), name="mlfs")).fit(module, dm)
        return module

    with_reports = run(tmp_path / "a", True)
    without = run(tmp_path / "b", False)
    run_dir = tmp_path / "a" / "mlfs" / "version_0"
    for stage in range(3):
        rows = json.loads((run_dir / f"palette_stage{stage}.json").read_text())
        assert [r["name"] for r in rows] == with_reports.palette_run.names
        assert all(r["split"] == "dev" and r["stage"] == stage and r["weights"] == f"end of stage {stage}" for r in rows)
    assert not list((tmp_path / "b" / "mlfs" / "version_0").glob("palette_stage*"))
    final = json.loads((run_dir / "palette_final.json").read_text())
    stage2 = json.loads((run_dir / "palette_stage2.json").read_text())
    assert [r["score"] for r in final] == pytest.approx([r["score"] for r in stage2])  # the same weights, the same dev
    # Measuring dev between stages draws no randomness and touches no training state.
    a, b = with_reports.state_dict(), without.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("head_stages", ["first", "all"])
def test_from_stage1_only_the_stage_adapters_train_and_the_head_only_if_asked(tiny_bert_dir, small_glue_dir, tmp_path, head_stages):
    """Eq. 7 / Algorithm 1: stage s learns only (A_s, B_s) (and the feature projections); the new head of a
    pretrained base trains in stage 0 and stays bit-identical after it, weight decay included, through a
    resume inside stage 1; head_stages="all" keeps it training."""
    pretrained = _headless(tiny_bert_dir, tmp_path / "pretrained")
    kw = dict(base="pretrained", stages={"epochs": [1, 2, 0], "head_stages": head_stages}, sampling={"num_subnets": 1}, optimizer={"learning_rate": 1e-2, "weight_decay": 0.5})
    rec = Recorder()
    module = supernet(pretrained, **kw)
    first = trainer(tmp_path, max_epochs=2, limit_train_batches=2, limit_val_batches=0, callbacks=[rec])
    first.fit(module, datamodule(pretrained, small_glue_dir))
    ckpt = tmp_path / "stage1.ckpt"
    first.save_checkpoint(ckpt)
    resumed = Recorder()
    module = supernet(pretrained, **kw)
    again = trainer(tmp_path, max_epochs=3, limit_train_batches=2, limit_val_batches=0, callbacks=[resumed])
    again.fit(module, datamodule(pretrained, small_glue_dir), ckpt_path=str(ckpt))
    assert module.stage == 1

    head_ids = {id(p) for m in module.encoder.head_modules() for p in m.parameters()}
    head = {n for n, p in module.named_parameters() if id(p) in head_ids}
    assert head and any("classifier" in n for n in head) and any("pooler" in n for n in head)
    start, end0 = rec.states[0], rec.epoch_end_states[0]
    assert any(not torch.equal(end0[k], start[k]) for k in head)  # the new head trains in stage 0
    stage1 = {f"encoder.{n}" for n in module.schedule.parameter_names[1]} - head
    for later in (rec.epoch_end_states[1], resumed.epoch_end_states[0]):
        changed = {k for k, v in later.items() if not torch.equal(v, end0[k])}
        assert any(".B." in k for k in changed & stage1)  # the stage's adapters train
        others = changed - stage1 - head
        assert all(k.startswith("projections.") for k in others), sorted(others)
        if head_stages == "first":
            assert not changed & head  # not even weight decay moved it
        else:
            assert changed & head
    in_optimizer = {id(p) for g in again.optimizers[0].param_groups for p in g["params"]}
    assert bool(in_optimizer & head_ids) == (head_stages == "all")
    with pytest.raises(ValueError, match="head_stages must be one of"):
        supernet(pretrained, base="pretrained", stages={"head_stages": "last"})
