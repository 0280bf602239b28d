"""MLFS palettes with the paper's recipe on MiniLM-L6, beside the same slices trained alone.

Every run goes through `train.py fit` with `configs/local/minilm-supernet-paper.yaml` plus the task's
paper schedule (`configs/supernet/tasks/<task>.yaml`: batch, stage epochs, lr, gamma), scaled to a
2-core CPU by `--train-samples` (a seeded subset of train; the held-out 10 % used for selection is
split off the full train first) and `--val-batches` (batches of that held-out split per validation).
Runs land in `runs/mlfs_palette/<task>/<name>/version_N/`; dev is only ever reported. Each `mlfs`, `alone` and `fft`
run, as it ends, writes its record (seed, training rows, wall time, scores) to
`benchmarks/results/mlfs_palette/records/<task>/<name>.json`: the data `decide` reads, committed beside the results.

    # one MLFS run (the paper's recipe), with the dev palette at the end of every stage:
    python benchmarks/mlfs_palette.py mlfs --task mrpc
    # an ablation or a variant: a name and any train.py overrides after `--`
    python benchmarks/mlfs_palette.py mlfs --task stsb --name gamma0 -- --model.init_args.distillation.gamma 0
    # the paper's base vs a fine-tuned one: an FFT teacher on the same data, then MLFS from it
    python benchmarks/mlfs_palette.py fft --task stsb
    python benchmarks/mlfs_palette.py mlfs --task stsb --name finetuned -- --model.init_args.base finetuned \
        --model.init_args.model_name_or_path runs/mlfs_palette/stsb/fft/export
    # the baseline: the same slice of the pretrained model, fine-tuned alone with the same LoRA
    # (targets, rank, lr, batch, head) for as many epochs as the whole MLFS run
    python benchmarks/mlfs_palette.py alone --task mrpc --member h256-a6-f768-l0.3.5
    # the KD-LoRA MiniLM-L3 student on the same data, distilling the `fft` teacher (run that first)
    python benchmarks/mlfs_palette.py student --task sst2
    # the same slice alone at matched budget: as many optimizer steps as the MLFS run of that name (same seed)
    # trained exactly this slice (its palette's `trained_steps`), in the fewest epochs that hold them
    python benchmarks/mlfs_palette.py alone --task sst2 --member h256-a6-f768-l0.3.5 --matched-to paper
    # the decision: every member of the MLFS runs (the first named is the recipe, the rest variants) beside its
    # alone runs (full and matched budget), the maxnet alone and the FFT teacher, over seeds; mean ± sd, paired
    # MLFS − alone with 95 % t-intervals, the wall time of one MLFS run against the palette trained alone
    python benchmarks/mlfs_palette.py decide --task sst2 --runs paper distill0 --seeds 42 43 44 \
        --out benchmarks/results/mlfs_palette/mlfs_decision_sst2
    # the records of finished runs made without one (every run folder of the task, or --runs NAME ... --seeds S ...)
    python benchmarks/mlfs_palette.py record --task sst2
    # batch-1 / batch-32 CPU latency of the exported members, round-robin, ratios to the maxnet (records/<task>/latency.json)
    python benchmarks/mlfs_palette.py latency --task mrpc
    # tables (markdown + JSON) and the ablation figures (PNG)
    python benchmarks/mlfs_palette.py table --out benchmarks/results/mlfs_palette/mlfs_palette
    python benchmarks/mlfs_palette.py mlfs --task sst2 --name gamma0 -- --model.init_args.distillation.gamma 0   # ... gamma2, rank4, rank16
    python benchmarks/mlfs_palette.py ablations --task sst2 --runs paper gamma0 gamma2 rank4 rank16 \
        --out benchmarks/results/mlfs_palette/mlfs_ablations_sst2

"start" in the tables is the member sliced from the stage-0 maxnet: with a pretrained base the
maxnet only does the task after stage 0 (its LoRA fine-tuning), so that is the teacher the subnets
are cut from, before MLFS trains any subnet (`palette_stage0.json`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from kdlora.experiments.report import saved_config
from kdlora.io import write_atomic
from results_files import notes_for_output

ROOT = Path(__file__).resolve().parent.parent

CONFIG = "configs/local/minilm-supernet-paper.yaml"
RUNS = Path("runs/mlfs_palette")
RECORDS = Path("benchmarks/results/mlfs_palette/records")
"""One JSON per finished run, ``<task>/<run name>.json``, written when the run ends (or by `record`): what
`decide` reads, so a decision is rebuilt from the repository alone once the run folders are gone."""
TASK_CONFIG = "configs/supernet/tasks/{task}.yaml"


def scale_args(a) -> list[str]:
    return ["--data.max_train_samples", str(a.train_samples), "--trainer.limit_val_batches", str(a.val_batches),
            "--data.data_dir", a.data_dir]


def run_fit(args: list[str], run_dir: Path | None = None, threads: int | None = None) -> Path | None:
    """`train.py fit` with `args` on `threads` CPU threads (None: torch's default); with `run_dir` (the logger's
    <save_dir>/<name>) its wall time goes to `wall_time.json` in the run's new version directory, which is returned."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, "train.py", "fit", *args]
    print("+", " ".join(cmd), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, env=env, check=True)
    seconds = time.perf_counter() - start
    if run_dir is not None:
        made = versions(ROOT / run_dir)
        if made:
            write_atomic(made[-1] / "wall_time.json", json.dumps({"seconds": round(seconds, 1), "threads": threads}) + "\n")
            return made[-1]
    return None


def versions(path: Path) -> list[Path]:
    """The `version_N` folders of a run name's folder, oldest first."""
    return sorted(path.glob("version_*"), key=lambda p: int(p.name.split("_")[1]))


def latest_run(path: Path) -> Path:
    finished = finished_versions(path, "palette_final.json")
    if not finished:
        raise FileNotFoundError(f"no finished run under {path}")
    return finished[-1]


def seeded(name: str, seed: int) -> str:
    """The run name of `name` at `seed` (the default seed 42 keeps the plain name)."""
    return name if seed == 42 else f"{name}-s{seed}"


def seed_args(a) -> list[str]:
    """The run seed; LightningCLI applies arguments in order, so this must come after every --config (whose
    ``seed_everything`` would otherwise win)."""
    return ["--seed_everything", str(a.seed)]


def cmd_mlfs(a) -> None:
    name = seeded(a.name, a.seed)
    out = RUNS / a.task / name
    run = run_fit(["--config", CONFIG, "--config", TASK_CONFIG.format(task=a.task), *seed_args(a), *scale_args(a),
             "--model.init_args.evaluation.stage_palettes", "true", "--model.init_args.evaluation.measure_latency", "false",
             "--model.init_args.export.dir", str(out / "export"),
             "--trainer.logger.init_args.save_dir", str(RUNS / a.task), "--trainer.logger.init_args.name", name,
             *a.overrides], RUNS / a.task / name, a.fit_threads)
    if run is not None:
        save_record(a.task, name, run)


