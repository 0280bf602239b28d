"""The command line: LightningCLI with GLUE-aware links and defaults, and one for causal LMs.

    python train.py fit --config configs/demo/teacher.yaml
    python train.py test --config configs/demo/teacher.yaml --ckpt_path runs/.../best.ckpt
    python train.py fit --config configs/decoder/smollm2-mlfs.yaml

Which of the two a command gets is decided by its model (`uses_causal_lm_module`): a causal-LM module
(`CausalLMSuperTransformer`) runs under `DecoderCLI`, on a `CausalLMDataModule`, without the GLUE task
and its links, and selects its checkpoint on the held-out ``val/palette_loss`` (min); every other module
under `KDLoRACLI`, on a `GLUEDataModule`.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import sys
import sysconfig
import warnings
from argparse import ArgumentError
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any, Optional

from lightning.fabric.plugins.io import CheckpointIO
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from jsonargparse import Namespace, lazy_instance

from kdlora.data.glue import GLUEDataModule
from kdlora.kd import KDLoRAStudent, Teacher
from kdlora.mlfs import CausalLMSuperTransformer, SuperTransformer
from kdlora.training.callbacks import GLUESubmissionWriter, LastCheckpoint
from kdlora.training.checkpoint import AtomicCheckpointIO, CheckpointError, read_checkpoint
from kdlora.training.heads import new_weight_modules
from kdlora.training.loading import max_input_length
from kdlora.training.module import GLUEModule

# The modules a config may name by class name alone (``model: Teacher``).
METHOD_MODULES = {cls.__name__: cls for cls in (Teacher, KDLoRAStudent, SuperTransformer, CausalLMSuperTransformer)}

_CALLBACKS = ("GLUESubmissionWriter", "GLUEResults", "LastCheckpoint", "PeakMemory", "InferenceLatency", "ParameterCount")
# Class paths of the package's earlier layout and where each class is now: a command or config naming an
# old one fails with one line naming the new one (`check_moved_class_paths`).
MOVED = {
    **{f"kdlora.modules{sub}.{name}": new for name, subs, new in [
        ("Teacher", ("", ".teacher"), "kdlora.kd.Teacher"),
        ("KDLoRAStudent", ("", ".student"), "kdlora.kd.KDLoRAStudent"),
        ("SuperTransformer", ("", ".supernet"), "kdlora.mlfs.SuperTransformer"),
        ("CausalLMSuperTransformer", ("", ".lm_supernet"), "kdlora.mlfs.CausalLMSuperTransformer"),
        ("GLUEModule", ("", ".base"), "kdlora.training.module.GLUEModule"),
        ("KDLoraModule", ("", ".base"), "kdlora.training.module.FineTuningModule"),
    ] for sub in subs},
    **{f"kdlora.callbacks.{name}": f"kdlora.training.callbacks.{name}" for name in _CALLBACKS},
    "kdlora.lm_data.CausalLMDataModule": "kdlora.data.CausalLMDataModule",
    "kdlora.checkpoint.AtomicCheckpointIO": "kdlora.training.checkpoint.AtomicCheckpointIO",
}


def _config_files(args: list[str]) -> list[str]:
    """The ``--config`` files a command names, in order."""
    files = []
    for i, arg in enumerate(args):
        key, eq, value = arg.partition("=")
        if key == "--config":
            files.append(value if eq else (args[i + 1] if i + 1 < len(args) else ""))
    return files


def check_moved_class_paths(args: list[str]) -> None:
    """Raise ValueError naming the new place of the first old class path (`MOVED`) in the command's
    arguments or in a ``--config`` file it names."""
    texts = list(args)
    for value in _config_files(args):
        try:
            texts.append(Path(value).read_text())
        except (OSError, ValueError):  # the parser reports a missing or unreadable config itself
            pass
    for text in texts:
        for old in re.findall(r"kdlora(?:\.\w+)+", text):
            if old in MOVED:
                raise ValueError(f"{old} moved: use {MOVED[old]}")


def check_renamed_model_keys(args: list[str]) -> None:
    """Raise ValueError "model.init_args.lora_r is now model.init_args.lora.r" for the first renamed
    argument of the model (`kdlora.training.args.RENAMED`) in a ``--config`` file the command names or on
    its command line (``--model.init_args.X`` or ``--model.X``)."""
    from kdlora.training.args import check_renamed

    module = _model_choice(args)
    module = module if isinstance(module, str) else None
    taken = _init_parameters(module)
    for path in _config_files(args):
        model = _config_section(path, "model")
        if isinstance(model, dict):
            init_args = model.get("init_args", {k: v for k, v in model.items() if k != "class_path"})
            if isinstance(init_args, dict):
                check_renamed({k: v for k, v in init_args.items() if k not in taken}, "model.init_args", module)
    given = {}
    for i, arg in enumerate(args):
        key, eq, value = arg.partition("=")
        match = re.fullmatch(r"--model\.(?:init_args\.)?(\w+)((?:\.\w+)*)", key)
        if match and match.group(1) not in ("class_path", "init_args", *taken):
            value = value if eq else (args[i + 1] if i + 1 < len(args) else None)
            given.setdefault(match.group(1), {match.group(2)[1:]: value} if match.group(2) else value)
    check_renamed(given, "model.init_args", module)


def _init_parameters(name: Any) -> set[str]:
    """The arguments the model class `name` (path or `METHOD_MODULES` name) takes plainly: a name it still
    takes as a plain argument is not an old one (empty where the class is not known)."""
    try:
        cls = _import(name) if "." in name else METHOD_MODULES.get(name)
    except (ImportError, AttributeError, ValueError, TypeError):
        return set()
    if not isinstance(cls, type):
        return set()
    from kdlora.training.args import RENAMED

    params = inspect.signature(cls.__init__).parameters
    # A parameter that is now a group (``export``) keeps its old plain form in RENAMED: that stays checked.
    return {k for k in params if not any(new.split(".", 1)[0] == k for old, new in RENAMED.items() if old.rpartition(":")[2] == k)}


def _changed_arguments(key: str, value: Any, default: Any) -> dict[str, Any]:
    """{key: value} if `value` is not the `default`; for an argument group (a dataclass default), each field
    set to other than its default, as {"key.field": value}, so the others keep the checkpoint's values."""
    if not is_dataclass(default):
        return {} if value == default else {key: value}
    given = value.as_dict() if hasattr(value, "as_dict") else asdict(value) if is_dataclass(value) else dict(value or {})
    return {f"{key}.{f}": v for f, v in given.items() if v != getattr(default, f, None)}


