"""KD-LoRA student training throughput: kdlora's student (cached teacher targets or the teacher online, each
with and without length grouping) against what the public KD-LoRA scripts do and against plain loops that
run the teacher on every step; per step and end to end (teacher pass for cached targets included).

The public KD-LoRA scripts predict the teacher's logits once, up front, over the training set
(`Trainer.predict`), every batch padded to max_length, and then train the student in a plain loop on
them. The `public_scripts` arm does exactly that. The plain loops run the teacher on every step instead,
padded to max_length or dynamically. In each round all arms train the same LoRA student from that
round's seed on the same examples (one epoch over `(warmup + steps) * batch_size` MRPC training pairs)
on the same hardware, round-robin, the arms' order alternating between rounds; each then scores the MRPC
dev set. First the online arm and the dynamic-padding plain loop are profiled (cProfile) for where a
step's time goes.

    PYTHONPATH=. python benchmarks/student_throughput.py --teacher models/minilm --student models/minilm-l3

Writes benchmarks/results/student_throughput/student_throughput.json, then student_throughput.md rendered from that JSON
(`render`; `python benchmarks/results_files.py student_throughput` re-renders it).
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

from kdlora.data.glue import MODEL_COLUMNS, GLUEDataModule  # noqa: E402
from kdlora.data.tokenizer import load_tokenizer  # noqa: E402
from kdlora.eval.metrics import glue_score, predictions_from_logits, task_metrics  # noqa: E402
from kdlora.io import write_atomic  # noqa: E402
from kdlora.kd import KDLoRAStudent  # noqa: E402
from kdlora.kd.args import TeacherTargetsArgs  # noqa: E402
from kdlora.losses import distillation_loss  # noqa: E402
from kdlora.training.args import ExportArgs, LoRAArgs  # noqa: E402
from kdlora.training.heads import new_weight_modules  # noqa: E402
from kdlora.training.loading import load_classifier  # noqa: E402
from kdlora.training.lora import apply_lora  # noqa: E402
from results_files import notes_for_output  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

ARMS = {
    "cached": "KDLoRAStudent, cached teacher targets",
    "online": "KDLoRAStudent, online teacher",
    "cached_grouped": "KDLoRAStudent, cached teacher targets, group_by_length",
    "online_grouped": "KDLoRAStudent, online teacher, group_by_length",
    "public_scripts": "public KD-LoRA scripts: teacher logits predicted once up front, padded to max_length, plain loop",
    "plain_fixed_padding": "plain loop, teacher every step, padded to max_length",
    "plain_dynamic_padding": "plain loop, teacher every step, dynamic padding",
}
REFERENCE = "public_scripts"
# The plain loop with dynamic padding as well: the stricter per-step baseline (what a careful hand-written loop does).
REFERENCES = (REFERENCE, "plain_dynamic_padding")
EPOCHS = (1, 3, 5)  # the paper's range of epochs for LoRA and KD-LoRA
TARGETS = {"cached_grouped": 2.0, "online_grouped": 1.0}  # the bars: x the reference's examples/s
# A score not above the majority-class score (every dev pair predicted as the training set's majority label)
# by more than this shows no learning: such an arm's score is left blank, and with no arm past it the column is left out.
MAJORITY_MARGIN = 0.01


class StepTimer(L.Callback):
    """Wall time of each training batch after `warmup` untimed ones, and of the whole epoch."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.cpu_start, self.times, self.cpu_times, self.lengths = warmup, 0.0, 0.0, [], [], []
        self.epoch_start, self.epoch_s = 0.0, 0.0

    def on_train_epoch_start(self, trainer, pl_module):
        self.epoch_start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        self.epoch_s = time.perf_counter() - self.epoch_start

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.start, self.cpu_start = time.perf_counter(), time.process_time()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx >= self.warmup:
            self.times.append(time.perf_counter() - self.start)
            self.cpu_times.append(time.process_time() - self.cpu_start)
            self.lengths.append(batch["input_ids"].shape[1])


def summary(times: list[float], cpu_times: list[float], batch_size: int, lengths: list[int], build_s: float,
            epoch_s: float) -> dict:
    """Epoch throughput (examples / total step time: with length grouping step times vary by design), the
    median step time beside it, examples per CPU-second of this process (all its threads: what the work
    costs, nearly independent of other jobs competing for the cores), and the wall time of building the
    teacher targets (0 when the teacher runs on every step) and of one epoch (data loading included)."""
    median = statistics.median(times)
    return {"steps": len(times), "seconds": sum(times), "median_step_s": median, "cpu_seconds": sum(cpu_times),
            "examples_per_s": batch_size * len(times) / sum(times), "median_examples_per_s": batch_size / median,
            "examples_per_cpu_s": batch_size * len(times) / sum(cpu_times),
            "mean_padded_length": statistics.fmean(lengths), "build_s": build_s, "epoch_s": epoch_s,
            "end_to_end_s": {str(e): build_s + e * epoch_s for e in EPOCHS}}


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