def cmd_fft(a) -> None:
    """A fully fine-tuned teacher on the same data (same held-out split and training subset), for `base: finetuned`."""
    name = seeded("fft", a.seed)
    out = RUNS / a.task / name
    run = run_fit(["--config", "configs/local/minilm-fft.yaml", *seed_args(a), "--data.task", a.task, *scale_args(a),
             "--data.holdout_fraction", "0.1", "--model.init_args.export.dir", str(out / "export"),
             "--trainer.logger.init_args.save_dir", str(RUNS / a.task), "--trainer.logger.init_args.name", name, *a.overrides],
                  RUNS / a.task / name, a.fit_threads)
    if run is not None:
        save_record(a.task, name, run)


def task_epochs(task: str) -> int:
    import yaml

    return int(sum(yaml.safe_load((ROOT / TASK_CONFIG.format(task=task)).read_text())["model"]["init_args"]["stages"]["epochs"]))


def cmd_student(a) -> None:
    """The KD-LoRA MiniLM-L3 student (`configs/local/minilm-student.yaml`) on the same data as the MLFS run
    (training subset, held-out split for selection, batch via overrides), for as many epochs as the whole
    MLFS run, distilling the FFT teacher of `fft` (same data); dev scored after fit (results.json "test")."""
    teacher = RUNS / a.task / "fft" / "export"
    if not (teacher / "config.json").is_file():
        raise FileNotFoundError(f"no FFT teacher at {teacher}: run `mlfs_palette.py fft --task {a.task}` first")
    name = seeded("kdlora-l3", a.seed)
    run_fit(["--config", "configs/local/minilm-student.yaml", *seed_args(a), "--data.task", a.task, *scale_args(a),
             "--data.holdout_fraction", "0.1", "--model.init_args.teacher_path", str(teacher),
             "--model.init_args.teacher_targets.cache_dir", str(RUNS / a.task / name / "teacher_targets"),
             "--model.init_args.export.enabled", "false", "--trainer.max_epochs", str(task_epochs(a.task)),
             "--trainer.logger.init_args.save_dir", str(RUNS / a.task), "--trainer.logger.init_args.name", name, *a.overrides])


def student_result(task: str) -> dict | None:
    """{score, params, run} of the latest finished `student` run of `task` (dev, selected on held-out), else None."""
    runs = sorted((RUNS / task / "kdlora-l3").glob("version_*/results.json"), key=lambda p: int(p.parent.name.split("_")[1]))
    for path in reversed(runs):
        results = json.loads(path.read_text())
        if "test" in results:
            return {"score": results["test"]["score"], "params": (results.get("parameters") or {}).get("total"),
                    "run": str(path.parent)}
    return None


def export_pretrained_slice(member: str, pretrained: str, out: Path, task: str) -> None:
    """The member's slice of the pretrained model as an HF directory without a classifier head (so the
    run that trains it sees a pretrained model: a new head, `base: pretrained`)."""
    from safetensors.torch import load_file, save_file

    from kdlora.data.tasks import get_task
    from kdlora.data.tokenizer import load_tokenizer
    from kdlora.elastic import ElasticTransformer, SubnetConfig
    from kdlora.training.loading import load_classifier

    if (out / "model.safetensors").is_file():
        return
    spec = get_task(task)
    cfg = None if member == "max" else SubnetConfig.from_name(member)  # a bad name fails before the model loads
    model, _ = load_classifier(pretrained, spec.num_labels, spec.is_regression)  # the task's head config (STS-B: 1 output)
    encoder = ElasticTransformer(model)
    cfg = cfg or encoder.max_config
    cfg.validate(encoder.max_config)
    encoder.export_hf(cfg, out, load_tokenizer(pretrained))
    weights = out / "model.safetensors"
    tensors = {k: v for k, v in load_file(weights).items() if not k.startswith("classifier.")}
    save_file(tensors, weights, metadata={"format": "pt"})


def member_training_steps(task: str, name: str, seed: int) -> dict[str, int]:
    """{member: optimizer steps in which the finished MLFS run `name` at `seed` trained exactly that member's slice}
    (``trained_steps`` of its end-of-fit palette, from its record)."""
    record = load_record(task, name, seed)
    if record is None:
        raise FileNotFoundError(f"no record of the MLFS run {seeded(name, seed)} under {RECORDS / task}: run it first "
                                f"(or `mlfs_palette.py record --task {task}` once it has finished)")
    missing = [n for n, r in record["members"].items() if r.get("trained_steps") is None]
    if missing:
        raise ValueError(f"the record of {seeded(name, seed)} does not count the steps that trained {', '.join(missing)}")
    return {n: int(r["trained_steps"]) for n, r in record["members"].items()}


def matched_schedule(a, trained_steps: dict[str, int]) -> tuple[int, int]:
    """(epochs, batches per epoch) that train `a.member` alone for as many optimizer steps as MLFS trained its
    exact slice (at least one; the fewest epochs that hold them, so a step budget not divisible by the epochs
    is rounded up by less than one step per epoch)."""
    if a.member not in trained_steps:
        raise ValueError(f"{a.member} is not a member of the MLFS run {a.matched_to} (members: {', '.join(trained_steps)})")
    if max(1, trained_steps[a.member]) == max(trained_steps.values()):
        raise ValueError(f"{a.member} trained in every step of {a.matched_to}: its matched budget is the full-budget alone run")
    return step_schedule(trained_steps[a.member], a.train_samples, task_batch_size(a.task))


def task_batch_size(task: str) -> int:
    import yaml

    return int(yaml.safe_load((ROOT / TASK_CONFIG.format(task=task)).read_text())["data"]["batch_size"])


def step_schedule(steps: int, train_samples: int, batch: int) -> tuple[int, int]:
    """(epochs, batches per epoch): the fewest epochs of `train_samples` rows in batches of `batch` that hold `steps`
    optimizer steps (at least one), rounded up by less than one step per epoch."""
    steps = max(1, steps)
    epochs = math.ceil(steps / math.ceil(train_samples / batch))
    return epochs, math.ceil(steps / epochs)


def cmd_alone(a) -> None:
    matched = a.matched_to is not None
    name = seeded(f"alone-matched-{a.matched_to}-{a.member}" if matched else f"alone-{a.member}", a.seed)
    model_dir = RUNS / a.task / seeded(f"alone-{a.member}", a.seed) / "model"
    export_pretrained_slice(a.member, a.pretrained, model_dir, a.task)
    epochs = task_epochs(a.task)
    budget = []
    if matched:
        epochs, batches = matched_schedule(a, member_training_steps(a.task, a.matched_to, a.seed))
        budget = ["--trainer.limit_train_batches", str(batches)]
    run = run_fit(["--config", CONFIG, "--config", TASK_CONFIG.format(task=a.task), *seed_args(a), *scale_args(a),
             "--model.init_args.model_name_or_path", str(model_dir), "--model.init_args.evaluation.members", "[max]",
             "--model.init_args.stages.epochs", f"[{epochs}, 0, 0]", "--trainer.max_epochs", str(epochs), *budget,
             "--model.init_args.evaluation.measure_latency", "false", "--model.init_args.export.enabled", "false",
             "--trainer.logger.init_args.save_dir", str(RUNS / a.task), "--trainer.logger.init_args.name", name,
             *a.overrides], RUNS / a.task / name, a.fit_threads)
    if run is not None:
        save_record(a.task, name, run)


