"""Training order for the data modules: a resumable shuffle (the same order after a restart, from
the batch the run stopped at), length grouping, and the loader and position bookkeeping that go with them."""

from __future__ import annotations

import itertools
import math
from typing import Any, Optional

import lightning as L
import torch
from datasets import Dataset
from torch.utils.data import DataLoader, DistributedSampler


# ----------------------------------------------------------------------------------------------
# Training order
# ----------------------------------------------------------------------------------------------


class ResumableShuffleSampler(DistributedSampler):
    """The training order: a permutation drawn from (seed, epoch) alone, never from the global RNG,
    sharded over `num_replicas` ranks exactly as `DistributedSampler` shards it (it is one, so Lightning
    keeps it under DDP instead of injecting its own); `resume(epoch, start)` makes the next pass of
    `epoch` skip the first `start` examples of this rank's shard, which a resumed run has trained on.

    `len()` stays the full shard: Lightning counts the batches of a resumed epoch itself.
    """

    def __init__(self, dataset, num_replicas: int = 1, rank: int = 0, seed: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False)
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.start = 0  # a resume position holds for its own epoch only
        super().set_epoch(epoch)

    def resume(self, epoch: int, start: int, seed: Optional[int] = None) -> None:
        """Continue the order of a checkpointed run: its seed, its epoch, `start` examples in."""
        if seed is not None:
            self.seed = int(seed)
        self.epoch, self.start = int(epoch), int(start)

    def epoch_order(self):
        """This rank's order for the current (seed, epoch), from its beginning: `DistributedSampler`'s."""
        return DistributedSampler.__iter__(self)

    def __iter__(self):
        # A generator, so the order is drawn at the first batch: after Lightning's set_epoch.
        yield from itertools.islice(self.epoch_order(), self.start, None)


MEGA_BATCH_FACTOR = 50


class LengthGroupedSampler(ResumableShuffleSampler):
    """`ResumableShuffleSampler` with batches of similar length (less padding, faster steps), as
    Hugging Face's `LengthGroupedSampler`: the examples are permuted by (seed, epoch), cut into
    mega-batches of `mega_batch_factor` global batches (`batch_size × num_replicas`), each sorted by
    length, longest first, and split into global batches; the order of the full global batches is
    shuffled by the same generator, the one holding the longest example goes first (an out-of-memory
    shows at the first step) and a partial last batch stays last. Each rank takes its contiguous
    `batch_size` slice of every global batch, so under DDP the ranks' shares are disjoint (up to
    `DistributedSampler`'s padding of the order to a multiple of `num_replicas`), equal-sized and of
    similar length at every step, and the same on every rank.

    The loader must batch it with the same `batch_size`: then its batch k is examples
    ``[k·batch_size, (k+1)·batch_size)`` of this rank's order and `resume(epoch, start)` (start a
    multiple of batch_size, as `GLUEDataModule.state_dict` writes it) continues at exactly the next batch.

    `lengths[i]` is the token count of ``dataset[i]`` (position, not `idx`; `token_lengths`).
    """

    def __init__(self, dataset, lengths, batch_size: int, num_replicas: int = 1, rank: int = 0, seed: int = 0,
                 mega_batch_factor: int = MEGA_BATCH_FACTOR) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, seed=seed)
        if len(lengths) != len(dataset):
            raise ValueError(f"lengths has {len(lengths)} entries but the dataset {len(dataset)} examples")
        if batch_size < 1 or mega_batch_factor < 1:
            raise ValueError(f"batch_size and mega_batch_factor must be at least 1, got {batch_size} and {mega_batch_factor}")
        self.lengths = [int(n) for n in lengths]
        self.batch_size, self.mega_batch_factor = int(batch_size), int(mega_batch_factor)

    def global_batches(self) -> list[list[int]]:
        """Every rank's batches of the current (seed, epoch), each `batch_size × num_replicas` long but the last."""
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.dataset), generator=g).tolist()
        if not order:
            return []
        padding = self.total_size - len(order)  # as DistributedSampler: repeat the order's start
        order += (order * math.ceil(padding / len(order)))[:padding] if padding else []
        size = self.batch_size * self.num_replicas
        mega = size * self.mega_batch_factor
        batches = []
        for m in range(0, len(order), mega):
            chunk = sorted(order[m:m + mega], key=lambda i: -self.lengths[i])  # stable: ties keep the permutation
            batches += [chunk[b:b + size] for b in range(0, len(chunk), size)]
        full, last = (batches, []) if len(batches[-1]) == size else (batches[:-1], batches[-1:])
        full = [full[i] for i in torch.randperm(len(full), generator=g).tolist()]
        if full:
            longest = max(range(len(full)), key=lambda b: self.lengths[full[b][0]])
            full.insert(0, full.pop(longest))
        return full + last

    def epoch_order(self):
        rank, replicas = self.rank, self.num_replicas
        return iter([i for b in self.global_batches()
                     for i in b[rank * len(b) // replicas:(rank + 1) * len(b) // replicas]])


def token_lengths(dataset: Dataset) -> list[int]:
    """Tokens of each example of a tokenized dataset, by position (through any select/shuffle mapping)."""
    import pyarrow.compute as pc

    lengths: list[int] = []
    for table in dataset.with_format("arrow").iter(batch_size=65536):
        lengths += pc.list_value_length(table.column("input_ids")).to_pylist()
    return lengths


class ResumableDataLoader(DataLoader):
    """The train loader. Its position is saved and restored by `GLUEDataModule.state_dict` /
    `load_state_dict`, which Lightning calls before the loader exists; Lightning's own loader-state
    hooks below are too late here (they are skipped once `configure_optimizers` has read
    `trainer.estimated_stepping_batches`, Lightning issue #20550) and only tell Lightning that a
    mid-epoch resume is exact."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass


def _uses_distributed_sampler(trainer: L.Trainer) -> bool:
    """Whether Lightning shards loaders over ranks (`Trainer(use_distributed_sampler=...)`, default on)."""
    return getattr(getattr(trainer, "_accelerator_connector", None), "use_distributed_sampler", True)


# ----------------------------------------------------------------------------------------------
# DataModule
# ----------------------------------------------------------------------------------------------


def train_order_position(sampler, trainer, batch_size: int) -> Optional[dict[str, int]]:
    """Where training is in a resumable sampler's order, for a data module's `state_dict`: its seed, the
    epoch and how many examples of this rank's shard of that epoch have been trained on (None before fit)."""
    if sampler is None or trainer is None:
        return None
    # Batches trained this epoch: at on_train_batch_end (step checkpoints) the current one is counted.
    batches = trainer.fit_loop.epoch_loop.batch_progress.current.processed
    epoch = sampler.epoch
    if batches >= trainer.num_training_batches:  # the epoch is done: the next one starts at 0
        epoch, batches = epoch + 1, 0
    return {"seed": sampler.seed, "epoch": epoch, "start": batches * batch_size}