def majority_class_score(args) -> dict:
    """The dev metrics of predicting the (whole) training set's most frequent label for every dev pair."""
    dm = GLUEDataModule("mrpc", args.student, data_dir=args.data_dir, max_seq_length=args.max_seq_length)
    dm.setup("fit")
    labels = torch.tensor(dm.datasets["train"]["labels"])
    majority = int(torch.bincount(labels).argmax())
    metrics = task_metrics(dm.spec)
    for batch in dm.val_dataloader():
        metrics.update(torch.full_like(batch["labels"], majority), batch["labels"])
    values = {k: float(v) for k, v in metrics.compute().items()}
    return {**values, "score": glue_score(values), "label": majority}


def lightning_mode(args, teacher_dir: str, targets: str, cache_dir: str, seed: int, group_by_length: bool = False,
                   profile: bool = False) -> dict:
    """KDLoRAStudent under Lightning; with cached targets the teacher pass that builds the cache (in a fresh
    `cache_dir`, so it is always built) is timed as the build."""
    dm = data_module(args, seed, group_by_length)
    torch.manual_seed(seed)
    model = KDLoRAStudent(args.student, teacher_dir, "mrpc",
                          teacher_targets=TeacherTargetsArgs(mode=targets, cache_dir=cache_dir),
                          lora=LoRAArgs(r=8, alpha=16), export=ExportArgs(enabled=False))
    build = {"s": 0.0}
    cache_teacher_targets = model.teacher_targets.cache

    def timed_cache_build(*a, **k):
        start = time.perf_counter()
        try:
            return cache_teacher_targets(*a, **k)
        finally:
            build["s"] += time.perf_counter() - start

    model.teacher_targets.cache = timed_cache_build  # called at fit start
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
    result = {**summary(timer.times, timer.cpu_times, args.batch_size, timer.lengths, build["s"], timer.epoch_s),
              "fit_wall_s": total, "dev": dev_score(model.model, dm)}
    if profiler is not None:
        result["profile"] = step_breakdown(profiler, trainer.global_step, lightning=True)
    return result


def step_breakdown(profiler: cProfile.Profile, steps: int, lightning: bool) -> dict:
    """Seconds per training step, by where they go (cProfile cumulative times): of the online KDLoRAStudent
    (`lightning`) or of the plain loop (its parts are the functions `plain_step` calls)."""
    stats = pstats.Stats(profiler).stats  # (file, line, function) -> (calls, primitive calls, own, cumulative, callers)

    def cumulative(file_end: str, function: str) -> float:
        return sum(v[3] for (f, _, fn), v in stats.items() if f.endswith(file_end) and fn == function)

    backward = cumulative("torch/autograd/__init__.py", "backward")
    optimizer = cumulative("torch/optim/adamw.py", "step") or cumulative("torch/optim/adam.py", "step")
    if lightning:
        step = cumulative("loops/training_epoch_loop.py", "advance")
        teacher = cumulative("kdlora/kd/student.py", "_teacher_forward")
        student = cumulative("kdlora/kd/student.py", "training_step") - teacher
        optimizer -= cumulative("loops/optimization/automatic.py", "closure")  # Lightning steps inside the optimizer
    else:
        here = "benchmarks/student_throughput.py"
        step, teacher = cumulative(here, "plain_step"), cumulative(here, "teacher_forward")
        student = cumulative(here, "student_forward_and_loss")
    parts = {"teacher_forward": teacher, "student_forward_and_loss": student, "backward": backward,
             "optimizer_update": optimizer}
    parts["everything_else"] = step - sum(parts.values())  # the loop, hooks, logging, scheduler
    return {"steps": steps, "step_s": step / steps, **{f"{k}_s": v / steps for k, v in parts.items()},
            "everything_else_fraction": parts["everything_else"] / step}


