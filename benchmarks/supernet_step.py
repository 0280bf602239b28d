"""The MLFS supernet training step: float32 vs bf16-mixed, random batches vs length-grouped ones (a 2×2 grid).

One step is the whole manual-optimisation step of `SuperTransformer` (`MLFSTraining.training_step`): the
maxnet's forward and backward, then the K sampled subnets' (against the maxnet's detached logits and
features), gradient clipping and one AdamW step. Each arm trains a fresh supernet from the pretrained
checkpoint (`base: pretrained`, stage 1: widths sampled at full depth, or `--stage 2`) on the same seeded
SST-2 subset for one short epoch, every step timed (unless `--warmup`): each arm then times the same
examples, in batches of its own order. The arms run round-robin, their
order alternating from round to round, so a change in the load of the shared CPU hits every arm alike;
each speed-up is taken within a round against that round's float32 random-order arm.

    PYTHONPATH=. python benchmarks/supernet_step.py --model models/minilm

Writes benchmarks/results/supernet_step.{json,md} (the markdown generated from the JSON).
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

from kdlora.callbacks import write_atomic  # noqa: E402
from kdlora.data import GLUEDataModule  # noqa: E402
from kdlora.modules import SuperTransformer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# name -> (trainer.precision, data.group_by_length)
ARMS = {
    "fp32_random": ("32-true", False),
    "fp32_grouped": ("32-true", True),
    "bf16_random": ("bf16-mixed", False),
    "bf16_grouped": ("bf16-mixed", True),
}
REFERENCE = "fp32_random"


class StepTimer(L.Callback):
    """Wall and process CPU time of each training step after `warmup` untimed ones, with its padded length
    and the maxnet's loss (a finite loss in every arm: the bf16 steps train, not only run)."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.cpu_start = warmup, 0.0, 0.0
        self.times, self.cpu_times, self.lengths, self.losses = [], [], [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.start, self.cpu_start = time.perf_counter(), time.process_time()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx >= self.warmup:
            self.times.append(time.perf_counter() - self.start)
            self.cpu_times.append(time.process_time() - self.cpu_start)
            self.lengths.append(int(batch["input_ids"].shape[1]))
            self.losses.append(float(trainer.callback_metrics["train/maxnet_loss"]))


def run_arm(args, precision: str, grouped: bool, seed: int, work: Path) -> dict:
    steps = args.warmup + args.steps
    dm = GLUEDataModule("sst2", args.model, data_dir=args.data_dir, batch_size=args.batch_size,
                        max_seq_length=args.max_seq_length, max_train_samples=steps * args.batch_size, seed=seed,
                        group_by_length=grouped, cache_dir=str(work / "cache"))
    torch.manual_seed(seed)
    stage_epochs = [0, 0, 0]
    stage_epochs[args.stage] = 1
    module = SuperTransformer(args.model, "sst2", base="pretrained", stage_epochs=stage_epochs, num_subnets=args.num_subnets,
                              palette=["max", "min"], sampler_seed=seed, measure_latency=False, export=False)
    timer = StepTimer(args.warmup)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", devices=1, precision=precision, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0, callbacks=[timer], default_root_dir=str(work / "run"))
    trainer.fit(module, datamodule=dm)
    return {"steps": len(timer.times), "seconds": sum(timer.times), "cpu_seconds": sum(timer.cpu_times),
            "step_s": timer.times, "median_step_s": statistics.median(timer.times),
            "examples_per_s": args.batch_size * len(timer.times) / sum(timer.times),
            "examples_per_cpu_s": args.batch_size * len(timer.times) / sum(timer.cpu_times),
            "mean_padded_length": statistics.fmean(timer.lengths), "maxnet_losses": timer.losses}


def ratios(rounds: list[dict], key: str) -> dict:
    per_round = [{k: rd[k][key] / rd[REFERENCE][key] for k in ARMS} for rd in rounds]
    return {k: {"median": statistics.median(pr[k] for pr in per_round), "min": min(pr[k] for pr in per_round),
                "max": max(pr[k] for pr in per_round), "rounds": [pr[k] for pr in per_round]} for k in ARMS if k != REFERENCE}


def markdown(data: dict) -> str:
    """The report, from the JSON alone."""
    meta, rounds = data["meta"], data["rounds"]
    stage = "widths sampled at full depth" if meta["stage"] == 1 else "widths and depth sampled"
    lines = [
        "# MLFS supernet training step: float32 vs bf16-mixed, random vs length-grouped batches", "",
        f"Command: `{meta['command']}`", "",
        f"`SuperTransformer` on `{meta['model']}` (`base: pretrained`, LoRA r=8 on Q, K, V and FFN), SST-2 "
        f"(the embedded subset), batch {meta['batch_size']}, max_seq_length {meta['max_seq_length']}; stage {meta['stage']} "
        f"({stage}), K = {meta['num_subnets']} subnets per step besides the maxnet (sandwich). One step = the maxnet's and "
        f"the K subnets' forward and backward, clipping and one AdamW step. In round r every arm trains a fresh supernet "
        f"from seed {meta['seed']} + r on the same {meta['batch_size'] * (meta['warmup_steps'] + meta['timed_steps'])} examples "
        f"({meta['warmup_steps']} untimed step(s), then {meta['timed_steps']} timed); the same subnets are sampled at each "
        f"step in every arm. CPU `{meta['cpu']}` (bf16 supported natively: {meta['bf16_supported']}), {meta['threads']} "
        f"threads, torch {meta['torch']}; {meta['rounds']} rounds in one process, arms round-robin in alternating order. "
        f"The CPU is shared with other jobs (load average {meta['load_average_before'][0]:.1f} at the start, "
        f"{meta['load_average_after'][0]:.1f} at the end): ratios are taken within a round, against that round's "
        f"`{REFERENCE}`, and the median over rounds is reported. Benchmark wall time {meta['benchmark_wall_s']:.0f} s.", "",
        "Examples/s: examples / total timed step time (length grouping varies step times by design). Examples per "
        "CPU-second: the CPU time of this process's threads over the timed steps, what a step costs, less sensitive "
        "to other jobs than wall time.", "",
        "| Arm | precision | group_by_length | Examples/s per round | Examples/CPU-s per round | Median step (s) per round | Padded length | Maxnet loss, last timed step per round |",
        "|---|---|---|---|---|---|---|---|",
    ]
    def each(values, spec: str) -> str:
        return ", ".join(format(v, spec) for v in values)

    for key, (precision, grouped) in data["arms"].items():
        per = [rd[key] for rd in rounds]
        lines.append(f"| {key} | {precision} | {str(grouped).lower()} | {each((r['examples_per_s'] for r in per), '.1f')} | "
                     f"{each((r['examples_per_cpu_s'] for r in per), '.1f')} | {each((r['median_step_s'] for r in per), '.2f')} | "
                     f"{statistics.fmean(r['mean_padded_length'] for r in per):.1f} | "
                     f"{each((r['maxnet_losses'][-1] for r in per), '.3f')} |")
    for what, table in (("wall-clock examples/s", data["speedup"]), ("examples per CPU-second", data["cpu_speedup"])):
        lines += ["", f"| Arm / {REFERENCE}, {what} | Median over rounds | Min–max | Per round |", "|---|---|---|---|"]
        lines += [f"| {k} | {v['median']:.2f}x | {v['min']:.2f}–{v['max']:.2f}x | {', '.join(f'{x:.2f}' for x in v['rounds'])} |"
                  for k, v in table.items()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    from kdlora.cli import bf16_supported

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="models/minilm", help="a pretrained encoder (a new classifier head is added)")
    parser.add_argument("--data-dir", default=str(REPO / "kdlora" / "assets" / "glue"))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-seq-length", type=int, default=128)
    parser.add_argument("--stage", type=int, default=1, choices=(1, 2), help="the MLFS stage the steps run in")
    parser.add_argument("--num-subnets", type=int, default=2, help="K, subnets per step besides the maxnet")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per arm and round")
    parser.add_argument("--warmup", type=int, default=0,
                        help="untimed steps first (0: time the whole epoch, so every arm times the same examples: "
                             "length grouping puts the longest batch first)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=42, help="round r: seed + r (subset, order, init, subnets) for every arm")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "supernet_step"))
    args = parser.parse_args(argv)
    for name in ("batch_size", "steps", "rounds", "threads", "num_subnets"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.warmup < 0:
        parser.error(f"--warmup must be at least 0, got {args.warmup}")
    if not Path(args.model).is_dir():
        parser.error(f"--model {args.model!r} is not a directory (bash scripts/fetch_models.sh minilm models/minilm)")
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    rounds: list[dict] = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            order = list(ARMS) if r % 2 == 0 else list(reversed(ARMS))
            result = {}
            for name in order:
                precision, grouped = ARMS[name]
                result[name] = run_arm(args, precision, grouped, args.seed + r, Path(tmp) / f"{r}-{name}")
            rounds.append({k: result[k] for k in ARMS})
            print(f"round {r}: " + ", ".join(f"{k} {v['examples_per_s']:.1f} ex/s ({v['mean_padded_length']:.0f} tok)"
                                              for k, v in rounds[-1].items()), flush=True)
    wall = time.perf_counter() - start
    command = "PYTHONPATH=. python benchmarks/supernet_step.py " + " ".join(argv if argv is not None else sys.argv[1:])
    meta = {"model": args.model, "task": "sst2", "batch_size": args.batch_size, "max_seq_length": args.max_seq_length,
            "stage": args.stage, "num_subnets": args.num_subnets, "timed_steps": args.steps, "warmup_steps": args.warmup,
            "rounds": args.rounds, "threads": args.threads, "seed": args.seed, "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(), "bf16_supported": bf16_supported("cpu"),
            "load_average_before": load_before, "load_average_after": os.getloadavg(), "benchmark_wall_s": wall,
            "command": command.strip()}
    data = {"meta": meta, "arms": {k: list(v) for k, v in ARMS.items()}, "rounds": rounds,
            "speedup": ratios(rounds, "examples_per_s"), "cpu_speedup": ratios(rounds, "examples_per_cpu_s")}
    out = Path(args.out)
    text = markdown(data)
    write_atomic(out.with_suffix(".json"), json.dumps(data, indent=2) + "\n")
    write_atomic(out.with_suffix(".md"), text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