def cmd_latency(a) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification

    from kdlora.eval.latency import round_robin_latency_ms

    torch.set_num_threads(a.threads)
    export = RUNS / a.task / a.name / "export"
    members = json.loads((export / "kdlora_export.json").read_text())["members"]
    models = [AutoModelForSequenceClassification.from_pretrained(export / m).eval() for m in members]
    vocab = models[0].config.vocab_size
    result = {"task": a.task, "export": export.as_posix(), "threads": a.threads, "members": members, "ms": {}}
    for batch, repeats in ((1, 40), (32, 8)):
        ms = round_robin_latency_ms(models, batch, 128, vocab, warmup=3, repeats=repeats)
        result["ms"][f"b{batch}"] = dict(zip(members, ms))
        print(f"batch {batch}: " + ", ".join(f"{m} {t / ms[0]:.2f}" for m, t in zip(members, ms)), flush=True)
    out = ROOT / RECORDS / a.task / "latency.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, json.dumps(result, indent=2) + "\n")


def rows_by_name(path: Path) -> dict[str, dict]:
    return {r["name"]: r for r in json.loads(path.read_text())} if path.is_file() else {}


def pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def cmd_table(a) -> None:
    measured = [ROOT / RECORDS / task / "latency.json" for task in a.tasks]
    latency = next((json.loads(p.read_text()) for p in measured if p.is_file()), None)
    data = {}
    for task in a.tasks:
        try:
            run = latest_run(RUNS / task / a.name)
        except FileNotFoundError:
            continue
        selected, final = rows_by_name(run / "palette.json"), rows_by_name(run / "palette_final.json")
        start = rows_by_name(run / "palette_stage0.json")
        variants = {}
        for v in a.variants:
            try:
                vrun = latest_run(RUNS / task / v)
                variants[v] = {"run": str(vrun), "final": rows_by_name(vrun / "palette_final.json"),
                               "start": rows_by_name(vrun / "palette_stage0.json")}
            except FileNotFoundError:
                pass
        names = list(final)
        max_name = names[0]
        n_max = final[max_name]["params"]
        lat = latency["ms"]["b1"] if latency else {}
        task_rows = []
        for n in names:
            alone_sel, alone_final = {}, {}
            try:
                alone_run = latest_run(RUNS / task / f"alone-{n}")
                alone_sel = next(iter(rows_by_name(alone_run / "palette.json").values()), {})
                alone_final = next(iter(rows_by_name(alone_run / "palette_final.json").values()), {})
            except FileNotFoundError:
                pass
            task_rows.append({
                "member": n, "role": final[n].get("role", ""), "params": final[n]["params"], "params_ratio": final[n]["params"] / n_max,
                "latency_ratio_b1": (lat[n] / lat[max_name]) if n in lat and max_name in lat else None,
                "start": start.get(n, {}).get("score"), "mlfs_selected": selected.get(n, {}).get("score"),
                "mlfs_final": final[n]["score"], "alone_selected": alone_sel.get("score"), "alone_final": alone_final.get("score"),
                "metrics_final": final[n]["metrics"], "alone_metrics_final": alone_final.get("metrics"),
                **{f"{v}_final": r["final"].get(n, {}).get("score") for v, r in variants.items()},
                **{f"{v}_start": r["start"].get(n, {}).get("score") for v, r in variants.items()}})
        sel_info = next(iter(selected.values()))
        data[task] = {"run": str(run), "selected": {k: sel_info.get(k) for k in ("weights", "epoch", "step", "stage")},
                      "variants": {v: r["run"] for v, r in variants.items()}, "rows": task_rows,
                      "kdlora_l3_student": student_result(task)}
    record = {"latency": latency, "tasks": data}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    md = render_table(record, notes_for_output(a.out, a.notes))
    write_atomic(out.with_suffix(".json"), json.dumps(record, indent=2))
    write_atomic(out.with_suffix(".md"), md)
    print(md)


def span(values: list[float], signed: bool = False) -> str:
    """The smallest and largest of `values` (fractions) ×100, as "a to b" (one value: just it)."""
    fmt = "{:+.1f}" if signed else "{:.1f}"
    low, high = (fmt.format(100 * v) for v in (min(values), max(values)))
    return low if low == high else f"{low} to {high}"


def comparison_rows(task: str, rows: list[dict], variants: list[str]) -> list[str]:
    """Per variant of `task`: how far its members end from the paper recipe's and from the slices trained
    alone (end of stage 2, every member both have)."""
    lines = []
    for v in variants:
        both = [r for r in rows if r.get(f"{v}_final") is not None and r["mlfs_final"] is not None]
        alone = [r for r in both if r["alone_final"] is not None]
        if not both:
            continue
        lines.append(f"| {task} | {v} | {len(both)} | {span([r[f'{v}_final'] - r['mlfs_final'] for r in both], signed=True)} | "
                     + (f"{len(alone)} | {span([r[f'{v}_final'] - r['alone_final'] for r in alone], signed=True)} |" if alone else "0 | – |"))
    return lines


def render_table(data: dict, notes: str | None = None) -> str:
    """The markdown of `mlfs_palette.py table` from its JSON (`data`) and the notes put under the title."""
    md = ["# MLFS palettes, the paper's recipe on MiniLM-L6, beside the same slices trained alone", "",
          "Made by `benchmarks/mlfs_palette.py table` from finished runs (its docstring has every command; each "
          "table's runs are named in `mlfs_palette.json`: `run`, `variants`). Dev scores are GLUE scores ×100 (MRPC: mean "
          "of F1 and accuracy; STS-B: mean of Pearson and Spearman; SST-2: accuracy). Selection (\"selected\") uses the "
          "held-out 10 % of train, never dev.", ""]
    if notes:
        md += [notes, ""]
    summary = []
    for task, t in data["tasks"].items():
        variants = list(t["variants"])
        rows = t["rows"]
        n_max = rows[0]["params"]
        extra = [c for v in variants for c in (f"{v} start", f"{v} end")]
        md += [f"## {task} (selected checkpoint: epoch {t['selected'].get('epoch')}, stage {t['selected'].get('stage')})", "",
               "| member | params M (×max) | latency ×max (b1) | start | MLFS selected | MLFS end | alone selected | alone end | "
               "MLFS end − alone end | " + "".join(f"{c} | " for c in extra),
               "|---" * (9 + len(extra)) + "|"]
        for r in rows:
            diff = None if r["alone_final"] is None or r["mlfs_final"] is None else r["mlfs_final"] - r["alone_final"]
            latency_cell = "–" if r["latency_ratio_b1"] is None else f"{r['latency_ratio_b1']:.2f}"
            cells = [f"{r['member']} {r['role']}".strip(), f"{r['params'] / 1e6:.2f} ({r['params_ratio']:.2f})", latency_cell,
                     pct(r["start"]), pct(r["mlfs_selected"]), pct(r["mlfs_final"]), pct(r["alone_selected"]), pct(r["alone_final"]),
                     "–" if diff is None else f"{100 * diff:+.1f}"]
            cells += [pct(r.get(f"{v}_{k}")) for v in variants for k in ("start", "final")]
            md.append("| " + " | ".join(cells) + " |")
        student = t.get("kdlora_l3_student")
        if student:
            size = f"{student['params'] / 1e6:.2f}M, {student['params'] / n_max:.2f}× the maxnet" if student["params"] else "size unknown"
            md += ["", f"KD-LoRA MiniLM-L3 student ({size}; LoRA r 8 on query/value, the same training subset, "
                       f"held-out selection, distilling an FFT MiniLM-L6 teacher trained on the same subset): dev "
                       f"{pct(student['score'])} (`mlfs_palette.py fft` then `student`, `{student['run']}`)."]
        md.append("")
        below = [r for r in rows[1:] if r["mlfs_final"] is not None]
        alone = [r for r in below if r["alone_final"] is not None]
        if below and alone:
            summary.append(f"| {task} | MLFS end, members below the maxnet | {span([r['mlfs_final'] for r in below])} | "
                           f"alone end: {span([r['alone_final'] for r in alone])} |")
        summary += [line for line in comparison_rows(task, rows, variants)]
    latency = data.get("latency") or {}
    for batch, ms in (latency.get("ms") or {}).items():
        if batch != "b1" and ms:
            base = next(iter(ms.values()))
            md += [f"Latency ×max at batch {batch[1:]} (the same exports, {latency.get('task')}, {latency.get('threads')} thread(s)): "
                   + ", ".join(f"{n} {v / base:.2f}" for n, v in ms.items()) + ".", ""]
    if summary:
        ranges = [line for line in summary if "members below the maxnet" in line]
        gains = [line for line in summary if line not in ranges]
        md += ["## Ranges over members (end of stage 2, ×100)", ""]
        if ranges:
            md += ["| task | what | range | beside |", "|---|---|---|---|", *ranges, ""]
        if gains:
            md += ["Each variant against the paper recipe (variant end − MLFS end) and against the slices trained alone "
                   "(variant end − alone end), over the members both have:", "",
                   "| task | variant | members | − MLFS end | members alone | − alone end |", "|---|---|---|---|---|---|", *gains, ""]
    return "\n".join(md).rstrip("\n") + "\n"