def teacher_forward(teacher: torch.nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return teacher(**inputs).logits


def student_forward_and_loss(student: torch.nn.Module, inputs: dict, t_logits: torch.Tensor, labels: torch.Tensor):
    return distillation_loss(student(**inputs).logits, t_logits, labels, False, 0.5, 2.0)


def plain_step(teacher, student, opt, batch) -> None:
    inputs = {k: batch[k] for k in MODEL_COLUMNS if k in batch}
    t_logits = batch["teacher_logits"] if teacher is None else teacher_forward(teacher, inputs)
    loss = student_forward_and_loss(student, inputs, t_logits, batch["labels"])
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def plain_mode(args, teacher_dir: str, seed: int, fixed_padding: bool, predict_first: bool = False,
               profile: bool = False) -> dict:
    """A hand-written loop; fixed (max_length) or dynamic padding. The teacher runs on every step, or
    (`predict_first`, as the public scripts) once over the training set before training, in order, at the
    data module's evaluation batch size; its logits become a column of the training set, timed as the build."""
    tok = load_tokenizer(args.student)
    dm = data_module(args, seed)
    dm.setup("fit")
    collate = DataCollatorWithPadding(tok, padding="max_length" if fixed_padding else "longest",
                                      max_length=args.max_seq_length, return_tensors="pt")
    train = dm.datasets["train"]
    torch.manual_seed(seed)
    teacher, _ = load_classifier(teacher_dir, 2)
    teacher.eval().requires_grad_(False)
    student, new = load_classifier(args.student, 2)
    student = apply_lora(student, 8, 16, 0.1, None, new_weight_modules(new)).train()
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=5e-4)
    build_s = 0.0
    if predict_first:
        start = time.perf_counter()
        logits = [teacher_forward(teacher, {k: b[k] for k in MODEL_COLUMNS if k in b}).float()
                  for b in DataLoader(train, batch_size=dm.eval_batch_size, shuffle=False, collate_fn=collate)]
        train = train.add_column("teacher_logits", torch.cat(logits).tolist())
        build_s = time.perf_counter() - start
        teacher = None
    loader = DataLoader(train, batch_size=args.batch_size, shuffle=True, collate_fn=collate)
    times, cpu_times, lengths = [], [], []
    profiler = cProfile.Profile() if profile else None
    epoch_start = time.perf_counter()
    for i, batch in enumerate(loader):
        start, cpu_start = time.perf_counter(), time.process_time()
        if profiler is not None:
            profiler.enable()
        plain_step(teacher, student, opt, batch)
        if profiler is not None:
            profiler.disable()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
            lengths.append(batch["input_ids"].shape[1])
    epoch_s = time.perf_counter() - epoch_start
    result = {**summary(times, cpu_times, args.batch_size, lengths, build_s, epoch_s), "dev": dev_score(student, dm)}
    if profiler is not None:
        result["profile"] = step_breakdown(profiler, len(loader), lightning=False)
    return result


def ratios_of(rounds: list[dict], value, reference: str) -> dict:
    """Per round, `value(arm result)` of each arm over the reference's (higher is faster), and their median."""
    per_round = [{k: value(rd[k]) / value(rd[reference]) for k in rd} for rd in rounds]
    return {k: {"median": statistics.median(pr[k] for pr in per_round), "min": min(pr[k] for pr in per_round),
                "max": max(pr[k] for pr in per_round), "rounds": [pr[k] for pr in per_round]}
            for k in ARMS if k != reference}


def analyse(rounds: list[dict]) -> dict:
    ratios = ratios_of(rounds, lambda r: r["examples_per_s"], REFERENCE)
    cpu_ratios = ratios_of(rounds, lambda r: r["examples_per_cpu_s"], REFERENCE)
    dynamic = ratios_of(rounds, lambda r: r["examples_per_s"], REFERENCES[1])
    # End to end: the reference's time over the arm's, so it reads like the throughput ratios.
    end_to_end = {str(e): ratios_of(rounds, lambda r, e=e: 1.0 / r["end_to_end_s"][str(e)], REFERENCE) for e in EPOCHS}
    checks = {k: {"target": t, "median_ratio": ratios[k]["median"], "met": ratios[k]["median"] >= t,
                  "median_cpu_ratio": cpu_ratios[k]["median"], "met_cpu": cpu_ratios[k]["median"] >= t,
                  "median_ratio_vs_dynamic_padding": dynamic[k]["median"], "met_vs_dynamic_padding": dynamic[k]["median"] >= t}
              for k, t in TARGETS.items()}
    return {"ratios": ratios, "cpu_time_ratios": cpu_ratios, "ratios_vs_dynamic_padding": dynamic,
            "end_to_end_ratios": end_to_end, "checks": checks}


