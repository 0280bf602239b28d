"""CausalLMSuperTransformer (MLFS on decoders): the LM and token-KD losses against hand computations, the
decoder objective and its (n_1/n_j)^γ-scaled gradients in one real step, split perplexity, a short fit
on a fixed batch (Llama and GPT-2) and the palette exported as causal LMs that generate."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from test_supernet import Recorder

from kdlora.elastic.config import SubnetConfig
from kdlora.losses import causal_lm_loss, decoder_subnet_loss, lm_token_losses, token_kd_loss
from kdlora.mlfs.causal_lm import CausalLMSuperTransformer

VOCAB = 100
CONFIGS = {
    "llama": dict(model_type="llama", vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6,
                  bos_token_id=1, eos_token_id=2),
    "gpt2": dict(model_type="gpt2", vocab_size=VOCAB, n_embd=32, n_inner=64, n_layer=4, n_head=4, n_positions=64,
                 bos_token_id=1, eos_token_id=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
}
FIXED_SUBNET = SubnetConfig(16, 2, 32, (0, 1, 2, 3))
FIXED_SPACE = {"hidden_sizes": [16], "num_heads": [2], "intermediate_sizes": [32], "depths": [4]}


@pytest.fixture(autouse=True)
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_batch(seed: int = 0, batch: int = 4, seq: int = 12, lengths=(12, 9, 12, 5)) -> dict[str, torch.Tensor]:
    """Random token ids, right-padded to `lengths`; labels = input_ids with -100 at padding (the data interface)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
    mask = (torch.arange(seq)[None, :] < torch.tensor(lengths)[:, None]).long()
    ids = ids.masked_fill(mask == 0, 0)
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


class Repeat(torch.utils.data.Dataset):
    def __init__(self, batches: list[dict], times: int = 1):
        self.batches, self.times = batches, times

    def __len__(self):
        return len(self.batches) * self.times

    def __getitem__(self, i):
        return self.batches[i % len(self.batches)]


def loader(batches: list[dict], times: int = 1):
    return torch.utils.data.DataLoader(Repeat(batches, times), batch_size=None, shuffle=False)


def module(family: str, seed: int = 0, **kw) -> CausalLMSuperTransformer:
    torch.manual_seed(seed)
    args = dict(model_config=CONFIGS[family], lora={"r": 8}, export={"enabled": False}, sampling={"sampler_seed": 0},
                distillation={"feature_dim": 16})
    for key, value in kw.items():  # argument groups as dicts of fields, merged into these defaults
        args[key] = {**args[key], **value} if isinstance(value, dict) and isinstance(args.get(key), dict) else value
    return CausalLMSuperTransformer(**args)


def trainer(tmp_path, **kw) -> L.Trainer:
    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, default_root_dir=str(tmp_path), num_sanity_val_steps=0)
    return L.Trainer(**{**defaults, **kw})


# ---- hand computations: explicit loops over positions ----
def lm_by_hand(logits, input_ids, mask):
    """Mean over predicted tokens of -log p(x_{t+1} | x_{≤t}): position t predicts token t+1 if that one is real."""
    total, count = 0.0, 0
    for b in range(input_ids.shape[0]):
        for t in range(input_ids.shape[1] - 1):
            if mask[b, t + 1]:
                total = total - logits[b, t].float().log_softmax(-1)[input_ids[b, t + 1]]
                count += 1
    return total, count


def kd_by_hand(student, teacher, mask, temperature=1.0):
    """T²·KL(p_teacher ‖ p_student) at temperature T, averaged over the real positions."""
    total, count = 0.0, 0
    for b in range(student.shape[0]):
        for t in range(student.shape[1]):
            if mask[b, t]:
                p = (teacher[b, t] / temperature).softmax(-1)
                log_q = (student[b, t] / temperature).log_softmax(-1)
                total = total + (p * (p.log() - log_q)).sum()
                count += 1
    return total / count * temperature ** 2


def test_lm_and_token_kd_losses_match_hand_computation():
    torch.manual_seed(0)
    batch = make_batch(lengths=(12, 9, 12, 5))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    z, z1 = torch.randn(4, 12, VOCAB), torch.randn(4, 12, VOCAB)
    total, count = lm_by_hand(z, ids, mask)
    assert count == 11 + 8 + 11 + 4
    got_total, got_count = lm_token_losses(z, batch["labels"], mask)
    assert int(got_count) == count and float(got_total) == pytest.approx(float(total), rel=1e-5)
    assert float(causal_lm_loss(z, batch["labels"])) == pytest.approx(float(total) / count, rel=1e-5)  # -100 alone suffices
    padded_labels = ids.clone()  # labels not masked: the attention mask still keeps padding out
    assert float(causal_lm_loss(z, padded_labels, mask)) == pytest.approx(float(total) / count, rel=1e-5)
    for temperature in (1.0, 2.0):
        assert float(token_kd_loss(z, z1, mask, temperature)) == pytest.approx(float(kd_by_hand(z, z1, mask, temperature)), rel=1e-5)
    loss, parts = decoder_subnet_loss(z, z1, batch["labels"], mask, 0.9, 2.0, [torch.tensor(3.0), torch.tensor(1.0)], 0.1)
    expected = 0.1 * total / count + 0.9 * (kd_by_hand(z, z1, mask, 2.0) + 0.1 * 4.0)
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    assert float(parts["features"]) == 4.0 and float(parts["task"]) == pytest.approx(float(total) / count, rel=1e-5)


