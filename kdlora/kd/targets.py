"""The teacher's targets for the student: its logits run online on every batch, or computed once over the
training set and cached on disk, keyed by example ``idx`` (`TeacherTargets`)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from kdlora.kd.args import TeacherTargetsArgs

CACHE_FORMAT = 1


def files_signature(path: str | Path) -> list[list]:
    """Name, size and mtime of a checkpoint file or of a model directory's files (changes when weights do)."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def dataset_digest(dataset) -> str:
    """SHA-1 of a tokenized dataset's `idx` and `input_ids` (respects select/shuffle index mappings)."""
    import pyarrow.compute as pc

    h = hashlib.sha1()
    for table in dataset.with_format("arrow").iter(batch_size=8192):
        for column in ("idx", "input_ids"):
            arr = table.column(column).combine_chunks()
            if column == "input_ids":
                h.update(pc.list_value_length(arr).to_numpy(zero_copy_only=False).tobytes())
                arr = arr.flatten()
            h.update(arr.to_numpy(zero_copy_only=False).astype("int64").tobytes())
    return h.hexdigest()


def _cache_valid(path: Path, fingerprint: dict) -> bool:
    if not path.is_file():
        return False
    try:
        return torch.load(path, map_location="cpu", weights_only=True)["fingerprint"] == fingerprint
    except Exception:  # a truncated or foreign file is rebuilt
        return False


