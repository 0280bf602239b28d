"""Which sub-networks MLFS trains and evaluates: the search space, the per-step sampler, the palette.

The sampler is stateless: the subnets of a step are a pure function of (seed, stage, global step).
Every DDP rank therefore samples the same subnets without communicating, and a run resumed from a
checkpoint samples exactly what the uninterrupted run would have.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np

from kdlora.elastic.config import SubnetConfig, evenly_spread_layers

DEFAULT_FRACTIONS = (1.0, 0.75, 0.5, 0.25)
DEFAULT_PALETTE = ("max", 0.75, 0.5, "min")
# The paper's minnet: 45M of BERT-base's 110M parameters.
PAPER_MINNET_RATIO = 0.41
PAPER_FRACTIONS = (1.0, 0.75, 0.5)


def _round_to(value: float, multiple: int) -> int:
    return max(multiple, int(math.floor(value / multiple + 0.5)) * multiple)


def _choices(values: Sequence[int], what: str, upper: int) -> tuple[int, ...]:
    """Distinct, descending, validated choices."""
    out = tuple(sorted({int(v) for v in values}, reverse=True))
    if not out:
        raise ValueError(f"search space: {what} needs at least one choice")
    if out[-1] < 1 or out[0] > upper:
        raise ValueError(f"search space: {what} choices {list(out)} must lie in [1, {upper}] (the maxnet's value)")
    return out


@dataclass(frozen=True)
class SearchSpace:
    """Choices per dimension. The head size stays the maxnet's, so a subnet with hidden h and a heads
    has attention width a·head_dim, which may be less than h (but not more: exported HF models need
    a·head_dim <= h). Hidden sizes are therefore multiples of the head size, and heads are drawn
    among the choices that fit the drawn hidden size."""

    hidden_sizes: tuple[int, ...]
    num_heads: tuple[int, ...]
    intermediate_sizes: tuple[int, ...]
    depths: tuple[int, ...]
    max_config: SubnetConfig

    @property
    def num_layers(self) -> int:
        return len(self.max_config.layers)

    @classmethod
    def from_max(
        cls,
        max_config: SubnetConfig,
        hidden_sizes: Optional[Sequence[int]] = None,
        num_heads: Optional[Sequence[int]] = None,
        intermediate_sizes: Optional[Sequence[int]] = None,
        depths: Optional[Sequence[int]] = None,
        fractions: Sequence[float] = DEFAULT_FRACTIONS,
    ) -> "SearchSpace":
        """Explicit choices where given, else `fractions` of the maxnet: hidden sizes rounded to
        multiples of the head dimension, FFN sizes to multiples of 64 (8 for tiny models), heads and
        depths rounded to integers (at least 1)."""
        if any(not 0.0 < f <= 1.0 for f in fractions):
            raise ValueError(f"search space: fractions must lie in (0, 1], got {list(fractions)}")
        H = max_config.hidden_size
        A = _uniform(max_config.num_heads, "num_heads")
        I = _uniform(max_config.intermediate_size, "intermediate_size")
        L = len(max_config.layers)
        head_dim = max_config.head_dim
        ffn_multiple = 64 if I >= 512 else 8
        space = cls(
            hidden_sizes=_choices(hidden_sizes or [_round_to(f * H, head_dim) for f in fractions], "hidden_sizes", H),
            num_heads=_choices(num_heads or [max(1, round(f * A)) for f in fractions], "num_heads", A),
            intermediate_sizes=_choices(intermediate_sizes or [_round_to(f * I, ffn_multiple) for f in fractions], "intermediate_sizes", I),
            depths=_choices(depths or [max(1, math.floor(f * L + 0.5)) for f in fractions], "depths", L),
            max_config=max_config,
        )
        bad = [h for h in space.hidden_sizes if h % head_dim]
        if bad:
            raise ValueError(f"search space: hidden_sizes {bad} are not multiples of the head size {head_dim}")
        return space

    @classmethod
    def build(cls, max_config: SubnetConfig, spec: Optional[dict[str, Any] | str] = None,
              count: Optional[Callable[[SubnetConfig], int]] = None) -> "SearchSpace":
        """From a YAML dict with optional keys hidden_sizes, num_heads, intermediate_sizes, depths, fractions,
        or a preset: ``"paper"`` / ``{preset: paper, ...}`` (explicit dimension keys beside it override
        the preset's choices). The paper preset needs `count`, the parameter count of a subnet."""
        if isinstance(spec, str):
            spec = {"preset": spec}
        spec = dict(spec or {})
        known = {"hidden_sizes", "num_heads", "intermediate_sizes", "depths", "fractions", "preset"}
        unknown = set(spec) - known
        if unknown:
            raise ValueError(f"search space: unknown keys {sorted(unknown)} (known: {sorted(known)})")
        preset = spec.pop("preset", None)
        if preset is not None:
            if preset != "paper":
                raise ValueError(f"search space: unknown preset {preset!r} (known: 'paper')")
            if "fractions" in spec:
                raise ValueError("search space: the paper preset fixes the fractions; give explicit choices instead")
            if count is None:
                raise ValueError("search space: the paper preset needs the maxnet's parameter counts (count=)")
            spec = {**paper_choices(max_config, count), **spec}
        fractions = spec.pop("fractions", None) or DEFAULT_FRACTIONS
        return cls.from_max(max_config, fractions=fractions, **spec)

    @property
    def head_dim(self) -> int:
        return self.max_config.head_dim

    def heads_fitting(self, hidden_size: int) -> tuple[int, ...]:
        """Head counts whose attention width fits in `hidden_size` (exported HF models need it)."""
        fitting = tuple(a for a in self.num_heads if a * self.head_dim <= hidden_size)
        return fitting or (max(1, hidden_size // self.head_dim),)

    def config(self, hidden_size: int, num_heads: int, intermediate_size: int, depth: int) -> SubnetConfig:
        return SubnetConfig(
            hidden_size=hidden_size,
            num_heads=num_heads,
            intermediate_size=intermediate_size,
            layers=tuple(evenly_spread_layers(self.num_layers, depth)),
        )

    def smallest(self, full_depth: bool = False) -> SubnetConfig:
        depth = self.num_layers if full_depth else self.depths[-1]
        hidden = self.hidden_sizes[-1]
        return self.config(hidden, self.heads_fitting(hidden)[-1], self.intermediate_sizes[-1], depth)

    def nearest(self, fraction: float) -> SubnetConfig:
        """The subnet whose every dimension is the choice nearest to `fraction` of the maxnet's."""
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"palette fraction must lie in (0, 1], got {fraction}")

        def pick(choices: tuple[int, ...], full: int) -> int:
            return min(choices, key=lambda c: (abs(c - fraction * full), -c))

        m = self.max_config
        hidden = pick(self.hidden_sizes, m.hidden_size)
        return self.config(
            hidden,
            pick(self.heads_fitting(hidden), _uniform(m.num_heads, "num_heads")),
            pick(self.intermediate_sizes, _uniform(m.intermediate_size, "intermediate_size")),
            pick(self.depths, self.num_layers),
        )


def paper_choices(max_config: SubnetConfig, count: Callable[[SubnetConfig], int]) -> dict[str, list[int]]:
    """The `paper` preset: a minnet of ≈ PAPER_MINNET_RATIO (0.41) of the maxnet's parameters, as MLFS's
    45M of BERT-base's 110M. Heads, FFN width and depth: 1, 3/4 and 1/2 of the maxnet's. Hidden size: the
    maxnet's and, when the minnet at full hidden width is still larger than the target (a large share of
    embeddings, e.g. MiniLM's or DeBERTa-v3's vocabulary), down to the multiple of the head size whose minnet
    is nearest the target, with one choice halfway. On BERT-base that keeps hidden 768 (minnet 45.6M, 0.42),
    on MiniLM-L6 it gives hidden 384/320/256 (minnet 9.8M of 22.7M, 0.43); README lists the mapping."""
    base = SearchSpace.from_max(max_config, hidden_sizes=[max_config.hidden_size], fractions=PAPER_FRACTIONS)
    total = count(max_config)
    head_dim, H = base.head_dim, max_config.hidden_size
    narrowest = max(head_dim, base.num_heads[-1] * head_dim)  # the minnet's heads must fit its hidden size

    def ratio(hidden: int) -> float:
        return count(base.config(hidden, base.num_heads[-1], base.intermediate_sizes[-1], base.depths[-1])) / total

    candidates = range(H, narrowest - 1, -head_dim)
    low = min(candidates, key=lambda h: (abs(ratio(h) - PAPER_MINNET_RATIO), -h))
    hidden = sorted({H, _round_to((H + low) / 2, head_dim), low}, reverse=True)
    return {"hidden_sizes": hidden, "num_heads": list(base.num_heads), "intermediate_sizes": list(base.intermediate_sizes),
            "depths": list(base.depths)}


def _uniform(value: int | tuple, what: str) -> int:
    if isinstance(value, (tuple, list)):
        if len(set(value)) != 1:
            raise ValueError(f"the maxnet must have the same {what} in every layer, got {value}")
        return int(value[0])
    return int(value)


class SubnetSampler:
    """K subnets per training step, by stage (Algorithm 1 of MLFS):

    - stage 0: none (LoRA on the maxnet alone);
    - stage 1: hidden size, heads and FFN size sampled, every layer kept;
    - stage 2: widths and depth sampled (layers evenly spread over the maxnet's).

    Args:
        space: the search space.
        num_subnets: K, subnets per step besides the maxnet.
        sandwich: make the stage's smallest subnet one of the K every step (the "sandwich rule").
        per_layer: sample heads and FFN size independently for every kept layer.
        seed: the run seed; with the stage and global step it fixes the sample.
        members: subnets that must each be trained directly (the palette). When given, the first slot
            left after the sandwich's smallest takes these in turn, step after step (those the stage
            can train: not the maxnet or the stage's smallest; in stage 1 the full-depth ones), so each
            is trained every len(eligible) steps; further slots are drawn at random. A stage with no
            eligible member draws every slot at random.
    """

    def __init__(self, space: SearchSpace, num_subnets: int = 2, sandwich: bool = True, per_layer: bool = False, seed: int = 0,
                 members: Optional[Sequence[SubnetConfig]] = None) -> None:
        if num_subnets < 1:
            raise ValueError(f"num_subnets must be at least 1, got {num_subnets}")
        self.space = space
        self.num_subnets = num_subnets
        self.sandwich = sandwich
        self.per_layer = per_layer
        self.seed = int(seed)
        self.members = tuple(members) if members is not None else None

    def eligible_members(self, stage: int) -> tuple[SubnetConfig, ...]:
        """The `members` that `stage` trains in turn (see the class docstring); () without members."""
        if self.members is None or stage == 0:
            return ()
        full_depth = stage == 1
        skip = {self.space.max_config, self.space.smallest(full_depth=full_depth) if self.sandwich else None}
        return tuple(m for m in self.members
                     if m not in skip and (not full_depth or len(m.layers) == self.space.num_layers))

    def rng(self, stage: int, step: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, stage, step])

    def sample(self, stage: int, step: int) -> list[SubnetConfig]:
        if stage not in (0, 1, 2):
            raise ValueError(f"stage must be 0, 1 or 2, got {stage}")
        if stage == 0:
            return []
        rng = self.rng(stage, step)
        full_depth = stage == 1
        subnets: list[SubnetConfig] = []
        if self.sandwich:
            subnets.append(self.space.smallest(full_depth=full_depth))
        members = self.eligible_members(stage)
        if members and len(subnets) < self.num_subnets:
            subnets.append(members[step % len(members)])
        while len(subnets) < self.num_subnets:
            subnets.append(self._draw(rng, full_depth))
        return subnets

    def _draw(self, rng: np.random.Generator, full_depth: bool) -> SubnetConfig:
        s = self.space
        # Redraw (a bounded number of times) rather than spend a slot on the maxnet itself,
        # which every step already trains.
        for _ in range(16):
            depth = s.num_layers if full_depth else int(rng.choice(s.depths))
            hidden = int(rng.choice(s.hidden_sizes))
            head_choices = s.heads_fitting(hidden)
            if self.per_layer:
                heads = tuple(int(rng.choice(head_choices)) for _ in range(depth))
                ffn = tuple(int(rng.choice(s.intermediate_sizes)) for _ in range(depth))
            else:
                heads, ffn = int(rng.choice(head_choices)), int(rng.choice(s.intermediate_sizes))
            cfg = SubnetConfig(hidden_size=hidden, num_heads=heads, intermediate_size=ffn,
                               layers=tuple(evenly_spread_layers(s.num_layers, depth)))
            if cfg != s.max_config:
                return cfg
        return cfg


def palette_members(space: SearchSpace, members: Optional[Sequence[Any]] = None) -> list[SubnetConfig]:
    """Fixed evaluation subnets in the given order, duplicates dropped.

    Each member is ``"max"``, ``"min"``, a fraction in (0, 1) (every dimension at the choice
    nearest that fraction of the maxnet), or an explicit dict with hidden_size, num_heads,
    intermediate_size and either ``depth`` (evenly spread) or ``layers``.
    """
    out: list[SubnetConfig] = []
    for m in members if members is not None else DEFAULT_PALETTE:
        if m == "max":
            cfg = space.max_config
        elif m == "min":
            cfg = space.smallest()
        elif isinstance(m, (int, float)) and not isinstance(m, bool):
            cfg = space.nearest(float(m))
        elif isinstance(m, dict):
            d = dict(m)
            if "depth" in d:
                d["layers"] = tuple(evenly_spread_layers(space.num_layers, int(d.pop("depth"))))
            try:
                cfg = SubnetConfig.from_dict(d)
            except (KeyError, TypeError) as e:
                raise ValueError(f"palette member {m!r}: needs hidden_size, num_heads, intermediate_size and depth or layers ({e})") from None
        else:
            raise ValueError(f"palette member {m!r}: expected 'max', 'min', a fraction or a dict")
        cfg.validate(space.max_config)
        if cfg not in out:
            out.append(cfg)
    return out