def test_bad_arguments_fail_clearly():
    with pytest.raises(ValueError, match="exactly one of model_name_or_path"):
        CausalLMSuperTransformer(export={"enabled": False})
    with pytest.raises(ValueError, match="exactly one of model_name_or_path"):
        CausalLMSuperTransformer(model_name_or_path="x", model_config=CONFIGS["gpt2"], export={"enabled": False})
    with pytest.raises(ValueError, match="model_type"):
        CausalLMSuperTransformer(model_config={"vocab_size": 10}, export={"enabled": False})
    with pytest.raises(ValueError, match="stages.epochs"):
        module("gpt2", stages={"epochs": [1, 1]})
    with pytest.raises(ValueError, match="distill_weight"):
        module("gpt2", distillation={"distill_weight": 1.5})
    with pytest.raises(ValueError, match="feature_normalization must be one of"):
        module("gpt2", distillation={"feature_normalization": "l2"})
    # Llama's 2 query heads per key/value head: a default palette member of 3 heads cannot export, said before training.
    with pytest.raises(ValueError, match="h24-a3-f48-l0.2.3: a Llama export has hidden/head size = 3 heads"):
        module("llama")
    module("gpt2")  # GPT-2 has no such constraint


@pytest.mark.parametrize("family,normalization", [(f, "none") for f in sorted(CONFIGS)] + [("llama", "relative")])
def test_subnet_gradient_is_the_decoder_objective_scaled_by_parameter_ratio(family, normalization, tmp_path):
    """One real step; its gradient = [∇LM_1 + (n_1/n_j)^γ ∇((1−α)·LM_j + α·(KD + β·feat))] / 2, recomputed by hand
    (feature_normalization "relative": each token's squared error over its projected maxnet feature's squared norm)."""
    kw = dict(stages={"epochs": [0, 1, 0]}, sampling={"num_subnets": 1, "sandwich": True, "search_space": FIXED_SPACE}, distillation={"gamma": 2.0, "temperature": 2.0, "feature_normalization": normalization}, optimizer={"gradient_clip": 0.0})
    batch = make_batch()
    rec = Recorder()
    trained = module(family, **kw)
    trainer(tmp_path, max_steps=1, limit_val_batches=0, callbacks=[rec]).fit(trained, loader([batch]))
    assert rec.sampled[0][2] == [FIXED_SUBNET.name]

    ref = module(family, **kw)
    ref.load_state_dict(rec.states[0])
    ref.schedule.enter(1, ref.projections, train_projections=True)
    enc = ref.encoder
    ids, mask = batch["input_ids"], batch["attention_mask"]
    params = {n: p for n, p in ref.named_parameters() if p.requires_grad}
    if family == "gpt2":  # trainable parameters read, by hand: per layer Q,K,V: A 8xh + B wx8; FFN in: A 8xh + B fx8; out: A 8xf + B hx8
        def n_trainable(h, w, f):
            return 4 * (3 * (8 * h + w * 8) + (8 * h + f * 8) + (8 * f + h * 8))
        scale = (n_trainable(32, 32, 64) / n_trainable(16, 16, 32)) ** 2
        assert scale == 4.0
    else:  # grouped-query attention: K and V read 2 (maxnet) / 1 (subnet) key/value heads of 8
        def n_trainable(h, w, kv, f):
            return 4 * ((8 * h + w * 8) + 2 * (8 * h + kv * 8) + (8 * h + f * 8) + (8 * f + h * 8))
        scale = (n_trainable(32, 32, 16, 64) / n_trainable(16, 16, 8, 32)) ** 2
    assert trained.mlfs_step.gradient_scale(FIXED_SUBNET, trained.stage) == pytest.approx(scale)

    enc.reset_super_network()
    out = enc(ids, mask, output_hidden_states=True)
    total, count = lm_by_hand(out.logits, ids, mask)
    g_max = torch.autograd.grad(total / count, list(params.values()), allow_unused=True)
    enc.set_sub_network(FIXED_SUBNET)
    sub = enc(ids, mask, output_hidden_states=True)
    sub_total, sub_count = lm_by_hand(sub.logits, ids, mask)
    m = mask.float()
    feats = 0.0
    for layer in range(4):  # the smallest subnet keeps every layer here
        U = ref.projections[str(layer)].weight
        target = out.hidden_states[layer].detach() @ U.detach().T
        d = ((sub.hidden_states[layer] @ U[:, :16].T - target) ** 2).sum(-1)
        if normalization == "relative":
            d = d / ((target ** 2).sum(-1) + 1e-6)
        feats = feats + (d * m).sum() / m.sum()
    loss_j = 0.1 * sub_total / sub_count + 0.9 * (kd_by_hand(sub.logits, out.logits.detach(), mask, 2.0) + 0.1 * feats)
    g_sub = torch.autograd.grad(loss_j, list(params.values()), allow_unused=True)

    got = rec.grads[0]
    checked = 0
    for (name, p), gm, gs in zip(params.items(), g_max, g_sub):
        gm = torch.zeros_like(p) if gm is None else gm
        gs = torch.zeros_like(p) if gs is None else gs
        expected = (gm + scale * gs) / 2
        torch.testing.assert_close(got.get(name, torch.zeros_like(expected)), expected, rtol=1e-4, atol=1e-6, msg=name)
        checked += int(gs.abs().sum() > 0)
    assert checked > 10  # subnet gradients reached the stage-1 adapters and the projections
    assert sum(n.startswith("projections.") for n in got) == 4
    assert set(got) <= set(params)  # nothing outside stage 1 received a gradient


