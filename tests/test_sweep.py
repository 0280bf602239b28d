"""Sweeps: grid expansion, stable ids, resumable runs through the real CLI, emitted SLURM arrays."""

from __future__ import annotations

import json
import shlex
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml

from kdlora.cli import cli_main
from kdlora.experiments import sweep

REPO = Path(__file__).resolve().parents[1]
# The model part of a base config (every point's arguments are parsed by the training CLI first).
MODEL = "model: {class_path: kdlora.kd.Teacher, init_args: {model_name_or_path: m}}\n"


def test_grid_zip_points_and_sample_expand_to_the_expected_points():
    spec = {"grid": {"a.x": [1, 2, 3], "b": [0.1, 0.2]}, "zip": {"c": [7, 8], "d": ["p", "q"]},
            "points": [{"a.x": 9}, {"a.x": 1, "b": 0.1, "c": 7, "d": "p"}]}  # the second repeats a grid point
    points = sweep.expand(spec)
    assert len(points) == 3 * 2 * 2 + 1
    assert {"a.x": 2, "b": 0.2, "c": 8, "d": "q"} in points and {"a.x": 2, "b": 0.2, "c": 7, "d": "q"} not in points
    assert points[-1] == {"a.x": 9}
    sampled = sweep.expand({"grid": spec["grid"], "sample": 4, "seed": 3})
    assert len(sampled) == 4 and sampled == sweep.expand({"grid": spec["grid"], "sample": 4, "seed": 3})
    assert all(p in sweep.expand({"grid": spec["grid"]}) for p in sampled)


def test_point_ids_are_readable_stable_and_unique():
    a = sweep.point_id({"model.init_args.lora.r": 8, "trainer.max_epochs": 3, "model.init_args.lora.dropout": 0.0})
    assert a == sweep.point_id({"trainer.max_epochs": 3, "model.init_args.lora.dropout": 0.0, "model.init_args.lora.r": 8})
    assert a.startswith("do0-r8-ep3-")
    assert a != sweep.point_id({"model.init_args.lora.r": 8, "trainer.max_epochs": 3, "model.init_args.lora.dropout": 0.1})
    # "0.1" and 0.1 print alike; the hash still tells them apart
    assert sweep.point_id({"x": "0.1"}) != sweep.point_id({"x": 0.1})


@pytest.mark.parametrize("name, count", [("bert-fft", 25), ("bert-lora", 24), ("bert-kdlora", 24)])
def test_shipped_paper_grids_have_the_papers_counts(name, count, monkeypatch):
    monkeypatch.chdir(REPO)
    s = sweep.load_sweep(f"configs/sweeps/{name}.yaml")
    assert len(s.points) == count and len({sweep.point_id(p) for p in s.points}) == count
    assert s.tasks == ["cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte"]
    if name == "bert-fft":  # within the paper's ranges
        assert {p["model.init_args.optimizer.learning_rate"] for p in s.points} <= {2e-5, 3e-5, 4e-5, 5e-5}
        assert {p["data.batch_size"] for p in s.points} <= {8, 16, 32}


@pytest.mark.parametrize("text, message", [
    ("base: nope.yaml\ntasks: [rte]\ngrid: {{a: [1]}}\n", "'base' in"),
    ("base: {base}\ntasks: [nosuchtask]\ngrid: {{a: [1]}}\n", "unknown GLUE task 'nosuchtask'"),
    ("base: {base}\ntasks: [rte]\ngrid: {{a: 1}}\n", "'grid.a' must be a non-empty list"),
    ("base: {base}\ntasks: [rte]\nzip: {{a: [1, 2], b: [1]}}\n", "'zip' lists must have the same length"),
    ("base: {base}\ntasks: [rte]\ngrid: {{a: [1, 2]}}\nsample: 3\n", "'sample' must be an integer from 1 to the grid's 2"),
    ("base: {base}\ntasks: [rte]\ngird: {{a: [1]}}\n", "unknown key(s) ['gird']"),
    ("base: {base}\ntasks: [rte]\n", "the sweep has no points"),
])
def test_bad_sweep_files_are_one_clear_error(tmp_path, capsys, text, message):
    base = tmp_path / "base.yaml"
    base.write_text("trainer: {logger: {init_args: {save_dir: runs}}}\n")
    path = tmp_path / "s.yaml"
    path.write_text(text.format(base=base))
    assert sweep.main([str(path), "--dry-run"]) == 2
    assert message in capsys.readouterr().err


