"""Why the MiniLM KD-LoRA student falls short of its teacher: one table per task.

Reads finished runs (nothing is trained here):
- the FFT teacher, `runs/minilm/<task>/fft/version_*` (`bash scripts/minilm_glue_runs.sh fft TASK
  --data.holdout_fraction 0.1 --data.max_train_samples 2000`),
- the student's own FFT, `runs/minilm-l3/<task>/fft/sweep/*` (`configs/sweeps/minilm-l3-fft-diagnose.yaml`),
- LoRA on the teacher, `runs/minilm/<task>/lora/sweep/*` (`configs/sweeps/minilm-lora-diagnose.yaml`),
- the KD-LoRA points, `runs/minilm/<task>/kdlora/sweep/*` (`configs/sweeps/minilm-kdlora-diagnose.yaml`),
each selected on its held-out 10 % of train and scored on dev after fit (`results.json` "test").

    python benchmarks/kdlora_diagnosis.py --tasks stsb cola --out benchmarks/results/kdlora_diagnosis/minilm_kdlora_diagnosis
    # the whole train set (configs/sweeps/*-diagnose-full.yaml, runs under runs/full/):
    python benchmarks/kdlora_diagnosis.py --runs runs/full --tasks cola mrpc --out benchmarks/results/kdlora_diagnosis/minilm_kdlora_diagnosis_full
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

from kdlora.data.tasks import get_task
from kdlora.experiments.report import find_runs, saved_config
from kdlora.experiments.sweep import POINT_FILE
from kdlora.io import write_atomic
from results_files import notes_for_output

ROOT = Path(__file__).resolve().parent.parent


def finished(root: Path) -> list[dict]:
    """[{dir, overrides, held_out, dev, metrics}] of the finished runs under `root` with a dev score after
    fit (`kdlora.experiments.report.find_runs`: crashed sweep attempts are left out)."""
    if not root.exists():
        return []
    runs = []
    for results in find_runs([root]):
        if "test" not in results or "val_best" not in results:
            continue
        point = Path(results["dir"]).parent / POINT_FILE
        overrides = json.loads(point.read_text())["overrides"] if point.is_file() else {}
        data = saved_config(results["dir"]).get("data") or {}
        runs.append({"dir": results["dir"], "overrides": overrides, "held_out": results["val_best"]["score"],
                     "train_samples": data.get("max_train_samples"),
                     "dev": results["test"]["score"], "metrics": results["test"],
                     "trainable": (results.get("parameters") or {}).get("trainable")})
    return runs


def best_on_held_out(runs: list[dict]) -> Optional[dict]:
    return max(runs, key=lambda r: r["held_out"]) if runs else None


def describe(overrides: dict) -> str:
    if not overrides:
        return "base recipe (r 8, q/v, lr 1e-3, 3 epochs, task_weight 0.5, T 2)"
    return ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in overrides.items())


def pct(x: Optional[float]) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def ratio(a: Optional[float], b: Optional[float]) -> str:
    return "–" if a is None or not b else f"{100 * a / b:.0f} %"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", nargs="+", default=["stsb", "cola"])
    ap.add_argument("--runs", default="runs", help="the folder holding minilm/ and minilm-l3/")
    ap.add_argument("--notes", help="a markdown file of findings put under the title (default: <out>_notes.md where it exists)")
    ap.add_argument("--out", default="benchmarks/results/kdlora_diagnosis/minilm_kdlora_diagnosis")
    a = ap.parse_args(argv)
    runs = Path(a.runs)
    command = "python benchmarks/kdlora_diagnosis.py " + " ".join(argv if argv is not None else sys.argv[1:])
    data = {}
    for task in a.tasks:
        name = get_task(task).name
        teacher = best_on_held_out(finished(runs / "minilm" / name / "fft"))
        student_fft = best_on_held_out(finished(runs / "minilm-l3" / name / "fft"))
        lora = best_on_held_out(finished(runs / "minilm" / name / "lora"))
        points = finished(runs / "minilm" / name / "kdlora")
        if teacher is None and not points:
            continue
        data[name] = {"teacher_fft": teacher, "student_fft": student_fft, "lora": lora, "kdlora": points,
                      "kdlora_selected": best_on_held_out(points)}
    record = {"command": command, "tasks": data}
    md = render(record, notes_for_output(a.out, a.notes))
    out = Path(a.out)
    write_atomic(out.with_suffix(".json"), json.dumps(record, indent=2) + "\n")
    write_atomic(out.with_suffix(".md"), md)
    print(md)
    return 0


def render(record: dict, notes: Optional[str] = None) -> str:
    """The markdown of a diagnosis table from its JSON; `notes` go under the first paragraph."""
    def size(key: str) -> str:  # an FFT run trains every weight: its trainable count is the model's size
        n = next((t[key]["trainable"] for t in record["tasks"].values() if (t[key] or {}).get("trainable")), None)
        return "–" if n is None else f"{n / 1e6:.1f}M"

    md = ["# KD-LoRA on MiniLM: where the student's gap to its teacher comes from", "",
          f"Made by `{record['command']}` from finished runs (the docstring of `benchmarks/kdlora_diagnosis.py` lists the "
          "commands). Every run: the training examples each table names (a seeded subset of the 90 % of train not "
          "held out, or all of it), selection on the held-out 10 % of train, dev reported (GLUE score ×100: STS-B mean of Pearson and "
          f"Spearman, CoLA MCC). Teacher all-MiniLM-L6-v2 ({size('teacher_fft')}), student paraphrase-MiniLM-L3-v2 "
          f"({size('student_fft')}), seed 42, one run per cell.", ""]
    if notes:
        md += [notes, ""]
    for name, t in record["tasks"].items():
        teacher, student_fft, lora, points = t["teacher_fft"], t["student_fft"], t["lora"], t["kdlora"]
        t_dev, s_dev = (teacher or {}).get("dev"), (student_fft or {}).get("dev")
        sizes = {r.get("train_samples") for r in [teacher, student_fft, lora, *points] if r}
        size = ", ".join("the whole 90 %" if n is None else f"{n:,}" for n in sorted(sizes, key=lambda n: n or 10 ** 9))
        md += [f"## {get_task(name).dir_name}", "", f"Training examples: {size}.", "",
               f"FFT teacher (MiniLM-L6): **{pct(t_dev)}**. The student's own FFT (MiniLM-L3, best of its lr grid on "
               f"held-out): **{pct(s_dev)}** ({ratio(s_dev, t_dev)} of the teacher). LoRA on the teacher: "
               f"{pct((lora or {}).get('dev'))}.", "",
               "| KD-LoRA point | trainable | held-out | dev | / FFT teacher | / student FFT |", "|---|---|---|---|---|---|"]
        for p in sorted(points, key=lambda p: -p["dev"]):
            trainable = f"{p['trainable'] / 1e3:.0f}K" if p.get("trainable") else "–"
            md.append(f"| {describe(p['overrides'])} | {trainable} | {pct(p['held_out'])} | {pct(p['dev'])} | "
                      f"{ratio(p['dev'], t_dev)} | {ratio(p['dev'], s_dev)} |")
        chosen = t["kdlora_selected"]
        if chosen:
            md += ["", f"Selected on held-out: {describe(chosen['overrides'])}: dev {pct(chosen['dev'])}, "
                       f"{ratio(chosen['dev'], t_dev)} of the FFT teacher, {ratio(chosen['dev'], s_dev)} of the student's own FFT."]
        md.append("")
    return "\n".join(md) + "\n"


if __name__ == "__main__":
    sys.exit(main())
