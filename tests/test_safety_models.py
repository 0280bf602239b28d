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
from kdlora.data.tasks import get_task
from kdlora.kd import Teacher
from kdlora.kd.student import load_teacher
from kdlora.training.args import ExportArgs, LoRAArgs


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
    teacher = Teacher(str(tiny_bert_dir), task="sst2", export=ExportArgs(enabled=False))
    good = lightning_checkpoint(root / "teacher-sst2.ckpt", "kdlora.kd.Teacher", teacher.state_dict(), **teacher.hparams)
    (root / "notes.ckpt").write_text("best run: epoch 3, val/score 0.91\n")
    (root / "truncated.ckpt").write_bytes(good.read_bytes()[: good.stat().st_size // 2])  # an interrupted copy
    torch.save(teacher.state_dict(), root / "weights.pt")
    (root / "a_directory.ckpt").mkdir()
    return {
        "teacher": good,
        "student": lightning_checkpoint(root / "student.ckpt", "kdlora.kd.KDLoRAStudent", model_name_or_path=str(tiny_bert_dir),
                                        teacher_path=str(good), task="sst2", student_layers=[0, 2]),
        "supernet": lightning_checkpoint(root / "supernet.ckpt", "kdlora.mlfs.SuperTransformer",
                                         model_name_or_path=str(tiny_bert_dir), task="sst2"),
        **{p.stem: p for p in root.iterdir() if p.stem in ("notes", "truncated", "weights", "a_directory")},
    }


def _cli(subcommand, model_dir, glue_dir, tmp_path, *extra):
    return cli_main([
        subcommand, "--model", "kdlora.kd.Teacher", "--model.model_name_or_path", str(model_dir),
        "--data.data_dir", str(glue_dir), "--data.cache_dir", str(tmp_path / "cache"), "--data.batch_size", "8",
        "--trainer.logger.class_path", "lightning.pytorch.loggers.TensorBoardLogger",
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"), "--trainer.enable_progress_bar", "false",
        "--trainer.max_steps", "1", *extra])


def _one_error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("kdlora: error: ")]
    assert len(lines) == 1, lines
    return lines[0]


# ---- checkpoints: one check (kdlora.training.checkpoint.read_checkpoint) wherever a user names one -----------------

WRONG_CHECKPOINTS = [
    ("notes", "sst2", "notes.ckpt is not a Lightning checkpoint (unreadable: not the zip archive torch.save writes"),
    ("truncated", "sst2", "truncated.ckpt is not a Lightning checkpoint (unreadable: not the zip archive torch.save writes"),
    ("weights", "sst2", "weights.pt is not a Lightning checkpoint: it holds a plain state_dict"),
    ("a_directory", "sst2", "a_directory.ckpt is not a file (it is a directory)"),
    ("student", "sst2", "student.ckpt is a checkpoint of KDLoRAStudent (kdlora.kd.KDLoRAStudent), expected Teacher"),
    ("supernet", "sst2", "supernet.ckpt is a checkpoint of SuperTransformer (kdlora.mlfs.SuperTransformer), expected Teacher"),
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
    from kdlora.mlfs.export import main

    for name, message in [("teacher", "teacher-sst2.ckpt is a checkpoint of Teacher (kdlora.kd.Teacher), expected SuperTransformer"),
                          ("truncated", "truncated.ckpt is not a Lightning checkpoint (unreadable:"),
                          ("weights", "weights.pt is not a Lightning checkpoint: it holds a plain state_dict")]:
        assert main(["--checkpoint", str(checkpoints[name]), "--subnet", "max", "--out", str(tmp_path / "out")]) == 2
        assert message in _one_error_line(capsys)
        assert not (tmp_path / "out").exists()



def test_a_checkpoint_written_under_the_earlier_module_layout_still_reads(checkpoints, tiny_bert_dir, tmp_path):
    # Checkpoints record the class path of their time (``kdlora.modules.Teacher``): a Teacher's still reads as
    # a Teacher, another module's is still refused by its class name.
    from kdlora.training.checkpoint import CheckpointError, read_checkpoint

    teacher = torch.load(checkpoints["teacher"], weights_only=True)
    old = lightning_checkpoint(tmp_path / "old-teacher.ckpt", "kdlora.modules.Teacher", teacher["state_dict"],
                               **{k: v for k, v in teacher["hyper_parameters"].items() if not k.startswith("_")})
    assert read_checkpoint(old, Teacher, task="sst2")["hyper_parameters"]["_class_path"] == "kdlora.modules.Teacher"
    model, tokenizer_source = load_teacher(str(old), get_task("sst2"))
    assert tokenizer_source == str(tiny_bert_dir) and not model.training
    student = lightning_checkpoint(tmp_path / "old-student.ckpt", "kdlora.modules.KDLoRAStudent",
                                   model_name_or_path=str(tiny_bert_dir), task="sst2")
    with pytest.raises(CheckpointError, match=r"is a checkpoint of KDLoRAStudent \(kdlora.modules.KDLoRAStudent\), expected Teacher"):
        read_checkpoint(student, Teacher)

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
    teacher = Teacher(str(base_model_dir), task="sst2", export=ExportArgs(enabled=False))
    ckpt = lightning_checkpoint(tmp_path / "trained.ckpt", "kdlora.kd.Teacher", teacher.state_dict(), **teacher.hparams)
    assert _cli("validate", base_model_dir, small_glue_dir, tmp_path / "b", "--data.task", "sst2", "--ckpt_path", str(ckpt)) == 0


# ---- only the classification head may start from random weights ---------------------------------------------

def _with_vocab_size(src: Path, dst: Path, vocab_size: int) -> Path:
    """A copy of a model directory whose config.json disagrees with its weights about vocab_size."""
    import json
    import shutil

    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**config, "vocab_size": vocab_size}))
    return dst


