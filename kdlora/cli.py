"""The command line: LightningCLI with GLUE-aware links and defaults.

    python train.py fit --config configs/demo/teacher.yaml
    python train.py test --config configs/demo/teacher.yaml --ckpt_path runs/.../best.ckpt
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import sys
from typing import Any

from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from jsonargparse import Namespace, lazy_instance

from kdlora.callbacks import GLUESubmissionWriter, LastCheckpoint
from kdlora.data import GLUEDataModule
from kdlora.modules.base import GLUEModule


class KDLoRACLI(LightningCLI):
    def parse_arguments(self, parser, args) -> None:
        # Paths follow the task chosen on the command line: `{task}` in any string of the config
        # becomes the canonical task name right after parsing, before a checkpoint is read or
        # anything is built, so the saved config.yaml shows the resolved paths.
        super().parse_arguments(parser, args)
        from kdlora.tasks import get_task

        sub = self.config.get("subcommand")
        config = self.config[sub] if sub else self.config
        task = getattr(config.get("data"), "task", None)
        if task is not None:
            fill_task(config, get_task(task).name)

    def add_arguments_to_parser(self, parser) -> None:
        # The task is chosen once, on the data; the model learns its labels and metrics from it.
        parser.link_arguments("data.task", "model.init_args.task")
        # Teacher and student share a vocabulary, so the model's own tokenizer is the data's.
        parser.link_arguments("model.init_args.model_name_or_path", "data.tokenizer_name")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.monitor": "val/score", "checkpoint.mode": "max",
                             "checkpoint.save_top_k": 1, "checkpoint.filename": "best-{epoch}-{step}",
                             "checkpoint.auto_insert_metric_name": False})
        # For resuming (`fit --ckpt_path last`): `last.ckpt` beside the best one, rewritten every N
        # optimizer steps and at the end of training. It keeps no top-k, so it is never the best:
        # `trainer.checkpoint_callback` (the first ModelCheckpoint, the group above) stays the best one.
        parser.add_lightning_class_args(LastCheckpoint, "last_checkpoint")
        parser.set_defaults({"last_checkpoint.save_last": True, "last_checkpoint.save_top_k": 0,
                             "last_checkpoint.every_n_train_steps": 100})
        parser.add_lightning_class_args(GLUESubmissionWriter, "predictions")

    def _parse_ckpt_path(self) -> None:
        # Lightning replaces the model's arguments with the checkpoint's hyperparameters. Arguments a
        # module lists in EVALUATION_ARGS (e.g. the supernet's palette) only decide what is evaluated
        # or written, so where the user set them (command line or config) their value wins.
        sub = self.config.get("subcommand")
        model = self.config[sub].get("model") if sub else None
        init_args = model.get("init_args") if model is not None and model.get("class_path") else None
        chosen = {}
        if init_args is not None:
            cls = _import(model.class_path)
            defaults = inspect.signature(cls.__init__).parameters
            chosen = {k: init_args[k] for k in getattr(cls, "EVALUATION_ARGS", ())
                      if k in init_args and k in defaults and init_args[k] != defaults[k].default}
        super()._parse_ckpt_path()
        for k, v in chosen.items():
            self.config[sub].model.init_args[k] = v

    def before_instantiate_classes(self) -> None:
        # Check the task before anything is built, so a typo is one plain message, not a Union dump.
        from kdlora.tasks import get_task

        config = self.config[self.subcommand] if self.subcommand else self.config
        get_task(config.data.task)
        # An export would replace its directory at fit end: refuse a user's directory now, before
        # the run directory exists and hours are spent training (the module checks again at fit start).
        init_args = (config.get("model") or {}).get("init_args") if self.subcommand == "fit" else None
        if init_args is not None and init_args.get("export", True) and init_args.get("export_dir"):
            from kdlora.models import check_export_dir

            check_export_dir(init_args["export_dir"])

    def _instantiate_trainer(self, config, callbacks):
        trainer = super()._instantiate_trainer(config, callbacks)
        if not trainer.loggers:  # `--trainer.logger false`: the default LearningRateMonitor has nothing to log to
            defaults = [c for c in self.trainer_defaults.get("callbacks", []) if isinstance(c, LearningRateMonitor)]
            trainer.callbacks = [c for c in trainer.callbacks if not any(c is d for d in defaults)]
        return trainer


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


def _import(class_path: str):
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def clean_error(exc: BaseException) -> str:
    """The useful line(s) of an error; jsonargparse nests ours inside 'Errors: - ...' lists."""
    text = str(exc)
    if "Errors:" not in text:
        return text
    reasons = [line.strip()[2:] for line in text.splitlines() if line.strip().startswith("- ")]
    reasons = [r for r in reasons if "NoneType" not in r]
    return "; ".join(dict.fromkeys(reasons)) or text


def main(args: list[str] | None = None, run: bool = True) -> KDLoRACLI:
    return KDLoRACLI(
        GLUEModule,
        GLUEDataModule,
        subclass_mode_model=True,
        seed_everything_default=42,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={
            "logger": lazy_instance(TensorBoardLogger, save_dir="runs", name="kdlora", default_hp_metric=False),
            "callbacks": [lazy_instance(LearningRateMonitor, logging_interval="step")],
        },
        args=args,
        run=run,
    )


def cli_main(args: list[str] | None = None) -> int:
    """Entry point: user errors (bad task, missing file, bad value) become one line and exit code 2."""
    from kdlora.data import GLUEDataError
    from kdlora.modules.base import TrainingDivergedError

    try:
        main(args)
    except SystemExit as e:  # argparse/jsonargparse already printed the problem
        return e.code if isinstance(e.code, int) else 2
    except (GLUEDataError, ValueError, FileNotFoundError, KeyError, TrainingDivergedError) as e:
        if os.environ.get("KDLORA_DEBUG"):
            raise
        print(f"kdlora: error: {clean_error(e)}", file=sys.stderr)
        return 2
    return 0
