"""KDLoRAStudent: the KD objective, a frozen teacher, cached targets, layer-dropped students, vocab checks."""

from __future__ import annotations

import math
import shutil

import lightning as L
import pytest
import torch
from conftest import make_tiny_model_dir
from torch.utils.data import DataLoader
from transformers import AutoModelForSequenceClassification, BertTokenizerFast, DataCollatorWithPadding

from kdlora.data.glue import GLUEDataModule
from kdlora.kd import KDLoRAStudent
from kdlora.kd.args import DistillationArgs, TeacherTargetsArgs
from kdlora.kd.student_init import layer_dropped_copy
from kdlora.training.args import ExportArgs, OptimizerArgs


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A 4-layer 'teacher' and a 2-layer 'student' sharing one tokenizer, for 2 labels and for regression."""
    root = tmp_path_factory.mktemp("kd_pair")
    return {
        "teacher": make_tiny_model_dir(root / "teacher", "bert", layers=4, seed=0),
        "student": make_tiny_model_dir(root / "student", "bert", layers=2, seed=1),
        "teacher_reg": make_tiny_model_dir(root / "teacher_reg", "bert", num_labels=1, layers=4, seed=2),
    }


def first_batch(task, tokenizer_dir, glue_dir, batch_size=8):
    dm = GLUEDataModule(task, str(tokenizer_dir), data_dir=str(glue_dir), batch_size=batch_size, max_seq_length=64,
                        cache_dir=str(glue_dir / ".cache"))
    dm.setup("fit")
    return dm, next(iter(dm.train_dataloader()))


def reference_logits(model_dir, batch):
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir)).eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     token_type_ids=batch["token_type_ids"]).logits.double()


def student_logits(student, batch):
    with torch.no_grad():
        return student.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             token_type_ids=batch["token_type_ids"]).logits.double()


def test_kd_loss_matches_hand_computation_classification(pair, small_glue_dir):
    _, batch = first_batch("mrpc", pair["teacher"], small_glue_dir)
    student = KDLoRAStudent(str(pair["student"]), str(pair["teacher"]), "mrpc",
                            distillation=DistillationArgs(task_weight=0.3, temperature=2.0)).eval()
    loss = student.training_step(batch, 0)

    s, t, y, T, a = student_logits(student, batch), reference_logits(pair["teacher"], batch), batch["labels"], 2.0, 0.3
    expected_ce, expected_kl = 0.0, 0.0
    for i in range(len(y)):
        z = sum(math.exp(v) for v in s[i].tolist())
        expected_ce += -math.log(math.exp(s[i, y[i]].item()) / z)
        zt = sum(math.exp(v / T) for v in t[i].tolist())
        zs = sum(math.exp(v / T) for v in s[i].tolist())
        for c in range(s.shape[1]):
            pt, ps = math.exp(t[i, c].item() / T) / zt, math.exp(s[i, c].item() / T) / zs
            expected_kl += pt * (math.log(pt) - math.log(ps))
    expected = a * expected_ce / len(y) + (1 - a) * T * T * expected_kl / len(y)
    assert loss.item() == pytest.approx(expected, rel=1e-4, abs=1e-6)


def test_kd_loss_matches_hand_computation_regression(pair, small_glue_dir):
    _, batch = first_batch("stsb", pair["teacher_reg"], small_glue_dir)
    student = KDLoRAStudent(str(pair["student"]), str(pair["teacher_reg"]), "stsb",
                            distillation=DistillationArgs(task_weight=0.7)).eval()
    loss = student.training_step(batch, 0)

    s = student_logits(student, batch)[:, 0].tolist()
    t = reference_logits(pair["teacher_reg"], batch)[:, 0].tolist()
    y = batch["labels"].tolist()
    n = len(y)
    expected = 0.7 * sum((a - b) ** 2 for a, b in zip(s, y)) / n + 0.3 * sum((a - b) ** 2 for a, b in zip(s, t)) / n
    assert loss.item() == pytest.approx(expected, rel=1e-4, abs=1e-6)

    # The same loss from cached regression targets (one output column per example).
    dm, _ = first_batch("stsb", pair["teacher_reg"], small_glue_dir)
    student.teacher_targets.mode = "cached"
    student.teacher_targets.cache(dm.datasets["train"], DataCollatorWithPadding(dm.tokenizer, return_tensors="pt"),
                                  small_glue_dir / ".teacher_cache")
    assert student.training_step(batch, 0).item() == pytest.approx(expected, rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("targets", ["online", "cached"])
def test_training_changes_only_lora_and_head_and_never_the_teacher(pair, small_glue_dir, tmp_path, targets):
    # CoLA: a single-sentence task; the student is built from teacher layers 0 and 2.
    dm = GLUEDataModule("cola", str(pair["teacher"]), data_dir=str(small_glue_dir), batch_size=8, max_seq_length=64,
                        cache_dir=str(tmp_path / "tok"))
    student = KDLoRAStudent(str(pair["teacher"]), str(pair["teacher"]), "cola", student_layers=[0, 2],
                            teacher_targets=TeacherTargetsArgs(mode=targets, cache_dir=str(tmp_path / "cache")),
                            optimizer=OptimizerArgs(learning_rate=1e-2),
                            export=ExportArgs(dir=str(tmp_path / "export")))
    teacher_before = {k: v.clone() for k, v in student.teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in student.model.named_parameters()}
    assert all(not p.requires_grad for p in student.teacher.parameters())

    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(tmp_path), limit_val_batches=1,
                        num_sanity_val_steps=0)
    trainer.fit(student, datamodule=dm)

    assert not student.teacher.training
    for k, v in student.teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k]), f"teacher weight {k} changed"
    changed = {k for k, p in student.model.named_parameters() if not torch.equal(p.detach(), student_before[k])}
    assert changed, "nothing trained"
    assert all("lora_" in k or "modules_to_save" in k for k in changed), sorted(changed)
    assert any("lora_B" in k for k in changed) and any("classifier" in k for k in changed)
    # The teacher is never saved inside the student's checkpoint, and strict reloading works.
    ckpt = trainer.checkpoint_callback.best_model_path
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    assert state and all(k.startswith("model.") for k in state)
    reloaded = KDLoRAStudent.load_from_checkpoint(ckpt, strict=True)
    for k, v in student.model.state_dict().items():
        assert torch.equal(reloaded.model.state_dict()[k], v)
    assert (tmp_path / "export" / "config.json").is_file()


def test_cached_targets_equal_online_teacher_for_every_idx_under_shuffling(pair, small_glue_dir, tmp_path, monkeypatch):
    dm = GLUEDataModule("mrpc", str(pair["teacher"]), data_dir=str(small_glue_dir), batch_size=8, max_seq_length=64,
                        cache_dir=str(tmp_path / "tok"))
    dm.setup("fit")
    train = dm.datasets["train"]
    collate = DataCollatorWithPadding(dm.tokenizer, return_tensors="pt")
    student = KDLoRAStudent(str(pair["student"]), str(pair["teacher"]), "mrpc",
                            teacher_targets=TeacherTargetsArgs(mode="cached"))
    path = student.teacher_targets.cache(train, collate, tmp_path / "cache", batch_size=16)

    teacher = AutoModelForSequenceClassification.from_pretrained(str(pair["teacher"])).eval()
    torch.manual_seed(123)
    seen = []
    for batch in DataLoader(train, batch_size=8, shuffle=True, collate_fn=collate):
        with torch.no_grad():
            online = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             token_type_ids=batch["token_type_ids"]).logits
        torch.testing.assert_close(student.teacher_targets.logits(batch), online, atol=1e-5, rtol=1e-5)
        seen += batch["idx"].tolist()
    assert sorted(seen) == sorted(train["idx"]) and seen != sorted(seen)

    # A rerun reuses the file; a different training set (fingerprint) builds a new one.
    def fail(*a, **k):
        raise AssertionError("recomputed a valid cache")

    monkeypatch.setattr(student.teacher_targets, "compute", fail)
    assert student.teacher_targets.cache(train, collate, tmp_path / "cache") == path
    monkeypatch.undo()
    subset = train.select(range(10))
    new_path = student.teacher_targets.cache(subset, collate, tmp_path / "cache")
    assert new_path != path and new_path.is_file()
    with pytest.raises(KeyError, match="not in the teacher target cache"):
        student.teacher_targets.logits(next(iter(DataLoader(train.select(range(20, 28)), batch_size=8, collate_fn=collate))))


@pytest.mark.parametrize("family", ["bert", "roberta", "deberta-v2", "distilbert", "mpnet"])
def test_layer_dropped_student_reproduces_teacher_layers(tiny_model_dirs, family):
    teacher = AutoModelForSequenceClassification.from_pretrained(str(tiny_model_dirs[family])).eval()
    student = layer_dropped_copy(teacher, [0, 1, 3]).eval()
    assert student.config.num_hidden_layers == 3 and teacher.config.num_hidden_layers == 4
    t_state, s_state = teacher.state_dict(), student.state_dict()
    layer_key = ".transformer.layer." if family == "distilbert" else ".encoder.layer."
    for key, value in s_state.items():
        if layer_key in key:
            head, rest = key.split(layer_key)
            i, tail = rest.split(".", 1)
            teacher_key = f"{head}{layer_key}{[0, 1, 3][int(i)]}.{tail}"
        else:
            teacher_key = key
        assert torch.equal(value, t_state[teacher_key]), key
    ids = torch.randint(5, 100, (2, 12))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        th = teacher(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        sh = student(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    for i in range(3):  # the first two layers are the teacher's first two: identical activations
        torch.testing.assert_close(sh[i], th[i])
    with pytest.raises(ValueError, match="student_layers"):
        layer_dropped_copy(teacher, [0, 4])


def test_tokenizer_mismatch_fails_clearly(pair, tmp_path):
    other = tmp_path / "other_vocab"
    shutil.copytree(pair["student"], other)
    vocab = (other / "vocab.txt").read_text().splitlines()
    vocab[vocab.index("the")] = "thee"
    (other / "vocab.txt").write_text("\n".join(vocab) + "\n")
    (other / "tokenizer.json").unlink()
    BertTokenizerFast(vocab=str(other / "vocab.txt"), do_lower_case=True).save_pretrained(other)
    with pytest.raises(ValueError, match="tokenizer mismatch"):
        KDLoRAStudent(str(other), str(pair["teacher"]), "mrpc")


def test_teacher_follows_device_and_dtype_moves_but_stays_out_of_state_and_optimizer(pair):
    student = KDLoRAStudent(str(pair["student"]), str(pair["teacher"]), "mrpc")
    student.double()
    assert all(p.dtype == torch.float64 for p in student.teacher.parameters())
    student.train()
    assert not student.teacher.training and student.model.training
    teacher_ids = {id(p) for p in student.teacher.parameters()}
    assert not teacher_ids & {id(p) for p in student.parameters()}
    assert all(k.startswith("model.") for k in student.state_dict())


def test_bad_teacher_inputs_fail_clearly(pair, tmp_path):
    with pytest.raises(FileNotFoundError, match="teacher_path"):
        KDLoRAStudent(str(pair["student"]), str(tmp_path / "missing"), "mrpc")
    with pytest.raises(ValueError, match="outputs"):
        KDLoRAStudent(str(pair["student"]), str(pair["teacher_reg"]), "mrpc")
    with pytest.raises(ValueError, match="online"):
        KDLoRAStudent(str(pair["student"]), str(pair["teacher"]), "mrpc",
                      teacher_targets=TeacherTargetsArgs(mode="cached"),
                      distillation=DistillationArgs(feature_weight=1.0))


def test_feature_distillation_adds_the_projected_hidden_state_loss(pair, small_glue_dir):
    _, batch = first_batch("mrpc", pair["teacher"], small_glue_dir)
    kwargs = dict(model_name_or_path=str(pair["student"]), teacher_path=str(pair["teacher"]), task="mrpc")
    plain = KDLoRAStudent(**kwargs).eval()
    torch.manual_seed(0)
    featured = KDLoRAStudent(**kwargs, distillation=DistillationArgs(feature_weight=0.5, feature_dim=8)).eval()
    featured.model.load_state_dict(plain.model.state_dict())
    assert featured.layer_map == [[1, 2], [2, 4]]  # 2-layer student on a 4-layer teacher

    teacher = AutoModelForSequenceClassification.from_pretrained(str(pair["teacher"])).eval()
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    with torch.no_grad():
        th = teacher(**inputs, output_hidden_states=True).hidden_states
        sh = featured.model(**inputs, output_hidden_states=True).hidden_states
        expected = 0.0
        for (s, t), us, ut in zip(featured.layer_map, featured.student_projections, featured.teacher_projections):
            us_w, ut_w = us.weight.double(), ut.weight.double()
            torch.testing.assert_close(us_w @ us_w.T, torch.eye(8, dtype=torch.float64), atol=1e-5, rtol=0)  # orthonormal rows
            for b in range(len(batch["input_ids"])):
                for j in range(batch["input_ids"].shape[1]):
                    if batch["attention_mask"][b, j]:
                        d = us_w @ sh[s][b, j].double() - ut_w @ th[t][b, j].double()
                        expected += float(d @ d) / int(batch["attention_mask"].sum())
        base = plain.training_step(batch, 0)
        total = featured.training_step(batch, 0)
    assert total.item() == pytest.approx(base.item() + 0.5 * expected, rel=1e-4)
    assert {n for n, p in featured.named_parameters() if p.requires_grad} >= {
        n for n, _ in featured.student_projections.named_parameters(prefix="student_projections")}


def test_feature_projections_stay_orthonormal_under_the_modules_own_optimizer(pair, small_glue_dir):
    """AdamW with the module's weight decay must not shrink U (torch's Householder map zeroed it in one step)."""
    from kdlora.training.module import optimizer_groups

    _, batch = first_batch("mrpc", pair["teacher"], small_glue_dir)
    student = KDLoRAStudent(model_name_or_path=str(pair["student"]), teacher_path=str(pair["teacher"]), task="mrpc",
                            distillation=DistillationArgs(feature_weight=0.5, feature_dim=8))
    assert student.optimizer_args.weight_decay > 0
    opt = torch.optim.AdamW(optimizer_groups(student.named_parameters(), student.optimizer_args.weight_decay), lr=1e-3)
    for _ in range(3):
        opt.zero_grad()
        student.training_step(batch, 0).backward()
        opt.step()
    for u in [*student.student_projections, *student.teacher_projections]:
        w = u.weight.detach().double()
        torch.testing.assert_close(w @ w.T, torch.eye(8, dtype=torch.float64), atol=1e-5, rtol=0)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.student_projections.parameters())


def student_without_pooler(pair, tmp_path):
    """The tiny student saved without its pooler, like paraphrase-MiniLM-L3-v2."""
    from safetensors.torch import load_file, save_file

    student_dir = tmp_path / "no_pooler"
    shutil.copytree(pair["student"], student_dir)
    weights = load_file(student_dir / "model.safetensors")
    save_file({k: v for k, v in weights.items() if ".pooler." not in k}, student_dir / "model.safetensors",
              metadata={"format": "pt"})
    return student_dir


def test_weights_missing_from_the_student_checkpoint_are_trainable(pair, tmp_path):
    # Like paraphrase-MiniLM-L3-v2, which ships without a pooler: it must train, not stay random.
    student_dir = student_without_pooler(pair, tmp_path)
    student = KDLoRAStudent(str(student_dir), str(pair["teacher"]), "mrpc")
    assert {"bert.pooler.dense.weight", "bert.pooler.dense.bias"} <= set(student.newly_initialised)
    trainable = {n for n, p in student.model.named_parameters() if p.requires_grad}
    assert any("pooler.dense" in n and "modules_to_save" in n for n in trainable)
    assert any("classifier" in n and "modules_to_save" in n for n in trainable)
    frozen_base = [n for n, p in student.model.named_parameters() if not p.requires_grad]
    assert frozen_base and all("lora_" not in n for n in frozen_base)


def test_head_init_teacher_starts_the_students_head_as_the_teachers(pair, tmp_path):
    """head_init='teacher': the student's (missing) pooler and its classifier are the fine-tuned teacher's
    weights, read back from the teacher's own files; DistilBERT's pre_classifier takes BERT's pooler; a head
    whose shape the teacher lacks is an error naming the weight."""
    from transformers import BertConfig

    teacher = AutoModelForSequenceClassification.from_pretrained(str(pair["teacher"]))
    t = dict(teacher.named_parameters())
    student_dir = student_without_pooler(pair, tmp_path)
    default = KDLoRAStudent(str(student_dir), str(pair["teacher"]), "mrpc")
    student = KDLoRAStudent(str(student_dir), str(pair["teacher"]), "mrpc", head_init="teacher")
    for model, same in ((student, True), (default, False)):
        s = {n.replace("base_model.model.", "").replace("modules_to_save.default.", ""): p
             for n, p in model.model.named_parameters() if "original_module" not in n}
        for name in ("bert.pooler.dense.weight", "bert.pooler.dense.bias", "classifier.weight", "classifier.bias"):
            if same or name.endswith("weight"):  # new biases start at zero in both
                assert torch.equal(s[name], t[name]) is same, name
    assert any("pooler.dense" in n and p.requires_grad for n, p in student.model.named_parameters())  # still trains

    distil = make_tiny_model_dir(tmp_path / "distil", "distilbert", layers=2, seed=4)
    d = KDLoRAStudent(str(distil), str(pair["teacher"]), "mrpc", head_init="teacher")
    s = {n.replace("base_model.model.", "").replace("modules_to_save.default.", ""): p
         for n, p in d.model.named_parameters() if "original_module" not in n}
    assert torch.equal(s["pre_classifier.weight"], t["bert.pooler.dense.weight"])
    assert torch.equal(s["classifier.bias"], t["classifier.bias"])

    narrow = tmp_path / "narrow"
    shutil.copytree(pair["student"], narrow, ignore=shutil.ignore_patterns("model.safetensors", "config.json"))
    config = BertConfig.from_pretrained(pair["student"])
    config.hidden_size, config.intermediate_size = 16, 32
    AutoModelForSequenceClassification.from_config(config).save_pretrained(narrow)
    with pytest.raises(ValueError, match=r"head_init='teacher'.*bert.pooler.dense.weight \(16, 16\)"):
        KDLoRAStudent(str(narrow), str(pair["teacher"]), "mrpc", head_init="teacher")
    with pytest.raises(ValueError, match="head_init must be"):
        KDLoRAStudent(str(student_dir), str(pair["teacher"]), "mrpc", head_init="random")