class KDLoRACLI(LightningCLI):
    def init_parser(self, **kwargs):
        # Parser errors are raised, not printed with the full usage, so `cli_main` makes them one line.
        kwargs.setdefault("exit_on_error", False)
        return super().init_parser(**kwargs)

    def parse_arguments(self, parser, args) -> None:
        # Paths follow the task chosen on the command line: `{task}` in any string of the config
        # becomes the canonical task name right after parsing, before a checkpoint is read or
        # anything is built, so the saved config.yaml shows the resolved paths.
        super().parse_arguments(parser, args)
        from kdlora.data.tasks import get_task

        sub = self.config.get("subcommand")
        config = self.config[sub] if sub else self.config
        task = getattr(config.get("data"), "task", None)
        if task is not None:
            fill_task(config, get_task(task).name)
        add_measuring_callbacks(config)

    def add_arguments_to_parser(self, parser) -> None:
        # The task is chosen once, on the data; the model learns its labels and metrics from it.
        parser.link_arguments("data.task", "model.init_args.task")
        # Teacher and student share a vocabulary, so the model's own tokenizer is the data's.
        parser.link_arguments("model.init_args.model_name_or_path", "data.tokenizer_name")
        parser.add_argument("--measure", type=Optional[MeasureArgs], default=None,
                            help="add the callbacks kdlora.experiments.report reads (null: none)")
        add_checkpoint_arguments(parser, "val/score", "max")
        parser.add_lightning_class_args(GLUESubmissionWriter, "predictions")

    def _parse_ckpt_path(self) -> None:
        # Lightning replaces the model's arguments with the checkpoint's hyperparameters. Arguments a
        # module lists in EVALUATION_ARGS (e.g. the supernet's palette) only decide what is evaluated
        # or written, so where the user set them (command line or config) their value wins.
        sub = self.config.get("subcommand")
        if not sub:
            return
        model = self.config[sub].get("model")
        cls = _import(model.class_path) if model is not None and model.get("class_path") else None
        ckpt_path = self.config[sub].get("ckpt_path")
        if sub == "fit" and ckpt_path == "last":
            ckpt_path = self.config[sub].ckpt_path = resume_last(self.config[sub])
        if sub == "fit" and ckpt_path and self.config[sub].get("checkpoint") is not None:
            # A resumed run replays the steps its killed attempt took after the last.ckpt: the best
            # checkpoint of such a step is rewritten under its own name, not as a "-v1" copy beside it.
            self.config[sub].checkpoint.enable_version_counter = False
        # The checkpoint is checked first (a file, Lightning's, this run's module class and task):
        # otherwise Lightning would run it as whatever class it names, on whatever task the data is.
        if ckpt_path and not _lightning_ckpt_keyword(str(ckpt_path)):
            read_checkpoint(ckpt_path, cls, getattr(self.config[sub].data, "task", None))
        init_args = model.get("init_args") if cls is not None else None
        chosen = {}
        if init_args is not None:
            defaults = inspect.signature(cls.__init__).parameters
            for k in getattr(cls, "EVALUATION_ARGS", ()):
                if k in init_args and k in defaults:
                    chosen.update(_changed_arguments(k, init_args[k], defaults[k].default))
        try:
            super()._parse_ckpt_path()
        except ArgumentError as e:
            raise CheckpointError(f"the hyperparameters of checkpoint {ckpt_path} do not fit its module: {clean_error(e)}") from None
        for k, v in chosen.items():
            self.config[sub].model.init_args[k] = v

    def before_instantiate_classes(self) -> None:
        # Check the task before anything is built, so a typo is one plain message, not a Union dump.
        from kdlora.data.tasks import get_task

        config = self.config[self.subcommand] if self.subcommand else self.config
        get_task(config.data.task)
        self.check_export_dir(config)
        resolve_precision(config)

    def check_export_dir(self, config) -> None:
        # An export would replace its directory at fit end: refuse a user's directory now, before
        # the run directory exists and hours are spent training (the module checks again at fit start).
        init_args = (config.get("model") or {}).get("init_args") if self.subcommand == "fit" else None
        if init_args is None:
            return
        export = init_args.get("export", True)
        if isinstance(export, bool):  # a module still taking flat export/export_dir
            enabled, path = export, init_args.get("export_dir")
        else:  # the ExportArgs group (a Namespace of its fields)
            enabled, path = export.get("enabled", True), export.get("dir")
        if enabled and path:
            from kdlora.io import check_export_dir

            check_export_dir(path)

    def _instantiate_trainer(self, config, callbacks):
        if config.get("enable_checkpointing") is False:
            # `--trainer.enable_checkpointing false`: no best or last checkpoint (Lightning refuses any
            # ModelCheckpoint then); the modules export and report the weights at the end of fit.
            callbacks = [c for c in callbacks if not isinstance(c, ModelCheckpoint)]
        plugins = config.get("plugins")
        plugins = [] if plugins is None else list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):  # checkpoints written whole or not at all
            config["plugins"] = [*plugins, AtomicCheckpointIO()]
        try:
            trainer = super()._instantiate_trainer(config, callbacks)
        except (MisconfigurationException, ImportError) as e:  # e.g. an accelerator this machine lacks
            message = clean_error(e)
            hint = "" if "available" in message else _accelerator_hint(config)
            raise MisconfigurationException(f"trainer: {message}{hint}") from None
        if not trainer.loggers:  # `--trainer.logger false`: the default LearningRateMonitor has nothing to log to
            defaults = [c for c in self.trainer_defaults.get("callbacks", []) if isinstance(c, LearningRateMonitor)]
            trainer.callbacks = [c for c in trainer.callbacks if not any(c is d for d in defaults)]
        return trainer

    def after_fit(self) -> None:
        # Select on the held-out part of train, report dev: the best checkpoint is scored on dev once
        # (results.json gains "test"; `python -m kdlora.experiments.report --split test` ranks by the held-out score).
        trainer, dm = self.trainer, self.datamodule
        if (getattr(dm, "holdout_fraction", 0) > 0 and getattr(self.model, "TEST_ON_DEV_AFTER_HELD_OUT_FIT", False)
                and not trainer.fast_dev_run and not trainer.interrupted and trainer.checkpoint_callback is not None
                and trainer.checkpoint_callback.best_model_path):
            trainer.test(self.model, datamodule=dm, ckpt_path=trainer.checkpoint_callback.best_model_path)

    def after_instantiate_classes(self) -> None:
        super().after_instantiate_classes()
        # Evaluating or predicting with weights initialised at random just now (the classifier head a
        # pretrained checkpoint lacks) gives chance-level numbers or a GLUE submission of noise.
        sub = self.subcommand
        new = getattr(self.model, "newly_initialised", ())
        if sub in ("validate", "test", "predict") and new and not self.config[sub].get("ckpt_path"):
            raise ValueError(
                f"{sub} without --ckpt_path would use the untrained {', '.join(new_weight_modules(new))} that "
                f"{self.model.hparams.get('model_name_or_path')} lacks (initialised at random): give --ckpt_path of a "
                "trained run, or a fine-tuned model (e.g. a run's export/) as model_name_or_path")
        # Inputs longer than the model's position table fail deep inside its forward, after the run started.
        key = next((k for k in ("max_seq_length", "block_size") if hasattr(self.datamodule, k)), None)
        length, limit = getattr(self.datamodule, key, None) if key else None, max_input_length(self.model)
        if length is not None and limit is not None and length > limit:
            model = self.model.hparams.get("model_name_or_path") or "the model"
            raise ValueError(f"data.{key} {length} is longer than {model} takes ({limit} positions): use at most {limit}")


