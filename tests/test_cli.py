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
        "--model", "kdlora.kd.Teacher",
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
           "--model.export.dir", str(tmp_path / "export"))]
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
    base = _args(tiny_bert_dir, glue, tmp_path, "--data.task", "rte", "--model.export.enabled", "false")
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
    (["--data.task", "rte", "--data.max_train_samples", "0", "--trainer.fast_dev_run", "true", "--model.export.enabled", "false"], "max_train_samples must be at least 1 (or null for all rows), got 0"),
    (["--data.task", "rte", "--data.max_eval_samples", "-1", "--trainer.fast_dev_run", "true", "--model.export.enabled", "false"], "max_eval_samples must be at least 1 (or null for all rows), got -1"),
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
     "Parser key \"model\": Problem with given class_path 'kdlora.kd.Teacher': Option 'palette' is not accepted"),
    # a value of the wrong type, nested in the model's Union, and at the top level
    (["--model.lora.r", "abc"], "Parser key \"lora.r\": Expected a <class 'int'>. Got value: abc"),
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
                 "--model.export.dir", str(export), "--model.optimizer.learning_rate", "1e-3", "--trainer.max_epochs", "2",
                 "--trainer.callbacks+=kdlora.training.callbacks.GLUEResults")
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


# ---- decoders: the causal-LM CLI ------------------------------------------------------------------

DECODER_RECIPE = REPO / "configs" / "decoder" / "smollm2-mlfs.yaml"


