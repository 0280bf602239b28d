"""Mixed precision (`bf16-mixed`, as the configs use) with the automatic and the manual optimisation paths.

On CPU Lightning runs bf16-mixed through `torch.autocast("cpu", bfloat16)`: the forward runs in bf16 while the
parameters (and the optimizer's updates) stay float32. The supernet's manual `training_step` does K+1
`manual_backward` calls and clips by hand, so it must be checked separately from the student's automatic one.
Each test runs the same first step in 32-true and bf16-mixed from identical weights and compares: the bf16
forward really ran in bf16, the gradient points the same way as the float32 one, and training stays finite.
"""

from __future__ import annotations

import copy
import platform
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import make_tiny_model_dir
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from kdlora.data.glue import GLUEDataModule
from kdlora.kd import KDLoRAStudent
from kdlora.kd.args import TeacherTargetsArgs
from kdlora.mlfs import SuperTransformer
from kdlora.training.args import ExportArgs, LoRAArgs


def no_dropout_copy(src, dst):
    model = AutoModelForSequenceClassification.from_pretrained(src, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model.save_pretrained(dst)
    AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    return dst


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("precision_models")
    teacher = make_tiny_model_dir(root / "teacher_raw", "bert", layers=4, seed=0)
    student = make_tiny_model_dir(root / "student_raw", "bert", layers=2, seed=1)
    return {"teacher": no_dropout_copy(teacher, root / "teacher"), "student": no_dropout_copy(student, root / "student")}


class FirstStep(L.Callback):
    """Records the logits' dtype in training forwards of `network` (the submodule that returns `.logits`),
    the first step's gradients and the start weights."""

    def __init__(self, network: str):
        self.network, self.logit_dtypes, self.grads, self.start, self.handles = network, [], None, None, []

    def on_train_start(self, trainer, module):
        self.start = {n: p.detach().clone() for n, p in module.named_parameters()}
        self.handles.append(module.get_submodule(self.network).register_forward_hook(
            lambda mod, args, kwargs, out: self.logit_dtypes.append(out.logits.dtype) if mod.training else None,
            with_kwargs=True))

    def on_before_optimizer_step(self, trainer, module, optimizer):
        if self.grads is None:
            self.grads = {n: p.grad.detach().float().clone() for n, p in module.named_parameters() if p.grad is not None}

    def on_train_end(self, trainer, module):
        for h in self.handles:
            h.remove()


def fit(module, dm, precision, tmp_path, steps=3):
    rec = FirstStep("encoder" if isinstance(module, SuperTransformer) else "model")
    L.Trainer(accelerator="cpu", devices=1, precision=precision, max_steps=steps, limit_val_batches=0, logger=False,
              enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
              default_root_dir=str(tmp_path), num_sanity_val_steps=0, callbacks=[rec]).fit(module, dm)
    return rec


def cosine(a: dict, b: dict) -> float:
    names = sorted(set(a) & set(b))
    x = torch.cat([a[n].flatten() for n in names])
    y = torch.cat([b[n].flatten() for n in names])
    return float(torch.nn.functional.cosine_similarity(x, y, dim=0))


def check_bf16_against_fp32(make_module, dm_factory, tmp_path):
    torch.manual_seed(0)
    reference = make_module()
    runs = {}
    for precision in ("32-true", "bf16-mixed"):
        module = copy.deepcopy(reference)
        torch.manual_seed(1)  # the same shuffled first batches in both runs
        runs[precision] = (module, fit(module, dm_factory(), precision, tmp_path / precision))
    (m32, r32), (m16, r16) = runs["32-true"], runs["bf16-mixed"]
    assert r32.logit_dtypes and set(r32.logit_dtypes) == {torch.float32}
    assert r16.logit_dtypes and set(r16.logit_dtypes) == {torch.bfloat16}, "bf16-mixed did not run the forward in bf16"
    assert set(r16.grads) == set(r32.grads) and len(r16.grads) > 0
    assert cosine(r16.grads, r32.grads) > 0.98  # the same update direction, up to bf16 rounding
    changed = 0
    for name, p in m16.named_parameters():
        assert p.dtype == torch.float32, f"{name} is {p.dtype}: bf16-mixed must keep float32 master weights"
        assert torch.isfinite(p).all(), name
        if p.requires_grad:
            changed += int(not torch.equal(p.detach(), r16.start[name]))
    assert changed > 0


def test_supernet_manual_optimisation_under_bf16_mixed(models, small_glue_dir, tmp_path):
    def make():
        return SuperTransformer(str(models["teacher"]), "mrpc", stages={"epochs": [0, 1, 0]}, sampling={"num_subnets": 2, "sampler_seed": 0, "search_space": {"hidden_sizes": [32, 16], "num_heads": [4, 2], "intermediate_sizes": [64, 32],
                                              "depths": [4]}}, lora={"dropout": 0.0}, evaluation={"measure_latency": False}, export={"enabled": False})

    def dm():
        return GLUEDataModule("mrpc", str(models["teacher"]), data_dir=str(small_glue_dir), batch_size=8, max_seq_length=32,
                              cache_dir=str(tmp_path / "tok"))

    check_bf16_against_fp32(make, dm, tmp_path)


def test_student_under_bf16_mixed(models, small_glue_dir, tmp_path):
    def make():
        return KDLoRAStudent(str(models["student"]), str(models["teacher"]), "sst2", lora=LoRAArgs(r=4, dropout=0.0),
                             teacher_targets=TeacherTargetsArgs(mode="online"), export=ExportArgs(enabled=False))

    def dm():
        return GLUEDataModule("sst2", str(models["teacher"]), data_dir=str(small_glue_dir), batch_size=8, max_seq_length=32,
                              cache_dir=str(tmp_path / "tok"))

    check_bf16_against_fp32(make, dm, tmp_path)


@pytest.mark.parametrize("native", [True, False])
def test_cli_keeps_bf16_where_it_is_native_and_else_runs_float32_saying_so_once(models, small_glue_dir, tmp_path, monkeypatch,
                                                                                 capsys, native):
    from kdlora import cli

    asked = []
    monkeypatch.setattr(cli, "bf16_supported", lambda accelerator="auto": asked.append(accelerator) or native)
    app = cli.main(["--model", "kdlora.kd.Teacher", "--model.model_name_or_path", str(models["teacher"]),
                    "--data.task", "mrpc", "--data.data_dir", str(small_glue_dir), "--data.cache_dir", str(tmp_path / "cache"),
                    "--trainer.accelerator", "cpu", "--trainer.precision", "bf16-mixed", "--trainer.logger", "false",
                    "--model.export.enabled", "false"], run=False)
    assert asked == ["cpu"]
    assert app.trainer.precision == ("bf16-mixed" if native else "32-true")
    lines = [line for line in capsys.readouterr().err.splitlines() if "trainer.precision" in line]
    assert lines == ([] if native else ["[kdlora] trainer.precision bf16-mixed -> 32-true: no native bf16 here (trainer.accelerator: cpu)"])


@pytest.mark.skipif(not (sys.platform.startswith("linux") and platform.machine() == "x86_64"), reason="reads x86 /proc/cpuinfo flags")
def test_bf16_support_on_cpu_is_the_cpus_bf16_instructions():
    from kdlora.cli import bf16_supported

    flags = set(next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")).split())
    assert bf16_supported("cpu") == bool({"avx512_bf16", "amx_tile"} & flags)