def _end_to_end_lines(data: dict, n_pairs: int) -> list[str]:
    """The end-to-end section: target build + epochs of fit time per arm, and its speed ratios."""
    rounds, arms = data["rounds"], data["meta"]["arms"]
    lines: list[str] = []
    epochs = sorted(data["end_to_end_ratios"], key=int)
    lines += ["", "## End to end", "",
              f"Fit time for {', '.join(epochs[:-1])} and {epochs[-1]} epochs over these {n_pairs} training pairs: the "
              "teacher-target build (kdlora's cache of teacher logits, built afresh in every round; the public scripts' "
              "up-front prediction; nothing for the teacher-every-step loops) + epochs × one epoch's wall time (all its "
              "steps and data loading), both measured in the same round; model loading and dev scoring left out. Both "
              "the build and an epoch scale with the number of training pairs. Seconds: median over rounds.", "",
              "| Arm | Build s | Epoch s | " + " | ".join(f"{e} epoch{'s' if e != '1' else ''} s" for e in epochs) + " |",
              "|---|---|---|" + "---|" * len(epochs)]
    for key, label in arms.items():
        med = lambda f: statistics.median(f(rd[key]) for rd in rounds)  # noqa: E731
        lines.append(f"| {label} | {med(lambda r: r['build_s']):.2f} | {med(lambda r: r['epoch_s']):.2f} | "
                     + " | ".join(f"{med(lambda r, e=e: r['end_to_end_s'][e]):.2f}" for e in epochs) + " |")
    lines += ["", f"| Arm / {REFERENCE}, end-to-end speed (its time / the arm's) | "
              + " | ".join(f"{e} epoch{'s' if e != '1' else ''}: median (min–max)" for e in epochs) + " |",
              "|---|" + "---|" * len(epochs)]
    for key in data["end_to_end_ratios"][epochs[0]]:
        cells = [data["end_to_end_ratios"][e][key] for e in epochs]
        lines.append(f"| {key} | " + " | ".join(f"{c['median']:.2f}x ({c['min']:.2f}–{c['max']:.2f})" for c in cells) + " |")
    return lines


def _per_step_lines(data: dict) -> list[str]:
    """The per-step section: examples/s ratios and the bars they meet."""
    lines: list[str] = []
    lines += ["", "## Per step"]
    for what, table, reference in (("wall-clock examples/s", data["ratios"], REFERENCE),
                                   ("examples per CPU-second", data["cpu_time_ratios"], REFERENCE),
                                   ("wall-clock examples/s", data["ratios_vs_dynamic_padding"], REFERENCES[1])):
        lines += ["", f"| Arm / {reference}, {what} | Median over rounds | Min–max | Per round |", "|---|---|---|---|"]
        lines += [f"| {k} | {v['median']:.2f}x | {v['min']:.2f}–{v['max']:.2f}x | {', '.join(f'{x:.2f}' for x in v['rounds'])} |"
                  for k, v in table.items()]
    lines += ["", "Bars for the examples/s per step: " + "; ".join(
        f"{k} ≥ {c['target']:g}x {REFERENCE}: wall {'met' if c['met'] else 'NOT met'} ({c['median_ratio']:.2f}x), "
        f"CPU time {'met' if c['met_cpu'] else 'NOT met'} ({c['median_cpu_ratio']:.2f}x); against the plain loop with "
        f"dynamic padding {'met' if c['met_vs_dynamic_padding'] else 'NOT met'} ({c['median_ratio_vs_dynamic_padding']:.2f}x)"
        for k, c in data["checks"].items()) + "."]
    return lines


def _profile_lines(data: dict) -> list[str]:
    """Where a step's time goes (cProfile), where the run profiled."""
    arms = data["meta"]["arms"]
    lines: list[str] = []
    profiles = data.get("step_profiles") or {}
    if profiles:
        names = list(profiles)
        steps = profiles[names[0]]["steps"]
        lines += ["", "## Where a step's time goes", "",
                  f"cProfile over {steps} steps before the rounds, seconds per step:", "",
                  "| Part | " + " | ".join(arms[n] for n in names) + " |", "|---|" + "---|" * len(names)]
        parts = [k for k in profiles[names[0]] if k.endswith("_s")]
        lines += [f"| {k[:-2].replace('_', ' ')} | " + " | ".join(f"{profiles[n][k]:.3f}" for n in names) + " |" for k in parts]
        lines += ["", "Everything outside the models' compute and the optimizer (loop, hooks, logging, scheduler): "
                  + ", ".join(f"{100 * profiles[n]['everything_else_fraction']:.1f} % of the step ({n})" for n in names) + "."]
    return lines