def scalars(run: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run), size_guidance={"scalars": 0})
    ea.Reload()
    return [(e.step, e.value) for e in ea.Scalars(tag)] if tag in ea.Tags()["scalars"] else []


def cmd_ablations(a) -> None:
    """The paper's two ablations from finished MLFS runs of one task: gradient scaling (runs that differ from
    the first, the reference, in gamma only: the minnet's training loss over steps, Fig. 3) and LoRA rank
    (runs that differ in lora_r only: every member's dev score at the end of stage 2, Fig. 4)."""
    import matplotlib
    import yaml

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {}
    for name in a.runs:
        try:
            run = latest_run(RUNS / a.task / name)
        except FileNotFoundError:
            print(f"skipping {name}: no finished run")
            continue
        hp = yaml.safe_load((run / "hparams.yaml").read_text())
        runs[name] = {"run": str(run), "gamma": float(hp["gamma"]), "lora_r": int(hp["lora_r"]),
                      "final": {n: r["score"] for n, r in rows_by_name(run / "palette_final.json").items()},
                      "smallest_loss": scalars(run, "train/smallest_loss"), "smallest_task": scalars(run, "train/smallest_task")}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {"task": a.task, "train_samples": a.train_samples, "figures": out.name, "runs": runs}
    by_gamma, by_rank = ablation_groups(runs)
    ref = next(iter(runs.values()))
    members = list(ref["final"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, what in zip(axes, ("smallest_loss", "smallest_task"), ("objective", "task loss")):
        for gamma, (name, r) in sorted(by_gamma.items()):
            if r[key]:
                ax.plot([s for s, _ in r[key]], [v for _, v in r[key]], label=f"γ = {gamma:g} ({name})")
        ax.set_xlabel("step (stage 1: smallest full-depth subnet; stage 2: the minnet)")
        ax.set_ylabel(f"smallest subnet's training {what}")
        ax.legend()
    fig.suptitle(f"{a.task}: gradient scaling (n1/nj)^γ (Fig. 3)")
    fig.tight_layout()
    fig.savefig(out.parent / f"{out.name}_gamma.png", dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ranks = sorted(by_rank)
    for m in members:
        ax.plot(ranks, [100 * by_rank[k][1]["final"].get(m, float("nan")) for k in ranks], marker="o", label=m)
    ax.set_xscale("log", base=2)
    ax.set_xticks(ranks, [str(k) for k in ranks])
    ax.set_xlabel("LoRA rank r")
    ax.set_ylabel("dev score ×100, end of stage 2")
    ax.set_title(f"{a.task}: LoRA rank (Fig. 4), γ = {ref['gamma']:g}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out.parent / f"{out.name}_rank.png", dpi=120)
    plt.close(fig)
    md = render_ablations(record, notes_for_output(a.out, a.notes))
    write_atomic(out.with_suffix(".json"), json.dumps(record, indent=2))
    write_atomic(out.with_suffix(".md"), md)
    print(md)


def ablation_groups(runs: dict) -> tuple[dict, dict]:
    """{gamma: (name, run)} of the runs with the first (reference) run's rank, {rank: (name, run)} of those with its gamma."""
    ref = next(iter(runs.values()))
    by_gamma = {r["gamma"]: (n, r) for n, r in runs.items() if r["lora_r"] == ref["lora_r"]}
    by_rank = {r["lora_r"]: (n, r) for n, r in runs.items() if r["gamma"] == ref["gamma"]}
    return by_gamma, by_rank


def render_ablations(data: dict, notes: str | None = None) -> str:
    """The markdown of `mlfs_palette.py ablations` from its JSON (`figures`: the PNGs' name stem)."""
    task, runs, figures = data["task"], data["runs"], data["figures"]
    by_gamma, by_rank = ablation_groups(runs)
    ref = next(iter(runs.values()))
    members = list(ref["final"])
    md = [f"# MLFS ablations on {task}: gradient scaling γ and LoRA rank r (MiniLM-L6, paper recipe)", "",
          f"Runs: `python benchmarks/mlfs_palette.py mlfs --task {task} --name NAME --train-samples {data['train_samples']} -- "
          "--data.batch_size 16 [--model.init_args.distillation.gamma G | --model.init_args.lora.r R --model.init_args.lora.alpha 2R]`, then "
          f"`python benchmarks/mlfs_palette.py ablations --task {task} --runs {' '.join(runs)}`. Dev score ×100 at the end of stage 2.", ""]
    if notes:
        md += [notes, ""]
    md += ["## Gradient scaling γ (r = %d)" % ref["lora_r"], "", "| γ | run | " + " | ".join(members) + " |", "|---" * (len(members) + 2) + "|"]
    md += [f"| {g:g} | {n} | " + " | ".join(pct(r["final"].get(m)) for m in members) + " |" for g, (n, r) in sorted(by_gamma.items())]
    md += ["", f"Figure: `{figures}_gamma.png`.", ""]
    ranks = sorted(by_rank)
    md += [f"## LoRA rank r (γ = {ref['gamma']:g})", "", "| r | run | " + " | ".join(members) + " |", "|---" * (len(members) + 2) + "|"]
    md += [f"| {k} | {by_rank[k][0]} | " + " | ".join(pct(by_rank[k][1]["final"].get(m)) for m in members) + " |" for k in ranks]
    md += ["", f"Figure: `{figures}_rank.png`."]
    return "\n".join(md) + "\n"


def cmd_seeds(a) -> None:
    """Every member's end-of-stage-2 dev score per seed, mean and sample sd, for the MLFS runs named in
    --runs and for the slices trained alone (`alone-<member>`, each member that has runs at every seed)."""
    def final_rows(name: str, seed: int) -> dict[str, dict]:
        run = latest_run(RUNS / a.task / seeded(name, seed))
        ran_with = saved_config(run).get("seed_everything")
        if ran_with != seed:
            raise ValueError(f"{run} ran with seed_everything {ran_with}, not {seed} (a run made before the seed "
                             "argument came after --config): move it away and run it again")
        return rows_by_name(run / "palette_final.json")

    table, members = {}, None
    for name in a.runs:
        per_seed = {}
        for seed in a.seeds:
            try:
                per_seed[seed] = {n: r["score"] for n, r in final_rows(name, seed).items()}
            except FileNotFoundError:
                pass
        if per_seed:
            table[name] = per_seed
            members = members or list(next(iter(per_seed.values())))
    if not table:
        raise FileNotFoundError(f"no finished runs of {', '.join(a.runs)} under {RUNS / a.task}")
    for m in members:
        per_seed = {}
        for seed in a.seeds:
            try:
                per_seed[seed] = {m: next(iter(final_rows(f"alone-{m}", seed).values()))["score"]}
            except (FileNotFoundError, StopIteration):
                pass
        if per_seed:
            table[f"alone-{m}"] = per_seed

    out = Path(a.out)
    record = json.loads(json.dumps({"task": a.task, "seeds": a.seeds, "train_samples": a.train_samples, "runs": table}))
    md = render_seeds(record, notes_for_output(a.out, a.notes))
    write_atomic(out.with_suffix(".json"), json.dumps(record, indent=2) + "\n")
    write_atomic(out.with_suffix(".md"), md)
    print(md)


def render_seeds(data: dict, notes: str | None = None) -> str:
    """The markdown of `mlfs_palette.py seeds` from its JSON (where the seeds that key each run's scores are strings)."""
    import statistics

    task, seeds, table = data["task"], data["seeds"], data["runs"]

    def summary(values: list[float]) -> str:
        if not values:
            return "–"
        sd = f" ± {100 * statistics.stdev(values):.1f}" if len(values) > 1 else ""
        return f"{100 * statistics.fmean(values):.1f}{sd} (n={len(values)})"

    mlfs = [n for n in table if not n.startswith("alone-")]
    members = list(next(iter(table[mlfs[0]].values())))
    md = [f"# MLFS across seeds on {task}: dev score ×100 at the end of stage 2, mean ± sd over seeds", "",
          f"Seeds {', '.join(map(str, seeds))} (`seed_everything`: initialisation, dropout, subnet sampling, batch order); "
          f"the {data['train_samples']}-example training subset and the held-out split are the same in every run. Runs: "
          f"`python benchmarks/mlfs_palette.py mlfs|alone --task {task} [--name NAME | --member M] --seed S "
          f"--train-samples {data['train_samples']} -- --data.batch_size 16 [overrides]`, then "
          f"`python benchmarks/mlfs_palette.py seeds --task {task} --runs {' '.join(mlfs)} --seeds {' '.join(map(str, seeds))}`.", ""]
    if notes:
        md += [notes, ""]
    md += ["| member | " + " | ".join(mlfs) + " | alone |", "|---" * (len(mlfs) + 2) + "|"]
    for m in members:
        cells = [summary([s[m] for s in table[n].values() if m in s]) for n in mlfs]
        alone = table.get(f"alone-{m}", {})
        cells.append(summary([s[m] for s in alone.values()]))
        md.append(f"| {m} | " + " | ".join(cells) + " |")
    md += ["", "Per seed:", "", "| run | member | " + " | ".join(map(str, seeds)) + " |", "|---" * (len(seeds) + 2) + "|"]
    for n, per_seed in table.items():
        for m in (members if not n.startswith("alone-") else [n[len("alone-"):]]):
            md.append(f"| {n} | {m} | " + " | ".join(pct(per_seed.get(str(s), {}).get(m)) for s in seeds) + " |")
    return "\n".join(md) + "\n"


def held_out_dev_score(run_dir: Path) -> float | None:
    """The dev score of a non-palette run's held-out-selected checkpoint (results.json "test"), else None."""
    path = run_dir / "results.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    return results["test"]["score"] if "test" in results else None


def finished_versions(path: Path, done: str) -> list[Path]:
    """`versions` of `path` holding the file `done`."""
    return [v for v in versions(path) if (v / done).is_file()]


def wall_seconds(run: Path) -> float | None:
    path = run / "wall_time.json"
    return json.loads(path.read_text())["seconds"] if path.is_file() else None


def run_kind(name: str) -> str:
    """What a run name holds: ``mlfs``, ``alone``, ``alone-matched`` or ``fft``."""
    return next((kind for kind in ("alone-matched", "alone", "fft") if name == kind or name.startswith(kind + "-")), "mlfs")


def unseeded(name: str) -> str:
    """`name` without the ``-s<seed>`` suffix of `seeded`."""
    return re.sub(r"-s\d+$", "", name)


MEMBER_NAME = re.compile(r"h\d+-a\d+-f\d+-l[\d.]+$")
"""A palette member's name (`SubnetConfig.name`): hidden, heads, FFN width, depth or kept layers."""


def alone_member(name: str) -> tuple[str, str | None]:
    """(member, the MLFS run it is matched to or None) of an ``alone-<member>`` or
    ``alone-matched-<mlfs run>-<member>`` run name."""
    kind, rest = run_kind(name), unseeded(name)
    found = MEMBER_NAME.search(rest)
    if found is None:
        raise ValueError(f"{name}: no member name (like h256-a6-f768-l0.3.5) at its end")
    matched_to = rest[len(kind) + 1:found.start() - 1] if kind == "alone-matched" else None
    return found.group(0), matched_to or None


def member_scores(run: Path) -> dict[str, dict]:
    """{member: selected (held-out-selected checkpoint) and final dev score, role, params, trained_steps} of a palette run."""
    selected, final = rows_by_name(run / "palette.json"), rows_by_name(run / "palette_final.json")
    return {n: {"selected": selected.get(n, {}).get("score"), "final": r["score"], "trained_steps": r.get("trained_steps"),
                "role": r.get("role", ""), "params": r.get("params")} for n, r in final.items()}


def finished_run(task: str, name: str) -> Path:
    """The latest finished version of the run `name`: an `fft` run with a held-out-selected dev score, else one with
    its end-of-fit palette."""
    path = RUNS / task / name
    if run_kind(name) == "fft":
        done = [v for v in finished_versions(path, "results.json") if held_out_dev_score(v) is not None]
        if not done:
            raise FileNotFoundError(f"no finished run under {path}")
        return done[-1]
    return latest_run(path)


def run_record(task: str, name: str, run: Path) -> dict:
    """The record `decide` reads of the finished run `run` (named `name`): its seed, training rows and wall time, and
    its scores: the FFT dev score, the alone slice's palette row, or every MLFS member's with the selected stage and
    the maxnet's held-out curve."""
    config = saved_config(run)
    kind = run_kind(name)
    where = run.resolve()
    where = where.relative_to(ROOT) if where.is_relative_to(ROOT) else where  # the run folder as the repository names it
    record = {"task": task, "name": name, "kind": kind, "seed": config.get("seed_everything"),
              "train_samples": (config.get("data") or {}).get("max_train_samples"), "run": where.as_posix(), "wall_s": wall_seconds(run)}
    if kind == "fft":
        return {**record, "score": held_out_dev_score(run)}
    if kind == "mlfs":
        selected = next(iter(json.loads((run / "palette.json").read_text())), {})
        return {**record, "selected_stage": selected.get("stage"), "maxnet_held_out": scalars(run, "val/score"),
                "members": member_scores(run)}
    member, matched_to = alone_member(name)
    return {**record, "member": member, **({"matched_to": matched_to} if matched_to else {}),
            **next(iter(member_scores(run).values()))}


def save_record(task: str, name: str, run: Path | None = None) -> Path:
    """Write the record of the run `name` (its latest finished version unless `run` is given) to RECORDS."""
    run = run or finished_run(task, name)
    out = ROOT / RECORDS / task / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, json.dumps(run_record(task, name, run), indent=2) + "\n")
    print(f"record: {out}", flush=True)
    return out


def load_record(task: str, name: str, seed: int, train_samples: int | None = None) -> dict | None:
    """The record of the run `name` at `seed` (None if it has none); one that ran another seed or on other training
    rows is refused."""
    path = ROOT / RECORDS / task / f"{seeded(name, seed)}.json"
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    if record["seed"] != seed:
        raise ValueError(f"{path} ran with seed_everything {record['seed']}, not {seed}")
    if train_samples is not None and record["train_samples"] != train_samples:
        raise ValueError(f"{path} trained on {record['train_samples']} rows, not --train-samples {train_samples}")
    return record


def cmd_record(a) -> None:
    """Records of finished runs: those named by --runs (every seed of --seeds), else every run folder of the task."""
    names = ([seeded(n, s) for n in a.runs for s in a.seeds] if a.runs_given
             else sorted(p.name for p in (RUNS / a.task).iterdir() if p.is_dir()) if (RUNS / a.task).is_dir() else [])
    if not names:
        raise FileNotFoundError(f"no runs to record under {RUNS / a.task}")
    for name in names:
        try:
            save_record(a.task, name)
        except FileNotFoundError as e:
            print(f"record: skipped {name}: {e}", flush=True)


def cmd_decide(a) -> None:
    """Every palette member of the MLFS runs named --runs (the first: the recipe decided on) beside the same
    slice trained alone at full budget (`alone`) and at matched budget (`alone --matched-to`), the maxnet
    alone and the FFT teacher, per seed, from the runs' records: the record `render_decision` turns into tables
    with intervals."""
    def records(name: str) -> dict[str, dict]:
        found = {str(seed): load_record(a.task, name, seed, a.train_samples) for seed in a.seeds}
        return {seed: r for seed, r in found.items() if r is not None}

    arms: dict[str, dict] = {}
    for name in a.runs:
        arms[f"mlfs:{name}"] = {seed: {k: r[k] for k in ("run", "wall_s", "selected_stage", "maxnet_held_out", "members")}
                                for seed, r in records(name).items()}
    reference = next(iter(arms[f"mlfs:{a.runs[0]}"].values()), None)
    if reference is None:
        raise FileNotFoundError(f"no record of an MLFS run {a.runs[0]} under {RECORDS / a.task}")
    members = [{"member": n, "role": r.get("role", ""), "params": r["params"]} for n, r in reference["members"].items()]
    for arm in ("alone", *(f"alone-matched-{name}" for name in a.runs)):
        per_seed: dict[str, dict] = {}
        for m in members:
            for seed, r in records(f"{arm}-{m['member']}").items():
                per_seed.setdefault(seed, {})[m["member"]] = {k: r[k] for k in ("selected", "final", "trained_steps", "run", "wall_s")}
        if per_seed or arm == "alone":
            arms[arm] = dict(sorted(per_seed.items()))
    fft = {seed: {k: r[k] for k in ("score", "run", "wall_s")} for seed, r in records("fft").items()}
    latency = None
    latency_file = Path(a.latency) if a.latency else RECORDS / a.task / "latency.json"
    if (ROOT / latency_file).is_file():
        measured = json.loads((ROOT / latency_file).read_text())
        b1 = measured["ms"]["b1"]
        if all(m["member"] in b1 for m in members):
            latency = {"file": latency_file.as_posix(), "threads": measured["threads"],
                       "ratio_b1": {m["member"]: b1[m["member"]] / b1[members[0]["member"]] for m in members}}
    record = {"task": a.task, "seeds": a.seeds, "train_samples": a.train_samples, "held_out_rows": a.held_out_rows,
              "recipe": a.runs[0], "variants": a.runs[1:], "members": members, "latency": latency, "arms": arms, "fft": fft}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    md = render_decision(record, notes_for_output(a.out, a.notes))
    write_atomic(out.with_suffix(".json"), json.dumps(record, indent=2) + "\n")
    write_atomic(out.with_suffix(".md"), md)
    print(md)


T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}
"""Student's t quantile 0.975 by degrees of freedom (a 95 % two-sided interval)."""


def mean_sd(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def paired_interval(diffs: list[float]) -> tuple[float, float, float] | None:
    """(mean, low, high): the mean of paired differences with its 95 % t-interval; None under 2 pairs."""
    if len(diffs) < 2:
        return None
    mean, sd = mean_sd(diffs)
    half = T_975[len(diffs) - 1] * sd / math.sqrt(len(diffs))
    return mean, mean - half, mean + half


def fmt_mean_sd(values: list[float]) -> str:
    if not values:
        return "–"
    mean, sd = mean_sd(values)
    return f"{100 * mean:.1f}" + ("" if sd is None else f" ± {100 * sd:.1f}") + f" ({len(values)})"


def fmt_interval(ci) -> str:
    return "–" if ci is None else f"{100 * ci[0]:+.1f} [{100 * ci[1]:+.1f}, {100 * ci[2]:+.1f}]"


def decision_stats(data: dict, recipe: str) -> dict:
    """Per member, from the record: the MLFS run `recipe`'s scores and the alone arms' over seeds, and the paired
    differences MLFS − alone."""
    arms = data["arms"]

    def by_member(arm: str, member: str, key: str) -> dict[str, float]:
        out = {}
        for seed, r in arms.get(arm, {}).items():
            row = (r["members"] if "members" in r else r).get(member)
            if row is not None and row.get(key) is not None:
                out[seed] = row[key]
        return out

    def paired(x: dict, y: dict) -> list[float]:
        return [x[s] - y[s] for s in sorted(set(x) & set(y))]

    def matched(member: str, steps: dict[str, int]) -> dict[str, dict]:
        """Per seed, the matched-budget run of `member` with the steps MLFS gave it: the one matched to `recipe`, else
        one matched to another run of the decision whose sampler gave the member as many steps at that seed."""
        arm_names = [f"alone-matched-{recipe}", *(a for a in arms if a.startswith("alone-matched-") and a != f"alone-matched-{recipe}")]
        out = {}
        for seed, n in steps.items():
            epochs, batches = step_schedule(n, data["train_samples"], task_batch_size(data["task"]))
            for arm in arm_names:
                row = arms.get(arm, {}).get(seed, {}).get(member)
                if row is not None and row.get("trained_steps") == epochs * batches:
                    out[seed] = row
                    break
        return out

    stats = {}
    for m in data["members"]:
        n = m["member"]
        arm = f"mlfs:{recipe}"
        sel, end = by_member(arm, n, "selected"), by_member(arm, n, "final")
        alone_sel, alone_end = by_member("alone", n, "selected"), by_member("alone", n, "final")
        steps = by_member(arm, n, "trained_steps")
        matched_runs = matched(n, steps)
        matched_end = {seed: r["final"] for seed, r in matched_runs.items()}
        stats[n] = {"mlfs_selected": list(sel.values()), "mlfs_end": list(end.values()), "alone_selected": list(alone_sel.values()),
                    "alone_end": list(alone_end.values()), "matched_end": list(matched_end.values()),
                    "mlfs_steps": list(steps.values()), "matched_steps": [r["trained_steps"] for r in matched_runs.values()],
                    "selected_vs_alone": paired_interval(paired(sel, alone_sel)), "end_vs_alone": paired_interval(paired(end, alone_end)),
                    "end_vs_matched": paired_interval(paired(end, matched_end)),
                    "selected_vs_recipe": paired_interval(paired(sel, by_member(f"mlfs:{data['recipe']}", n, "selected"))),
                    "end_vs_recipe": paired_interval(paired(end, by_member(f"mlfs:{data['recipe']}", n, "final")))}
    return stats


def mlfs_wall_seconds(data: dict, recipe: str) -> list[float]:
    return [r["wall_s"] for r in data["arms"][f"mlfs:{recipe}"].values() if r.get("wall_s")]


def alone_wall_sums(data: dict) -> list[float]:
    """Per seed with every member's full-budget alone run: the sum of their wall times."""
    members = [m["member"] for m in data["members"]]
    return [sum(r[m]["wall_s"] for m in members) for r in data["arms"].get("alone", {}).values()
            if all(m in r and r[m].get("wall_s") for m in members)]


def render_decision(data: dict, notes: str | None = None) -> str:
    """The markdown of `mlfs_palette.py decide` from its JSON."""
    task, members = data["task"], data["members"]
    recipes = [data["recipe"], *data["variants"]]
    seeds = " ".join(map(str, data["seeds"]))
    ratio = (data.get("latency") or {}).get("ratio_b1") or {}
    n_max = members[0]["params"]
    md = [f"# Does MLFS work? {task}: every palette member beside the same slice trained alone, {len(data['seeds'])} seeds", "",
          f"MiniLM-L6 (`base: pretrained`, the paper search space), {data['train_samples']} training rows, selection on "
          f"{data['held_out_rows']} held-out rows of train, dev reported (×100). Seeds {seeds}. Cells: mean ± sd (runs); "
          "differences are paired by seed: mean [95 % t-interval]. \"Selected\": the checkpoint with the best held-out "
          "palette score; \"end\": the end of stage 2.", "",
          "Runs: `python benchmarks/mlfs_palette.py mlfs|alone|fft --task TASK --seed S --train-samples N --val-batches 8 "
          "--fit-threads 1 [--name NAME | --member M [--matched-to NAME]] -- --model.init_args.evaluation.stage_palettes false "
          "[overrides]`; then `python benchmarks/mlfs_palette.py decide --task TASK --runs " + " ".join(recipes)
          + f" --seeds {seeds}`. Alone at full budget: the slice alone with the same LoRA, lr, batch and held-out selection for "
          "the whole MLFS run's epochs (as many optimizer steps); matched: as many steps as MLFS trained that exact slice "
          "(`trained_steps`).", ""]
    if notes:
        md += [notes, ""]
    fft = [r["score"] for r in data["fft"].values()]
    alone_max = decision_stats(data, data["recipe"])[members[0]["member"]]
    if data.get("latency"):
        md += [f"Latency ×max: the exported members at batch 1, sequence 128, {data['latency']['threads']} CPU thread(s), round-robin "
               f"(`python benchmarks/mlfs_palette.py latency --threads {data['latency']['threads']}`, `{data['latency']['file']}`).", ""]
    md += ["## Baselines", "", f"- The maxnet alone (LoRA, full budget): selected {fmt_mean_sd(alone_max['alone_selected'])}, "
           f"end {fmt_mean_sd(alone_max['alone_end'])}.",
           f"- FFT MiniLM-L6 teacher on the same rows (held-out selected, dev): {fmt_mean_sd(fft)}.", ""]
    for recipe in recipes:
        stats = decision_stats(data, recipe)
        runs = data["arms"].get(f"mlfs:{recipe}", {})
        stages = ", ".join(f"{seed}: {r.get('selected_stage')}" for seed, r in runs.items())
        curves = "; ".join(f"{seed}: " + ", ".join(f"{100 * v:.1f}" for _, v in r.get("maxnet_held_out") or []) for seed, r in runs.items())
        md += [f"## MLFS `{recipe}`", "", f"Selected checkpoint's stage, by seed: {stages or '–'}. The maxnet's held-out score at "
               f"the end of each epoch, by seed: {curves or '–'}.", "",
               "| member | params M (×max) | latency ×max (b1) | MLFS selected | MLFS end | alone selected | alone end | "
               "MLFS selected − alone selected | MLFS end − alone end | matched alone end | MLFS end − matched | steps MLFS / matched |",
               "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for m in members:
            n, st = m["member"], stats[m["member"]]
            lat = f"{ratio[n]:.2f}" if n in ratio else "–"
            steps = "/".join(str(int(x)) for x in sorted(set(st["mlfs_steps"]))) or "–"
            msteps = "/".join(str(int(x)) for x in sorted(set(st["matched_steps"]))) or "–"
            md.append(f"| {n} {m['role']}".rstrip() + f" | {m['params'] / 1e6:.2f} ({m['params'] / n_max:.2f}) | {lat} | "
                      f"{fmt_mean_sd(st['mlfs_selected'])} | {fmt_mean_sd(st['mlfs_end'])} | {fmt_mean_sd(st['alone_selected'])} | "
                      f"{fmt_mean_sd(st['alone_end'])} | {fmt_interval(st['selected_vs_alone'])} | {fmt_interval(st['end_vs_alone'])} | "
                      f"{fmt_mean_sd(st['matched_end'])} | {fmt_interval(st['end_vs_matched'])} | {steps} / {msteps} |")
        md += ["", "Targets:", "", *target_lines(data, stats, recipe), ""]
    if data["variants"]:
        md += [f"## Each recipe against `{data['recipe']}` (paired by seed)", "",
               "| member | " + " | ".join(f"{v} − {data['recipe']}, selected | end" for v in data["variants"]) + " |",
               "|---|" + "---|---|" * len(data["variants"])]
        by_recipe = {v: decision_stats(data, v) for v in data["variants"]}
        for m in members:
            n = m["member"]
            md.append(f"| {n} | " + " | ".join(f"{fmt_interval(by_recipe[v][n]['selected_vs_recipe'])} | "
                                                f"{fmt_interval(by_recipe[v][n]['end_vs_recipe'])}" for v in data["variants"]) + " |")
        md.append("")
    sums = alone_wall_sums(data)
    md += ["## Wall time", ""]
    for recipe in recipes:
        walls = mlfs_wall_seconds(data, recipe)
        if walls:
            md.append(f"- One MLFS `{recipe}` run: {statistics.fmean(walls) / 60:.1f} min (mean of {len(walls)}).")
    if sums:
        md.append(f"- The {len(members)} members trained alone at full budget, one after another: {statistics.fmean(sums) / 60:.1f} min "
                  f"(mean of {len(sums)} seeds' sums).")
    md += ["", "Every run on 1 CPU thread, two runs side by side on the 2 cores."]
    return "\n".join(md).rstrip("\n") + "\n"


def target_lines(data: dict, stats: dict, recipe: str) -> list[str]:
    """One line per target of the decision for the MLFS run `recipe`, each read off the record."""
    members = [m["member"] for m in data["members"]]
    maxnet = members[0]
    lines = []
    ci = stats[maxnet]["selected_vs_alone"]
    if ci is not None:
        met = ci[1] >= -0.01
        lines.append(f"- Maxnet within 1 point of its LoRA-alone run (selected, MLFS − alone {fmt_interval(ci)}): "
                     + ("met (interval above −1)." if met else "missed (interval reaches below −1)."))
    ratio = (data.get("latency") or {}).get("ratio_b1") or {}
    fast = [m for m in members[1:] if m in ratio and ratio[m] <= 0.5 and stats[m]["mlfs_selected"]]
    if fast and stats[maxnet]["mlfs_selected"]:
        best = max(fast, key=lambda m: statistics.fmean(stats[m]["mlfs_selected"]))
        gap = statistics.fmean(stats[maxnet]["mlfs_selected"]) - statistics.fmean(stats[best]["mlfs_selected"])
        lines.append(f"- Best member at ≤ 0.5× the maxnet's latency ({best}, {ratio[best]:.2f}×) within 3 points of the maxnet "
                     f"(selected means): {100 * gap:.1f} points below, " + ("met." if gap <= 0.03 else "missed."))
    matched = {m: stats[m]["end_vs_matched"] for m in members[1:] if stats[m]["end_vs_matched"] is not None}
    if matched:
        below = [m for m, c in matched.items() if c[1] < 0]
        lines.append(f"- Every member not below its matched-budget alone run (end; the interval excludes worse): {len(matched) - len(below)} of "
                     f"{len(matched)}" + (f"; not: {', '.join(below)}." if below else "."))
    full = {m: stats[m]["end_vs_alone"] for m in members[1:] if stats[m]["end_vs_alone"] is not None}
    if full:
        mean = statistics.fmean([c[0] for c in full.values()])
        lines.append(f"- Members on average at least at their full-budget alone runs (end; {len(full)} of {len(members) - 1} members "
                     f"have 2 or more paired seeds): mean difference {100 * mean:+.1f} points, "
                     + ("met." if mean >= 0 else "missed."))
    walls, sums = mlfs_wall_seconds(data, recipe), alone_wall_sums(data)
    if walls and sums:
        lines.append(f"- One MLFS run cheaper than training the palette alone: {statistics.fmean(walls) / statistics.fmean(sums):.2f}× "
                     "the wall time, " + ("met." if statistics.fmean(walls) < statistics.fmean(sums) else "missed."))
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("mlfs", "fft", "alone", "student", "latency", "table", "ablations", "seeds", "record", "decide"):
        p = sub.add_parser(name)
        p.add_argument("--task", default="mrpc")
        p.add_argument("--tasks", nargs="+", default=["mrpc", "stsb", "sst2"])
        p.add_argument("--name", default="paper", help="run name under runs/mlfs_palette/<task>/ (the MLFS run for table/latency)")
        p.add_argument("--member", default="h256-a6-f768-l0.3.5", help="alone: the subnet name of the slice to train")
        p.add_argument("--runs", nargs="+", default=None,
                       help="ablations, decide: run names, the reference (the recipe decided on) first; record: the runs "
                       "to record, at every seed of --seeds (default: every run folder of the task)")
        p.add_argument("--pretrained", default="models/minilm")
        p.add_argument("--data-dir", default="../shared/glue")
        p.add_argument("--train-samples", type=int, default=1000)
        p.add_argument("--val-batches", type=int, default=4)
        p.add_argument("--threads", type=int, default=1, help="latency: CPU threads")
        p.add_argument("--fit-threads", type=int, default=None, help="mlfs/alone/fft/student: CPU threads of the run "
                       "(OMP_NUM_THREADS; default: torch's)")
        p.add_argument("--matched-to", default=None, help="alone: train the slice for as many steps as the MLFS run of "
                       "this name (same seed) trained exactly that slice (runs are named alone-matched-<that run>-<member>)")
        p.add_argument("--seed", type=int, default=42, help="mlfs/alone: seed_everything; a seed other than 42 "
                       "suffixes the run name with -s<seed> (the training subset and held-out split stay the same)")
        p.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44], help="seeds: the seeds to put side by side")
        p.add_argument("--out", default="benchmarks/results/mlfs_palette/mlfs_palette")
        p.add_argument("--variants", nargs="*", default=["finetuned", "importance"], help="table: other MLFS runs shown beside")
        p.add_argument("--held-out-rows", type=int, default=512, help="decide: the held-out rows selection saw (val batches × batch)")
        p.add_argument("--latency", default=None, help="decide: the `latency` record of these members "
                       f"(default: {RECORDS}/<task>/latency.json)")
        p.add_argument("--notes", help="table, ablations, seeds: a markdown file of notes put under the title "
                       "(default: <out>_notes.md where it exists)")
        p.add_argument("overrides", nargs="*", help="train.py overrides, after --")
    a = ap.parse_args(argv)
    a.runs_given = a.runs is not None
    a.runs = a.runs or ["paper", "gamma0", "gamma2", "rank4", "rank16"]
    try:
        {"mlfs": cmd_mlfs, "fft": cmd_fft, "alone": cmd_alone, "student": cmd_student, "latency": cmd_latency, "table": cmd_table, "ablations": cmd_ablations,
         "seeds": cmd_seeds, "record": cmd_record, "decide": cmd_decide}[a.cmd](a)
    except (ValueError, KeyError, FileNotFoundError) as e:  # a bad member name, task or missing run: one line
        print(f"mlfs_palette: error: {e}", file=sys.stderr)
        return 2
    except subprocess.CalledProcessError as e:  # train.py printed its own error above
        print(f"mlfs_palette: error: {' '.join(e.cmd[:3])} ... exited {e.returncode}", file=sys.stderr)
        return e.returncode
    return 0


if __name__ == "__main__":
    sys.exit(main())
