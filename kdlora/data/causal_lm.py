"""Causal language modelling data: documents (files or dataset rows) packed into fixed-length blocks.

Each document is tokenised without special tokens and followed by one EOS; the documents of a split
are concatenated in the split's order and cut into `block_size` blocks (GPT-style packing, a block may
span documents). The held-out split is drawn **by document**: a seeded permutation of the documents,
the first ``ceil(val_fraction · n)`` are validation, so no document contributes to both splits.

Batches are ``{input_ids, attention_mask, labels}`` (LongTensor ``[B, block_size]``), labels equal to
input_ids and -100 where padding; the model shifts them. Training blocks are all full (the remainder of
the stream is dropped); the last partial validation block is padded so that every held-out token is scored.

The token stream of each split is cached on disk (``<cache_dir>/lm_tokenized/<key>.npy``, written
atomically), keyed by the tokenizer (its serialised vocabulary and rules), the documents in order
(names and content hashes) and the token limit; the stream does not depend on `block_size`, so a new
block size re-packs the cached stream without tokenising again.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import lightning as L
import numpy as np
import torch
from datasets import Dataset, DatasetDict
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from kdlora.data.samplers import (
    ResumableDataLoader,
    ResumableShuffleSampler,
    _uses_distributed_sampler,
    train_order_position,
)
from kdlora.data.tokenizer import load_tokenizer
from kdlora.io import write_atomic

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
CACHE_VERSION = 1  # bump when the cached stream's meaning changes
TOKENIZE_CHUNK = 64  # documents per tokenizer call


class LMDataError(ValueError):
    """The language-modelling source is missing, empty or cannot make the requested splits."""


@dataclass(frozen=True)
class Document:
    """One document: a display name, its text and the hash of its content (bytes of a file, or text)."""

    name: str
    text: str
    digest: str


def _text_digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


# ----------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------


def read_text_files(paths: Sequence[Path], names: Sequence[str], limit: Optional[int] = None) -> list[Document]:
    """The non-empty files as documents, in the given order, stopping at `limit` documents (files past it
    are not read); a file that is not UTF-8 is skipped and named in one warning."""
    docs, skipped = [], []
    for path, name in zip(paths, names):
        if limit is not None and len(docs) >= limit:
            break
        raw = Path(path).read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            skipped.append(name)
            continue
        if text:  # an empty file holds no document (not even an EOS)
            docs.append(Document(name, text, hashlib.sha256(raw).hexdigest()))
    if skipped:
        log.warning("skipped %d file(s) that are not UTF-8 text: %s%s", len(skipped), ", ".join(skipped[:5]),
                    " ..." if len(skipped) > 5 else "")
    return docs


def folder_files(folder: Path, pattern: str) -> tuple[list[Path], list[str]]:
    """Files under `folder` matching the glob `pattern` (``**`` recurses), sorted by relative path."""
    if not folder.is_dir():
        raise LMDataError(f"source {str(folder)!r} is not a directory")
    paths = sorted((p for p in folder.glob(pattern) if p.is_file()), key=lambda p: p.relative_to(folder).as_posix())
    if not paths:
        raise LMDataError(f"no files match {pattern!r} under {folder}")
    return paths, [p.relative_to(folder).as_posix() for p in paths]


def listed_files(files: Sequence[str | Path]) -> tuple[list[Path], list[str]]:
    """The listed files, sorted by path; a missing or repeated entry is an error."""
    if not files:
        raise LMDataError("source is an empty list of files")
    names = [str(f) for f in files]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise LMDataError(f"source lists {repeated[0]!r} more than once")
    missing = [n for n in names if not Path(n).is_file()]
    if missing:
        raise LMDataError(f"source file {missing[0]!r} is not a file ({len(missing)} of {len(names)} missing)")
    names = sorted(names)
    return [Path(n) for n in names], names


def dataset_documents(ds: Dataset, text_column: str, split: str) -> list[Document]:
    if text_column not in ds.column_names:
        raise LMDataError(f"dataset split {split!r} has no text column {text_column!r} (columns: {ds.column_names})")
    return [Document(f"{split}[{i}]", t, _text_digest(t)) for i, t in enumerate(ds[text_column]) if t]


# ----------------------------------------------------------------------------------------------
# Tokenising and packing
# ----------------------------------------------------------------------------------------------


def tokenizer_fingerprint(tok: PreTrainedTokenizerBase) -> str:
    """A hash of what decides the token ids: the serialised fast tokenizer (vocabulary, merges,
    normaliser, pre-tokeniser) or, for a slow one, its class and vocabulary, plus the EOS id."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        body = backend.to_str()
    else:
        body = type(tok).__name__ + json.dumps(sorted(tok.get_vocab().items()))
    return hashlib.sha256(f"{body}|eos={tok.eos_token_id}".encode()).hexdigest()