@pytest.mark.parametrize("vocab_size", [1000, 100])
def test_weights_that_do_not_fit_the_config_are_an_error_not_random(tiny_bert_dir, tmp_path, vocab_size):
    from kdlora.kd import KDLoRAStudent

    model_dir = _with_vocab_size(tiny_bert_dir, tmp_path / "model", vocab_size)
    message = rf"bert\.embeddings\.word_embeddings\.weight is \(200, 32\) in the checkpoint but \({vocab_size}, 32\) in the config"
    with pytest.raises(ValueError, match=message):
        Teacher(str(model_dir), task="rte", export=ExportArgs(enabled=False))
    with pytest.raises(ValueError, match=message):
        KDLoRAStudent(str(model_dir), str(tiny_bert_dir), task="rte", export=ExportArgs(enabled=False))


def test_student_with_a_config_that_does_not_fit_its_weights_is_refused_by_the_cli(tiny_bert_dir, small_glue_dir, tmp_path, capsys):
    model_dir = _with_vocab_size(tiny_bert_dir, tmp_path / "student", 1000)
    code = _cli("fit", model_dir, small_glue_dir, tmp_path, "--data.task", "rte", "--model", "kdlora.kd.KDLoRAStudent",
                "--model.model_name_or_path", str(model_dir), "--model.teacher_path", str(tiny_bert_dir))
    line = _one_error_line(capsys)
    assert code == 2 and f"model '{model_dir}': only the classification head may start from random weights" in line
    assert "bert.embeddings.word_embeddings.weight is (200, 32) in the checkpoint but (1000, 32) in the config" in line
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("family", ["bert", "roberta", "deberta-v2", "distilbert"])
def test_a_pretrained_encoder_without_head_still_loads_with_a_new_head(tmp_path, family):
    # bert-base-uncased & co.: the head (DeBERTa's pooler, DistilBERT's pre_classifier, BERT's classifier) is new.
    from transformers import AutoModel

    write_tiny_tokenizer(tmp_path)
    AutoModel.from_config(tiny_config(family, 200)).save_pretrained(tmp_path)
    module = Teacher(str(tmp_path), task="stsb", export=ExportArgs(enabled=False))
    new_modules = {name.split(".")[0] for name in module.newly_initialised}
    assert new_modules and new_modules <= {"classifier", "pre_classifier", "pooler"}


# ---- a tokenizer larger than the embedding table ------------------------------------------------------------