def _accelerator_hint(config: dict) -> str:
    """Which accelerators this machine has, when the trainer names one."""
    accelerator = config.get("accelerator")
    if not isinstance(accelerator, str) or accelerator == "auto":
        return ""
    from lightning.pytorch.accelerators import AcceleratorRegistry

    available = []
    for name in sorted(AcceleratorRegistry.available_accelerators()):
        try:
            if AcceleratorRegistry[name]["accelerator"].is_available():
                available.append(name)
        except Exception:  # an accelerator whose package is missing is not available
            continue
    return f" (trainer.accelerator is {accelerator!r}; this machine has: {', '.join(available) or 'none'})"


@dataclass(frozen=True)
class MeasureArgs:
    """The measurements `kdlora.experiments.report` reads: a config's ``measure:`` adds the callbacks
    GLUEResults, ParameterCount, PeakMemory and InferenceLatency to ``trainer.callbacks``."""

    latency_runs: int = 1
    """InferenceLatency's timed passes over the validation loader (the KD-LoRA paper's protocol: 100)"""
    latency_warmup_batches: int = 2
    """InferenceLatency's untimed forward passes first (the paper's protocol: 10)"""


MEASURING_CALLBACKS = tuple(f"kdlora.training.callbacks.{name}" for name in ("GLUEResults", "ParameterCount", "PeakMemory", "InferenceLatency"))


