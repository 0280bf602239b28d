"""Does the fast path (length-grouped batches, in bf16-mixed or float32) reach the scores of float32 with random batches?

A small MLFS supernet on SST-2 (the embedded subset): `SuperTransformer` with `base: pretrained` (stage 0
is the maxnet's LoRA fine-tuning with a new head), stages [1, 1, 1], K = 2 with the sandwich rule, trained
once per seed in each arm, then its palette (maxnet and minnet) scored on SST-2 dev. The arms differ only
in `trainer.precision` and `data.group_by_length`; per seed both arms start from the same weights and
training subset. The verdict compares the arms' difference in mean score with the seed-to-seed spread.

    PYTHONPATH=. python benchmarks/fast_path_seeds.py --model models/minilm

Writes benchmarks/results/fast_path_seeds/fast_path_seeds.{json,md} (the markdown generated from the JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import lightning as L  # noqa: E402
import torch  # noqa: E402

from kdlora.data.glue import GLUEDataModule  # noqa: E402
from kdlora.io import write_atomic  # noqa: E402
from kdlora.mlfs import SuperTransformer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PRECISION_NAMES = {"32-true": "fp32", "bf16-mixed": "bf16"}


def arms(fast_precision: str) -> dict[str, tuple[str, bool]]:
    """name -> (trainer.precision, data.group_by_length): the reference, then the fast path."""
    return {"fp32_random": ("32-true", False), f"{PRECISION_NAMES[fast_precision]}_grouped": (fast_precision, True)}


def run(args, precision: str, grouped: bool, seed: int, work: Path) -> dict:
    L.seed_everything(seed, verbose=False)
    dm = GLUEDataModule("sst2", args.model, data_dir=args.data_dir, batch_size=args.batch_size,
                        max_seq_length=args.max_seq_length, max_train_samples=args.train_samples, seed=seed,
                        group_by_length=grouped, cache_dir=str(work / "cache"))
    module = SuperTransformer(args.model, "sst2", base="pretrained", stages={"epochs": [1, 1, 1]}, sampling={"num_subnets": 2},
                              evaluation={"members": ["max", "min"], "measure_latency": False},
                              optimizer={"learning_rate": 1e-3}, export={"enabled": False})
    trainer = L.Trainer(max_epochs=3, accelerator="cpu", devices=1, precision=precision, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        check_val_every_n_epoch=3, num_sanity_val_steps=0, default_root_dir=str(work / "run"))
    start = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    wall = time.perf_counter() - start
    history, roles = module.palette_run.history, module.palette_run.roles
    rows = history[max(history)]  # the end-of-fit validation (dev)
    return {"wall_s": wall, "scores": {roles.get(r["name"], r["name"]): r["score"] for r in rows},
            "members": {roles.get(r["name"], r["name"]): r["name"] for r in rows}}


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(runs: dict) -> dict:
    """Per arm and member: mean ± sd over seeds; per member the paired difference (fast − reference) per seed."""
    arms = list(runs)
    members = list(runs[arms[0]][0]["scores"])
    out = {"arms": {}, "difference": {}}
    for arm in arms:
        out["arms"][arm] = {m: dict(zip(("mean", "sd"), mean_sd([r["scores"][m] for r in runs[arm]]))) for m in members}
    reference, fast = arms
    for m in members:
        diffs = [f["scores"][m] - r["scores"][m] for f, r in zip(runs[fast], runs[reference])]
        mean, sd = mean_sd(diffs)
        noise = max(out["arms"][a][m]["sd"] for a in arms)
        out["difference"][m] = {"per_seed": diffs, "mean": mean, "sd": sd, "seed_sd": noise,
                                "within_seed_noise": abs(mean) <= noise}
    return out


def markdown(data: dict) -> str:
    meta, runs, summary = data["meta"], data["runs"], data["summary"]
    arms = list(runs)
    members = list(runs[arms[0]][0]["scores"])
    lines = [
        f"# The fast path's scores: {data['arms'][arms[1]][0]} + length-grouped batches vs float32 + random batches", "",
        f"Command: `{meta['command']}`", "",
        f"`SuperTransformer` from `{meta['model']}` (`base: pretrained`: stage 0 fine-tunes it with LoRA and a new head), "
        f"SST-2 (the embedded subset: {meta['train_samples']} training sentences, seeded by the run's seed), stages [1, 1, 1], "
        f"K = 2 with the sandwich rule, batch {meta['batch_size']}, max_seq_length {meta['max_seq_length']}, lr 1e-3; "
        f"the palette (maxnet, minnet) scored on the full SST-2 dev set (accuracy) after the last epoch. Seeds "
        f"{', '.join(str(s) for s in meta['seeds'])}; per seed both arms start from the same weights and subset. "
        f"CPU `{meta['cpu']}` (bf16 native: {meta['bf16_supported']}), {meta['threads']} threads, torch {meta['torch']}.", "",
        "| Arm | precision | group_by_length | Member | Per seed | Mean ± sd | Mean fit wall (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm in arms:
        precision, grouped = data["arms"][arm]
        wall = statistics.fmean(r["wall_s"] for r in runs[arm])
        for m in members:
            per = ", ".join(f"{r['scores'][m]:.4f}" for r in runs[arm])
            s = summary["arms"][arm][m]
            lines.append(f"| {arm} | {precision} | {str(grouped).lower()} | {m} | {per} | {s['mean']:.4f} ± {s['sd']:.4f} | {wall:.0f} |")
    lines += ["", f"| Member | {arms[1]} − {arms[0]} per seed | Mean ± sd of the difference | Larger seed sd of the arms | Within seed noise |",
              "|---|---|---|---|---|"]
    for m, d in summary["difference"].items():
        lines.append(f"| {m} | {', '.join(f'{x:+.4f}' for x in d['per_seed'])} | {d['mean']:+.4f} ± {d['sd']:.4f} | "
                     f"{d['seed_sd']:.4f} | {'yes' if d['within_seed_noise'] else 'no'} |")
    lines += ["", "Within seed noise: |mean difference| ≤ the larger of the two arms' standard deviations over seeds."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    from kdlora.cli import bf16_supported

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="models/minilm", help="a pretrained encoder (a new classifier head is added)")
    parser.add_argument("--data-dir", default=str(REPO / "kdlora" / "assets" / "glue"))
    parser.add_argument("--train-samples", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-seq-length", type=int, default=128)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--fast-precision", default="bf16-mixed", choices=sorted(PRECISION_NAMES),
                        help="the fast path's precision (it always groups batches by length)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "fast_path_seeds" / "fast_path_seeds"))
    args = parser.parse_args(argv)
    if not Path(args.model).is_dir():
        parser.error(f"--model {args.model!r} is not a directory (bash scripts/fetch_models.sh minilm models/minilm)")
    if args.train_samples < args.batch_size or args.batch_size < 1 or args.threads < 1:
        parser.error("need --batch-size >= 1, --train-samples >= --batch-size and --threads >= 1")
    torch.set_num_threads(args.threads)
    chosen = arms(args.fast_precision)
    runs: dict[str, list] = {arm: [] for arm in chosen}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            order = list(chosen) if seed % 2 else list(reversed(chosen))  # alternate which arm meets the machine first
            for arm in order:
                precision, grouped = chosen[arm]
                runs[arm].append({"seed": seed, **run(args, precision, grouped, seed, Path(tmp) / f"{seed}-{arm}")})
                print(f"seed {seed} {arm}: {runs[arm][-1]['scores']} ({runs[arm][-1]['wall_s']:.0f} s)", flush=True)
    command = "PYTHONPATH=. python benchmarks/fast_path_seeds.py " + " ".join(argv if argv is not None else sys.argv[1:])
    meta = {"model": args.model, "task": "sst2", "train_samples": args.train_samples, "batch_size": args.batch_size,
            "max_seq_length": args.max_seq_length, "seeds": args.seeds, "threads": args.threads, "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(), "bf16_supported": bf16_supported("cpu"),
            "command": command.strip()}
    data = {"meta": meta, "arms": {k: list(v) for k, v in chosen.items()}, "runs": runs, "summary": summarise(runs)}
    text = markdown(data)
    out = Path(args.out)
    write_atomic(out.with_suffix(".json"), json.dumps(data, indent=2) + "\n")
    write_atomic(out.with_suffix(".md"), text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
