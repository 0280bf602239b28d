"""The MLFS hyperparameter groups, as LightningCLI reads them (``--model.init_args.stages.epochs``).

Both super-transformers take them (`SuperTransformer` on GLUE, `CausalLMSuperTransformer` on text), besides the
shared `kdlora.training.args` groups (optimizer, LoRA, export). Each group checks its own values when built,
so a bad value is one clear error before any model loads. The old flat keys are in
`kdlora.training.args.RENAMED`, registered here for the two MLFS modules.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from kdlora.losses import check_feature_normalization, check_weight
from kdlora.training.args import LoRAArgs, OptimizerArgs, register_renamed

NUM_STAGES = 3
HEAD_STAGES = ("first", "all")


@dataclass(frozen=True)
class StageArgs:
    """The three MLFS stages: how long each runs and when a trainable head trains."""

    epochs: list[int] = field(default_factory=lambda: [1, 1, 1])
    """epochs of stages 0 (LoRA on the maxnet), 1 (widths sampled), 2 (widths and depth sampled); 0 skips a
    stage; epochs beyond their sum continue the last stage that has any"""
    head_stages: str = "first"
    """the stages a trainable head trains in: "first" (the first stage that runs; Eq. 7) or "all" """

    def __post_init__(self) -> None:
        epochs = list(self.epochs)
        if len(epochs) != NUM_STAGES or any(int(e) < 0 for e in epochs) or sum(int(e) for e in epochs) < 1:
            raise ValueError(f"stages.epochs must be 3 non-negative epoch counts (stages 0, 1, 2) with a positive sum, got {epochs}")
        if self.head_stages not in HEAD_STAGES:
            raise ValueError(f"stages.head_stages must be one of {list(HEAD_STAGES)} (the stages a trainable head trains "
                             f"in), got {self.head_stages!r}")


@dataclass(frozen=True)
class SamplingArgs:
    """Which subnets train beside the maxnet at each step (`kdlora.mlfs.search_space.SubnetSampler`)."""

    num_subnets: int = 2
    """K, subnets sampled per step besides the maxnet"""
    sandwich: bool = True
    """always include the stage's smallest subnet among the K"""
    per_layer: bool = False
    """sample heads and FFN width per layer"""
    sample_palette: Optional[bool] = None
    """the first slot left after the sandwich takes the palette members in turn (off: every slot random, as the
    paper); None: the module's default (GLUE off, decoders on)"""
    search_space: Optional[dict[str, Any] | str] = None
    """dict with optional hidden_sizes, num_heads, intermediate_sizes, depths, fractions, or a preset ("paper")"""
    sampler_seed: Optional[int] = None
    """seed of the subnet sampler (None: the run seed, ``PL_GLOBAL_SEED``)"""

    def __post_init__(self) -> None:
        if self.num_subnets < 0:
            raise ValueError(f"sampling.num_subnets must be >= 0, got {self.num_subnets}")


@dataclass(frozen=True)
class MLFSDistillationArgs:
    """What a subnet learns from the maxnet: L_j = (1−distill_weight)·task + distill_weight·(KD + feature_weight·features)."""

    distill_weight: float = 0.9
    """weight of a subnet's distillation terms (KD + feature_weight·features); its task loss gets 1 − distill_weight"""
    feature_weight: float = 0.1
    """weight of the feature term inside the distillation terms (paper: 0.1, on the squared L2 norm)"""
    gamma: float = 2.0
    """gradient-scaling exponent: subnet j's loss is scaled by (n_1/n_j)^gamma"""
    temperature: float = 1.0
    """KD temperature"""
    feature_dim: int = 128
    """d_low, rows of the (orthonormal-row) feature projections U"""
    feature_normalization: str = "none"
    """"none" (the paper's squared L2 norm) or "relative" (divided by the maxnet feature's squared norm)"""

    def __post_init__(self) -> None:
        check_feature_normalization(self.feature_normalization, "distillation.feature_normalization")
        check_weight("distillation.distill_weight", self.distill_weight)
        if self.feature_weight < 0 or self.gamma < 0 or self.temperature <= 0 or self.feature_dim < 1:
            raise ValueError("need distillation.feature_weight >= 0, gamma >= 0, temperature > 0, feature_dim >= 1")