def add_measuring_callbacks(config: Namespace) -> None:
    """With ``measure`` set, the `MEASURING_CALLBACKS` that ``trainer.callbacks`` lacks are added to it, with
    every argument (so the run's config.yaml shows them); a listed one keeps its own arguments."""
    measure = config.get("measure")
    trainer = config.get("trainer")
    if measure is None or trainer is None:
        return
    measure = measure if isinstance(measure, MeasureArgs) else MeasureArgs(**dict(measure))
    callbacks = list(trainer.get("callbacks") or [])
    listed = {c.get("class_path") for c in callbacks if isinstance(c, (Namespace, dict))}
    latency = {"num_runs": measure.latency_runs, "warmup_batches": measure.latency_warmup_batches}
    for class_path in MEASURING_CALLBACKS:
        if class_path not in listed:
            cls = _import(class_path)
            init_args = {name: p.default for name, p in inspect.signature(cls.__init__).parameters.items()
                         if name != "self" and p.default is not p.empty}
            init_args.update(latency if cls.__name__ == "InferenceLatency" else {})
            callbacks.append(Namespace(class_path=class_path, init_args=Namespace(**init_args)))
    trainer.callbacks = callbacks


def add_checkpoint_arguments(parser, monitor: str, mode: str) -> None:
    """The best checkpoint (`checkpoint`, by `monitor`) and the resume one (`last_checkpoint`)."""
    parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
    parser.set_defaults({"checkpoint.monitor": monitor, "checkpoint.mode": mode,
                         "checkpoint.save_top_k": 1, "checkpoint.filename": "best-{epoch}-{step}",
                         "checkpoint.auto_insert_metric_name": False})
    # For resuming (`fit --ckpt_path last`): `last.ckpt` beside the best one, rewritten every N
    # optimizer steps and at the end of training. It keeps no top-k, so it is never the best:
    # `trainer.checkpoint_callback` (the first ModelCheckpoint, the group above) stays the best one.
    parser.add_lightning_class_args(LastCheckpoint, "last_checkpoint")
    parser.set_defaults({"last_checkpoint.save_last": True, "last_checkpoint.save_top_k": 0,
                         "last_checkpoint.every_n_train_steps": 100})


