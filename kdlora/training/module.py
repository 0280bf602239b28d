"""What every kdlora LightningModule shares (`FineTuningModule`: optimizer, schedule, divergence, resuming, export
place) and what the GLUE ones add (`GLUEModule`: task, metric logging, predict, export)."""

from __future__ import annotations

import inspect
import logging
import random
from pathlib import Path
from typing import Any, Optional

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from torch import nn
from transformers import get_linear_schedule_with_warmup

from kdlora.data.tasks import get_task
from kdlora.data.tokenizer import load_tokenizer
from kdlora.eval.metrics import glue_score, predictions_from_logits, task_metrics
from kdlora.io import check_export_dir, export_hf
from kdlora.training.args import ExportArgs, OptimizerArgs, as_args
from kdlora.training.heads import in_classifier_head, init_regression_bias
from kdlora.training.lora import plain_model

log = logging.getLogger(__name__)


class TrainingDivergedError(RuntimeError):
    """A training loss (or the weights) stopped being finite: the run stops, nothing is exported.

    `record` (step, epoch, batch_idx, what, value) is what `kdlora.training.callbacks.GLUEResults` writes to
    the run's results.json as ``diverged``, so the report leaves the run out of its averages.
    """

    def __init__(self, message: str, record: dict[str, Any]) -> None:
        super().__init__(message)
        self.record = record


def optimizer_groups(named_params, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups over trainable parameters: no weight decay on biases and LayerNorm weights."""
    decay, no_decay = [], []
    for name, p in named_params:
        if not p.requires_grad:
            continue
        # 1-D tensors are biases and norm scales (BERT's "LayerNorm.weight", DeBERTa's, ...).
        (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def rng_states() -> dict[str, Any]:
    """The global random states of torch (CPU and CUDA), numpy and Python, as checkpoints can hold
    them (`torch.load(weights_only=True)` reads tensors, tuples and numbers, not numpy arrays)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
            "python": random.getstate()}


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore what `rng_states` returned."""
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    name, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, state, python_gauss = states["python"]
    random.setstate((version, tuple(state), python_gauss))


class FineTuningModule(L.LightningModule):
    """What every kdlora LightningModule shares, whatever its data: argument checks of the optimizer,
    AdamW with a linear schedule, divergence checks, the random streams a checkpoint carries, where
    exports go, and the check (when fit starts) that the export can be written there.

    Args:
        optimizer: AdamW with linear warmup then linear decay (`OptimizerArgs`, or a dict of its fields).
        export: where the trained model is written (`ExportArgs`, or a dict of its fields); see `GLUEModule`.

    Subclasses save their argument groups as plain dicts (`dataclasses.asdict`) in their hyperparameters.
    Training stops with `TrainingDivergedError` at the first non-finite training loss, and no
    checkpoint is ever written from non-finite weights.
    """

    def __init__(self, optimizer: OptimizerArgs = OptimizerArgs(), export: ExportArgs = ExportArgs()) -> None:
        super().__init__()
        self.optimizer_args = as_args(OptimizerArgs, optimizer)  # checks its values
        self.export_args = as_args(ExportArgs, export)
        self._batch_idx: Optional[int] = None
        self._rng_to_restore: Optional[dict[str, Any]] = None

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.export_args.enabled:
            # Before any training: a refusal at fit end would waste the run.
            path = self.export_path  # on every rank: trainer.log_dir is a collective under DDP
            if path is not None:
                check_export_dir(path)

    # ---- resuming ----
    # Lightning restores weights, optimizer, schedule, loops and callbacks, not the random streams
    # (dropout): a checkpoint carries them, and a resumed run sets them just before its first step,
    # after everything set-up draws, so it continues the stream of the run it resumes. Under DDP
    # every rank resumes rank 0's streams (the one written): valid randomness, not the same masks.
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._rng_to_restore = checkpoint.get("kdlora_rng_states")

    def on_train_start(self) -> None:
        # Only when this fit resumes that checkpoint (not after load_from_checkpoint, say).
        if self._rng_to_restore is not None and self.trainer.ckpt_path is not None:
            set_rng_states(self._rng_to_restore)
        self._rng_to_restore = None

    # ---- optimisation ----
    def configure_optimizers(self):
        args = self.optimizer_args
        opt = torch.optim.AdamW(optimizer_groups(self.named_parameters(), args.weight_decay), lr=args.learning_rate)
        total = int(self.trainer.estimated_stepping_batches)
        sched = get_linear_schedule_with_warmup(opt, int(args.warmup_ratio * total), total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Clip to `optimizer.gradient_clip` (max gradient norm) when set, else as the trainer says."""
        if self.optimizer_args.gradient_clip:
            gradient_clip_val, gradient_clip_algorithm = self.optimizer_args.gradient_clip, "norm"
        self.clip_gradients(optimizer, gradient_clip_val=gradient_clip_val, gradient_clip_algorithm=gradient_clip_algorithm)

    # ---- divergence ----
    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        self._batch_idx = batch_idx

    def check_finite_loss(self, loss: torch.Tensor, what: str = "training loss") -> None:
        """Raise `TrainingDivergedError` naming the step and batch if `loss` is NaN or infinite."""
        if bool(torch.isfinite(loss.detach()).all()):
            return
        value = float(loss.detach().float().flatten()[0]) if loss.numel() == 1 else "non-finite"
        record = {"what": what, "value": str(value), "step": self.global_step, "epoch": self.current_epoch,
                  "batch_idx": self._batch_idx}
        lr = self.optimizer_args.learning_rate
        raise TrainingDivergedError(
            f"{what} is {value} at step {self.global_step} (epoch {self.current_epoch}, batch_idx {self._batch_idx}): "
            f"training diverged and stopped; nothing was exported. Lower optimizer.learning_rate (it is {lr}) or check the "
            "training data", record)

    def on_before_backward(self, loss: torch.Tensor) -> None:
        # Every backward pass goes through here, automatic or manual (`manual_backward`).
        self.check_finite_loss(loss)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        bad = next((n for n, p in self.named_parameters() if not bool(torch.isfinite(p.detach()).all())), None)
        if bad is not None:
            record = {"what": f"weight {bad}", "value": "non-finite", "step": self.global_step,
                      "epoch": self.current_epoch, "batch_idx": self._batch_idx}
            raise TrainingDivergedError(f"weight {bad} is not finite at step {self.global_step} (epoch {self.current_epoch}): "
                                        "training diverged; no checkpoint is written from these weights and nothing "
                                        "is exported. Lower optimizer.learning_rate or check the training data", record)
        checkpoint["kdlora_rng_states"] = rng_states()

    # ---- export ----
    @property
    def export_path(self) -> Optional[Path]:
        """`export.dir`, else ``<log_dir>/export``; None when the run has no directory of its own
        (fast_dev_run replaces the loggers), so nothing lands in the working directory unasked."""
        if self.export_args.dir:
            return Path(self.export_args.dir)
        log_dir = self.trainer.log_dir
        if self.trainer.fast_dev_run or log_dir is None:
            return None
        return Path(log_dir) / "export"