def token_stream(docs: Sequence[Document], tok: PreTrainedTokenizerBase, max_tokens: Optional[int] = None) -> np.ndarray:
    """The documents' token ids in order, each followed by EOS, as int32; with `max_tokens`, tokenising
    stops once the stream holds that many (the stream is then cut to exactly `max_tokens`)."""
    eos = tok.eos_token_id
    parts: list[np.ndarray] = []
    total = 0
    for start in range(0, len(docs), TOKENIZE_CHUNK):
        chunk = docs[start:start + TOKENIZE_CHUNK]
        encoded = tok([d.text for d in chunk], add_special_tokens=False, verbose=False)["input_ids"]
        for ids in encoded:
            parts.append(np.asarray([*ids, eos], dtype=np.int32))
            total += len(ids) + 1
        if max_tokens is not None and total >= max_tokens:
            break
    stream = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
    return stream[:max_tokens] if max_tokens is not None else stream


class PackedBlocks(torch.utils.data.Dataset):
    """A token stream cut into `block_size` blocks. Without `pad_last` the remainder is dropped; with
    it a last partial block of at least 2 tokens (1 prediction) is padded with `pad_id`, mask 0, label -100."""

    def __init__(self, stream: np.ndarray, block_size: int, pad_last: bool = False, pad_id: int = 0) -> None:
        self.stream, self.block_size, self.pad_id = stream, int(block_size), int(pad_id)
        self.full = len(stream) // self.block_size
        self.partial = pad_last and len(stream) - self.full * self.block_size >= 2

    def __len__(self) -> int:
        return self.full + int(self.partial)

    @property
    def num_tokens(self) -> int:
        """Real (unpadded) tokens in the blocks."""
        return self.full * self.block_size + (len(self.stream) - self.full * self.block_size if self.partial else 0)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"block {i} of {len(self)}")
        i %= len(self)
        ids = torch.from_numpy(self.stream[i * self.block_size:(i + 1) * self.block_size].astype(np.int64))
        mask = torch.ones(self.block_size, dtype=torch.long)
        if len(ids) < self.block_size:
            real = len(ids)
            ids = torch.cat([ids, torch.full((self.block_size - real,), self.pad_id, dtype=torch.long)])
            mask[real:] = 0
        labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# ----------------------------------------------------------------------------------------------
# DataModule
# ----------------------------------------------------------------------------------------------


