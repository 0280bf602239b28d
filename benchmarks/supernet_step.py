"""The MLFS supernet training step: float32 vs bf16-mixed, random batches vs length-grouped ones (a 2×2 grid).

One step is the whole manual-optimisation step of `SuperTransformer` (`MLFSStep.accumulate_gradients`,
as its `training_step` runs it): the maxnet's forward and backward, then the K sampled subnets' (against the
maxnet's detached logits and features), gradient clipping and one AdamW step, under bf16 autocast for
bf16-mixed as Lightning runs it. Each arm is a fresh supernet from the pretrained checkpoint (`base:
pretrained`, stage 1: widths sampled at full depth, or `--stage 2`) with its own optimizer, on the same seeded
SST-2 subset for one short epoch in its own batch order; every step is timed (unless `--warmup`), so each arm
times the same examples. The arms' steps are interleaved round-robin (step i of every arm, their order
rotating by one each step), so a change in the load of a shared CPU hits every arm alike; each speed-up is
taken within a round against that round's float32 random-order arm.

    PYTHONPATH=. python benchmarks/supernet_step.py --model models/minilm

Writes benchmarks/results/supernet_step/supernet_step.{json,md} (the markdown generated from the JSON).
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

import torch  # noqa: E402

from kdlora.data.glue import GLUEDataModule  # noqa: E402
from kdlora.io import write_atomic  # noqa: E402
from kdlora.mlfs import SuperTransformer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# name -> (trainer.precision, data.group_by_length)
ARMS = {
    "fp32_random": ("32-true", False),
    "fp32_grouped": ("32-true", True),
    "bf16_random": ("bf16-mixed", False),
    "bf16_grouped": ("bf16-mixed", True),
}
REFERENCE = "fp32_random"


class Arm:
    """One arm: a fresh supernet from the pretrained checkpoint in MLFS stage `stage`, its optimizer and schedule
    (the module's own `configure_optimizers`), its batches (random or length-grouped order), and `step`: the
    module's manual-optimisation step (`accumulate_gradients`: the maxnet, then the sampled subnets, one backward
    each; gradient clipping; one AdamW step), under bf16 autocast for bf16-mixed as Lightning runs it."""

    def __init__(self, args, precision: str, grouped: bool, seed: int, work: Path) -> None:
        steps = args.warmup + args.steps
        dm = GLUEDataModule("sst2", args.model, data_dir=args.data_dir, batch_size=args.batch_size,
                            max_seq_length=args.max_seq_length, max_train_samples=steps * args.batch_size, seed=seed,
                            group_by_length=grouped, cache_dir=str(work / "cache"))
        dm.setup("fit")
        self.batches = iter(dm.train_dataloader())
        torch.manual_seed(seed)
        stage_epochs = [0, 0, 0]
        stage_epochs[args.stage] = 1
        self.module = module = SuperTransformer(args.model, "sst2", base="pretrained", stages={"epochs": stage_epochs},
                                                sampling={"num_subnets": args.num_subnets, "sampler_seed": seed},
                                                evaluation={"members": ["max", "min"], "measure_latency": False},
                                                export={"enabled": False})
        module.stage = args.stage
        module.schedule.steps = lambda trainer, stage: steps  # the schedule's length, which a Trainer would compute
        module.manual_backward = lambda loss: loss.backward()  # what Lightning's manual_backward does on one CPU
        module.train()
        config = module.configure_optimizers()  # enters the stage: only its adapters and the projections train
        self.optimizer, self.schedule = config["optimizer"], config["lr_scheduler"]["scheduler"]
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.precision = precision
        self.step_index = 0
        self.times, self.cpu_times, self.lengths, self.losses = [], [], [], []

    def step(self, timed: bool) -> None:
        batch = next(self.batches)
        module = self.module
        start, cpu_start = time.perf_counter(), time.process_time()
        self.optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.precision == "bf16-mixed"):
            losses = module.mlfs_step.accumulate_gradients(batch, module.sampler.sample(module.stage, self.step_index), module.stage)
        torch.nn.utils.clip_grad_norm_(self.params, module.gradient_clip)
        self.optimizer.step()
        self.schedule.step()
        if timed:
            self.times.append(time.perf_counter() - start)
            self.cpu_times.append(time.process_time() - cpu_start)
            self.lengths.append(int(batch["input_ids"].shape[1]))
            self.losses.append(float(losses["maxnet"]))
        self.step_index += 1

    def summary(self, batch_size: int) -> dict:
        return {"steps": len(self.times), "seconds": sum(self.times), "cpu_seconds": sum(self.cpu_times),
                "step_s": self.times, "median_step_s": statistics.median(self.times),
                "examples_per_s": batch_size * len(self.times) / sum(self.times),
                "examples_per_cpu_s": batch_size * len(self.times) / sum(self.cpu_times),
                "mean_padded_length": statistics.fmean(self.lengths), "maxnet_losses": self.losses}


def run_round(args, seed: int, work: Path) -> dict:
    """Every arm's steps interleaved: step i of each arm, the arms' order rotating by one every step."""
    arms = {name: Arm(args, precision, grouped, seed, work / name) for name, (precision, grouped) in ARMS.items()}
    names = list(arms)
    for i in range(args.warmup + args.steps):
        for name in names[i % len(names):] + names[:i % len(names)]:
            arms[name].step(timed=i >= args.warmup)
    return {name: arm.summary(args.batch_size) for name, arm in arms.items()}


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
        f"threads, torch {meta['torch']}; {meta['rounds']} round(s) in one process, the arms' steps interleaved "
        f"round-robin (their order rotating every step). "
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
    parser.add_argument("--steps", type=int, default=6, help="timed steps per arm and round")
    parser.add_argument("--warmup", type=int, default=0,
                        help="untimed steps first (0: time the whole epoch, so every arm times the same examples: "
                             "length grouping puts the longest batch first)")
    parser.add_argument("--rounds", type=int, default=1, help="rounds, each with fresh supernets from seed + r")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=42, help="round r: seed + r (subset, order, init, subnets) for every arm")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "supernet_step" / "supernet_step"))
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
            rounds.append(run_round(args, args.seed + r, Path(tmp) / str(r)))
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