def _tiny_sweep(tmp_path, model_dir, glue_dir) -> Path:
    base = {
        "seed_everything": 1,
        "model": {"class_path": "kdlora.kd.Teacher",
                  "init_args": {"model_name_or_path": str(model_dir), "finetune": "full"}},
        "data": {"task": "rte", "data_dir": str(glue_dir), "cache_dir": str(tmp_path / "cache"), "batch_size": 16},
        "trainer": {"max_epochs": 1, "limit_train_batches": 2, "limit_val_batches": 1, "enable_progress_bar": False,
                    "enable_model_summary": False, "accelerator": "cpu",
                    "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                               "init_args": {"save_dir": str(tmp_path / "runs" / "{task}"), "name": "fft"}},
                    "callbacks": [{"class_path": "kdlora.training.callbacks.GLUEResults"}]},
    }
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    spec = {"base": str(tmp_path / "base.yaml"), "tasks": ["rte"],
            "grid": {"model.init_args.optimizer.learning_rate": [1e-4, 2e-4]}}
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(spec))
    return tmp_path / "sweep.yaml"


def test_sweep_runs_each_point_once_and_reruns_only_unfinished_ones(tiny_bert_dir, small_glue_dir, tmp_path, monkeypatch):
    calls = []

    def in_process(command):  # the real CLI, without a new interpreter per point
        calls.append(command)
        return cli_main(command[2:])

    monkeypatch.setattr(sweep.subprocess, "call", in_process)
    path = _tiny_sweep(tmp_path, tiny_bert_dir, small_glue_dir)
    assert sweep.main([str(path)]) == 0
    assert len(calls) == 2
    runs = sorted((tmp_path / "runs" / "rte" / "fft" / "sweep").glob("*/version_0"))
    assert len(runs) == 2
    for run in runs:
        results = json.loads((run / "results.json").read_text())
        assert "score" in results["val_best"] and (run / sweep.DONE_MARKER).is_file()
        point = json.loads((run.parent / sweep.POINT_FILE).read_text())
        assert results["run"]["hparams"]["optimizer"]["learning_rate"] == point["overrides"]["model.init_args.optimizer.learning_rate"]
        assert not (run / "export").exists()
    assert not (tmp_path / "runs" / "rte" / "fft" / "export").exists()  # points never export over the base's export

    assert sweep.main([str(path)]) == 0
    assert len(calls) == 2  # both finished: nothing re-ran

    (runs[0] / "results.json").unlink()  # as if that run had crashed before its first last.ckpt
    shutil.rmtree(runs[0] / "checkpoints")
    assert sweep.main([str(path)]) == 0
    assert len(calls) == 3
    assert f"--trainer.logger.init_args.name {runs[0].parent.name}" in shlex.join(calls[-1])
    assert (runs[0].parent / "version_1" / sweep.DONE_MARKER).is_file()  # the crashed attempt is kept beside it
    assert runs[0].is_dir()


def test_failed_point_is_not_marked_finished_and_the_sweep_exits_nonzero(tmp_path, monkeypatch, capsys):
    base = tmp_path / "base.yaml"
    base.write_text(MODEL + "trainer: {logger: {init_args: {save_dir: " + str(tmp_path / "runs") + ", name: x}}}\n")
    path = tmp_path / "s.yaml"
    path.write_text(f"base: {base}\ntasks: [rte]\ngrid: {{trainer.max_epochs: [1]}}\n")
    monkeypatch.setattr(sweep.subprocess, "call", lambda command: 1)
    assert sweep.main([str(path)]) == 1
    assert "failed (exit 1)" in capsys.readouterr().err
    assert not list((tmp_path / "runs").rglob(sweep.DONE_MARKER))


