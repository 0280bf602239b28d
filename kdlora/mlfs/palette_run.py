"""The palette of a super-transformer run: its members, their evaluation, the fit-end selection, the
report and the export, shared by the GLUE `SuperTransformer` and the `CausalLMSuperTransformer`.

`PaletteRun` holds the members (the maxnet first if not among them; each checked to export as a plain
model when built, not at fit end), their roles and every validation's rows by (epoch, step). What it
needs from its module is `PaletteOwner`: the module says what a title says, which tokenizer goes with
the export, how a selection was made and how the palette is measured now.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Protocol

import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

from kdlora.elastic.config import SubnetConfig
from kdlora.elastic.model import ElasticTransformer
from kdlora.mlfs.args import EvaluationArgs
from kdlora.mlfs.search_space import SearchSpace, palette_members

log = logging.getLogger(__name__)

Rows = list[dict]
LATENCY_KEYS = ("latency_ms", "latency_batch_size", "latency_seq_len")


class PaletteOwner(Protocol):
    """What `PaletteRun.fit_end` needs from its LightningModule besides Lightning's own attributes
    (trainer, loggers, global_step, export_path, load_state_dict)."""

    stage: int

    def palette_title(self, info: dict) -> str:
        """The report's title for rows measured with provenance `info`."""

    def palette_tokenizer(self) -> Any:
        """The tokenizer written with every exported member (or None)."""

    def selection_info(self, checkpoint_callback, selection_rows: Optional[Rows]) -> dict:
        """What the best checkpoint was selected on (added to its rows' provenance)."""


