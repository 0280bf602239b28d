"""Wall time of one MLFS run (yielding a whole palette) vs one LoRA run of the maxnet, side by side.

Same teacher, data subset, epochs, batch size and LoRA rank/targets; the LoRA run is the Teacher
module in LoRA mode. Both skip validation, export and latency so only training is timed.

    PYTHONPATH=. python benchmarks/mlfs_walltime.py --model models/minilm --data-dir kdlora/assets/glue

Writes benchmarks/results/mlfs_walltime/mlfs_walltime.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lightning as L  # noqa: E402
import torch  # noqa: E402

from kdlora.data.glue import GLUEDataModule  # noqa: E402
from kdlora.io import write_atomic  # noqa: E402
from kdlora.kd import Teacher  # noqa: E402
from kdlora.mlfs import SuperTransformer  # noqa: E402
from kdlora.training.args import ExportArgs, LoRAArgs, OptimizerArgs  # noqa: E402
from results_files import notes_for_output  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "mlfs_walltime"
# peft matches suffixes: "output.dense" also adapts the attention output (a slightly larger LoRA run).
TARGETS = ["query", "key", "value", "intermediate.dense", "output.dense"]


def timed_fit(module: L.LightningModule, dm: GLUEDataModule, args, root: Path) -> float:
    trainer = L.Trainer(accelerator="auto", devices=1, max_epochs=args.epochs, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(root), num_sanity_val_steps=0)
    start = time.perf_counter()
    trainer.fit(module, dm)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="models/minilm")
    p.add_argument("--data-dir", default="kdlora/assets/glue")
    p.add_argument("--task", default="mrpc")
    p.add_argument("--train-samples", type=int, default=256)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--num-subnets", type=int, default=2)
    p.add_argument("--root", default="runs/bench_mlfs_walltime")
    args = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    def dm():
        return GLUEDataModule(args.task, args.model, data_dir=args.data_dir, max_seq_length=args.seq,
                              batch_size=args.batch_size, max_train_samples=args.train_samples, max_eval_samples=32)

    L.seed_everything(0)
    lora = Teacher(args.model, args.task, finetune="lora", lora=LoRAArgs(r=8, alpha=16, dropout=0.0, targets=TARGETS),
                   optimizer=OptimizerArgs(learning_rate=1e-3), export=ExportArgs(enabled=False))
    t_lora = timed_fit(lora, dm(), args, Path(args.root) / "lora")
    L.seed_everything(0)
    stages = [1] * 3 if args.epochs == 3 else [args.epochs // 3 + (i < args.epochs % 3) for i in range(3)]
    mlfs = SuperTransformer(args.model, args.task, stages={"epochs": stages}, sampling={"num_subnets": args.num_subnets},
                            evaluation={"measure_latency": False}, export={"enabled": False})
    t_mlfs = timed_fit(mlfs, dm(), args, Path(args.root) / "mlfs")

    result = {
        "model": args.model, "task": args.task, "train_samples": args.train_samples, "epochs": args.epochs,
        "stage_epochs": stages, "batch_size": args.batch_size, "max_seq_length": args.seq, "num_subnets": args.num_subnets,
        "palette_size": len(mlfs.palette_run.members), "lora_seconds": round(t_lora, 2), "mlfs_seconds": round(t_mlfs, 2),
        "mlfs_over_lora": round(t_mlfs / t_lora, 3),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "command": "PYTHONPATH=. python benchmarks/mlfs_walltime.py " + " ".join(sys.argv[1:]),
    }
    print(json.dumps(result, indent=2))
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_atomic(RESULTS / "mlfs_walltime.json", json.dumps(result, indent=2) + "\n")
    write_atomic(RESULTS / "mlfs_walltime.md", render(result, notes_for_output(RESULTS / "mlfs_walltime")))


def render(data: dict, notes: str | None = None) -> str:
    """The markdown of an mlfs_walltime run from its JSON; `notes` follow the first paragraph."""
    k = data["num_subnets"]
    md = [
        "# MLFS wall time vs one LoRA run of the maxnet",
        "",
        f"`{data['command']}` on {data['device']}, torch {data['torch']}." + (f" {notes}" if notes else ""),
        "",
        "| run | wall time (s) | models obtained |",
        "|---|---|---|",
        f"| LoRA fine-tuning of the maxnet | {data['lora_seconds']:.1f} | 1 |",
        f"| MLFS (stages {data['stage_epochs']}, K={k}) | {data['mlfs_seconds']:.1f} | palette of {data['palette_size']} (any subnet of the space) |",
        "",
        f"**MLFS / LoRA = {data['mlfs_seconds'] / data['lora_seconds']:.2f}x.** Stage 0 costs one LoRA epoch; stages 1-2 run the maxnet plus "
        f"K={k} (smaller) subnets per step, so their epochs cost up to K+1 times a LoRA epoch.",
        "",
    ]
    return "\n".join(md)


if __name__ == "__main__":
    main()
