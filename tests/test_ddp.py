"""DDP trains as one process does on the same global batch.

Two CPU processes (gloo, Lightning's ``ddp`` strategy, launched as `python script.py`) with batch B
each must end where one process with batch 2B ends: DDP's DistributedSampler shards the same seeded
permutation the single process walks (rank r takes every second index), so step k of the two ranks
together sees the single process's step k, and the gradients are averaged. Tiny random models built
from configs, dropout off (its masks differ between the ranks and the single process), a few steps.
"""

from __future__ import annotations

from kdlora.kd.args import TeacherTargetsArgs
from kdlora.training.args import ExportArgs, LoRAArgs, OptimizerArgs
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from conftest import make_tiny_model_dir

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
BATCH = 4  # per DDP rank; the single process takes 2 * BATCH

SCRIPT = r"""
import json, sys
sys.path[:0] = [{repo!r}, {tests!r}]
from test_ddp import fit

if __name__ == "__main__":
    fit({kind!r}, json.loads({dirs!r}), devices=2, out={out!r})
"""


class LossRecord(L.Callback):
    """Each step's training loss, averaged over the ranks (each rank's is the mean over its half-batch)."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = trainer.callback_metrics["train/loss"].detach().float()
        self.losses.append(float(trainer.strategy.reduce(loss, reduce_op="mean")))


def build(kind: str, dirs: dict[str, str], batch_size: int):
    """(module, data module, trainer arguments) of one case."""
    from kdlora.data.glue import GLUEDataModule
    from kdlora.kd import KDLoRAStudent, Teacher
    from kdlora.mlfs import SuperTransformer

    data = dict(data_dir=dirs["glue"], batch_size=batch_size, max_seq_length=32, cache_dir=dirs["cache"])
    if kind == "teacher":
        module = Teacher(dirs["teacher"], "sst2", finetune="full", optimizer=OptimizerArgs(learning_rate=1e-3),
                         export=ExportArgs(enabled=False))
        return module, GLUEDataModule("sst2", dirs["teacher"], **data), dict(max_epochs=1, limit_train_batches=4)
    if kind == "student":  # cached teacher targets: rank 0 computes them, the other rank waits and reads
        module = KDLoRAStudent(dirs["student"], dirs["teacher"], "sst2", lora=LoRAArgs(dropout=0.0),
                               teacher_targets=TeacherTargetsArgs(mode="cached", cache_dir=dirs["targets"]),
                               optimizer=OptimizerArgs(learning_rate=1e-2), export=ExportArgs(enabled=False))
        return module, GLUEDataModule("sst2", dirs["student"], **data), dict(max_epochs=1, limit_train_batches=4)
    if kind == "supernet":  # one epoch per stage: the maxnet, then sampled subnets (the same on every rank)
        # beta 0: the feature loss is a mean over each rank's own tokens, so under DDP the ranks' halves weigh
        # alike whatever their token counts, and two processes differ from one (by 4e-3 here with beta 0.1).
        module = SuperTransformer(dirs["teacher"], "mrpc", stages={"epochs": [1, 1, 1]}, sampling={"num_subnets": 2}, evaluation={"measure_latency": False, "members": ["max", "min"]}, export={"enabled": False}, distillation={"feature_weight": 0.0})
        return module, GLUEDataModule("mrpc", dirs["teacher"], **data), dict(max_epochs=3, limit_train_batches=2)
    raise ValueError(kind)


def fit(kind: str, dirs: dict[str, str], devices: int, out: str) -> None:
    """Train one case on `devices` CPU processes (2 * BATCH rows per step in all); rank 0 saves the
    trained weights and the step losses to out/<kind>-<devices>.pt."""
    L.seed_everything(1)
    module, dm, limits = build(kind, dirs, 2 * BATCH // devices)
    record = LossRecord()
    strategy = "auto" if devices == 1 else ("ddp_find_unused_parameters_true" if kind == "supernet" else "ddp")
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, limit_val_batches=0, num_sanity_val_steps=0,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=out, callbacks=[record], **limits)
    trainer.fit(module, dm)
    if trainer.is_global_zero:
        state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
        torch.save({"state": state, "losses": record.losses, "steps": trainer.global_step}, Path(out) / f"{kind}-{devices}.pt")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, small_glue_dir) -> dict[str, str]:
    """A tiny 4-layer BERT (teacher, supernet base) and a 2-layer one (student), both without dropout."""
    root = tmp_path_factory.mktemp("ddp_models")
    out = {"glue": str(small_glue_dir)}
    for name, layers in (("teacher", 4), ("student", 2)):
        path = make_tiny_model_dir(root / name, "bert", layers=layers, seed=layers)
        config = json.loads((path / "config.json").read_text())
        config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        (path / "config.json").write_text(json.dumps(config))
        out[name] = str(path)
    return out


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].is_floating_point())


@pytest.mark.parametrize("kind", ["teacher", pytest.param("student", marks=pytest.mark.slow),
                                  pytest.param("supernet", marks=pytest.mark.slow)])
def test_two_ddp_processes_train_as_one_process_on_the_same_global_batch(kind, dirs, tmp_path, monkeypatch):
    case = {**dirs, "cache": str(tmp_path / "cache"), "targets": str(tmp_path / "targets")}
    script = tmp_path / "ddp_fit.py"
    script.write_text(SCRIPT.format(repo=str(REPO), tests=str(TESTS), kind=kind, dirs=json.dumps(case), out=str(tmp_path)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    if kind == "student":  # the cache the rank-0 barrier guards was written once, and read by both ranks
        assert len(list(Path(case["targets"]).glob("teacher-*.pt"))) == 1

    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)  # fit seeds this process: undo it afterwards
    single_case = {**case, "cache": str(tmp_path / "cache-single"), "targets": str(tmp_path / "targets-single")}
    fit(kind, single_case, devices=1, out=str(tmp_path))
    ddp, single = (torch.load(tmp_path / f"{kind}-{n}.pt", weights_only=True) for n in (2, 1))
    assert ddp["steps"] == single["steps"] == {"teacher": 4, "student": 4, "supernet": 6}[kind]
    assert ddp["losses"] == pytest.approx(single["losses"], rel=1e-4, abs=1e-6)
    initial = build(kind, case, BATCH)[0].state_dict()
    moved = max_difference(single["state"], {k: v.detach() for k, v in initial.items()})
    assert moved > 1e-3  # training changed the weights, so agreeing below is not agreeing on nothing
    diff = max_difference(ddp["state"], single["state"])
    assert diff < 1e-4, f"DDP weights differ from the single process's by up to {diff:.3g} (training moved them {moved:.3g})"
