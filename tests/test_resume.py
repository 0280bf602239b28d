"""Exact resume: `fit --ckpt_path last` after a SIGKILL mid-epoch ends where an uninterrupted run ends.

Each case runs `train.py fit` three times in subprocesses with the same seed on CPU: uninterrupted to
the end; killed with SIGKILL right after the step checkpoint (`last.ckpt`, every 5 steps) of a
mid-epoch step; and resumed from it with `--ckpt_path last`. The resumed run must end with the same
trained weights (bit for bit), the same last validation metrics and the same best checkpoint.
Dropout is on (the tiny models' default 0.1), so the random streams must resume too.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from conftest import make_tiny_model_dir

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
STEPS_PER_EPOCH = 16  # 64 SST-2 rows, batch size 4
KILL_AT_STEP = 10  # mid epoch 0: the rest of epoch 0, its validation and all of epoch 1 are left to the resumed run


class ResumeProbe(L.Callback):
    """Added to the runs under test (`--trainer.callbacks+=test_resume.ResumeProbe`), set by environment:
    KDLORA_PROBE_OUT: write the trained weights and last metrics there at the end of training;
    KDLORA_KILL_AT_STEP: SIGKILL this process when that step starts, i.e. after the checkpoint of the
    step before it was written (checkpoints are saved in on_train_batch_end)."""

    def __init__(self) -> None:
        self.out = os.environ.get("KDLORA_PROBE_OUT")
        self.kill_at = int(os.environ.get("KDLORA_KILL_AT_STEP", -1))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    def on_train_end(self, trainer, pl_module):
        if not self.out:
            return
        out = Path(self.out)
        out.mkdir(parents=True, exist_ok=True)
        torch.save({k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}, out / "weights.pt")
        best = trainer.checkpoint_callback
        (out / "run.json").write_text(json.dumps({
            "global_step": trainer.global_step,
            "metrics": {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")},
            "best_model": Path(best.best_model_path).name,
            "best_score": float(best.best_model_score),
        }, indent=1))


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory) -> Path:
    """A 2-layer tiny BERT sharing the 4-layer tiny teacher's tokenizer."""
    return make_tiny_model_dir(tmp_path_factory.mktemp("resume_student") / "student", "bert", layers=2, seed=1)


def fit(tmp_path: Path, glue: Path, run: str, model_args: list[str], *extra: str, kill_at: int = -1,
        probe: bool = True) -> subprocess.CompletedProcess:
    """`train.py fit` as a user runs it, in runs/<run> under tmp_path (a fixed version, so `last` is found)."""
    cmd = [sys.executable, str(REPO / "train.py"), "fit", *model_args,
           "--data.task", "sst2", "--data.data_dir", str(glue), "--data.cache_dir", str(tmp_path / "cache"),
           "--data.max_seq_length", "32", "--data.batch_size", "4",
           "--trainer.max_epochs", "2", "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
           "--trainer.enable_model_summary", "false",
           "--trainer.logger.class_path", "lightning.pytorch.loggers.TensorBoardLogger",
           "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"), "--trainer.logger.init_args.name", "resume",
           "--trainer.logger.init_args.version", run,
           "--last_checkpoint.every_n_train_steps", "5", "--trainer.callbacks+=test_resume.ResumeProbe", *extra]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(TESTS)]), "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "KDLORA_KILL_AT_STEP": str(kill_at)}
    if probe:
        env["KDLORA_PROBE_OUT"] = str(tmp_path / "probe" / run)
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


def check_resume_is_exact(tmp_path: Path, glue: Path, model_args: list[str], kill_at: int) -> tuple[Path, Path]:
    """Run the three fits; return the run directories (uninterrupted, killed and resumed)."""
    assert kill_at % 5 == 0 and kill_at % STEPS_PER_EPOCH != 0, "kill right after a step checkpoint, mid-epoch"
    plain = fit(tmp_path, glue, "plain", model_args)
    assert plain.returncode == 0, plain.stderr[-3000:]
    killed = fit(tmp_path, glue, "killed", model_args, kill_at=kill_at, probe=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    last = tmp_path / "runs" / "resume" / "killed" / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == kill_at
    resumed = fit(tmp_path, glue, "killed", model_args, "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    want_dir, got_dir = tmp_path / "probe" / "plain", tmp_path / "probe" / "killed"
    want, got = (json.loads((d / "run.json").read_text()) for d in (want_dir, got_dir))
    assert got["global_step"] == want["global_step"] == 2 * STEPS_PER_EPOCH
    want_w, got_w = (torch.load(d / "weights.pt", weights_only=True) for d in (want_dir, got_dir))
    assert want_w.keys() == got_w.keys()
    diff = max(float((want_w[k].double() - got_w[k].double()).abs().max()) for k in want_w if want_w[k].is_floating_point())
    assert diff == 0.0, f"resumed weights differ from the uninterrupted run's by up to {diff:.3g}"
    assert got["metrics"] == want["metrics"]
    # The best checkpoint (monitored val/score), never last.ckpt, is the one fit end exports.
    assert want["best_model"].startswith("best-") and (got["best_model"], got["best_score"]) == (want["best_model"], want["best_score"])
    assert "not resumable" not in resumed.stderr  # Lightning sees a resumable train loader
    return tmp_path / "runs" / "resume" / "plain", tmp_path / "runs" / "resume" / "killed"


def test_teacher_resumes_exactly_after_sigkill_mid_epoch(tiny_bert_dir, small_glue_dir, tmp_path):
    check_resume_is_exact(tmp_path, small_glue_dir, ["--model", "kdlora.modules.Teacher", "--model.model_name_or_path", str(tiny_bert_dir),
                                     "--model.finetune", "full", "--model.learning_rate", "1e-3"], KILL_AT_STEP)


def test_student_with_cached_targets_resumes_exactly_after_sigkill_mid_epoch(tiny_bert_dir, student_dir, small_glue_dir, tmp_path):
    check_resume_is_exact(tmp_path, small_glue_dir, ["--model", "kdlora.modules.KDLoRAStudent", "--model.model_name_or_path", str(student_dir),
                                     "--model.teacher_path", str(tiny_bert_dir), "--model.teacher_targets", "cached",
                                     "--model.learning_rate", "1e-2"], KILL_AT_STEP)


def test_supernet_resumes_exactly_after_sigkill_mid_stage(tiny_bert_dir, small_glue_dir, tmp_path):
    # Stage 0 is epoch 0, stage 1 epoch 1: killed at step 20, in the middle of stage 1 (its own optimizer,
    # sampled subnets); and the palette report is written from the same best checkpoint.
    plain, resumed = check_resume_is_exact(tmp_path, small_glue_dir, ["--model", "kdlora.modules.SuperTransformer", "--model.model_name_or_path", str(tiny_bert_dir),
                                     "--model.stage_epochs", "[1, 1, 0]", "--model.num_subnets", "2", "--model.measure_latency", "false",
                                     "--model.palette", "[max, min]"], 20)
    assert (resumed / "palette.json").read_text() == (plain / "palette.json").read_text()
