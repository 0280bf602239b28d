"""CausalLMSuperTransformer: MLFS on a decoder (Llama, GPT-2): one causal LM, every sub-network a causal LM.

The stages, the step and the palette's selection, report and export are the objects of
`kdlora.mlfs.training` and `kdlora.mlfs.palette_run`, as for the GLUE `SuperTransformer`; only the
losses and what is measured differ. Per step the maxnet runs first on the next-token loss, then K sampled subnets on

    L_j = (1−α)·LM(z_j) + α·(KD(z_j, z_1) + β·Σ_l ‖U^l[:, :h_j] h_j^l − U^l h_1^l‖²)

(`kdlora.losses.decoder_subnet_loss`, α = `distillation.distill_weight`, β = `distillation.feature_weight`): LM is next-token cross-entropy (the shift happens in the
loss; labels of -100 and padding are not predicted), KD the token-level T²·KL from the maxnet's
detached logits averaged over real (non-padding) positions, the feature term the one of the
encoders (maxnet-owned orthonormal projections, on the layers the smallest subnet keeps). Subnet j's
gradient is scaled by (n_1/n_j)^γ.

Batches: ``{"input_ids": [B, T], "attention_mask": [B, T], "labels": [B, T]}``, labels equal to
input_ids with -100 at padding.

Validation, per palette member: ``val/<subnet>/loss`` and ``val/<subnet>/perplexity`` (exp of the
token-mean loss over the whole split, `kdlora.eval.perplexity.TokenMeanLoss`), ``val/loss``,
``val/perplexity`` for the maxnet and ``val/palette_loss``, the members' mean loss. At fit end the
palette of the best checkpoint (selected on the held-out split by the checkpoint monitor) and the
end-of-fit palette are reported (params, val loss, perplexity) and, with `export.enabled`, every member of the
selected weights is written as a standalone Hugging Face causal LM that `generate()`s.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch
from torch import nn

from kdlora.data.tokenizer import load_tokenizer
from kdlora.elastic.model import ElasticTransformer
from kdlora.eval.perplexity import TokenMeanLoss
from kdlora.losses import causal_lm_loss, decoder_subnet_loss, lm_token_losses
from kdlora.mlfs.args import (EvaluationArgs, ImportanceArgs, MLFSDistillationArgs, MLFSLoRAArgs, MLFSOptimizerArgs, SamplingArgs,
                             StageArgs, mlfs_gradient_clip)
from kdlora.mlfs.palette_run import PaletteRun, run_outside_loop
from kdlora.mlfs.search_space import SearchSpace
from kdlora.mlfs.training import MLFSModule, StageSchedule
from kdlora.training.args import ExportArgs, as_args, save_plain_hyperparameters

log = logging.getLogger(__name__)


def load_causal_lm(model_name_or_path: Optional[str], model_config: Optional[dict[str, Any]]):
    """`AutoModelForCausalLM.from_pretrained(model_name_or_path)`, or a new random model of `model_config`
    (a Hugging Face config as a dict with its ``model_type``; for tests and from-scratch runs)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if (model_name_or_path is None) == (model_config is None):
        raise ValueError("give exactly one of model_name_or_path (a causal LM checkpoint) and model_config "
                         "(a Hugging Face config dict with its model_type, for a new random model)")
    if model_name_or_path is not None:
        return AutoModelForCausalLM.from_pretrained(model_name_or_path)
    if not isinstance(model_config, dict) or "model_type" not in model_config:
        raise ValueError(f"model_config must be a dict with a model_type (e.g. llama, gpt2), got {model_config!r}")
    config = dict(model_config)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(config.pop("model_type"), **config))


