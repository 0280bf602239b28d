"""The MLFS training parts both super-transformers compose (as whittle's training strategies):

- `StageSchedule`: which stage an epoch is in, which parameters train in it (every stage's adapters
  exist from the start, B = 0, so the parameter set is fixed, which DDP needs), and the stage's own
  AdamW with its warmup/decay schedule over that stage's steps;
- `MLFSStep`: one manual-optimisation step (Algorithm 1): the maxnet first on its own loss, then the K
  sampled subnets on their objective against the maxnet's detached logits and features, each scaled
  by (n_1/n_j)^γ, one backward per network (one graph alive at a time), clipping, one optimizer step;
- `ImportanceOrdering`: when the maxnet's heads/neurons are ranked and permuted;
- `MLFSModule`: the LightningModule base both super-transformers share: it composes the parts above
  (`compose_mlfs`) and holds the Lightning hooks that drive them.

A module hands each part what it needs explicitly: the encoder, the argument groups
(`kdlora.mlfs.args`) and, for the step, an `MLFSTask` (its inputs and losses, and Lightning's
manual backward).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Optional, Protocol

import torch
from torch import nn
from transformers import get_linear_schedule_with_warmup

from kdlora.elastic.config import SubnetConfig
from kdlora.elastic.model import ElasticTransformer
from kdlora.losses import orthonormal_projection, projected_feature_loss
from kdlora.mlfs.args import NUM_STAGES, ImportanceArgs, MLFSDistillationArgs, SamplingArgs, StageArgs
from kdlora.mlfs.search_space import SearchSpace, SubnetSampler
from kdlora.training.args import OptimizerArgs
from kdlora.training.module import FineTuningModule, optimizer_groups

log = logging.getLogger(__name__)


def run_seed(sampler_seed: Optional[int]) -> int:
    """The subnet sampler's seed: `sampler_seed`, else the run's seed (``PL_GLOBAL_SEED``)."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0)) if sampler_seed is None else sampler_seed