def test_validation_perplexity_is_exp_of_the_token_mean_loss_over_the_split(tmp_path):
    net = module("gpt2", evaluation={"members": ["max", "min"]})
    batches = [make_batch(seed=1, lengths=(12, 12, 12, 12)), make_batch(seed=2, lengths=(3, 2, 4, 2))]
    trainer(tmp_path).validate(net, loader(batches))
    metrics = trainer_metrics = net.trainer.callback_metrics
    net.eval()
    for cfg in net.palette_run.members:
        net.encoder.set_sub_network(cfg)
        per_batch = []
        total, count = 0.0, 0
        with torch.no_grad():
            for b in batches:
                t, c = lm_by_hand(net.encoder(b["input_ids"], b["attention_mask"]).logits, b["input_ids"], b["attention_mask"])
                total, count = total + float(t), count + c
                per_batch.append(math.exp(float(t) / c))
        expected = math.exp(total / count)
        assert float(metrics[f"val/{cfg.name}/perplexity"]) == pytest.approx(expected, rel=1e-5)
        assert float(metrics[f"val/{cfg.name}/loss"]) == pytest.approx(total / count, rel=1e-5)
        assert abs(sum(per_batch) / 2 - expected) > 1e-3 * expected  # not a mean of per-batch perplexities
    net.encoder.reset_super_network()
    maxnet = net.encoder.max_config.name
    assert float(trainer_metrics["val/perplexity"]) == float(metrics[f"val/{maxnet}/perplexity"])
    assert float(trainer_metrics["val/loss"]) == float(metrics[f"val/{maxnet}/loss"])


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_short_fit_lowers_the_loss_and_exports_causal_lms_that_generate(family, tmp_path):
    from transformers import AutoModelForCausalLM

    batch = make_batch(seed=3)
    space = {"hidden_sizes": [32, 16], "num_heads": [4, 2], "intermediate_sizes": [64, 32], "depths": [4, 2]}
    net = module(family, stages={"epochs": [1, 1, 1]}, optimizer={"learning_rate": 1e-2, "warmup_ratio": 0.0}, sampling={"num_subnets": 2, "search_space": space}, export={"enabled": True, "dir": str(tmp_path / "export")}, evaluation={"members": ["max", {"hidden_size": 16, "num_heads": 2,
                                                                                    "intermediate_size": 64, "layers": [0, 1, 2, 3]}, "min"]})
    smallest = net.space.smallest()

    def losses() -> tuple[float, float]:
        with torch.no_grad():
            net.encoder.reset_super_network()
            max_loss = float(causal_lm_loss(net(batch), batch["labels"]))
            net.encoder.set_sub_network(smallest)
            min_loss = float(causal_lm_loss(net(batch), batch["labels"]))
            net.encoder.reset_super_network()
        return max_loss, min_loss

    before = losses()
    rec = Recorder()
    trainer(tmp_path, max_epochs=3, limit_val_batches=1, callbacks=[rec]).fit(net, loader([batch], 4), loader([batch]))
    after = losses()
    assert [s for _, s, _ in rec.sampled] == [0] * 4 + [1] * 4 + [2] * 4  # 4 steps per stage
    # The maxnet trains all 12 steps, the two-layer minnet only in stage 2's 4 (LoRA alone, on a random model).
    assert after[0] < before[0] - 0.1 and after[1] < before[1], (before, after)
    metrics = net.trainer.callback_metrics
    assert float(metrics["val/loss"]) == pytest.approx(after[0], rel=1e-4)
    assert float(metrics[f"val/{smallest.name}/perplexity"]) == pytest.approx(math.exp(after[1]), rel=1e-4)

    report = (tmp_path / "export" / "palette.md").read_text()
    assert "loss" in report and "perplexity" in report
    prompt = batch["input_ids"][:2, :5]
    for cfg in net.palette_run.members:
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "export" / cfg.name).eval()
        net.encoder.set_sub_network(cfg)
        with torch.no_grad():
            torch.testing.assert_close(loaded(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits[batch["attention_mask"].bool()],
                                       net(batch)[batch["attention_mask"].bool()], atol=1e-5, rtol=0)
            generated = loaded.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=3, do_sample=False)
            expected = prompt
            for _ in range(3):
                expected = torch.cat([expected, net.encoder(expected).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        assert torch.equal(generated, expected)
    net.encoder.reset_super_network()


class ImportanceData(L.LightningDataModule):
    def __init__(self, batches: list[dict]):
        super().__init__()
        self.batches = batches

    def train_dataloader(self):
        return loader(self.batches)

    def importance_dataloader(self):
        return loader(self.batches)


def test_importance_reorder_at_fit_start_permutes_whole_kv_groups_and_keeps_the_maxnet(tmp_path):
    """`importance_reorder` ranks on the datamodule's importance batches before training: the same permutation
    as `reorder_by_importance` applied by hand, the maxnet's logits unchanged; without such a datamodule, a
    clear error."""
    from kdlora.elastic.importance import reorder_by_importance

    batches = [make_batch(seed=s) for s in range(2)]
    net = module("llama", sampling={"search_space": FIXED_SPACE}, importance={"reorder": True, "batches": 2})
    by_hand = module("llama", sampling={"search_space": FIXED_SPACE})
    probe = make_batch(seed=9)
    with torch.no_grad():
        before = by_hand.encoder(probe["input_ids"], probe["attention_mask"]).logits
    orders = reorder_by_importance(by_hand.encoder, batches, num_batches=2)
    assert any(o != sorted(o) for o in orders["heads"])
    assert all(o[j] // 2 == o[j + 1] // 2 for o in orders["heads"] for j in (0, 2))  # 2 query heads per kv head
    trainer(tmp_path, max_steps=0, limit_val_batches=0).fit(net, datamodule=ImportanceData(batches))
    for (name, a), (_, b) in zip(net.encoder.state_dict().items(), by_hand.encoder.state_dict().items()):
        torch.testing.assert_close(a, b, msg=name)
    net.encoder.eval()
    with torch.no_grad():
        torch.testing.assert_close(net.encoder(probe["input_ids"], probe["attention_mask"]).logits, before, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="importance_dataloader"):
        trainer(tmp_path, max_steps=0, limit_val_batches=0).fit(
            module("llama", sampling={"search_space": FIXED_SPACE}, importance={"reorder": True}), loader(batches))


def test_sample_palette_trains_every_palette_member_in_turn(tmp_path):
    """A decoder's palette members are sampled in turn beside the sandwich's smallest (stage 1: the full-depth
    ones), so each is trained directly, not only when a random draw happens to hit it."""
    space = {"hidden_sizes": [32, 16], "num_heads": [4, 2], "intermediate_sizes": [64, 32], "depths": [4, 3, 2]}
    wide = {"hidden_size": 16, "num_heads": 2, "intermediate_size": 64, "depth": 4}
    deep = {"hidden_size": 32, "num_heads": 4, "intermediate_size": 32, "depth": 3}
    net = module("gpt2", stages={"epochs": [0, 1, 1]}, sampling={"num_subnets": 2, "search_space": space}, evaluation={"members": ["max", wide, deep, "min"]})
    rec = Recorder()
    trainer(tmp_path, max_epochs=2, limit_val_batches=0, callbacks=[rec]).fit(net, loader([make_batch()], 4))
    wide_name, deep_name = net.palette_run.names[1], net.palette_run.names[2]
    by_stage = {s: [names for _, st, names in rec.sampled if st == s] for s in (1, 2)}
    smallest = {1: net.space.smallest(full_depth=True).name, 2: net.space.smallest().name}
    for stage, steps in by_stage.items():
        assert len(steps) == 4 and all(names[0] == smallest[stage] for names in steps)  # the sandwich stays
    assert [names[1] for names in by_stage[1]] == [wide_name] * 4  # the only full-depth member besides the maxnet
    assert {names[1] for names in by_stage[2]} == {wide_name, deep_name}
