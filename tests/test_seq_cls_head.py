"""`head: seq_cls`: the LoRA adapters and only the final classifier layer train (never pre_classifier or a pooler)."""

from __future__ import annotations

import json
import logging
import shutil
from types import SimpleNamespace

import pytest
from conftest import tiny_config

from kdlora.kd import KDLoRAStudent, Teacher
from kdlora.training.args import LoRAArgs
from kdlora.training.callbacks import ParameterCount

R = 8
# Per family: the encoder layers' path and its LoRA targets.
LAYOUT = {
    "bert": ("bert.encoder.layer.{i}.attention.self.{t}", ("query", "value")),
    "distilbert": ("distilbert.transformer.layer.{i}.attention.{t}", ("q_lin", "v_lin")),
    "roberta": ("roberta.encoder.layer.{i}.attention.self.{t}", ("query", "value")),
    "deberta-v2": ("deberta.encoder.layer.{i}.attention.self.{t}", ("query_proj", "value_proj")),
}


def expected_trainable(family: str, prefix: str) -> tuple[set[str], int]:
    """The names that must require grad under seq_cls, and their count by hand from the tiny config."""
    config = tiny_config(family, vocab_size=200)
    hidden = config.dim if family == "distilbert" else config.hidden_size
    layers, labels = config.num_hidden_layers, config.num_labels
    layer, targets = LAYOUT[family]
    names = {f"{prefix}base_model.model.{layer.format(i=i, t=t)}.lora_{ab}.default.weight"
             for i in range(layers) for t in targets for ab in "AB"}
    final = "classifier.out_proj" if family == "roberta" else "classifier"
    names |= {f"{prefix}base_model.model.{final}.modules_to_save.default.{p}" for p in ("weight", "bias")}
    count = layers * len(targets) * (R * hidden + hidden * R)  # A: r x H, B: H x r per target
    count += hidden * labels + labels  # the output Linear (BERT/DistilBERT classifier, RoBERTa out_proj)
    return names, count


def trainable(module) -> dict[str, int]:
    return {n: p.numel() for n, p in module.named_parameters() if p.requires_grad}


def recorded_trainable(module, tmp_path) -> int:
    """What the ParameterCount callback writes to results.json for `module`."""
    trainer = SimpleNamespace(loggers=[], log_dir=str(tmp_path), default_root_dir=str(tmp_path), is_global_zero=True,
                              global_step=0)
    ParameterCount()._count(trainer, module)
    return json.loads((tmp_path / "results.json").read_text())["parameters"]["trainable"]


@pytest.mark.parametrize("family", ["bert", "distilbert", "roberta", "deberta-v2"])
def test_seq_cls_trains_exactly_the_adapters_and_the_final_classifier(tiny_model_dirs, family, tmp_path):
    model_dir = str(tiny_model_dirs[family])
    names, count = expected_trainable(family, "model.")
    student = KDLoRAStudent(model_dir, model_dir, "mrpc", lora=LoRAArgs(r=R), head="seq_cls")
    teacher = Teacher(model_dir, "mrpc", finetune="lora", lora=LoRAArgs(r=R), head="seq_cls")
    for i, module in enumerate((student, teacher)):
        got = trainable(module)
        assert set(got) == names, sorted(set(got) ^ names)
        assert sum(got.values()) == count
        assert recorded_trainable(module, tmp_path / str(i)) == count
    # The default head also trains the rest of the head: DistilBERT's pre_classifier, RoBERTa's classifier.dense,
    # DeBERTa's pooler.dense (each H x H + H).
    default = trainable(KDLoRAStudent(model_dir, model_dir, "mrpc", lora=LoRAArgs(r=R)))
    config = tiny_config(family, 200)
    hidden = config.dim if family == "distilbert" else config.hidden_size
    assert sum(default.values()) == count + (0 if family == "bert" else hidden * hidden + hidden)


def test_seq_cls_leaves_new_non_final_layers_frozen_at_their_init(tiny_model_dirs, tmp_path, caplog):
    # A DistilBERT checkpoint without its head: pre_classifier and classifier are both newly initialised.
    from safetensors.torch import load_file, save_file

    model_dir = tmp_path / "headless"
    shutil.copytree(tiny_model_dirs["distilbert"], model_dir)
    weights = load_file(model_dir / "model.safetensors")
    save_file({k: v for k, v in weights.items() if "classifier" not in k}, model_dir / "model.safetensors",
              metadata={"format": "pt"})
    with caplog.at_level(logging.WARNING, logger="kdlora.training.lora"):
        module = Teacher(str(model_dir), "mrpc", finetune="lora", head="seq_cls")
    assert {"pre_classifier.weight", "classifier.weight"} <= set(module.newly_initialised)
    assert "leaves the newly initialised pre_classifier frozen" in caplog.text
    got = trainable(module)
    assert not any("pre_classifier" in n for n in got)
    assert {n for n in got if "lora_" not in n} == {f"model.base_model.model.classifier.modules_to_save.default.{p}"
                                                    for p in ("weight", "bias")}
    # head: new trains both new layers.
    assert any("pre_classifier" in n for n in trainable(Teacher(str(model_dir), "mrpc", finetune="lora")))


def test_bad_head_is_one_clear_error(tiny_bert_dir):
    d = str(tiny_bert_dir)
    with pytest.raises(ValueError, match=r"head must be 'new' .* or 'seq_cls' .*got 'seqcls'"):
        KDLoRAStudent(d, d, "mrpc", head="seqcls")
    with pytest.raises(ValueError, match=r"head must be 'new' .* or 'seq_cls' .*got 'final'"):
        Teacher(d, "mrpc", finetune="lora", head="final")
    with pytest.raises(ValueError, match="use it with finetune: lora"):
        Teacher(d, "mrpc", finetune="full", head="seq_cls")


def test_bad_head_on_the_command_line_is_one_line_and_exit_2(tiny_bert_dir, small_glue_dir, tmp_path, capsys):
    from kdlora.cli import cli_main

    code = cli_main(["fit", "--model", "kdlora.kd.Teacher", "--model.model_name_or_path", str(tiny_bert_dir),
                     "--model.finetune", "lora", "--model.head", "seqcls", "--data.task", "rte",
                     "--data.data_dir", str(small_glue_dir), "--data.cache_dir", str(tmp_path / "cache"),
                     "--trainer.default_root_dir", str(tmp_path / "runs")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("kdlora: error: ") and len(err.splitlines()) == 1, err
    assert "head must be 'new'" in err and "got 'seqcls'" in err
    assert not (tmp_path / "runs").exists()
