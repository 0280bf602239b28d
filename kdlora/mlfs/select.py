"""The best sub-network of a trained super-transformer for a budget, measured on the device it will run on.

    python -m kdlora.mlfs.select --checkpoint runs/.../best.ckpt --max-latency-ratio 0.5 --out small/
    python -m kdlora.mlfs.select --checkpoint best.ckpt --max-latency-ms 20 --batch-size 1 --seq-len 128 --out small/
    python -m kdlora.mlfs.select --checkpoint best.ckpt --max-params 15e6 --device cuda --out small/

MLFS trains a whole search space but its palette names only a few members. This searches the space
itself: the palette members and the space's corners, random subnets, then generations of mutations
and crossovers of the best candidates under the budget (a small evolutionary search). Every candidate
is scored on a held-out split of the training data (the run's own `holdout_fraction` split, or a seeded
`--holdout-fraction` of train; never dev, which stays the split a result is reported on), and its
latency is measured as a standalone exported model on `--device` (`kdlora.eval.latency.measure_latency_ms`:
warm-up, synchronised, median of `--repeats` forward passes on a batch of full-length sequences). The
maxnet is timed the same way, for `--max-latency-ratio`.

Written to --out (which must not exist or be empty): ``search.json`` / ``search.md`` (every candidate:
params, latency, held-out score, under budget or not, on the Pareto front or not), ``pareto.png`` (score
vs latency and vs parameters) and ``model/``, the best candidate under the budget as a standalone
Hugging Face model with its dev score in ``model/subnet.json`` when `--report-dev` is given.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from kdlora.elastic.config import SubnetConfig
from kdlora.mlfs.search_space import SearchSpace
from kdlora.training.args import nested_hparams

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# Budget and candidates
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Budget:
    """At most one of each limit; a candidate meets the budget when it satisfies every limit given."""

    max_latency_ms: Optional[float] = None
    max_latency_ratio: Optional[float] = None
    max_params: Optional[float] = None

    def __post_init__(self) -> None:
        given = {k: v for k, v in vars(self).items() if v is not None}
        if not given:
            raise ValueError("give a budget: --max-latency-ms, --max-latency-ratio or --max-params")
        bad = {k: v for k, v in given.items() if not (v > 0)}
        if bad:
            raise ValueError(f"budget limits must be positive, got {bad}")

    def met_by(self, c: "Candidate") -> bool:
        return ((self.max_latency_ms is None or c.latency_ms <= self.max_latency_ms)
                and (self.max_latency_ratio is None or c.latency_ratio <= self.max_latency_ratio)
                and (self.max_params is None or c.params <= self.max_params))

    def describe(self) -> str:
        parts = []
        if self.max_latency_ms is not None:
            parts.append(f"latency <= {self.max_latency_ms:g} ms")
        if self.max_latency_ratio is not None:
            parts.append(f"latency <= {self.max_latency_ratio:g} x maxnet")
        if self.max_params is not None:
            parts.append(f"params <= {self.max_params:,.0f}")
        return " and ".join(parts)


@dataclass
class Candidate:
    config: SubnetConfig
    params: int
    latency_ms: float
    latency_ratio: float
    score: float
    metrics: dict[str, float] = field(default_factory=dict)
    source: str = ""  # palette, corner, random, mutation, crossover
    within_budget: bool = False
    pareto: bool = False

    def row(self) -> dict:
        return {"name": self.config.name, "params": self.params, "latency_ms": self.latency_ms,
                "latency_ratio": self.latency_ratio, "score": self.score, "metrics": self.metrics,
                "source": self.source, "within_budget": self.within_budget, "pareto": self.pareto,
                "subnet": self.config.to_dict()}


def random_config(space: SearchSpace, rng: np.random.Generator) -> SubnetConfig:
    """A uniformly drawn (hidden, heads, FFN, depth) point of the space (heads that fit the hidden size)."""
    hidden = int(rng.choice(space.hidden_sizes))
    return space.config(hidden, int(rng.choice(space.heads_fitting(hidden))), int(rng.choice(space.intermediate_sizes)),
                        int(rng.choice(space.depths)))


def _dims(space: SearchSpace, cfg: SubnetConfig) -> dict[str, int]:
    return {"hidden": cfg.hidden_size, "heads": max(cfg.heads_per_layer()), "ffn": max(cfg.ffn_per_layer()),
            "depth": cfg.depth}


def _build(space: SearchSpace, d: dict[str, int]) -> SubnetConfig:
    heads = space.heads_fitting(d["hidden"])
    head = d["heads"] if d["heads"] in heads else min(heads, key=lambda a: abs(a - d["heads"]))
    return space.config(d["hidden"], head, d["ffn"], d["depth"])


def mutate(space: SearchSpace, cfg: SubnetConfig, rng: np.random.Generator) -> SubnetConfig:
    """Move one dimension to a neighbouring choice of the space."""
    d = _dims(space, cfg)
    choices = {"hidden": space.hidden_sizes, "heads": space.heads_fitting(d["hidden"]), "ffn": space.intermediate_sizes,
               "depth": space.depths}
    movable = [k for k, v in choices.items() if len(v) > 1]
    if not movable:
        return cfg
    key = movable[int(rng.integers(len(movable)))]
    options = sorted(choices[key])
    i = options.index(d[key]) if d[key] in options else int(np.argmin([abs(o - d[key]) for o in options]))
    j = min(len(options) - 1, max(0, i + (1 if rng.random() < 0.5 else -1)))
    if j == i:
        j = i - 1 if i > 0 else i + 1
    d[key] = options[j]
    return _build(space, d)


def crossover(space: SearchSpace, a: SubnetConfig, b: SubnetConfig, rng: np.random.Generator) -> SubnetConfig:
    """Each dimension from one parent or the other."""
    da, db = _dims(space, a), _dims(space, b)
    return _build(space, {k: (da if rng.random() < 0.5 else db)[k] for k in da})


def pareto_front(candidates: Sequence[Candidate]) -> list[Candidate]:
    """Candidates no other candidate beats on score while being at least as fast (ties: the faster one)."""
    front, best = [], float("-inf")
    for c in sorted(candidates, key=lambda c: (c.latency_ms, -c.score)):
        if c.score > best:
            front.append(c)
            best = c.score
    return front


def search(evaluate: Callable[[SubnetConfig, str], Candidate], space: SearchSpace, budget: Budget,
           seeds: Sequence[tuple[SubnetConfig, str]], num_random: int = 16, generations: int = 4,
           population: int = 8, children: int = 8, seed: int = 0) -> list[Candidate]:
    """Every evaluated candidate, in evaluation order (each config once).

    Seeds (palette members, corners) and `num_random` random configs first; then `generations` rounds
    that breed `children` new configs from the `population` best-scoring candidates under the budget
    (half mutations, half crossovers), falling back to the fastest candidates while none meets it.
    """
    rng = np.random.default_rng(seed)
    seen: dict[SubnetConfig, Candidate] = {}

    def add(cfg: SubnetConfig, source: str) -> None:
        if cfg not in seen:
            c = evaluate(cfg, source)
            c.within_budget = budget.met_by(c)
            seen[cfg] = c

    for cfg, source in seeds:
        add(cfg, source)
    for _ in range(num_random):
        add(random_config(space, rng), "random")
    for _ in range(generations):
        pool = [c for c in seen.values() if c.within_budget]
        parents = (sorted(pool, key=lambda c: -c.score) if pool
                   else sorted(seen.values(), key=lambda c: c.latency_ms))[:population]
        tries = 0
        new = 0
        while new < children and tries < 20 * children:
            tries += 1
            if len(parents) > 1 and rng.random() < 0.5:
                i, j = rng.choice(len(parents), size=2, replace=False)
                cfg, source = crossover(space, parents[i].config, parents[j].config, rng), "crossover"
            else:
                cfg, source = mutate(space, parents[int(rng.integers(len(parents)))].config, rng), "mutation"
            if cfg not in seen:
                add(cfg, source)
                new += 1
    result = list(seen.values())
    for c in pareto_front(result):
        c.pareto = True
    return result


def best_within(candidates: Sequence[Candidate]) -> Optional[Candidate]:
    """The highest held-out score under the budget (ties: the faster)."""
    ok = [c for c in candidates if c.within_budget]
    return max(ok, key=lambda c: (c.score, -c.latency_ms)) if ok else None


# ----------------------------------------------------------------------------------------------
# Scoring on a trained supernet
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def score_subnet(encoder, cfg: SubnetConfig, batches: Sequence[dict], spec) -> tuple[float, dict[str, float]]:
    """(GLUE score, metrics) of subnet `cfg` of `encoder` over `batches` (already on the encoder's device)."""
    from kdlora.eval.metrics import glue_score, predictions_from_logits, task_metrics

    metrics = task_metrics(spec).to(batches[0]["input_ids"].device)
    encoder.set_sub_network(cfg)
    try:
        for batch in batches:
            inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
            metrics.update(predictions_from_logits(encoder(**inputs).logits, spec.is_regression), batch["labels"])
    finally:
        encoder.reset_super_network()
    values = {k: float(v) for k, v in metrics.compute().items()}
    return glue_score(values), values


def selection_data(hparams: dict, holdout_fraction: Optional[float], data_dir: Optional[str],
                   max_samples: Optional[int], split: str):
    """The data module of the run (from the checkpoint's data hyperparameters) and its `split` loader.

    split ``holdout``: the run's held-out part of train if it had one, else a seeded `holdout_fraction` of
    train (which the run may have trained on: a note says so). split ``dev``: the task's dev set.
    """
    from kdlora.data.glue import GLUEDataModule

    # Lightning saves its own bookkeeping beside the arguments (`_instantiator` under LightningCLI): not ours.
    hp = {k: v for k, v in hparams.items() if not k.startswith("_")}
    if data_dir is not None:
        hp["data_dir"] = data_dir
    run_fraction = float(hp.get("holdout_fraction") or 0.0)
    if split == "holdout":
        fraction = holdout_fraction if holdout_fraction is not None else (run_fraction or 0.1)
        if not run_fraction:
            print(f"[kdlora] note: the run trained on all of train; candidates are scored on a seeded {fraction:g} of it "
                  "(train with data.holdout_fraction > 0 for an untouched selection split)", file=sys.stderr)
        hp["holdout_fraction"] = fraction
    else:
        hp["holdout_fraction"] = 0.0
    hp["max_eval_samples"] = None
    dm = GLUEDataModule(**hp)
    dm.setup("validate")
    name = "holdout" if split == "holdout" else dm.spec.validation[0].hub
    ds = dm.datasets[name]
    if max_samples is not None and max_samples < len(ds):
        ds = ds.select(range(max_samples))
    return dm, dm._loader(ds, dm.eval_batch_size)


def write_search_report(candidates: Sequence[Candidate], best: Optional[Candidate], budget: Budget, out: Path,
                        title: str) -> dict[str, Path]:
    from kdlora.io import write_atomic

    rows = sorted((c.row() for c in candidates), key=lambda r: r["latency_ms"])
    paths = {"json": out / "search.json", "md": out / "search.md", "png": out / "pareto.png"}
    write_atomic(paths["json"], json.dumps({"budget": vars(budget), "best": best.row() if best else None,
                                            "candidates": rows}, indent=2) + "\n")
    lines = [f"## {title}", "", f"Budget: {budget.describe()}. Best under it: "
             + (f"`{best.config.name}` (held-out score {best.score:.4f}, {best.latency_ms:.2f} ms, "
                f"{best.latency_ratio:.2f}x maxnet, {best.params / 1e6:.2f}M params)" if best else "none"), "",
             "| subnet | source | params (M) | latency (ms) | latency / maxnet | held-out score | under budget | Pareto |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| `{r['name']}` | {r['source']} | {r['params'] / 1e6:.2f} | {r['latency_ms']:.2f} | "
                     f"{r['latency_ratio']:.2f} | {r['score']:.4f} | {'yes' if r['within_budget'] else ''} | "
                     f"{'yes' if r['pareto'] else ''} |")
    write_atomic(paths["md"], "\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), dpi=100)
    for ax, key, unit, label in zip(fig.subplots(1, 2), ("latency_ms", "params"), (1.0, 1e-6),
                                    ("latency (ms)", "parameters (M)")):
        for ok, colour, name in ((False, "tab:gray", "over budget"), (True, "tab:blue", "under budget")):
            pts = [r for r in rows if r["within_budget"] == ok]
            ax.scatter([r[key] * unit for r in pts], [r["score"] for r in pts], s=14, c=colour, label=name)
        front = sorted((r for r in rows if r["pareto"]), key=lambda r: r[key])
        if key == "latency_ms":
            ax.plot([r[key] * unit for r in front], [r["score"] for r in front], "-", c="tab:orange", label="Pareto front")
        if best is not None:
            b = best.row()
            ax.scatter([b[key] * unit], [b["score"]], marker="*", s=160, c="tab:red", label=f"chosen {b['name']}")
        ax.set_xlabel(label)
        ax.set_ylabel("held-out score")
        ax.grid(alpha=0.3)
    fig.axes[0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    tmp = paths["png"].with_name(".pareto.tmp.png")
    fig.savefig(tmp)
    tmp.replace(paths["png"])
    return paths


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kdlora.mlfs.select", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="SuperTransformer Lightning checkpoint (.ckpt)")
    budget = parser.add_argument_group("budget (at least one)")
    budget.add_argument("--max-latency-ms", type=float)
    budget.add_argument("--max-latency-ratio", type=float, help="latency as a fraction of the maxnet's, measured alike")
    budget.add_argument("--max-params", type=float)
    parser.add_argument("--out", required=True, help="new (or empty) directory for the report and the chosen model")
    parser.add_argument("--batch-size", type=int, default=1, help="latency batch size")
    parser.add_argument("--seq-len", type=int, default=128, help="latency sequence length")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]: where latency is measured")
    parser.add_argument("--repeats", type=int, default=10, help="timed forward passes per candidate (median)")
    parser.add_argument("--split", choices=("holdout", "dev"), default="holdout",
                        help="where candidates are scored (default: held-out part of train; dev only to reproduce a palette)")
    parser.add_argument("--holdout-fraction", type=float, help="fraction of train to score on when the run had no holdout")
    parser.add_argument("--data-dir", help="local GLUE directory (default: the run's)")
    parser.add_argument("--max-samples", type=int, help="score on at most this many examples")
    parser.add_argument("--random", type=int, default=16, help="random candidates before the evolution")
    parser.add_argument("--generations", type=int, default=4)
    parser.add_argument("--children", type=int, default=8, help="new candidates per generation")
    parser.add_argument("--population", type=int, default=8, help="parents per generation")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--report-dev", action="store_true", help="also score the chosen subnet on dev (reported, not selected on)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return _run(args)
    except (ValueError, FileNotFoundError, KeyError, RuntimeError) as e:
        print(f"kdlora: error: {e}", file=sys.stderr)
        return 2


def _run(args) -> int:
    from kdlora.eval.latency import measure_latency_ms
    from kdlora.mlfs.export import load_encoder

    budget = Budget(args.max_latency_ms, args.max_latency_ratio, args.max_params)
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out} already exists and is not an empty directory: choose a new one (nothing is overwritten)")
    for name in ("repeats", "random", "children", "population"):
        if getattr(args, name) < (1 if name in ("repeats", "population") else 0):
            raise ValueError(f"--{name} must be positive, got {getattr(args, name)}")
    if args.holdout_fraction is not None and not 0.0 < args.holdout_fraction < 1.0:
        raise ValueError(f"--holdout-fraction must lie in (0, 1), got {args.holdout_fraction}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: CUDA is not available here")
    checkpoint = Path(args.checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"checkpoint {checkpoint} does not exist")

    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    data_hparams = saved.get("datamodule_hyper_parameters")
    hparams = nested_hparams(saved.get("hyper_parameters") or {}, "SuperTransformer")  # flat keys of before the groups too
    if not data_hparams:
        raise ValueError(f"{checkpoint} holds no data module hyperparameters: cannot rebuild its data to score subnets")
    encoder, tokenizer = load_encoder(checkpoint)
    encoder.eval().to(device)
    sampling, evaluation = hparams.get("sampling") or {}, hparams.get("evaluation") or {}  # the module's argument groups
    space = SearchSpace.build(encoder.max_config, sampling.get("search_space"), count=encoder.parameter_count)
    dm, loader = selection_data(data_hparams, args.holdout_fraction, args.data_dir, args.max_samples, args.split)
    batches = [{k: v.to(device) for k, v in b.items()} for b in loader]
    vocab = encoder.model.get_input_embeddings().weight.shape[0]

    def latency(cfg: SubnetConfig) -> float:
        model = encoder.materialize(cfg).to(device)
        return measure_latency_ms(model, vocab, args.batch_size, args.seq_len, repeats=args.repeats, device=device)

    max_latency = latency(encoder.max_config)

    def evaluate(cfg: SubnetConfig, source: str) -> Candidate:
        ms = latency(cfg) if cfg != encoder.max_config else max_latency
        score, metrics = score_subnet(encoder, cfg, batches, dm.spec)
        c = Candidate(cfg, encoder.parameter_count(cfg), ms, ms / max_latency, score, metrics, source)
        log.info("%-28s %-9s %6.2fM %8.2f ms (%.2fx) score %.4f", cfg.name, source, c.params / 1e6, ms, c.latency_ratio, score)
        return c

    from kdlora.mlfs.search_space import palette_members

    seeds = [(cfg, "palette") for cfg in palette_members(space, evaluation.get("members"))]
    seeds += [(encoder.max_config, "corner"), (space.smallest(), "corner"), (space.smallest(full_depth=True), "corner")]
    candidates = search(evaluate, space, budget, seeds, args.random, args.generations, args.population, args.children, args.seed)
    best = best_within(candidates)
    title = f"{dm.spec.name}: subnets of {hparams.get('model_name_or_path', checkpoint.name)} on {args.device}"
    out.mkdir(parents=True, exist_ok=True)
    paths = write_search_report(candidates, best, budget, out, title)
    print(f"[kdlora] {len(candidates)} candidates; report {paths['md']} {paths['png']}")
    if best is None:
        print(f"kdlora: error: no candidate meets the budget ({budget.describe()}); the fastest measured "
              f"{min(c.latency_ms for c in candidates):.2f} ms, the smallest {min(c.params for c in candidates):,} params",
              file=sys.stderr)
        return 1
    info = {"selected_by": {"budget": vars(budget), "split": args.split, "score": best.score, "metrics": best.metrics,
                            "latency_ms": best.latency_ms, "latency_ratio": best.latency_ratio, "device": args.device,
                            "batch_size": args.batch_size, "seq_len": args.seq_len}}
    if args.report_dev:
        _, dev_loader = selection_data(data_hparams, None, args.data_dir, None, "dev")
        dev_batches = [{k: v.to(device) for k, v in b.items()} for b in dev_loader]
        info["dev_score"], info["dev_metrics"] = score_subnet(encoder, best.config, dev_batches, dm.spec)
    encoder.export_hf(best.config, out / "model", tokenizer)
    subnet_file = out / "model" / "subnet.json"
    subnet_file.write_text(json.dumps({**json.loads(subnet_file.read_text()), **info}, indent=2) + "\n")
    print(f"[kdlora] chosen {best.config.name}: held-out score {best.score:.4f}, {best.latency_ms:.2f} ms "
          f"({best.latency_ratio:.2f}x maxnet), {best.params / 1e6:.2f}M params -> {out / 'model'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
