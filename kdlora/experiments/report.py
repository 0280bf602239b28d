"""Turn finished runs into the KD-LoRA paper's tables, as markdown and JSON.

    python -m kdlora.experiments.report --runs runs/ --out report.md
    python -m kdlora.experiments.report --runs runs/ --out report.md --pair minilm=models/minilm:models/minilm-l3

Table 1: per-task GLUE scores (×100) and their average for FFT, LoRA and KD-LoRA, read from each
run's ``results.json`` (written by `kdlora.training.callbacks.GLUEResults`), aggregated the paper's way: per
(method, task) the median of the top-k runs by validation score (k = 6, ``--top-k``; a sweep from
`kdlora.experiments.sweep` gives the runs), MNLI-m and -mm as separate columns of the average. Table 2: trainable parameters
at LoRA ranks 8/16/32/64 computed from model configs alone (models built on the meta device, so
bert-base, roberta-base and deberta-v3-base cost nothing), and peak memory / inference time
measured by the runs (`PeakMemory`, `InferenceLatency`, `ParameterCount`). Beside the paper
(`kdlora.experiments.paper`): its headline claims with the same ratios from ours, then its Table 1 per task and
Table 2 per teacher → student pair beside ours, each row naming its pair.
MLFS palettes: every supernet run's ``palette.json`` (params, dev metrics, latency of each member)
beside the best FFT teacher of the same task and what the MLFS paper states of its BERT palettes.

    python -m kdlora.experiments.report --from-json report.json --out report.md   # a saved report rendered again
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import torch

from kdlora.data.tasks import get_task
from kdlora.experiments import paper
from kdlora.experiments.sweep import DONE_MARKER, POINT_FILE
from kdlora.io import write_atomic
from kdlora.training.callbacks import RESULTS_FILE

CONFIG_DIR = Path(__file__).parents[1] / "assets" / "configs"
TASK_ORDER = ["cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli"]
METHOD_ORDER = ["FFT", "LoRA", "KD-LoRA"]
MLFS_MODULES = ("SuperTransformer", "CausalLMSuperTransformer")  # reported as palettes
RANKS = (8, 16, 32, 64)
TOP_K = 6  # the paper: median of the top 6 configurations
# The paper's teacher -> student pairs (configs shipped under kdlora/assets/configs).
DEFAULT_PAIRS = {
    "BERT": ("bert-base-uncased", "distilbert-base-uncased"),
    "RoBERTa": ("roberta-base", "distilroberta-base"),
    "DeBERTa-v3": ("microsoft/deberta-v3-base", "microsoft/deberta-v3-small"),
}


# ----------------------------------------------------------------------------------------------
# Runs
# ----------------------------------------------------------------------------------------------


def find_runs(paths: Iterable[str | Path], unfinished: Optional[list[str]] = None) -> list[dict[str, Any]]:
    """Every run under `paths`: its ``results.json`` (GLUEResults & co.), or else, for a run logged by
    the CLI's TensorBoard logger without those callbacks, its ``hparams.yaml`` and logged val/ scalars.
    A sweep point's attempt without the sweep's done marker (crashed or still running) is left out
    and its directory appended to `unfinished`."""
    runs = []
    for root in map(Path, paths):
        if not root.exists():
            raise FileNotFoundError(f"no such run directory {root}")
        if root.is_file():
            files = [root]
        else:
            files = sorted(root.rglob(RESULTS_FILE))
            done = {f.parent for f in files}
            for hparams in sorted(root.rglob("hparams.yaml")):
                if hparams.parent not in done and any(hparams.parent.glob("events.out.tfevents.*")):
                    run = results_from_tensorboard(hparams.parent)
                    if run is not None:
                        runs.append(run)
        for file in files:
            if (file.parent.parent / POINT_FILE).is_file() and not (file.parent / DONE_MARKER).is_file():
                if unfinished is not None:
                    unfinished.append(str(file.parent))
                continue
            results = read_results(file)
            if results.get("run", {}).get("module") and results["run"].get("task"):
                runs.append({**results, "dir": str(file.parent)})
    return runs


def read_json(path: Path, what: str) -> Any:
    """A JSON file's value; one clear error naming the file (``malformed <what> <path>: ...``) when it is not JSON."""
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"malformed {what} {path}: {e}") from None


def read_results(path: Path) -> dict[str, Any]:
    """A run's ``results.json``; a clear error naming the file when it is not one."""
    results = read_json(path, "results file")
    if not isinstance(results, dict) or not isinstance(results.get("run", {}), dict):
        raise ValueError(f"malformed results file {path}: expected a JSON object with a 'run' mapping")
    return results


def saved_config(run_dir: str | Path) -> dict[str, Any]:
    """The full config LightningCLI saved in a run directory (``config.yaml``), or {} if there is none."""
    import yaml

    config_file = Path(run_dir) / "config.yaml"
    return (yaml.safe_load(config_file.read_text()) or {}) if config_file.is_file() else {}


def results_from_tensorboard(run_dir: Path) -> Optional[dict[str, Any]]:
    """A results dict (run identity, best/last validation metrics) from a TensorBoard run directory."""
    import yaml
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    hparams = yaml.safe_load((run_dir / "hparams.yaml").read_text()) or {}
    config = saved_config(run_dir)  # the CLI's full config names the module's class
    model = (config or {}).get("model") or {}
    if isinstance(model, dict) and model.get("class_path"):
        module = str(model["class_path"]).rsplit(".", 1)[-1]
        hparams = {**hparams, **(model.get("init_args") or {})}
    else:
        module = "KDLoRAStudent" if "teacher_path" in hparams else "Teacher" if "finetune" in hparams else ""
    task = hparams.get("task") or ((config or {}).get("data") or {}).get("task")
    if not module or not task:
        return None
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    tags = [t for t in events.Tags().get("scalars", []) if t.startswith("val/")]
    if "val/score" not in tags:
        return None
    by_step: dict[int, dict[str, float]] = {}
    for tag in tags:
        for event in events.Scalars(tag):
            by_step.setdefault(event.step, {})[tag[len("val/"):]] = float(event.value)
    epochs = [v for _, v in sorted(by_step.items()) if "score" in v]
    best = max(epochs, key=lambda v: v["score"])
    primitive = (str, int, float, bool, type(None), list)
    return {"run": {"module": module, "task": task, "hparams": {k: v for k, v in hparams.items() if isinstance(v, primitive)}},
            "val_best": best, "val_last": epochs[-1], "dir": str(run_dir)}


def method_of(run: dict[str, Any]) -> str:
    """FFT / LoRA (a Teacher's `finetune`), KD-LoRA (a student), else the module's class name."""
    module, hparams = run["run"]["module"], run["run"].get("hparams", {})
    if module == "Teacher":
        return "LoRA" if hparams.get("finetune") == "lora" else "FFT"
    if module == "KDLoRAStudent":
        return "KD-LoRA"
    return module


def _mean(values: list[float]) -> Optional[float]:
    return statistics.fmean(values) if values else None


