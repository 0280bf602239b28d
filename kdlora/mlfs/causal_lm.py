"""CausalLMSuperTransformer: MLFS on a decoder (Llama, GPT-2): one causal LM, every sub-network a causal LM.

The stages and the step are `kdlora.mlfs.training.MLFSTraining`, as for the GLUE `SuperTransformer`;
only the losses differ. Per step the maxnet runs first on the next-token loss, then K sampled subnets on

    L_j = (1−α)·LM(z_j) + α·(KD(z_j, z_1) + β·Σ_l ‖U^l[:, :h_j] h_j^l − U^l h_1^l‖²)

(`kdlora.losses.decoder_subnet_loss`): LM is next-token cross-entropy (the shift happens in the
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
end-of-fit palette are reported (params, val loss, perplexity) and, with `export`, every member of the
selected weights is written as a standalone Hugging Face causal LM that `generate()`s.
"""

from __future__ import annotations

import itertools
import logging
import math
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch.utilities import rank_zero_only
from torch import nn

from kdlora.data.tokenizer import load_tokenizer
from kdlora.elastic.model import ElasticTransformer
from kdlora.eval.perplexity import TokenMeanLoss
from kdlora.losses import causal_lm_loss, decoder_subnet_loss, lm_token_losses
from kdlora.mlfs.training import MLFSTraining, check_mlfs_arguments
from kdlora.training.args import ExportArgs, OptimizerArgs
from kdlora.training.module import FineTuningModule

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