def render(data: dict, notes: str | None = None) -> str:
    """The markdown report, every number taken from the benchmark's JSON; `notes` go under the title."""
    meta, rounds, arms = data["meta"], data["rounds"], data["meta"]["arms"]
    majority = data["majority_class"]
    learned = {k: [rd[k]["dev"]["score"] - majority["score"] > meta["majority_margin"] for rd in rounds] for k in arms}
    show_score = any(any(v) for v in learned.values())
    n_pairs = (meta["warmup_steps"] + meta["timed_steps"]) * meta["batch_size"]
    load_before, load_after = meta["load_average_before"][0], meta["load_average_after"][0]
    lines = [
        "# KD-LoRA student training throughput", "", *([notes, ""] if notes else []),
        f"Command: `{meta['command']}`", "",
        f"Teacher `{meta['teacher']}` (its classification head untrained) -> LoRA student `{meta['student']}` (r=8, "
        f"query/value + head), MRPC, batch {meta['batch_size']}, max_seq_length {meta['max_seq_length']}; in round r every arm "
        f"trains one epoch of {meta['warmup_steps'] + meta['timed_steps']} steps from seed {meta['seed']} + r on the same "
        f"{n_pairs} training pairs ({meta['timed_steps']} timed), then is scored on the full MRPC dev set. CPU with "
        f"{meta['threads']} threads, torch {meta['torch']}; {meta['rounds']} rounds in one process, arms round-robin in "
        f"alternating order. The CPU is shared with other jobs (load average {load_before:.1f} at the start, "
        f"{load_after:.1f} at the end): each ratio is taken within a round, against that round's reference arm, and the "
        f"median over rounds is reported. The benchmark took {meta['benchmark_wall_s'] / 60:.1f} min.", "",
        "What the public KD-LoRA scripts do: the teacher's logits predicted once over the training set (`Trainer.predict`), "
        "padded to max_length, then the student trained on them in a plain loop, also padded to max_length "
        f"(`{REFERENCE}`). The plain loops below run the teacher on every step instead.", "",
        "Examples/s is examples / total step time over the timed steps (with length grouping, step times vary by design, "
        "so the epoch's throughput, not the median step). Examples per CPU-second counts the CPU time of this process's "
        "threads during the timed steps: what a step costs, which other jobs on the cores change much less than its "
        "wall time.", "",
    ]
    header = "| Arm | Examples/s per round | Examples/CPU-s per round | Padded length |"
    rule = "|---|---|---|---|"
    if show_score:
        header, rule = header + " Dev score (acc+F1)/2 per round |", rule + "---|"
    lines += [header, rule]
    for key, label in arms.items():
        ex = ", ".join(f"{rd[key]['examples_per_s']:.1f}" for rd in rounds)
        ex_cpu = ", ".join(f"{rd[key]['examples_per_cpu_s']:.1f}" for rd in rounds)
        padded = statistics.fmean(rd[key]["mean_padded_length"] for rd in rounds)
        row = f"| {label} | {ex} | {ex_cpu} | {padded:.1f} |"
        if show_score:
            row += " " + ", ".join(f"{100 * rd[key]['dev']['score']:.1f}" if ok else "–"
                                   for rd, ok in zip(rounds, learned[key])) + " |"
        lines.append(row)
    scores = [100 * rd[k]["dev"]["score"] for rd in rounds for k in arms]
    lines += ["", f"Majority-class dev score (every dev pair labelled {majority['label']}, the training set's most frequent "
              f"label): {100 * majority['score']:.1f}. "
              + (f"A score not above it by more than {100 * meta['majority_margin']:.1f} points is shown as –: that arm did not "
                 "train past the majority class." if show_score else
                 f"No arm's dev score rose more than {100 * meta['majority_margin']:.1f} points above it (all "
                 f"{len(scores)} arm-rounds scored {min(scores):.1f}–{max(scores):.1f}): in {n_pairs} training pairs no "
                 "arm trained past the majority class, so no score column is shown (the scores are in the JSON).")]

    lines += _end_to_end_lines(data, n_pairs) + _per_step_lines(data) + _profile_lines(data)
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    """The command line, checked."""
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
    parser.add_argument("--profile-steps", type=int, default=4,
                        help="cProfile the online arm and the dynamic-padding plain loop over this many steps first (0: off)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "student_throughput" / "student_throughput"))
    args = parser.parse_args(argv)
    for name in ("batch_size", "steps", "rounds", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()

    with tempfile.TemporaryDirectory() as tmp:
        # The teacher as an exported classifier directory (its head's weights do not affect speed).
        teacher_dir = str(Path(tmp) / "teacher")
        model, _ = load_classifier(args.teacher, 2)
        model.save_pretrained(teacher_dir)
        load_tokenizer(args.teacher).save_pretrained(teacher_dir)

        def cache(name: str, seed: int) -> str:  # a fresh cache per arm and round: every cached fit builds its targets
            return str(Path(tmp) / "cache" / f"{name}-{seed}")

        modes = {
            "cached": lambda seed: lightning_mode(args, teacher_dir, "cached", cache("cached", seed), seed),
            "online": lambda seed: lightning_mode(args, teacher_dir, "online", cache("online", seed), seed),
            "cached_grouped": lambda seed: lightning_mode(args, teacher_dir, "cached", cache("cached_grouped", seed), seed,
                                                          group_by_length=True),
            "online_grouped": lambda seed: lightning_mode(args, teacher_dir, "online", cache("online_grouped", seed), seed,
                                                          group_by_length=True),
            "public_scripts": lambda seed: plain_mode(args, teacher_dir, seed, fixed_padding=True, predict_first=True),
            "plain_fixed_padding": lambda seed: plain_mode(args, teacher_dir, seed, fixed_padding=True),
            "plain_dynamic_padding": lambda seed: plain_mode(args, teacher_dir, seed, fixed_padding=False),
        }
        assert list(modes) == list(ARMS)
        profiles = {}
        if args.profile_steps > 0:
            short = argparse.Namespace(**{**vars(args), "steps": args.profile_steps, "warmup": 0})
            profiles["online"] = lightning_mode(short, teacher_dir, "online", cache("profile", 0), args.seed, profile=True)["profile"]
            profiles["plain_dynamic_padding"] = plain_mode(short, teacher_dir, args.seed, fixed_padding=False, profile=True)["profile"]
            for name, profile in profiles.items():
                print(f"{name} step profile: " + ", ".join(f"{k} {v:.3f}" for k, v in profile.items()), flush=True)
        majority = majority_class_score(args)
        rounds: list[dict] = []
        start = time.perf_counter()
        for r in range(args.rounds):  # round-robin, order alternating, so contention and drifts hit every arm alike
            order = list(modes) if r % 2 == 0 else list(reversed(modes))
            done = {name: modes[name](args.seed + r) for name in order}
            rounds.append({name: done[name] for name in ARMS})
            print(f"round {r}: " + ", ".join(f"{k} {v['examples_per_s']:.2f} ex/s, build {v['build_s']:.2f} s, epoch "
                                              f"{v['epoch_s']:.2f} s, dev {v['dev']['score']:.4f}"
                                              for k, v in done.items()), flush=True)
        wall = time.perf_counter() - start

    command = "PYTHONPATH=. python benchmarks/student_throughput.py " + " ".join(argv if argv is not None else sys.argv[1:])
    meta = {"teacher": args.teacher, "student": args.student, "task": "mrpc", "batch_size": args.batch_size,
            "timed_steps": args.steps, "warmup_steps": args.warmup, "max_seq_length": args.max_seq_length,
            "threads": args.threads, "rounds": args.rounds, "seed": args.seed, "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(), "device": "cpu", "benchmark_wall_s": wall,
            "load_average_before": load_before, "load_average_after": os.getloadavg(), "command": command,
            "arms": ARMS, "reference": REFERENCE, "epochs": list(EPOCHS), "majority_margin": MAJORITY_MARGIN}
    results = {k: {"examples_per_s_median_of_rounds": statistics.median(rd[k]["examples_per_s"] for rd in rounds),
                   "examples_per_s_rounds": [rd[k]["examples_per_s"] for rd in rounds],
                   "examples_per_cpu_s_rounds": [rd[k]["examples_per_cpu_s"] for rd in rounds],
                   "dev_rounds": [rd[k]["dev"] for rd in rounds]} for k in ARMS}
    data = {"meta": meta, "results": results, **analyse(rounds), "majority_class": majority, "rounds": rounds,
            "step_profiles": profiles}
    text = json.dumps(data, indent=2) + "\n"
    markdown = render(json.loads(text), notes_for_output(out))  # rendered from the JSON as written
    write_atomic(out.with_suffix(".json"), text)
    write_atomic(out.with_suffix(".md"), markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
