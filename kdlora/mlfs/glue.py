"""SuperTransformer: MLFS multistage low-rank fine-tuning of a weight-sharing supernet (Algorithm 1).

Train staged LoRA adapters on one maxnet so that every sub-network of a search space works, then
evaluate and export a palette of them. The maxnet (`base`) is either the pretrained checkpoint, as in
the paper (W_sup = W_pretrain + Σ_s A_s·B_s: stage 0 *is* the LoRA fine-tuning, with a new classifier
head that trains in stage 0 only by default (`stages.head_stages`), and storage is one shared pretrained base
plus small per-task adapters), or a fully fine-tuned teacher (`base: finetuned`):

- stage 0: adapters (A0, B0) on the maxnet, task loss only;
- stage 1: new adapters (A1, B1), earlier ones (and the head, unless stages.head_stages is "all") frozen; K subnets per step with sampled widths, full depth;
- stage 2: new adapters (A2, B2); widths and depth sampled.

Each step the maxnet runs first (task loss, distillation weight 0), then K sampled subnets with

    L_j = (1−α)·task + α·(KD(z_j, z_1) + β·Σ_l ‖U_1^{g(l)}[:, :h_j] h_j^l − U_1^{g(l)} h_1^{g(l)}‖²)

with α = `distillation.distill_weight` and β = `distillation.feature_weight`, against the maxnet's detached logits z_1 and features h_1 (`kdlora.losses.subnet_loss`).
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
The stages and this step are `kdlora.mlfs.training.StageSchedule` and `MLFSStep`, and the palette's
selection, report and export `kdlora.mlfs.palette_run.PaletteRun`, shared with the causal-LM supernet
(`kdlora.mlfs.causal_lm`); this module says what the GLUE losses and metrics are.

Optimisation: every stage's adapters exist from the start (B = 0, so they change nothing until
trained); at a stage boundary the earlier ones get requires_grad=False and a fresh AdamW with its own
warmup/decay schedule over that stage's steps is built for the new ones. Creating all adapters up
front keeps the parameter set fixed, which DDP needs (it registers parameters once, at wrap time).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Optional

import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from torch import nn

from kdlora.data.tokenizer import load_tokenizer
from kdlora.elastic.model import ElasticTransformer
from kdlora.eval.metrics import glue_score, predictions_from_logits, task_metrics
from kdlora.losses import subnet_loss, task_loss
from kdlora.mlfs.args import (EvaluationArgs, ImportanceArgs, MLFSDistillationArgs, MLFSLoRAArgs, MLFSOptimizerArgs, SamplingArgs,
                             StageArgs, mlfs_gradient_clip)
from kdlora.mlfs.palette_run import PaletteRun, run_outside_loop
from kdlora.mlfs.search_space import SearchSpace
from kdlora.mlfs.training import MLFSModule, StageSchedule
from kdlora.training.args import ExportArgs, as_args, save_plain_hyperparameters
from kdlora.training.loading import check_tokenizer_fits, load_classifier
from kdlora.training.module import GLUEModule

log = logging.getLogger(__name__)

# Lightning warns at each step checkpoint of a manual-optimization module that it holds the weights
# after that step's optimizer step: exactly what a resume needs (the checkpoint's global_step counts it).
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization", category=UserWarning)

class SuperTransformer(MLFSModule, GLUEModule):
    """MLFS super-transformer on a GLUE task.

    Args:
        model_name_or_path: the maxnet's checkpoint: a local export or a hub id.
        task: GLUE task (linked from the data module by the CLI).
        base: what that checkpoint is. "pretrained" (the paper): a pretrained model without a task
            head; stage 0 is its LoRA fine-tuning and the new head trains (`train_head` forced on); a
            checkpoint that already has a trained head for the task is refused. "finetuned": a model
            fine-tuned on the task (e.g. ``runs/<family>/<task>/fft/export``); one lacking a head is
            warned about and its head trains.
        train_head: also train the pooler/classifier head (forced on when the checkpoint lacks one).
        stages: epochs of stages 0, 1, 2 and the stages a trainable head trains in (`StageArgs`).
        lora: adapters of every stage (default Q, K, V and FFN, no dropout).
        sampling: K subnets per step, the sandwich rule, per-layer sampling, the search space (or the
            "paper" preset, a minnet of ≈ 0.41 of the maxnet's parameters), `sample_palette` (the first
            free slot takes the palette members in turn; off, as the paper) and the sampler's seed (`SamplingArgs`).
        distillation: a subnet's loss weights: distill_weight α (paper 0.9), feature_weight β (paper 0.1),
            the gradient-scaling exponent γ, the KD temperature, d_low and the feature normalization
            (`MLFSDistillationArgs`).
        optimizer: AdamW per stage, linear warmup/decay within each stage, gradient_clip the max norm (0 or None: off).
        importance: rank heads/FFN neurons (and with `hidden` the hidden dimensions) on training batches and
            permute weights so the leading slices are the most important. The ranking needs a maxnet that
            does the task: with `base: finetuned` it runs before training; with `base: pretrained` (whose
            head is random before stage 0) when the first subnet stage begins, on the stage-0 maxnet.
        evaluation: the palette `members` ("max", "min", fractions or dicts), member latency at fit end,
            and `stage_palettes`: with a held-out validation split, also the palette on dev at the end of each
            stage (``palette_stage<N>.{md,json,png}``; reported only, selection uses the held-out split).
        export: write every palette member as a Hugging Face directory at fit end.
    """

    # What to evaluate and write, not what was trained: `train.py validate --ckpt_path ...` may change them.
    TEST_ON_DEV_AFTER_HELD_OUT_FIT = False  # on_fit_end already writes the dev palette
    EVALUATION_ARGS = ("evaluation", "export")

    def __init__(
        self,
        model_name_or_path: str = "bert-base-uncased",
        task: str = "mrpc",
        base: str = "finetuned",  # "pretrained" | "finetuned"; a str so a typo is one clear error, not a parser dump
        train_head: bool = False,
        stages: StageArgs = StageArgs(),
        lora: MLFSLoRAArgs = MLFSLoRAArgs(),
        sampling: SamplingArgs = SamplingArgs(),
        distillation: MLFSDistillationArgs = MLFSDistillationArgs(),
        optimizer: MLFSOptimizerArgs = MLFSOptimizerArgs(),
        importance: ImportanceArgs = ImportanceArgs(),
        evaluation: EvaluationArgs = EvaluationArgs(),
        export: ExportArgs = ExportArgs(),
    ) -> None:
        stages, lora, sampling = as_args(StageArgs, stages), as_args(MLFSLoRAArgs, lora), as_args(SamplingArgs, sampling)
        distillation, optimizer = as_args(MLFSDistillationArgs, distillation), as_args(MLFSOptimizerArgs, optimizer)
        importance, evaluation, export = as_args(ImportanceArgs, importance), as_args(EvaluationArgs, evaluation), as_args(ExportArgs, export)
        super().__init__(task, optimizer, export)
        if base not in ("pretrained", "finetuned"):
            raise ValueError(f"base must be 'pretrained' or 'finetuned', got {base!r}")
        self.gradient_clip = mlfs_gradient_clip(optimizer.gradient_clip)
        save_plain_hyperparameters(self, stages=stages, lora=lora, sampling=sampling, distillation=distillation, optimizer=optimizer,
                                   importance=importance, evaluation=evaluation, export=export)
        self.distillation, self.evaluation = distillation, evaluation

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
        self.automatic_optimization = False  # K+1 backward passes and one optimizer step per batch: done by hand
        self.encoder = ElasticTransformer(model, lora.r, lora.alpha, lora.dropout, tuple(lora.targets or MLFSLoRAArgs().targets),
                                          train_head=train_head)
        self.schedule = StageSchedule(self.encoder, stages)
        self.encoder.train()  # transformers returns eval-mode models; dropout must be on in training
        space = SearchSpace.build(self.encoder.max_config, sampling.search_space, count=self.encoder.parameter_count)
        self.palette_run = PaletteRun(self.encoder, space, evaluation, measure_latency_default=True, provenance={"base": base},
                                      export_meta={"task": self.spec.name})
        self.compose_mlfs(space, sampling, distillation, importance, sample_palette_default=False,
                          after_stage0=base == "pretrained" and stages.epochs[0] > 0)
        self.palette_metrics = nn.ModuleList([
            nn.ModuleList([task_metrics(self.spec) for _ in range(max(len(self.spec.validation), 1))]) for _ in self.palette_run.members
        ])

    def on_train_epoch_end(self) -> None:
        last_epoch = self.trainer.max_epochs is not None and self.current_epoch + 1 >= self.trainer.max_epochs
        stage_ends = last_epoch or self.schedule.stage_for_epoch(self.current_epoch + 1) != self.stage
        if not (self.evaluation.stage_palettes and stage_ends and self._dev_is_held_out()) or self.trainer.fast_dev_run:
            return
        rows = self.evaluate_palette_on_dev()
        log_dir = self.trainer.log_dir  # a collective under DDP: every rank reads it
        if log_dir is not None:
            info = self.palette_run.provenance(f"end of stage {self.stage}", self.current_epoch, self.global_step, self.stage, "dev")
            self.palette_run.write([{**r, **info} for r in rows], Path(log_dir), self.palette_title(info), f"palette_stage{self.stage}")

    # ---- the GLUE losses (`kdlora.mlfs.training.MLFSTask`) ----
    def encoder_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # What the maxnet's own forward takes (no segment ids for RoBERTa-style type_vocab_size 1).
        return self.model_inputs(batch, self.encoder.model)

    def logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.encoder(**self.encoder_inputs(batch)).logits

    def maxnet_loss(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return task_loss(logits, batch["labels"], self.spec.is_regression)

    def subnet_objective(self, logits: torch.Tensor, max_logits: torch.Tensor, batch: dict[str, torch.Tensor],
                         feature_losses: list[torch.Tensor]) -> tuple[torch.Tensor, dict]:
        d = self.distillation
        return subnet_loss(logits, max_logits, batch["labels"], self.spec.is_regression, d.distill_weight,
                           d.temperature, feature_losses, d.feature_weight)

    # ---- palette evaluation ----
    def _eval_step(self, stage: str, batch, dataloader_idx: int = 0) -> None:
        for i, _, logits in self.palette_run.logits(self.encoder_inputs(batch)):
            self.palette_metrics[i][dataloader_idx].update(predictions_from_logits(logits, self.spec.is_regression), batch["labels"])

    def _palette_rows(self, stage: str) -> list[dict]:
        """Compute (and reset) every palette member's metrics: one report row per member evaluated."""
        suffixes = self._eval_suffixes(stage)
        rows = []
        for cfg, metrics in zip(self.palette_run.members, self.palette_metrics):
            metric_values = self.compute_eval_metrics(metrics, suffixes)
            if metric_values:
                rows.append(self.palette_run.row(cfg, metric_values, glue_score(metric_values)))
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
            self.palette_run.history[(self.current_epoch, self.global_step)] = rows
            self._log_palette_figure(rows, f"{stage}/palette")
        if stage == "test":
            self.test_rows = rows

    @rank_zero_only
    def _log_palette_figure(self, rows: list[dict], tag: str) -> None:
        from kdlora.mlfs.palette import draw_palette

        for logger in self.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_figure(tag, draw_palette(rows, f"{self.spec.name} palette"), self.global_step)

    def _dev_is_held_out(self) -> bool:
        """Whether validation (and checkpoint selection) ran on a held-out part of train, not on dev."""
        dm = getattr(self.trainer, "datamodule", None)
        return float(getattr(dm, "holdout_fraction", 0.0) or 0.0) > 0

    def evaluate_palette_on_dev(self) -> list[dict]:
        """The palette rows of the current weights on dev (the test split), outside any trainer loop."""
        dm = self.trainer.datamodule
        dm.setup("test")
        loaders = dm.test_dataloader()
        loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
        run_outside_loop(self, loaders, self.trainer.limit_test_batches,  # e.g. 1 under fast_dev_run
                         lambda batch, idx: self._eval_step("test", batch, idx))
        return self._palette_rows("test")

    # ---- fit end: selection, report and export (`kdlora.mlfs.palette_run.PaletteOwner`) ----
    def on_fit_end(self) -> None:
        """Two palettes: the selected one (the best `val/palette_score` checkpoint, exported) and the
        final one (the weights at the end of fit, i.e. after stage 2: the paper's protocol). With a
        held-out validation split (`data.holdout_fraction` > 0) both are measured on dev here; else
        validation ran on dev and each is the palette of its last validation."""
        held_out = self._dev_is_held_out()
        self.palette_run.fit_end(self, self.evaluate_palette_on_dev if held_out else None, remeasure=held_out,
                                 report_split="dev", validation_split="holdout" if held_out else "dev",
                                 export=self.export_args.enabled)

    def selection_info(self, checkpoint_callback, selection_rows: Optional[list[dict]]) -> dict:
        if not selection_rows:
            return {}
        return {"selected_on": "holdout" if self._dev_is_held_out() else "dev",
                "selection_palette_score": sum(r["score"] for r in selection_rows) / len(selection_rows)}

    def palette_title(self, info: dict) -> str:
        where = f"epoch {info['epoch']}, " if info.get("epoch") is not None else ""
        selected = (f", selected on {info['selected_on']} (palette score {info['selection_palette_score']:.4f})"
                    if "selected_on" in info else "")
        return (f"{self.spec.name}: MLFS palette of {self.hparams.model_name_or_path} ({info['base']} base); weights: "
                f"{info['weights']} ({where}step {info['step']}, stage {info['stage']}){selected}; measured on {info['split']}")

    def palette_tokenizer(self):
        return load_tokenizer(self.tokenizer_source())

    def on_test_end(self) -> None:
        """`train.py test --ckpt_path ...`: the palette of those weights on dev, as palette_test.{json,md,png}."""
        log_dir = self.trainer.log_dir
        rows = getattr(self, "test_rows", None)
        if rows and not self.trainer.fast_dev_run and log_dir is not None:
            ckpt = self.trainer.ckpt_path
            info = self.palette_run.provenance(str(ckpt) if ckpt else "the module's weights", None, self.global_step, self.stage, "dev")
            self.palette_run.write([{**r, **info} for r in rows], Path(log_dir), self.palette_title(info), "palette_test")

    def exported_model(self) -> nn.Module:
        return self.encoder.materialize(self.encoder.max_config)
