"""The wrong model for the job is one clear error: checkpoints of another module, task or kind, unreadable
checkpoints, evaluating an untrained head, weights silently re-initialised, a tokenizer larger than the
embedding table, LoRA targets that match nothing."""

from __future__ import annotations

from pathlib import Path

import lightning
import pytest
import torch

from conftest import tiny_config, write_tiny_tokenizer
from kdlora.cli import cli_main
from kdlora.modules import Teacher
from kdlora.modules.student import load_teacher
from kdlora.tasks import get_task


def lightning_checkpoint(path: Path, class_path: str, state_dict=None, **hparams) -> Path:
    """A checkpoint as LightningCLI writes one: the module's class recorded among its hyperparameters."""
    torch.save({"epoch": 0, "global_step": 0, "pytorch-lightning_version": lightning.__version__,
                "state_dict": state_dict or {},
                "hyper_parameters": {"_class_path": class_path, **hparams,
                                     "_instantiator": "lightning.pytorch.cli.instantiate_module"}}, path)
    return path


@pytest.fixture(scope="module")
def base_model_dir(tmp_path_factory) -> Path:
    """A pretrained encoder without a classification head (like bert-base-uncased)."""
    from transformers import BertModel

    directory = tmp_path_factory.mktemp("bert_base")
    write_tiny_tokenizer(directory)
    BertModel(tiny_config("bert", 200)).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_bert_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    teacher = Teacher(str(tiny_bert_dir), task="sst2", export=False)
    good = lightning_checkpoint(root / "teacher-sst2.ckpt", "kdlora.modules.Teacher", teacher.state_dict(), **teacher.hparams)
    (root / "notes.ckpt").write_text("best run: epoch 3, val/score 0.91\n")
    (root / "truncated.ckpt").write_bytes(good.read_bytes()[: good.stat().st_size // 2])  # an interrupted copy
    torch.save(teacher.state_dict(), root / "weights.pt")
    (root / "a_directory.ckpt").mkdir()
    return {
        "teacher": good,
        "student": lightning_checkpoint(root / "student.ckpt", "kdlora.modules.KDLoRAStudent", model_name_or_path=str(tiny_bert_dir),
                                        teacher_path=str(good), task="sst2", student_layers=[0, 2]),
        "supernet": lightning_checkpoint(root / "supernet.ckpt", "kdlora.modules.SuperTransformer",
                                         model_name_or_path=str(tiny_bert_dir), task="sst2"),
        **{p.stem: p for p in root.iterdir() if p.stem in ("notes", "truncated", "weights", "a_directory")},
    }


def _cli(subcommand, model_dir, glue_dir, tmp_path, *extra):
    return cli_main([
        subcommand, "--model", "kdlora.modules.Teacher", "--model.model_name_or_path", str(model_dir),
        "--data.data_dir", str(glue_dir), "--data.cache_dir", str(tmp_path / "cache"), "--data.batch_size", "8",
        "--trainer.logger.class_path", "lightning.pytorch.loggers.TensorBoardLogger",
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"), "--trainer.enable_progress_bar", "false",
        "--trainer.max_steps", "1", *extra])


def _one_error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("kdlora: error: ")]
    assert len(lines) == 1, lines
    return lines[0]


# ---- checkpoints: one check (kdlora.checkpoint.read_checkpoint) wherever a user names one -----------------

WRONG_CHECKPOINTS = [
    ("notes", "sst2", "notes.ckpt is not a Lightning checkpoint (unreadable: not the zip archive torch.save writes"),
    ("truncated", "sst2", "truncated.ckpt is not a Lightning checkpoint (unreadable: not the zip archive torch.save writes"),
    ("weights", "sst2", "weights.pt is not a Lightning checkpoint: it holds a plain state_dict"),
    ("a_directory", "sst2", "a_directory.ckpt is not a file (it is a directory)"),
    ("student", "sst2", "student.ckpt is a checkpoint of KDLoRAStudent (kdlora.modules.KDLoRAStudent), expected Teacher"),
    ("supernet", "sst2", "supernet.ckpt is a checkpoint of SuperTransformer (kdlora.modules.SuperTransformer), expected Teacher"),
    ("teacher", "rte", "teacher-sst2.ckpt was trained on task 'sst2', not 'rte'"),
]


@pytest.mark.parametrize("subcommand", ["test", "predict", "fit"])
@pytest.mark.parametrize("name, task, message", WRONG_CHECKPOINTS)
def test_cli_refuses_the_wrong_checkpoint_before_anything_runs(tiny_bert_dir, small_glue_dir, tmp_path, capsys, checkpoints,
                                                                subcommand, name, task, message):
    code = _cli(subcommand, tiny_bert_dir, small_glue_dir, tmp_path, "--data.task", task, "--ckpt_path", str(checkpoints[name]),
                "--predictions.output_dir", str(tmp_path / "submission"))
    assert code == 2 and message in _one_error_line(capsys)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "submission").exists()


