"""SuperTransformer: MLFS multistage low-rank fine-tuning of a weight-sharing supernet (Algorithm 1).

Train staged LoRA adapters on one maxnet so that every sub-network of a search space works, then
evaluate and export a palette of them. The maxnet (`base`) is either the pretrained checkpoint, as in
the paper (W_sup = W_pretrain + Σ_s A_s·B_s: stage 0 *is* the LoRA fine-tuning, with a new classifier
head that trains in stage 0 only by default (`head_stages`), and storage is one shared pretrained base
plus small per-task adapters), or a fully fine-tuned teacher (`base: finetuned`):

- stage 0: adapters (A0, B0) on the maxnet, task loss only;
- stage 1: new adapters (A1, B1), earlier ones (and the head, unless head_stages="all") frozen; K subnets per step with sampled widths, full depth;
- stage 2: new adapters (A2, B2); widths and depth sampled.

Each step the maxnet runs first (task loss, distillation weight 0), then K sampled subnets with

    L_j = (1−α)·task + α·(KD(z_j, z_1) + β·Σ_l ‖U_1^{g(l)}[:, :h_j] h_j^l − U_1^{g(l)} h_1^{g(l)}‖²)

with α = `distill_weight`, against the maxnet's detached logits z_1 and features h_1 (`kdlora.losses.subnet_loss`).
KD is `kdlora.losses.logit_kd_loss` (T²·KL(softmax(z_1/T) ‖ softmax(z_j/T))), MSE to the maxnet's output for regression (STS-B). The
feature term runs only on the maxnet layers that the search space's smallest subnet keeps, through
learned projections U_1^l ∈ R^{d_low × H} owned by the maxnet, column-sliced for a subnet of width
h_j; the target side uses U detached, so U learns only by pulling subnets towards the maxnet. U keeps
orthonormal rows (`kdlora.losses.orthonormal_projection`): a free U is minimised by shrinking it to 0,
which would switch feature distillation off. ‖·‖² is the paper's squared L2 norm, summed over the d_low
projected dimensions and averaged over non-padding tokens (`kdlora.losses.feature_loss`).

Gradient scaling: subnet j's loss is multiplied by s_j = (n_1/n_j)^γ, n the number of TRAINABLE
parameters the subnet reads (slices of the current stage's adapters, plus the head when it trains in the stage;
`ElasticTransformer.parameter_count(cfg, trainable_only=True)`). One optimizer step per batch on

    ∇ [ L_1 + Σ_j s_j·L_j ] / (K + 1)

accumulated by one `manual_backward` per network, so only one network's graph is alive at a time.
The stages and this step are `kdlora.mlfs.training.MLFSTraining`, shared with the causal-LM supernet
(`kdlora.mlfs.causal_lm`); this module says what the GLUE losses and metrics are.

Optimisation: every stage's adapters exist from the start (B = 0, so they change nothing until
trained); at a stage boundary the earlier ones get requires_grad=False and a fresh AdamW with its own
warmup/decay schedule over that stage's steps is built for the new ones. Creating all adapters up
front keeps the parameter set fixed, which DDP needs (it registers parameters once, at wrap time).
"""

from __future__ import annotations

import itertools
import logging
import math
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from torch import nn

from kdlora.data.tokenizer import load_tokenizer
from kdlora.elastic.config import SubnetConfig
from kdlora.elastic.model import ElasticTransformer
from kdlora.eval.metrics import glue_score, predictions_from_logits, task_metrics
from kdlora.losses import renamed_argument, subnet_loss, task_loss
from kdlora.mlfs.training import MLFSTraining, check_mlfs_arguments
from kdlora.training.args import ExportArgs, OptimizerArgs
from kdlora.training.loading import check_tokenizer_fits, load_classifier
from kdlora.training.module import GLUEModule

log = logging.getLogger(__name__)

# Lightning warns at each step checkpoint of a manual-optimization module that it holds the weights
# after that step's optimizer step: exactly what a resume needs (the checkpoint's global_step counts it).
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization", category=UserWarning)