def divergence(run: dict[str, Any], split: str = "val_best") -> Optional[str]:
    """Why a run cannot be averaged (training stopped on a non-finite loss, or a non-finite metric), else None."""
    stopped = run.get("diverged")
    if stopped:
        stopped = stopped if isinstance(stopped, dict) else {}
        return (f"training stopped: {stopped.get('what', 'training loss')} {stopped.get('value', 'non-finite')} "
                f"at step {stopped.get('step', '?')}, batch_idx {stopped.get('batch_idx', '?')}")
    values = run.get(split) or {}
    bad = sorted(k for k, v in values.items() if isinstance(v, float) and not math.isfinite(v))
    if bad:
        return f"non-finite {split} metric(s): " + ", ".join(f"{k}={values[k]}" for k in bad)
    return None


def diverged_runs(runs: list[dict[str, Any]], split: str = "val_best") -> list[dict[str, Any]]:
    """[{dir, method, task, reason}] of the runs `table1` leaves out (see `divergence`)."""
    return [{"dir": r.get("dir"), "method": method_of(r), "task": r["run"]["task"], "reason": reason}
            for r in runs for reason in [divergence(r, split)] if reason]


def best_k(ranked: Sequence[tuple[float, Any]], k: int = TOP_K) -> list[Any]:
    """The items of the k highest-ranked (rank, item) pairs, best first; k clipped to how many there are."""
    if k < 1:
        raise ValueError(f"--top-k must be at least 1, got {k}")
    return [item for _, item in sorted(ranked, key=lambda pair: pair[0], reverse=True)[:k]]


def columns(task: str, cell: dict[str, Any]) -> list[tuple[str, float]]:
    """The paper's score columns of one Table 1 cell: MNLI as MNLI-m and MNLI-mm, else the task's score."""
    if task == "mnli" and {"accuracy_m", "accuracy_mm"} <= cell["metrics"].keys():
        return [("MNLI-m", cell["metrics"]["accuracy_m"]), ("MNLI-mm", cell["metrics"]["accuracy_mm"])]
    return [(get_task(task).dir_name, cell["score"])]


def table1(runs: list[dict[str, Any]], split: str = "val_best", top_k: int = TOP_K) -> dict[str, dict[str, Any]]:
    """{method: {task: {score, metrics, n, k}, "average": ...}}: scores ×100. Per cell (method, task) the
    runs are ranked by score and the `top_k` best kept (all of them where fewer: ``k`` < `top_k`); the
    cell's score and each metric are the median over those. ``average``: mean of the paper's columns
    (`columns`: MNLI-m and MNLI-mm count separately); ``models``: the models those runs trained (where they recorded them). With ``split="test"`` (dev, scored after a fit
    that selected on a held-out part of train) the runs are ranked by their held-out score
    (``val_best``) and the cell is the median of the top-k runs' dev scores. Diverged runs (`divergence`) are left out:
    see `diverged_runs`. One run per cell gives that run's numbers."""
    rank_split = "val_best" if split == "test" else split
    cells: dict[str, dict[str, list[tuple[float, dict[str, float]]]]] = {}
    for run in runs:
        values = run.get(split)
        if not values or divergence(run, split):
            continue
        rank_by = (run.get(rank_split) or values)["score"]
        model = run["run"].get("hparams", {}).get("model_name_or_path")
        cells.setdefault(method_of(run), {}).setdefault(get_task(run["run"]["task"]).name, []).append((rank_by, (values, model)))
    table: dict[str, dict[str, Any]] = {}
    for method, tasks in cells.items():
        row: dict[str, Any] = {}
        for task, ranked in tasks.items():
            kept = best_k(ranked, top_k)
            top = [values for values, _ in kept]
            score = statistics.median(r["score"] for r in top)
            names = get_task(task).metric_names()
            metrics = {m: 100 * statistics.median(r[m] for r in top if m in r) for m in names if any(m in r for r in top)}
            models = sorted({str(model) for _, model in kept if model})
            row[task] = {"score": 100 * score, "metrics": metrics, "n": len(ranked), "k": len(top), **({"models": models} if models else {})}
        row["average"] = _mean([v for task, cell in row.items() for _, v in columns(task, cell)])
        table[method] = row
    return table


def efficiency(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per method: trainable/total parameters, peak training memory and inference latency (mean over runs).

    Inference is taken from the same tasks for every method, so that methods compare like with like:
    CoLA (the paper times CoLA validation) when every timed method has CoLA runs, else the tasks they
    all have; if they share none, each method's own (and no ratio between them is drawn)."""
    out: dict[str, dict[str, Any]] = {}
    grouped: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        grouped.setdefault(method_of(run), []).append(run)
    task = lambda r: get_task(r["run"]["task"]).name  # noqa: E731
    timed_by_method = {method: [r for r in group if r.get("latency", {}).get("test") or r.get("latency", {}).get("fit")]
                       for method, group in grouped.items()}
    timed_tasks = [{task(r) for r in timed} for timed in timed_by_method.values() if timed]
    shared = set.intersection(*timed_tasks) if timed_tasks else set()
    chosen = {"cola"} if "cola" in shared else shared
    for method, group in grouped.items():
        params = [r["parameters"] for r in group if "parameters" in r]
        memory = [r["peak_memory"]["fit"] for r in group if "fit" in r.get("peak_memory", {})]
        timed = [r for r in timed_by_method[method] if not chosen or task(r) in chosen]
        latency = [r["latency"].get("test") or r["latency"].get("fit") for r in timed]
        row: dict[str, Any] = {"runs": len(group)}
        if params:
            row["trainable_params"] = _mean([p["trainable"] for p in params])
            row["total_params"] = _mean([p["total"] for p in params])
        if memory:
            key = "allocated_mb" if memory[0].get("device") == "cuda" else "cpu_peak_rss_mb"
            row["peak_memory_mb"], row["memory_kind"] = _mean([m[key] for m in memory if key in m]), key
        if latency:
            row["latency_total_s"] = _mean([v["total_s"] for v in latency])
            row["latency_batch_ms"] = _mean([v["batch_mean_ms"] for v in latency])
            row["examples_per_s"] = _mean([v["examples_per_s"] for v in latency])
            row["latency_device"] = latency[0].get("device")
            row["latency_tasks"] = sorted({get_task(r["run"]["task"]).dir_name for r in timed})
            row["latency_runs"] = latency[0].get("num_runs")
            inference = [v["memory"] for v in latency if "memory" in v]
            if inference:
                key = "peak_allocated_mb" if inference[0].get("device") == "cuda" else "peak_rss_mb"
                row["inference_memory_mb"] = _mean([m[key] for m in inference if key in m])
                row["inference_memory_kind"] = key
        out[method] = row
    return out


def palettes(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """MLFS palettes (a run dir's ``palette.json``), each beside the best FFT teacher run of its task."""
    teachers: dict[str, dict[str, Any]] = {}
    for run in runs:
        if method_of(run) == "FFT" and run.get("val_best") and not divergence(run):
            task = get_task(run["run"]["task"]).name
            if task not in teachers or run["val_best"]["score"] > teachers[task]["val_best"]["score"]:
                teachers[task] = run
    out = []
    for run in runs:
        path = Path(run["dir"]) / "palette.json"
        if not path.is_file():
            continue
        task = get_task(run["run"]["task"]).name
        teacher = teachers.get(task)
        figure = path.with_suffix(".png")
        out.append({"task": task, "dir": run["dir"], "rows": read_palette(path),
                    "figure": str(figure) if figure.is_file() else None,
                    "teacher": None if teacher is None else {
                        "score": teacher["val_best"]["score"], "metrics": teacher["val_best"],
                        "params": teacher.get("parameters", {}).get("total"), "dir": teacher["dir"]}})
    return sorted(out, key=lambda p: (TASK_ORDER.index(p["task"]) if p["task"] in TASK_ORDER else 99, p["dir"]))


def read_palette(path: Path) -> list[dict[str, Any]]:
    """The member rows of a ``palette.json``; a clear error naming the file when it is not one."""
    rows = read_json(path, "palette file")
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) and {"name", "params"} <= r.keys() for r in rows):
        raise ValueError(f"malformed palette file {path}: expected a non-empty list of members with 'name' and 'params'")
    return rows


