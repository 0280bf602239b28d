"""Files written whole or not at all: atomic writes, the run's results file, and model exports
(into a fresh folder, never over one a user already has). Imports nothing else from kdlora."""

from __future__ import annotations

import errno
import json
import os
import secrets
import shutil
import stat
from pathlib import Path
from typing import Any, Optional, Callable

import torch
from peft import PeftModel


def write_atomic(path: Path, text: str | bytes) -> None:
    """Write a file (text, or bytes as given) via a temporary sibling so a crash never leaves half a file;
    a full disk is a `kdlora.io.OutOfSpaceError` naming `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(text) if isinstance(text, bytes) else tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as e:
        if out_of_space(e) and not isinstance(e, OutOfSpaceError):
            raise OutOfSpaceError(path) from e
        raise
    finally:
        tmp.unlink(missing_ok=True)


def update_results(path: str | Path, updates: dict[str, Any]) -> dict[str, Any]:
    """Merge `updates` into the JSON file at `path` (nested dicts merged key by key), atomically."""
    path = Path(path)
    results = json.loads(path.read_text()) if path.is_file() else {}

    def merge(into: dict, new: dict) -> None:
        for key, value in new.items():
            if isinstance(value, dict) and isinstance(into.get(key), dict):
                merge(into[key], value)
            else:
                into[key] = value

    merge(results, updates)
    write_atomic(path, json.dumps(results, indent=2, sort_keys=True) + "\n")
    return results


EXPORT_MARKER = "kdlora_export.json"


def _is_kdlora_export(path: Path) -> bool:
    """Whether directory `path` carries our marker file (written into every export by `write_export`)."""
    marker = path / EXPORT_MARKER
    try:
        return marker.is_file() and json.loads(marker.read_text()).get("exported_by") == "kdlora"
    except (OSError, ValueError, AttributeError):
        return False


def check_export_dir(path: str | Path) -> Path:
    """`path` if an export may be written there, else a ValueError naming it.

    An export replaces its directory, so that directory must not exist, be empty, or be a previous
    kdlora export (it carries ``kdlora_export.json``): nothing a user keeps there is ever deleted.
    """
    path = Path(path)
    if path.is_symlink():
        raise ValueError(f"export directory {path} is a symbolic link: refusing to replace it; choose another directory")
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"export directory {path} is an existing file: refusing to replace it; choose another directory")
        if any(path.iterdir()) and not _is_kdlora_export(path):
            raise ValueError(f"export directory {path} already exists and is not a kdlora export (it has no {EXPORT_MARKER}): "
                             "refusing to replace it; choose another directory or remove it yourself")
    for parent in path.absolute().parents:  # mkdir -p must be able to create it
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"cannot create export directory {path}: {parent} is a file")
            break
    return path


class OutOfSpaceError(OSError):
    """A write of `path` failed because its disk (or the user's quota) is full, and the writer removed what
    it had written: the message names `path` (`what` it is, e.g. "checkpoint ")."""

    def __init__(self, path: str | Path, what: str = "") -> None:
        super().__init__(f"no space left on device writing {what}{path} (nothing of it was written there; "
                         "free some space or choose another place)")
        self.errno = errno.ENOSPC


def out_of_space(exc: BaseException) -> bool:
    """Whether `exc`, or an error it was raised from, reports a full disk or quota: an OSError with that errno,
    or a library's own error quoting the system's text for it (safetensors' writer raises a SafetensorError)."""
    texts = (os.strerror(errno.ENOSPC), os.strerror(errno.EDQUOT))
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if (isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)) or any(t in str(exc) for t in texts):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def write_export(out_dir: str | Path, write: Callable[[Path], None], info: dict[str, Any]) -> Path:
    """Write an export directory atomically, without ever replacing what is not a kdlora export.

    `write(tmp)` fills a new sibling directory; `info` (what was exported) goes into its
    ``kdlora_export.json``; then the directory replaces `out_dir`, which `check_export_dir` must
    accept (checked again here, at write time). Directories and files get normal permissions (as
    `mkdir` and `open` give under the umask). A failure leaves `out_dir` as it was; a full disk is an
    `OutOfSpaceError` naming `out_dir`.
    """
    out_dir = check_export_dir(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            tmp.mkdir()  # unlike tempfile.mkdtemp (0700), respects the umask
            break
        except FileExistsError:
            continue
    try:
        write(tmp)
        (tmp / EXPORT_MARKER).write_text(json.dumps({"exported_by": "kdlora", **info}, indent=2, default=str) + "\n")
        # Some writers (safetensors via transformers) create owner-only files: give everything the
        # mode a plain mkdir/open would, which `tmp`'s own mode (0777 minus the umask) tells.
        dir_mode = stat.S_IMODE(tmp.stat().st_mode)
        for root, dirs, files in os.walk(tmp):
            for name in dirs + files:
                path = os.path.join(root, name)
                if not os.path.islink(path):  # a link's target is not ours to change
                    os.chmod(path, dir_mode if name in dirs else dir_mode & 0o666)
        check_export_dir(out_dir)
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, Exception) and out_of_space(e):
            raise OutOfSpaceError(out_dir) from e
        raise
    return out_dir


def export_hf(model: torch.nn.Module, tokenizer, out_dir: str | Path, save_adapter: bool = True,
              info: Optional[dict[str, Any]] = None) -> Path:
    """Write a model as a plain Hugging Face directory loadable by `from_pretrained`.

    A peft model is merged (a copy, so `model` keeps its adapters) and, with `save_adapter`, its
    adapter is saved too under ``adapter/``. Written by `write_export`: atomically, marked as ours
    (with `info`), and never over a directory that is not a previous kdlora export.
    """
    import copy

    def write(tmp: Path) -> None:
        if isinstance(model, PeftModel):
            if save_adapter:
                model.save_pretrained(tmp / "adapter")
            merged = copy.deepcopy(model).merge_and_unload()
        else:
            merged = model
        merged.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    return write_export(out_dir, write, {"lora_merged": isinstance(model, PeftModel), **(info or {})})