class TeacherTargets:
    """The teacher's logits for a batch (`logits`): by running the teacher (``online``) or from a cache of
    its logits over the training set (``cached``), looked up by the batch's example ``idx``.

    The cache file's name and contents carry a fingerprint (teacher files, task, data, max length,
    tokenizer), so a changed teacher or data set builds a new cache and a rerun reuses the old one.

    Args:
        teacher: the frozen teacher (its device is where the cache is computed).
        forward: the teacher's logits for a batch (on the batch's device).
        teacher_path: the teacher's export directory or checkpoint (fingerprinted).
        task: the GLUE task name.
        args: `TeacherTargetsArgs` (mode, cache_dir).
    """

    def __init__(self, teacher: nn.Module, forward: Callable[[dict[str, torch.Tensor]], torch.Tensor], teacher_path: str,
                 task: str, args: TeacherTargetsArgs) -> None:
        if args.mode not in ("online", "cached"):
            raise ValueError(f"teacher_targets.mode must be 'online' or 'cached', got {args.mode!r}")
        self.teacher, self.forward, self.teacher_path, self.task = teacher, forward, teacher_path, task
        self.mode, self.cache_dir = args.mode, args.cache_dir
        self._logits: Optional[torch.Tensor] = None  # [max_idx + 1, num_labels] on CPU
        self._present: Optional[torch.Tensor] = None

    @property
    def cached(self) -> bool:
        return self.mode == "cached"

    def logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The teacher's logits for `batch`: from the cache by `batch["idx"]`, or by running it."""
        if not self.cached:
            return self.forward(batch)
        if self._logits is None:
            raise RuntimeError("teacher targets are not cached yet: call teacher_targets.cache(dataset) "
                               "(done automatically at fit start)")
        idx = batch["idx"].cpu()
        if int(idx.max()) >= len(self._logits) or not bool(self._present[idx].all()):
            missing = [int(i) for i in idx if i >= len(self._present) or not self._present[i]]
            raise KeyError(f"examples {missing[:5]} are not in the teacher target cache (built on another training set?)")
        return self._logits[idx].to(batch["input_ids"].device)

    def fingerprint(self, dataset, max_seq_length=None, tokenizer_name=None) -> dict:
        return {
            "format": CACHE_FORMAT,
            "teacher": str(Path(self.teacher_path).resolve()),
            "teacher_files": files_signature(self.teacher_path),
            "task": self.task,
            "max_seq_length": max_seq_length,
            "tokenizer": tokenizer_name,
            "num_examples": len(dataset),
            "data": dataset_digest(dataset),
        }

    @torch.no_grad()
    def compute(self, dataset, collate_fn, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
        """(idx, logits) of the teacher over `dataset` in order, on the teacher's device."""
        from torch.utils.data import DataLoader

        all_idx, all_logits = [], []
        device = next(self.teacher.parameters()).device
        for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_fn):
            batch = {k: v.to(device) for k, v in batch.items()}
            all_idx.append(batch["idx"].cpu())
            all_logits.append(self.forward(batch).float().cpu())
        return torch.cat(all_idx), torch.cat(all_logits)

    def cache(self, dataset, collate_fn, cache_dir: str | Path, batch_size: int = 64,
              max_seq_length=None, tokenizer_name=None, strategy=None) -> Path:
        """Load the cached teacher logits for `dataset`, computing them first if absent or stale.

        With a `strategy`, rank 0 computes and the other ranks wait (a barrier) and read.
        """
        fingerprint = self.fingerprint(dataset, max_seq_length, tokenizer_name)
        key = hashlib.sha1(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]
        path = Path(cache_dir) / f"teacher-{self.task}-{key}.pt"
        if strategy is None or strategy.is_global_zero:
            if _cache_valid(path, fingerprint):
                print(f"[kdlora] reusing cached teacher targets {path}")
            else:
                idx, logits = self.compute(dataset, collate_fn, batch_size)
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
                torch.save({"fingerprint": fingerprint, "idx": idx, "logits": logits}, tmp)
                os.replace(tmp, path)
                print(f"[kdlora] cached teacher targets for {len(idx)} examples at {path}")
        if strategy is not None:
            strategy.barrier("kdlora-teacher-cache")
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved["fingerprint"] != fingerprint:
            raise RuntimeError(f"teacher target cache {path} does not match this run (written concurrently?)")
        self._load(saved["idx"].long(), saved["logits"])
        return path

    def _load(self, idx: torch.Tensor, logits: torch.Tensor) -> None:
        size = int(idx.max()) + 1 if len(idx) else 0
        self._logits = torch.zeros(size, logits.shape[-1], dtype=logits.dtype)
        self._present = torch.zeros(size, dtype=torch.bool)
        self._logits[idx] = logits
        self._present[idx] = True

    def default_cache_dir(self, trainer: Any) -> Path:
        """`cache_dir`, else ``teacher_targets`` beside the run directories; without a run directory
        (fast_dev_run), beside the data module's tokenized cache, never in the working directory."""
        log_dir = trainer.log_dir  # on every rank: a collective under DDP
        if self.cache_dir:
            return Path(self.cache_dir)
        if log_dir is not None and not trainer.fast_dev_run:
            return Path(log_dir).parent / "teacher_targets"
        dm = getattr(trainer, "datamodule", None)
        return Path(getattr(dm, "cache_dir", Path.home() / ".cache" / "kdlora" / "tokenized")).parent / "teacher_targets"

    def cache_for_fit(self, trainer: Any) -> Optional[Path]:
        """With cached targets: cache them over the training set of `trainer`'s data module (at fit start)."""
        if not self.cached:
            return None
        dm = getattr(trainer, "datamodule", None)
        dataset = getattr(dm, "datasets", {}).get("train") if dm is not None else None
        if dataset is None or "idx" not in dataset.column_names:
            raise ValueError("teacher_targets.mode: cached needs a data module with a tokenized datasets['train'] "
                             "carrying an idx column (kdlora.data.glue.GLUEDataModule)")
        from transformers import DataCollatorWithPadding

        cache_dir = self.default_cache_dir(trainer)
        return self.cache(dataset, DataCollatorWithPadding(dm.tokenizer, return_tensors="pt"), cache_dir,
                          batch_size=getattr(dm, "eval_batch_size", 64), max_seq_length=getattr(dm, "max_seq_length", None),
                          tokenizer_name=getattr(dm, "tokenizer_name", None), strategy=trainer.strategy)
