"""Exact resume: `fit --ckpt_path last` after a SIGKILL mid-epoch ends where an uninterrupted run ends.

Each case runs the CLI's `fit` three times with the same seed on CPU: uninterrupted to the end; in a
child process killed with SIGKILL in the middle of an epoch, right after a step checkpoint (`last.ckpt`,
every few steps) or some steps past one (the resumed run replays them); and resumed from it with
`--ckpt_path last`. The resumed run must end with the
same trained weights (bit for bit), the same validation metrics, the same best checkpoint and the same
results.json. Dropout is on (the tiny models' default 0.1), so the random streams must resume too.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch

from conftest import make_tiny_model_dir

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
STEPS_PER_EPOCH = 8  # 64 SST-2 rows, batch size 8


class ResumeProbe(L.Callback):
    """Added to the runs under test (`--trainer.callbacks+=test_resume.ResumeProbe`), set by environment:
    KDLORA_PROBE_OUT: write the trained weights and last metrics there at the end of training;
    KDLORA_KILL_AT_STEP: SIGKILL this process when that step starts, i.e. after the step before it and
    its checkpoint, if one was due (checkpoints are saved in on_train_batch_end)."""

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
            "palette_history": sorted(getattr(pl_module, "palette_history", {})),
        }, indent=1))


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory) -> Path:
    """A 2-layer tiny BERT sharing the 4-layer tiny teacher's tokenizer."""
    return make_tiny_model_dir(tmp_path_factory.mktemp("resume_student") / "student", "bert", layers=2, seed=1)


def cli_args(tmp_path: Path, glue: Path, run: str, model_args: list[str], checkpoint_every: int, *extra: str) -> list[str]:
    """`fit` in tmp_path/runs/<run>/v (a fixed version, so `--ckpt_path last` finds its last.ckpt)."""
    return ["fit", *model_args,
            "--data.task", "sst2", "--data.data_dir", str(glue), "--data.cache_dir", str(tmp_path / "cache" / run),
            "--data.max_seq_length", "32", "--data.batch_size", "8",
            "--trainer.max_epochs", "2", "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false",
            "--trainer.logger.class_path", "lightning.pytorch.loggers.TensorBoardLogger",
            "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"), "--trainer.logger.init_args.name", run,
            "--trainer.logger.init_args.version", "v", "--last_checkpoint.every_n_train_steps", str(checkpoint_every),
            "--trainer.callbacks+=kdlora.training.callbacks.GLUEResults", "--trainer.callbacks+=test_resume.ResumeProbe", *extra]


def fit_here(args: list[str], probe_out: Path, monkeypatch) -> list[str]:
    """Run the CLI in this process (no second start-up); returns the warnings it raised."""
    from kdlora.cli import cli_main

    monkeypatch.setenv("KDLORA_PROBE_OUT", str(probe_out))
    monkeypatch.setenv("KDLORA_KILL_AT_STEP", "-1")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cli_main(args) == 0
    return [str(w.message) for w in caught]


def _fit_in_child(args: list[str], kill_at: int) -> None:
    from kdlora.cli import cli_main

    os.environ.pop("KDLORA_PROBE_OUT", None)
    os.environ["KDLORA_KILL_AT_STEP"] = str(kill_at)
    sys.exit(cli_main(args))