@pytest.mark.parametrize("name, task, message", WRONG_CHECKPOINTS)
def test_student_refuses_the_wrong_teacher_checkpoint(checkpoints, name, task, message):
    if name == "a_directory":  # a directory is read as an exported Teacher
        message = "no config.json"
    with pytest.raises((ValueError, FileNotFoundError), match=message.replace("(", r"\(").replace(")", r"\)")):
        load_teacher(str(checkpoints[name]), get_task(task))


def test_export_refuses_anything_but_a_supernet_checkpoint(checkpoints, tmp_path, capsys):
    from kdlora.elastic.export import main

    for name, message in [("teacher", "teacher-sst2.ckpt is a checkpoint of Teacher (kdlora.modules.Teacher), expected SuperTransformer"),
                          ("truncated", "truncated.ckpt is not a Lightning checkpoint (unreadable:"),
                          ("weights", "weights.pt is not a Lightning checkpoint: it holds a plain state_dict")]:
        assert main(["--checkpoint", str(checkpoints[name]), "--subnet", "max", "--out", str(tmp_path / "out")]) == 2
        assert message in _one_error_line(capsys)
        assert not (tmp_path / "out").exists()


# ---- evaluating or predicting needs trained weights ---------------------------------------------------------

@pytest.mark.parametrize("subcommand", ["validate", "test", "predict"])
def test_evaluating_an_untrained_head_without_a_checkpoint_is_refused(base_model_dir, small_glue_dir, tmp_path, capsys, subcommand):
    code = _cli(subcommand, base_model_dir, small_glue_dir, tmp_path, "--data.task", "sst2",
                "--predictions.output_dir", str(tmp_path / "submission"))
    line = _one_error_line(capsys)
    assert code == 2 and f"{subcommand} without --ckpt_path would use the untrained classifier that {base_model_dir} lacks" in line
    assert not (tmp_path / "runs").exists() and not (tmp_path / "submission").exists()


def test_evaluating_a_trained_head_needs_no_checkpoint_and_an_untrained_one_takes_a_checkpoint(
        base_model_dir, tiny_bert_dir, small_glue_dir, tmp_path):
    # A fine-tuned model directory (a run's export/) has its trained head: no checkpoint needed.
    assert _cli("validate", tiny_bert_dir, small_glue_dir, tmp_path / "a", "--data.task", "sst2") == 0
    # A head-less model is fine once a checkpoint of it supplies the trained head.
    teacher = Teacher(str(base_model_dir), task="sst2", export=False)
    ckpt = lightning_checkpoint(tmp_path / "trained.ckpt", "kdlora.modules.Teacher", teacher.state_dict(), **teacher.hparams)
    assert _cli("validate", base_model_dir, small_glue_dir, tmp_path / "b", "--data.task", "sst2", "--ckpt_path", str(ckpt)) == 0
