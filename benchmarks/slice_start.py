"""Where do sliced subnets start? Dev metric and divergence from the maxnet, before any subnet training.

A subnet is a slice of the fine-tuned teacher, so before MLFS trains anything it already has a
quality, and that starting point decides how many steps it needs. This measures, for the supernet's
default palette plus two members that isolate one dimension each, the dev metric and the divergence
from the maxnet's outputs (KL(maxnet ‖ subnet) for classification, MSE for regression), under three
weight orderings:

- ``original``: the checkpoint's order;
- ``heads+ffn``: heads and FFN neurons ranked by importance on training batches (what
  ``SuperTransformer(importance={"reorder": True})`` does);
- ``+hidden``: the residual-stream dimensions ranked and permuted as well.

Every ordering leaves the maxnet's function unchanged (checked here too). Importance uses training
batches only; dev is only evaluated.

    PYTHONPATH=. python benchmarks/slice_start.py --model runs/glue/export/minilm-fft-mrpc --task mrpc \\
        --data-dir ../shared/glue --out benchmarks/results/slice_start/slice_start
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from kdlora.data.glue import MODEL_COLUMNS, GLUEDataModule
from kdlora.data.tasks import get_task
from kdlora.elastic import ElasticTransformer, SubnetConfig
from kdlora.elastic.importance import reorder_by_importance
from kdlora.eval.metrics import glue_score, predictions_from_logits, task_metrics
from kdlora.io import write_atomic
from kdlora.mlfs.search_space import SearchSpace, palette_members
from kdlora.training.loading import load_classifier
from results_files import notes_for_output

ORDERINGS = ("original", "heads+ffn", "+hidden")


def members(encoder: ElasticTransformer) -> list[SubnetConfig]:
    """The default palette, plus: full hidden with 3/4 heads and FFN; 3/4 hidden at full depth."""
    space = SearchSpace.build(encoder.max_config, None)
    m, three_quarters = encoder.max_config, space.nearest(0.75)
    extra = [SubnetConfig(m.hidden_size, three_quarters.num_heads, three_quarters.intermediate_size, m.layers),
             SubnetConfig(three_quarters.hidden_size, three_quarters.num_heads, three_quarters.intermediate_size, m.layers)]
    out = palette_members(space, None)
    return out[:1] + [c for c in extra if c not in out] + out[1:]


@torch.no_grad()
def evaluate(encoder: ElasticTransformer, cfgs: list[SubnetConfig], batches: list[dict], spec) -> list[dict]:
    encoder.eval()
    encoder.reset_super_network()
    reference = [encoder(**{k: b[k] for k in MODEL_COLUMNS if k in b}).logits for b in batches]
    rows = []
    for cfg in cfgs:
        encoder.set_sub_network(cfg)
        metrics, divergence = task_metrics(spec), 0.0
        for b, ref in zip(batches, reference):
            logits = encoder(**{k: b[k] for k in MODEL_COLUMNS if k in b}).logits
            metrics.update(predictions_from_logits(logits, spec.is_regression), b["labels"])
            if spec.is_regression:
                divergence += F.mse_loss(logits.float(), ref.float(), reduction="sum").item()
            else:
                divergence += F.kl_div(logits.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="sum").item()
        values = {k: float(v) for k, v in metrics.compute().items()}
        rows.append({"subnet": cfg.name, "params": encoder.parameter_count(cfg), "metrics": values,
                     "score": glue_score(values), "divergence": divergence / sum(len(b["labels"]) for b in batches)})
    encoder.reset_super_network()
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="fine-tuned teacher directory (the maxnet)")
    ap.add_argument("--task", default="mrpc")
    ap.add_argument("--data-dir", default="../shared/glue")
    ap.add_argument("--importance-batches", type=int, default=8)
    ap.add_argument("--max-eval-samples", type=int, default=None)
    ap.add_argument("--out", default=None, help="write OUT.md and OUT.json")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    spec = get_task(args.task)
    data = GLUEDataModule(args.task, args.model, data_dir=args.data_dir, batch_size=32,
                          max_eval_samples=args.max_eval_samples)
    data.setup("fit")
    dev = list(data.val_dataloader())
    results = {}
    for ordering in ORDERINGS:
        model, _ = load_classifier(args.model, spec.num_labels, spec.is_regression)
        encoder = ElasticTransformer(model)
        if ordering != "original":
            torch.manual_seed(0)  # same training batches for every ordering
            reorder_by_importance(encoder, data.train_dataloader(), args.importance_batches, hidden=ordering == "+hidden")
        results[ordering] = evaluate(encoder, members(encoder), dev, spec)
        print(f"{ordering}: " + ", ".join(f"{r['subnet']} {r['score']:.3f}/{r['divergence']:.3f}" for r in results[ordering]), flush=True)
        maxnet_shift = abs(results[ordering][0]["score"] - results["original"][0]["score"])
        if maxnet_shift > 1e-6:
            print(f"error: the {ordering} reordering changed the maxnet's dev score by {maxnet_shift}", file=sys.stderr)
            return 1

    record = {"model": args.model, "task": args.task, "importance_batches": args.importance_batches, "results": results}
    text = render(record, notes_for_output(args.out) if args.out else None)
    print(text)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(out.with_suffix(".json"), json.dumps(record, indent=2))
        write_atomic(out.with_suffix(".md"), text)
    return 0


def render(data: dict, notes: str | None = None) -> str:
    """The markdown of a slice_start run from its JSON; `notes` go under the title."""
    spec = get_task(data["task"])
    results = data["results"]
    divergence = "MSE to the maxnet's output" if spec.is_regression else "KL(maxnet ‖ subnet)"
    lines = [f"# Subnets before training: {spec.name} dev, sliced from `{data['model']}`", "",
             *([notes, ""] if notes else []),
             f"Each cell: GLUE score ({' / '.join(spec.metrics)} averaged) · {divergence} per example. "
             f"Importance from {data['importance_batches']} training batches. `python benchmarks/slice_start.py "
             f"--model {data['model']} --task {data['task']}`", "",
             "| subnet | params (M) | " + " | ".join(ORDERINGS) + " |", "|---|---|" + "---|" * len(ORDERINGS)]
    for i, row in enumerate(results["original"]):
        cells = [f"{results[o][i]['score']:.3f} · {results[o][i]['divergence']:.3f}" for o in ORDERINGS]
        lines.append(f"| {row['subnet']} | {row['params'] / 1e6:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, FileNotFoundError, OSError) as e:  # unknown task, missing model or data: one line
        print(f"slice_start: error: {e}", file=sys.stderr)
        sys.exit(2)
