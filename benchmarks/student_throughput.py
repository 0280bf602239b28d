"""KD-LoRA student training throughput: cached teacher targets vs online teacher vs a plain PyTorch loop.

The plain loop is what the public KD-LoRA scripts do: run the teacher on every step, with every
batch padded to max_length. All modes train the same LoRA student on the same examples (one epoch
over `(warmup + steps) * batch_size` MRPC training pairs) on the same hardware, one after the other.

    PYTHONPATH=. python benchmarks/student_throughput.py --teacher models/minilm --student models/minilm-l3

Writes benchmarks/results/student_throughput.{md,json}.
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
from torch.utils.data import DataLoader  # noqa: E402
from transformers import DataCollatorWithPadding  # noqa: E402

from kdlora.callbacks import write_atomic  # noqa: E402
from kdlora.data import GLUEDataModule  # noqa: E402
from kdlora.losses import distillation_loss  # noqa: E402
from kdlora.models import apply_lora, load_classifier, load_tokenizer, new_weight_modules  # noqa: E402
from kdlora.modules import KDLoRAStudent  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


class StepTimer(L.Callback):
    """Wall time of each training batch after `warmup` untimed ones."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.times = warmup, 0.0, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx >= self.warmup:
            self.times.append(time.perf_counter() - self.start)


def summary(times: list[float], batch_size: int) -> dict:
    """Median step time is robust to other processes briefly taking the shared CPU."""
    median = statistics.median(times)
    return {"steps": len(times), "seconds": sum(times), "median_step_s": median,
            "examples_per_s": batch_size / median, "mean_examples_per_s": batch_size * len(times) / sum(times)}


def lightning_mode(args, teacher_dir: str, targets: str, cache_dir: str) -> dict:
    dm = GLUEDataModule("mrpc", args.student, data_dir=args.data_dir, batch_size=args.batch_size,
                        max_seq_length=args.max_seq_length, max_train_samples=(args.warmup + args.steps) * args.batch_size)
    torch.manual_seed(0)
    model = KDLoRAStudent(args.student, teacher_dir, "mrpc", teacher_targets=targets, teacher_cache_dir=cache_dir,
                          lora_r=8, lora_alpha=16, export=False)
    timer = StepTimer(args.warmup)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0, callbacks=[timer])
    start = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    total = time.perf_counter() - start
    return {**summary(timer.times, args.batch_size), "fit_wall_s": total}


