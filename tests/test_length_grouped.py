"""Length-grouped batching (`group_by_length`): seeded, DDP-sharded, resumable, idx-aligned."""

from __future__ import annotations

import random
import statistics
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import DataLoader
from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding

from kdlora.data.glue import GLUEDataModule
from kdlora.data.samplers import LengthGroupedSampler, token_lengths
from kdlora.kd.args import TeacherTargetsArgs

N, BATCH = 1001, 8  # 1001: a partial last batch and DistributedSampler's padding under 2 ranks
_RNG = random.Random(0)
LENGTHS = [_RNG.randint(5, 128) for _ in range(N)]


def sampler(rank=0, replicas=1, seed=3, epoch=0, batch=BATCH, lengths=LENGTHS):
    s = LengthGroupedSampler(list(range(len(lengths))), lengths, batch, num_replicas=replicas, rank=rank, seed=seed,
                             mega_batch_factor=10)
    s.set_epoch(epoch)
    return s


def batches_of(order, batch=BATCH):
    return [order[b:b + batch] for b in range(0, len(order), batch)]


def spread(batches, lengths=LENGTHS):
    """Mean over batches of (longest − shortest) length."""
    return statistics.fmean(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches)


def test_order_is_drawn_from_seed_and_epoch_alone():
    first = list(sampler())
    torch.manual_seed(99), random.seed(99)  # the global RNGs play no part
    assert list(sampler()) == first and list(sampler()) == list(sampler())
    assert sorted(first) == list(range(N))  # one rank: every example exactly once
    assert list(sampler(epoch=1)) != first and list(sampler(seed=4)) != first
    assert sorted(list(sampler(epoch=1))) == list(range(N))


