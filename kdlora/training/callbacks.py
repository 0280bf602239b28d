"""Callbacks usable with any kdlora module: GLUE submission files, run results and efficiency measurements.

The measuring callbacks know nothing of the module they measure: they count `pl_module.parameters()`,
time `pl_module(batch)` and read the device's memory counters. Each merges its numbers into the run's
``<log_dir>/results.json`` (which `kdlora.experiments.report` reads) and logs them.
"""

from __future__ import annotations

import resource
import sys
import time
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter, Callback, ModelCheckpoint

from kdlora.eval.latency import latency_summary
from kdlora.eval.metrics import predictions_from_logits
from kdlora.io import update_results, write_atomic


# GLUE's submission format writes label names for the NLI tasks, integers elsewhere, floats for STS-B.
TEXT_LABEL_TASKS = {"mnli", "qnli", "rte", "ax"}


class GLUESubmissionWriter(BasePredictionWriter):
    """Writes `trainer.predict` outputs as GLUE submission files (``<TASK>.tsv``: index, prediction).

    Args:
        output_dir: directory for the files; default ``<log_dir>/predictions``.
    """

    def __init__(self, output_dir: Optional[str] = None) -> None:
        super().__init__(write_interval="epoch")
        self.output_dir = output_dir

    def write_on_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, predictions: Any, batch_indices: Any) -> None:
        if trainer.world_size > 1:
            raise RuntimeError("GLUE submission files need every prediction in one process: run predict with devices=1")
        targets = trainer.datamodule.predict_targets
        if targets and len(targets) == 1:
            predictions = [predictions]
        out_dir = Path(self.output_dir or Path(trainer.log_dir or ".") / "predictions")
        for (spec, split), outputs in zip(targets, predictions):
            idx = torch.cat([o["idx"] for o in outputs]).tolist()
            preds = predictions_from_logits(torch.cat([o["logits"] for o in outputs]), spec.is_regression).tolist()
            lines = ["index\tprediction"]
            for i, p in sorted(zip(idx, preds)):
                if spec.is_regression:
                    value = f"{min(max(p, 0.0), 5.0):.3f}"
                elif spec.name in TEXT_LABEL_TASKS:
                    value = spec.label_names[p]
                else:
                    value = str(p)
                lines.append(f"{i}\t{value}")
            path = out_dir / f"{split.submission or spec.dir_name}.tsv"
            write_atomic(path, "\n".join(lines) + "\n")
            print(f"[kdlora] wrote {len(idx)} predictions to {path}")


# ----------------------------------------------------------------------------------------------
# Run results
# ----------------------------------------------------------------------------------------------

RESULTS_FILE = "results.json"


def run_dir(trainer: L.Trainer) -> Path:
    """The run's log directory. Call on every rank: `trainer.log_dir` is a collective under DDP."""
    return Path(trainer.log_dir or trainer.default_root_dir)


def log_numbers(trainer: L.Trainer, metrics: dict[str, float]) -> None:
    """Log outside a LightningModule hook (`self.log` is not allowed in fit/test end hooks)."""
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=trainer.global_step)
        logger.save()


def _stage(trainer: L.Trainer) -> str:
    return trainer.state.fn.value if trainer.state.fn is not None else "fit"


