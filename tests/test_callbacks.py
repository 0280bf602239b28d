"""Efficiency and results callbacks: numbers on CPU, written to the run's results.json."""

from __future__ import annotations

import gc
import json

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from transformers import AutoModelForSequenceClassification

from kdlora.data.glue import GLUEDataModule
from kdlora.eval.latency import latency_summary
from kdlora.io import update_results
from kdlora.kd import KDLoRAStudent, Teacher
from kdlora.training.args import ExportArgs, LoRAArgs
from kdlora.training.callbacks import (
    GLUEResults,
    InferenceLatency,
    ParameterCount,
    PeakMemory,
    _reset_cpu_peak_rss,
    cpu_peak_rss_bytes,
)


def test_latency_summary_statistics():
    s = latency_summary([0.004, 0.001, 0.003, 0.002], examples=20, num_runs=2)
    assert s["total_s"] == pytest.approx(0.010)
    assert s["per_run_s"] == pytest.approx(0.005)
    assert s["batch_mean_ms"] == pytest.approx(2.5)
    assert s["batch_p50_ms"] == pytest.approx(2.0) and s["batch_p90_ms"] == pytest.approx(4.0)
    assert s["examples_per_s"] == pytest.approx(40 / 0.010)
    assert s["num_batches"] == 2


def test_update_results_merges_nested_keys(tmp_path):
    path = tmp_path / "results.json"
    update_results(path, {"peak_memory": {"fit": {"a": 1}}, "x": 1})
    update_results(path, {"peak_memory": {"test": {"b": 2}}, "x": 3})
    assert json.loads(path.read_text()) == {"peak_memory": {"fit": {"a": 1}, "test": {"b": 2}}, "x": 3}


def _trainer(tmp_path, callbacks):
    return L.Trainer(max_epochs=1, limit_train_batches=2, accelerator="cpu", logger=CSVLogger(tmp_path, name="run"), callbacks=callbacks,
                     enable_progress_bar=False, enable_model_summary=False, limit_val_batches=2, num_sanity_val_steps=0,
                     enable_checkpointing=False)


def test_callbacks_report_numbers_for_a_teacher_on_cpu(tiny_bert_dir, small_glue_dir, tmp_path):
    dm = GLUEDataModule("mrpc", str(tiny_bert_dir), data_dir=str(small_glue_dir), batch_size=8, eval_batch_size=8,
                        max_seq_length=64, cache_dir=str(tmp_path / "tok"))
    model = Teacher(str(tiny_bert_dir), "mrpc", export=ExportArgs(enabled=False))
    callbacks = [GLUEResults(), PeakMemory(), InferenceLatency(num_runs=3, warmup_batches=1, max_batches=2), ParameterCount()]
    trainer = _trainer(tmp_path, callbacks)
    trainer.fit(model, datamodule=dm)
    trainer.test(model, datamodule=dm)

    results = json.loads((tmp_path / "run" / "version_0" / "results.json").read_text())
    reference = AutoModelForSequenceClassification.from_pretrained(str(tiny_bert_dir))
    n_params = sum(p.numel() for p in reference.parameters())
    assert results["parameters"]["total"] == n_params == results["parameters"]["trainable"]  # full fine-tuning
    assert results["run"]["module"] == "Teacher" and results["run"]["task"] == "mrpc"
    assert results["run"]["hparams"]["finetune"] == "full"
    # Where Linux lets a process reset its peak RSS, every stage measures its own peak.
    expected_scope = "stage" if _reset_cpu_peak_rss() else "process"
    for stage in ("fit", "test"):
        memory = results["peak_memory"][stage]
        assert memory["device"] == "cpu" and memory["scope"] == expected_scope
        # The tiny model is a few MB; the process (torch, transformers) is far bigger than 50 MiB.
        assert memory["cpu_peak_rss_mb"] > 50
        if expected_scope == "process":  # a lifetime peak can only have grown since
            assert memory["cpu_peak_rss_mb"] <= cpu_peak_rss_bytes() / 2**20 * 1.01
        latency = results["latency"][stage]
        assert latency["num_batches"] == 2 and latency["num_examples"] == 16 and latency["num_runs"] == 3
        assert 0 < latency["batch_p50_ms"] <= latency["batch_p90_ms"]
        assert latency["examples_per_s"] == pytest.approx(48 / latency["total_s"])
    assert set(results["val_best"]) >= {"accuracy", "f1", "score", "epoch"}
    assert results["test"]["score"] == pytest.approx((results["test"]["accuracy"] + results["test"]["f1"]) / 2)
    logged = (tmp_path / "run" / "version_0" / "metrics.csv").read_text()
    assert "peak_memory/fit/cpu_peak_rss_mb" in logged and "latency/test/batch_p50_ms" in logged
    assert "params/trainable" in logged

    # Timing runs in eval mode (dropout off) and gives the module back in the mode it found.
    timer = InferenceLatency(num_runs=1, warmup_batches=1, max_batches=2)
    modes = []
    hook = model.model.register_forward_pre_hook(lambda mod, args: modes.append(mod.training))
    for training in (True, False):
        model.train(training)
        timer.measure(trainer, model)
        assert model.training is training and all(m.training is training for m in model.modules())
    hook.remove()
    assert modes and not any(modes)