class GLUEModule(FineTuningModule):
    """Base class of the GLUE modules: subclasses provide `self.model`-like forward via `logits(batch)` and a `training_step`.

    Args:
        task: GLUE task name (linked from the data module by the CLI).
        optimizer: AdamW with linear warmup then linear decay (`OptimizerArgs`).
        export: `ExportArgs`: ``dir`` is where the best model is written as a Hugging Face directory at the
            end of fit (default ``<log_dir>/export``; without a run directory, as under fast_dev_run, nothing is
            exported unless ``dir`` is given); ``enabled: false`` skips it. An existing directory is
            replaced only if it is empty or a previous kdlora export (`kdlora.io.check_export_dir`),
            checked when fit starts and again when writing.

    Training stops with `TrainingDivergedError` at the first non-finite training loss, and no
    checkpoint is ever written from non-finite weights.
    """

    # With a held-out split for selection (`data.holdout_fraction`), `train.py fit` then scores the best
    # checkpoint on dev (`test`): selected on held-out data, reported on dev. The supernet scores its palette itself.
    TEST_ON_DEV_AFTER_HELD_OUT_FIT = True

    def __init__(self, task: str = "mrpc", optimizer: OptimizerArgs = OptimizerArgs(), export: ExportArgs = ExportArgs()) -> None:
        spec = get_task(task)
        super().__init__(optimizer, export)
        self.spec = spec
        # One metric collection per evaluation dataloader (MNLI has matched + mismatched).
        self.eval_metrics = nn.ModuleList([task_metrics(self.spec) for _ in range(max(len(self.spec.validation), 1))])
        self._forward_keys: Optional[set[str]] = None

    # ---- model plumbing ----
    def model_inputs(self, batch: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
        """The batch entries `model.forward` accepts (DistilBERT takes no token_type_ids)."""
        base = getattr(model, "get_base_model", lambda: model)()
        params = inspect.signature(base.forward).parameters
        keys = {"input_ids", "attention_mask", "token_type_ids"} & set(params)
        # RoBERTa/DeBERTa-v3 have no segment embeddings (type_vocab_size <= 1): segment ids would index out of range.
        if getattr(base.config, "type_vocab_size", 2) < 2:
            keys.discard("token_type_ids")
        return {k: v for k, v in batch.items() if k in keys}

    def logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits of `self.model` (a transformers or peft classifier); the supernet overrides this."""
        return self.model(**self.model_inputs(batch, self.model)).logits

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.logits(batch)

    def exported_model(self) -> nn.Module:
        """The model written by export (export_hf merges LoRA on a copy)."""
        return self.model

    def merged_model(self) -> nn.Module:
        """A plain transformers model with any LoRA merged (modifies the module: use after training)."""
        return plain_model(self.model)

    def tokenizer_source(self) -> str:
        return self.hparams.model_name_or_path

    # ---- set-up ----
    def setup(self, stage: str) -> None:
        super().setup(stage)  # the export directory first
        # Before any checkpoint is restored, so a resumed run keeps its trained head.
        if stage == "fit" and self.spec.is_regression and self._regression_head_is_new():
            self._init_regression_head()

    def _regression_head_is_new(self) -> bool:
        new = getattr(self, "newly_initialised", ())
        return any(in_classifier_head(name) for name in new)

    def _init_regression_head(self) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        mean = dm.train_label_mean() if hasattr(dm, "train_label_mean") else None
        if mean is None:
            rank_zero_warn("new regression head left with bias 0: the data module gives no train_label_mean()")
            return
        if init_regression_bias(self, mean):
            rank_zero_info(f"[kdlora] new regression head starts at the mean training label {mean:.3f}")

    # ---- evaluation ----
    def _eval_suffixes(self, stage: str = "val") -> list[str]:
        dev = [s.suffix for s in self.spec.validation] or [""]
        if stage == "test":  # test always runs on dev (MNLI: _m, _mm), even when validation is a holdout of train
            return dev
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        return getattr(dm, "eval_suffixes", None) or dev

    def _eval_step(self, stage: str, batch, dataloader_idx: int = 0) -> None:
        logits = self(batch)
        self.eval_metrics[dataloader_idx].update(predictions_from_logits(logits, self.spec.is_regression), batch["labels"])

    def validation_step(self, batch, batch_idx, dataloader_idx: int = 0):
        self._eval_step("val", batch, dataloader_idx)

    def test_step(self, batch, batch_idx, dataloader_idx: int = 0):
        self._eval_step("test", batch, dataloader_idx)

    def compute_eval_metrics(self, metrics: nn.ModuleList | list, suffixes: list[str]) -> dict[str, float]:
        """Compute and reset collections; names get each dataloader's suffix (MNLI: _m, _mm)."""
        values: dict[str, float] = {}
        for collection, suffix in zip(metrics, suffixes):
            for name, value in collection.compute().items():
                values[f"{name}{suffix}"] = float(value)
            collection.reset()
        return values

    def _log_eval(self, stage: str) -> None:
        values = self.compute_eval_metrics(self.eval_metrics, self._eval_suffixes(stage))
        if not values:
            return
        values["score"] = glue_score(values)
        self.log_dict({f"{stage}/{k}": v for k, v in values.items()}, prog_bar=True, sync_dist=False)

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val")

    def on_test_epoch_end(self) -> None:
        self._log_eval("test")

    def predict_step(self, batch, batch_idx, dataloader_idx: int = 0) -> dict[str, torch.Tensor]:
        logits = self(batch)
        return {"idx": batch["idx"].cpu(), "logits": logits.detach().float().cpu()}

    # ---- export ----
    def on_fit_end(self) -> None:
        if not self.export_args.enabled:
            return
        ckpt_cb = self.trainer.checkpoint_callback
        best = getattr(ckpt_cb, "best_model_path", "") if ckpt_cb is not None else ""
        path = self.export_path  # the path first: trainer.log_dir is a collective under DDP
        if path is None:
            if self.trainer.is_global_zero:
                print("[kdlora] not exported: under fast_dev_run the run has no directory; set model.export.dir to export")
            return
        source = "the weights at the end of fit"
        if best and Path(best).is_file():
            state = torch.load(best, map_location=self.device, weights_only=True)["state_dict"]
            self.load_state_dict(state)
            log.info("exporting best checkpoint %s", best)
            source = str(best)
        self._export(path, source)
        self.trainer.strategy.barrier("kdlora-export")

    def export_info(self, source: str) -> dict[str, Any]:
        """What an export holds (module, task, which weights), for its ``kdlora_export.json``."""
        return {"module": type(self).__name__, "task": self.spec.name, "weights": source}

    @rank_zero_only
    def _export(self, path: Path, source: str) -> None:
        out = export_hf(self.exported_model(), load_tokenizer(self.tokenizer_source()), path, info=self.export_info(source))
        print(f"[kdlora] exported model to {out}")
