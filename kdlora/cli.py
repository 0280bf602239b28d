"""The command line: LightningCLI with GLUE-aware links and defaults.

    python train.py fit --config configs/demo/teacher.yaml
    python train.py test --config configs/demo/teacher.yaml --ckpt_path runs/.../best.ckpt
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from argparse import ArgumentError

from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from jsonargparse import lazy_instance

from kdlora.callbacks import GLUESubmissionWriter
from kdlora.checkpoint import CheckpointError, read_checkpoint
from kdlora.data import GLUEDataModule
from kdlora.models import new_weight_modules
from kdlora.modules.base import GLUEModule


class KDLoRACLI(LightningCLI):
    def init_parser(self, **kwargs):
        # Parser errors are raised, not printed with the full usage, so `cli_main` makes them one line.
        kwargs.setdefault("exit_on_error", False)
        return super().init_parser(**kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        # The task is chosen once, on the data; the model learns its labels and metrics from it.
        parser.link_arguments("data.task", "model.init_args.task")
        # Teacher and student share a vocabulary, so the model's own tokenizer is the data's.
        parser.link_arguments("model.init_args.model_name_or_path", "data.tokenizer_name")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.monitor": "val/score", "checkpoint.mode": "max",
                             "checkpoint.save_top_k": 1, "checkpoint.filename": "best-{epoch}-{step}",
                             "checkpoint.auto_insert_metric_name": False})
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
        # The checkpoint is checked first (a file, Lightning's, this run's module class and task):
        # otherwise Lightning would run it as whatever class it names, on whatever task the data is.
        if ckpt_path and not _lightning_ckpt_keyword(str(ckpt_path)):
            read_checkpoint(ckpt_path, cls, self.config[sub].data.task)
        init_args = model.get("init_args") if cls is not None else None
        chosen = {}
        if init_args is not None:
            defaults = inspect.signature(cls.__init__).parameters
            chosen = {k: init_args[k] for k in getattr(cls, "EVALUATION_ARGS", ())
                      if k in init_args and k in defaults and init_args[k] != defaults[k].default}
        try:
            super()._parse_ckpt_path()
        except ArgumentError as e:
            raise CheckpointError(f"the hyperparameters of checkpoint {ckpt_path} do not fit its module: {clean_error(e)}") from None
        for k, v in chosen.items():
            self.config[sub].model.init_args[k] = v

    def before_instantiate_classes(self) -> None:
        # Check the task before anything is built, so a typo is one plain message, not a Union dump.
        from kdlora.tasks import get_task

        config = self.config[self.subcommand] if self.subcommand else self.config
        get_task(config.data.task)

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

    try:
        main(args)
    except SystemExit as e:  # --help, --print_config, or a problem already printed
        return e.code if isinstance(e.code, int) else 2
    except (GLUEDataError, ValueError, FileNotFoundError, KeyError, ArgumentError) as e:
        if os.environ.get("KDLORA_DEBUG"):
            raise
        print(f"kdlora: error: {clean_error(e)}", file=sys.stderr)
        return 2
    return 0