class StageSchedule:
    """The stages of one encoder: adds every stage's adapters to it (B = 0: the maxnet's function is
    unchanged) and records what each stage trains.

    A trainable head (the encoder's pooler/classifier) trains with the adapters of the first stage that
    runs with ``head_stages="first"`` (as Eq. 7: from stage 1 on only that stage's adapters and the
    feature projections learn); with ``"all"`` in every stage."""

    def __init__(self, encoder: ElasticTransformer, args: StageArgs) -> None:
        self.encoder = encoder
        self.epochs = [int(e) for e in args.epochs]
        self.parameter_names: list[set[str]] = []
        for _ in range(NUM_STAGES):
            encoder.add_lora_stage()
            self.parameter_names.append({n for n, p in encoder.named_parameters() if p.requires_grad})
        if args.head_stages == "first":
            head = {id(p) for m in encoder.head_modules() for p in m.parameters()}
            head_names = {n for n, p in encoder.named_parameters() if id(p) in head}
            for s, names in enumerate(self.parameter_names):
                if s != self.first_stage:
                    names -= head_names

    @property
    def first_stage(self) -> int:
        return min(s for s, e in enumerate(self.epochs) if e > 0)

    def stage_for_epoch(self, epoch: int) -> int:
        end = 0
        for stage, epochs in enumerate(self.epochs):
            end += epochs
            if epoch < end:
                return stage
        return max(s for s, e in enumerate(self.epochs) if e > 0)

    def parameters(self, stage: int) -> list[tuple[str, nn.Parameter]]:
        """(name in the module, parameter) of what `stage` trains; the encoder is the module's ``encoder``."""
        names = self.parameter_names[stage]
        return [(f"encoder.{n}", p) for n, p in self.encoder.named_parameters() if n in names]

    def enter(self, stage: int, projections: nn.Module, train_projections: bool) -> None:
        """Make only `stage`'s parameters (and, from stage 1 with `train_projections`, the projections) trainable."""
        names = self.parameter_names[stage]
        for n, p in self.encoder.named_parameters():
            p.requires_grad_(n in names)
        projections.requires_grad_(stage > 0 and train_projections)

    def make_every_stage_trainable(self, projections: nn.Module) -> None:
        """DDP registers only parameters that require grad when it wraps the module (right after `setup`),
        so everything any stage trains must be trainable then; `optimizer` narrows it."""
        for s in range(NUM_STAGES):
            for _, p in self.parameters(s):
                p.requires_grad_(True)
        projections.requires_grad_(True)

    def steps(self, trainer, stage: int) -> int:
        """Optimizer steps of `stage` in this fit: the length of its schedule."""
        total = int(trainer.estimated_stepping_batches)  # also loads the train dataloader
        per_epoch = trainer.num_training_batches
        max_epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else sum(self.epochs)
        if per_epoch == float("inf"):
            per_epoch = max(1, total // max(1, max_epochs))
        epochs = [e for e in range(max_epochs) if self.stage_for_epoch(e) == stage]
        return max(1, min(total, int(per_epoch) * max(1, len(epochs))))

    def optimizer(self, stage: int, projections: nn.Module, args: OptimizerArgs, steps: int) -> dict[str, Any]:
        """A fresh AdamW over `stage`'s trainable parameters with linear warmup/decay over `steps`
        (Lightning's configure_optimizers answer); enters the stage first."""
        groups = optimizer_groups(self.parameters(stage), args.weight_decay)
        trainable_projections = [p for p in projections.parameters() if p.requires_grad]
        if trainable_projections:  # no weight decay: it would only shrink the feature targets
            groups.append({"params": trainable_projections, "weight_decay": 0.0})
        opt = torch.optim.AdamW(groups, lr=args.learning_rate)
        sched = get_linear_schedule_with_warmup(opt, int(args.warmup_ratio * steps), steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class MLFSTask(Protocol):
    """What `MLFSStep` needs from a module: its inputs and losses, and Lightning's backward and divergence check."""

    def encoder_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What `ElasticTransformer.forward` takes."""

    def maxnet_loss(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The maxnet's loss (GLUE: the task loss; causal LMs: next-token cross-entropy)."""

    def subnet_objective(self, logits: torch.Tensor, max_logits: torch.Tensor, batch: dict[str, torch.Tensor],
                         feature_losses: list[torch.Tensor]) -> tuple[torch.Tensor, dict]:
        """(loss, parts with task, kd, features) of a subnet against the maxnet's detached logits."""

    def manual_backward(self, loss: torch.Tensor) -> None: ...

    def check_finite_loss(self, loss: torch.Tensor, what: str) -> None: ...


class MLFSStep:
    """One MLFS optimisation step over an encoder: backward of [L_1 + Σ_j s_j L_j] / (K+1), one network
    at a time, s_j = (n_1/n_j)^γ with n the trainable parameters the subnet reads in the current stage.

    Feature distillation runs only on the maxnet layers the search space's smallest subnet keeps
    (`distill_layers`), through `projections` (the module's, so checkpoints keep their names)."""

    def __init__(self, task: MLFSTask, encoder: ElasticTransformer, space: SearchSpace, projections: nn.ModuleDict,
                 distillation: MLFSDistillationArgs) -> None:
        self.task, self.encoder, self.space, self.projections = task, encoder, space, projections
        self.gamma = distillation.gamma
        self.features = distillation.feature_weight > 0 and distillation.distill_weight > 0
        self.feature_normalization = distillation.feature_normalization
        self.distill_layers = tuple(space.smallest().layers)
        self.last_sampled: list[SubnetConfig] = []
        self._scale_cache: dict[tuple[int, SubnetConfig], float] = {}

    def gradient_scale(self, cfg: SubnetConfig, stage: int) -> float:
        """(n_1/n_j)^γ with n the trainable parameters the subnet reads in `stage` (the one entered)."""
        key = (stage, cfg)
        if key not in self._scale_cache:
            n_max = self.encoder.parameter_count(self.encoder.max_config, trainable_only=True)
            n_sub = self.encoder.parameter_count(cfg, trainable_only=True)
            self._scale_cache[key] = float((n_max / max(n_sub, 1)) ** self.gamma)
        return self._scale_cache[key]

    def step(self, optimizer, scheduler, batch: dict[str, torch.Tensor], subnets: list[SubnetConfig], stage: int,
             clip=None) -> dict[str, torch.Tensor]:
        """zero_grad, the gradients of `subnets` beside the maxnet, `clip(optimizer)` if given, one optimizer
        and scheduler step; the detached losses."""
        optimizer.zero_grad()
        losses = self.accumulate_gradients(batch, subnets, stage)
        if clip is not None:
            clip(optimizer)
        optimizer.step()
        scheduler.step()
        return losses

    def accumulate_gradients(self, batch: dict[str, torch.Tensor], subnets: list[SubnetConfig],
                             stage: int) -> dict[str, torch.Tensor]:
        """Backward of [L_1 + Σ_j s_j L_j] / (K+1), one network at a time; returns detached losses."""
        self.last_sampled = list(subnets)
        task, encoder = self.task, self.encoder
        inputs = task.encoder_inputs(batch)
        count = len(subnets) + 1
        want_features = bool(subnets) and self.features

        encoder.reset_super_network()
        out = encoder(**inputs, output_hidden_states=want_features)
        max_loss = task.maxnet_loss(out.logits, batch)
        task.check_finite_loss(max_loss, "maxnet loss")
        task.manual_backward(max_loss / count)
        max_logits = out.logits.detach()
        max_features = ({l: out.hidden_states[l].detach() for l in self.distill_layers} if want_features else {})
        del out

        total = max_loss.detach() / count
        parts: dict[str, list[torch.Tensor]] = {"task": [], "kd": [], "features": []}
        smallest = self.space.smallest(full_depth=stage == 1)
        result: dict[str, torch.Tensor] = {}
        for cfg in subnets:
            encoder.set_sub_network(cfg)
            sub = encoder(**inputs, output_hidden_states=want_features)
            feature_losses = self._feature_losses(cfg, sub, max_features, batch.get("attention_mask")) if want_features else []
            loss, p = task.subnet_objective(sub.logits, max_logits, batch, feature_losses)
            task.check_finite_loss(loss, f"subnet {cfg.name} loss")
            scale = self.gradient_scale(cfg, stage)
            task.manual_backward(scale * loss / count)
            total = total + scale * loss.detach() / count
            for k, v in p.items():
                parts[k].append(v)
            if cfg == smallest:  # the stage's smallest subnet (the minnet in stage 2): the paper's Fig. 3 curve
                result["smallest_loss"], result["smallest_task"] = loss.detach(), p["task"]
        encoder.reset_super_network()
        result.update({"loss": total, "maxnet": max_loss.detach()})
        for k, v in parts.items():
            if v:
                result[f"subnet_{k}"] = torch.stack(v).mean()
        return result

    def _feature_losses(self, cfg: SubnetConfig, sub, max_features: dict[int, torch.Tensor],
                        mask: Optional[torch.Tensor]) -> list[torch.Tensor]:
        return [projected_feature_loss(h, max_features[l], self.projections[str(l)].weight, mask, self.feature_normalization)
                for l, h in zip(cfg.layers, sub.hidden_states) if l in max_features]


def log_step_losses(module, losses: dict[str, torch.Tensor], stage: int) -> None:
    """The step's losses as ``train/*`` (the total on the progress bar)."""
    module.log("train/loss", losses["loss"], prog_bar=True)
    module.log("train/maxnet_loss", losses["maxnet"])
    module.log("train/stage", float(stage))
    for key in ("subnet_task", "subnet_kd", "subnet_features", "smallest_loss", "smallest_task"):
        if key in losses:
            module.log(f"train/{key}", losses[key])


class ImportanceOrdering:
    """When the encoder's heads (grouped-query attention: whole groups), FFN neurons and, with
    ``hidden``, hidden dimensions are ranked on training batches and permuted (`kdlora.elastic.importance`).

    The ranking needs a maxnet that does the task: before training, or with `after_stage0` (a pretrained
    base, whose head is random before stage 0) when the first subnet stage begins, on the stage-0 maxnet."""

    def __init__(self, encoder: ElasticTransformer, args: ImportanceArgs, after_stage0: bool = False) -> None:
        self.encoder, self.args, self.after_stage0 = encoder, args, after_stage0

    def at_fit_start(self, trainer) -> None:
        if self.args.reorder and trainer.ckpt_path is None and not self.after_stage0:
            self.reorder(trainer)  # a resumed run restores the permuted weights instead

    def at_stage_change(self, trainer, old_stage: int) -> None:
        """Before a stage's optimizer is built. Leaving stage 0 happens once (a resumed run restores stage >= 1
        and its permuted weights), as in an uninterrupted run."""
        if self.args.reorder and old_stage == 0 and self.after_stage0:
            self.reorder(trainer)

    def reorder(self, trainer) -> None:
        from kdlora.elastic import importance

        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "importance_dataloader"):
            raise ValueError("importance.reorder needs a datamodule with an importance_dataloader (training batches): "
                             "pass datamodule= to Trainer.fit")
        importance.reorder_by_importance(self.encoder, datamodule.importance_dataloader(),
                                         num_batches=self.args.batches, hidden=self.args.hidden)


def check_checkpoint_projections(checkpoint: dict) -> None:
    """Refuse a checkpoint whose feature projections are free matrices (before they were made orthonormal)."""
    free = [k for k in checkpoint.get("state_dict", {}) if k.startswith("projections.") and ".parametrizations." not in k]
    if free:
        raise ValueError(f"checkpoint holds free feature projections ({free[0]}, ...) from before they were made "
                         "orthonormal (kdlora.losses.orthonormal_projection); this version cannot resume or load it")


def make_sampler(space: SearchSpace, sampling: SamplingArgs, members: list[SubnetConfig],
                 sample_palette_default: bool) -> SubnetSampler:
    """The subnet sampler of `sampling` (`members`: the palette, cycled through with ``sample_palette``,
    `sample_palette_default` where it is None)."""
    sample_palette = sample_palette_default if sampling.sample_palette is None else sampling.sample_palette
    untrained = [m.name for m in members if m not in (space.max_config, space.smallest())]
    if sampling.sandwich and sampling.num_subnets == 1 and untrained:
        log.warning("num_subnets=1 with the sandwich rule trains only the smallest subnet beside the maxnet: palette "
                    "members %s are never trained directly (num_subnets >= 2 with sample_palette trains each in turn)",
                    ", ".join(untrained))
    return SubnetSampler(space, sampling.num_subnets, sampling.sandwich, sampling.per_layer, run_seed(sampling.sampler_seed),
                         members=members if sample_palette else None)


def feature_projections(space: SearchSpace, feature_dim: int) -> nn.ModuleDict:
    """The maxnet-owned orthonormal-row projections U^l (d_low × H) of the layers feature distillation runs on
    (those the smallest subnet keeps)."""
    H = space.max_config.hidden_size
    return nn.ModuleDict({str(l): orthonormal_projection(H, feature_dim) for l in space.smallest().layers})


class MLFSModule(FineTuningModule):
    """The Lightning side of MLFS that the GLUE and the causal-LM super-transformers share.

    A subclass builds its ``encoder``, ``schedule`` (`StageSchedule`) and ``palette_run``, then calls
    `compose_mlfs` for the sampler, the maxnet-owned feature projections, the `MLFSStep` and the
    `ImportanceOrdering`; the hooks below drive them. It must define the `MLFSTask` methods and set
    ``gradient_clip``. Every hook calls ``super()`` first, so a subclass lists this base before any
    other module base (``SuperTransformer(MLFSModule, GLUEModule)``): the other base's set-up (the
    export check, a regression head's init) then runs before the MLFS set-up, as it must.
    """

    def compose_mlfs(self, space: SearchSpace, sampling: SamplingArgs, distillation: MLFSDistillationArgs,
                     importance: ImportanceArgs, sample_palette_default: bool, after_stage0: bool = False) -> None:
        self.sampler = make_sampler(space, sampling, self.palette_run.members, sample_palette_default=sample_palette_default)
        self.projections = feature_projections(space, distillation.feature_dim)
        self.space = space
        self.mlfs_step = MLFSStep(self, self.encoder, space, self.projections, distillation)
        self.importance = ImportanceOrdering(self.encoder, importance, after_stage0=after_stage0)
        self.stage = 0  # the stage the optimizer was built for; restored from checkpoints

    # ---- Lightning hooks of the MLFS training: the stage schedule, the step, importance ordering ----
    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit":
            self.schedule.make_every_stage_trainable(self.projections)  # for DDP, which wraps the module right after this hook
            self.importance.at_fit_start(self.trainer)

    def configure_optimizers(self):
        self.schedule.enter(self.stage, self.projections, self.distillation.feature_weight > 0)
        return self.schedule.optimizer(self.stage, self.projections, self.optimizer_args, self.schedule.steps(self.trainer, self.stage))

    def on_train_epoch_start(self) -> None:
        stage = self.schedule.stage_for_epoch(self.current_epoch)
        if stage != self.stage:
            self.importance.at_stage_change(self.trainer, self.stage)
            self.stage = stage
            self.trainer.strategy.setup_optimizers(self.trainer)  # calls configure_optimizers
            log.info("MLFS stage %d from epoch %d", stage, self.current_epoch)

    def training_step(self, batch, batch_idx):
        clip = (lambda opt: self.clip_gradients(opt, gradient_clip_val=self.gradient_clip, gradient_clip_algorithm="norm")
                if self.gradient_clip > 0 else None)
        subnets = self.sampler.sample(self.stage, self.global_step)
        losses = self.mlfs_step.step(self.optimizers(), self.lr_schedulers(), batch, subnets, self.stage, clip)
        self.palette_run.count_step(subnets)
        log_step_losses(self, losses, self.stage)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)  # never from non-finite weights
        checkpoint["kdlora_mlfs_stage"] = self.stage
        checkpoint["kdlora_palette_history"] = self.palette_run.history_state()
        checkpoint["kdlora_trained_steps"] = dict(self.palette_run.trained_steps)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        check_checkpoint_projections(checkpoint)
        super().on_load_checkpoint(checkpoint)
        # Before the optimizer is built and its state restored, so the param groups match.
        self.stage = int(checkpoint.get("kdlora_mlfs_stage", 0))
        self.palette_run.load_history(checkpoint.get("kdlora_palette_history", []))
        self.palette_run.trained_steps.update(checkpoint.get("kdlora_trained_steps", {}))
