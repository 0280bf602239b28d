"""The MLFS step (Algorithm 1), shared by the GLUE `SuperTransformer` and the `CausalLMSuperTransformer`.

`MLFSTraining` is a mixin of LightningModules (put it before their base class): it owns the stages
(which adapters train when, one AdamW and schedule per stage), the gradient scaling (n_1/n_j)^γ,
and the manual-optimisation step: the maxnet first on its own loss, then the K sampled subnets on
their objective against the maxnet's detached logits and features, one `manual_backward` per
network, one optimizer step per batch. A module says only what its losses are:

- `encoder_inputs(batch)`: what `ElasticTransformer.forward` takes;
- `maxnet_loss(logits, batch)`: the maxnet's loss (GLUE: the task loss; causal LMs: next-token cross-entropy);
- `subnet_objective(logits, max_logits, batch, feature_losses)`: (loss, parts with task, kd, features).

It registers no module of its own (`init_mlfs` sets ``encoder`` and ``projections`` on the module),
so checkpoints keep their names. Every stage's adapters exist from the start (B = 0, so they change
nothing until trained); at a stage boundary the earlier ones get requires_grad=False and a fresh
AdamW with its own warmup/decay schedule over that stage's steps is built for the new ones. Creating
all adapters up front keeps the parameter set fixed, which DDP needs (it registers parameters once).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from torch import nn
from transformers import get_linear_schedule_with_warmup

from kdlora.elastic.config import SubnetConfig
from kdlora.elastic.model import ElasticTransformer
from kdlora.losses import check_feature_normalization, check_weight, orthonormal_projection, projected_feature_loss
from kdlora.mlfs.search_space import SearchSpace, SubnetSampler, palette_members
from kdlora.training.module import optimizer_groups

log = logging.getLogger(__name__)

NUM_STAGES = 3


def check_stage_epochs(stage_epochs) -> None:
    if len(stage_epochs) != NUM_STAGES or any(int(e) < 0 for e in stage_epochs) or sum(stage_epochs) < 1:
        raise ValueError(f"stage_epochs must be 3 non-negative epoch counts (stages 0, 1, 2) with a positive sum, got {stage_epochs}")


HEAD_STAGES = ("first", "all")


def check_mlfs_arguments(stage_epochs, distill_weight: float, beta: float, gamma: float, temperature: float,
                         feature_dim: int, gradient_clip: float, sampler_seed: Optional[int],
                         feature_normalization: str = "none", head_stages: str = "first") -> int:
    """Check the MLFS arguments both super-transformers share; the sampler seed to use (the run's seed when None)."""
    check_stage_epochs(stage_epochs)
    if head_stages not in HEAD_STAGES:
        raise ValueError(f"head_stages must be one of {list(HEAD_STAGES)} (the stages a trainable head trains in), got {head_stages!r}")
    check_feature_normalization(feature_normalization)
    check_weight("distill_weight", distill_weight)
    if beta < 0 or gamma < 0 or temperature <= 0 or feature_dim < 1 or gradient_clip < 0:
        raise ValueError("need beta >= 0, gamma >= 0, temperature > 0, feature_dim >= 1, gradient_clip >= 0")
    return int(os.environ.get("PL_GLOBAL_SEED", 0)) if sampler_seed is None else sampler_seed


class MLFSTraining:
    """Stages, gradient scaling and the MLFS training step of a module with ``self.encoder`` (see the module docstring).

    Reads hparams stage_epochs, learning_rate, weight_decay, warmup_ratio, gradient_clip, gamma,
    beta, distill_weight.
    """

    # ---- construction ----
    def init_mlfs(self, encoder: ElasticTransformer, *, search_space: Optional[dict[str, Any] | str], num_subnets: int,
                  sandwich: bool, per_layer: bool, sampler_seed: int, palette: Optional[list[Any]], feature_dim: int,
                  head_stages: str = "first", sample_palette: bool = False) -> None:
        """Set ``encoder`` (with all stages' adapters), the search space, sampler, palette (maxnet first
        if not in it; a member that cannot export as a plain model is a ValueError now) and the
        maxnet-owned feature projections ``projections``.

        A trainable head (the encoder's pooler/classifier) trains with the adapters of the first stage
        that runs (stage 0 unless it is skipped) with ``head_stages="first"``, as Eq. 7: from stage 1
        on only that stage's (A_s, B_s) (and the feature projections) learn. ``"all"``: in every stage.
        `sample_palette`: the sampler's first free slot cycles through the palette (`SubnetSampler`)."""
        self.automatic_optimization = False  # K+1 backward passes and one optimizer step per batch: done by hand
        self.encoder = encoder
        # All stages up front (B = 0: the maxnet's function is unchanged). Names of what each stage trains:
        self.stage_parameter_names: list[set[str]] = []
        for _ in range(NUM_STAGES):
            self.encoder.add_lora_stage()
            self.stage_parameter_names.append({n for n, p in self.encoder.named_parameters() if p.requires_grad})
        if head_stages == "first":
            head = {id(p) for m in self.encoder.head_modules() for p in m.parameters()}
            head_names = {n for n, p in self.encoder.named_parameters() if id(p) in head}
            first = min(s for s, e in enumerate(self.hparams.stage_epochs) if int(e) > 0)
            for s, names in enumerate(self.stage_parameter_names):
                if s != first:
                    names -= head_names
        self.encoder.train()  # transformers returns eval-mode models; dropout must be on in training
        self.space = SearchSpace.build(self.encoder.max_config, search_space, count=self.encoder.parameter_count)
        members = palette_members(self.space, palette)
        if self.encoder.max_config not in members:
            members.insert(0, self.encoder.max_config)  # the headline metrics are the maxnet's
        self.sampler = SubnetSampler(self.space, num_subnets, sandwich, per_layer, sampler_seed,
                                     members=members if sample_palette else None)
        untrained = [m.name for m in members if m not in (self.encoder.max_config, self.space.smallest())]
        if sandwich and num_subnets == 1 and untrained:
            log.warning("num_subnets=1 with the sandwich rule trains only the smallest subnet beside the maxnet: palette "
                        "members %s are never trained directly (num_subnets >= 2 with sample_palette trains each in turn)",
                        ", ".join(untrained))
        for cfg in members:  # every member must export (a Llama one needs whole key/value heads): fail now, not at fit end
            self.encoder.export_config(cfg)
        self.palette = members
        self.palette_names = [c.name for c in members]
        self.palette_roles = {self.encoder.max_config.name: "maxnet", self.space.smallest().name: "minnet"}
        # Feature distillation only on the maxnet layers the smallest subnet keeps.
        self.distill_layers = tuple(self.space.smallest().layers)
        H = self.encoder.max_config.hidden_size
        self.projections = nn.ModuleDict({str(l): orthonormal_projection(H, feature_dim) for l in self.distill_layers})
        self.stage = 0  # stage the optimizer was built for; restored from checkpoints
        self.last_sampled: list[SubnetConfig] = []
        self._scale_cache: dict[tuple[int, SubnetConfig], float] = {}
        # The palette of every validation so far, by (epoch, step): the report at fit end shows the selected one's.
        self.palette_history: dict[tuple[int, int], list[dict]] = {}

    # ---- stages ----
    def stage_for_epoch(self, epoch: int) -> int:
        end = 0
        for stage, epochs in enumerate(self.hparams.stage_epochs):
            end += int(epochs)
            if epoch < end:
                return stage
        return max(s for s, e in enumerate(self.hparams.stage_epochs) if int(e) > 0)

    def stage_parameters(self, stage: int) -> list[tuple[str, nn.Parameter]]:
        names = self.stage_parameter_names[stage]
        return [(f"encoder.{n}", p) for n, p in self.encoder.named_parameters() if n in names]

    def enter_stage(self, stage: int) -> None:
        """Make only `stage`'s adapters (and, from stage 1, the projections) trainable."""
        names = self.stage_parameter_names[stage]
        for n, p in self.encoder.named_parameters():
            p.requires_grad_(n in names)
        self.projections.requires_grad_(stage > 0 and self.hparams.beta > 0)
        self.stage = stage

    def make_every_stage_trainable(self) -> None:
        """DDP registers only parameters that require grad when it wraps the module (right after `setup`),
        so everything any stage trains must be trainable then; configure_optimizers narrows it."""
        for s in range(NUM_STAGES):
            for _, p in self.stage_parameters(s):
                p.requires_grad_(True)
        self.projections.requires_grad_(True)

    def configure_optimizers(self):
        self.enter_stage(self.stage)
        params = self.stage_parameters(self.stage)
        groups = optimizer_groups(params, self.hparams.weight_decay)
        projections = [p for p in self.projections.parameters() if p.requires_grad]
        if projections:  # no weight decay: it would only shrink the feature targets
            groups.append({"params": projections, "weight_decay": 0.0})
        opt = torch.optim.AdamW(groups, lr=self.hparams.learning_rate)
        total = self._stage_steps(self.stage)
        sched = get_linear_schedule_with_warmup(opt, int(self.hparams.warmup_ratio * total), total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def _stage_steps(self, stage: int) -> int:
        trainer = self.trainer
        total = int(trainer.estimated_stepping_batches)  # also loads the train dataloader
        per_epoch = trainer.num_training_batches
        max_epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else sum(self.hparams.stage_epochs)
        if per_epoch == float("inf"):
            per_epoch = max(1, total // max(1, max_epochs))
        epochs = [e for e in range(max_epochs) if self.stage_for_epoch(e) == stage]
        return max(1, min(total, int(per_epoch) * max(1, len(epochs))))

    def before_stage_change(self, stage: int) -> None:
        """Called at the start of the first epoch of `stage`, before its optimizer is built (self.stage is the old one)."""
        if self.hparams.importance_reorder and self.stage == 0 and self.reorder_after_stage0():
            # Entering the first subnet stage from stage 0 (a run resumed later restores stage >= 1
            # and its permuted weights, so this happens once, as in an uninterrupted run).
            self.reorder_by_importance()

    # ---- importance ordering (hparams importance_reorder, importance_batches, importance_hidden) ----
    def reorder_after_stage0(self) -> bool:
        """Whether importance is ranked on the stage-0 maxnet rather than before training (see `SuperTransformer`)."""
        return False

    def reorder_by_importance(self) -> None:
        """Permute heads (grouped-query attention: whole groups), FFN neurons and, with importance_hidden, hidden
        dimensions of the maxnet so that every slice keeps the most important ones (`kdlora.elastic.importance`),
        ranked on the datamodule's `importance_dataloader` (training data)."""
        from kdlora.elastic import importance

        datamodule = self.trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "importance_dataloader"):
            raise ValueError("importance_reorder needs a datamodule with an importance_dataloader (training batches): "
                             "pass datamodule= to Trainer.fit")
        importance.reorder_by_importance(self.encoder, datamodule.importance_dataloader(),
                                         num_batches=self.hparams.importance_batches, hidden=self.hparams.importance_hidden)

    def on_train_epoch_start(self) -> None:
        stage = self.stage_for_epoch(self.current_epoch)
        if stage != self.stage:
            self.before_stage_change(stage)
            self.stage = stage
            self.trainer.strategy.setup_optimizers(self.trainer)  # calls configure_optimizers -> enter_stage
            log.info("MLFS stage %d from epoch %d", stage, self.current_epoch)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage != "fit":
            return
        self.make_every_stage_trainable()  # for DDP, which wraps the module right after this hook
        if self.hparams.importance_reorder and self.trainer.ckpt_path is None and not self.reorder_after_stage0():
            self.reorder_by_importance()  # a resumed run restores the permuted weights instead

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)  # never from non-finite weights
        checkpoint["kdlora_mlfs_stage"] = self.stage
        checkpoint["kdlora_palette_history"] = [[epoch, step, rows] for (epoch, step), rows in self.palette_history.items()]

    def restore_checkpoint(self, path: str | Path, log_dir: Optional[str]) -> tuple[Optional[int], Optional[int], int, str]:
        """Load a checkpoint's weights into this module (fit-end selection); its (epoch, step, MLFS stage,
        path relative to `log_dir`, as the palette report names it)."""
        checkpoint = torch.load(path, map_location=self.device, weights_only=True)
        self.load_state_dict(checkpoint["state_dict"])
        weights = os.path.relpath(path, log_dir) if log_dir is not None else str(path)
        return checkpoint.get("epoch"), checkpoint.get("global_step"), int(checkpoint.get("kdlora_mlfs_stage", 0)), weights

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        free = [k for k in checkpoint.get("state_dict", {}) if k.startswith("projections.") and ".parametrizations." not in k]
        if free:
            raise ValueError(f"checkpoint holds free feature projections ({free[0]}, ...) from before they were made "
                             "orthonormal (kdlora.losses.orthonormal_projection); this version cannot resume or load it")
        super().on_load_checkpoint(checkpoint)
        # Before the optimizer is built and its state restored, so the param groups match.
        self.stage = int(checkpoint.get("kdlora_mlfs_stage", 0))
        self.palette_history = {(int(e), int(s)): rows for e, s, rows in checkpoint.get("kdlora_palette_history", [])}

    # ---- the step ----
    def gradient_scale(self, cfg: SubnetConfig) -> float:
        """(n_1/n_j)^γ with n the trainable parameters the subnet reads in the current stage."""
        key = (self.stage, cfg)
        if key not in self._scale_cache:
            n_max = self.encoder.parameter_count(self.encoder.max_config, trainable_only=True)
            n_sub = self.encoder.parameter_count(cfg, trainable_only=True)
            self._scale_cache[key] = float((n_max / max(n_sub, 1)) ** self.hparams.gamma)
        return self._scale_cache[key]

    def training_step(self, batch, batch_idx):
        opt, sched = self.optimizers(), self.lr_schedulers()
        opt.zero_grad()
        losses = self.accumulate_gradients(batch, self.sampler.sample(self.stage, self.global_step))
        if self.hparams.gradient_clip > 0:
            self.clip_gradients(opt, gradient_clip_val=self.hparams.gradient_clip, gradient_clip_algorithm="norm")
        opt.step()
        sched.step()
        self.log("train/loss", losses["loss"], prog_bar=True)
        self.log("train/maxnet_loss", losses["maxnet"])
        self.log("train/stage", float(self.stage))
        for key in ("subnet_task", "subnet_kd", "subnet_features", "smallest_loss", "smallest_task"):
            if key in losses:
                self.log(f"train/{key}", losses[key])

    def accumulate_gradients(self, batch: dict[str, torch.Tensor], subnets: list[SubnetConfig]) -> dict[str, torch.Tensor]:
        """Backward of [L_1 + Σ_j s_j L_j] / (K+1), one network at a time; returns detached losses."""
        self.last_sampled = list(subnets)
        inputs = self.encoder_inputs(batch)
        mask = batch.get("attention_mask")
        count = len(subnets) + 1
        want_features = bool(subnets) and self.hparams.beta > 0 and self.hparams.distill_weight > 0

        self.encoder.reset_super_network()
        out = self.encoder(**inputs, output_hidden_states=want_features)
        max_loss = self.maxnet_loss(out.logits, batch)
        self.check_finite_loss(max_loss, "maxnet loss")
        self.manual_backward(max_loss / count)
        max_logits = out.logits.detach()
        max_features = ({l: out.hidden_states[l].detach() for l in self.distill_layers} if want_features else {})
        del out

        total = max_loss.detach() / count
        parts: dict[str, list[torch.Tensor]] = {"task": [], "kd": [], "features": []}
        smallest = self.space.smallest(full_depth=self.stage == 1)
        result: dict[str, torch.Tensor] = {}
        for cfg in subnets:
            self.encoder.set_sub_network(cfg)
            sub = self.encoder(**inputs, output_hidden_states=want_features)
            feature_losses = []
            if want_features:
                for l, h in zip(cfg.layers, sub.hidden_states):
                    if l in max_features:
                        feature_losses.append(projected_feature_loss(h, max_features[l], self.projections[str(l)].weight, mask,
                                                                     self.hparams.feature_normalization))
            loss, p = self.subnet_objective(sub.logits, max_logits, batch, feature_losses)
            self.check_finite_loss(loss, f"subnet {cfg.name} loss")
            scale = self.gradient_scale(cfg)
            self.manual_backward(scale * loss / count)
            total = total + scale * loss.detach() / count
            for k, v in p.items():
                parts[k].append(v)
            if cfg == smallest:  # the stage's smallest subnet (the minnet in stage 2): the paper's Fig. 3 curve
                result["smallest_loss"], result["smallest_task"] = loss.detach(), p["task"]
        self.encoder.reset_super_network()
        result.update({"loss": total, "maxnet": max_loss.detach()})
        for k, v in parts.items():
            if v:
                result[f"subnet_{k}"] = torch.stack(v).mean()
        return result

    # ---- evaluation and export ----
    def size_rows(self) -> list[dict]:
        """The palette's rows when no validation ran: each member's name, role, config and parameters, no scores."""
        return [{"name": c.name, "role": self.palette_roles.get(c.name, ""), "params": self.encoder.parameter_count(c),
                 "metrics": {}, "score": None, "latency_ms": None, **c.to_dict()} for c in self.palette]

    def export_palette(self, export_dir: Path, rows: list[dict], title: str, tokenizer, meta: dict) -> None:
        """Every member as a standalone Hugging Face model ``export_dir/<name>/`` beside the palette report,
        written as one kdlora export (`kdlora.io.write_export`: atomic, never over a user's folder)."""
        from kdlora.io import write_export
        from kdlora.mlfs.palette import write_palette_report

        self.encoder.eval()

        def write(tmp: Path) -> None:
            for cfg in self.palette:
                self.encoder.export_hf(cfg, tmp / cfg.name, tokenizer)
            write_palette_report(rows, tmp, title)

        write_export(export_dir, write, {"module": type(self).__name__, **meta, "kind": "palette",
                                         "members": [c.name for c in self.palette]})
        for cfg in self.palette:
            print(f"[kdlora] exported {cfg.name} ({self.encoder.parameter_count(cfg) / 1e6:.2f}M parameters) to {export_dir / cfg.name}")

    def palette_logits(self, batch: dict[str, torch.Tensor]) -> Iterator[tuple[int, SubnetConfig, torch.Tensor]]:
        """(index, config, logits) of every palette member on `batch`; the maxnet again afterwards."""
        inputs = self.encoder_inputs(batch)
        try:
            for i, cfg in enumerate(self.palette):
                self.encoder.set_sub_network(cfg)
                yield i, cfg, self.encoder(**inputs).logits
        finally:
            self.encoder.reset_super_network()