class DecoderCLI(KDLoRACLI):
    """`KDLoRACLI` for causal-LM modules on a `CausalLMDataModule`: no GLUE task, links or submission writer.

    - ``data.tokenizer_name`` defaults to the model's ``model_name_or_path`` (a run from a random
      ``model_config`` must name its tokenizer);
    - ``{stdlib}`` in ``data.source`` is this Python's standard library (``sysconfig``), so a config
      can train on it without naming a machine's path;
    - the best checkpoint is the lowest held-out ``val/palette_loss`` (the members' mean loss); the
      module reports and exports its palette, and the end-of-fit one beside it.
    """

    def parse_arguments(self, parser, args) -> None:
        LightningCLI.parse_arguments(self, parser, args)
        sub = self.config.get("subcommand")
        config = self.config[sub] if sub else self.config
        data = config.get("data")
        if data is not None and isinstance(data.get("source"), str):
            data.source = fill_stdlib(data.source)

    def add_arguments_to_parser(self, parser) -> None:
        add_checkpoint_arguments(parser, "val/palette_loss", "min")

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        init_args = (config.get("model") or {}).get("init_args") or {}
        if config.data.get("tokenizer_name") is None:
            if not init_args.get("model_name_or_path"):
                raise ValueError("data.tokenizer_name is required when the model is built from model_config "
                                 "(it defaults to model.init_args.model_name_or_path)")
            config.data.tokenizer_name = init_args["model_name_or_path"]
        self.check_export_dir(config)
        resolve_precision(config)


BF16_PRECISIONS = ("bf16-mixed", "bf16-true", "bf16")


