"""GLUE as a LightningDataModule: hub or local TSV, tokenization, dynamic padding, stable `idx`.

Both sources are normalised to the hub's layout (hub text column names, hub label ids, an `idx`
column), so everything downstream sees one format. Batches are
``{input_ids, attention_mask[, token_type_ids], labels, idx}``; `idx` is the example's position in
its split and lets a student look up cached teacher outputs under any shuffling.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import math
import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from datasets import Dataset, DatasetDict
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase

from kdlora.data.samplers import (
    LengthGroupedSampler,
    ResumableDataLoader,
    ResumableShuffleSampler,
    _uses_distributed_sampler,
    token_lengths,
    train_order_position,
)
from kdlora.data.tasks import Split, TaskSpec, get_task
from kdlora.data.tokenizer import load_tokenizer

log = logging.getLogger(__name__)


HUB_DATASET = "nyu-mll/glue"


# Columns a model may receive; anything else the tokenizer returns is dropped.
MODEL_COLUMNS = ("input_ids", "attention_mask", "token_type_ids")


class GLUEDataError(ValueError):
    """A GLUE file is missing or malformed."""


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------


STSB_RANGE = (0.0, 5.0)


def _parse_label(value: str, spec: TaskSpec) -> float | int:
    """The hub-layout label of a TSV label field; a ValueError saying why it is not one."""
    if spec.is_regression:
        try:
            label = float(value)
        except ValueError:
            raise ValueError("not a number") from None
        if not math.isfinite(label):
            raise ValueError("not a finite number")
        low, high = STSB_RANGE
        if not low <= label <= high:
            raise ValueError(f"out of range [{low:g}, {high:g}]")
        return label
    if value in spec.label_names:
        return spec.label_names.index(value)
    try:
        label = int(value)
    except ValueError:
        raise ValueError(f"not a {spec.name} label ({', '.join(spec.label_names)}) or class id 0..{spec.num_labels - 1}") from None
    if not 0 <= label < spec.num_labels:
        raise ValueError(f"class id out of range [0, {spec.num_labels - 1}]")
    return label


def read_glue_tsv(path: str | Path, spec: TaskSpec, labelled: bool, max_malformed_fraction: float = 0.01) -> dict[str, list]:
    """Read one GLUE TSV file into hub-layout columns ``{*text_keys, label, idx}``.

    Quote processing is off (GLUE sentences contain bare quotes). Rows with the wrong number of
    fields or an unreadable example id are skipped and counted; more than `max_malformed_fraction`
    of them is an error, since the file is then not what we think it is. A bad label (not one of
    the task's labels or class ids; for STS-B not a finite number in [0, 5]) is always an error,
    naming its line(s) and value(s): a wrong label is not a quoting accident.
    """
    path = Path(path)
    if not path.is_file():
        raise GLUEDataError(f"GLUE file not found: expected {path} (standard GLUE layout <data_dir>/{spec.dir_name}/<split>.tsv)")
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    if labelled and not spec.has_header:
        header = list(spec.positional_columns)
    else:
        if not rows:
            raise GLUEDataError(f"{path} is empty")
        header, rows = rows[0], rows[1:]
    wanted = list(spec.local_text_columns) + ([spec.local_label_column] if labelled else [])
    missing = [c for c in wanted if c not in header]
    if missing:
        raise GLUEDataError(f"{path}: missing column(s) {missing}; header is {header}")
    text_pos = [header.index(c) for c in spec.local_text_columns]
    label_pos = header.index(spec.local_label_column) if labelled else None
    # Unlabelled (test) files carry the official example id, which submissions must keep.
    id_pos = next((header.index(c) for c in ("index", "id") if c in header), None) if not labelled else None

    columns: dict[str, list] = {k: [] for k in spec.text_keys}
    columns["label"], columns["idx"] = [], []
    bad: list[int] = []
    bad_labels: list[tuple[int, str, str]] = []  # (line, value, why)
    for line_no, row in enumerate(rows, start=2 if (spec.has_header or not labelled) else 1):
        if len(row) != len(header):
            bad.append(line_no)
            continue
        try:
            label = _parse_label(row[label_pos], spec) if labelled else -1
        except ValueError as e:
            bad_labels.append((line_no, row[label_pos], str(e)))
            continue
        try:
            idx = int(row[id_pos]) if id_pos is not None else len(columns["idx"])
        except ValueError:
            bad.append(line_no)
            continue
        for key, pos in zip(spec.text_keys, text_pos):
            columns[key].append(row[pos])
        columns["label"].append(label)
        columns["idx"].append(idx)
    total = len(rows)
    if bad_labels:
        groups: dict[tuple[str, str], list[int]] = {}
        for line_no, value, why in bad_labels:
            groups.setdefault((value, why), []).append(line_no)
        shown = "; ".join(f"{value!r} at line(s) {', '.join(map(str, lines[:5]))}{' ...' if len(lines) > 5 else ''} ({why})"
                          for (value, why), lines in list(groups.items())[:3])
        more = f"; {len(groups) - 3} more bad value(s)" if len(groups) > 3 else ""
        raise GLUEDataError(f"{path}: bad {spec.local_label_column!r} label in {len(bad_labels)} of {total} rows: {shown}{more}")
    if bad:
        fraction = len(bad) / max(total, 1)
        msg = f"{path}: {len(bad)} of {total} rows malformed (wrong field count or unreadable id), first at line(s) {bad[:5]}"
        if fraction > max_malformed_fraction:
            raise GLUEDataError(msg + f"; that is more than max_malformed_fraction={max_malformed_fraction}")
        log.warning(msg + "; skipped")
    if not columns["idx"]:
        raise GLUEDataError(f"{path} has no readable rows")
    return columns


@lru_cache(maxsize=16)
def load_hub_glue(config_name: str) -> DatasetDict:
    """The task from the Hugging Face hub (`nyu-mll/glue`): the path real users take."""
    from datasets import load_dataset

    return load_dataset(HUB_DATASET, config_name)


def _dir_candidates(data_dir: Path, spec: TaskSpec) -> list[Path]:
    # The GLUE download script writes "SST-2"; some copies use "sst2" or "SST2".
    names = [spec.dir_name, spec.dir_name.replace("-", ""), spec.name, spec.name.upper()]
    return [data_dir / n for n in dict.fromkeys(names)]


def local_file(data_dir: str | Path, spec: TaskSpec, file: str) -> Path:
    for d in _dir_candidates(Path(data_dir), spec):
        if (d / file).is_file():
            return d / file
    return Path(data_dir) / spec.dir_name / file  # the canonical path, for the error message


class GLUEDataModule(L.LightningDataModule):
    """Any GLUE task from the hub (default) or a local directory in the standard GLUE layout.

    Args:
        task: GLUE task name (cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, wnli, ax).
        tokenizer_name: hub id or local directory of the tokenizer (linked from the model by the CLI).
        data_dir: local GLUE directory (``<data_dir>/<TASK>/train.tsv`` ...); None reads the hub.
        max_seq_length: truncation length; batches are padded dynamically to their longest example.
        batch_size: training batch size; `eval_batch_size` defaults to twice it.
        group_by_length: train on batches of similar length (`LengthGroupedSampler`: less padding,
            faster steps; seeded, resumable and DDP-sharded like the default shuffled order).
        holdout_fraction: if > 0, this seeded fraction of train becomes the validation set (for
            hyperparameter selection) and dev is used only by `test`.
        max_train_samples: keep a seeded random subset of train (quick runs).
        max_eval_samples: keep the first N rows of each evaluation split (quick runs).
        max_malformed_fraction: fraction of unreadable TSV rows tolerated (they are skipped and reported).
        cache_dir: where tokenized local splits are cached (default ``$KDLORA_CACHE`` or ``~/.cache/kdlora``).
    """

    def __init__(
        self,
        task: str = "mrpc",
        tokenizer_name: str = "bert-base-uncased",
        data_dir: Optional[str] = None,
        max_seq_length: int = 128,
        batch_size: int = 32,
        eval_batch_size: Optional[int] = None,
        num_workers: int = 0,
        holdout_fraction: float = 0.0,
        seed: int = 42,
        max_train_samples: Optional[int] = None,
        max_eval_samples: Optional[int] = None,
        max_malformed_fraction: float = 0.01,
        cache_dir: Optional[str] = None,
        group_by_length: bool = False,
    ) -> None:
        super().__init__()
        self.spec = get_task(task)  # fails early and clearly on an unknown task
        if not 0.0 <= holdout_fraction < 1.0:
            raise ValueError(f"holdout_fraction must be in [0, 1), got {holdout_fraction}")
        if max_seq_length < 8:
            raise ValueError(f"max_seq_length must be at least 8, got {max_seq_length}")
        if batch_size < 1 or (eval_batch_size is not None and eval_batch_size < 1):
            raise ValueError(f"batch_size and eval_batch_size must be at least 1, got {batch_size} and {eval_batch_size}")
        for name, value in (("max_train_samples", max_train_samples), ("max_eval_samples", max_eval_samples)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1 (or null for all rows), got {value}")
        if data_dir is not None and not Path(data_dir).is_dir():
            raise GLUEDataError(f"data_dir {data_dir!r} is not a directory")
        # Local files are read and checked now, before any run directory is written, so a missing
        # file, a bad label or too many malformed rows fails with nothing left behind; `setup` uses
        # the columns read here instead of reading the files again.
        self._read_columns: dict[str, dict[str, list]] = {}
        if data_dir is not None and self.spec.has_train:
            for file in ["train.tsv", *(s.file for s in self.spec.validation)]:
                path = local_file(data_dir, self.spec, file)
                if not path.is_file():
                    raise GLUEDataError(f"GLUE file not found: expected {path} (standard GLUE layout <data_dir>/{self.spec.dir_name}/{file})")
            for file in ["train.tsv", *(s.file for s in self.spec.validation)]:
                self._read_columns[file] = read_glue_tsv(local_file(data_dir, self.spec, file), self.spec, True,
                                                         max_malformed_fraction)
        self.save_hyperparameters()
        self.task = self.spec.name
        self.data_dir = data_dir
        self.tokenizer_name = tokenizer_name
        self.max_seq_length = max_seq_length
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or 2 * batch_size
        self.num_workers = num_workers
        self.holdout_fraction = holdout_fraction
        self.seed = seed
        self.max_train_samples = max_train_samples
        self.max_eval_samples = max_eval_samples
        self.max_malformed_fraction = max_malformed_fraction
        self.group_by_length = group_by_length
        self.cache_dir = Path(cache_dir or os.environ.get("KDLORA_CACHE", Path.home() / ".cache" / "kdlora")) / "tokenized"
        self._tokenizer: Optional[PreTrainedTokenizerBase] = None
        self.datasets: dict[str, Dataset] = {}
        self._train_sampler: Optional[ResumableShuffleSampler] = None
        self._resume_order: Optional[dict[str, int]] = None  # from a checkpoint: where training resumes

    # What models need to know right after __init__ (linked by the CLI).
    @property
    def num_labels(self) -> int:
        return self.spec.num_labels

    @property
    def is_regression(self) -> bool:
        return self.spec.is_regression

    def train_label_mean(self) -> Optional[float]:
        """Mean training label of a regression task (after setup('fit')); None for classification."""
        train = self.datasets.get("train")
        if not self.spec.is_regression or train is None or len(train) == 0:
            return None
        labels = train["labels"]
        return float(sum(labels) / len(labels))

    @property
    def eval_suffixes(self) -> list[str]:
        """Metric-name suffix of each validation dataloader ('' for a single one)."""
        if self.holdout_fraction > 0:
            return [""]
        return [s.suffix for s in self.spec.validation]

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.tokenizer_name, "data.tokenizer_name")
        return self._tokenizer

    # ---- raw splits ----
    def _raw_split(self, spec: TaskSpec, split: Split | str, labelled: bool) -> Dataset:
        hub_name, file = (split, f"{split}.tsv") if isinstance(split, str) else (split.hub, split.file)
        if self.data_dir is None:
            dd = load_hub_glue(spec.name)
            if hub_name not in dd:
                raise GLUEDataError(f"hub dataset {HUB_DATASET}/{spec.name} has no split {hub_name!r}")
            ds = dd[hub_name]
            keep = [*spec.text_keys, "label", "idx"]
            return ds.select_columns(keep)
        path = local_file(self.data_dir, spec, file)
        read = self._read_columns.pop(file, None) if spec is self.spec and labelled else None
        columns = read if read is not None else read_glue_tsv(path, spec, labelled, self.max_malformed_fraction)
        ds = Dataset.from_dict(columns)
        ds.info.description = f"{path}|{path.stat().st_size}|{path.stat().st_mtime_ns}"
        return ds

    def _tokenize(self, ds: Dataset, spec: TaskSpec, name: str) -> Dataset:
        tok = self.tokenizer
        keys = spec.text_keys

        def encode(batch: dict[str, list]) -> dict[str, Any]:
            texts = [batch[k] for k in keys]
            return tok(*texts, truncation=True, max_length=self.max_seq_length)

        kwargs: dict[str, Any] = {}
        if self.data_dir is not None:  # in-memory datasets are only cached when given a file name
            key = "|".join([ds.info.description or "", name, self.tokenizer_name, str(len(tok)),
                            type(tok).__name__, str(self.max_seq_length), ",".join(keys), str(len(ds))])
            digest = hashlib.sha1(key.encode()).hexdigest()[:16]
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            kwargs = dict(cache_file_name=str(self.cache_dir / f"{spec.name}-{name}-{digest}.arrow"), new_fingerprint=digest)
        ds = ds.map(encode, batched=True, remove_columns=list(keys), desc=f"tokenizing {spec.name}/{name}", **kwargs)
        ds = ds.rename_column("label", "labels")
        keep = [c for c in (*MODEL_COLUMNS, "labels", "idx") if c in ds.column_names]
        return ds.select_columns(keep)

    # ---- Lightning hooks ----
    def prepare_data(self) -> None:
        # Download once (rank 0) so that setup() on every rank reads the local cache.
        self.tokenizer
        if self.data_dir is None:
            load_hub_glue(self.spec.name)
            for extra in self.spec.extra_predict_tasks:
                load_hub_glue(extra)

    def setup(self, stage: Optional[str] = None) -> None:
        spec = self.spec
        if stage in ("fit", "validate", None):
            if stage in ("fit", None) or self.holdout_fraction > 0:
                if not spec.has_train:
                    raise GLUEDataError(f"task {spec.name!r} has no training data (use it for predict only)")
                train = self._tokenize(self._raw_split(spec, "train", True), spec, "train")
                if self.holdout_fraction > 0:
                    parts = train.train_test_split(test_size=self.holdout_fraction, seed=self.seed)
                    train, self.datasets["holdout"] = parts["train"], parts["test"]
                if self.max_train_samples is not None and self.max_train_samples < len(train):
                    train = train.shuffle(seed=self.seed).select(range(self.max_train_samples))
                self.datasets["train"] = train
            if self.holdout_fraction == 0:
                self._setup_dev()
        if stage == "test":
            self._setup_dev()
        if stage == "predict":
            for s in self.predict_targets:
                self.datasets[f"predict:{s[0].name}:{s[1].hub}"] = self._tokenize(
                    self._raw_split(s[0], s[1], labelled=False), s[0], s[1].hub)

    def _setup_dev(self) -> None:
        for s in self.spec.validation:
            ds = self._tokenize(self._raw_split(self.spec, s, True), self.spec, s.hub)
            if self.max_eval_samples is not None:
                ds = ds.select(range(min(self.max_eval_samples, len(ds))))
            self.datasets[s.hub] = ds

    @property
    def predict_targets(self) -> list[tuple[TaskSpec, Split]]:
        """(task, split) of each predict dataloader: the task's test splits, then e.g. AX for MNLI."""
        targets = [(self.spec, s) for s in self.spec.test]
        for extra in self.spec.extra_predict_tasks:
            extra_spec = get_task(extra)
            if self.data_dir is None or local_file(self.data_dir, extra_spec, extra_spec.test[0].file).is_file():
                targets += [(extra_spec, s) for s in extra_spec.test]
        return targets

    # ---- dataloaders ----
    def _collate(self):
        return DataCollatorWithPadding(self.tokenizer, return_tensors="pt")

    def _loader(self, ds: Dataset, batch_size: int, sampler: Optional[ResumableShuffleSampler] = None,
                loader_class: type[DataLoader] = DataLoader) -> DataLoader:
        # Its own generator: iterating a loader never draws from the global RNG (torch seeds worker
        # processes from it), so validation runs do not shift the dropout stream of training.
        return loader_class(ds, batch_size=batch_size, sampler=sampler, collate_fn=self._collate(),
                            num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                            generator=torch.Generator().manual_seed(self.seed))

    def train_dataloader(self) -> DataLoader:
        """Shuffled by (seed, epoch) and sharded over DDP ranks (`ResumableShuffleSampler`, or with
        `group_by_length` `LengthGroupedSampler`); after a resume it starts where the checkpoint's run
        stopped inside the epoch."""
        trainer = self.trainer
        shard = (trainer.distributed_sampler_kwargs if trainer is not None and _uses_distributed_sampler(trainer) else None)
        seed = int(os.environ.get("PL_GLOBAL_SEED", self.seed))  # the run seed, as Lightning's DistributedSampler
        train = self.datasets["train"]
        if self.group_by_length:
            sampler = LengthGroupedSampler(train, token_lengths(train), self.batch_size, seed=seed, **(shard or {}))
        else:
            sampler = ResumableShuffleSampler(train, seed=seed, **(shard or {}))
        if self._resume_order is not None:
            sampler.resume(**self._resume_order)
        self._train_sampler = sampler
        return self._loader(train, self.batch_size, sampler, ResumableDataLoader)

    def importance_dataloader(self) -> DataLoader:
        """Training examples in a seeded shuffled order, for estimating importance (training data, never
        dev). Its own sampler: drawing from it leaves the training loader and its resume position as they are."""
        sampler = ResumableShuffleSampler(self.datasets["train"], seed=self.seed)
        return self._loader(self.datasets["train"], self.batch_size, sampler)

    def state_dict(self) -> dict[str, Any]:
        """Where training is in the shuffled order (saved in every checkpoint): the seed, the epoch and
        how many examples of this rank's shard of that epoch have been trained on."""
        order = train_order_position(self._train_sampler, self.trainer, self.batch_size)
        if order is None:
            return {}
        return {"train_order": order,
                "train_batching": {"group_by_length": self.group_by_length, "batch_size": self.batch_size}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Called by Lightning when it restores a checkpoint, before it builds the train dataloader.

        Inside an epoch the order is only the checkpoint's with the same batching: resuming there
        with another `group_by_length` (or, grouped, another `batch_size`) is an error."""
        order = state_dict.get("train_order")
        saved = state_dict.get("train_batching", {"group_by_length": False})  # checkpoints before the option
        if order and order.get("start", 0) > 0 and (
                saved["group_by_length"] != self.group_by_length
                or (self.group_by_length and saved.get("batch_size") != self.batch_size)):
            raise ValueError(
                f"the checkpoint stopped inside epoch {order['epoch']} with data.group_by_length: "
                f"{str(saved['group_by_length']).lower()}, data.batch_size: {saved.get('batch_size', '?')}; resume it with "
                f"the same values (now {str(self.group_by_length).lower()}, {self.batch_size}), or change them at an epoch end")
        self._resume_order = dict(order) if order else None
        if self._resume_order is not None and self._train_sampler is not None:
            self._train_sampler.resume(**self._resume_order)

    def _eval_loaders(self, names: list[str]) -> DataLoader | list[DataLoader]:
        loaders = [self._loader(self.datasets[n], self.eval_batch_size) for n in names]
        return loaders[0] if len(loaders) == 1 else loaders

    def val_dataloader(self):
        if self.holdout_fraction > 0:
            return self._eval_loaders(["holdout"])
        return self._eval_loaders([s.hub for s in self.spec.validation])

    def test_dataloader(self):
        return self._eval_loaders([s.hub for s in self.spec.validation])

    def predict_dataloader(self):
        loaders = [self._loader(self.datasets[f"predict:{t.name}:{s.hub}"], self.eval_batch_size)
                   for t, s in self.predict_targets]
        return loaders[0] if len(loaders) == 1 else loaders