def test_emitted_slurm_array_runs_each_unfinished_point(tmp_path, monkeypatch):
    base = tmp_path / "base.yaml"
    base.write_text(MODEL + "trainer: {logger: {init_args: {save_dir: 'runs/{task}', name: lora}}}\n")
    path = tmp_path / "s.yaml"
    path.write_text(f"base: {base}\ntasks: [rte, mrpc]\ngrid: {{model.init_args.lora.r: [8, 16, 32]}}\n")
    monkeypatch.chdir(tmp_path)
    s = sweep.load_sweep(path)
    done = sweep.point_dir(s, "rte", s.points[0]) / "version_0"  # one point already finished
    done.mkdir(parents=True)
    (done / "results.json").write_text(json.dumps({"val_best": {"score": 0.5}}))
    (done / sweep.DONE_MARKER).write_text("{}")
    out = tmp_path / "jobs"
    assert sweep.main([str(path), "--emit", "slurm", "--out", str(out), "--slurm-arg=--gres=gpu:1", "--parallel", "2"]) == 0
    commands = (out / "commands.txt").read_text().splitlines()
    assert len(commands) == 5
    assert commands[0] == shlex.join([sys.executable, "-m", "kdlora.experiments.sweep", str(path), "--point", f"rte/{sweep.point_id(s.points[1])}"])
    script = (out / "sweep.sbatch").read_text()
    assert "#SBATCH --array=0-4%2" in script and "#SBATCH --gres=gpu:1" in script
    assert f"#SBATCH --chdir={tmp_path}" in script and f"#SBATCH --output={out}/logs/%A_%a.out" in script
    assert f'sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" {out}/commands.txt' in script and 'eval "$CMD"' in script
    # a user's directory is never written into
    assert sweep.main([str(path), "--emit", "slurm", "--out", str(out)]) == 2
    # the emitted command runs exactly that point
    assert sweep.select_point(s, f"mrpc/{sweep.point_id(s.points[2])}") == ("mrpc", s.points[2])
    with pytest.raises(sweep.SweepError, match="no point 'mrpc/nope'"):
        sweep.select_point(s, "mrpc/nope")


def test_a_bad_override_stops_the_sweep_at_its_first_point_with_the_clis_message(tiny_bert_dir, small_glue_dir, tmp_path,
                                                                                  monkeypatch, capsys):
    calls = []

    def in_process(command):
        calls.append(command)
        return cli_main(command[2:])

    monkeypatch.setattr(sweep.subprocess, "call", in_process)
    path = _tiny_sweep(tmp_path, tiny_bert_dir, small_glue_dir)
    spec = yaml.safe_load(path.read_text())
    spec["grid"] = {"model.init_args.lora_rank": [4, 8]}  # Teacher has lora.r, not lora_rank
    path.write_text(yaml.safe_dump(spec))
    assert sweep.main([str(path)]) == 2
    err = capsys.readouterr().err
    assert calls == [] and f"point rte/{sweep.point_id({'model.init_args.lora_rank': 4})}" in err
    assert "Option 'lora_rank' is not accepted" in err and "nothing was run" in err
    assert not list((tmp_path / "runs").rglob("version_*"))


@pytest.mark.slow  # two training processes: ~40 s on a busy 2-core machine
def test_sweep_launches_each_point_as_its_own_training_process(tiny_bert_dir, small_glue_dir, tmp_path, monkeypatch):
    """The runner's real path, nothing replaced: each point is a `train.py fit` in a new interpreter."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    path = _tiny_sweep(tmp_path, tiny_bert_dir, small_glue_dir)
    assert sweep.main([str(path)]) == 0
    runs = sorted((tmp_path / "runs" / "rte" / "fft" / "sweep").glob("*/version_*"))
    assert [r.name for r in runs] == ["version_0", "version_0"]
    rates = []
    for run in runs:
        point = json.loads((run.parent / sweep.POINT_FILE).read_text())
        rate = point["overrides"]["model.init_args.optimizer.learning_rate"]
        rates.append(rate)
        assert sweep.is_finished(run)
        results = json.loads((run / "results.json").read_text())
        assert results["run"]["hparams"]["optimizer"]["learning_rate"] == rate and "score" in results["val_best"]
        config = yaml.safe_load((run / "config.yaml").read_text())  # what that process's CLI resolved
        assert config["model"]["init_args"]["optimizer"]["learning_rate"] == rate and config["data"]["task"] == "rte"
        last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        assert last["global_step"] == 2  # limit_train_batches: 2 steps trained
    assert sorted(rates) == [1e-4, 2e-4]