def render_palettes(items: list[dict[str, Any]]) -> list[str]:
    """Markdown per palette: parameters, dev score and latency of every member, relative to the maxnet."""
    lines = ["## MLFS palettes: one supernet run per task, beside its fine-tuned teacher", ""]
    for item in items:
        rows = item["rows"]
        maxnet = max(rows, key=lambda r: r["params"])
        spec = get_task(item["task"])
        metrics = spec.metric_names()
        lines += [f"### {spec.dir_name} (`{item['dir']}`)", "",
                  "| model | params (M) | params / maxnet | " + " | ".join(metrics) + " | score | latency (ms) | latency / maxnet |",
                  "|---" * (len(metrics) + 6) + "|"]
        teacher = item["teacher"]
        if teacher is not None:
            lines.append(f"| FFT teacher | {_millions(teacher['params'])} | – | "
                         + " | ".join(_fmt(100 * teacher["metrics"][m]) if m in teacher["metrics"] else "–" for m in metrics)
                         + f" | {_fmt(100 * teacher['score'])} | – | – |")
        for r in rows:
            latency, max_latency = r.get("latency_ms"), maxnet.get("latency_ms")
            ratio = latency / max_latency if latency and max_latency else None
            label = r["name"] + (f" ({r['role']})" if r.get("role") else "")
            lines.append(f"| {label} | {_millions(r['params'])} | {r['params'] / maxnet['params']:.2f} | "
                         + " | ".join(_fmt(100 * r["metrics"][m]) if m in r.get("metrics", {}) else "–" for m in metrics)
                         + f" | {_fmt(None if r.get('score') is None else 100 * r['score'])} | {_fmt(latency, 2)} | {_fmt(ratio, 2)} |")
        batch, seq = maxnet.get("latency_batch_size"), maxnet.get("latency_seq_len")
        if batch:
            lines.append(f"\nLatency: median forward pass of the exported (sliced, LoRA-merged) member at batch {batch}, "
                         f"sequence length {seq}.")
        if item.get("figure"):
            lines.append(f"\nFigure (score vs parameters and vs latency): `{item['figure']}`")
        lines += [""] + render_mlfs_beside_paper(mlfs_beside_paper(item)) + [""]
    return lines


def mlfs_beside_paper(item: dict[str, Any]) -> dict[str, Any]:
    """One palette beside what the MLFS paper states of its BERT-base palettes (`kdlora.experiments.paper.MLFS_GLUE`): the
    minnet's share of the maxnet's parameters, and the member nearest a quarter of the teacher's size (the paper:
    accurate at 1/4 the size and 1/3 the latency): its size and latency shares and its score over the teacher's."""
    rows, claims = item["rows"], paper.MLFS_GLUE
    maxnet, minnet = max(rows, key=lambda r: r["params"]), min(rows, key=lambda r: r["params"])
    teacher = item.get("teacher") or {}
    size = teacher.get("params") or maxnet["params"]
    target = claims["size_vs_teacher"]
    near = min(rows, key=lambda r: (abs(r["params"] / size - target), r["params"]))
    score = teacher.get("score") if teacher.get("score") is not None else maxnet.get("score")
    return {"paper": {"minnet_params": claims["minnet_params"], "maxnet_params": claims["maxnet_params"],
                      "minnet_vs_maxnet": claims["minnet_params"] / claims["maxnet_params"], "size_vs_teacher": target,
                      "latency_vs_teacher": claims["latency_vs_teacher"]},
            "ours": {"minnet_vs_maxnet": minnet["params"] / maxnet["params"], "member": near["name"],
                     "size_vs_teacher": near["params"] / size,
                     "latency_vs_maxnet": _ratio(near.get("latency_ms"), maxnet.get("latency_ms")),
                     "score_vs_teacher": _ratio(near.get("score"), score), "against": "teacher" if teacher.get("score") is not None else "maxnet"}}


def render_mlfs_beside_paper(item: dict[str, Any]) -> list[str]:
    p, o = item["paper"], item["ours"]
    return [f"Beside the MLFS paper ({paper.MLFS_SOURCE}; its per-task scores are only plotted, so only its stated sizes "
            f"and latency are compared; ours: the member nearest a quarter of the teacher's parameters, {o['member']}):", "",
            "| | MLFS paper (BERT-base) | ours |", "|---|---|---|",
            f"| minnet params / maxnet | {p['minnet_vs_maxnet']:.2f} ({p['minnet_params'] / 1e6:g}M / {p['maxnet_params'] / 1e6:g}M) | "
            f"{o['minnet_vs_maxnet']:.2f} |",
            f"| member's params / teacher | {p['size_vs_teacher']:.2f} | {o['size_vs_teacher']:.2f} |",
            f"| member's latency / maxnet (the teacher's shape) | {p['latency_vs_teacher']:.2f} (single GPU) | {_fmt(o['latency_vs_maxnet'], 2)} |",
            f"| member's score / {o['against']}'s | \"accurate\", at par with the other methods (plotted only) | "
            f"{_pct(o['score_vs_teacher'], signed=False)} |"]


# ----------------------------------------------------------------------------------------------
# Parameter counts from configs
# ----------------------------------------------------------------------------------------------


def load_config(name_or_path: str | dict):
    """A transformers config from a dict, a JSON file, a model directory, a shipped name, or the hub."""
    from transformers import AutoConfig

    if isinstance(name_or_path, dict):
        values = dict(name_or_path)
        return AutoConfig.for_model(values.pop("model_type"), **values)
    path = Path(name_or_path)
    if path.is_dir():
        return AutoConfig.from_pretrained(str(path))
    if path.is_file():
        try:
            values = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ValueError(f"{path} is not a model config (a config.json or a model directory)") from None
        if not isinstance(values, dict) or "model_type" not in values:
            raise ValueError(f"{path} is not a model config: no model_type")
        return load_config(values)
    shipped = CONFIG_DIR / f"{name_or_path.replace('/', '--')}.json"
    candidates = [shipped] if shipped.is_file() else sorted(CONFIG_DIR.glob(f"*--{name_or_path}.json"))
    if candidates:
        return load_config(json.loads(candidates[0].read_text()))
    try:
        return AutoConfig.from_pretrained(name_or_path)
    except OSError as e:
        raise FileNotFoundError(f"no config for {name_or_path!r}: not a dict, JSON file, model directory, "
                                f"shipped config ({', '.join(p.stem for p in CONFIG_DIR.glob('*.json'))}) or reachable hub id") from e