class GLUEResults(Callback):
    """Writes what the report needs: the run's module, task and hparams, the best and last validation
    metrics of fit (best by ``val/score``) and test metrics, to ``<log_dir>/results.json``; and, when
    training diverges (`kdlora.training.module.TrainingDivergedError`), where, as ``diverged``."""

    def __init__(self, filename: str = RESULTS_FILE) -> None:
        self.filename = filename
        self._best: Optional[dict[str, float]] = None
        self._fit_path: Optional[Path] = None
        self._restored_best: Optional[dict[str, float]] = None

    def _path(self, trainer: L.Trainer) -> Path:
        return run_dir(trainer) / self.filename

    # The best validation so far travels in checkpoints: a resumed fit compares against it.
    def state_dict(self) -> dict[str, Any]:
        return {"best": self._best} if self._best is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored_best = state_dict.get("best")

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write_identity(trainer, pl_module)
        self._best, self._restored_best = self._restored_best, None
        self._fit_path = self._path(trainer)  # now, on every rank: an exception may reach only one

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        from kdlora.training.module import TrainingDivergedError

        if isinstance(exception, TrainingDivergedError) and self._fit_path is not None:
            update_results(self._fit_path, {"diverged": exception.record})

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write_identity(trainer, pl_module)

    def _write_identity(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        path = self._path(trainer)
        if not trainer.is_global_zero:
            return
        primitive = (str, int, float, bool, type(None), list, dict)  # dict: argument groups (lora, optimizer, ...)
        hparams = {k: v for k, v in dict(pl_module.hparams).items() if isinstance(v, primitive)}
        dm = getattr(trainer, "datamodule", None)
        data = {k: v for k, v in dict(getattr(dm, "hparams", {}) or {}).items() if isinstance(v, primitive)}
        update_results(path, {"run": {"module": type(pl_module).__name__, "task": hparams.get("task"),
                                      "hparams": hparams, "data": data}})

    @staticmethod
    def _metrics(trainer: L.Trainer, prefix: str) -> dict[str, float]:
        return {k[len(prefix):]: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(prefix)}

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        path = self._path(trainer)
        values = self._metrics(trainer, "val/")
        if not values or not trainer.is_global_zero:
            return
        values = {**values, "epoch": trainer.current_epoch, "step": trainer.global_step}
        key = "val" if _stage(trainer) == "fit" else "validate"
        update = {f"{key}_last": values}
        if key == "val" and (self._best is None or values.get("score", float("-inf")) > self._best.get("score", float("-inf"))):
            self._best = values
            update["val_best"] = values
        update_results(path, update)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        path = self._path(trainer)
        values = self._metrics(trainer, "test/")
        if values and trainer.is_global_zero:
            update_results(path, {"test": values})


class LastCheckpoint(ModelCheckpoint):
    """`last.ckpt` for resuming, every `every_n_train_steps` optimizer steps (and at the end of training).

    A due step that ends an epoch is saved at train epoch end instead, after that epoch's validation:
    Lightning resumes a checkpoint taken at an epoch's last batch past that epoch, so its validation,
    logged metrics and best checkpoint would be missing from the resumed run.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._due_at_epoch_end = False

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            every = self._every_n_train_steps
            self._due_at_epoch_end = every >= 1 and trainer.global_step % every == 0
            return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._due_at_epoch_end and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        self._due_at_epoch_end = False

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning writes last.ckpt at train end even in a fast_dev_run, which has no log dir: the
        # file would land in the working directory.
        if trainer.fast_dev_run:
            return
        super().on_train_end(trainer, pl_module)
        # Lightning's own train-end save happens only when no last.ckpt was written at all: a run whose
        # final step is not a multiple of every_n_train_steps would keep the one of its last due step.
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


# ----------------------------------------------------------------------------------------------
# Efficiency
# ----------------------------------------------------------------------------------------------


def _reset_cpu_peak_rss() -> bool:
    """Reset the process's peak RSS (Linux: /proc/self/clear_refs "5"); False where impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _proc_status_bytes(field: str) -> Optional[int]:
    """A kB field of /proc/self/status (Linux: VmRSS, VmHWM) in bytes, None where unavailable."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def cpu_rss_bytes() -> Optional[int]:
    """Current resident set size of this process (Linux VmRSS), None where unknown."""
    return _proc_status_bytes("VmRSS")


def cpu_peak_rss_bytes() -> int:
    """Peak resident set size of this process: VmHWM on Linux, else `getrusage` (process lifetime)."""
    peak_hwm = _proc_status_bytes("VmHWM")
    if peak_hwm is not None:
        return peak_hwm
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, Linux KiB


class PeakMemory(Callback):
    """Peak memory of each fit/validate/test stage.

    CUDA: the peak counters are reset at stage start and ``max_memory_allocated`` /
    ``max_memory_reserved`` read at stage end (not ``memory_allocated`` at some epoch end, which
    misses activations), max-reduced over DDP ranks. CPU: the process's peak RSS, labelled
    ``cpu_peak_rss_mb`` (reset at stage start where Linux allows, else the process lifetime peak).
    """

    def __init__(self, filename: str = RESULTS_FILE) -> None:
        self.filename = filename
        self._rss_scope = "process"

    def _begin(self, pl_module: L.LightningModule) -> None:
        device = pl_module.device
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        else:
            self._rss_scope = "stage" if _reset_cpu_peak_rss() else "process"

    def _end(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        device = pl_module.device
        mib = 2.0 ** 20
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            peaks = torch.tensor([torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)],
                                 dtype=torch.float64, device=device)
            peaks = trainer.strategy.reduce(peaks, reduce_op="max")
            record = {"device": "cuda", "name": torch.cuda.get_device_name(device),
                      "allocated_mb": peaks[0].item() / mib, "reserved_mb": peaks[1].item() / mib}
        else:
            peak = torch.tensor([float(cpu_peak_rss_bytes())], dtype=torch.float64, device=device)
            peak = trainer.strategy.reduce(peak, reduce_op="max")
            record = {"device": device.type, "cpu_peak_rss_mb": peak[0].item() / mib, "scope": self._rss_scope}
        path = run_dir(trainer) / self.filename
        log_numbers(trainer, {f"peak_memory/{stage}/{k}": v for k, v in record.items() if isinstance(v, float)})
        if trainer.is_global_zero:
            update_results(path, {"peak_memory": {stage: record}})

    def on_fit_start(self, trainer, pl_module) -> None:
        self._begin(pl_module)

    # At train end, not fit end: InferenceLatency resets the same peak counters at fit end to measure
    # inference memory, and callbacks' fit-end hooks run in list order.
    def on_train_end(self, trainer, pl_module) -> None:
        self._end(trainer, pl_module, "fit")

    def on_validation_start(self, trainer, pl_module) -> None:
        if _stage(trainer) == "validate":
            self._begin(pl_module)

    def on_validation_end(self, trainer, pl_module) -> None:
        if _stage(trainer) == "validate":
            self._end(trainer, pl_module, "validate")

    def on_test_start(self, trainer, pl_module) -> None:
        self._begin(pl_module)

    def on_test_end(self, trainer, pl_module) -> None:
        self._end(trainer, pl_module, "test")


class InferenceLatency(Callback):
    """Times inference of `pl_module(batch)` at the end of the chosen stages (rank 0; others wait).

    Protocol (KD-LoRA paper: 100 runs over CoLA validation): the dataloader's batches are moved to
    the device first, `warmup_batches` untimed forward passes, then `num_runs` timed passes over all
    batches, each batch timed with `perf_counter` between device synchronisations, in eval mode
    under `inference_mode` and the trainer's precision.

    Inference memory (the paper's Table 2 memory is GPU memory during inference) is recorded beside
    the times as ``memory``: on CUDA the peak counters are reset after the batches are on the device
    and ``max_memory_allocated`` is read after the passes (``peak_allocated_mb``: weights, batches and
    activations; ``before_mb``: what was allocated before; ``delta_mb``); on CPU the peak RSS of the
    passes (``peak_rss_mb``, reset first where Linux allows: ``scope`` ``inference``, else ``process``)
    and its rise over the RSS before them (``delta_mb``).

    Args:
        num_runs: timed passes over the dataloader.
        warmup_batches: untimed forward passes first.
        max_batches: time only the first N batches (quick runs).
        dataloader: ``val`` or ``test`` dataloader of the data module.
        stages: stage ends at which to measure (``fit``, ``validate``, ``test``).
    """

    def __init__(self, num_runs: int = 1, warmup_batches: int = 5, max_batches: Optional[int] = None,
                 dataloader: str = "val", stages: list[str] = ["fit", "test"], filename: str = RESULTS_FILE) -> None:
        if num_runs < 1:
            raise ValueError(f"num_runs must be >= 1, got {num_runs}")
        if dataloader not in ("val", "test"):
            raise ValueError(f"dataloader must be 'val' or 'test', got {dataloader!r}")
        self.num_runs, self.warmup_batches, self.max_batches = num_runs, warmup_batches, max_batches
        self.dataloader, self.stages, self.filename = dataloader, list(stages), filename

    def _loader(self, trainer: L.Trainer):
        dm = getattr(trainer, "datamodule", None)
        loader = None
        if dm is not None:
            try:
                loader = getattr(dm, f"{self.dataloader}_dataloader")()
            except (KeyError, NotImplementedError):
                loader = None
        if loader is None:
            loader = trainer.val_dataloaders if self.dataloader == "val" else trainer.test_dataloaders
        if isinstance(loader, (list, tuple)):
            loader = loader[0]
        if loader is None:
            raise ValueError(f"InferenceLatency: no {self.dataloader} dataloader to time")
        return loader

    @staticmethod
    def _sync(device: torch.device) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def measure(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        device = pl_module.device
        batches = []
        for i, batch in enumerate(self._loader(trainer)):
            if self.max_batches is not None and i >= self.max_batches:
                break
            batches.append({k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()})
        if not batches:
            raise ValueError("InferenceLatency: the dataloader is empty")
        examples = sum(len(b["input_ids"]) for b in batches)
        was_training = pl_module.training
        pl_module.eval()
        times: list[float] = []
        self._sync(device)
        if device.type == "cuda":
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        else:
            scope = "inference" if _reset_cpu_peak_rss() else "process"
            before = cpu_rss_bytes()
        try:
            with torch.inference_mode(), trainer.precision_plugin.forward_context():
                for i in range(self.warmup_batches):
                    pl_module(batches[i % len(batches)])
                self._sync(device)
                for _ in range(self.num_runs):
                    for batch in batches:
                        self._sync(device)
                        start = time.perf_counter()
                        pl_module(batch)
                        self._sync(device)
                        times.append(time.perf_counter() - start)
        finally:
            pl_module.train(was_training)
        mib = 2.0 ** 20
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device)
            memory = {"device": "cuda", "peak_allocated_mb": peak / mib, "before_mb": before / mib, "delta_mb": (peak - before) / mib}
        else:
            peak = cpu_peak_rss_bytes()
            memory = {"device": device.type, "peak_rss_mb": peak / mib, "scope": scope,
                      **({"before_rss_mb": before / mib, "delta_mb": max(0, peak - before) / mib} if before is not None else {})}
        summary = latency_summary(times, examples, self.num_runs)
        summary["memory"] = memory
        summary["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
        summary["batch_size"] = len(batches[0]["input_ids"])
        return summary

    def _run(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage not in self.stages:
            return
        path = run_dir(trainer) / self.filename
        if trainer.is_global_zero:
            record = self.measure(trainer, pl_module)
            log_numbers(trainer, {f"latency/{stage}/{k}": float(v) for k, v in record.items() if isinstance(v, (int, float))})
            update_results(path, {"latency": {stage: record}})
        trainer.strategy.barrier("kdlora-latency")

    def on_fit_end(self, trainer, pl_module) -> None:
        self._run(trainer, pl_module, "fit")

    def on_validation_end(self, trainer, pl_module) -> None:
        if _stage(trainer) == "validate":
            self._run(trainer, pl_module, "validate")

    def on_test_end(self, trainer, pl_module) -> None:
        self._run(trainer, pl_module, "test")


class ParameterCount(Callback):
    """Total and trainable parameters of the module (a frozen teacher kept outside it is not counted),
    logged as hyperparameters and metrics and written to the results once per run."""

    def __init__(self, filename: str = RESULTS_FILE) -> None:
        self.filename = filename

    def _count(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        total = sum(p.numel() for p in pl_module.parameters())
        trainable = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
        numbers = {"params/total": total, "params/trainable": trainable}
        path = run_dir(trainer) / self.filename
        for logger in trainer.loggers:
            logger.log_hyperparams(numbers)
        log_numbers(trainer, {k: float(v) for k, v in numbers.items()})
        if trainer.is_global_zero:
            update_results(path, {"parameters": {"total": total, "trainable": trainable,
                                                 "trainable_fraction": trainable / max(total, 1)}})

    # Not on_fit_start: TensorBoardLogger writes hparams.yaml only once, so logging ours before
    # Lightning logs the module's hyperparameters would leave those out of it.
    def on_train_start(self, trainer, pl_module) -> None:
        self._count(trainer, pl_module)

    def on_test_start(self, trainer, pl_module) -> None:
        self._count(trainer, pl_module)
