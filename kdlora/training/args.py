"""Hyperparameter groups every kdlora module shares (`OptimizerArgs`, `LoRAArgs`, `ExportArgs`) and the
table of old flat ``model.init_args`` keys with their new dotted names (`RENAMED`, `check_renamed`).

A module takes a group as one argument (``optimizer: OptimizerArgs``); LightningCLI reads the dataclass
fields as nested keys (``--model.init_args.optimizer.learning_rate``). A module saves its groups as plain
dicts (`dataclasses.asdict`), so checkpoints load with ``weights_only=True``, and reads each argument
through `as_args`, which accepts the dataclass or such a dict.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import asdict, dataclass, fields, is_dataclass
from typing import Any, Mapping, Optional, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class OptimizerArgs:
    """What the optimizer does: AdamW with a linear warm-up, then a linear decay to 0."""

    learning_rate: float = 2e-5
    """peak learning rate"""
    weight_decay: float = 0.01
    """AdamW weight decay (never on biases and norm scales)"""
    warmup_ratio: float = 0.06
    """fraction of the training steps spent warming up, in [0, 1)"""
    gradient_clip: Optional[float] = None
    """max gradient norm (None or 0: no clipping; Teacher and student clip as the trainer says then)"""

    def __post_init__(self) -> None:
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")


@dataclass(frozen=True)
class LoRAArgs:
    """LoRA adapters (peft): rank, scaling numerator, dropout and the modules adapted."""

    r: int = 8
    """rank of the adapters"""
    alpha: int = 16
    """scaling numerator: the update is scaled by alpha / r"""
    dropout: float = 0.1
    """dropout on the adapters' input"""
    targets: Optional[list[str]] = None
    """module names to adapt (None: the family's query/value projections)"""


@dataclass(frozen=True)
class ExportArgs:
    """Where the trained model is written as a Hugging Face directory at the end of fit."""

    enabled: bool = True
    """write the export at all"""
    dir: Optional[str] = None
    """the directory (None: ``<log_dir>/export``; without a run directory, as under fast_dev_run, nothing)"""


def as_args(cls: type[T], value: Any) -> T:
    """`value` as a `cls` dataclass: the dataclass itself, a mapping of its fields (hyperparameters read
    back from a checkpoint, a jsonargparse Namespace) or None (the defaults). Unknown fields are an error."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if is_dataclass(value):
        value = {f.name: getattr(value, f.name) for f in fields(value)}
    if hasattr(value, "as_dict") and not isinstance(value, Mapping):  # jsonargparse Namespace
        value = value.as_dict()
    if not isinstance(value, Mapping):
        raise TypeError(f"{cls.__name__} expected (or a mapping of its fields), got {type(value).__name__}: {value!r}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(value) - known)
    if unknown:
        raise ValueError(f"{cls.__name__} has no field {', '.join(map(repr, unknown))}; its fields: {', '.join(sorted(known))}")
    return cls(**value)


def save_plain_hyperparameters(module, **groups: Any) -> None:
    """`module.save_hyperparameters()` (the caller's arguments, or what LightningCLI gave it), with each
    argument group in `groups` (name -> dataclass) saved as a plain dict: checkpoints then hold only
    builtins and load with ``weights_only=True``, and `as_args` reads the dicts back."""
    module.save_hyperparameters(ignore=list(groups), frame=inspect.currentframe().f_back)
    module.hparams.update({name: asdict(value) for name, value in groups.items()})
    module._hparams_initial = copy.deepcopy(module._hparams)  # what loggers record (hparams.yaml)


# Old flat key of ``model.init_args`` -> its new dotted key. A key naming a module (``KDLoRAStudent:alpha``)
# applies to that module only, where one old name meant different things in different modules.
RENAMED: dict[str, str] = {
    "learning_rate": "optimizer.learning_rate",
    "weight_decay": "optimizer.weight_decay",
    "warmup_ratio": "optimizer.warmup_ratio",
    "lora_r": "lora.r",
    "lora_alpha": "lora.alpha",
    "lora_dropout": "lora.dropout",
    "lora_targets": "lora.targets",
    "export": "export.enabled",
    "export_dir": "export.dir",
}
# What a renamed key means, where the new name alone does not say it (shown in the error).
RENAMED_MEANING: dict[str, str] = {}


def register_renamed(table: Mapping[str, str], module: Optional[str] = None,
                     meaning: Optional[Mapping[str, str]] = None) -> None:
    """Add old -> new key entries to `RENAMED` (for `module` only, if given: a class name)."""
    for old, new in table.items():
        key = f"{module}:{old}" if module else old
        RENAMED[key] = new
        if meaning and old in meaning:
            RENAMED_MEANING[key] = meaning[old]


def _is_group(value: Any) -> bool:
    return value is None or isinstance(value, Mapping) or is_dataclass(value) or hasattr(value, "as_dict")


def renamed_key(init_args: Mapping[str, Any], module: Optional[str] = None) -> Optional[tuple[str, str, str]]:
    """(old, new, table key) of the first old key in `init_args`, or None.

    An old key that is also the name of its new group (``export: false`` -> ``export.enabled``) counts
    only with a plain value: ``export: {dir: ...}`` is the new form."""
    short = module.rsplit(".", 1)[-1] if module else None
    for old, value in init_args.items():
        key = f"{short}:{old}" if short and f"{short}:{old}" in RENAMED else old
        new = RENAMED.get(key)
        if new is None:
            continue
        if new.split(".", 1)[0] == old and _is_group(value):
            continue
        return old, new, key
    return None


def check_renamed(init_args: Mapping[str, Any], where: str = "model.init_args", module: Optional[str] = None) -> None:
    """Raise ValueError "``<where>.lora_r`` is now ``<where>.lora.r``" for the first old key in `init_args`
    (`module`: the class name or path of the module they configure, for its own entries)."""
    found = renamed_key(init_args, module)
    if found is None:
        return
    old, new, key = found
    meaning = RENAMED_MEANING.get(key)
    raise ValueError(f"{where}.{old} is now {where}.{new}" + (f" ({meaning})" if meaning else ""))


def nested_hparams(hparams: Mapping[str, Any], module: Optional[str] = None) -> dict[str, Any]:
    """`hparams` with every old flat key (`RENAMED`) moved to its new place (``lora_r: 4`` -> ``lora: {r: 4}``):
    the hyperparameters of a checkpoint written before the groups, read as the module now takes them."""
    out: dict[str, Any] = {}
    moved: dict[str, dict[str, Any]] = {}
    for old, value in hparams.items():
        found = renamed_key({old: value}, module)
        if found is None:
            out[old] = value
            continue
        group, _, name = found[1].partition(".")
        moved.setdefault(group, {})[name] = value
    for group, values in moved.items():
        out[group] = {**(out.get(group) or {}), **values}
    return out
