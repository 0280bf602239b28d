"""Teacher: full fine-tuning vs LoRA, loss goes down, export reloads with identical logits."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from transformers import AlbertConfig, AutoModelForSequenceClassification, BertModel

from conftest import make_tiny_model_dir, write_stsb_dir, write_tiny_tokenizer
from kdlora.data.glue import GLUEDataModule
from kdlora.kd import Teacher
from kdlora.training.args import ExportArgs, LoRAArgs, OptimizerArgs


def _batch(tokenizer, n=8, seed=0):
    """n distinct random word pairs with random labels: memorisable, so the loss can fall."""
    g = torch.Generator().manual_seed(seed)
    vocab = [w for w in tokenizer.get_vocab() if w.isalpha() and len(w) > 2]
    pick = lambda k: " ".join(vocab[int(i)] for i in torch.randint(0, len(vocab), (k,), generator=g))
    enc = tokenizer([pick(6) for _ in range(n)], [pick(4) for _ in range(n)], padding=True, return_tensors="pt")
    return {**enc, "labels": torch.randint(0, 2, (n,), generator=g), "idx": torch.arange(n)}


def _train_steps(module: Teacher, batch, steps=5, lr=1e-2):
    module.train()
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = module.training_step(batch, 0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.parametrize("family", ["bert", "roberta", "deberta-v2", "distilbert", "mpnet"])
def test_full_finetuning_changes_every_weight(tiny_model_dirs, family):
    from transformers import AutoTokenizer

    module = Teacher(str(tiny_model_dirs[family]), task="rte", finetune="full")
    module.log = lambda *a, **k: None
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    _train_steps(module, _batch(AutoTokenizer.from_pretrained(tiny_model_dirs[family])))
    unchanged = [n for n, p in module.named_parameters() if torch.equal(p, before[n])]
    assert not unchanged


@pytest.mark.parametrize("family", ["bert", "roberta", "deberta-v2", "distilbert", "mpnet"])
def test_lora_changes_only_adapters_and_head(tiny_model_dirs, family):
    from transformers import AutoTokenizer

    module = Teacher(str(tiny_model_dirs[family]), task="rte", finetune="lora", lora=LoRAArgs(r=4, alpha=8))
    module.log = lambda *a, **k: None
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    _train_steps(module, _batch(AutoTokenizer.from_pretrained(tiny_model_dirs[family])))
    changed = {n for n, p in module.named_parameters() if not torch.equal(p, before[n])}
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert changed == trainable  # everything trainable moved, nothing else did
    assert all("lora_" in n or "modules_to_save" in n for n in changed)
    assert any("lora_A" in n for n in changed) and any("lora_B" in n for n in changed)
    assert any("classifier" in n for n in changed)


def test_lora_trains_newly_initialised_pooler(tmp_path):
    # Like paraphrase-MiniLM-L3-v2: a BERT checkpoint without pooler weights.
    write_tiny_tokenizer(tmp_path)
    from conftest import tiny_config

    encoder = BertModel(tiny_config("bert", 256), add_pooling_layer=False)
    encoder.save_pretrained(tmp_path)
    module = Teacher(str(tmp_path), task="rte", finetune="lora")
    assert "bert.pooler.dense.weight" in module.newly_initialised
    pooler = [n for n, p in module.named_parameters() if "pooler" in n and p.requires_grad]
    assert pooler, "the randomly initialised pooler must be trainable"


def test_few_steps_lower_the_loss(tiny_model_dirs):
    from transformers import AutoTokenizer

    # LoRA (rank 8, frozen random body) needs a larger lr and falls more slowly.
    for finetune, lr, factor in (("full", 5e-3, 0.6), ("lora", 3e-2, 0.8)):
        module = Teacher(str(tiny_model_dirs["bert"]), task="rte", finetune=finetune)
        module.log = lambda *a, **k: None
        torch.manual_seed(0)
        losses = _train_steps(module, _batch(AutoTokenizer.from_pretrained(tiny_model_dirs["bert"])), steps=15, lr=lr)
        assert losses[-1] < factor * losses[0], (finetune, losses)


def test_regression_head_for_stsb(tiny_model_dirs):
    module = Teacher(str(tiny_model_dirs["bert"]), task="stsb")
    assert module.model.config.num_labels == 1 and module.model.config.problem_type == "regression"


def test_unknown_family_needs_explicit_targets(tmp_path):
    write_tiny_tokenizer(tmp_path)
    cfg = AlbertConfig(vocab_size=256, embedding_size=16, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                       intermediate_size=64, num_labels=2)
    AutoModelForSequenceClassification.from_config(cfg).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"no default LoRA targets for model family 'albert'.*lora\.targets"):
        Teacher(str(tmp_path), task="rte", finetune="lora")
    module = Teacher(str(tmp_path), task="rte", finetune="lora", lora=LoRAArgs(targets=["query", "value"]))
    assert any("lora_A" in n for n, _ in module.named_parameters())


def test_bad_values_are_rejected(tiny_bert_dir):
    with pytest.raises(ValueError, match="finetune must be"):
        Teacher(str(tiny_bert_dir), finetune="partial")
    with pytest.raises(FileNotFoundError, match="cannot load model"):
        Teacher("/nonexistent/model/dir")


@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_fit_exports_best_model_that_reloads_with_same_logits(tiny_bert_dir, small_glue_dir, tmp_path, finetune):
    L.seed_everything(0)
    dm = GLUEDataModule("mrpc", str(tiny_bert_dir), data_dir=str(small_glue_dir), batch_size=16, cache_dir=str(tmp_path / "c"))
    module = Teacher(str(tiny_bert_dir), task="mrpc", finetune=finetune, optimizer=OptimizerArgs(learning_rate=1e-3),
                     export=ExportArgs(dir=str(tmp_path / "export")))
    trainer = L.Trainer(max_epochs=2, default_root_dir=tmp_path, enable_progress_bar=False, logger=False,
                        callbacks=[L.pytorch.callbacks.ModelCheckpoint(monitor="val/score", mode="max")])
    trainer.fit(module, dm)
    assert trainer.checkpoint_callback.best_model_path
    assert "val/score" in trainer.callback_metrics and "val/f1" in trainer.callback_metrics

    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "export").eval()
    assert not any("lora" in k for k in reloaded.state_dict())
    module.eval()
    batch = next(iter(dm.val_dataloader()))
    with torch.no_grad():
        expected = module(batch)
        got = reloaded(**{k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    if finetune == "lora":
        assert (tmp_path / "export" / "adapter" / "adapter_config.json").is_file()


def _setup_only(module, dm, tmp_path):
    """Run fit's set-up hooks without a single optimisation step."""
    trainer = L.Trainer(max_epochs=1, limit_train_batches=0, limit_val_batches=0, default_root_dir=tmp_path,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.fit(module, dm)


@pytest.mark.parametrize("family,finetune", [("bert", "full"), ("bert", "lora"), ("roberta", "lora")])
def test_new_regression_head_starts_at_the_mean_training_label(tiny_model_dirs, tmp_path, family, finetune):
    scores = [5.0, 3.8, 0.25, 1.5, 2.0, 4.0]
    glue = write_stsb_dir(tmp_path / "glue", scores)
    dm = GLUEDataModule("stsb", str(tiny_model_dirs[family]), data_dir=str(glue), batch_size=4, cache_dir=str(tmp_path / "c"))
    module = Teacher(str(tiny_model_dirs[family]), task="stsb", finetune=finetune)  # 2-label checkpoint: new 1-output head
    _setup_only(module, dm, tmp_path)
    head = module.model.get_base_model() if finetune == "lora" else module.model
    out = head.classifier if family == "bert" else head.classifier.out_proj
    if finetune == "lora":  # peft trains a copy of the head: that copy is the one that must start at the mean
        out = out.modules_to_save["default"]
    assert out.bias.item() == pytest.approx(sum(scores) / len(scores))


def test_trained_regression_head_is_left_alone(tmp_path):
    model_dir = make_tiny_model_dir(tmp_path / "m", "bert", num_labels=1)  # already has a 1-output head
    before = AutoModelForSequenceClassification.from_pretrained(model_dir).classifier.bias.clone()
    glue = write_stsb_dir(tmp_path / "glue", [5.0, 4.0, 3.0, 4.5])
    dm = GLUEDataModule("stsb", str(model_dir), data_dir=str(glue), batch_size=4, cache_dir=str(tmp_path / "c"))
    module = Teacher(str(model_dir), task="stsb")
    _setup_only(module, dm, tmp_path)
    torch.testing.assert_close(module.model.classifier.bias, before, rtol=0, atol=0)


def test_a_teacher_checkpoint_holding_the_flat_keys_of_before_loads_as_the_teacher_it_was(tiny_bert_dir, tmp_path):
    """Checkpoints written before the argument groups hold lora_r, learning_rate, export, ... at the top:
    the student still loads such a teacher with its own LoRA rank (the default rank would not fit its weights)."""
    import lightning

    from kdlora.data.tasks import get_task
    from kdlora.kd.student import load_teacher

    torch.manual_seed(0)
    teacher = Teacher(str(tiny_bert_dir), task="sst2", finetune="lora", lora=LoRAArgs(r=4, alpha=8),
                      export=ExportArgs(enabled=False))
    for p in teacher.model.parameters():  # trained-looking adapters: B = 0 would hide a wrong merge
        p.data.normal_(0, 0.05)
    flat = {"model_name_or_path": str(tiny_bert_dir), "task": "sst2", "finetune": "lora", "lora_r": 4, "lora_alpha": 8,
            "lora_dropout": 0.1, "lora_targets": None, "head": "new", "learning_rate": 2e-5, "weight_decay": 0.01,
            "warmup_ratio": 0.06, "export": True, "export_dir": None}
    path = tmp_path / "old-teacher.ckpt"
    torch.save({"epoch": 0, "global_step": 0, "pytorch-lightning_version": lightning.__version__,
                "state_dict": teacher.state_dict(),
                "hyper_parameters": {"_class_path": "kdlora.kd.Teacher", **flat,
                                     "_instantiator": "lightning.pytorch.cli.instantiate_module"}}, path)
    model, tokenizer_source = load_teacher(str(path), get_task("sst2"))
    ids = torch.randint(5, 150, (2, 10))
    expected = teacher.merged_model().eval()(input_ids=ids).logits
    torch.testing.assert_close(model(input_ids=ids).logits, expected)
    assert tokenizer_source == str(tiny_bert_dir)


@pytest.mark.parametrize("clip", [None, 1e-3])
def test_optimizer_gradient_clip_bounds_the_gradient_norm_of_each_step(tiny_bert_dir, small_glue_dir, tmp_path, clip):
    norms = []

    class GradientNorm(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # after the step, before the next zero_grad
            grads = [p.grad.detach().flatten() for p in pl_module.parameters() if p.grad is not None]
            norms.append(float(torch.cat(grads).norm()))

    L.seed_everything(0)
    dm = GLUEDataModule("mrpc", str(tiny_bert_dir), data_dir=str(small_glue_dir), batch_size=8, cache_dir=str(tmp_path / "c"))
    module = Teacher(str(tiny_bert_dir), task="mrpc", optimizer=OptimizerArgs(learning_rate=1e-3, gradient_clip=clip),
                     export=ExportArgs(enabled=False))
    trainer = L.Trainer(max_steps=2, limit_val_batches=0, num_sanity_val_steps=0, enable_progress_bar=False, logger=False,
                        enable_checkpointing=False, enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=[GradientNorm()])
    trainer.fit(module, dm)
    assert len(norms) == 2
    if clip is None:
        assert min(norms) > 1e-2  # what the tiny model's gradients are unclipped
    else:
        assert max(norms) <= clip * (1 + 1e-4)