def reference_mode(args, teacher_dir: str, fixed_padding: bool) -> dict:
    """A hand-written loop: teacher forward on every step; fixed (max_length) or dynamic padding."""
    tok = load_tokenizer(args.student)
    dm = GLUEDataModule("mrpc", args.student, data_dir=args.data_dir, batch_size=args.batch_size,
                        max_seq_length=args.max_seq_length, max_train_samples=(args.warmup + args.steps) * args.batch_size)
    dm.setup("fit")
    collate = DataCollatorWithPadding(tok, padding="max_length" if fixed_padding else "longest",
                                      max_length=args.max_seq_length, return_tensors="pt")
    loader = DataLoader(dm.datasets["train"], batch_size=args.batch_size, shuffle=True, collate_fn=collate)
    torch.manual_seed(0)
    teacher, _ = load_classifier(teacher_dir, 2)
    teacher.eval().requires_grad_(False)
    student, new = load_classifier(args.student, 2)
    student = apply_lora(student, 8, 16, 0.1, None, new_weight_modules(new)).train()
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=5e-4)
    times = []
    for i, batch in enumerate(loader):
        start = time.perf_counter()
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
        with torch.no_grad():
            t_logits = teacher(**inputs).logits
        loss = distillation_loss(student(**inputs).logits, t_logits, batch["labels"], False, 0.5, 2.0)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    return summary(times, args.batch_size)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", default="models/minilm", help="teacher model dir (a classifier head is added)")
    parser.add_argument("--student", default="models/minilm-l3")
    parser.add_argument("--data-dir", default=str(REPO / "kdlora" / "assets" / "glue"))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=12, help="timed steps per mode")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per mode")
    parser.add_argument("--max-seq-length", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="repeat all modes; the best round of each is reported")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "student_throughput"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        # The teacher as an exported classifier directory (its head's weights do not affect speed).
        teacher_dir = str(Path(tmp) / "teacher")
        model, _ = load_classifier(args.teacher, 2)
        model.save_pretrained(teacher_dir)
        load_tokenizer(args.teacher).save_pretrained(teacher_dir)

        modes = {
            "cached": lambda: lightning_mode(args, teacher_dir, "cached", str(Path(tmp) / "cache")),
            "online": lambda: lightning_mode(args, teacher_dir, "online", str(Path(tmp) / "cache")),
            "reference_fixed_padding": lambda: reference_mode(args, teacher_dir, fixed_padding=True),
            "reference_dynamic_padding": lambda: reference_mode(args, teacher_dir, fixed_padding=False),
        }
        rounds: list[dict] = []
        start = time.perf_counter()
        for r in range(args.rounds):  # alternate the order so slow drifts of the machine hit every mode
            order = list(modes) if r % 2 == 0 else list(reversed(modes))
            rounds.append({name: modes[name]() for name in order})
            print(f"round {r}: " + ", ".join(f"{k} {v['examples_per_s']:.2f} ex/s" for k, v in rounds[-1].items()), flush=True)
        # The first round builds the cache; later rounds reuse it (as a rerun would).
        cache_build_s = rounds[0]["cached"]["fit_wall_s"] - rounds[-1]["cached"]["fit_wall_s"] if args.rounds > 1 else None
        results = {name: max((rd[name] for rd in rounds), key=lambda v: v["examples_per_s"]) for name in modes}
        wall = time.perf_counter() - start

    ref = results["reference_fixed_padding"]["examples_per_s"]
    ratios = {
        "cached_vs_online": results["cached"]["examples_per_s"] / results["online"]["examples_per_s"],
        "cached_vs_reference": results["cached"]["examples_per_s"] / ref,
        "online_vs_reference": results["online"]["examples_per_s"] / ref,
        "reference_dynamic_vs_fixed_padding": results["reference_dynamic_padding"]["examples_per_s"] / ref,
    }
    meta = {"teacher": args.teacher, "student": args.student, "task": "mrpc", "batch_size": args.batch_size,
            "timed_steps": args.steps, "warmup_steps": args.warmup, "max_seq_length": args.max_seq_length,
            "threads": args.threads, "rounds": args.rounds, "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
            "device": "cpu", "benchmark_wall_s": wall,
            "command": "PYTHONPATH=. python benchmarks/student_throughput.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    lines = [
        "# KD-LoRA student training throughput", "",
        f"Teacher `{args.teacher}` -> LoRA student `{args.student}` (r=8, query/value + head), MRPC, batch {args.batch_size}, "
        f"max_seq_length {args.max_seq_length}, {args.steps} timed steps after {args.warmup} warm-up steps per mode, "
        f"CPU with {args.threads} threads, torch {torch.__version__}. All modes run one after the other in one process.", "",
        "Examples/s is batch size / median step time, best of the rounds (the CPU is shared with other jobs).", "",
        "| Mode | Examples/s | Median step (s) |", "|---|---|---|",
    ]
    names = {"cached": "KDLoRAStudent, cached teacher targets", "online": "KDLoRAStudent, online teacher",
             "reference_fixed_padding": "plain loop, teacher every step, padded to max_length (public scripts)",
             "reference_dynamic_padding": "plain loop, teacher every step, dynamic padding"}
    for key, label in names.items():
        lines.append(f"| {label} | {results[key]['examples_per_s']:.1f} | {results[key]['median_step_s']:.2f} |")
    lines += ["", "| Ratio | Value |", "|---|---|"] + [f"| {k} | {v:.2f}x |" for k, v in ratios.items()]
    if cache_build_s is not None:
        lines += ["", f"Building the cache (one teacher pass over the {(args.warmup + args.steps) * args.batch_size} examples) "
                  f"added {cache_build_s:.1f} s to the first fit (fit wall time of round 1 minus the rerun's, which reused it); "
                  "it is paid once per teacher and data set, not per epoch or rerun."]
    lines += ["", f"Command: `{meta['command']}`"]
    markdown = "\n".join(lines) + "\n"
    out = Path(args.out)
    write_atomic(out.with_suffix(".md"), markdown)
    write_atomic(out.with_suffix(".json"), json.dumps({"meta": meta, "results": results, "ratios": ratios, "rounds": rounds,
                                                        "cache_build_s": cache_build_s}, indent=2) + "\n")
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