def lora_parameter_counts(config, ranks: Sequence[int] = RANKS, num_labels: int = 2,
                          targets: Optional[Sequence[str]] = None) -> dict[str, int]:
    """{"total": all parameters of the classifier, "r8": trainable with LoRA rank 8 + head, ...}, and the
    accountings behind them: "r8_adapters" (the LoRA A/B matrices alone, what the paper's formula
    counts), "head" (the head modules trained beside them here: every top-level module outside the
    encoder, e.g. DistilBERT's newly initialised ``pre_classifier`` + ``classifier``), and
    "final_classifier" (only the final classifier layer, `kdlora.training.heads.final_classifier_modules`: what
    ``head: seq_cls`` trains; RoBERTa's ``classifier.out_proj``, not its ``dense``).

    The model is built on the meta device: no memory, no weights, any size.
    """
    from transformers import AutoModelForSequenceClassification

    from kdlora.training.heads import final_classifier_modules
    from kdlora.training.lora import apply_lora

    config = copy.deepcopy(config)
    config.num_labels = num_labels
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(config)
        counts = {"total": sum(p.numel() for p in model.parameters())}
        counts["final_classifier"] = sum(p.numel() for n in final_classifier_modules(model)
                                         for p in model.get_submodule(n).parameters())
        for r in ranks:
            lora = apply_lora(copy.deepcopy(model), r=r, alpha=2 * r, dropout=0.0, targets=targets)
            counts[f"r{r}"] = sum(p.numel() for p in lora.parameters() if p.requires_grad)
            counts[f"r{r}_adapters"] = sum(p.numel() for n, p in lora.named_parameters() if p.requires_grad and "lora_" in n)
            counts["head"] = counts[f"r{r}"] - counts[f"r{r}_adapters"]
    return counts


def table2_parameters(pairs: dict[str, tuple[str, str]], ranks: Sequence[int] = RANKS, num_labels: int = 2) -> dict[str, Any]:
    """{family: {"FFT": {...}, "LoRA": {...}, "KD-LoRA": {...}}}: trainable parameters per rank."""
    table = {}
    for family, (teacher, student) in pairs.items():
        t = lora_parameter_counts(load_config(teacher), ranks, num_labels)
        s = lora_parameter_counts(load_config(student), ranks, num_labels)
        table[family] = {
            "teacher": str(teacher), "student": str(student),
            "FFT": {f"r{r}": t["total"] for r in ranks},
            "LoRA": {f"r{r}": t[f"r{r}"] for r in ranks},
            "KD-LoRA": {f"r{r}": s[f"r{r}"] for r in ranks},
            "teacher_total": t["total"], "student_total": s["total"],
            "accountings": {method: {"adapters": {f"r{r}": c[f"r{r}_adapters"] for r in ranks},
                                     "head": c["head"], "final_classifier": c["final_classifier"]}
                            for method, c in (("LoRA", t), ("KD-LoRA", s))},
        }
    return table


# ----------------------------------------------------------------------------------------------
# Beside the paper
# ----------------------------------------------------------------------------------------------


def _score_ratio(t1: dict, method: str, baseline: str) -> Optional[dict[str, Any]]:
    """KD-LoRA's mean over the paper's columns both methods have, divided by the baseline's."""
    if method not in t1 or baseline not in t1:
        return None
    ours = {name: v for task, cell in t1[method].items() if task != "average" for name, v in columns(task, cell)}
    base = {name: v for task, cell in t1[baseline].items() if task != "average" for name, v in columns(task, cell)}
    shared = [c for c in ours if c in base]
    if not shared or statistics.fmean(base[c] for c in shared) == 0:
        return None
    return {"ratio": statistics.fmean(ours[c] for c in shared) / statistics.fmean(base[c] for c in shared), "columns": shared}


def _change(new: Optional[float], old: Optional[float]) -> Optional[float]:
    return None if new is None or not old else new / old - 1


def comparison(t1: dict, params: dict, eff: dict, rank: int = 8) -> dict[str, dict[str, Any]]:
    """{claim key: {label, paper, source, ours}} for every claim in `kdlora.experiments.paper.CLAIMS`; ``ours`` holds
    the same ratio from our runs (None where the runs needed are missing)."""
    out: dict[str, dict[str, Any]] = {}
    for key, (label, value, source) in paper.CLAIMS.items():
        out[key] = {"label": label, "paper": value, "source": source, "ours": None}
    for key, baseline in (("score_vs_fft", "FFT"), ("score_vs_lora", "LoRA")):
        out[key]["ours"] = _score_ratio(t1, "KD-LoRA", baseline)
    r = f"r{rank}"
    by_family = {}
    for family, row in params.items():
        acc = row.get("accountings")
        if not acc or r not in acc["LoRA"]["adapters"]:
            continue
        lora, kd = acc["LoRA"], acc["KD-LoRA"]
        by_family[family] = {
            "adapters": _change(kd["adapters"][r], lora["adapters"][r]),
            "adapters_and_head": _change(kd["adapters"][r] + kd["head"], lora["adapters"][r] + lora["head"]),
            "final_classifier": _change(kd["adapters"][r] + kd["final_classifier"], lora["adapters"][r] + lora["final_classifier"]),
        }
    measured = _change(eff.get("KD-LoRA", {}).get("trainable_params"), eff.get("LoRA", {}).get("trainable_params"))
    if by_family or measured is not None:
        out["params_vs_lora"]["ours"] = {"rank": rank, "families": by_family, "measured": measured}
    kd, lora, fft = eff.get("KD-LoRA", {}), eff.get("LoRA", {}), eff.get("FFT", {})
    same_tasks = lambda base: kd.get("latency_tasks") == base.get("latency_tasks")  # noqa: E731 (efficiency: shared tasks)
    if kd.get("inference_memory_kind") and kd.get("inference_memory_kind") == lora.get("inference_memory_kind") and same_tasks(lora):
        out["memory_vs_lora"]["ours"] = {"change": _change(kd["inference_memory_mb"], lora["inference_memory_mb"]),
                                         "kind": kd["inference_memory_kind"]}
    for key, base in (("time_vs_fft", fft), ("time_vs_lora", lora)):
        change = _change(kd.get("latency_total_s"), base.get("latency_total_s"))
        if change is not None and same_tasks(base):
            out[key]["ours"] = {"change": change, "tasks": kd.get("latency_tasks"),
                                "devices": sorted({str(kd.get("latency_device")), str(base.get("latency_device"))})}
        elif change is not None:
            out[key]["ours"] = {"different_tasks": {"KD-LoRA": kd["latency_tasks"], "baseline": base["latency_tasks"]}}
    return out


def our_pair(t1: dict, params: dict) -> str:
    """The teacher → student our Table 1 runs trained: the models the runs recorded (FFT and LoRA train the
    teacher, KD-LoRA the student); for runs that recorded none, the report's one Table 2a pair, so named."""
    models = lambda methods: sorted({m for method in methods for task, cell in t1.get(method, {}).items()  # noqa: E731
                                     if task != "average" for m in cell.get("models", [])})
    teachers, students = models(("FFT", "LoRA")), models(("KD-LoRA",))
    if teachers or students:
        return f"{', '.join(teachers) or '–'} → {', '.join(students) or '–'}"
    if len(params) == 1:
        (family, row), = params.items()
        return f"{row['teacher']} → {row['student']} (the report's pair {family})"
    return "models not recorded"


def _timed_on(row: dict[str, Any]) -> str:
    """The tasks a Table 2b row's inference was timed on (×N: passes per run); "all runs" for data that did not record them."""
    if row.get("latency_total_s") is None:
        return ""
    tasks = ", ".join(row.get("latency_tasks") or []) or "all runs"
    return tasks + (f" ×{row['latency_runs']}" if row.get("latency_runs") else "")


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return None if a is None or not b else a / b