class PaletteRun:
    """The palette members of `encoder` (``evaluation.members``: see `kdlora.mlfs.search_space.palette_members`)
    and what was measured of them. `measure_latency_default`: where ``evaluation.measure_latency`` is None;
    `provenance`: keys every row starts with (e.g. the base); `export_meta`: keys of the export's record."""

    def __init__(self, encoder: ElasticTransformer, space: SearchSpace, evaluation: EvaluationArgs, measure_latency_default: bool,
                 provenance: Optional[dict] = None, export_meta: Optional[dict] = None) -> None:
        configs = palette_members(space, evaluation.members)
        if encoder.max_config not in configs:
            configs.insert(0, encoder.max_config)  # the headline metrics are the maxnet's
        for cfg in configs:  # every member must export (a Llama one needs whole key/value heads): fail now, not at fit end
            encoder.export_config(cfg)
        self.encoder, self.evaluation = encoder, evaluation
        self.measure_latency = measure_latency_default if evaluation.measure_latency is None else evaluation.measure_latency
        self.members: list[SubnetConfig] = configs
        self.names = [c.name for c in configs]
        self.roles = {encoder.max_config.name: "maxnet", space.smallest().name: "minnet"}
        self.provenance_keys = dict(provenance or {})
        self.export_meta = dict(export_meta or {})
        # The palette of every validation so far, by (epoch, step): the report at fit end shows the selected one's.
        self.history: dict[tuple[int, int], Rows] = {}
        # Optimizer steps that trained each member's exact slice so far (the maxnet: every step).
        self.trained_steps: dict[str, int] = dict.fromkeys(self.names, 0)

    # ---- rows ----
    def logits(self, inputs: dict[str, torch.Tensor]) -> Iterator[tuple[int, SubnetConfig, torch.Tensor]]:
        """(index, config, logits) of every member on `inputs`; the maxnet again afterwards."""
        try:
            for i, cfg in enumerate(self.members):
                self.encoder.set_sub_network(cfg)
                yield i, cfg, self.encoder(**inputs).logits
        finally:
            self.encoder.reset_super_network()

    def row(self, cfg: SubnetConfig, metrics: dict, score: Optional[float]) -> dict:
        return {"name": cfg.name, "role": self.roles.get(cfg.name, ""), "params": self.encoder.parameter_count(cfg),
                "metrics": metrics, "score": score, "trained_steps": self.trained_steps.get(cfg.name), "latency_ms": None,
                **cfg.to_dict()}

    def count_step(self, subnets: list[SubnetConfig]) -> None:
        """One optimizer step trained the maxnet and `subnets`: count it for each palette member among them."""
        for name in {self.encoder.max_config.name, *(c.name for c in subnets)} & self.trained_steps.keys():
            self.trained_steps[name] += 1

    def size_rows(self) -> Rows:
        """The rows when no validation ran: each member's name, role, config and parameters, no scores."""
        return [self.row(c, {}, None) for c in self.members]

    def provenance(self, weights: str, epoch: Optional[int], step: int, stage: int, split: str) -> dict:
        return {**self.provenance_keys, "weights": weights, "epoch": epoch, "step": int(step), "stage": int(stage), "split": split}

    def with_latency(self, rows: Rows) -> Rows:
        """`rows` with each member's latency (`kdlora.eval.latency`), when the evaluation measures it."""
        ev = self.evaluation
        if not self.measure_latency:
            return rows
        from kdlora.eval.latency import measure_latency_ms

        vocab = self.encoder.model.get_input_embeddings().weight.shape[0]
        for row in rows:
            model = self.encoder.materialize(SubnetConfig.from_dict({k: row[k] for k in ("hidden_size", "num_heads", "intermediate_size", "layers")}))
            row["latency_ms"] = measure_latency_ms(model, vocab, ev.latency_batch_size, ev.latency_seq_len)
            row["latency_batch_size"], row["latency_seq_len"] = ev.latency_batch_size, ev.latency_seq_len
        return rows

    # ---- checkpoints ----
    def history_state(self) -> list:
        return [[epoch, step, rows] for (epoch, step), rows in self.history.items()]

    def load_history(self, state: list) -> None:
        self.history = {(int(e), int(s)): rows for e, s, rows in state}

    # ---- fit end ----
    def fit_end(self, module: PaletteOwner, measure: Optional[Callable[[], Optional[Rows]]], remeasure: bool,
                report_split: str, validation_split: str, export: bool) -> None:
        """Two palettes: the selected one (the weights of the checkpoint callback's best checkpoint),
        reported as ``palette.*`` in the run's directory and exported; and the end-of-fit one as
        ``palette_final.*``. Without checkpointing the end-of-fit palette (else the last validation's)
        is the selected one.

        `measure()`: the rows of the current weights, measured now (None: only validations' rows are
        used); `remeasure`: always measure (rows reported on another split than validation ran on)."""
        trainer = module.trainer
        ckpt_cb = trainer.checkpoint_callback
        best = getattr(ckpt_cb, "best_model_path", "") if ckpt_cb is not None else ""
        log_dir = trainer.log_dir  # a collective under DDP: read it on every rank, never only on rank 0
        report_dir = None if trainer.fast_dev_run or log_dir is None else Path(log_dir)
        last = max(self.history) if self.history else None
        final_epoch = last[0] if last is not None and last[1] == module.global_step else None
        final_info = self.provenance("end of fit", final_epoch, module.global_step, module.stage, report_split)
        if remeasure:
            final_rows = measure()
        elif final_epoch is not None:  # the last validation saw the final weights
            final_rows = self.history[last]
        else:
            final_rows = measure() if measure is not None and self.history else None
        rows, info = final_rows, final_info
        if best and Path(best).is_file():
            epoch, step, stage, weights = self.restore(module, best, log_dir)
            info = self.provenance(weights, epoch, step, stage, report_split)
            rows = None if remeasure else self.history.get((epoch, step))
            if rows is None and measure is not None:  # or a checkpoint of an earlier (resumed) run
                rows = measure()
            info.update(module.selection_info(ckpt_cb, self.history.get((epoch, step))))
            log.info("palette from best checkpoint %s", best)
        elif rows is None and last is not None:  # no checkpointing: the last validation's palette
            rows, info = self.history[last], self.provenance("last validation", last[0], last[1], module.stage, validation_split)
        self.report_and_export(module, rows, info, report_dir, module.export_path if export else None, (final_rows, final_info), export)
        trainer.strategy.barrier("kdlora-export")

    @staticmethod
    def restore(module, path: str | Path, log_dir: Optional[str]) -> tuple[Optional[int], Optional[int], int, str]:
        """Load a checkpoint's weights into `module`; its (epoch, step, MLFS stage, path relative to `log_dir`)."""
        checkpoint = torch.load(path, map_location=module.device, weights_only=True)
        module.load_state_dict(checkpoint["state_dict"])
        weights = os.path.relpath(path, log_dir) if log_dir is not None else str(path)
        return checkpoint.get("epoch"), checkpoint.get("global_step"), int(checkpoint.get("kdlora_mlfs_stage", 0)), weights

    @rank_zero_only
    def report_and_export(self, module: PaletteOwner, rows: Optional[Rows], info: dict, report_dir: Optional[Path],
                          export_dir: Optional[Path], final: tuple[Optional[Rows], dict], export: bool) -> None:
        """The report into `report_dir` (the run's directory) and, with `export_dir`, every member as
        ``export_dir/<name>/`` beside a copy of the report. Every row records its provenance. `final`
        (rows, provenance): the end-of-fit palette, written as ``palette_final.*``. Without a run
        directory (fast_dev_run) the report is printed, not written, unless exported; `export`: whether
        the module exports at all (only to say so when it cannot)."""
        from kdlora.mlfs.palette import draw_palette, palette_markdown

        rows = self.with_latency([{**r, **info} for r in (rows if rows is not None else self.size_rows())])
        title = module.palette_title(info)
        final_rows, final_info = final
        if final_rows is not None:  # the same subnets: their latencies are the selected palette's
            latency = {r["name"]: {k: r[k] for k in LATENCY_KEYS if k in r} for r in rows}
            final_rows = [{**r, **final_info, **latency.get(r["name"], {})} for r in final_rows]
        if report_dir is not None:
            self.write(rows, report_dir, title)
            if final_rows is not None:
                self.write(final_rows, report_dir, module.palette_title(final_info), "palette_final", "end-of-fit palette")
        elif export_dir is None:
            print("[kdlora] palette report (not written: under fast_dev_run the run has no directory; set "
                  "model.init_args.export.dir to write it with the export):\n" + palette_markdown(rows, title))
        if any(r.get("score") is not None for r in rows):
            for logger in module.loggers:
                if isinstance(logger, TensorBoardLogger):
                    logger.experiment.add_figure("palette/final", draw_palette(rows, title), module.global_step)
        if export_dir is None:
            if export:
                print("[kdlora] not exported: under fast_dev_run the run has no directory; set model.init_args.export.dir to export")
            return
        self.export(export_dir, rows, title, module.palette_tokenizer(), type(module).__name__)
        if report_dir is None:
            print(f"[kdlora] palette report: {export_dir / 'palette.md'} {export_dir / 'palette.png'}")

    @rank_zero_only
    def write(self, rows: Rows, out_dir: Path, title: str, name: str = "palette", what: str = "palette report") -> None:
        from kdlora.mlfs.palette import write_palette_report

        paths = write_palette_report(rows, out_dir, title, name=name)
        print(f"[kdlora] {what}: {paths['md']}" + (f" {paths['png']}" if what == "palette report" else ""))

    def export(self, export_dir: Path, rows: Rows, title: str, tokenizer, module_name: str) -> None:
        """Every member as a standalone Hugging Face model ``export_dir/<name>/`` beside the palette report,
        written as one kdlora export (`kdlora.io.write_export`: atomic, never over a user's folder)."""
        from kdlora.io import write_export
        from kdlora.mlfs.palette import write_palette_report

        self.encoder.eval()

        def write(tmp: Path) -> None:
            for cfg in self.members:
                self.encoder.export_hf(cfg, tmp / cfg.name, tokenizer)
            write_palette_report(rows, tmp, title)

        write_export(export_dir, write, {"module": module_name, **self.export_meta, "kind": "palette", "members": self.names})
        for cfg in self.members:
            print(f"[kdlora] exported {cfg.name} ({self.encoder.parameter_count(cfg) / 1e6:.2f}M parameters) to {export_dir / cfg.name}")


@torch.no_grad()
def run_outside_loop(module, loaders: list, limit: int | float, eval_step: Callable[[Any, int], None]) -> None:
    """`eval_step(batch, dataloader_idx)` over `loaders` (at most `limit` batches each: a count, or a fraction
    as Lightning's limit_*_batches) in eval mode and the trainer's precision, outside any trainer loop."""
    was_training = module.training
    module.eval()
    try:
        with module.trainer.precision_plugin.forward_context():
            for idx, loader in enumerate(loaders):
                count = limit if isinstance(limit, int) else math.ceil(limit * len(loader))
                for batch in itertools.islice(loader, count):
                    eval_step(module.transfer_batch_to_device(batch, module.device, idx), idx)
    finally:
        module.train(was_training)
