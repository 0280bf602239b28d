"""KD-LoRA student training throughput: cached teacher targets vs online teacher, each with and without
length grouping, vs a plain PyTorch loop; with the dev score each arm reaches.

The plain loop is what the public KD-LoRA scripts do: run the teacher on every step, with every
batch padded to max_length. In each round all arms train the same LoRA student from that round's seed on the same
examples (one epoch over `(warmup + steps) * batch_size` MRPC training pairs) on the same hardware,
in rounds, the arms' order alternating; each then scores the MRPC dev set. First the online arm is
profiled (cProfile) for where a step's time goes.

    PYTHONPATH=. python benchmarks/student_throughput.py --teacher models/minilm --student models/minilm-l3

Writes benchmarks/results/student_throughput.{md,json}.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import platform
import pstats
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
from kdlora.data import MODEL_COLUMNS, GLUEDataModule  # noqa: E402
from kdlora.losses import distillation_loss  # noqa: E402
from kdlora.metrics import glue_score, predictions_from_logits, task_metrics  # noqa: E402
from kdlora.models import apply_lora, load_classifier, load_tokenizer, new_weight_modules  # noqa: E402
from kdlora.modules import KDLoRAStudent  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


class StepTimer(L.Callback):
    """Wall time of each training batch after `warmup` untimed ones."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.cpu_start, self.times, self.cpu_times, self.lengths = warmup, 0.0, 0.0, [], [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.start, self.cpu_start = time.perf_counter(), time.process_time()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx >= self.warmup:
            self.times.append(time.perf_counter() - self.start)
            self.cpu_times.append(time.process_time() - self.cpu_start)
            self.lengths.append(batch["input_ids"].shape[1])


def summary(times: list[float], cpu_times: list[float], batch_size: int, lengths: list[int]) -> dict:
    """Epoch throughput (examples / total step time: with length grouping step times vary by design), the
    median step time beside it, and examples per CPU-second of this process (all its threads: what the
    work costs, nearly independent of other jobs competing for the cores)."""
    median = statistics.median(times)
    return {"steps": len(times), "seconds": sum(times), "median_step_s": median, "cpu_seconds": sum(cpu_times),
            "examples_per_s": batch_size * len(times) / sum(times), "median_examples_per_s": batch_size / median,
            "examples_per_cpu_s": batch_size * len(times) / sum(cpu_times),
            "mean_padded_length": statistics.fmean(lengths)}


def data_module(args, seed: int, group_by_length: bool = False) -> GLUEDataModule:
    """The seed picks the training subset and the order."""
    return GLUEDataModule("mrpc", args.student, data_dir=args.data_dir, batch_size=args.batch_size,
                          max_seq_length=args.max_seq_length, max_train_samples=(args.warmup + args.steps) * args.batch_size,
                          seed=seed, group_by_length=group_by_length)


@torch.inference_mode()
def dev_score(model: torch.nn.Module, dm: GLUEDataModule) -> dict:
    """MRPC dev accuracy, F1 and GLUE score (their mean) of a trained student."""
    was_training = model.training
    model.eval()
    metrics = task_metrics(dm.spec)
    for batch in dm.val_dataloader():
        logits = model(**{k: batch[k] for k in MODEL_COLUMNS if k in batch}).logits
        metrics.update(predictions_from_logits(logits, False), batch["labels"])
    model.train(was_training)
    values = {k: float(v) for k, v in metrics.compute().items()}
    return {**values, "score": glue_score(values)}


def lightning_mode(args, teacher_dir: str, targets: str, cache_dir: str, seed: int, group_by_length: bool = False,
                   profile: bool = False) -> dict:
    dm = data_module(args, seed, group_by_length)
    torch.manual_seed(seed)
    model = KDLoRAStudent(args.student, teacher_dir, "mrpc", teacher_targets=targets, teacher_cache_dir=cache_dir,
                          lora_r=8, lora_alpha=16, export=False)
    timer = StepTimer(args.warmup)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0, callbacks=[timer])
    profiler = cProfile.Profile() if profile else None
    start = time.perf_counter()
    if profiler is not None:
        profiler.enable()
    trainer.fit(model, datamodule=dm)
    if profiler is not None:
        profiler.disable()
    total = time.perf_counter() - start
    result = {**summary(timer.times, timer.cpu_times, args.batch_size, timer.lengths), "fit_wall_s": total, "dev": dev_score(model.model, dm)}
    if profiler is not None:
        result["profile"] = step_breakdown(profiler, trainer.global_step)
    return result