@pytest.mark.parametrize("where", ["command", "config"])
def test_an_old_class_path_fails_naming_its_new_place(tiny_bert_dir, small_glue_dir, tmp_path, capsys, where):
    config = tmp_path / "old.yaml"
    config.write_text("trainer:\n  callbacks:\n    - class_path: kdlora.callbacks.GLUEResults\n")
    extra = ["--config", str(config)] if where == "config" else ["--model", "kdlora.modules.SuperTransformer"]
    code = cli_main(["fit", *_args(tiny_bert_dir, small_glue_dir, tmp_path, "--data.task", "rte"), *extra])
    err = capsys.readouterr().err.strip()
    new = "kdlora.training.callbacks.GLUEResults" if where == "config" else "kdlora.mlfs.SuperTransformer"
    assert code == 2 and err == f"kdlora: error: {extra[1] if where == 'command' else 'kdlora.callbacks.GLUEResults'} moved: use {new}"
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("where", ["config", "init_args", "short"])
def test_an_old_model_key_fails_naming_its_new_key(tiny_bert_dir, small_glue_dir, tmp_path, capsys, where):
    """A renamed argument of the model (kdlora.training.args.RENAMED), in a config file or on the command
    line, fails with one line naming its new key, before anything is built."""
    config = tmp_path / "old.yaml"
    config.write_text("model:\n  class_path: kdlora.kd.Teacher\n  init_args:\n    lora_r: 4\n")
    extra = {"config": ["--config", str(config)], "init_args": ["--model.init_args.lora_r", "4"], "short": ["--model.lora_r=4"]}[where]
    code = cli_main(["fit", *_args(tiny_bert_dir, small_glue_dir, tmp_path, "--data.task", "rte"), *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == "kdlora: error: model.init_args.lora_r is now model.init_args.lora.r", err
    assert not (tmp_path / "runs").exists()


def test_the_new_model_keys_pass_the_old_key_check():
    from kdlora.cli import check_renamed_model_keys

    check_renamed_model_keys(["fit", "--model", "kdlora.kd.Teacher", "--model.init_args.lora.r", "4",
                              "--model.export.dir=out", "--model.export.enabled", "false"])
    with pytest.raises(ValueError, match=r"^model.init_args.export is now model.init_args.export.enabled$"):
        check_renamed_model_keys(["fit", "--model", "kdlora.kd.Teacher", "--model.export", "false"])


def test_every_moved_class_path_names_a_class_that_imports():
    import importlib

    from kdlora.cli import MOVED

    for old, new in MOVED.items():
        module, _, name = new.rpartition(".")
        assert isinstance(getattr(importlib.import_module(module), name), type), new
        assert old.rpartition(".")[2] in (name, "KDLoraModule"), (old, new)

def test_the_model_chooses_the_cli(tmp_path):
    """A causal-LM module (by class path, short name or a config's model) gets the decoder CLI; the last choice wins."""
    from kdlora.cli import uses_causal_lm_module

    glue = REPO / "configs" / "demo" / "supernet.yaml"
    assert uses_causal_lm_module(["fit", "--config", str(DECODER_RECIPE)])
    assert not uses_causal_lm_module(["fit", "--config", str(glue)])
    assert uses_causal_lm_module(["fit", "--model", "CausalLMSuperTransformer"])
    assert uses_causal_lm_module(["fit", "--model=kdlora.mlfs.causal_lm.CausalLMSuperTransformer"])
    assert uses_causal_lm_module(["fit", "--config", str(glue), "--model.class_path", "kdlora.mlfs.CausalLMSuperTransformer"])
    assert not uses_causal_lm_module(["fit", "--config", str(DECODER_RECIPE), "--model", "kdlora.kd.Teacher"])
    assert not uses_causal_lm_module(["fit", "--config", str(tmp_path / "missing.yaml")])  # the parser says it is missing
    assert not uses_causal_lm_module(["fit", "--model", "NoSuchModule"])


PY_SNIPPETS = [
    "def add(a, b):\n    return a + b\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "import os\n\nfor name in os.listdir('.'):\n    print(name)\n",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
]


def tiny_llama_dir(root: Path) -> Path:
    """A random Llama with SmolLM2's head grouping (6 query heads over 2 key/value heads: 3 per kv head,
    hidden 48 = 6 heads of 8) and a byte-level BPE tokenizer, saved as one Hugging Face directory."""
    from conftest import write_tiny_bpe_tokenizer
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    write_tiny_bpe_tokenizer(root, PY_SNIPPETS * 4, vocab_size=300)
    tok = AutoTokenizer.from_pretrained(root)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=48, intermediate_size=64, num_hidden_layers=4, num_attention_heads=6,
                         num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(root)
    return root


def heldout_loss_by_hand(model, blocks) -> float:
    """Token-mean next-token cross-entropy of a plain HF causal LM over the held-out blocks: position t
    predicts token t+1 where that one is real."""
    import torch.nn.functional as F

    total, count = 0.0, 0
    with torch.no_grad():
        for block in blocks:
            ids, mask = block["input_ids"][None], block["attention_mask"][None]
            logits = model(input_ids=ids, attention_mask=mask).logits[0]
            real = mask[0, 1:].bool()
            total += float(F.cross_entropy(logits[:-1][real], ids[0, 1:][real], reduction="sum"))
            count += int(real.sum())
    return total / count


@pytest.mark.slow  # a train.py fit of the decoder recipe: ~75 s on a busy 2-core machine
def test_train_py_fit_decoder_recipe_end_to_end(tmp_path):
    """`train.py fit --config configs/decoder/smollm2-mlfs.yaml` with only the model (a tiny random Llama),
    its search space, the data and the trainer limits overridden: MLFS runs its three stages, the best
    checkpoint is selected on the held-out palette loss, palette.json (selected) and palette_final.json
    (end of fit) are written, and every member is exported as a causal LM whose held-out loss, computed
    here from the export alone, is the reported one, and which generates."""
    import json
    import re

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kdlora.data.causal_lm import CausalLMDataModule

    model_dir = tiny_llama_dir(tmp_path / "llama")
    src = tmp_path / "src"
    src.mkdir()
    for i in range(8):
        (src / f"mod{i}.py").write_text("\n".join(PY_SNIPPETS[(i + k) % 4] for k in range(3)) + f"\nX = {i}\n")
    runs, export = tmp_path / "runs", tmp_path / "export"
    data = dict(source=str(src), pattern="*.py", block_size=16, batch_size=4, val_fraction=0.25, seed=42)
    cmd = [sys.executable, "train.py", "fit", "--config", str(DECODER_RECIPE),
           "--model.init_args.model_name_or_path", str(model_dir),
           "--model.init_args.sampling.search_space", "{hidden_sizes: [48], num_heads: [6, 3], intermediate_sizes: [64, 32], depths: [4, 2]}",
           "--model.init_args.evaluation.members", "[max, min]", "--model.init_args.distillation.feature_dim", "16",
           "--model.init_args.export.dir", str(export),
           *[a for k, v in data.items() for a in (f"--data.{k}", str(v))], "--data.cache_dir", str(tmp_path / "cache"),
           "--trainer.limit_train_batches", "2", "--trainer.accelerator", "cpu", "--trainer.devices", "1",
           "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
           "--trainer.logger.init_args.save_dir", str(runs)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]

    run = runs / "mlfs" / "version_0"
    best = list((run / "checkpoints").glob("best-*.ckpt"))
    assert len(best) == 1
    selected = json.loads((run / "palette.json").read_text())
    final = json.loads((run / "palette_final.json").read_text())
    assert [r["name"] for r in selected] == [r["name"] for r in final] == ["h48-a6-f64-l4", "h48-a3-f32-l0.3"]
    assert {(r["stage"], r["step"], r["weights"]) for r in final} == {(2, 6, "end of fit")}  # 3 stages x 2 steps
    step = int(re.search(r"-(\d+)\.ckpt$", best[0].name).group(1))
    assert {(r["step"], r["selected_on"], r["selection_monitor"]) for r in selected} == {(step, "holdout", "val/palette_loss")}
    mean = lambda rows: sum(r["metrics"]["loss"] for r in rows) / len(rows)  # noqa: E731
    assert mean(selected) == pytest.approx(selected[0]["selection_value"], rel=1e-5)
    assert mean(selected) <= mean(final) + 1e-6  # the final weights were validated too: never better than the best

    dm = CausalLMDataModule(str(model_dir), **data, cache_dir=str(tmp_path / "cache2"))
    dm.setup("validate")
    blocks = [dm.datasets["validation"][i] for i in range(len(dm.datasets["validation"]))]
    tok = AutoTokenizer.from_pretrained(export / selected[0]["name"])
    for row in selected:
        member = AutoModelForCausalLM.from_pretrained(export / row["name"]).eval()
        assert heldout_loss_by_hand(member, blocks) == pytest.approx(row["metrics"]["loss"], rel=1e-4)
        prompt = tok("def add(a, b):", return_tensors="pt")
        generated = member.generate(**prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
        assert generated.shape[1] == prompt["input_ids"].shape[1] + 4

    # `python -m kdlora.mlfs.export` on the decoder's best checkpoint: the same causal LM as the fit's export.
    member = selected[-1]["name"]
    cli_out = tmp_path / "cli_export"
    done = subprocess.run([sys.executable, "-m", "kdlora.mlfs.export", "--checkpoint", str(best[0]), "--subnet", member,
                           "--out", str(cli_out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    again = AutoModelForCausalLM.from_pretrained(cli_out).eval()
    fitted = AutoModelForCausalLM.from_pretrained(export / member).eval()
    ids = blocks[0]["input_ids"][None]
    with torch.no_grad():
        assert torch.allclose(again(input_ids=ids).logits, fitted(input_ids=ids).logits, atol=1e-5)
    assert AutoTokenizer.from_pretrained(cli_out).get_vocab() == tok.get_vocab()


def test_measure_adds_the_report_callbacks_with_every_argument_and_keeps_a_listed_one():
    """``measure:`` adds GLUEResults, ParameterCount, PeakMemory and InferenceLatency (its passes from
    measure) to trainer.callbacks, each with all its arguments; a callback the config lists keeps its own
    arguments and is not added twice; without measure, trainer.callbacks stays as given."""
    from jsonargparse import Namespace

    from kdlora.cli import MeasureArgs, add_measuring_callbacks

    listed = Namespace(class_path="kdlora.training.callbacks.PeakMemory", init_args=Namespace(filename="memory.json"))
    config = Namespace(measure=MeasureArgs(latency_runs=100, latency_warmup_batches=10), trainer=Namespace(callbacks=[listed]))
    add_measuring_callbacks(config)
    add_measuring_callbacks(config)  # a saved config.yaml run again
    got = {c.class_path.rpartition(".")[2]: c.init_args for c in config.trainer.callbacks}
    assert list(got) == ["PeakMemory", "GLUEResults", "ParameterCount", "InferenceLatency"]
    assert got["PeakMemory"].filename == "memory.json" and got["GLUEResults"].filename == "results.json"
    assert (got["InferenceLatency"].num_runs, got["InferenceLatency"].warmup_batches) == (100, 10)
    assert got["InferenceLatency"].stages == ["fit", "test"] and got["InferenceLatency"].max_batches is None
    bare = Namespace(measure=None, trainer=Namespace(callbacks=None))
    add_measuring_callbacks(bare)
    assert bare.trainer.callbacks is None
