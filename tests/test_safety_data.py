"""Nothing silent, nothing lost: exports never replace a user's directory, training stops at the first
non-finite loss, bad labels are named, data is checked before a run directory exists, and the
report leaves diverged runs out of its averages."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

from conftest import write_stsb_dir
from kdlora.cli import cli_main
from kdlora.data.glue import GLUEDataError, GLUEDataModule, read_glue_tsv
from kdlora.data.tasks import get_task
from kdlora.experiments import report
from kdlora.io import update_results
from kdlora.io import EXPORT_MARKER, check_export_dir, export_hf, write_export
from kdlora.kd.teacher import Teacher
from kdlora.training.args import ExportArgs, OptimizerArgs
from kdlora.training.callbacks import GLUEResults
from kdlora.training.module import TrainingDivergedError


def _users_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "thesis.tex").write_text("years of work")
    return path


def _cli_args(model_dir, glue_dir, tmp_path, *extra):
    return ["fit", "--model", "kdlora.kd.Teacher", "--model.model_name_or_path", str(model_dir),
            "--data.data_dir", str(glue_dir), "--data.cache_dir", str(tmp_path / "cache"), "--data.batch_size", "8",
            "--data.max_seq_length", "32",
            "--trainer.logger.class_path", "lightning.pytorch.loggers.TensorBoardLogger",
            "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"), "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", *extra]


# --- exports ------------------------------------------------------------------------------------

def test_export_dir_is_replaced_only_when_absent_empty_or_ours(tmp_path):
    def write(text):
        return lambda tmp: (tmp / "weights.txt").write_text(text)

    user = _users_folder(tmp_path / "mine")
    with pytest.raises(ValueError, match=rf"{user} already exists and is not a kdlora export \(it has no {EXPORT_MARKER}\)"):
        write_export(user, write("new"), {})
    assert sorted(p.name for p in user.iterdir()) == ["thesis.tex"]  # untouched
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ValueError, match="is an existing file"):
        check_export_dir(tmp_path / "a_file")
    with pytest.raises(ValueError, match="a_file is a file"):
        check_export_dir(tmp_path / "a_file" / "export")
    assert (tmp_path / "a_file").read_text() == "x"

    (tmp_path / "empty").mkdir()
    write_export(tmp_path / "empty", write("one"), {"what": "test"})
    ours = write_export(tmp_path / "new" / "export", write("one"), {"what": "test"})
    (ours / "stale.txt").write_text("from the first export")
    write_export(ours, write("two"), {"what": "test"})  # a re-run refreshes its own export
    assert sorted(p.name for p in ours.iterdir()) == [EXPORT_MARKER, "weights.txt"]
    assert (ours / "weights.txt").read_text() == "two"
    assert json.loads((ours / EXPORT_MARKER).read_text())["what"] == "test"
    assert not [p for p in ours.parent.iterdir() if p.name.startswith(".")]  # no temporary left

    def fail(tmp):
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_export(ours, fail, {})
    assert (ours / "weights.txt").read_text() == "two" and not [p for p in ours.parent.iterdir() if p.name.startswith(".")]


def test_exports_get_normal_permissions(tiny_bert_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir)
    old = os.umask(0o022)
    try:
        out = export_hf(model, AutoTokenizer.from_pretrained(tiny_bert_dir), tmp_path / "export")
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755  # like mkdir under umask 022 (mkdtemp gave 0700)
    for f in out.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f.name
    assert AutoModelForSequenceClassification.from_pretrained(out).config.num_labels == 2


def test_fit_refuses_a_users_export_dir_before_training(tiny_bert_dir, small_glue_dir, tmp_path):
    user = _users_folder(tmp_path / "mine")
    module = Teacher(str(tiny_bert_dir), task="rte", export=ExportArgs(dir=str(user)))
    dm = GLUEDataModule("rte", str(tiny_bert_dir), data_dir=str(small_glue_dir), batch_size=8, max_seq_length=32,
                        cache_dir=str(tmp_path / "c"))
    trainer = L.Trainer(max_epochs=1, logger=False, enable_progress_bar=False, default_root_dir=tmp_path,
                        callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/score", mode="max")])
    with pytest.raises(ValueError, match="not a kdlora export"):
        trainer.fit(module, dm)
    assert trainer.global_step == 0 and not (tmp_path / "ckpt").exists()
    assert sorted(p.name for p in user.iterdir()) == ["thesis.tex"]


def test_cli_refuses_a_users_export_dir_before_the_run_exists(tiny_bert_dir, small_glue_dir, tmp_path, capsys):
    user = _users_folder(tmp_path / "mine")
    code = cli_main(_cli_args(tiny_bert_dir, small_glue_dir, tmp_path, "--data.task", "rte",
                              "--model.export.dir", str(user)))
    err = capsys.readouterr().err
    assert code == 2 and f"kdlora: error: export directory {user} already exists and is not a kdlora export" in err
    assert not (tmp_path / "runs").exists()
    assert sorted(p.name for p in user.iterdir()) == ["thesis.tex"]


def _supernet_checkpoint(tiny_bert_dir, tmp_path) -> Path:
    import lightning

    from kdlora.mlfs.glue import SuperTransformer

    module = SuperTransformer(model_name_or_path=str(tiny_bert_dir), task="mrpc", evaluation={"measure_latency": False}, export={"enabled": False})
    path = tmp_path / "supernet.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                "pytorch-lightning_version": lightning.__version__}, path)
    return path


def test_elastic_export_cli_never_replaces_a_users_folder(tiny_bert_dir, tmp_path, capsys, monkeypatch):
    from kdlora.mlfs import export

    checkpoint = _supernet_checkpoint(tiny_bert_dir, tmp_path)
    user = _users_folder(tmp_path / "mine")
    loads = []
    real_load = export.load_encoder
    monkeypatch.setattr(export, "load_encoder", lambda c: loads.append(c) or real_load(c))
    assert export.main(["--checkpoint", str(checkpoint), "--subnet", "max", "--out", str(user)]) == 2
    err = capsys.readouterr().err
    assert f"kdlora: error: export directory {user} already exists and is not a kdlora export" in err
    assert loads == []  # refused before the checkpoint was loaded
    assert sorted(p.name for p in user.iterdir()) == ["thesis.tex"]
    # Several subnets into a user's folder: the subnets go beside what is there, nothing is removed.
    assert export.main(["--checkpoint", str(checkpoint), "--subnet", "h16-a2-f32-l2", "--subnet", "max",
                        "--out", str(user)]) == 0
    assert (user / "thesis.tex").read_text() == "years of work"
    assert (user / "h16-a2-f32-l2" / EXPORT_MARKER).is_file()
    # A named subnet folder that is not ours is refused before loading.
    _users_folder(tmp_path / "parent" / "h16-a2-f32-l2")
    loads.clear()
    assert export.main(["--checkpoint", str(checkpoint), "--subnet", "h16-a2-f32-l2", "--subnet", "max",
                        "--out", str(tmp_path / "parent")]) == 2
    assert loads == [] and "h16-a2-f32-l2 already exists and is not a kdlora export" in capsys.readouterr().err
    # Re-running the same export refreshes it.
    out = tmp_path / "out"
    for _ in range(2):
        assert export.main(["--checkpoint", str(checkpoint), "--subnet", "h16-a2-f32-l2", "--out", str(out)]) == 0
    assert json.loads((out / EXPORT_MARKER).read_text())["subnet"] == "h16-a2-f32-l2"


def test_supernet_export_is_one_marked_directory_and_refuses_a_users(tiny_bert_dir, small_glue_dir, tmp_path):
    from kdlora.mlfs.glue import SuperTransformer

    def fit(export_dir, palette):
        module = SuperTransformer(model_name_or_path=str(tiny_bert_dir), task="mrpc", stages={"epochs": [1, 0, 0]}, evaluation={"measure_latency": False, "members": palette}, export={"dir": str(export_dir)}, sampling={"sampler_seed": 0})
        dm = GLUEDataModule("mrpc", str(tiny_bert_dir), data_dir=str(small_glue_dir), batch_size=8, max_seq_length=32,
                            cache_dir=str(tmp_path / "c"))
        trainer = L.Trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=1, num_sanity_val_steps=0,
                            logger=TensorBoardLogger(str(tmp_path / "runs")), enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(module, dm)
        return module, trainer

    user = _users_folder(tmp_path / "mine")
    with pytest.raises(ValueError, match="not a kdlora export"):
        fit(user, ["min"])
    assert sorted(p.name for p in user.iterdir()) == ["thesis.tex"]

    out = tmp_path / "palette"
    first, _ = fit(out, ["min"])
    marker = json.loads((out / EXPORT_MARKER).read_text())
    assert marker["kind"] == "palette" and marker["members"] == first.palette_run.names
    assert all((out / name / EXPORT_MARKER).is_file() for name in first.palette_run.names)
    assert {"palette.md", "palette.json", "palette.png"} <= {p.name for p in out.iterdir()}
    second, _ = fit(out, ["max"])  # a re-run replaces the whole export: no member of the old palette lingers
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == sorted(second.palette_run.names)


# --- fast_dev_run and --trainer.logger false -------------------------------------------------------

def test_fast_dev_run_writes_nothing_into_the_working_directory(tiny_bert_dir, small_glue_dir, tmp_path, monkeypatch, capsys):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    code = cli_main(_cli_args(tiny_bert_dir, small_glue_dir, tmp_path, "--data.task", "rte", "--trainer.fast_dev_run", "true"))
    assert code == 0
    assert list(cwd.iterdir()) == []  # the export used to land in ./export
    assert "not exported: under fast_dev_run" in capsys.readouterr().out


def test_supernet_fast_dev_run_writes_nothing_into_the_working_directory(tiny_bert_dir, small_glue_dir, tmp_path, monkeypatch, capsys):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    code = cli_main(["fit", "--model", "kdlora.mlfs.SuperTransformer", "--model.model_name_or_path", str(tiny_bert_dir),
                     "--model.stages.epochs", "[0, 0, 1]", "--model.evaluation.measure_latency", "false", "--model.evaluation.members", "[max, min]",
                     "--data.task", "mrpc", "--data.data_dir", str(small_glue_dir), "--data.cache_dir", str(tmp_path / "c"),
                     "--data.batch_size", "8", "--data.max_seq_length", "32", "--trainer.fast_dev_run", "true",
                     "--trainer.enable_progress_bar", "false", "--checkpoint.monitor", "val/palette_score"])
    assert code == 0
    assert list(cwd.iterdir()) == []  # palette.md/json/png and export/ used to land here
    assert "palette report (not written" in capsys.readouterr().out


def test_fit_without_a_logger_runs(tiny_bert_dir, small_glue_dir, tmp_path):
    code = cli_main(_cli_args(tiny_bert_dir, small_glue_dir, tmp_path, "--data.task", "rte", "--trainer.logger", "false",
                              "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
                              "--trainer.default_root_dir", str(tmp_path / "root")))
    assert code == 0  # the default LearningRateMonitor used to refuse a Trainer without a logger
    assert (tmp_path / "root" / "export" / "config.json").is_file()


# --- divergence ---------------------------------------------------------------------------------

def test_diverging_teacher_stops_with_one_error_no_checkpoint_no_export(tiny_bert_dir, small_glue_dir, tmp_path, capsys):
    code = cli_main(_cli_args(tiny_bert_dir, small_glue_dir, tmp_path, "--data.task", "rte",
                              "--model.optimizer.learning_rate", "1e6", "--model.optimizer.warmup_ratio", "0", "--trainer.max_epochs", "2",
                              "--model.export.dir", str(tmp_path / "export"),
                              "--trainer.callbacks+=kdlora.training.callbacks.GLUEResults"))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("kdlora: error:")]
    assert code == 2 and len(lines) == 1, err[-2000:]
    assert "training loss is nan at step 1 (epoch 0, batch_idx 1)" in lines[0] and "learning_rate (it is 1000000.0)" in lines[0]
    assert not (tmp_path / "export").exists() and not list((tmp_path / "runs").rglob("*.ckpt"))
    results = json.loads(next((tmp_path / "runs").rglob("results.json")).read_text())
    assert results["diverged"]["step"] == 1 and results["diverged"]["batch_idx"] == 1


def test_no_checkpoint_is_written_from_non_finite_weights(tiny_bert_dir):
    module = Teacher(str(tiny_bert_dir), task="rte")
    with torch.no_grad():
        module.model.classifier.weight[0, 0] = float("inf")
    with pytest.raises(TrainingDivergedError, match=r"weight model\.classifier\.weight is not finite"):
        module.on_save_checkpoint({})


@pytest.mark.parametrize("poisoned", ["maxnet", "subnet"])
def test_supernet_stops_at_a_non_finite_maxnet_or_subnet_loss(tiny_bert_dir, small_glue_dir, tmp_path, monkeypatch, poisoned):
    import kdlora.mlfs.glue as supernet_mod

    def nan(loss):
        return loss * float("nan")

    if poisoned == "maxnet":
        real = supernet_mod.task_loss
        monkeypatch.setattr(supernet_mod, "task_loss", lambda *a: nan(real(*a)))
    else:
        real = supernet_mod.subnet_loss
        monkeypatch.setattr(supernet_mod, "subnet_loss", lambda *a: (nan(real(*a)[0]), real(*a)[1]))
    module = supernet_mod.SuperTransformer(model_name_or_path=str(tiny_bert_dir), task="mrpc", stages={"epochs": [0, 1, 0]}, sampling={"num_subnets": 1}, evaluation={"measure_latency": False}, export={"dir": str(tmp_path / "export")})
    dm = GLUEDataModule("mrpc", str(tiny_bert_dir), data_dir=str(small_glue_dir), batch_size=8, max_seq_length=32,
                        cache_dir=str(tmp_path / "c"))
    trainer = L.Trainer(max_epochs=1, limit_train_batches=2, num_sanity_val_steps=0, logger=False, default_root_dir=tmp_path,
                        enable_progress_bar=False, enable_model_summary=False)
    expected = "maxnet loss is nan" if poisoned == "maxnet" else r"subnet h\S+ loss is nan"
    with pytest.raises(TrainingDivergedError, match=rf"{expected} at step 0 \(epoch 0, batch_idx 0\)"):
        trainer.fit(module, dm)
    assert not (tmp_path / "export").exists() and not list(tmp_path.rglob("*.ckpt"))


# --- labels and early data checks ----------------------------------------------------------------

def test_bad_stsb_labels_name_file_lines_values_and_why(tmp_path):
    spec = get_task("stsb")
    glue = write_stsb_dir(tmp_path / "glue", [1.0, "nan", 2.0, 7.5, "-0.5", "inf", "high", 3.0])
    with pytest.raises(GLUEDataError) as e:
        read_glue_tsv(glue / "STS-B" / "train.tsv", spec, True)
    msg = str(e.value)
    assert msg.startswith(f"{glue / 'STS-B' / 'train.tsv'}: bad 'score' label in 5 of 8 rows: ")
    assert "'nan' at line(s) 3 (not a finite number)" in msg
    assert "'7.5' at line(s) 5 (out of range [0, 5])" in msg and "'-0.5' at line(s) 6 (out of range [0, 5])" in msg
    assert "2 more bad value(s)" in msg  # 'inf' and 'high' are left out of one line


def test_many_out_of_range_labels_say_out_of_range_not_malformed(tmp_path):
    scores = [2.0] * 83 + [5.5] * 117
    glue = write_stsb_dir(tmp_path / "glue", scores)
    with pytest.raises(GLUEDataError, match=r"bad 'score' label in 117 of 200 rows: '5\.5' at line\(s\) 85, 86, 87, 88, 89 \.\.\. "
                                            r"\(out of range \[0, 5\]\)"):
        read_glue_tsv(glue / "STS-B" / "train.tsv", get_task("stsb"), True)


@pytest.mark.parametrize("task, header, row, message", [
    ("rte", "index\tsentence1\tsentence2\tlabel", "9\ta\tb\tmaybe",
     "'maybe' at line(s) 3 (not a rte label (entailment, not_entailment) or class id 0..1)"),
    ("sst2", "sentence\tlabel", "good film\t2", "'2' at line(s) 3 (class id out of range [0, 1])"),
    ("cola", None, "src\t-1\t\tthe sentence", "'-1' at line(s) 2 (class id out of range [0, 1])"),
])
def test_bad_class_labels_are_named(tmp_path, task, header, row, message):
    spec = get_task(task)
    good = {"rte": "0\ta\tb\tentailment", "sst2": "bad film\t0", "cola": "src\t1\t\tthe sentence"}[task]
    path = tmp_path / "train.tsv"
    path.write_text("\n".join(([header] if header else []) + [good, row]) + "\n")
    with pytest.raises(GLUEDataError, match="bad '(label)' label in 1 of 2 rows") as e:
        read_glue_tsv(path, spec, True)
    assert message in str(e.value)


def test_data_module_checks_local_files_at_construction_and_reads_them_once(tiny_bert_dir, tmp_path, monkeypatch):
    glue = write_stsb_dir(tmp_path / "bad", [1.0, float("nan"), 2.0])
    with pytest.raises(GLUEDataError, match="not a finite number"):
        GLUEDataModule("stsb", str(tiny_bert_dir), data_dir=str(glue))
    glue = write_stsb_dir(tmp_path / "good", [1.0, 4.0, 2.0])
    dm = GLUEDataModule("stsb", str(tiny_bert_dir), data_dir=str(glue), cache_dir=str(tmp_path / "c"))

    def read_again(*a, **k):
        raise AssertionError("setup read a file that __init__ already read")

    monkeypatch.setattr("kdlora.data.glue.read_glue_tsv", read_again)
    dm.setup("fit")
    assert sorted(dm.datasets["train"]["labels"]) == [1.0, 2.0, 4.0]


@pytest.mark.parametrize("rows, message", [
    ([2.0] * 10 + [9.0], "'9.0' at line(s) 12 (out of range [0, 5])"),
    ([2.0] * 10 + ["nan"], "'nan' at line(s) 12 (not a finite number)"),
])
def test_cli_bad_label_is_one_error_and_leaves_no_run_directory(tiny_bert_dir, tmp_path, capsys, rows, message):
    glue = write_stsb_dir(tmp_path / "glue", rows)
    code = cli_main(_cli_args(tiny_bert_dir, glue, tmp_path, "--data.task", "stsb"))
    err = capsys.readouterr().err
    assert code == 2 and message in err
    assert not (tmp_path / "runs").exists()


def test_cli_malformed_file_leaves_no_run_directory(tiny_bert_dir, small_glue_dir, tmp_path, capsys):
    glue = tmp_path / "glue"
    (glue / "RTE").mkdir(parents=True)
    (glue / "RTE" / "dev.tsv").write_text((small_glue_dir / "RTE" / "dev.tsv").read_text())
    lines = (small_glue_dir / "RTE" / "train.tsv").read_text().splitlines()
    (glue / "RTE" / "train.tsv").write_text("\n".join(lines[:20] + ["7\tonly two"] * 10) + "\n")
    code = cli_main(_cli_args(tiny_bert_dir, glue, tmp_path, "--data.task", "rte"))
    assert code == 2 and "10 of 29 rows malformed" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


# --- the report -----------------------------------------------------------------------------------

def test_report_leaves_diverged_runs_out_of_table1(tmp_path):
    def run(name, task, score, **extra):
        update_results(tmp_path / name / "results.json",
                       {"run": {"module": "Teacher", "task": task, "hparams": {"task": task, "finetune": "full"}},
                        "val_best": score, **extra})

    run("good", "rte", {"accuracy": 0.6, "score": 0.6})
    run("stopped", "rte", {"accuracy": 0.9, "score": 0.9},
        diverged={"what": "training loss", "value": "nan", "step": 7, "epoch": 0, "batch_idx": 7})
    run("nan", "stsb", {"pearson": float("nan"), "spearman": float("nan"), "score": float("nan")})
    runs = report.find_runs([tmp_path])
    t1 = report.table1(runs)
    assert t1["FFT"]["rte"] == {"score": pytest.approx(60.0), "metrics": {"accuracy": pytest.approx(60.0)}, "n": 1, "k": 1}
    assert "stsb" not in t1["FFT"] and t1["FFT"]["average"] == pytest.approx(60.0)
    md, data = report.build_report([str(tmp_path)], pairs={})
    assert {Path(r["dir"]).name for r in data["diverged_runs"]} == {"stopped", "nan"}
    assert "Left out of Table 1 (2 diverged run(s)):" in md
    assert "training stopped: training loss nan at step 7, batch_idx 7" in md
    assert "non-finite val_best metric(s): pearson=nan, score=nan, spearman=nan" in md


def test_glue_results_records_where_training_diverged(tiny_bert_dir, small_glue_dir, tmp_path):
    module = Teacher(str(tiny_bert_dir), task="rte", optimizer=OptimizerArgs(learning_rate=1e6, warmup_ratio=0.0),
                     export=ExportArgs(enabled=False))
    dm = GLUEDataModule("rte", str(tiny_bert_dir), data_dir=str(small_glue_dir), batch_size=8, max_seq_length=32,
                        cache_dir=str(tmp_path / "c"))
    logger = TensorBoardLogger(str(tmp_path), name="run")
    trainer = L.Trainer(max_epochs=1, logger=logger, callbacks=[GLUEResults()], enable_progress_bar=False,
                        enable_checkpointing=False, num_sanity_val_steps=0)
    with pytest.raises(TrainingDivergedError):
        trainer.fit(module, dm)
    results = json.loads((Path(logger.log_dir) / "results.json").read_text())
    assert results["run"]["task"] == "rte" and results["diverged"]["what"] == "training loss"
    assert report.table1(report.find_runs([tmp_path])) == {}


def test_student_fast_dev_run_caches_teacher_targets_outside_the_working_directory(tiny_bert_dir, small_glue_dir, tmp_path, monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    code = cli_main(["fit", "--model", "kdlora.kd.KDLoRAStudent", "--model.model_name_or_path", str(tiny_bert_dir),
                     "--model.teacher_path", str(tiny_bert_dir), "--model.student_layers", "[1]",
                     "--model.teacher_targets.mode", "cached", "--data.task", "sst2", "--data.data_dir", str(small_glue_dir),
                     "--data.cache_dir", str(tmp_path / "c"), "--data.batch_size", "8", "--data.max_seq_length", "32",
                     "--trainer.fast_dev_run", "true", "--trainer.enable_progress_bar", "false"])
    assert code == 0
    assert list(cwd.iterdir()) == []  # teacher targets used to land in ./teacher_targets
    assert list((tmp_path / "c" / "teacher_targets").glob("teacher-sst2-*.pt"))