def bf16_supported(accelerator: Any = "auto") -> bool:
    """Whether bf16 runs natively where `accelerator` ("cpu", "cuda"/"gpu", "auto": CUDA if present, else
    the CPU) would run: a CUDA device with bf16, or a CPU with AVX512-BF16 or AMX (x86) or the ARM bf16
    extension. Elsewhere autocast emulates bf16, slower than float32. Another accelerator: True (not judged)."""
    import torch

    if accelerator in (None, "auto"):
        accelerator = "cuda" if torch.cuda.is_available() else "cpu"
    if accelerator in ("cuda", "gpu"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if accelerator != "cpu":
        return True
    import platform

    if platform.machine().lower() in ("arm64", "aarch64"):
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    checks = (getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return any(check() for check in checks if check is not None)


def resolve_precision(config: Namespace) -> None:
    """A bf16 ``trainer.precision`` where bf16 is not native (`bf16_supported`) becomes 32-true, said in one line:
    the recipes ask for bf16-mixed, the fast path where it exists, and must still run (as fast as they can) elsewhere."""
    trainer = config.get("trainer")
    precision = trainer.get("precision") if trainer is not None else None
    if str(precision) not in BF16_PRECISIONS:
        return
    accelerator = trainer.get("accelerator", "auto")
    if isinstance(accelerator, str) and not bf16_supported(accelerator):
        trainer.precision = "32-true"
        print(f"[kdlora] trainer.precision {precision} -> 32-true: no native bf16 here (trainer.accelerator: {accelerator})", file=sys.stderr)


def fill_stdlib(source: str) -> str:
    """`source` with ``{stdlib}`` replaced by this interpreter's standard library directory."""
    return source.replace("{stdlib}", sysconfig.get_paths()["stdlib"])


def uses_causal_lm_module(args: list[str]) -> bool:
    """Whether the command's model is a causal-LM module (`CausalLMSuperTransformer` or a subclass)."""
    choice = _model_choice(args)
    return choice is not None and _is_causal_lm_class(choice)


def _model_choice(args: list[str]) -> Any:
    """The command's model class (path or name), or None: the last of ``--model X``, ``--model.class_path X``
    and the ``model`` of each ``--config`` file, in order."""
    choice = None
    i = 0
    while i < len(args):
        key, eq, value = args[i].partition("=")
        if key in ("--config", "--model", "--model.class_path"):
            if not eq:
                if i + 1 >= len(args):
                    break
                i += 1
                value = args[i]
            found = _config_model(value) if key == "--config" else _class_path(value)
            if found is not None:
                choice = found
        i += 1
    return choice


def _class_path(value: Any) -> Any:
    if isinstance(value, str) and value.lstrip().startswith("{"):  # --model '{class_path: ..., init_args: ...}'
        import yaml

        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            return None
    if isinstance(value, dict):
        return value.get("class_path")
    return value if isinstance(value, str) else None


def _config_section(path: str, key: str) -> Any:
    """The `key` section of a ``--config`` file (or of its subcommand's section), or None."""
    import yaml

    try:
        config = yaml.safe_load(Path(path).read_text())
    except (OSError, ValueError, yaml.YAMLError):  # the parser reports a missing or broken config itself
        return None
    if not isinstance(config, dict):
        return None
    for sub in ("fit", "validate", "test", "predict"):  # a config of a subcommand's arguments
        if isinstance(config.get(sub), dict) and key in config[sub]:
            config = config[sub]
    return config.get(key)


def _config_model(path: str) -> Any:
    return _class_path(_config_section(path, "model"))


def _is_causal_lm_class(name: str) -> bool:
    try:
        cls = _import(name) if "." in name else METHOD_MODULES.get(name)
    except (ImportError, AttributeError, ValueError):
        return False
    return isinstance(cls, type) and issubclass(cls, CausalLMSuperTransformer)


# `{name}` fields of a template (`{2}`/`{1,2}` regex quantifiers are not placeholders).
_PLACEHOLDER = re.compile(r"\{([A-Za-z_]\w*)\}")
# Values that are templates of their own: ModelCheckpoint fills `{epoch}`, `{step}` and metric names.
_OWN_TEMPLATES = ("filename",)


def fill_task(config: Any, task: str, where: str = "") -> Any:
    """`config` (a jsonargparse Namespace, dict, list or string) with `{task}` in every string
    replaced by `task`, in place for namespaces, dicts and lists. Any other `{name}` is a typo
    (a path would silently contain it) and raises one ValueError naming the key and the value."""
    if isinstance(config, str):
        unknown = set(_PLACEHOLDER.findall(config)) - {"task"}
        if unknown and where.rpartition(".")[2] not in _OWN_TEMPLATES:
            names = ", ".join("{%s}" % n for n in sorted(unknown))
            raise ValueError(f"unknown placeholder {names} in {where}={config!r}: only {{task}} is filled in")
        return config.replace("{task}", task)
    if isinstance(config, Namespace):
        for key, value in vars(config).items():
            setattr(config, key, fill_task(value, task, f"{where}.{key}" if where else key))
    elif isinstance(config, dict):
        for key, value in config.items():
            config[key] = fill_task(value, task, f"{where}.{key}" if where else str(key))
    elif isinstance(config, list):
        config[:] = [fill_task(v, task, f"{where}[{i}]") for i, v in enumerate(config)]
    return config


def resume_last(config: Namespace) -> str:
    """What `fit --ckpt_path last` resumes: the `last.ckpt` of the run its logger names.

    The configs log every run to a new `version_N`, where Lightning would look for `last.ckpt` in the
    new, empty version and quietly start from scratch. So the newest version that holds
    `checkpoints/last.ckpt` is resumed, and the run logs on into that same version. With a fixed
    version, that version's `last.ckpt`. Where there is none (or a custom checkpoint dirpath or logger),
    'last' goes to Lightning as given (it warns and starts fresh), which suits a job script that
    always passes `--ckpt_path last`.
    """
    logger = config.trainer.get("logger")
    init = logger.get("init_args") if isinstance(logger, Namespace) else None
    if init is None or "save_dir" not in init or (config.get("checkpoint") or {}).get("dirpath"):
        return "last"
    root = Path(init.save_dir) / (init.get("name") or "")
    version = init.get("version")
    if version is not None:
        found = [root / (version if isinstance(version, str) else f"version_{version}") / "checkpoints" / "last.ckpt"]
    else:
        numbered = [(int(d.name.split("_", 1)[1]), d) for d in root.glob("version_*") if d.name.split("_", 1)[1].isdigit()]
        found = [d / "checkpoints" / "last.ckpt" for _, d in sorted(numbered, reverse=True)]
    last = next((f for f in found if f.is_file()), None)
    if last is None:
        print(f"[kdlora] --ckpt_path last: no checkpoints/last.ckpt under {root}; training starts from scratch", file=sys.stderr)
        return "last"
    if version is None:
        init.version = int(last.parent.parent.name.split("_", 1)[1])
    print(f"[kdlora] resuming {last}", file=sys.stderr)
    return str(last)


def _lightning_ckpt_keyword(ckpt_path: str) -> bool:
    """Whether `ckpt_path` is one Lightning resolves itself ('best', 'last', 'hpc', 'registry...', a URL)."""
    return ckpt_path in ("best", "last", "hpc") or ckpt_path.startswith("registry") or "://" in ckpt_path


def _import(class_path: str):
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


# Lines of jsonargparse's nested errors that say how it tried, not what is wrong.
_PARSER_NOISE = ("Does not validate against any of the Union subtypes", "Subtypes:", "Errors:", "Given value type:",
                 "NoneType", "either not accessible or invalid")


def clean_error(exc: BaseException) -> str:
    """An error as one line that keeps its cause.

    jsonargparse nests the cause under the failing key ('Parser key "model": ... Errors: - Problem
    with given class_path ...: Option 'palette' is not accepted'): the key and every line naming
    what is wrong are kept, in order; the union bookkeeping is dropped.
    """
    text = str(exc).strip()
    if "\n" not in text:
        return text
    parts: list[str] = []
    for line in text.splitlines():
        item = line.strip()
        item = item[2:] if item.startswith("- ") else item
        if not item or any(noise in item for noise in _PARSER_NOISE) or item in parts:
            continue
        if item.startswith("Given value:"):  # only where no reason already shows the value
            if "NestedArg(" in item or "Namespace(" in item or "Got value" in text:
                continue
            item = "got " + item[len("Given value:"):].strip()
        parts.append(item)
    line = ""
    for item in parts:
        line += item if not line else (" " if line.endswith(":") else "; ") + item
    return line or text


def cli_class_for(args: list[str]) -> tuple[type[KDLoRACLI], dict[str, Any]]:
    """The CLI class a command runs under (its model decides, `uses_causal_lm_module`) and its arguments."""
    check_moved_class_paths(args)
    check_renamed_model_keys(args)
    if uses_causal_lm_module(args):
        from kdlora.data.causal_lm import CausalLMDataModule

        cli_class, model_class, data_class = DecoderCLI, CausalLMSuperTransformer, CausalLMDataModule
    else:
        cli_class, model_class, data_class = KDLoRACLI, GLUEModule, GLUEDataModule
    return cli_class, dict(
        model_class=model_class,
        datamodule_class=data_class,
        subclass_mode_model=True,
        seed_everything_default=42,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={
            "logger": lazy_instance(TensorBoardLogger, save_dir="runs", name="kdlora", default_hp_metric=False),
            "callbacks": [lazy_instance(LearningRateMonitor, logging_interval="step")],
        },
    )


def main(args: list[str] | None = None, run: bool = True) -> KDLoRACLI:
    cli_class, kwargs = cli_class_for(sys.argv[1:] if args is None else args)
    return cli_class(**kwargs, args=args, run=run)


class _ParserReady(Exception):
    pass


def argument_checker(args: list[str]) -> KDLoRACLI:
    """The CLI that `main(args)` would build, stopped once its parser is built: nothing parsed, built or run.
    ``checker.parse_arguments(checker.parser, other_args)`` parses a command as `main` would (raising
    the error `main` would report) and leaves the result in ``checker.config``; the parser is built once."""
    cli_class, kwargs = cli_class_for(args)

    class ArgumentChecker(cli_class):
        def parse_arguments(self, parser, args) -> None:
            if not hasattr(self, "_ready"):
                self._ready = True
                raise _ParserReady(self)
            with warnings.catch_warnings():  # a command checked from another program's command line
                warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
                cli_class.parse_arguments(self, parser, args)

    try:
        ArgumentChecker(**kwargs, args=[])
    except _ParserReady as ready:
        return ready.args[0]
    raise AssertionError("LightningCLI parsed before building its parser")  # pragma: no cover


def cli_main(args: list[str] | None = None) -> int:
    """Entry point: user errors (bad task, missing file, bad value, a Trainer setting this machine cannot
    run, a full disk) become one line and exit code 2."""
    from kdlora.data.glue import GLUEDataError
    from kdlora.training.module import TrainingDivergedError

    try:
        main(args)
    except SystemExit as e:  # --help, --print_config, or a problem already printed
        return e.code if isinstance(e.code, int) else 2
    except (GLUEDataError, ValueError, OSError, KeyError, ArgumentError, TrainingDivergedError,
            MisconfigurationException) as e:
        if os.environ.get("KDLORA_DEBUG"):
            raise
        print(f"kdlora: error: {clean_error(e)}", file=sys.stderr)
        return 2
    return 0
