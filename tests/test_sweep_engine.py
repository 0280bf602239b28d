"""Sweep engines: options checked by the training CLI before any point runs, points resumed from their
last.ckpt, parallel Ray Tune trials, and the emitted SLURM array, each through the real `train.py`."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from kdlora.cli import cli_main
from kdlora.experiments import sweep

# A callback for the base config: records the global step each fit starts at, and crashes the first
# fit at the start of its second epoch, once (after the end-of-epoch-0 last.ckpt was written).
CRASH_ONCE = '''
from pathlib import Path
from lightning.pytorch.callbacks import Callback


class CrashOnce(Callback):
    def __init__(self, record: str, crash_epoch: int = -1):
        self.record, self.crash_epoch = Path(record), crash_epoch

    def on_train_start(self, trainer, pl_module):
        with self.record.open("a") as f:
            f.write(f"{trainer.global_step}\\n")

    def on_train_epoch_start(self, trainer, pl_module):
        flag = self.record.with_suffix(".crashed")
        if trainer.current_epoch == self.crash_epoch and not flag.exists():
            flag.write_text("")
            raise RuntimeError("crash after a checkpoint")
'''


@pytest.fixture
def tiny_sweep(tiny_bert_dir, small_glue_dir, tmp_path, monkeypatch):
    """Writes a sweep over a tiny random BERT on the fixture GLUE rows (every fit records its first step
    through `CrashOnce`, importable here and in `train.py` subprocesses, which use one thread each)."""
    (tmp_path / "crash_once.py").write_text(CRASH_ONCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")

    def write(grid: dict, crash_epoch: int = -1, max_epochs: int = 1, tasks=("rte",)) -> Path:
        base = {
            "seed_everything": 1,
            "model": {"class_path": "kdlora.kd.Teacher",
                      "init_args": {"model_name_or_path": str(tiny_bert_dir), "finetune": "full"}},
            "data": {"task": "rte", "data_dir": str(small_glue_dir), "cache_dir": str(tmp_path / "cache"), "batch_size": 16},
            "trainer": {"max_epochs": max_epochs, "limit_train_batches": 2, "limit_val_batches": 1,
                        "enable_progress_bar": False, "enable_model_summary": False, "accelerator": "cpu",
                        "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                                   "init_args": {"save_dir": str(tmp_path / "runs" / "{task}"), "name": "fft"}},
                        "callbacks": [{"class_path": "kdlora.training.callbacks.GLUEResults"},
                                      {"class_path": "crash_once.CrashOnce",
                                       "init_args": {"record": str(tmp_path / "starts.txt"), "crash_epoch": crash_epoch}}]},
            "last_checkpoint": {"every_n_train_steps": 2},
        }
        (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
        spec = {"base": str(tmp_path / "base.yaml"), "tasks": list(tasks), "grid": grid}
        (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(spec))
        return tmp_path / "sweep.yaml"

    return write


def _no_runs(monkeypatch) -> list:
    calls: list = []
    monkeypatch.setattr(sweep.subprocess, "call", lambda command: calls.append(command) or 0)
    return calls


@pytest.mark.parametrize("grid, bad, index", [
    ({"model.init_args.lora_rank": [4, 8]}, "Option 'lora_rank' is not accepted", 0),  # Teacher has lora.r
    ({"trainer.max_epochs": [1, "three"]}, 'Parser key "trainer.max_epochs"', 1),  # the second point's value
])
@pytest.mark.parametrize("mode", [[], ["--dry-run"], ["--emit", "commands"]])
def test_an_option_the_training_cli_refuses_stops_the_sweep_before_any_point_runs(
        tiny_sweep, tmp_path, monkeypatch, capsys, grid, bad, index, mode):
    calls = _no_runs(monkeypatch)
    path = tiny_sweep(grid)
    bad_point = sweep.load_sweep(path).points[index]
    out = tmp_path / "jobs"
    assert sweep.main([str(path), *mode, *(["--out", str(out)] if "--emit" in mode else [])]) == 2
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("kdlora.experiments.sweep: error:")]
    assert len(errors) == 1 and bad in errors[0] and f"rte/{sweep.point_id(bad_point)}" in errors[0], captured.err
    assert calls == [] and "train.py" not in captured.out
    assert not (tmp_path / "runs").exists() and not out.exists()


@pytest.mark.parametrize("argv, message", [
    (["--cpus-per-trial", "2"], "--cpus-per-trial only apply to --engine ray"),
    (["--engine", "ray", "--cpus-per-trial", "0"], "--cpus-per-trial must be positive"),
])
def test_ray_options_are_checked(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        sweep.main([str(tmp_path / "s.yaml"), *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_a_crashed_point_resumes_from_its_last_checkpoint(tiny_sweep, tmp_path, monkeypatch, capsys):
    def in_process(command):  # the real CLI, without a new interpreter per point; a crash exits 1 as a process would
        try:
            return cli_main(command[2:])
        except RuntimeError:
            return 1

    monkeypatch.setattr(sweep.subprocess, "call", in_process)
    path = tiny_sweep({"model.init_args.optimizer.learning_rate": [1e-4]}, crash_epoch=1, max_epochs=3)
    s = sweep.load_sweep(path)
    run = sweep.point_dir(s, "rte", s.points[0]) / "version_0"
    assert sweep.main([str(path)]) == 1  # the point crashed at the start of epoch 1
    assert "failed (exit 1)" in capsys.readouterr().err and not (run / sweep.DONE_MARKER).exists()
    last = run / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 2  # epoch 0: 2 steps

    assert sweep.main([str(path), "--dry-run"]) == 0
    assert f"--ckpt_path {last}" in capsys.readouterr().out
    assert sweep.main([str(path)]) == 0
    assert not run.with_name("version_1").exists()  # the same attempt, continued
    starts = [int(x) for x in (tmp_path / "starts.txt").read_text().split()]
    assert starts == [0, 2]  # the second fit started where the checkpoint was, not from step 0
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 6  # 3 epochs of 2 steps
    marker = json.loads((run / sweep.DONE_MARKER).read_text())
    assert marker["status"] == "finished" and marker["command"][-2:] == ["--ckpt_path", str(last)]
    assert json.loads((run / "results.json").read_text())["val_best"]["epoch"] in (0, 1, 2)


def test_a_point_that_crashed_before_its_first_checkpoint_starts_over_in_a_new_version(
        tiny_sweep, tmp_path, monkeypatch):
    calls = _no_runs(monkeypatch)
    path = tiny_sweep({"model.init_args.optimizer.learning_rate": [1e-4]})
    s = sweep.load_sweep(path)
    crashed = sweep.point_dir(s, "rte", s.points[0]) / "version_0"
    crashed.mkdir(parents=True)
    assert sweep.main([str(path)]) == 1  # the stub runs nothing: no results, the point failed
    assert "--ckpt_path" not in calls[0] and calls[0][calls[0].index("--trainer.logger.init_args.version") + 1] == "1"
    (crashed / "checkpoints").mkdir()
    (crashed / "checkpoints" / "last.ckpt").write_bytes(b"")
    (crashed.with_name("version_1") / "checkpoints").mkdir(parents=True)  # the newest attempt with a last.ckpt wins
    (crashed.with_name("version_1") / "checkpoints" / "last.ckpt").write_bytes(b"")
    assert sweep.main([str(path)]) == 1
    assert calls[1][-2:] == ["--ckpt_path", str(crashed.with_name("version_1") / "checkpoints" / "last.ckpt")]
    assert calls[1][calls[1].index("--trainer.logger.init_args.version") + 1] == "1"


@pytest.mark.slow
def test_ray_engine_runs_points_as_parallel_trials(tiny_sweep, tmp_path, capsys):
    pytest.importorskip("ray.tune")
    path = tiny_sweep({"model.init_args.optimizer.learning_rate": [1e-4, 2e-4]})
    s = sweep.load_sweep(path)
    assert sweep.main([str(path), "--engine", "ray", "--cpus-per-trial", "1"]) == 0
    assert "2 finished" in capsys.readouterr().out
    windows = []
    for p in s.points:
        run = sweep.point_dir(s, "rte", p) / "version_0"
        marker = json.loads((run / sweep.DONE_MARKER).read_text())
        assert marker["status"] == "finished" and marker["command"][:2] == [sys.executable, str(sweep.TRAIN_PY)]
        results = json.loads((run / "results.json").read_text())
        assert results["run"]["hparams"]["optimizer"]["learning_rate"] == p["model.init_args.optimizer.learning_rate"]
        windows.append((marker["started"], marker["ended"]))
    (a_start, a_end), (b_start, b_end) = windows
    assert max(a_start, b_start) < min(a_end, b_end), f"the trials ran one after the other: {windows}"
    assert sweep.main([str(path), "--engine", "ray"]) == 0  # both finished: no trial
    assert "2 skipped" in capsys.readouterr().out


def test_emitted_slurm_array_maps_each_index_to_its_points_command(tiny_sweep, tmp_path, monkeypatch,
                                                                   capsys):
    path = tiny_sweep({"model.init_args.lora.r": [4, 8, 16]}, tasks=("rte", "mrpc"))
    s = sweep.load_sweep(path)
    done = sweep.point_dir(s, "mrpc", s.points[1]) / "version_0"  # one point already finished
    done.mkdir(parents=True)
    (done / "results.json").write_text(json.dumps({"val_best": {"score": 0.5}}))
    (done / sweep.DONE_MARKER).write_text("{}")
    todo = [(t, p) for t in ("rte", "mrpc") for p in s.points if (t, p) != ("mrpc", s.points[1])]
    out = tmp_path / "jobs"
    assert sweep.main([str(path), "--emit", "slurm", "--out", str(out), "--parallel", "2"]) == 0
    script = out / "sweep.sbatch"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    first, last = map(int, re.search(r"^#SBATCH --array=(\d+)-(\d+)%2$", script.read_text(), re.M).groups())
    assert (first, last) == (0, len(todo) - 1)
    # Each array index runs its point: `eval` stands in for running the command, recording it instead.
    for index, (task, p) in enumerate(todo):
        record = tmp_path / f"ran-{index}"
        shell = f'eval() {{ printf "%s" "$*" > {shlex.quote(str(record))}; }}; source {shlex.quote(str(script))}'
        subprocess.run(["bash", "-c", shell], env={"SLURM_ARRAY_TASK_ID": str(index), "PATH": "/usr/bin:/bin"},
                       check=True, capture_output=True)
        command = shlex.split(record.read_text())
        assert command == [sys.executable, "-m", "kdlora.experiments.sweep", str(path), "--point", f"{task}/{sweep.point_id(p)}"]
    capsys.readouterr()
    assert sweep.main(command[3:] + ["--dry-run"]) == 0  # the last line's arguments name exactly that point
    printed = capsys.readouterr().out
    assert printed.startswith(f"# mrpc/{sweep.point_id(s.points[2])} (to run)") and printed.count("train.py fit") == 1
