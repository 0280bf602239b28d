"""Callbacks usable with any kdlora module: GLUE submission files (and efficiency measurements)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from kdlora.metrics import predictions_from_logits

# GLUE's submission format writes label names for the NLI tasks, integers elsewhere, floats for STS-B.
TEXT_LABEL_TASKS = {"mnli", "qnli", "rte", "ax"}


def write_atomic(path: Path, text: str) -> None:
    """Write a file via a temporary sibling so a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


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