def step_breakdown(profiler: cProfile.Profile, steps: int) -> dict:
    """Seconds per training step of the online student, by where they go (cProfile cumulative times)."""
    stats = pstats.Stats(profiler).stats  # (file, line, function) -> (calls, primitive calls, own, cumulative, callers)

    def cumulative(file_end: str, function: str) -> float:
        return sum(v[3] for (f, _, fn), v in stats.items() if f.endswith(file_end) and fn == function)

    step = cumulative("loops/training_epoch_loop.py", "advance")
    teacher = cumulative("kdlora/modules/student.py", "_teacher_forward")
    student_step = cumulative("kdlora/modules/student.py", "training_step")
    backward = cumulative("torch/autograd/__init__.py", "backward")
    optimizer = cumulative("torch/optim/adamw.py", "step") or cumulative("torch/optim/adam.py", "step")
    closure = cumulative("loops/optimization/automatic.py", "closure")
    parts = {"teacher_forward": teacher, "student_forward_and_loss": student_step - teacher, "backward": backward,
             "optimizer_update": optimizer - closure}
    parts["everything_else"] = step - sum(parts.values())  # Lightning loop, hooks, logging, data loading, collation
    return {"steps": steps, "step_s": step / steps, **{f"{k}_s": v / steps for k, v in parts.items()},
            "everything_else_fraction": parts["everything_else"] / step}


def reference_mode(args, teacher_dir: str, seed: int, fixed_padding: bool) -> dict:
    """A hand-written loop: teacher forward on every step; fixed (max_length) or dynamic padding."""
    tok = load_tokenizer(args.student)
    dm = data_module(args, seed)
    dm.setup("fit")
    collate = DataCollatorWithPadding(tok, padding="max_length" if fixed_padding else "longest",
                                      max_length=args.max_seq_length, return_tensors="pt")
    loader = DataLoader(dm.datasets["train"], batch_size=args.batch_size, shuffle=True, collate_fn=collate)
    torch.manual_seed(seed)
    teacher, _ = load_classifier(teacher_dir, 2)
    teacher.eval().requires_grad_(False)
    student, new = load_classifier(args.student, 2)
    student = apply_lora(student, 8, 16, 0.1, None, new_weight_modules(new)).train()
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=5e-4)
    times, cpu_times, lengths = [], [], []
    for i, batch in enumerate(loader):
        start, cpu_start = time.perf_counter(), time.process_time()
        inputs = {k: batch[k] for k in MODEL_COLUMNS if k in batch}
        with torch.no_grad():
            t_logits = teacher(**inputs).logits
        loss = distillation_loss(student(**inputs).logits, t_logits, batch["labels"], False, 0.5, 2.0)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
            lengths.append(batch["input_ids"].shape[1])
    return {**summary(times, cpu_times, args.batch_size, lengths), "dev": dev_score(student, dm)}