def test_peak_memory_sees_an_allocation_inside_the_stage(tiny_bert_dir, small_glue_dir, tmp_path):
    """A 256 MiB buffer held during `test` raises that stage's recorded peak by about as much."""
    if not _reset_cpu_peak_rss():
        pytest.skip("this system cannot reset the peak RSS, so a stage's own peak is not measurable")

    class Hold(L.Callback):
        def __init__(self, mib):
            self.mib, self.buffer = mib, None

        def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
            if self.buffer is None and self.mib:
                self.buffer = torch.ones(self.mib * 2**20 // 4)  # float32, touched so it is resident

        def on_test_epoch_end(self, trainer, pl_module):
            self.buffer = None  # freed before the stage ends: only a true peak still sees it

    dm = GLUEDataModule("mrpc", str(tiny_bert_dir), data_dir=str(small_glue_dir), batch_size=8, max_seq_length=32,
                        cache_dir=str(tmp_path / "tok"))
    model = Teacher(str(tiny_bert_dir), "mrpc", export=ExportArgs(enabled=False))
    peaks = {}
    for mib in (0, 256, 0):
        run = tmp_path / f"run{len(peaks)}"
        L.Trainer(accelerator="cpu", logger=CSVLogger(run, name="run"), callbacks=[PeakMemory(), Hold(mib)],
                  enable_progress_bar=False, enable_model_summary=False, limit_test_batches=2).test(model, datamodule=dm)
        peaks[len(peaks)] = json.loads((run / "run" / "version_0" / "results.json").read_text())["peak_memory"]["test"]["cpu_peak_rss_mb"]
    baseline = max(peaks[0], peaks[2])
    assert 200 < peaks[1] - baseline < 400, peaks


def test_parameter_count_of_a_student_excludes_the_teacher(tiny_bert_dir, small_glue_dir, tmp_path):
    dm = GLUEDataModule("sst2", str(tiny_bert_dir), data_dir=str(small_glue_dir), batch_size=8, max_seq_length=64,
                        cache_dir=str(tmp_path / "tok"))
    student = KDLoRAStudent(str(tiny_bert_dir), str(tiny_bert_dir), "sst2", student_layers=[1, 3], lora=LoRAArgs(r=4),
                            export=ExportArgs(enabled=False))
    trainer = _trainer(tmp_path, [ParameterCount(), PeakMemory()])
    trainer.fit(student, datamodule=dm)
    results = json.loads((tmp_path / "run" / "version_0" / "results.json").read_text())
    expected_trainable = sum(p.numel() for n, p in student.model.named_parameters()
                             if "lora_" in n or "modules_to_save" in n)
    assert results["parameters"]["trainable"] == expected_trainable > 0
    assert results["parameters"]["total"] == sum(p.numel() for p in student.model.parameters())
    assert results["parameters"]["total"] < sum(p.numel() for p in student.teacher.parameters()) + expected_trainable
    assert results["peak_memory"]["fit"]["cpu_peak_rss_mb"] > 0


def test_inference_memory_is_the_inference_passes_own_and_training_peak_survives_it(tiny_bert_dir, small_glue_dir, tmp_path):
    """InferenceLatency records the peak of its passes (a 256 MiB buffer held in forward shows up there),
    and PeakMemory's training peak (a 256 MiB buffer held in training) survives InferenceLatency's reset of
    the peak counters even when InferenceLatency comes first in the callback list."""
    if not _reset_cpu_peak_rss():
        pytest.skip("this system cannot reset the peak RSS, so a pass's own peak is not measurable")

    class Fat(Teacher):
        inference_mib = 0

        def forward(self, batch):
            buffer = torch.ones(self.inference_mib * 2**20 // 4) if not self.training and self.inference_mib else None
            out = super().forward(batch)
            del buffer
            return out

    class Hold(L.Callback):
        def __init__(self, mib):
            self.mib, self.buffer = mib, None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if self.buffer is None and self.mib:
                self.buffer = torch.ones(self.mib * 2**20 // 4)

        def on_train_epoch_end(self, trainer, pl_module):
            self.buffer = None

    class FatAfterTraining(L.Callback):  # validation runs in eval mode too: only the passes after training are fat
        def __init__(self, mib):
            self.mib = mib

        def on_train_end(self, trainer, pl_module):
            pl_module.inference_mib = self.mib

    dm = GLUEDataModule("mrpc", str(tiny_bert_dir), data_dir=str(small_glue_dir), batch_size=8, max_seq_length=32,
                        cache_dir=str(tmp_path / "tok"))
    records = []
    for inference_mib, train_mib in ((256, 0), (0, 256)):
        gc.collect()  # the previous run's objects go before the peak is reset, not during the stage
        model = Fat(str(tiny_bert_dir), "mrpc", export=ExportArgs(enabled=False))
        run = tmp_path / f"run{len(records)}"
        callbacks = [InferenceLatency(num_runs=1, warmup_batches=0, max_batches=1, stages=["fit"]), PeakMemory(), Hold(train_mib),
                     FatAfterTraining(inference_mib)]
        trainer = L.Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1, num_sanity_val_steps=0, accelerator="cpu",
                            logger=CSVLogger(run, name="run"), callbacks=callbacks, enable_progress_bar=False,
                            enable_model_summary=False, enable_checkpointing=False)
        trainer.fit(model, datamodule=dm)
        records.append(json.loads((run / "run" / "version_0" / "results.json").read_text()))
    fat, lean = (r["latency"]["fit"]["memory"] for r in records)
    assert fat["device"] == "cpu" and fat["scope"] == "inference"
    assert 200 < fat["peak_rss_mb"] - lean["peak_rss_mb"] < 400, (fat, lean)
    assert 200 < fat["delta_mb"] < 400 and lean["delta_mb"] < 100, (fat, lean)
    trained = [r["peak_memory"]["fit"]["cpu_peak_rss_mb"] for r in records]
    assert 200 < trained[1] - trained[0] < 400, trained