@dataclass(frozen=True)
class ImportanceArgs:
    """Importance ordering (`kdlora.elastic.importance`): permute heads, FFN neurons (and hidden dimensions)
    so that every slice keeps the most important ones."""

    reorder: bool = False
    """rank on training batches and permute the maxnet's weights (its function is unchanged)"""
    batches: int = 8
    """training batches the ranking reads"""
    hidden: bool = False
    """rank and permute the hidden (residual-stream) dimensions too"""


@dataclass(frozen=True)
class EvaluationArgs:
    """What is evaluated and reported: the palette members, their latency and per-stage palettes.

    Only what is measured and written, not what was trained: ``train.py validate --ckpt_path`` may change it."""

    members: Optional[list[Any]] = None
    """the palette: "max", "min", fractions, or dicts (`kdlora.mlfs.search_space.palette_members`); None: the default"""
    measure_latency: Optional[bool] = None
    """time every member at fit end; None: the module's default (GLUE on, decoders off)"""
    latency_batch_size: int = 1
    latency_seq_len: int = 128
    stage_palettes: bool = False
    """with a held-out validation split, also measure the palette on dev at the end of each stage (GLUE)"""


@dataclass(frozen=True)
class MLFSLoRAArgs(LoRAArgs):
    """`LoRAArgs` with the MLFS defaults: the adapters of every stage on Q, K, V and the FFN, without dropout."""

    dropout: float = 0.0
    targets: Optional[list[str]] = field(default_factory=lambda: ["query", "key", "value", "intermediate", "output"])
    """module roles or family names to adapt"""


@dataclass(frozen=True)
class MLFSOptimizerArgs(OptimizerArgs):
    """`OptimizerArgs` with the MLFS defaults: a fresh AdamW per stage at 1e-3, gradients clipped at norm 1."""

    learning_rate: float = 1e-3
    gradient_clip: Optional[float] = 1.0


def mlfs_gradient_clip(value: Optional[float]) -> float:
    """The optimizer group's gradient_clip as the MLFS step uses it (None: 0, no clipping)."""
    clip = 0.0 if value is None else float(value)
    if clip < 0:
        raise ValueError(f"optimizer.gradient_clip must be >= 0 (0 or None: no clipping), got {value}")
    return clip


_RENAMED = {
    "stage_epochs": "stages.epochs", "head_stages": "stages.head_stages",
    "num_subnets": "sampling.num_subnets", "sandwich": "sampling.sandwich", "per_layer": "sampling.per_layer",
    "sample_palette": "sampling.sample_palette", "search_space": "sampling.search_space",
    "sampler_seed": "sampling.sampler_seed",
    "distill_weight": "distillation.distill_weight", "beta": "distillation.feature_weight", "gamma": "distillation.gamma",
    "temperature": "distillation.temperature", "feature_dim": "distillation.feature_dim",
    "feature_normalization": "distillation.feature_normalization",
    "gradient_clip": "optimizer.gradient_clip",
    "importance_reorder": "importance.reorder", "importance_batches": "importance.batches",
    "importance_hidden": "importance.hidden",
    "palette": "evaluation.members", "measure_latency": "evaluation.measure_latency",
    "latency_batch_size": "evaluation.latency_batch_size", "latency_seq_len": "evaluation.latency_seq_len",
    "stage_palettes": "evaluation.stage_palettes",
}
_MEANING = {"beta": "the weight of the feature term inside a subnet's distillation terms",
            "alpha": "the weight of a subnet's distillation terms; its task loss gets 1 − distill_weight"}
for _module in ("SuperTransformer", "CausalLMSuperTransformer"):
    register_renamed({**_RENAMED, "alpha": "distillation.distill_weight"}, module=_module, meaning=_MEANING)
