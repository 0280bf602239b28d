"""Reading a Lightning checkpoint that a user names: one check of what the file is before anything uses it;
and writing checkpoints so that a failed write leaves nothing under the checkpoint's name.

Used by the CLI (``--ckpt_path``), by `KDLoRAStudent` (a Teacher ``.ckpt`` as ``teacher_path``) and by
``python -m kdlora.mlfs.export`` (a SuperTransformer ``.ckpt``), so a wrong file is one message
everywhere: not a file, not a Lightning checkpoint, another module's checkpoint, another task's.
"""

from __future__ import annotations

import inspect
import io
import sys
import zipfile
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.fabric.plugins.io import TorchCheckpointIO

from kdlora.data.tasks import get_task
from kdlora.training.args import nested_hparams


class CheckpointError(ValueError):
    """A file given as a checkpoint is not the checkpoint the run needs."""


def read_checkpoint(path: str | Path, expected_class: Optional[type] = None, task: Optional[str] = None) -> dict[str, Any]:
    """The contents of the Lightning checkpoint `path` (loaded on the CPU, ``weights_only``), checked.

    Raises FileNotFoundError when `path` is not a file; CheckpointError when it cannot be read, is not
    a Lightning checkpoint, was written by a module other than `expected_class` (or a subclass), or
    was trained on a GLUE task other than `task`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} is not a file" + (" (it is a directory)" if path.is_dir() else ""))
    if not zipfile.is_zipfile(path):  # torch.save writes zip archives; a truncated one has no central directory
        raise CheckpointError(f"{path} is not a Lightning checkpoint (unreadable: not the zip archive torch.save "
                              "writes; a truncated copy or another kind of file)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)  # whole: a corrupted record fails here
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, OSError, EOFError, KeyError, ... here
        reason = (str(e).strip().splitlines() or [""])[0] or repr(e)
        raise CheckpointError(f"{path} is not a Lightning checkpoint (unreadable: {type(e).__name__}: {reason})") from None
    if not isinstance(ckpt, dict) or not {"state_dict", "pytorch-lightning_version"} <= ckpt.keys():
        kind = "a plain state_dict" if isinstance(ckpt, dict) and ckpt and all(
            isinstance(v, torch.Tensor) for v in ckpt.values()) else f"a {type(ckpt).__name__}"
        raise CheckpointError(f"{path} is not a Lightning checkpoint: it holds {kind}, "
                              "without Lightning's 'state_dict' and 'pytorch-lightning_version'")
    hparams = ckpt.get("hyper_parameters") or {}
    if expected_class is not None:
        _check_class(path, hparams, expected_class)
    if task is not None and hparams.get("task"):
        trained, wanted = get_task(str(hparams["task"])).name, get_task(task).name
        if trained != wanted:
            raise CheckpointError(f"checkpoint {path} was trained on task {trained!r}, not {wanted!r}")
    return ckpt


def _check_class(path: Path, hparams: dict[str, Any], expected: type) -> None:
    class_path = hparams.get("_class_path")
    if class_path:  # recorded by LightningCLI; resolved only among modules already imported (no code runs)
        module, _, name = str(class_path).rpartition(".")
        cls = getattr(sys.modules.get(module), name, None) or _earlier_layout_class(str(class_path), expected)
        if not (isinstance(cls, type) and issubclass(cls, expected)):
            raise CheckpointError(f"{path} is a checkpoint of {name} ({class_path}), expected {expected.__name__}")
    # Saved outside the CLI (no class recorded) or by another version: its hyperparameters must be `expected`'s.
    accepted = inspect.signature(expected.__init__).parameters
    # Keys of before the argument groups (lora_r, ...) count as the groups they are now (lora).
    foreign = sorted(k for k in nested_hparams(hparams, expected.__name__) if not k.startswith("_") and k not in accepted)
    if foreign:
        raise CheckpointError(f"{path} is not a checkpoint of {expected.__name__}: it has hyperparameters "
                              f"{expected.__name__} does not take ({', '.join(foreign)})")


def _earlier_layout_class(class_path: str, expected: type) -> Optional[type]:
    """The class a checkpoint written under an earlier module layout of this package records
    (``kdlora.modules.Teacher``), found by its name among `expected` and its subclasses; None otherwise."""
    module, _, name = class_path.rpartition(".")
    if not module.startswith("kdlora.") or module in sys.modules:
        return None
    return next((c for c in _with_subclasses(expected) if c.__name__ == name), None)


def current_class_path(hparams: dict[str, Any], expected: type) -> dict[str, str]:
    """Keyword arguments for ``expected.load_from_checkpoint``: where the class is now when the checkpoint
    records it under an earlier module layout (Lightning instantiates the recorded class path), else none."""
    cls = _earlier_layout_class(str(hparams.get("_class_path") or ""), expected)
    return {"_class_path": f"{cls.__module__}.{cls.__qualname__}"} if cls is not None else {}


def _with_subclasses(cls: type) -> list[type]:
    found = [cls]
    for sub in cls.__subclasses__():
        found += _with_subclasses(sub)
    return found


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, with a local checkpoint written through a temporary sibling
    (`kdlora.io.write_atomic`): a full disk or a kill never leaves part of a checkpoint under its
    name. (Lightning's own transaction stages the file in the system's temporary directory; moving it onto
    another filesystem copies it into place, and a full disk there leaves the truncated copy.) A full disk
    is an `OutOfSpaceError` naming the checkpoint. Remote paths (``s3://``...) go to Lightning's writer."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        from kdlora.io import OutOfSpaceError, write_atomic

        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        try:
            write_atomic(Path(path), buffer.getvalue())
        except OutOfSpaceError as e:
            raise OutOfSpaceError(path, "checkpoint ") from e.__cause__