class CausalLMSuperTransformer(MLFSTraining, FineTuningModule):
    """MLFS super-transformer of a causal LM (`train.py fit --config configs/decoder/...`, see `kdlora.cli`).

    Args:
        model_name_or_path: the maxnet's checkpoint (`AutoModelForCausalLM`), or
        model_config: a Hugging Face config dict (with ``model_type``) for a new random maxnet.
        stage_epochs: epochs of stages 0 (the maxnet's LoRA fine-tuning), 1 (widths sampled) and 2 (widths
            and depth sampled); 0 skips a stage.
        lora_r, lora_alpha, lora_dropout, lora_targets: adapters of every stage (roles or family names).
        num_subnets, sandwich, per_layer, search_space, palette, sampler_seed: as `SuperTransformer`.
        sample_palette: as `SuperTransformer`, but on by default (our choice; the paper samples at random and
            has no decoders): a decoder's palette is what it exports, and a member drawn at random from a
            wide space is rarely trained directly (about 1 step in 17 for SmolLM2's 24-layer member at K = 2).
            Needs num_subnets >= 2 beside the sandwich's smallest.
        distill_weight: α, the weight of a subnet's distillation terms (token KD + β·features); its LM loss gets 1 − α.
        beta, gamma, temperature, feature_dim: feature-term weight, gradient-scaling exponent, KD temperature, d_low.
        feature_normalization: "none" (the paper's squared L2 norm; a pretrained decoder's residual stream makes it
            ~1e6 times the KD term) or "relative" (divided by the maxnet feature's squared norm, `kdlora.losses.feature_loss`).
        learning_rate, weight_decay, warmup_ratio, gradient_clip: AdamW per stage with linear warmup/decay.
        importance_reorder, importance_batches, importance_hidden: before training, rank heads (grouped-query
            attention: whole key/value groups), FFN neurons (and with importance_hidden the hidden dimensions)
            on `importance_batches` training batches' next-token loss and permute the weights so every slice
            keeps the most important ones (the maxnet's function is unchanged).
        export, export_dir: write every palette member as a causal LM at fit end (see `GLUEModule`).
    """

    # What to evaluate and write, not what was trained: `train.py validate --ckpt_path ...` may change them.
    EVALUATION_ARGS = ("palette", "export", "export_dir")

    def __init__(
        self,
        model_name_or_path: Optional[str] = None,
        model_config: Optional[dict[str, Any]] = None,
        stage_epochs: list[int] = [1, 1, 1],
        lora_r: int = 8,
        lora_alpha: int = 16,
        lora_dropout: float = 0.0,
        lora_targets: list[str] = ["query", "key", "value", "intermediate", "output"],
        num_subnets: int = 2,
        sandwich: bool = True,
        per_layer: bool = False,
        sample_palette: bool = True,
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
        export: bool = True,
        export_dir: Optional[str] = None,
    ) -> None:
        super().__init__(OptimizerArgs(learning_rate, weight_decay, warmup_ratio), ExportArgs(export, export_dir))
        sampler_seed = check_mlfs_arguments(stage_epochs, distill_weight, beta, gamma, temperature, feature_dim,
                                            gradient_clip, sampler_seed, feature_normalization)
        self.save_hyperparameters()
        encoder = ElasticTransformer(load_causal_lm(model_name_or_path, model_config), lora_r, lora_alpha, lora_dropout,
                                 tuple(lora_targets))
        if not encoder.is_causal_lm:
            raise ValueError(f"CausalLMSuperTransformer needs a causal LM; {type(encoder.model).__name__} is not one")
        self.init_mlfs(encoder, search_space=search_space, num_subnets=num_subnets, sandwich=sandwich, per_layer=per_layer,
                       sampler_seed=sampler_seed, palette=palette, feature_dim=feature_dim, sample_palette=sample_palette)
        self.palette_losses = nn.ModuleList([TokenMeanLoss() for _ in self.palette])

    # ---- losses ----
    def encoder_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"input_ids": batch["input_ids"], "attention_mask": batch.get("attention_mask")}

    def maxnet_loss(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return causal_lm_loss(logits, batch["labels"], batch.get("attention_mask"))

    def subnet_objective(self, logits: torch.Tensor, max_logits: torch.Tensor, batch: dict[str, torch.Tensor],
                         feature_losses: list[torch.Tensor]) -> tuple[torch.Tensor, dict]:
        return decoder_subnet_loss(logits, max_logits, batch["labels"], batch.get("attention_mask"),
                                   self.hparams.distill_weight, self.hparams.temperature, feature_losses, self.hparams.beta)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.encoder(**self.encoder_inputs(batch)).logits

    # ---- palette evaluation ----
    def _eval_step(self, batch) -> None:
        for i, _, logits in self.palette_logits(batch):
            self.palette_losses[i].update(*lm_token_losses(logits, batch["labels"], batch.get("attention_mask")))

    def validation_step(self, batch, batch_idx, dataloader_idx: int = 0):
        self._eval_step(batch)

    def test_step(self, batch, batch_idx, dataloader_idx: int = 0):
        self._eval_step(batch)

    def _palette_rows(self) -> list[dict]:
        """Compute (and reset) every member's loss and perplexity: one report row per member evaluated."""
        rows = []
        for cfg, metric in zip(self.palette, self.palette_losses):
            if int(metric.count) == 0:
                continue
            values = {k: float(v) for k, v in metric.compute().items()}
            metric.reset()
            rows.append({"name": cfg.name, "role": self.palette_roles.get(cfg.name, ""),
                         "params": self.encoder.parameter_count(cfg), "metrics": values, "score": None,
                         "latency_ms": None, **cfg.to_dict()})
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
            self.palette_history[(self.current_epoch, self.global_step)] = rows

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val")

    def on_test_epoch_end(self) -> None:
        self._log_eval("test")

    # ---- fit end: selection, report and export ----
    def _provenance(self, weights: str, epoch: Optional[int], step: int, stage: int) -> dict:
        return {"weights": weights, "epoch": epoch, "step": int(step), "stage": int(stage), "split": "holdout"}

    @torch.no_grad()
    def evaluate_palette(self) -> Optional[list[dict]]:
        """The palette rows of the current weights on the held-out split (the datamodule's validation
        loader, `limit_val_batches` respected), outside any trainer loop; None without one."""
        dm = getattr(self.trainer, "datamodule", None)
        loader = dm.val_dataloader() if dm is not None else None
        if not loader:
            return None
        limit = self.trainer.limit_val_batches
        count = limit if isinstance(limit, int) else math.ceil(limit * len(loader))
        was_training = self.training
        self.eval()
        try:
            with self.trainer.precision_plugin.forward_context():
                for batch in itertools.islice(loader, count):
                    self._eval_step(self.transfer_batch_to_device(batch, self.device, 0))
        finally:
            self.train(was_training)
        return self._palette_rows() or None

    def on_fit_end(self) -> None:
        """Two palettes, as the GLUE `SuperTransformer`: the selected one (the weights of the best checkpoint
        on the held-out split, by the checkpoint callback's monitor: ``val/palette_loss`` or ``val/loss``),
        written as ``palette.{json,md,png}`` in the run's directory and exported; and the end-of-fit one
        (the weights after the last step) as ``palette_final.*``. Without checkpointing, the end-of-fit
        palette is the one reported and exported. With `export`, every member as ``<export_dir>/<name>/``
        (a causal LM), beside the report."""
        ckpt_cb = self.trainer.checkpoint_callback
        best = getattr(ckpt_cb, "best_model_path", "") if ckpt_cb is not None else ""
        log_dir = self.trainer.log_dir  # a collective under DDP: every rank reads it
        report_dir = None if self.trainer.fast_dev_run or log_dir is None else Path(log_dir)
        last = max(self.palette_history) if self.palette_history else None
        if last is not None and last[1] == self.global_step:  # the last validation saw the final weights
            final_rows, final_epoch = self.palette_history[last], last[0]
        else:
            final_rows, final_epoch = (self.evaluate_palette() if self.palette_history else None), None
        final_info = self._provenance("end of fit", final_epoch, self.global_step, self.stage)
        rows, info = final_rows, final_info
        if best and Path(best).is_file():
            epoch, step, stage, weights = self.restore_checkpoint(best, log_dir)
            info = self._provenance(weights, epoch, step, stage)
            rows = self.palette_history.get((epoch, step))
            if rows is None:  # a checkpoint of an earlier run (resumed): measure it now
                rows = self.evaluate_palette()
            if ckpt_cb.monitor:
                info["selected_on"] = "holdout"
                info["selection_monitor"] = ckpt_cb.monitor
                if ckpt_cb.best_model_score is not None:
                    info["selection_value"] = float(ckpt_cb.best_model_score)
            log.info("palette from best checkpoint %s", best)
        elif rows is None and last is not None:  # the last validation's palette
            rows, info = self.palette_history[last], self._provenance("last validation", last[0], last[1], self.stage)
        export_dir = self.export_path if self.hparams.export else None
        self._report_and_export(rows, info, report_dir, export_dir, final=(final_rows, final_info))
        self.trainer.strategy.barrier("kdlora-export")

    def palette_report_rows(self) -> list[dict]:
        """The last validation's rows, or the members' sizes when no validation ran."""
        if self.palette_history:
            return self.palette_history[max(self.palette_history)]
        return self.size_rows()

    def _palette_title(self, info: dict) -> str:
        source = self.hparams.model_name_or_path or f"a random {self.encoder.family} model"
        where = f"epoch {info['epoch']}, " if info.get("epoch") is not None else ""
        selected = ""
        if "selected_on" in info:
            value = f" = {info['selection_value']:.4f}" if "selection_value" in info else ""
            selected = f", selected on {info['selected_on']} {info['selection_monitor']}{value}"
        return (f"MLFS causal-LM palette of {source}; weights: {info.get('weights', '?')} ({where}step {info.get('step')}, "
                f"stage {info.get('stage')}){selected}; val loss and perplexity on the {info.get('split', 'holdout')} split")

    @rank_zero_only
    def _report_and_export(self, rows: Optional[list[dict]], info: dict, report_dir: Optional[Path], export_dir: Optional[Path],
                           final: tuple[Optional[list[dict]], dict] = (None, {})) -> None:
        from kdlora.mlfs.palette import write_palette_report

        rows = [{**r, **info} for r in (rows if rows is not None else self.size_rows())]
        title = self._palette_title(info)
        final_rows, final_info = final
        if report_dir is not None:
            paths = write_palette_report(rows, report_dir, title)
            print(f"[kdlora] palette report: {paths['md']} {paths['png']}")
            if final_rows is not None:
                paths = write_palette_report([{**r, **final_info} for r in final_rows], report_dir,
                                             self._palette_title(final_info), name="palette_final")
                print(f"[kdlora] end-of-fit palette: {paths['md']}")
        if export_dir is None:
            return
        tokenizer = None
        if self.hparams.model_name_or_path:
            try:
                tokenizer = load_tokenizer(self.hparams.model_name_or_path, "model_name_or_path")
            except (OSError, ValueError) as e:
                log.warning("no tokenizer saved with the export: cannot load %r (%s)", self.hparams.model_name_or_path, e)
        self.export_palette(export_dir, rows, title, tokenizer, {})
