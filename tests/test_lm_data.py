"""Causal-LM data: files packed into blocks with EOS between documents, the held-out split by file,
the on-disk token cache, seeded order and the errors for sources that cannot make a split."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset, DatasetDict
from tokenizers import Tokenizer

from conftest import write_tiny_bpe_tokenizer
from kdlora.data.causal_lm import IGNORE_INDEX, CausalLMDataModule, LMDataError

N_FILES = 8
EOS, PAD = 1, 0  # the ids write_tiny_bpe_tokenizer gives its special tokens


def file_text(i: int) -> str:
    body = "".join(f"    x_{j} = {i} * {j} + 1\n" for j in range(3 + i))
    return f"# doc{i:02d}marker\ndef f_{i}(x):\n{body}    return x\n"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """8 small Python files, half of them one folder down, plus files the pattern must not match."""
    root = tmp_path_factory.mktemp("corpus")
    for i in range(N_FILES):
        path = root / ("pkg" if i % 2 else "") / f"m{i}.py"
        path.parent.mkdir(exist_ok=True)
        path.write_text(file_text(i))
    (root / "notes.txt").write_text("not python\n")
    (root / "pkg" / "empty.py").write_text("")
    return root


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    return write_tiny_bpe_tokenizer(tmp_path_factory.mktemp("tok"), [file_text(i) for i in range(N_FILES)])


def reference_ids(tok_dir: Path, text: str) -> list[int]:
    """Token ids from the raw `tokenizers` file, without transformers (no special tokens added)."""
    return Tokenizer.from_file(str(tok_dir / "tokenizer.json")).encode(text, add_special_tokens=False).ids


def make(tok_dir, source, tmp_path, **kw) -> CausalLMDataModule:
    kw = {"pattern": "**/*.py", "block_size": 16, "val_fraction": 0.25, "seed": 0, "batch_size": 3,
          "cache_dir": str(tmp_path / "cache"), **kw}
    return CausalLMDataModule(str(tok_dir), source, **kw)


def all_blocks(ds) -> list[dict[str, torch.Tensor]]:
    return [ds[i] for i in range(len(ds))]


def test_blocks_are_the_files_tokens_with_eos_cut_by_hand(corpus, tok_dir, tmp_path):
    dm = make(tok_dir, str(corpus), tmp_path)
    dm.setup("fit")
    matching = sorted(str(p.relative_to(corpus)) for p in corpus.rglob("*.py") if p.stat().st_size)
    assert sorted(dm.files["train"] + dm.files["validation"]) == matching  # notes.txt and the empty file left out
    for split in ("train", "validation"):
        stream = [t for name in dm.files[split] for t in reference_ids(tok_dir, (corpus / name).read_text()) + [EOS]]
        blocks = all_blocks(dm.datasets[split])
        full = len(stream) // 16
        expected = [stream[b * 16:(b + 1) * 16] for b in range(full)]
        if split == "validation" and len(stream) % 16 >= 2:  # the held-out tail is padded, not dropped
            tail = stream[full * 16:]
            expected.append(tail + [PAD] * (16 - len(tail)))
        assert [b["input_ids"].tolist() for b in blocks] == expected
        for b in blocks:
            real = b["attention_mask"].bool()
            assert b["input_ids"].dtype == b["attention_mask"].dtype == b["labels"].dtype == torch.long
            assert b["labels"][real].tolist() == b["input_ids"][real].tolist()
            assert (b["labels"][~real] == IGNORE_INDEX).all()
        if split == "validation":
            assert blocks[-1]["attention_mask"].sum().item() == len(stream) - full * 16
            assert dm.datasets[split].num_tokens == len(stream)


def test_held_out_split_is_by_file_and_seeded(corpus, tok_dir, tmp_path):
    dm = make(tok_dir, str(corpus), tmp_path)
    dm.setup("fit")
    train, val = dm.files["train"], dm.files["validation"]
    assert len(val) == math.ceil(0.25 * N_FILES) and not set(train) & set(val)
    # No file's text reaches the other split: each file's marker decodes only in its own split's blocks.
    tok = dm.tokenizer
    text = {s: tok.decode([t for b in all_blocks(dm.datasets[s]) for t in b["input_ids"].tolist()]) for s in ("train", "validation")}
    for name in val:
        marker = (corpus / name).read_text().split("\n")[0][2:]
        assert marker in text["validation"] and marker not in text["train"]
    for name in train:
        assert (corpus / name).read_text().split("\n")[0][2:] not in text["validation"]
    again = make(tok_dir, str(corpus), tmp_path)
    assert again.files == dm.files
    # Listing the same files (the empty one too) in another order gives the same split: the seed decides it.
    listed = make(tok_dir, [str(p) for p in sorted(corpus.rglob("*.py"), reverse=True)], tmp_path)
    assert sorted(map(lambda n: Path(n).name, listed.files["validation"])) == sorted(Path(n).name for n in val)
    splits = {tuple(sorted(make(tok_dir, str(corpus), tmp_path, seed=s).files["validation"])) for s in range(5)}
    assert len(splits) > 1


def test_second_setup_reads_the_cache(corpus, tok_dir, tmp_path, tmp_path_factory):
    first = make(tok_dir, str(corpus), tmp_path)
    first.setup("fit")
    assert first.tokenized_documents == N_FILES
    cached = sorted(p.name for p in (tmp_path / "cache" / "lm_tokenized").iterdir())
    assert len(cached) == 2 and all(n.endswith(".npy") for n in cached)  # one per split, no temporary left
    second = make(tok_dir, str(corpus), tmp_path)
    second.setup("fit")
    assert second.tokenized_documents == 0
    for split in ("train", "validation"):
        assert [b["input_ids"].tolist() for b in all_blocks(second.datasets[split])] == \
               [b["input_ids"].tolist() for b in all_blocks(first.datasets[split])]
    # The stream does not depend on the block size: a new one re-packs the cache.
    other_block = make(tok_dir, str(corpus), tmp_path, block_size=8)
    other_block.setup("fit")
    assert other_block.tokenized_documents == 0 and len(other_block.datasets["train"]) >= 2 * len(first.datasets["train"])
    # Another tokenizer, or a changed file, is tokenised again.
    other_tok = write_tiny_bpe_tokenizer(tmp_path_factory.mktemp("tok2"), [file_text(0)], vocab_size=280)
    retok = make(other_tok, str(corpus), tmp_path)
    retok.setup("fit")
    assert retok.tokenized_documents == N_FILES
    changed = tmp_path / "changed"
    changed.mkdir()
    for p in corpus.rglob("*.py"):
        (changed / p.name).write_text(p.read_text())
    base = make(tok_dir, str(changed), tmp_path)
    base.setup("fit")
    assert base.tokenized_documents == N_FILES
    victim = base.files["train"][0]
    (changed / victim).write_text(file_text(0) + "# edited\n")
    edited = make(tok_dir, str(changed), tmp_path)
    edited.setup("fit")
    assert edited.tokenized_documents == len(edited.files["train"])  # the train split only
    assert len(list((tmp_path / "cache" / "lm_tokenized").iterdir())) == 2 + 2 + 2 + 1


def test_training_order_is_seeded_and_leaves_the_global_rng_alone(corpus, tok_dir, tmp_path):
    orders = []
    for _ in range(2):
        dm = make(tok_dir, str(corpus), tmp_path, val_fraction=0.0, block_size=8)
        dm.setup("fit")
        state = torch.random.get_rng_state()
        batches = list(dm.train_dataloader())
        assert torch.equal(state, torch.random.get_rng_state())
        orders.append(torch.cat([b["input_ids"] for b in batches]))
        assert batches[0]["input_ids"].shape == (3, 8)
        assert dm.val_dataloader() == []
    torch.testing.assert_close(orders[0], orders[1])
    in_order = torch.stack([b["input_ids"] for b in all_blocks(dm.datasets["train"])])
    assert sorted(map(tuple, orders[0].tolist())) == sorted(map(tuple, in_order.tolist()))
    assert not torch.equal(orders[0], in_order)  # shuffled


def test_limits_size_the_run(corpus, tok_dir, tmp_path):
    dm = make(tok_dir, str(corpus), tmp_path, max_files=3, max_train_tokens=40)
    assert len(dm.files["train"]) + len(dm.files["validation"]) == 3 and len(dm.files["validation"]) == 1
    full = make(tok_dir, str(corpus), tmp_path)  # max_files keeps the head of the same seeded order
    assert dm.files["validation"] + dm.files["train"] == (full.files["validation"] + full.files["train"])[:3]
    dm.setup("fit")
    stream = [t for name in dm.files["train"] for t in reference_ids(tok_dir, (corpus / name).read_text()) + [EOS]]
    assert [b["input_ids"].tolist() for b in all_blocks(dm.datasets["train"])] == [stream[:16], stream[16:32]]
    assert dm.summary()["train"] == {"documents": 2, "blocks": 2, "tokens": 32}


def test_dataset_sources(tok_dir, tmp_path):
    texts = [file_text(i) for i in range(6)]
    dm = make(tok_dir, Dataset.from_dict({"content": texts}), tmp_path, text_column="content", val_fraction=0.34)
    dm.setup("fit")
    assert len(dm.files["validation"]) == 3 and not set(dm.files["train"]) & set(dm.files["validation"])
    dd = DatasetDict({"train": Dataset.from_dict({"text": texts[:4]}), "validation": Dataset.from_dict({"text": texts[4:]})})
    dm = make(tok_dir, dd, tmp_path)
    dm.setup("fit")
    val = [t for s in texts[4:] for t in reference_ids(tok_dir, s) + [EOS]]
    got = [t for b in all_blocks(dm.datasets["validation"]) for t, m in zip(b["input_ids"].tolist(), b["attention_mask"].tolist()) if m]
    assert got == val
    with pytest.raises(LMDataError, match="has no text column 'body'"):
        make(tok_dir, dd, tmp_path, text_column="body")


def test_bad_sources_fail_with_one_clear_line(corpus, tok_dir, tmp_path, tmp_path_factory):
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (dict(source=str(empty)), r"no files match '\*\*/\*.py' under"),
        (dict(source=str(corpus), pattern="**/*.rs"), r"no files match '\*\*/\*.rs'"),
        (dict(source=str(tmp_path / "nowhere")), "is not a directory"),
        (dict(source=[]), "empty list of files"),
        (dict(source=[str(corpus / "m0.py"), str(corpus / "gone.py")]), "'.*gone.py' is not a file"),
        (dict(source=[str(corpus / "m0.py")] * 2), "more than once"),
        (dict(source=[str(corpus / "pkg" / "empty.py")]), "no non-empty documents"),
        (dict(source=str(corpus), block_size=1), "block_size must be at least 2"),
        (dict(source=str(corpus), val_fraction=1.0), r"val_fraction must be in \[0, 1\)"),
        (dict(source=[str(corpus / "m0.py"), str(corpus / "m2.py")], val_fraction=0.6),
         r"val_fraction=0.6 of 2 document\(s\) holds out 2, leaving the training split empty"),
        (dict(source=str(corpus), max_train_tokens=8), "max_train_tokens=8 is less than one block"),
        (dict(source=42), "source must be a folder, a list of files or a datasets"),
    ]
    for kw, message in cases:
        source = kw.pop("source")
        with pytest.raises(LMDataError, match=message) as e:
            make(tok_dir, source, tmp_path, **kw)
        assert "\n" not in str(e.value)
    no_eos = write_tiny_bpe_tokenizer(tmp_path_factory.mktemp("noeos"), [file_text(0)], eos=False)
    with pytest.raises(LMDataError, match="has no EOS token"):
        make(no_eos, str(corpus), tmp_path)
    short = make(tok_dir, str(corpus), tmp_path, block_size=4096)
    with pytest.raises(LMDataError, match=r"the train split \(6 document\(s\)\) holds \d+ tokens, fewer than block_size=4096"):
        short.setup("fit")
    assert sorted(os.listdir(corpus)) == ["m0.py", "m2.py", "m4.py", "m6.py", "notes.txt", "pkg"]  # nothing written there


def test_non_utf8_files_are_skipped_and_named(tok_dir, tmp_path, caplog):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for i in range(3):
        (folder / f"m{i}.py").write_text(file_text(i))
    (folder / "latin1.py").write_bytes("# caf\xe9\n".encode("latin-1"))
    dm = make(tok_dir, str(folder), tmp_path, val_fraction=0.3)
    assert "latin1.py" not in dm.files["train"] + dm.files["validation"]
    assert "skipped 1 file(s) that are not UTF-8 text: latin1.py" in caplog.text
    assert np.sum([len(v) for v in dm.files.values()]) == 3


def test_prepare_data_fills_the_cache_that_setup_reads(corpus, tok_dir, tmp_path):
    dm = make(tok_dir, str(corpus), tmp_path)
    dm.prepare_data()  # Lightning: one process per machine
    assert dm.tokenized_documents == N_FILES
    dm.setup("fit")  # every rank
    assert dm.tokenized_documents == N_FILES and set(dm.datasets) == {"train", "validation"}


class BlockRecorder:
    """A bigram LM (one embedding of next-token logits) that records the first token of every training block."""

    @staticmethod
    def make(vocab: int):
        import lightning as L

        class Bigram(L.LightningModule):
            def __init__(self):
                super().__init__()
                self.logits = torch.nn.Embedding(vocab, vocab)
                self.seen: list[int] = []

            def training_step(self, batch, batch_idx):
                self.seen += batch["input_ids"][:, 0].tolist()
                logits = self.logits(batch["input_ids"][:, :-1])
                return torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=IGNORE_INDEX)

            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.1)

        return Bigram()


def test_resume_inside_an_epoch_continues_the_order(corpus, tok_dir, tmp_path):
    import lightning as L

    def trainer(**kw):
        return L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, **kw)

    def data(**kw):
        return make(tok_dir, str(corpus), tmp_path, val_fraction=0.0, block_size=8, batch_size=2, **kw)

    full_dm = data()
    full_dm.setup("fit")
    steps = math.ceil(len(full_dm.datasets["train"]) / 2)
    assert steps >= 4
    stop = steps + 2  # two steps into the second epoch

    class SaveAt(L.Callback):  # as a step checkpoint does: in on_train_batch_end
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == stop:
                trainer.save_checkpoint(tmp_path / "mid.ckpt")

    whole = BlockRecorder.make(full_dm.vocab_size)
    trainer(max_epochs=2, callbacks=[SaveAt()]).fit(whole, datamodule=full_dm)
    assert len(whole.seen) == 2 * len(full_dm.datasets["train"])
    resumed = BlockRecorder.make(full_dm.vocab_size)
    trainer(max_epochs=2).fit(resumed, datamodule=data(), ckpt_path=tmp_path / "mid.ckpt")
    assert resumed.seen == whole.seen[stop * 2:]
    assert whole.seen[:len(whole.seen) // 2] != whole.seen[len(whole.seen) // 2:]  # each epoch its own order
    with pytest.raises(LMDataError, match=r"stopped inside epoch 1 of other training data \(block_size 8 -> 16"):
        trainer(max_epochs=2).fit(BlockRecorder.make(full_dm.vocab_size), ckpt_path=tmp_path / "mid.ckpt",
                                  datamodule=make(tok_dir, str(corpus), tmp_path, val_fraction=0.0, block_size=16, batch_size=2))