class CausalLMDataModule(L.LightningDataModule):
    """Text documents packed into blocks for next-token prediction, with a held-out split by document.

    Args:
        tokenizer_name: local directory (or hub id) of the tokenizer; it must have an EOS token. Required
            (under `train.py` it defaults to the model's ``model_name_or_path``).
        source: required: a folder (files matching `pattern` below it), a list of files, or a `datasets`
            Dataset (rows are documents) / DatasetDict (its ``train`` split and, if present, its
            ``validation`` split, which then is the held-out split and `val_fraction` is not used).
        pattern: glob of the files under a folder source; ``**`` recurses (``**/*.py``).
        text_column: the text column of a dataset source.
        block_size: tokens per block (at least 2: one prediction).
        val_fraction: fraction of the documents held out for validation (seeded, by document); 0 for none.
        seed: seeds the split, the `max_files` subset and the training order.
        max_files: keep this many documents (a seeded subset) before splitting, to size runs.
        max_train_tokens / max_val_tokens: tokenise each split only up to this many tokens.
        batch_size: training batch size; `eval_batch_size` defaults to it.
        cache_dir: where token streams are cached (default ``$KDLORA_CACHE`` or ``~/.cache/kdlora``).
    """

    def __init__(
        self,
        tokenizer_name: Optional[str] = None,
        source: Union[str, list[str], Dataset, DatasetDict, None] = None,
        pattern: str = "**/*",
        text_column: str = "text",
        block_size: int = 512,
        val_fraction: float = 0.1,
        seed: int = 42,
        max_files: Optional[int] = None,
        max_train_tokens: Optional[int] = None,
        max_val_tokens: Optional[int] = None,
        batch_size: int = 8,
        eval_batch_size: Optional[int] = None,
        num_workers: int = 0,
        cache_dir: Optional[str] = None,
    ) -> None:
        super().__init__()
        if tokenizer_name is None or source is None:  # defaults only so the CLI can fill the tokenizer from the model
            raise LMDataError("CausalLMDataModule needs a tokenizer_name and a source (a folder, files or a dataset)")
        if block_size < 2:
            raise LMDataError(f"block_size must be at least 2 (one input and one target token), got {block_size}")
        if not 0.0 <= val_fraction < 1.0:
            raise LMDataError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if max_files is not None and max_files < 1:
            raise LMDataError(f"max_files must be at least 1 (or null for all files), got {max_files}")
        for name, value in (("max_train_tokens", max_train_tokens), ("max_val_tokens", max_val_tokens)):
            if value is not None and value < block_size:
                raise LMDataError(f"{name}={value} is less than one block (block_size={block_size})")
        if batch_size < 1 or (eval_batch_size is not None and eval_batch_size < 1):
            raise LMDataError(f"batch_size and eval_batch_size must be at least 1, got {batch_size} and {eval_batch_size}")
        self.save_hyperparameters(ignore=["source"] if isinstance(source, (Dataset, DatasetDict)) else None)
        self.tokenizer_name = tokenizer_name
        self.block_size = int(block_size)
        self.val_fraction = float(val_fraction)
        self.seed = int(seed)
        self.max_files = max_files
        self.max_tokens = {"train": max_train_tokens, "validation": max_val_tokens}
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size or batch_size)
        self.num_workers = int(num_workers)
        self.cache_dir = Path(cache_dir or os.environ.get("KDLORA_CACHE", Path.home() / ".cache" / "kdlora")) / "lm_tokenized"
        self._tokenizer: Optional[PreTrainedTokenizerBase] = None
        # Checked now, before any run directory exists: the source, the split and the tokenizer.
        self.documents = self._split(source, pattern, text_column)
        self.tokenizer  # noqa: B018 (loads and checks it)
        self.tokenized_documents = 0  # documents tokenised by this module (0 when every split came from the cache)
        self.datasets: dict[str, PackedBlocks] = {}
        self._train_sampler: Optional[ResumableShuffleSampler] = None
        self._resume_order: Optional[dict[str, int]] = None  # from a checkpoint: where training resumes

    @property
    def files(self) -> dict[str, list[str]]:
        """Names of the documents of each split, in packing order."""
        return {split: [d.name for d in docs] for split, docs in self.documents.items()}

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        if self._tokenizer is None:
            tok = load_tokenizer(self.tokenizer_name, "data.tokenizer_name")
            if tok.eos_token_id is None:
                raise LMDataError(f"tokenizer {self.tokenizer_name!r} has no EOS token, which separates packed documents")
            self._tokenizer = tok
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    # ---- documents and the split ----
    def _split(self, source, pattern: str, text_column: str) -> dict[str, list[Document]]:
        if isinstance(source, DatasetDict):
            if "train" not in source:
                raise LMDataError(f"dataset has no 'train' split (splits: {sorted(source)})")
            if "validation" in source:
                split = {"train": dataset_documents(source["train"], text_column, "train"),
                         "validation": dataset_documents(source["validation"], text_column, "validation")}
                for name, docs in split.items():
                    if not docs:
                        raise LMDataError(f"dataset split {name!r} has no non-empty {text_column!r} text")
                rng = random.Random(self.seed)
                if self.max_files is not None:
                    split = {k: rng.sample(v, min(self.max_files, len(v))) for k, v in split.items()}
                return split
            source = source["train"]
        # One seeded permutation of the sorted documents; `max_files` keeps its first ones (files past them
        # are never read), the first ceil(val_fraction * n) of those are held out.
        rng = random.Random(self.seed)
        if isinstance(source, Dataset):
            docs = dataset_documents(source, text_column, "train")
            rng.shuffle(docs)
            docs = docs[:self.max_files]
        elif isinstance(source, (str, os.PathLike, list, tuple)):
            paths, names = folder_files(Path(source), pattern) if isinstance(source, (str, os.PathLike)) else listed_files(source)
            order = list(range(len(paths)))
            rng.shuffle(order)
            docs = read_text_files([paths[i] for i in order], [names[i] for i in order], self.max_files)
        else:
            raise LMDataError(f"source must be a folder, a list of files or a datasets Dataset/DatasetDict, got {type(source).__name__}")
        if not docs:
            raise LMDataError(f"source has no non-empty documents ({_describe(source)})")
        n_val = math.ceil(self.val_fraction * len(docs))
        if n_val >= len(docs):
            raise LMDataError(f"val_fraction={self.val_fraction} of {len(docs)} document(s) holds out {n_val}, "
                              f"leaving the training split empty; use more documents or a smaller val_fraction")
        return {"train": docs[n_val:], "validation": docs[:n_val]}

    # ---- tokenising, with the cache ----
    def cache_key(self, split: str) -> str:
        docs = self.documents[split]
        key = {"version": CACHE_VERSION, "tokenizer": tokenizer_fingerprint(self.tokenizer),
               "documents": [[d.name, d.digest] for d in docs], "max_tokens": self.max_tokens[split]}
        return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:24]

    def _stream(self, split: str) -> np.ndarray:
        path = self.cache_dir / f"{self.cache_key(split)}.npy"
        if path.is_file():
            try:
                return np.load(path, allow_pickle=False)
            except (OSError, ValueError) as e:  # an unreadable cache entry is re-made, not trusted
                log.warning("cache file %s is unreadable (%s); tokenising again", path, e)
        stream = token_stream(self.documents[split], self.tokenizer, self.max_tokens[split])
        self.tokenized_documents += len(self.documents[split])
        buffer = io.BytesIO()
        np.save(buffer, stream, allow_pickle=False)
        write_atomic(path, buffer.getvalue())
        return stream

    # ---- Lightning hooks ----
    def prepare_data(self) -> None:
        """Tokenise into the cache once (Lightning calls this on one process), so every rank's `setup` reads it."""
        for split, docs in self.documents.items():
            if docs:
                self._stream(split)

    def setup(self, stage: Optional[str] = None) -> None:
        splits = ["train", "validation"] if stage in ("fit", None) else ["validation"]
        for split in splits:
            if split in self.datasets or not self.documents.get(split):
                continue
            stream = self._stream(split)
            blocks = PackedBlocks(stream, self.block_size, pad_last=split != "train", pad_id=self._pad_id)
            if len(blocks) == 0:
                raise LMDataError(f"the {split} split ({len(self.documents[split])} document(s)) holds {len(stream)} tokens, "
                                  f"{'fewer than block_size=' + str(self.block_size) if split == 'train' else 'fewer than 2'}; "
                                  "use more documents or a smaller block_size")
            self.datasets[split] = blocks

    @property
    def _pad_id(self) -> int:
        tok = self.tokenizer
        return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def _loader(self, ds: PackedBlocks, batch_size: int, sampler=None, loader_class: type[DataLoader] = DataLoader) -> DataLoader:
        return loader_class(ds, batch_size=batch_size, sampler=sampler, num_workers=self.num_workers,
                            persistent_workers=self.num_workers > 0, generator=torch.Generator().manual_seed(self.seed))

    def train_dataloader(self) -> DataLoader:
        """Shuffled by (seed, epoch) alone (never the global RNG) and sharded over DDP ranks; after a
        resume it starts where the checkpoint's run stopped inside the epoch."""
        trainer = self.trainer
        shard = trainer.distributed_sampler_kwargs if trainer is not None and _uses_distributed_sampler(trainer) else None
        sampler = ResumableShuffleSampler(self.datasets["train"], seed=self.seed, **(shard or {}))
        if self._resume_order is not None:
            sampler.resume(**self._resume_order)
        self._train_sampler = sampler
        return self._loader(self.datasets["train"], self.batch_size, sampler, ResumableDataLoader)

    def importance_dataloader(self) -> DataLoader:
        """Training blocks in a seeded shuffled order, for ranking importance (training data, never the held-out
        files). Its own sampler: drawing from it leaves the training loader and its resume position as they are."""
        return self._loader(self.datasets["train"], self.batch_size, ResumableShuffleSampler(self.datasets["train"], seed=self.seed))

    def _train_data(self) -> dict[str, Any]:
        return {"block_size": self.block_size, "batch_size": self.batch_size, "train_key": self.cache_key("train")}

    def state_dict(self) -> dict[str, Any]:
        """Where training is in the shuffled order (saved in every checkpoint, as `GLUEDataModule` does):
        the seed, the epoch and how many blocks of this rank's shard of that epoch have been trained on,
        plus what the order is of (block and batch size, the training stream's cache key)."""
        order = train_order_position(self._train_sampler, self.trainer, self.batch_size)
        if order is None:
            return {}
        return {"train_order": order, "train_data": self._train_data()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Called by Lightning when it restores a checkpoint, before it builds the train dataloader. Inside an
        epoch the position means something only for the same blocks and batch size: else it is an error."""
        order = state_dict.get("train_order")
        saved = state_dict.get("train_data")
        if order and order.get("start", 0) > 0 and saved is not None:
            now = self._train_data()
            changed = [k for k in now if saved.get(k) != now[k]]
            if changed:
                what = ", ".join(f"{k} {saved.get(k)} -> {now[k]}" for k in changed)
                raise LMDataError(f"the checkpoint stopped inside epoch {order['epoch']} of other training data ({what}); "
                                  "resume with the same files, tokenizer, block_size and batch_size, or from an epoch end")
        self._resume_order = dict(order) if order else None
        if self._resume_order is not None and self._train_sampler is not None:
            self._train_sampler.resume(**self._resume_order)

    def val_dataloader(self):
        if "validation" not in self.datasets:
            return []
        return self._loader(self.datasets["validation"], self.eval_batch_size)

    def summary(self) -> dict[str, Any]:
        """Documents, blocks and tokens of each split set up so far."""
        return {split: {"documents": len(self.documents[split]), "blocks": len(ds), "tokens": ds.num_tokens}
                for split, ds in self.datasets.items()}


def _describe(source) -> str:
    if isinstance(source, Dataset):
        return f"a dataset of {len(source)} rows"
    if isinstance(source, (list, tuple)):
        return f"{len(source)} listed file(s)"
    return f"folder {source}"
