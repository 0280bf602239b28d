"""The command line: fit/test/predict through LightningCLI, and one clear error for bad input."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kdlora.cli import cli_main

REPO = Path(__file__).resolve().parents[1]


def _args(model_dir, glue_dir, tmp_path, *extra):
    return [
        "--model", "kdlora.modules.Teacher",
        "--model.model_name_or_path", str(model_dir),
        "--data.data_dir", str(glue_dir),
        "--data.cache_dir", str(tmp_path / "cache"),
        "--data.batch_size", "8",
        "--trainer.logger.class_path", "lightning.pytorch.loggers.TensorBoardLogger",
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
        "--trainer.enable_progress_bar", "false",
        *extra,
    ]


@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_train_py_fit_fast_dev_run(tiny_bert_dir, small_glue_dir, tmp_path, finetune):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [sys.executable, "train.py", "fit", *_args(tiny_bert_dir, small_glue_dir, tmp_path,
           "--data.task", "rte", "--model.finetune", finetune, "--trainer.fast_dev_run", "true",
           "--model.export_dir", str(tmp_path / "export"))]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "export" / "config.json").is_file()


def test_fit_then_test_and_predict_submission(tiny_bert_dir, small_glue_dir, tmp_path):
    glue = tmp_path / "glue"
    (glue / "RTE").mkdir(parents=True)
    for f in ("train.tsv", "dev.tsv"):
        (glue / "RTE" / f).write_text((small_glue_dir / "RTE" / f).read_text())
    # GLUE test files have no labels and carry their own index column.
    (glue / "RTE" / "test.tsv").write_text(
        "index\tsentence1\tsentence2\n7\tthe company said it\tit said\n3\tshe was first\tshe was last\n")
    base = _args(tiny_bert_dir, glue, tmp_path, "--data.task", "rte", "--model.export", "false")
    assert cli_main(["fit", *base, "--trainer.max_epochs", "1"]) == 0
    ckpts = sorted((tmp_path / "runs").rglob("best-*.ckpt"))
    assert len(ckpts) == 1
    # Beside the best one, the resume checkpoint, written at the end of training (8 steps < every_n_train_steps).
    assert sorted(p.name for p in ckpts[0].parent.iterdir()) == [ckpts[0].name, "last.ckpt"]
    # Checkpoint hparams are primitive: loadable with weights_only=True.
    assert torch.load(ckpts[0], weights_only=True, map_location="cpu")["hyper_parameters"]["task"] == "rte"
    assert cli_main(["test", *base, "--ckpt_path", str(ckpts[0])]) == 0
    out_dir = tmp_path / "pred"
    assert cli_main(["predict", *base, "--ckpt_path", str(ckpts[0]), "--predictions.output_dir", str(out_dir)]) == 0
    lines = (out_dir / "RTE.tsv").read_text().splitlines()
    assert lines[0] == "index\tprediction"
    assert [line.split("\t")[0] for line in lines[1:]] == ["3", "7"]
    assert all(line.split("\t")[1] in ("entailment", "not_entailment") for line in lines[1:])


@pytest.mark.parametrize("extra, message", [
    (["--data.task", "foo"], "unknown GLUE task 'foo'"),
    (["--data.task", "qnli"], "QNLI/train.tsv"),  # only dev is present
    (["--data.task", "rte", "--model.finetune", "partial"], "finetune"),
    (["--data.task", "rte", "--data.holdout_fraction", "1.5"], "holdout_fraction"),
    (["--data.task", "rte", "--data.max_train_samples", "0", "--trainer.fast_dev_run", "true", "--model.export", "false"], "max_train_samples must be at least 1 (or null for all rows), got 0"),
    (["--data.task", "rte", "--data.max_eval_samples", "-1", "--trainer.fast_dev_run", "true", "--model.export", "false"], "max_eval_samples must be at least 1 (or null for all rows), got -1"),
])
def test_bad_input_is_one_clear_error_and_leaves_no_output(tiny_bert_dir, small_glue_dir, tmp_path, capsys, extra, message):
    code = cli_main(["fit", *_args(tiny_bert_dir, small_glue_dir, tmp_path, *extra)])
    err = capsys.readouterr().err
    assert code != 0 and message in err
    assert not (tmp_path / "runs").exists()


def test_missing_checkpoint_is_reported(tiny_bert_dir, small_glue_dir, tmp_path, capsys):
    code = cli_main(["test", *_args(tiny_bert_dir, small_glue_dir, tmp_path, "--data.task", "rte"),
                     "--ckpt_path", str(tmp_path / "nope.ckpt")])
    assert code != 0 and "nope.ckpt" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    # an option the module does not take (the supernet's palette given to a Teacher)
    (["--model.init_args.palette", "[max]"],
     "Parser key \"model\": Problem with given class_path 'kdlora.modules.Teacher': Option 'palette' is not accepted"),
    # a value of the wrong type, nested in the model's Union, and at the top level
    (["--model.lora_r", "abc"], "Parser key \"lora_r\": Expected a <class 'int'>. Got value: abc"),
    (["--trainer.max_epochs", "two"], "Parser key \"trainer.max_epochs\": Expected a <class 'int'>; got two"),
    (["--bogus", "1"], "unrecognized arguments: --bogus 1"),
])
def test_parser_errors_are_one_line_with_their_cause(tiny_bert_dir, small_glue_dir, tmp_path, capsys, extra, message):
    code = cli_main(["fit", *_args(tiny_bert_dir, small_glue_dir, tmp_path, "--data.task", "rte", *extra)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("kdlora: error: ") and message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "runs").exists()


def test_fit_with_holdout_selects_on_it_then_scores_dev(tiny_bert_dir, small_glue_dir, tmp_path):
    """`data.holdout_fraction`: selection on the held-out part of train, then the best checkpoint's dev
    score in results.json["test"], equal to the exported model's accuracy on dev computed here."""
    import csv
    import json

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    export = tmp_path / "export"
    args = _args(tiny_bert_dir, small_glue_dir, tmp_path, "--data.task", "rte", "--data.holdout_fraction", "0.25",
                 "--model.export_dir", str(export), "--model.learning_rate", "1e-3", "--trainer.max_epochs", "2",
                 "--trainer.callbacks+=kdlora.callbacks.GLUEResults")
    assert cli_main(["fit", *args]) == 0
    results = json.loads(next((tmp_path / "runs").rglob("results.json")).read_text())
    assert {"val_best", "test"} <= results.keys()
    with open(small_glue_dir / "RTE" / "dev.tsv") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    tokenizer, model = AutoTokenizer.from_pretrained(export), AutoModelForSequenceClassification.from_pretrained(export).eval()
    with torch.no_grad():
        enc = tokenizer([r["sentence1"] for r in rows], [r["sentence2"] for r in rows], padding=True, truncation=True,
                        max_length=128, return_tensors="pt")
        predicted = model(**enc).logits.argmax(-1).tolist()
    labels = [["entailment", "not_entailment"].index(r["label"]) for r in rows]
    expected = sum(p == y for p, y in zip(predicted, labels)) / len(rows)
    assert results["test"]["accuracy"] == pytest.approx(expected, abs=1e-6)