def check_resume_is_exact(tmp_path: Path, glue: Path, model_args: list[str], monkeypatch, kill_at: int,
                          checkpoint_every: int = 3) -> tuple[Path, Path]:
    """Run the three fits (killed when step `kill_at` starts); return the uninterrupted and the resumed run's directories."""
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)  # the CLI seeds this process: undo it afterwards
    # The killed run is the CLI in a child process (forked: no second start-up), killed by SIGKILL;
    # it overlaps the uninterrupted run, which runs here.
    killed = multiprocessing.get_context("fork").Process(
        target=_fit_in_child, args=(cli_args(tmp_path, glue, "killed", model_args, checkpoint_every), kill_at))
    killed.start()
    try:
        fit_here(cli_args(tmp_path, glue, "plain", model_args, checkpoint_every), tmp_path / "probe" / "plain", monkeypatch)
    finally:
        killed.join(timeout=600)
        if killed.exitcode is None:
            killed.kill()
    assert killed.exitcode == -signal.SIGKILL, f"the run to kill ended with exit code {killed.exitcode}"
    run, plain = tmp_path / "runs" / "killed" / "v", tmp_path / "runs" / "plain" / "v"
    last_step = lambda d: torch.load(d / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["global_step"]  # noqa: E731
    assert last_step(run) == kill_at - kill_at % checkpoint_every  # the steps since it are lost with the process

    caught = fit_here(cli_args(tmp_path, glue, "killed", model_args, checkpoint_every, "--ckpt_path", "last"), tmp_path / "probe" / "resumed", monkeypatch)
    want_dir, got_dir = tmp_path / "probe" / "plain", tmp_path / "probe" / "resumed"
    want, got = (json.loads((d / "run.json").read_text()) for d in (want_dir, got_dir))
    assert got["global_step"] == want["global_step"] == 2 * STEPS_PER_EPOCH
    assert last_step(run) == last_step(plain) == 2 * STEPS_PER_EPOCH  # last.ckpt is the end of training
    want_w, got_w = (torch.load(d / "weights.pt", weights_only=True) for d in (want_dir, got_dir))
    assert want_w.keys() == got_w.keys()
    diff = max(float((want_w[k].double() - got_w[k].double()).abs().max()) for k in want_w if want_w[k].is_floating_point())
    assert diff == 0.0, f"resumed weights differ from the uninterrupted run's by up to {diff:.3g}"
    assert got["metrics"] == want["metrics"]
    assert got["palette_history"] == want["palette_history"]  # supernet: every validation's palette, for the report
    # The best checkpoint (monitored val/score), never last.ckpt, is the one fit end exports.
    assert want["best_model"].startswith("best-") and (got["best_model"], got["best_score"]) == (want["best_model"], want["best_score"])
    results = [json.loads((d / "results.json").read_text()) for d in (plain, run)]
    assert results[1]["val_best"] == results[0]["val_best"] and results[1]["val_last"] == results[0]["val_last"]
    assert not [m for m in caught if "not resumable" in m]  # Lightning sees a resumable train loader
    # Nothing left of the killed run's lost steps: the same checkpoint files as the uninterrupted run.
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == sorted(p.name for p in (plain / "checkpoints").iterdir())
    return plain, run


def test_training_order_is_distributed_samplers_and_resumes_inside_an_epoch():
    from torch.utils.data import DistributedSampler

    from kdlora.data.samplers import ResumableShuffleSampler

    data = list(range(13))
    for rank in (0, 1):
        ours, reference = ResumableShuffleSampler(data, 2, rank, seed=5), DistributedSampler(data, 2, rank, shuffle=True, seed=5)
        for epoch in (0, 3):
            ours.set_epoch(epoch), reference.set_epoch(epoch)
            torch.manual_seed(epoch)  # the global RNG plays no part
            assert list(ours) == list(reference) and len(ours) == len(reference) == 7
    sampler, full = ResumableShuffleSampler(data, seed=5), {}
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        full[epoch] = list(sampler)
    assert sorted(full[0]) == data and full[0] != full[1]
    sampler.resume(epoch=1, start=4)
    sampler.set_epoch(1)  # Lightning sets the epoch it resumes: the position holds...
    assert list(sampler) == list(sampler) == full[1][4:]
    sampler.set_epoch(2)  # ...until the next epoch, which starts from its beginning
    assert len(list(sampler)) == 13 and len(sampler) == 13


def test_train_loader_shards_over_ddp_ranks_with_idx_aligned(small_glue_dir, tiny_bert_dir, tmp_path):
    from types import SimpleNamespace

    from kdlora.data.glue import GLUEDataModule

    dm = GLUEDataModule("sst2", str(tiny_bert_dir), data_dir=str(small_glue_dir), batch_size=8, max_seq_length=32,
                        cache_dir=str(tmp_path))
    dm.setup("fit")
    shards = []
    for rank in (0, 1):  # what a DDP trainer gives each rank (Lightning keeps the sampler: it is a DistributedSampler)
        dm.trainer = SimpleNamespace(distributed_sampler_kwargs={"num_replicas": 2, "rank": rank},
                                     _accelerator_connector=SimpleNamespace(use_distributed_sampler=True))
        batches = list(dm.train_dataloader())
        shards.append([int(i) for b in batches for i in b["idx"]])
        for b in batches:  # each row is the example its idx names
            for row, i in enumerate(b["idx"].tolist()):
                n = int(b["attention_mask"][row].sum())
                assert b["input_ids"][row, :n].tolist() == dm.datasets["train"][i]["input_ids"]
    assert len(shards[0]) == len(shards[1]) == 32 and sorted(shards[0] + shards[1]) == list(range(64))


@pytest.mark.parametrize("kill_at, checkpoint_every", [(6, 3), (8, 4), (10, 7)], ids=["mid-epoch", "epoch-end", "between-checkpoints"])
def test_teacher_resumes_exactly_after_sigkill(tiny_bert_dir, small_glue_dir, tmp_path, monkeypatch, kill_at, checkpoint_every):
    # Mid-epoch: killed at step 6 of 8, the rest of epoch 0, its validation and epoch 1 are left to the
    # resumed run. Epoch end: the step checkpoint due at the epoch's last step (8) is written after the
    # epoch's validation, so the resumed run knows that epoch's best checkpoint and metrics. Between
    # checkpoints: killed at step 10, three steps and epoch 0's validation past the checkpoint of step 7,
    # which the resumed run replays.
    check_resume_is_exact(tmp_path, small_glue_dir, ["--model", "kdlora.kd.Teacher", "--model.model_name_or_path", str(tiny_bert_dir),
                                                     "--model.finetune", "full", "--model.optimizer.learning_rate", "1e-3"],
                          monkeypatch, kill_at, checkpoint_every)


@pytest.mark.parametrize("group_by_length", ["false", "true"], ids=["shuffled", "length-grouped"])
def test_student_with_cached_targets_resumes_exactly_after_sigkill_mid_epoch(tiny_bert_dir, student_dir, small_glue_dir, tmp_path, monkeypatch,
                                                                             group_by_length):
    check_resume_is_exact(tmp_path, small_glue_dir, ["--model", "kdlora.kd.KDLoRAStudent", "--model.model_name_or_path", str(student_dir),
                                                     "--model.teacher_path", str(tiny_bert_dir), "--model.teacher_targets.mode", "cached",
                                                     "--model.optimizer.learning_rate", "1e-2", "--data.group_by_length", group_by_length],
                          monkeypatch, kill_at=6)


def test_supernet_resumes_exactly_after_sigkill_mid_stage(tiny_bert_dir, small_glue_dir, tmp_path, monkeypatch):
    # Stage 0 is epoch 0, stage 1 epoch 1: killed at step 12, in the middle of stage 1 (its own optimizer,
    # sampled subnets), after epoch 0's validation: its best checkpoint and palette must survive the kill.
    plain, resumed = check_resume_is_exact(
        tmp_path, small_glue_dir, ["--model", "kdlora.mlfs.SuperTransformer", "--model.model_name_or_path", str(tiny_bert_dir),
                                   "--model.stages.epochs", "[1, 1, 0]", "--model.sampling.num_subnets", "2",
                                   "--model.evaluation.measure_latency", "false", "--model.evaluation.members", "[max, min]"],
                                  monkeypatch, kill_at=12)
    assert (resumed / "palette.json").read_text() == (plain / "palette.json").read_text()


def test_fast_dev_run_writes_no_checkpoint(tiny_bert_dir, small_glue_dir, tmp_path, monkeypatch):
    from kdlora.cli import cli_main

    monkeypatch.chdir(tmp_path)  # a fast_dev_run has no log dir: Lightning's default is the working directory
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    assert cli_main(["fit", "--model", "kdlora.kd.Teacher", "--model.model_name_or_path", str(tiny_bert_dir),
                     "--model.export.enabled", "false", "--data.task", "sst2", "--data.data_dir", str(small_glue_dir),
                     "--data.cache_dir", str(tmp_path / "cache"), "--data.max_seq_length", "32",
                     "--trainer.fast_dev_run", "true", "--trainer.enable_progress_bar", "false"]) == 0
    assert not list(tmp_path.rglob("*.ckpt"))


def test_ckpt_path_last_resumes_the_newest_version_of_a_versioned_run(tiny_bert_dir, small_glue_dir, tmp_path, monkeypatch, capsys):
    """The configs log each run to a new version_N: `--ckpt_path last` resumes the newest version holding a
    last.ckpt and logs on into it (Lightning alone would look in a new, empty version and start over)."""
    from kdlora.cli import cli_main

    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)

    def fit(epochs: int, *extra: str) -> int:
        return cli_main(["fit", "--model", "kdlora.kd.Teacher", "--model.model_name_or_path", str(tiny_bert_dir),
                         "--model.export.enabled", "false", "--data.task", "sst2", "--data.data_dir", str(small_glue_dir),
                         "--data.cache_dir", str(tmp_path / "cache"), "--data.max_seq_length", "32", "--data.batch_size", "8",
                         "--trainer.max_epochs", str(epochs), "--trainer.enable_progress_bar", "false",
                         "--trainer.logger.class_path", "lightning.pytorch.loggers.TensorBoardLogger",
                         "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"), "--trainer.logger.init_args.name", "fft",
                         "--trainer.callbacks+=kdlora.training.callbacks.GLUEResults", *extra])

    runs = tmp_path / "runs" / "fft"
    assert fit(1, "--ckpt_path", "last") == 0  # nothing to resume yet: a fresh run in version_0
    assert "no checkpoints/last.ckpt" in capsys.readouterr().err
    assert fit(1) == 0  # a second, independent run: version_1
    assert sorted(d.name for d in runs.iterdir()) == ["version_0", "version_1"]
    assert fit(2, "--ckpt_path", "last") == 0  # resumes version_1 (the newest), into version_1
    assert f"resuming {runs / 'version_1' / 'checkpoints' / 'last.ckpt'}" in capsys.readouterr().err
    assert sorted(d.name for d in runs.iterdir()) == ["version_0", "version_1"]
    last = torch.load(runs / "version_1" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 2 * STEPS_PER_EPOCH
    results = json.loads((runs / "version_1" / "results.json").read_text())
    assert results["val_last"]["epoch"] == 1
    assert torch.load(runs / "version_0" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["global_step"] == STEPS_PER_EPOCH


@pytest.mark.parametrize("stop, steps", [(["--trainer.max_epochs", "5"], 5 * STEPS_PER_EPOCH),
                                         (["--trainer.max_steps", "12"], 12)], ids=["epochs", "max-steps-mid-epoch"])
def test_last_checkpoint_is_the_end_of_training(tiny_bert_dir, small_glue_dir, tmp_path, monkeypatch, stop, steps):
    """A run whose last step is no multiple of `every_n_train_steps` (7) still ends with last.ckpt at that step."""
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    args = cli_args(tmp_path, small_glue_dir, "run", ["--model", "kdlora.kd.Teacher", "--model.model_name_or_path", str(tiny_bert_dir),
                                                      "--model.finetune", "full", "--model.export.enabled", "false"], 7, *stop)
    fit_here(args, tmp_path / "probe", monkeypatch)
    last = torch.load(tmp_path / "runs" / "run" / "v" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == steps == json.loads((tmp_path / "probe" / "run.json").read_text())["global_step"]
    trained = torch.load(tmp_path / "probe" / "weights.pt", weights_only=True)
    assert last["state_dict"].keys() == trained.keys()
    assert all(torch.equal(last["state_dict"][k], trained[k]) for k in trained)  # the trained weights, not an earlier step's


def test_a_new_run_in_a_used_run_directory_overwrites_no_checkpoint(tiny_bert_dir, small_glue_dir, tmp_path, monkeypatch):
    """Only a resumed run rewrites a best checkpoint in place (the steps it replays); a new run started in
    the same directory writes its own beside the earlier run's."""
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    model = ["--model", "kdlora.kd.Teacher", "--model.model_name_or_path", str(tiny_bert_dir), "--model.export.enabled", "false"]
    checkpoints = tmp_path / "runs" / "run" / "v" / "checkpoints"
    fit_here(cli_args(tmp_path, small_glue_dir, "run", model, 100, "--trainer.max_epochs", "1"), tmp_path / "probe", monkeypatch)
    first = {p.name: p.read_bytes() for p in checkpoints.iterdir()}
    assert sorted(first) == ["best-0-8.ckpt", "last.ckpt"]
    fit_here(cli_args(tmp_path, small_glue_dir, "run", model, 100, "--trainer.max_epochs", "1", "--seed_everything", "7"),
             tmp_path / "probe", monkeypatch)
    assert {name: (checkpoints / name).read_bytes() for name in first} == first
    assert len(list(checkpoints.iterdir())) == 4  # the new run's best and last beside them