class CausalLMSuperTransformer(MLFSModule):
    """MLFS super-transformer of a causal LM (`train.py fit --config configs/decoder/...`, see `kdlora.cli`).

    Args:
        model_name_or_path: the maxnet's checkpoint (`AutoModelForCausalLM`), or
        model_config: a Hugging Face config dict (with ``model_type``) for a new random maxnet.
        stages: epochs of stages 0 (the maxnet's LoRA fine-tuning), 1 (widths sampled) and 2 (widths
            and depth sampled); 0 skips a stage.
        lora: adapters of every stage (roles or family names).
        sampling: as `SuperTransformer`, but `sample_palette` on by default (our choice; the paper samples at
            random and has no decoders): a decoder's palette is what it exports, and a member drawn at random
            from a wide space is rarely trained directly (about 1 step in 17 for SmolLM2's 24-layer member at
            K = 2). Needs num_subnets >= 2 beside the sandwich's smallest.
        distillation: distill_weight α, the weight of a subnet's distillation terms (token KD + feature_weight·features;
            its LM loss gets 1 − α), the gradient-scaling exponent, KD temperature, d_low and the feature normalization:
            "none" (the paper's squared L2 norm; a pretrained decoder's residual stream makes it ~1e6 times the KD
            term) or "relative" (divided by the maxnet feature's squared norm, `kdlora.losses.feature_loss`).
        optimizer: AdamW per stage with linear warmup/decay, gradient_clip the max norm.
        importance: before training, rank heads (grouped-query attention: whole key/value groups), FFN neurons
            (and with `hidden` the hidden dimensions) on `batches` training batches' next-token loss and permute
            the weights so every slice keeps the most important ones (the maxnet's function is unchanged).
        evaluation: the palette `members` (as `SuperTransformer`); member latency at fit end, off by default.
        export: write every palette member as a causal LM at fit end (see `GLUEModule`).
    """

    # What to evaluate and write, not what was trained: `train.py validate --ckpt_path ...` may change them.
    EVALUATION_ARGS = ("evaluation", "export")

    def __init__(
        self,
        model_name_or_path: Optional[str] = None,
        model_config: Optional[dict[str, Any]] = None,
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
        super().__init__(optimizer, export)
        if evaluation.stage_palettes:
            raise ValueError("evaluation.stage_palettes needs a GLUE dev split: the causal-LM supernet has none")
        self.gradient_clip = mlfs_gradient_clip(optimizer.gradient_clip)
        save_plain_hyperparameters(self, stages=stages, lora=lora, sampling=sampling, distillation=distillation, optimizer=optimizer,
                                   importance=importance, evaluation=evaluation, export=export)
        self.distillation, self.evaluation = distillation, evaluation
        encoder = ElasticTransformer(load_causal_lm(model_name_or_path, model_config), lora.r, lora.alpha, lora.dropout,
                                     tuple(lora.targets or MLFSLoRAArgs().targets))
        if not encoder.is_causal_lm:
            raise ValueError(f"CausalLMSuperTransformer needs a causal LM; {type(encoder.model).__name__} is not one")
        self.automatic_optimization = False  # K+1 backward passes and one optimizer step per batch: done by hand
        self.encoder = encoder
        self.schedule = StageSchedule(encoder, stages)
        encoder.train()  # transformers returns eval-mode models; dropout must be on in training
        space = SearchSpace.build(encoder.max_config, sampling.search_space, count=encoder.parameter_count)
        self.palette_run = PaletteRun(encoder, space, evaluation, measure_latency_default=False)
        self.compose_mlfs(space, sampling, distillation, importance, sample_palette_default=True)
        self.palette_losses = nn.ModuleList([TokenMeanLoss() for _ in self.palette_run.members])

    # ---- the causal-LM losses (`kdlora.mlfs.training.MLFSTask`) ----
    def encoder_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"input_ids": batch["input_ids"], "attention_mask": batch.get("attention_mask")}

    def maxnet_loss(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return causal_lm_loss(logits, batch["labels"], batch.get("attention_mask"))

    def subnet_objective(self, logits: torch.Tensor, max_logits: torch.Tensor, batch: dict[str, torch.Tensor],
                         feature_losses: list[torch.Tensor]) -> tuple[torch.Tensor, dict]:
        d = self.distillation
        return decoder_subnet_loss(logits, max_logits, batch["labels"], batch.get("attention_mask"),
                                   d.distill_weight, d.temperature, feature_losses, d.feature_weight)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.encoder(**self.encoder_inputs(batch)).logits

    # ---- palette evaluation ----
    def _eval_step(self, batch) -> None:
        for i, _, logits in self.palette_run.logits(self.encoder_inputs(batch)):
            self.palette_losses[i].update(*lm_token_losses(logits, batch["labels"], batch.get("attention_mask")))

    def validation_step(self, batch, batch_idx, dataloader_idx: int = 0):
        self._eval_step(batch)

    def test_step(self, batch, batch_idx, dataloader_idx: int = 0):
        self._eval_step(batch)

    def _palette_rows(self) -> list[dict]:
        """Compute (and reset) every member's loss and perplexity: one report row per member evaluated."""
        rows = []
        for cfg, metric in zip(self.palette_run.members, self.palette_losses):
            if int(metric.count) == 0:
                continue
            values = {k: float(v) for k, v in metric.compute().items()}
            metric.reset()
            rows.append(self.palette_run.row(cfg, values, None))
        return rows

    def _log_eval(self, stage: str) -> None:
        rows = self._palette_rows()
        if not rows:
            return
        values = {}
        for row in rows:
            for k, v in row["metrics"].items():
                values[f"{stage}/{row['name']}/{k}"] = v
            values[f"{stage}/{row['name']}/params"] = float(row["params"])
            if row["name"] == self.encoder.max_config.name:
                values.update({f"{stage}/{k}": v for k, v in row["metrics"].items()})
        # The palette's mean loss: what a run selects its checkpoint on (the recipes' monitor), as the
        # encoders' palette score.
        values[f"{stage}/palette_loss"] = sum(r["metrics"]["loss"] for r in rows) / len(rows)
        headline = {k: values.pop(k) for k in (f"{stage}/loss", f"{stage}/perplexity", f"{stage}/palette_loss") if k in values}
        self.log_dict(values, sync_dist=False)
        self.log_dict(headline, prog_bar=True, sync_dist=False)
        if stage == "val" and not self.trainer.sanity_checking:
            self.palette_run.history[(self.current_epoch, self.global_step)] = rows

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val")

    def on_test_epoch_end(self) -> None:
        self._log_eval("test")

    def evaluate_palette(self) -> Optional[list[dict]]:
        """The palette rows of the current weights on the held-out split (the datamodule's validation
        loader, `limit_val_batches` respected), outside any trainer loop; None without one."""
        dm = getattr(self.trainer, "datamodule", None)
        loader = dm.val_dataloader() if dm is not None else None
        if not loader:
            return None
        run_outside_loop(self, [loader], self.trainer.limit_val_batches, lambda batch, idx: self._eval_step(batch))
        return self._palette_rows() or None

    # ---- fit end: selection, report and export (`kdlora.mlfs.palette_run.PaletteOwner`) ----
    def on_fit_end(self) -> None:
        """Two palettes, as the GLUE `SuperTransformer`: the selected one (the weights of the best checkpoint
        on the held-out split, by the checkpoint callback's monitor: ``val/palette_loss`` or ``val/loss``),
        written as ``palette.{json,md,png}`` in the run's directory and exported; and the end-of-fit one
        (the weights after the last step) as ``palette_final.*``. Without checkpointing, the end-of-fit
        palette is the one reported and exported. With `export.enabled`, every member as ``<export.dir>/<name>/``
        (a causal LM), beside the report."""
        self.palette_run.fit_end(self, self.evaluate_palette, remeasure=False, report_split="holdout",
                                 validation_split="holdout", export=self.export_args.enabled)

    def selection_info(self, checkpoint_callback, selection_rows: Optional[list[dict]]) -> dict:
        if not checkpoint_callback.monitor:
            return {}
        info = {"selected_on": "holdout", "selection_monitor": checkpoint_callback.monitor}
        if checkpoint_callback.best_model_score is not None:
            info["selection_value"] = float(checkpoint_callback.best_model_score)
        return info

    def palette_title(self, info: dict) -> str:
        source = self.hparams.model_name_or_path or f"a random {self.encoder.family} model"
        where = f"epoch {info['epoch']}, " if info.get("epoch") is not None else ""
        selected = ""
        if "selected_on" in info:
            value = f" = {info['selection_value']:.4f}" if "selection_value" in info else ""
            selected = f", selected on {info['selected_on']} {info['selection_monitor']}{value}"
        return (f"MLFS causal-LM palette of {source}; weights: {info.get('weights', '?')} ({where}step {info.get('step')}, "
                f"stage {info.get('stage')}){selected}; val loss and perplexity on the {info.get('split', 'holdout')} split")

    def palette_tokenizer(self):
        if not self.hparams.model_name_or_path:
            return None
        try:
            return load_tokenizer(self.hparams.model_name_or_path, "model_name_or_path")
        except (OSError, ValueError) as e:
            log.warning("no tokenizer saved with the export: cannot load %r (%s)", self.hparams.model_name_or_path, e)
            return None