class SuperTransformer(MLFSTraining, GLUEModule):
    """MLFS super-transformer on a GLUE task.

    Args:
        model_name_or_path: the maxnet's checkpoint: a local export or a hub id.
        base: what that checkpoint is. "pretrained" (the paper): a pretrained model without a task
            head; stage 0 is its LoRA fine-tuning and the new head trains (`train_head` forced on); a
            checkpoint that already has a trained head for the task is refused. "finetuned": a model
            fine-tuned on the task (e.g. ``runs/<family>/<task>/fft/export``); one lacking a head is
            warned about and its head trains.
        task: GLUE task (linked from the data module by the CLI).
        stage_epochs: epochs of stages 0, 1, 2 (0 skips a stage); epochs beyond their sum continue
            the last stage that has any.
        lora_r, lora_alpha, lora_dropout, lora_targets: adapters of every stage (default Q, K, V and FFN).
        train_head: also train the pooler/classifier head (forced on when the checkpoint lacks one).
        head_stages: the stages a trainable head trains in: "first" (the first stage that runs, stage 0
            unless skipped; from stage 1 on only that stage's adapters and the feature projections learn,
            as Eq. 7 and Algorithm 1) or "all" (every stage: the head adapts to the subnets' features too).
        num_subnets: K, subnets sampled per step besides the maxnet.
        sandwich: always include the stage's smallest subnet among the K.
        per_layer: sample heads and FFN width per layer.
        sample_palette: the first of the K slots left after the sandwich takes the palette members in
            turn, so every member is trained directly (`kdlora.mlfs.search_space.SubnetSampler`); further
            slots are random. Off: every slot random, as the paper.
        distill_weight: α, the weight of a subnet's distillation terms (KD + β·features); its task loss
            gets 1 − distill_weight (paper: 0.9).
        beta: weight of the feature term inside the distillation terms (paper: 0.1, on the squared L2
            norm summed over the d_low projected dimensions).
        gamma, temperature: gradient-scaling exponent, KD temperature.
        feature_dim: d_low, rows of the (orthonormal-row) feature projections U.
        feature_normalization: "none" (the paper's squared L2 norm) or "relative" (each token's squared error
            divided by the maxnet feature's squared norm; `kdlora.losses.feature_loss`).
        search_space: dict with optional hidden_sizes, num_heads, intermediate_sizes, depths, fractions, or a
            preset: "paper" (or {preset: paper, ...}), a minnet of ≈ 0.41 of the maxnet's parameters (README).
        palette: evaluation subnets: "max", "min", fractions, or dicts (see `kdlora.mlfs.search_space.palette_members`).
        sampler_seed: seed of the subnet sampler (default: the run seed, ``PL_GLOBAL_SEED``).
        learning_rate, weight_decay, warmup_ratio: AdamW per stage, linear warmup/decay within each stage.
        gradient_clip: max gradient norm (0 disables).
        importance_reorder, importance_batches: rank heads/FFN neurons on training batches and permute
            weights so the leading slices are the most important. The ranking needs a maxnet that does
            the task: with `base: finetuned` it runs before training; with `base: pretrained` (whose head
            is random before stage 0) when the first subnet stage begins, on the stage-0 maxnet (stage-0
            adapters permuted with their weights; the optimizer of the new stage is built afterwards).
        importance_hidden: with importance_reorder, rank and permute the hidden (residual-stream)
            dimensions too (see `benchmarks/results/slice_start_*.md` for what each ordering buys).
        stage_palettes: with a held-out validation split, also measure the palette on dev at the end of
            each stage (``palette_stage<N>.{md,json,png}`` in the run's directory): what every stage did to
            every member. Reported only: selection still uses the held-out split.
        measure_latency, latency_batch_size, latency_seq_len: time palette members at fit end.
        export, export_dir: write every palette member as a Hugging Face directory at fit end.
        alpha: the old name of distill_weight; setting it is an error.
    """

    # What to evaluate and write, not what was trained: `train.py validate --ckpt_path ...` may change them.
    TEST_ON_DEV_AFTER_HELD_OUT_FIT = False  # on_fit_end already writes the dev palette
    EVALUATION_ARGS = ("palette", "measure_latency", "latency_batch_size", "latency_seq_len", "export", "export_dir")

    def __init__(
        self,
        model_name_or_path: str = "bert-base-uncased",
        task: str = "mrpc",
        base: str = "finetuned",  # "pretrained" | "finetuned"; a str so a typo is one clear error, not a parser dump
        stage_epochs: list[int] = [1, 1, 1],
        lora_r: int = 8,
        lora_alpha: int = 16,
        lora_dropout: float = 0.0,
        lora_targets: list[str] = ["query", "key", "value", "intermediate", "output"],
        train_head: bool = False,
        head_stages: str = "first",
        num_subnets: int = 2,
        sandwich: bool = True,
        per_layer: bool = False,
        sample_palette: bool = False,
        distill_weight: float = 0.9,
        beta: float = 0.1,
        gamma: float = 2.0,
        temperature: float = 1.0,
        feature_dim: int = 128,
        feature_normalization: str = "none",
        search_space: Optional[dict[str, Any] | str] = None,
        palette: Optional[list[Any]] = None,
        sampler_seed: Optional[int] = None,
        learning_rate: float = 1e-3,
        weight_decay: float = 0.01,
        warmup_ratio: float = 0.06,
        gradient_clip: float = 1.0,
        importance_reorder: bool = False,
        importance_batches: int = 8,
        importance_hidden: bool = False,
        stage_palettes: bool = False,
        measure_latency: bool = True,
        latency_batch_size: int = 1,
        latency_seq_len: int = 128,
        export: bool = True,
        export_dir: Optional[str] = None,
        alpha: Optional[float] = None,
    ) -> None:
        renamed_argument("alpha", "distill_weight", "the weight of a subnet's distillation terms; its task loss gets 1 − distill_weight", alpha)
        super().__init__(task, OptimizerArgs(learning_rate, weight_decay, warmup_ratio), ExportArgs(export, export_dir))
        sampler_seed = check_mlfs_arguments(stage_epochs, distill_weight, beta, gamma, temperature, feature_dim,
                                            gradient_clip, sampler_seed, feature_normalization, head_stages)
        if base not in ("pretrained", "finetuned"):
            raise ValueError(f"base must be 'pretrained' or 'finetuned', got {base!r}")
        self.save_hyperparameters(ignore=["alpha"])

        model, new_weights = load_classifier(model_name_or_path, self.spec.num_labels, self.spec.is_regression)
        check_tokenizer_fits(model, load_tokenizer(model_name_or_path), model_name_or_path, model_name_or_path)
        if base == "pretrained":
            if not new_weights:
                raise ValueError(f"base='pretrained' but {model_name_or_path!r} already has a trained classifier head for "
                                 f"{self.spec.name} (it is a fine-tuned model): pass base='finetuned' to start from it, "
                                 "or a pretrained checkpoint such as bert-base-uncased")
            train_head = True  # the pretrained model has no head for the task: stage 0 trains it with the adapters
        elif new_weights and not train_head:
            log.warning("base='finetuned' but %s lacks %s (is it a pretrained checkpoint? then pass base='pretrained'): "
                        "training the head too", model_name_or_path, ", ".join(new_weights))
            train_head = True
        self.newly_initialised = new_weights
        self.init_mlfs(ElasticTransformer(model, lora_r, lora_alpha, lora_dropout, tuple(lora_targets), train_head=train_head),
                       search_space=search_space, num_subnets=num_subnets, sandwich=sandwich, per_layer=per_layer,
                       sampler_seed=sampler_seed, palette=palette, feature_dim=feature_dim, head_stages=head_stages,
                       sample_palette=sample_palette)
        self.palette_metrics = nn.ModuleList([
            nn.ModuleList([task_metrics(self.spec) for _ in range(max(len(self.spec.validation), 1))]) for _ in self.palette
        ])

    # ---- stages ----
    def reorder_after_stage0(self) -> bool:
        """Importance is ranked on the stage-0 maxnet when the base is pretrained: its head is random before it."""
        return self.hparams.base == "pretrained" and int(self.hparams.stage_epochs[0]) > 0

    def on_train_epoch_end(self) -> None:
        last_epoch = self.trainer.max_epochs is not None and self.current_epoch + 1 >= self.trainer.max_epochs
        stage_ends = last_epoch or self.stage_for_epoch(self.current_epoch + 1) != self.stage
        if not (self.hparams.stage_palettes and stage_ends and self._dev_is_held_out()) or self.trainer.fast_dev_run:
            return
        rows = self.evaluate_palette_on_dev()
        log_dir = self.trainer.log_dir  # a collective under DDP: every rank reads it
        if log_dir is not None:
            info = self._provenance(f"end of stage {self.stage}", self.current_epoch, self.global_step, self.stage, "dev")
            self._write_palette(rows, info, Path(log_dir), f"palette_stage{self.stage}")

    # ---- training ----
    def encoder_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # What the maxnet's own forward takes (no segment ids for RoBERTa-style type_vocab_size 1).
        return self.model_inputs(batch, self.encoder.model)

    def logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.encoder(**self.encoder_inputs(batch)).logits

    def maxnet_loss(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return task_loss(logits, batch["labels"], self.spec.is_regression)

    def subnet_objective(self, logits: torch.Tensor, max_logits: torch.Tensor, batch: dict[str, torch.Tensor],
                         feature_losses: list[torch.Tensor]) -> tuple[torch.Tensor, dict]:
        return subnet_loss(logits, max_logits, batch["labels"], self.spec.is_regression, self.hparams.distill_weight,
                           self.hparams.temperature, feature_losses, self.hparams.beta)

    # ---- palette evaluation ----
    def _eval_step(self, stage: str, batch, dataloader_idx: int = 0) -> None:
        for i, _, logits in self.palette_logits(batch):
            self.palette_metrics[i][dataloader_idx].update(predictions_from_logits(logits, self.spec.is_regression), batch["labels"])

    def _palette_rows(self, stage: str) -> list[dict]:
        """Compute (and reset) every palette member's metrics: one report row per member evaluated."""
        suffixes = self._eval_suffixes(stage)
        rows = []
        for cfg, metrics in zip(self.palette, self.palette_metrics):
            metric_values = self.compute_eval_metrics(metrics, suffixes)
            if metric_values:
                rows.append({"name": cfg.name, "role": self.palette_roles.get(cfg.name, ""), "params": self.encoder.parameter_count(cfg),
                             "metrics": metric_values, "score": glue_score(metric_values), "latency_ms": None, **cfg.to_dict()})
        return rows

    def _log_eval(self, stage: str) -> None:
        rows = self._palette_rows(stage)
        if not rows:
            return
        values = {}
        for row in rows:
            for k, v in row["metrics"].items():
                values[f"{stage}/{row['name']}/{k}"] = v
            values[f"{stage}/{row['name']}/score"] = row["score"]
            values[f"{stage}/{row['name']}/params"] = float(row["params"])
            if row["name"] == self.encoder.max_config.name:
                values.update({f"{stage}/{k}": v for k, v in row["metrics"].items()})
                values[f"{stage}/score"] = row["score"]
        values[f"{stage}/palette_score"] = sum(r["score"] for r in rows) / len(rows)
        headline = {k: values.pop(k) for k in (f"{stage}/score", f"{stage}/palette_score")}
        self.log_dict(values, sync_dist=False)
        self.log_dict(headline, prog_bar=True, sync_dist=False)
        if stage == "val" and not self.trainer.sanity_checking:
            self.palette_history[(self.current_epoch, self.global_step)] = rows
            self._log_palette_figure(rows, f"{stage}/palette")
        if stage == "test":
            self.test_rows = rows

    @rank_zero_only
    def _log_palette_figure(self, rows: list[dict], tag: str) -> None:
        from kdlora.mlfs.palette import draw_palette

        for logger in self.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_figure(tag, draw_palette(rows, f"{self.spec.name} palette"), self.global_step)

    # ---- fit end: report and export ----
    def _dev_is_held_out(self) -> bool:
        """Whether validation (and checkpoint selection) ran on a held-out part of train, not on dev."""
        dm = getattr(self.trainer, "datamodule", None)
        return float(getattr(dm, "holdout_fraction", 0.0) or 0.0) > 0

    @torch.no_grad()
    def evaluate_palette_on_dev(self) -> list[dict]:
        """The palette rows of the current weights on dev (the test split), outside any trainer loop."""
        dm = self.trainer.datamodule
        dm.setup("test")
        loaders = dm.test_dataloader()
        loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
        was_training = self.training
        self.eval()
        try:
            with self.trainer.precision_plugin.forward_context():
                for idx, loader in enumerate(loaders):
                    limit = self.trainer.limit_test_batches  # e.g. 1 under fast_dev_run
                    count = limit if isinstance(limit, int) else math.ceil(limit * len(loader))
                    for batch in itertools.islice(loader, count):
                        self._eval_step("test", self.transfer_batch_to_device(batch, self.device, idx), idx)
        finally:
            self.train(was_training)
        return self._palette_rows("test")

    def _provenance(self, weights: str, epoch: Optional[int], step: int, stage: int, split: str) -> dict:
        return {"base": self.hparams.base, "weights": weights, "epoch": epoch, "step": int(step), "stage": int(stage), "split": split}

    def on_fit_end(self) -> None:
        """Two palettes: the selected one (the best `val/palette_score` checkpoint, exported) and the
        final one (the weights at the end of fit, i.e. after stage 2: the paper's protocol). With a
        held-out validation split (`data.holdout_fraction` > 0) both are measured on dev here; else
        validation ran on dev and each is the palette of its last validation."""
        ckpt_cb = self.trainer.checkpoint_callback
        best = getattr(ckpt_cb, "best_model_path", "") if ckpt_cb is not None else ""
        # trainer.log_dir is a collective under DDP: read it on every rank, never only on rank 0.
        log_dir = self.trainer.log_dir
        report_dir = None if self.trainer.fast_dev_run or log_dir is None else Path(log_dir)
        held_out = self._dev_is_held_out()
        val_split = "holdout" if held_out else "dev"
        last = max(self.palette_history) if self.palette_history else None
        final_epoch = last[0] if last is not None and last[1] == self.global_step else None
        final_info = self._provenance("end of fit", final_epoch, self.global_step, self.stage, "dev" if held_out else val_split)
        if held_out:
            final_rows = self.evaluate_palette_on_dev()
        else:  # the last validation, if it saw these weights
            final_rows = self.palette_history[last] if final_epoch is not None else None
        rows, info = final_rows, final_info
        if best and Path(best).is_file():
            epoch, step, stage, weights = self.restore_checkpoint(best, log_dir)
            info = self._provenance(weights, epoch, step, stage, "dev" if held_out else val_split)
            rows = self.evaluate_palette_on_dev() if held_out else self.palette_history.get((epoch, step))
            selection = self.palette_history.get((epoch, step))
            if selection:
                info["selected_on"] = val_split
                info["selection_palette_score"] = sum(r["score"] for r in selection) / len(selection)
            log.info("palette from best checkpoint %s", best)
        elif rows is None and last is not None:  # no checkpointing: the last validation's palette
            rows, info = self.palette_history[last], self._provenance("last validation", last[0], last[1], self.stage, val_split)
        self._report_and_export(rows, info, report_dir, self.export_path if self.hparams.export else None,
                                final=(final_rows, final_info))
        self.trainer.strategy.barrier("kdlora-export")

    def on_test_end(self) -> None:
        """`train.py test --ckpt_path ...`: the palette of those weights on dev, as palette_test.{json,md,png}."""
        log_dir = self.trainer.log_dir
        rows = getattr(self, "test_rows", None)
        if rows and not self.trainer.fast_dev_run and log_dir is not None:
            ckpt = self.trainer.ckpt_path
            info = self._provenance(str(ckpt) if ckpt else "the module's weights", None, self.global_step, self.stage, "dev")
            self._write_palette(rows, info, Path(log_dir), "palette_test")

    def _palette_title(self, info: dict) -> str:
        where = f"epoch {info['epoch']}, " if info.get("epoch") is not None else ""
        selected = (f", selected on {info['selected_on']} (palette score {info['selection_palette_score']:.4f})"
                    if "selected_on" in info else "")
        return (f"{self.spec.name}: MLFS palette of {self.hparams.model_name_or_path} ({info['base']} base); weights: "
                f"{info['weights']} ({where}step {info['step']}, stage {info['stage']}){selected}; measured on {info['split']}")

    @rank_zero_only
    def _write_palette(self, rows: list[dict], info: dict, out_dir: Path, name: str) -> None:
        from kdlora.mlfs.palette import write_palette_report

        paths = write_palette_report([{**r, **info} for r in rows], out_dir, self._palette_title(info), name=name)
        print(f"[kdlora] palette report: {paths['md']} {paths['png']}")

    @rank_zero_only
    def _report_and_export(self, rows: Optional[list[dict]], info: dict, report_dir: Optional[Path], export_dir: Optional[Path],
                           final: tuple[Optional[list[dict]], dict] = (None, {})) -> None:
        """The palette report into `report_dir` (the run's directory) and, with `export_dir`, every member
        as ``export_dir/<name>/`` beside a copy of the report, written as one kdlora export (replaced whole).
        Every row records the base, the weights (checkpoint, epoch, step, stage) and the split it was
        measured on. `final` (rows, provenance): the end-of-fit palette, written as ``palette_final.*``.
        Without a run directory (fast_dev_run) the report is printed, not written, unless exported."""
        from kdlora.eval.latency import measure_latency_ms
        from kdlora.mlfs.palette import draw_palette, palette_markdown, write_palette_report

        def with_latency(rows: Optional[list[dict]], info: dict) -> list[dict]:
            rows = [{**r, **info} for r in (rows if rows is not None else self.size_rows())]  # None: no validation ran
            if self.hparams.measure_latency:
                vocab = self.encoder.model.get_input_embeddings().weight.shape[0]
                for row in rows:
                    model = self.encoder.materialize(SubnetConfig.from_dict({k: row[k] for k in ("hidden_size", "num_heads", "intermediate_size", "layers")}))
                    row["latency_ms"] = measure_latency_ms(model, vocab, self.hparams.latency_batch_size, self.hparams.latency_seq_len)
                    row["latency_batch_size"], row["latency_seq_len"] = self.hparams.latency_batch_size, self.hparams.latency_seq_len
            return rows

        rows = with_latency(rows, info)
        title = self._palette_title(info)
        final_rows, final_info = final
        if final_rows is not None:  # the same subnets: their latencies are the selected palette's
            latency = {r["name"]: {k: r[k] for k in ("latency_ms", "latency_batch_size", "latency_seq_len") if k in r} for r in rows}
            final_rows = [{**r, **final_info, **latency.get(r["name"], {})} for r in final_rows]
        if report_dir is not None:
            paths = write_palette_report(rows, report_dir, title)
            print(f"[kdlora] palette report: {paths['md']} {paths['png']}")
            if final_rows is not None:
                paths = write_palette_report(final_rows, report_dir, self._palette_title(final_info), name="palette_final")
                print(f"[kdlora] end-of-fit palette: {paths['md']}")
        elif export_dir is None:
            print("[kdlora] palette report (not written: under fast_dev_run the run has no directory; set "
                  "model.init_args.export_dir to write it with the export):\n" + palette_markdown(rows, title))
        for logger in self.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_figure("palette/final", draw_palette(rows, title), self.global_step)
        if export_dir is None:
            if self.hparams.export:
                print("[kdlora] not exported: under fast_dev_run the run has no directory; set model.init_args.export_dir to export")
            return
        self.export_palette(export_dir, rows, title, load_tokenizer(self.tokenizer_source()), {"task": self.spec.name})
        if report_dir is None:
            print(f"[kdlora] palette report: {export_dir / 'palette.md'} {export_dir / 'palette.png'}")

    def exported_model(self) -> nn.Module:
        return self.encoder.materialize(self.encoder.max_config)