def test_two_ranks_get_disjoint_equal_shares_covering_everything():
    for lengths in (LENGTHS[:1000], LENGTHS):  # divisible by the ranks, and one example short of it
        ranks = [list(sampler(rank=r, replicas=2, lengths=lengths)) for r in (0, 1)]
        assert len(ranks[0]) == len(ranks[1]) == len(sampler(replicas=2, lengths=lengths)) == -(-len(lengths) // 2)
        assert set(ranks[0]) | set(ranks[1]) == set(range(len(lengths)))
        combined = ranks[0] + ranks[1]  # only DistributedSampler's padding (to a multiple of the ranks) repeats
        assert len(combined) - len(set(combined)) == 2 * len(ranks[0]) - len(lengths) == len(lengths) % 2
        # The ranks' k-th batches are adjacent slices of one length-sorted global batch: similar lengths at
        # every step (no rank waits for a longer one).
        steps = list(zip(batches_of(ranks[0]), batches_of(ranks[1])))
        for a, b in steps:
            assert len(a) == len(b) and min(lengths[i] for i in a) >= max(lengths[i] for i in b)
        assert spread([a + b for a, b in steps], lengths) < 0.25 * spread(batches_of(list(range(len(lengths))), 2 * BATCH), lengths)
        assert [list(sampler(rank=r, replicas=2, lengths=lengths)) for r in (0, 1)] == ranks  # same on every rank


def test_batches_spread_much_less_than_random_and_longest_comes_first():
    grouped = batches_of(list(sampler()))
    shuffled = list(range(N))
    random.Random(1).shuffle(shuffled)
    assert spread(grouped) < 0.2 * spread(batches_of(shuffled)), (spread(grouped), spread(batches_of(shuffled)))
    assert max(LENGTHS[i] for i in grouped[0]) == max(LENGTHS)
    assert all(len(b) == BATCH for b in grouped[:-1]) and len(grouped[-1]) == N % BATCH
    # Batches are not simply in length order: their order is shuffled.
    maxima = [max(LENGTHS[i] for i in b) for b in grouped[1:-1]]
    assert maxima != sorted(maxima) and maxima != sorted(maxima, reverse=True)


def test_resume_mid_epoch_gives_exactly_the_remaining_batches():
    for replicas in (1, 2):
        s = sampler(rank=replicas - 1, replicas=replicas)
        s.set_epoch(1)
        full = list(s)
        s.resume(epoch=1, start=5 * BATCH)
        s.set_epoch(1)  # Lightning sets the epoch it resumes: the position holds
        assert batches_of(list(s)) == batches_of(full)[5:]
        s.set_epoch(2)  # the next epoch starts from its beginning
        assert len(list(s)) == len(full)


def test_bad_lengths_are_one_clear_error():
    with pytest.raises(ValueError, match="lengths has 3 entries but the dataset 4 examples"):
        LengthGroupedSampler([0, 1, 2, 3], [1, 2, 3], 2)


def grouped_module(small_glue_dir, tiny_bert_dir, tmp_path, **kwargs):
    dm = GLUEDataModule("sst2", str(tiny_bert_dir), data_dir=str(small_glue_dir), batch_size=4, max_seq_length=64,
                        cache_dir=str(tmp_path), group_by_length=True, seed=7, **kwargs)
    dm.setup("fit")
    return dm


def test_data_module_groups_by_length_and_resumes_from_its_state_dict(small_glue_dir, tiny_bert_dir, tmp_path):
    dm = grouped_module(small_glue_dir, tiny_bert_dir, tmp_path)
    train = dm.datasets["train"]
    lengths = token_lengths(train)
    assert lengths == [len(ids) for ids in train["input_ids"]]
    batches = [b["idx"].tolist() for b in dm.train_dataloader()]
    assert isinstance(dm._train_sampler, LengthGroupedSampler)
    row = {i: n for i, n in zip(train["idx"], lengths)}
    plain = GLUEDataModule("sst2", str(tiny_bert_dir), data_dir=str(small_glue_dir), batch_size=4, max_seq_length=64,
                           cache_dir=str(tmp_path), seed=7)
    plain.setup("fit")
    plain_batches = [b["idx"].tolist() for b in plain.train_dataloader()]
    assert sorted(sum(batches, [])) == sorted(sum(plain_batches, []))
    assert spread(batches, row) < 0.5 * spread(plain_batches, row)
    assert [b["idx"].tolist() for b in dm.train_dataloader()] == batches  # reproducible

    # What a checkpoint taken after 5 batches of epoch 0 holds, restored into a new data module.
    dm.trainer = SimpleNamespace(fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=SimpleNamespace(
        current=SimpleNamespace(processed=5)))), num_training_batches=len(batches))
    state = dm.state_dict()
    assert state["train_order"] == {"seed": dm._train_sampler.seed, "epoch": 0, "start": 5 * 4}
    resumed = grouped_module(small_glue_dir, tiny_bert_dir, tmp_path)
    resumed.load_state_dict(state)
    assert [b["idx"].tolist() for b in resumed.train_dataloader()] == batches[5:]

    # Inside an epoch, another batching would not continue this order: one clear error.
    for other in (dict(group_by_length=False), dict(batch_size=8)):
        changed = GLUEDataModule("sst2", str(tiny_bert_dir), data_dir=str(small_glue_dir), max_seq_length=64,
                                 cache_dir=str(tmp_path), seed=7, **{"batch_size": 4, "group_by_length": True, **other})
        with pytest.raises(ValueError, match="stopped inside epoch 0 with data.group_by_length: true, data.batch_size: 4"):
            changed.load_state_dict(state)
    at_epoch_end = {**state, "train_order": {**state["train_order"], "epoch": 1, "start": 0}}
    plain.load_state_dict(at_epoch_end)  # at an epoch end the batching may change
    assert plain._resume_order == at_epoch_end["train_order"]


def test_cached_teacher_targets_follow_idx_under_grouping(small_glue_dir, tiny_bert_dir, tmp_path):
    """A subset (max_train_samples) makes positions and idx differ: each row must get its own teacher output."""
    from kdlora.kd import KDLoRAStudent

    dm = grouped_module(small_glue_dir, tiny_bert_dir, tmp_path, max_train_samples=40)
    train = dm.datasets["train"]
    assert list(train["idx"]) != list(range(len(train)))
    student = KDLoRAStudent(str(tiny_bert_dir), str(tiny_bert_dir), "sst2",
                            teacher_targets=TeacherTargetsArgs(mode="cached"))
    student.teacher_targets.cache(train, DataCollatorWithPadding(dm.tokenizer, return_tensors="pt"), tmp_path / "cache")
    teacher = AutoModelForSequenceClassification.from_pretrained(str(tiny_bert_dir)).eval()
    by_idx = {i: ids for i, ids in zip(train["idx"], train["input_ids"])}
    seen = []
    for batch in dm.train_dataloader():
        for r, i in enumerate(batch["idx"].tolist()):  # each row is the example its idx names
            n = int(batch["attention_mask"][r].sum())
            assert batch["input_ids"][r, :n].tolist() == by_idx[i]
        with torch.no_grad():
            online = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             token_type_ids=batch["token_type_ids"]).logits
        torch.testing.assert_close(student.teacher_targets.logits(batch), online, atol=1e-5, rtol=1e-5)
        seen += batch["idx"].tolist()
    assert sorted(seen) == sorted(train["idx"])