ARMS = {
    "cached": "KDLoRAStudent, cached teacher targets",
    "online": "KDLoRAStudent, online teacher",
    "cached_grouped": "KDLoRAStudent, cached teacher targets, group_by_length",
    "online_grouped": "KDLoRAStudent, online teacher, group_by_length",
    "reference_fixed_padding": "plain loop, teacher every step, padded to max_length (public scripts)",
    "reference_dynamic_padding": "plain loop, teacher every step, dynamic padding",
}
REFERENCE = "reference_fixed_padding"
# The plain loop with dynamic padding as well: the stricter baseline (what a careful hand-written loop does).
REFERENCES = (REFERENCE, "reference_dynamic_padding")
TARGETS = {"cached_grouped": 2.0, "online_grouped": 1.0}  # the bar: x the plain loop's throughput


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", default="models/minilm", help="teacher model dir (a classifier head is added)")
    parser.add_argument("--student", default="models/minilm-l3")
    parser.add_argument("--data-dir", default=str(REPO / "kdlora" / "assets" / "glue"))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20, help="timed training steps per arm (then its dev score)")
    parser.add_argument("--warmup", type=int, default=0, help="untimed steps first (0: time every step of the epoch)")
    parser.add_argument("--max-seq-length", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="repeat all arms, order alternating; ratios are per round")
    parser.add_argument("--seed", type=int, default=42, help="round r: seed + r (training subset, order, init) for every arm")
    parser.add_argument("--profile-steps", type=int, default=4, help="cProfile the online arm over this many steps first (0: off)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "student_throughput"))
    args = parser.parse_args(argv)
    for name in ("batch_size", "steps", "rounds", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()

    with tempfile.TemporaryDirectory() as tmp:
        # The teacher as an exported classifier directory (its head's weights do not affect speed).
        teacher_dir = str(Path(tmp) / "teacher")
        model, _ = load_classifier(args.teacher, 2)
        model.save_pretrained(teacher_dir)
        load_tokenizer(args.teacher).save_pretrained(teacher_dir)
        cache = str(Path(tmp) / "cache")

        modes = {
            "cached": lambda seed: lightning_mode(args, teacher_dir, "cached", cache, seed),
            "online": lambda seed: lightning_mode(args, teacher_dir, "online", cache, seed),
            "cached_grouped": lambda seed: lightning_mode(args, teacher_dir, "cached", cache, seed, group_by_length=True),
            "online_grouped": lambda seed: lightning_mode(args, teacher_dir, "online", cache, seed, group_by_length=True),
            REFERENCE: lambda seed: reference_mode(args, teacher_dir, seed, fixed_padding=True),
            "reference_dynamic_padding": lambda seed: reference_mode(args, teacher_dir, seed, fixed_padding=False),
        }
        profile = None
        if args.profile_steps > 0:
            short = argparse.Namespace(**{**vars(args), "steps": args.profile_steps, "warmup": 0})
            profile = lightning_mode(short, teacher_dir, "online", cache, args.seed, profile=True)["profile"]
            print("online step profile: " + ", ".join(f"{k} {v:.3f}" for k, v in profile.items()), flush=True)
        rounds: list[dict] = []
        start = time.perf_counter()
        for r in range(args.rounds):  # alternate the order so slow drifts of the machine hit every arm
            order = list(modes) if r % 2 == 0 else list(reversed(modes))
            rounds.append({name: modes[name](args.seed + r) for name in order})
            print(f"round {r}: " + ", ".join(f"{k} {v['examples_per_s']:.2f} ex/s {v['examples_per_cpu_s']:.2f} ex/cpu-s "
                                              f"dev {v['dev']['score']:.4f}"
                                              for k, v in rounds[-1].items()), flush=True)
        wall = time.perf_counter() - start

    # Per round, each arm against the plain loop of the same round: contention hits both alike.
    def ratios_of(key: str, reference: str = REFERENCE) -> dict:
        per_round = [{k: rd[k][key] / rd[reference][key] for k in ARMS} for rd in rounds]
        return {k: {"median": statistics.median(pr[k] for pr in per_round), "min": min(pr[k] for pr in per_round),
                    "max": max(pr[k] for pr in per_round), "rounds": [pr[k] for pr in per_round]} for k in ARMS if k != reference}

    ratios, cpu_ratios = ratios_of("examples_per_s"), ratios_of("examples_per_cpu_s")
    dynamic = ratios_of("examples_per_s", REFERENCES[1])
    results = {k: {"examples_per_s_median_of_rounds": statistics.median(rd[k]["examples_per_s"] for rd in rounds),
                   "examples_per_s_rounds": [rd[k]["examples_per_s"] for rd in rounds],
                   "examples_per_cpu_s_rounds": [rd[k]["examples_per_cpu_s"] for rd in rounds],
                   "dev_rounds": [rd[k]["dev"] for rd in rounds]} for k in ARMS}
    checks = {k: {"target": t, "median_ratio": ratios[k]["median"], "met": ratios[k]["median"] >= t,
                  "median_cpu_ratio": cpu_ratios[k]["median"], "met_cpu": cpu_ratios[k]["median"] >= t,
                  "median_ratio_vs_dynamic_padding": dynamic[k]["median"], "met_vs_dynamic_padding": dynamic[k]["median"] >= t}
              for k, t in TARGETS.items()}
    command = "PYTHONPATH=. python benchmarks/student_throughput.py " + " ".join(argv if argv is not None else sys.argv[1:])
    meta = {"teacher": args.teacher, "student": args.student, "task": "mrpc", "batch_size": args.batch_size,
            "timed_steps": args.steps, "warmup_steps": args.warmup, "max_seq_length": args.max_seq_length,
            "threads": args.threads, "rounds": args.rounds, "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
            "device": "cpu", "benchmark_wall_s": wall, "load_average_before": load_before, "load_average_after": os.getloadavg(),
            "command": command}

    lines = [
        "# KD-LoRA student training throughput", "",
        f"Command: `{command}`", "",
        f"Teacher `{args.teacher}` (its classification head untrained) -> LoRA student `{args.student}` (r=8, query/value + head), "
        f"MRPC, batch {args.batch_size}, max_seq_length {args.max_seq_length}; in round r every arm trains {args.warmup + args.steps} "
        f"steps from seed {args.seed} + r on the same {(args.warmup + args.steps) * args.batch_size} training pairs "
        f"({args.steps} timed), then is scored on the full MRPC dev set (so the rounds also show the score's spread over seeds). CPU with {args.threads} threads, torch {torch.__version__}; "
        f"{args.rounds} rounds in one process, arms in alternating order. The CPU is shared with other jobs "
        f"(load average {load_before[0]:.1f} at the start, {meta['load_average_after'][0]:.1f} at the end): each ratio is taken "
        "within a round, against that round's plain loop, and the median over rounds is reported.", "",
        "Examples/s is examples / total step time over the timed steps (with length grouping, step times vary "
        "by design, so the epoch's throughput, not the median step).", "",
        "Examples per CPU-second counts the CPU time of this process's threads during the timed steps: what a step "
        "costs, which other jobs on the cores change much less than its wall time.", "",
        "| Arm | Examples/s per round | Examples/CPU-s per round | Dev score (acc+F1)/2 per round | Mean dev score | Padded length |",
        "|---|---|---|---|---|---|",
    ]
    for key, label in ARMS.items():
        ex = ", ".join(f"{v:.1f}" for v in results[key]["examples_per_s_rounds"])
        ex_cpu = ", ".join(f"{v:.1f}" for v in results[key]["examples_per_cpu_s_rounds"])
        dev = ", ".join(f"{d['score']:.4f}" for d in results[key]["dev_rounds"])
        padded = statistics.fmean(rd[key]["mean_padded_length"] for rd in rounds)
        mean_dev = statistics.fmean(d["score"] for d in results[key]["dev_rounds"])
        lines.append(f"| {label} | {ex} | {ex_cpu} | {dev} | {mean_dev:.4f} | {padded:.1f} |")
    for what, table, reference in (("wall-clock examples/s", ratios, REFERENCE), ("examples per CPU-second", cpu_ratios, REFERENCE),
                                   ("wall-clock examples/s", dynamic, REFERENCES[1])):
        lines += ["", f"| Arm / {reference}, {what} | Median over rounds | Min–max | Per round |", "|---|---|---|---|"]
        lines += [f"| {k} | {v['median']:.2f}x | {v['min']:.2f}–{v['max']:.2f}x | {', '.join(f'{x:.2f}' for x in v['rounds'])} |"
                  for k, v in table.items()]
    lines += ["", "Targets (issue 12): " + "; ".join(
        f"{k} ≥ {c['target']:g}x: wall {'met' if c['met'] else 'NOT met'} ({c['median_ratio']:.2f}x), "
        f"CPU time {'met' if c['met_cpu'] else 'NOT met'} ({c['median_cpu_ratio']:.2f}x); against the plain loop with dynamic "
        f"padding {'met' if c['met_vs_dynamic_padding'] else 'NOT met'} ({c['median_ratio_vs_dynamic_padding']:.2f}x)"
        for k, c in checks.items()) + "."]
    if profile is not None:
        lines += ["", f"Where an online step's time goes (cProfile over {profile['steps']} steps before the rounds, seconds per step):", "",
                  "| Part | s/step |", "|---|---|"]
        lines += [f"| {k[:-2].replace('_', ' ')} | {v:.3f} |" for k, v in profile.items() if k.endswith("_s")]
        lines += ["", f"Everything outside the models' compute (Lightning loop and hooks, logging, data loading and "
                  f"collation) is {100 * profile['everything_else_fraction']:.1f} % of the step."]
    markdown = "\n".join(lines) + "\n"
    out = Path(args.out)
    write_atomic(out.with_suffix(".md"), markdown)
    write_atomic(out.with_suffix(".json"), json.dumps({"meta": meta, "results": results, "ratios": ratios,
                                                        "cpu_time_ratios": cpu_ratios, "ratios_vs_dynamic_padding": dynamic,
                                                        "checks": checks,
                                                        "rounds": rounds, "online_step_profile": profile}, indent=2) + "\n")
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