def paper_table1(t1: dict, params: dict) -> dict[str, Any]:
    """The paper's Table 1 (`kdlora.experiments.paper.TABLE1`) beside ours, on the columns we have runs for, in the paper's
    column order: {"columns": [...], "rows": [{column, source, pair, FFT, LoRA, KD-LoRA, kd_vs_fft, kd_vs_lora}]},
    one row for ours and one per paper teacher → student pair under each column; scores ×100."""
    ours: dict[str, dict[str, float]] = {}
    for method in paper.METHODS:
        for task, cell in t1.get(method, {}).items():
            if task != "average":
                for name, value in columns(task, cell):
                    ours.setdefault(name, {})[method] = value
    names = [c for c in paper.TABLE1_COLUMNS if c in ours]
    pair, rows = our_pair(t1, params), []
    for name in names:
        sources = [("ours", pair, ours[name])] + [("paper", paper.pair_label(f), {m: paper.TABLE1[f][m][name] for m in paper.METHODS})
                                                  for f in paper.PAIRS]
        for source, label, values in sources:
            rows.append({"column": name, "source": source, "pair": label, **{m: values.get(m) for m in paper.METHODS},
                         "kd_vs_fft": _ratio(values.get("KD-LoRA"), values.get("FFT")),
                         "kd_vs_lora": _ratio(values.get("KD-LoRA"), values.get("LoRA"))})
    return {"columns": names, "rows": rows}


def paper_table2(t1: dict, params: dict, eff: dict) -> list[dict[str, Any]]:
    """The paper's Table 2 (`kdlora.experiments.paper.TABLE2`: trainable parameters by rank, GPU memory during inference, inference
    time over CoLA validation) and ours (measured in the runs: `efficiency`), a row per (pair, method), with KD-LoRA's
    memory and time relative to FFT and LoRA of the same pair (ours: only where measured alike, as in `comparison`)."""
    rows = []
    for family, methods in paper.TABLE2.items():
        for method in paper.METHODS:
            cell = methods[method]
            row = {"source": "paper", "pair": paper.pair_label(family), "method": method,
                   "params": {f"r{r}": v for r, v in cell["params"].items()}, "memory_mb": cell["memory_mb"],
                   "inference_s": cell["inference_s"], "timed_on": "CoLA ×100", "device": "A100"}
            if method == "KD-LoRA":
                for base in ("FFT", "LoRA"):
                    row[f"memory_vs_{base}"] = _change(cell["memory_mb"], methods[base]["memory_mb"])
                    row[f"time_vs_{base}"] = _change(cell["inference_s"], methods[base]["inference_s"])
            rows.append(row)
    pair = our_pair(t1, params)
    for method in [m for m in paper.METHODS if m in eff]:
        cell = eff[method]
        row = {"source": "ours", "pair": pair, "method": method, "params": {"measured": cell.get("trainable_params")},
               "memory_mb": cell.get("inference_memory_mb"), "memory_kind": cell.get("inference_memory_kind"),
               "inference_s": cell.get("latency_total_s"),
               "timed_on": _timed_on(cell),
               "device": cell.get("latency_device")}
        if method == "KD-LoRA":
            for base in ("FFT", "LoRA"):
                other = eff.get(base, {})
                if cell.get("latency_tasks") != other.get("latency_tasks"):
                    continue  # timed on different tasks: no ratio
                if cell.get("inference_memory_kind") and cell.get("inference_memory_kind") == other.get("inference_memory_kind"):
                    row[f"memory_vs_{base}"] = _change(cell.get("inference_memory_mb"), other.get("inference_memory_mb"))
                row[f"time_vs_{base}"] = _change(cell.get("latency_total_s"), other.get("latency_total_s"))
        rows.append(row)
    return rows