@pytest.fixture(scope="module")
def small_vocab_dir(tmp_path_factory) -> Path:
    """A consistent model (config and weights) of 100 embeddings, saved with a 200-token tokenizer."""
    from transformers import AutoModelForSequenceClassification

    directory = tmp_path_factory.mktemp("small_vocab")
    write_tiny_tokenizer(directory)
    AutoModelForSequenceClassification.from_config(tiny_config("bert", 100)).save_pretrained(directory)
    return directory


def test_tokenizer_larger_than_the_embedding_table_is_an_error(small_vocab_dir, tiny_bert_dir):
    from kdlora.kd import KDLoRAStudent
    from kdlora.mlfs import SuperTransformer

    message = rf"tokenizer '{small_vocab_dir}' has 200 tokens but model '{small_vocab_dir}' embeds only 100"
    with pytest.raises(ValueError, match=message):
        Teacher(str(small_vocab_dir), task="rte", export=ExportArgs(enabled=False))
    with pytest.raises(ValueError, match=message):  # as the student
        KDLoRAStudent(str(small_vocab_dir), str(tiny_bert_dir), task="rte", export=ExportArgs(enabled=False))
    with pytest.raises(ValueError, match=message):  # as the teacher
        KDLoRAStudent(str(tiny_bert_dir), str(small_vocab_dir), task="rte", export=ExportArgs(enabled=False))
    with pytest.raises(ValueError, match=message):
        SuperTransformer(str(small_vocab_dir), task="rte", export={"enabled": False}, evaluation={"measure_latency": False})


def test_tokenizer_larger_than_the_embedding_table_is_refused_by_the_cli(small_vocab_dir, small_glue_dir, tmp_path, capsys):
    code = _cli("fit", small_vocab_dir, small_glue_dir, tmp_path, "--data.task", "rte")
    assert code == 2 and "has 200 tokens but model" in _one_error_line(capsys)
    assert not (tmp_path / "runs").exists()


# ---- LoRA targets must all exist ----------------------------------------------------------------------------

def test_every_lora_target_must_match_a_module(tiny_model_dirs):
    from kdlora.kd import KDLoRAStudent

    bert, distilbert = str(tiny_model_dirs["bert"]), str(tiny_model_dirs["distilbert"])
    with pytest.raises(ValueError, match=r"unknown lora\.targets 'bogus': no module of this bert model has that name; "
                                         r"its linear layers are: classifier, dense, key, query, value$"):
        Teacher(bert, task="rte", finetune="lora", lora=LoRAArgs(targets=["query", "bogus"]))
    with pytest.raises(ValueError, match=r"unknown lora\.targets 'query', 'value':.*distilbert.*lin1, lin2, out_lin, pre_classifier, q_lin, v_lin"):
        Teacher(distilbert, task="rte", finetune="lora", lora=LoRAArgs(targets=["query", "value"]))
    with pytest.raises(ValueError, match=r"unknown lora\.targets 'bogus'"):
        KDLoRAStudent(bert, bert, task="rte", student_layers=[0, 2], lora=LoRAArgs(targets=["query", "bogus"]),
                      export=ExportArgs(enabled=False))
    # Names as peft matches them: a module's name or a dotted suffix of it.
    module = Teacher(bert, task="rte", finetune="lora", lora=LoRAArgs(targets=["query", "attention.output.dense"]))
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in module.named_parameters() if ".lora_A." in n}
    assert any(n.endswith("attention.self.query") for n in adapted) and any(n.endswith("attention.output.dense") for n in adapted)
    assert not any(n.endswith("intermediate.dense") for n in adapted)


def test_unknown_lora_target_is_refused_by_the_cli(tiny_bert_dir, small_glue_dir, tmp_path, capsys):
    code = _cli("fit", tiny_bert_dir, small_glue_dir, tmp_path, "--data.task", "rte", "--model.finetune", "lora",
                "--model.lora.targets", "[query, bogus]")
    assert code == 2 and "unknown lora.targets 'bogus': no module of this bert model has that name" in _one_error_line(capsys)
    assert not (tmp_path / "runs").exists()