def render_paper_tables(table1_rows: dict[str, Any], table2_rows: list[dict[str, Any]]) -> list[str]:
    lines = ["### Per task: the paper's Table 1 beside ours", ""]
    if table1_rows["rows"]:
        lines += [f"GLUE dev scores ×100. Paper: {paper.SOURCE}, Table 1 (the median of its top 6 configurations per cell; "
                  "FFT and LoRA train the teacher, KD-LoRA the student). Ours: Table 1 above. The ratios are KD-LoRA's "
                  "score over FFT's and over LoRA's within the same row (the same teacher → student pair).", "",
                  "| Column | Source | Teacher → student | FFT | LoRA | KD-LoRA | KD-LoRA / FFT | KD-LoRA / LoRA |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in table1_rows["rows"]:
            lines.append(f"| {r['column']} | {r['source']} | {r['pair']} | " + " | ".join(_fmt(r[m]) for m in paper.METHODS)
                         + f" | {_pct(r['kd_vs_fft'], signed=False)} | {_pct(r['kd_vs_lora'], signed=False)} |")
    else:
        lines.append("_No Table 1 runs of a task the paper reports._")
    lines += ["", "### The paper's Table 2 beside our measurements", "",
              "Paper: trainable parameters at LoRA ranks 8/16/32/64, GPU memory during inference and inference time "
              "(the mean of 100 runs over CoLA validation) on an A100. Ours: the runs' measured trainable parameters "
              "(at the ranks they used), the memory of the timed inference passes and their total time (Table 2b). "
              "KD-LoRA's rows give its change against FFT and LoRA of the same pair; ours only where both were timed on "
              "the same tasks and memory was measured the same way.", "",
              "| Source | Teacher → student | Method | Trainable params | Inference memory (MB) | Inference time (s) | Timed on | "
              "Memory vs FFT / LoRA | Time vs FFT / LoRA |", "|---|---|---|---|---|---|---|---|---|"]
    for r in table2_rows:
        trained = (" / ".join(f"{v / 1e6:g}M" for v in r["params"].values()) if r["source"] == "paper"
                   else _millions(r["params"]["measured"]))
        memory = _fmt(r.get("memory_mb")) + (" (CPU RSS)" if r.get("memory_kind") == "peak_rss_mb" else "")
        vs = lambda key: (f"{_pct(r.get(key + '_FFT'))} / {_pct(r.get(key + '_LoRA'))}"  # noqa: E731
                          if r["method"] == "KD-LoRA" else "")
        lines.append(f"| {r['source']} | {r['pair']} | {r['method']} | {trained} | {memory} | {_fmt(r.get('inference_s'), 2)} | "
                     f"{r.get('timed_on') or '–'}{'; ' + str(r['device']) if r.get('device') else ''} | {vs('memory_vs')} | {vs('time_vs')} |")
    lines += ["", "Paper's trainable parameters: r=8 / 16 / 32 / 64 (FFT: every parameter at every rank)."]
    return lines


def _pct(value: Optional[float], signed: bool = True) -> str:
    return "–" if value is None else (f"{100 * value:+.1f} %" if signed else f"{100 * value:.1f} %")


def render_comparison(items: dict[str, dict[str, Any]]) -> list[str]:
    lines = ["## Beside the paper", "",
             f"The paper's headline claims ({paper.SOURCE}) and the same ratios from the runs above; its per-task "
             "values follow. Pass one family's runs (`--runs runs/bert`) to compare like with like.", "",
             "| Claim | Paper | Ours | Paper's value from |", "|---|---|---|---|"]
    for key, item in items.items():
        ours, text = item["ours"], "– (runs missing)"
        if ours is not None and key.startswith("score"):
            text = f"{_pct(ours['ratio'], signed=False)} (over {', '.join(ours['columns'])})"
        elif ours is not None and key == "params_vs_lora":
            parts = [f"{family}: adapters only {_pct(v['adapters'])}, adapters + head trained here {_pct(v['adapters_and_head'])}, "
                     f"adapters + final classifier (head: seq_cls) {_pct(v['final_classifier'])}" for family, v in ours["families"].items()]
            if ours["measured"] is not None:
                parts.append(f"measured in our runs {_pct(ours['measured'])}")
            text = f"r={ours['rank']}: " + "; ".join(parts)
        elif ours is not None and key == "memory_vs_lora":
            text = _pct(ours["change"]) + (" (CPU peak RSS during inference)" if ours["kind"] == "peak_rss_mb" else " (GPU, during inference)")
        elif ours is not None and key.startswith("time") and "different_tasks" in ours:
            tasks = ours["different_tasks"]
            text = (f"– (timed on different tasks: KD-LoRA on {', '.join(tasks['KD-LoRA'])}, the baseline on "
                    f"{', '.join(tasks['baseline'])})")
        elif ours is not None and key.startswith("time"):
            timed = ", ".join(ours["tasks"]) if ours["tasks"] else "all runs'"
            text = f"{_pct(ours['change'])} ({timed} validation; {', '.join(ours['devices'])})"
        paper_value = _pct(item["paper"], signed=not key.startswith("score"))
        lines.append(f"| {item['label']} | {paper_value} | {text} | {item['source']} |")
    return lines


# ----------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------


def _fmt(value: Optional[float], digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _millions(n: Optional[float]) -> str:
    return "–" if n is None else (f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}K")


def _table1_lines(t1: dict, tasks: list[str], methods: list[str], protocol: str, top_k: int) -> list[str]:
    """Table 1: a row of GLUE scores per method, the per-metric values under it."""
    lines: list[str] = []
    lines += ["## Table 1: GLUE validation scores (×100)", "",
              "Each cell is the task's GLUE score (mean of its metrics: CoLA MCC, STS-B Pearson/Spearman, "
              f"MRPC/QQP accuracy/F1, else accuracy) {protocol}, n = the runs behind the cell. MNLI-m and MNLI-mm are separate "
              "columns of the average, as in the paper.", ""]
    if methods:
        mnli_split = any("mnli" in t1[m] and len(columns("mnli", t1[m]["mnli"])) == 2 for m in methods)
        names = [n for t in tasks for n in (["MNLI-m", "MNLI-mm"] if t == "mnli" and mnli_split else [get_task(t).dir_name])]
        lines += ["| Method | " + " | ".join(names) + " | Avg. |", "|---" * (len(names) + 2) + "|"]
        for m in methods:
            row = t1[m]
            cells = []
            for t in tasks:
                width = 2 if t == "mnli" and mnli_split else 1
                if t not in row:
                    cells += ["–"] * width
                    continue
                values = [v for _, v in columns(t, row[t])]
                values = values if len(values) == width else [row[t]["score"]] * width
                cells += [f"{v:.1f}" + (f" (n={row[t]['n']})" if row[t]["n"] > 1 else "") for v in values]
            # An average over fewer tasks than the other rows is not comparable with theirs: shown with a dagger.
            partial = any(t not in row for t in tasks)
            lines.append(f"| {m} | " + " | ".join(cells) + f" | {_fmt(row['average'])}{' †' if partial else ''} |")
        if any(t not in t1[m] for m in methods for t in tasks):
            lines += ["", "† averaged over only the tasks that method has runs for: not comparable with the other rows' averages."]
        clipped = [f"{m} / {get_task(t).dir_name} (n={t1[m][t]['n']})" for m in methods for t in tasks
                   if t in t1[m] and t1[m][t].get("k", t1[m][t]["n"]) < top_k]
        if clipped and top_k > 1:
            lines += ["", f"Fewer than {top_k} runs, so the median is over all of them (k clipped to n): " + ", ".join(clipped) + "."]
        lines += ["", "Per-metric values:", ""]
        for m in methods:
            for t in tasks:
                if t in t1[m]:
                    detail = ", ".join(f"{k} {v:.1f}" for k, v in t1[m][t]["metrics"].items())
                    lines.append(f"- {m} / {get_task(t).dir_name}: {detail}")
    else:
        lines.append("_No finished runs with validation results found._")
    return lines


def _left_out_lines(excluded: Sequence[dict], unfinished: Sequence[str]) -> list[str]:
    """The runs left out of Table 1: diverged ones and unfinished sweep attempts."""
    lines: list[str] = []
    if excluded:
        lines += ["", f"Left out of Table 1 ({len(excluded)} diverged run(s)):", ""]
        lines += [f"- {e['method']} / {get_task(e['task']).dir_name}: `{e['dir']}`: {e['reason']}" for e in excluded]
    if unfinished:
        lines += ["", f"Left out: {len(unfinished)} unfinished sweep attempt(s) (no done marker: crashed or running): "
                  + ", ".join(f"`{d}`" for d in unfinished)]
    return lines


def _table2a_lines(params: dict, ranks: Sequence[int]) -> list[str]:
    """Table 2a: trainable parameters by LoRA rank, counted from configs, and by accounting."""
    lines: list[str] = []
    lines += ["", "## Table 2a: trainable parameters by LoRA rank (from model configs)", "",
              "| Family | Method | " + " | ".join(f"r={r}" for r in ranks) + " |", "|---" * (len(ranks) + 2) + "|"]
    for family, row in params.items():
        for m in METHOD_ORDER:
            model = row["teacher"] if m != "KD-LoRA" else row["student"]
            lines.append(f"| {family} | {m} ({model}) | " + " | ".join(_millions(row[m][f'r{r}']) for r in ranks) + " |")
    lines += ["", "FFT trains every parameter; LoRA adapts the teacher's query/value projections plus its "
              "classification head; KD-LoRA does the same on the smaller student. Counted from configs, so every base "
              "weight is assumed pretrained: a checkpoint lacking some (e.g. MiniLM-L3's pooler) also trains those "
              "(see the measured counts in Table 2b).", ""]
    accounted = {f: row for f, row in params.items() if row.get("accountings")}
    if accounted:
        lines += ["### Trainable parameters by accounting (exact, from configs)", "",
                  "| Family | Method | r | adapters only | + head trained here | + final classifier only (head: seq_cls) |",
                  "|---|---|---|---|---|---|"]
        for family, row in accounted.items():
            for m in ("LoRA", "KD-LoRA"):
                a = row["accountings"][m]
                for r in ranks:
                    lines.append(f"| {family} | {m} | {r} | {a['adapters'][f'r{r}']:,} | {a['adapters'][f'r{r}'] + a['head']:,} | "
                                 f"{a['adapters'][f'r{r}'] + a['final_classifier']:,} |")
        lines += ["", "*Adapters only* is what the paper's formula counts (like for like); *+ head trained here* adds "
                  "every head module our runs train (a DistilBERT student's newly initialised `pre_classifier`, 590K, "
                  "trains beside its classifier, which is why the student can train more than the BERT LoRA teacher); "
                  "*+ final classifier only* is what `head: seq_cls` trains: the final classifier layer, other head "
                  "modules frozen (peft's own `SEQ_CLS` task type matches module names by suffix, so it also trains "
                  "DistilBERT's `pre_classifier` and RoBERTa's `classifier.dense`).", "",
                  "Note on the paper's counts: they do not match the architecture. LoRA r=8 on query and value of "
                  "BERT-base is 12 × 2 × (768·8 + 8·768) = 294,912 ≈ 0.29M parameters (the adapters-only column), "
                  "where the paper prints 2.9M, and its other LoRA counts look about 10× high as well; the counts "
                  "above are exact.", ""]
    return lines


def _table2b_lines(eff: dict) -> list[str]:
    """Table 2b: trainable parameters, memory and inference latency measured in the runs."""
    lines: list[str] = []
    lines += ["## Table 2b: measured efficiency (from runs)", ""]
    if eff:
        lines += ["| Method | Trainable params | Peak train memory (MB) | Inference memory (MB) | Inference total (s) | "
                  "Per batch (ms) | Examples/s | Timed on | Device |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for m in [m for m in METHOD_ORDER if m in eff] + sorted(m for m in eff if m not in METHOD_ORDER):
            row = eff[m]
            memory = _fmt(row.get("peak_memory_mb"), 0) + (" (CPU RSS)" if row.get("memory_kind") == "cpu_peak_rss_mb" else "")
            inference = _fmt(row.get("inference_memory_mb"), 0) + (" (CPU RSS)" if row.get("inference_memory_kind") == "peak_rss_mb" else "")
            timed_on = _timed_on(row)
            lines.append(f"| {m} | {_millions(row.get('trainable_params'))} | {memory} | {inference} | {_fmt(row.get('latency_total_s'), 2)} | "
                         f"{_fmt(row.get('latency_batch_ms'), 2)} | {_fmt(row.get('examples_per_s'), 0)} | {timed_on or '–'} | "
                         f"{row.get('latency_device', '–')} |")
        lines += ["", "Peak train memory: CUDA `max_memory_allocated` over training (max over ranks), or the process's "
                  "peak RSS on CPU. Inference memory (the paper's Table 2 memory): the peak during the timed inference "
                  "passes (CUDA `max_memory_allocated`: weights, batches, activations; CPU: peak RSS of the passes). "
                  "Inference: timed passes over the validation set after warm-up (see InferenceLatency), from the CoLA "
                  "runs where there are any (the paper: 100 runs over CoLA validation), else every run; ×N: passes per run."]
    else:
        lines.append("_No runs with efficiency measurements found._")
    return lines


def render_markdown(t1: dict, params: dict, eff: dict, ranks: Sequence[int] = RANKS,
                    palette_items: Sequence[dict] = (), excluded: Sequence[dict] = (), top_k: int = TOP_K,
                    compared: Optional[dict] = None, unfinished: Sequence[str] = (), split: str = "val_best") -> str:
    lines = ["# KD-LoRA report", ""]
    protocol = {"val_best": f"at the best validation epoch: the median of the top {top_k} runs by that score (the paper's protocol)",
                "val_last": f"at the last validation epoch: the median of the top {top_k} runs by that score",
                "test": f"on dev, of the checkpoint selected on a held-out part of train: the median of the dev scores "
                        f"of the top {top_k} runs by held-out score (the paper's protocol, with selection off the reported split)"}[split]
    tasks = [t for t in TASK_ORDER if any(t in row for row in t1.values())]
    methods = [m for m in METHOD_ORDER if m in t1] + sorted(m for m in t1 if m not in METHOD_ORDER)
    lines += _table1_lines(t1, tasks, methods, protocol, top_k)
    lines += _left_out_lines(excluded, unfinished)
    lines += _table2a_lines(params, ranks)
    lines += _table2b_lines(eff)
    if compared:
        lines += [""] + render_comparison(compared)
        lines += [""] + render_paper_tables(paper_table1(t1, params), paper_table2(t1, params, eff))
    if palette_items:
        lines += [""] + render_palettes(palette_items)
    return "\n".join(lines) + "\n"


def read_selection(out_dir: Path) -> dict[str, Any]:
    """What `kdlora.mlfs.select` chose in its ``--out`` folder: the member, its budget, held-out score,
    latency and size (``model/subnet.json``), and where its report and model are."""
    info_file = out_dir / "model" / "subnet.json"
    if not info_file.is_file():
        raise FileNotFoundError(f"{out_dir} holds no selected model ({info_file} is missing): "
                                "give the --out folder of a finished `python -m kdlora.mlfs.select`")
    info = read_json(info_file, "selection file")
    chosen = info.get("selected_by") if isinstance(info, dict) else None
    if not isinstance(chosen, dict):
        raise ValueError(f"{info_file} records no selection ('selected_by'): not written by kdlora.mlfs.select")
    budget = {k: v for k, v in (chosen.get("budget") or {}).items() if v is not None}
    return {"dir": str(out_dir), "name": info.get("name"), "params": info.get("parameters"), "budget": budget,
            "split": chosen.get("split"), "score": chosen.get("score"), "latency_ms": chosen.get("latency_ms"),
            "latency_ratio": chosen.get("latency_ratio"), "device": chosen.get("device"),
            "dev_score": info.get("dev_score"), "model": str(out_dir / "model"),
            "search": [str(p) for p in (out_dir / "search.md", out_dir / "pareto.png") if p.is_file()]}


def _export_of(run: dict[str, Any]) -> Optional[str]:
    """The folder a run exported its model to (its config's ``model.init_args.export.dir``, else ``<run>/export``)."""
    try:
        config = saved_config(run["dir"])
    except (OSError, ValueError):
        config = {}
    model = config.get("model") or {}
    init_args = (model.get("init_args") or model) if isinstance(model, dict) else {}
    export = init_args.get("export")
    named = export.get("dir") if isinstance(export, dict) else init_args.get("export_dir")  # flat: runs of earlier versions
    for candidate in (named, str(Path(run["dir"]) / "export")):
        if candidate and Path(candidate).is_dir():
            return candidate
    return None


def artifacts(runs: list[dict[str, Any]], selections: Sequence[dict[str, Any]] = ()) -> list[dict[str, str]]:
    """Every file a reader may want next, as (what, path) rows: each run's folder, results, export and
    palette report, each selection's report and model."""
    rows = []
    for run in runs:
        method = method_of(run)
        label = f"{'MLFS' if 'SuperTransformer' in method else method} / {run['run'].get('task', '?')}"
        rows.append({"what": f"{label}: run (TensorBoard, config.yaml, checkpoints)", "path": run["dir"]})
        rows.append({"what": f"{label}: results", "path": str(Path(run["dir"]) / RESULTS_FILE)})
        for name in ("palette.md", "palette.png", "palette_final.md"):
            if (Path(run["dir"]) / name).is_file():
                rows.append({"what": f"{label}: {name.split('.')[0].replace('_', ' ')} ({name.split('.')[1]})",
                             "path": str(Path(run["dir"]) / name)})
        export = _export_of(run)
        if export:
            rows.append({"what": f"{label}: exported model(s)", "path": export})
    for sel in selections:
        rows += [{"what": f"selection {sel['name']}: every candidate searched ({Path(p).suffix[1:]})", "path": p}
                 for p in sel["search"]]
        rows.append({"what": f"selection {sel['name']}: the chosen member, exported", "path": sel["model"]})
    return rows


def render_selections(selections: Sequence[dict[str, Any]]) -> list[str]:
    lines = ["## The member chosen under a budget (`kdlora.mlfs.select`)", "",
             "| chosen | budget | params (M) | held-out score | dev score | latency (ms) | latency / maxnet | device |",
             "|---|---|---|---|---|---|---|---|"]
    for sel in selections:
        budget = ", ".join(f"{k.replace('max_', '').replace('_', ' ')} ≤ {v:g}" for k, v in sel["budget"].items())
        lines.append(f"| {sel['name']} | {budget or '–'} | {_millions(sel['params'])} | "
                     f"{_fmt(None if sel['score'] is None else 100 * sel['score'])} | "
                     f"{_fmt(None if sel.get('dev_score') is None else 100 * sel['dev_score'])} | "
                     f"{_fmt(sel['latency_ms'], 2)} | {_fmt(sel['latency_ratio'], 2)} | {sel.get('device') or '–'} |")
    lines += ["", "Candidates are scored on a held-out part of train (never dev); dev is reported for the chosen one only."]
    return lines


def render_artifacts(rows: Sequence[dict[str, str]]) -> list[str]:
    return ["## Where everything is", "", "Paths relative to the folder the report was made from.", ""] + [
        f"- {r['what']}: `{r['path']}`" for r in rows]


def build_report(run_paths: Sequence[str], pairs: Optional[dict[str, tuple[str, str]]] = None,
                 ranks: Sequence[int] = RANKS, split: str = "val_best", top_k: int = TOP_K,
                 selection_dirs: Sequence[str] = ()) -> tuple[str, dict[str, Any]]:
    unfinished: list[str] = []
    runs = find_runs(run_paths, unfinished) if run_paths else []
    pairs = DEFAULT_PAIRS if pairs is None else pairs
    # Tables 1 and 2b are the KD-LoRA paper's: a super-transformer's run validates its palette (on a held-out
    # split where it has one), so its numbers are the palette section's, never a Table 1 row beside dev scores.
    tabled = [r for r in runs if r["run"]["module"] not in MLFS_MODULES]
    t1, params, eff, pals = table1(tabled, split, top_k), table2_parameters(pairs, ranks), efficiency(tabled), palettes(runs)
    excluded = diverged_runs(tabled, split)
    selections = [read_selection(Path(d)) for d in selection_dirs]
    data = {"table1": t1, "table2_parameters": params, "table2_efficiency": eff, "palettes": pals, "ranks": list(ranks),
            "runs": [r["dir"] for r in runs], "split": split, "top_k": top_k, "diverged_runs": excluded,
            "unfinished_sweep_attempts": unfinished, "selections": selections,
            "artifacts": artifacts(runs, selections)}
    data = with_paper(data)
    return render(data), data


def with_paper(data: dict[str, Any]) -> dict[str, Any]:
    """A report's data with the paper's values beside ours (``paper_comparison``, ``paper_table1``,
    ``paper_table2``) computed afresh from its tables and `kdlora.experiments.paper`."""
    t1, params, eff = data["table1"], data.get("table2_parameters", {}), data.get("table2_efficiency", {})
    return {**data, "paper_comparison": comparison(t1, params, eff, rank=min(data.get("ranks") or RANKS)),
            "paper_table1": paper_table1(t1, params), "paper_table2": paper_table2(t1, params, eff)}


def render(data: dict[str, Any], notes: Optional[str] = None) -> str:
    """The report's markdown from its JSON (`build_report`'s data) and `kdlora.experiments.paper`; `notes`, prose that
    interprets the results, goes under the title."""
    data = with_paper(data)
    markdown = render_markdown(data["table1"], data.get("table2_parameters", {}), data.get("table2_efficiency", {}),
                               data.get("ranks") or RANKS, data.get("palettes", ()), data.get("diverged_runs", ()),
                               data.get("top_k", TOP_K), data["paper_comparison"], data.get("unfinished_sweep_attempts", ()),
                               data.get("split", "val_best"))
    extra = []
    if data.get("selections"):
        extra += [""] + render_selections(data["selections"])
    if data.get("artifacts"):
        extra += [""] + render_artifacts(data["artifacts"])
    if extra:
        markdown += "\n".join(extra) + "\n"
    if notes and notes.strip():
        title, rest = markdown.split("\n\n", 1)
        markdown = f"{title}\n\n{notes.strip()}\n\n{rest}"
    return markdown


def read_report_json(path: Path) -> dict[str, Any]:
    """A saved report's JSON (`build_report`'s data); a clear error naming the file when it is not one."""
    if not path.is_file():
        raise FileNotFoundError(f"no such report JSON {path}")
    data = read_json(path, "report JSON")
    if not isinstance(data, dict) or not isinstance(data.get("table1"), dict):
        raise ValueError(f"malformed report JSON {path}: expected an object with a 'table1' mapping")
    return data


def parse_pair(text: str) -> tuple[str, tuple[str, str]]:
    try:
        name, models = text.split("=", 1)
        teacher, student = models.split(":", 1)
    except ValueError:
        raise ValueError(f"--pair must look like NAME=TEACHER:STUDENT (configs, dirs or shipped names), got {text!r}") from None
    return name, (teacher, student)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kdlora.experiments.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", nargs="*", default=[], help="run directories (searched for results.json)")
    parser.add_argument("--from-json", metavar="JSON", help="render a saved report's JSON again (no runs needed): "
                        "its tables beside the paper's values as kdlora.experiments.paper now holds them")
    parser.add_argument("--out", default="report.md", help="markdown output; JSON goes beside it (.json)")
    parser.add_argument("--pair", action="append", default=[], help="NAME=TEACHER:STUDENT configs for Table 2a (repeatable)")
    parser.add_argument("--no-default-pairs", action="store_true", help="only the --pair families in Table 2a")
    parser.add_argument("--ranks", type=int, nargs="+", default=list(RANKS))
    parser.add_argument("--split", default="val_best", choices=["val_best", "val_last", "test"])
    parser.add_argument("--selection", action="append", default=[], metavar="DIR",
                        help="the --out folder of a `python -m kdlora.mlfs.select` run: its chosen member (repeatable)")
    parser.add_argument("--top-k", type=int, default=TOP_K,
                        help="per (method, task): the median of the k best runs (the paper: 6); k is clipped to the runs there are")
    args = parser.parse_args(argv)
    try:
        pairs = {} if args.no_default_pairs else dict(DEFAULT_PAIRS)
        pairs.update(parse_pair(p) for p in args.pair)
        if args.top_k < 1:
            raise ValueError(f"--top-k must be at least 1, got {args.top_k}")
        if args.from_json and (args.runs or args.selection):
            raise ValueError("--from-json renders a saved report: give it or --runs/--selection, not both")
        if args.from_json:
            data = read_report_json(Path(args.from_json))
            markdown, data = render(data), with_paper(data)
        else:
            markdown, data = build_report(args.runs, pairs, args.ranks, args.split, args.top_k, args.selection)
    except (ValueError, FileNotFoundError) as e:
        print(f"kdlora.experiments.report: error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    write_atomic(out, markdown)
    write_atomic(out.with_suffix(".json"), json.dumps(data, indent=2) + "\n")
    print(markdown)
    print(f"[kdlora] wrote {out} and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
