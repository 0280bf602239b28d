"""Hyperparameter sweeps: a grid in YAML expanded into `train.py fit` runs, resumable, one machine or a cluster.

    python -m kdlora.experiments.sweep configs/sweeps/bert-lora.yaml                       # run every point, in sequence
    python -m kdlora.experiments.sweep configs/sweeps/bert-lora.yaml --engine ray --gpus-per-trial 1   # in parallel (Ray Tune)
    python -m kdlora.experiments.sweep configs/sweeps/bert-lora.yaml --engine ray --address auto      # on a running Ray cluster
    python -m kdlora.experiments.sweep configs/sweeps/bert-lora.yaml --dry-run             # print the train.py commands
    python -m kdlora.experiments.sweep configs/sweeps/bert-lora.yaml --emit slurm --out sweep-jobs/   # a SLURM job array
    python -m kdlora.experiments.sweep configs/sweeps/bert-lora.yaml --emit commands --out sweep-jobs/  # one line per point
    python -m kdlora.experiments.sweep configs/sweeps/bert-lora.yaml --point rte/r8-a16-do0-ep3-1a2b3c   # one point

A sweep file::

    base: configs/teacher/bert-lora.yaml     # the LightningCLI config every point starts from
    tasks: [cola, sst2, mrpc]                # each point runs on each task
    fixed: {trainer.precision: 16-mixed}      # overrides shared by every point (dotted CLI keys)
    grid:                                     # the product of these lists ...
      model.init_args.lora_r: [8, 16, 32]
      model.init_args.lora_alpha: [16, 32]
    zip:                                      # ... times these lists taken together (same lengths)
      trainer.max_epochs: [3, 5]
      model.init_args.lora_dropout: [0.0, 0.1]
    points: []                                # or/and explicit points (dicts of overrides), added after
    sample: null                              # draw this many points of the grid (seeded), else all
    seed: 0
    export: false                             # true: each point exports its best model into <point run>/export

Each point has a stable id (its overrides, readable, plus a hash of them) and its own directory
``<save_dir>/<name>/sweep/<id>/version_N`` (``save_dir``/``name``: the base config's TensorBoard logger),
so points never overwrite each other or the base config's own runs. A point is finished when a
version directory holds ``results.json`` with ``val_best`` (or ``diverged``: training stopped on a
non-finite loss, reported as diverged) and the done marker ``sweep_done.json`` the runner writes after
the run returns (with the run's start and end times). A crashed point resumes from the newest
``checkpoints/last.ckpt`` of its unfinished attempts (``--ckpt_path``), logging on into that attempt's
version directory; one that crashed before its first ``last.ckpt`` re-runs into the next version
directory, the crashed attempt kept (`kdlora.experiments.report` leaves attempts without the marker out).

Every point's arguments are parsed by the training CLI's own parser before any point runs (also with
``--dry-run`` and ``--emit``): an option the model, data or trainer does not have, or a value of the
wrong type, stops the sweep with one line naming the point.

``--engine ray`` runs the points as Ray Tune trials, one trial per unfinished point, each with
``--cpus-per-trial``/``--gpus-per-trial`` of the machine (Ray makes only its GPUs visible to it), on a
local Ray instance or the cluster at ``--address``; each trial runs the command the sequential engine
runs. On a cluster every node needs this project at the same path and a shared file system for the
sweep's configs, data and runs.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import random
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from kdlora.data.tasks import get_task
from kdlora.io import write_atomic
from kdlora.training.callbacks import RESULTS_FILE

DONE_MARKER = "sweep_done.json"
POINT_FILE = "sweep_point.json"
SWEEP_KEYS = {"base", "tasks", "fixed", "grid", "zip", "points", "sample", "seed", "export"}
# Short names for ids; any other key uses its last dotted segment.
ABBREVIATIONS = {"learning_rate": "lr", "batch_size": "bs", "max_epochs": "ep", "weight_decay": "wd",
                 "lora.r": "r", "lora.alpha": "a", "lora.dropout": "do", "seed_everything": "seed"}
TRAIN_PY = Path(__file__).resolve().parents[2] / "train.py"
LAST_CKPT = Path("checkpoints") / "last.ckpt"


class SweepError(ValueError):
    """A sweep file or argument that cannot be run, with a message naming the problem."""


@dataclass
class Sweep:
    base: str
    tasks: list[str]
    points: list[dict[str, Any]]
    fixed: dict[str, Any] = field(default_factory=dict)
    export: bool = False
    source: str = ""


# ----------------------------------------------------------------------------------------------
# Expansion
# ----------------------------------------------------------------------------------------------


def _lists(section: Any, name: str) -> dict[str, list]:
    if section is None:
        return {}
    if not isinstance(section, dict):
        raise SweepError(f"'{name}' must map dotted keys to lists of values, got {section!r}")
    for key, values in section.items():
        if not isinstance(values, list) or not values:
            raise SweepError(f"'{name}.{key}' must be a non-empty list of values, got {values!r}")
    return dict(section)


def expand(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """The points of a sweep spec: product of `grid` × `zip` (taken together), then a seeded `sample`,
    then explicit `points`. Duplicates (same overrides) are kept once, in first-seen order."""
    grid, zipped = _lists(spec.get("grid"), "grid"), _lists(spec.get("zip"), "zip")
    lengths = {k: len(v) for k, v in zipped.items()}
    if len(set(lengths.values())) > 1:
        raise SweepError(f"'zip' lists must have the same length, got {lengths}")
    overlap = set(grid) & set(zipped)
    if overlap:
        raise SweepError(f"key(s) {sorted(overlap)} appear in both 'grid' and 'zip'")
    points: list[dict[str, Any]] = []
    if grid or zipped:
        zip_rows = [dict(zip(zipped, row)) for row in zip(*zipped.values())] if zipped else [{}]
        for values in itertools.product(*grid.values()):
            for row in zip_rows:
                points.append({**dict(zip(grid, values)), **row})
    sample = spec.get("sample")
    if sample is not None:
        if not isinstance(sample, int) or isinstance(sample, bool) or not 1 <= sample <= len(points):
            raise SweepError(f"'sample' must be an integer from 1 to the grid's {len(points)} points, got {sample!r}")
        rng = random.Random(spec.get("seed", 0))
        chosen = sorted(rng.sample(range(len(points)), sample))
        points = [points[i] for i in chosen]
    explicit = spec.get("points") or []
    if not isinstance(explicit, list) or not all(isinstance(p, dict) for p in explicit):
        raise SweepError(f"'points' must be a list of mappings of dotted keys to values, got {explicit!r}")
    points += [dict(p) for p in explicit]
    seen: dict[str, dict[str, Any]] = {}
    for p in points:
        seen.setdefault(point_id(p), p)
    points = list(seen.values())
    if not points:
        raise SweepError("the sweep has no points: give 'grid', 'zip' or 'points'")
    return points


def _value_text(value: Any) -> str:
    """A value as the CLI reads it (jsonargparse parses YAML/JSON)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def point_id(overrides: dict[str, Any]) -> str:
    """Readable and stable: ``r8-a16-do0.1-<hash>``; the hash (of every key and value) keeps ids unique."""
    canonical = json.dumps(overrides, sort_keys=True, default=str)
    digest = hashlib.sha1(canonical.encode()).hexdigest()[:6]
    parts = []
    for key in sorted(overrides):
        last, group_and_last = key.rsplit(".", 1)[-1], ".".join(key.rsplit(".", 2)[-2:])
        short = ABBREVIATIONS.get(group_and_last, ABBREVIATIONS.get(last, last))
        value = overrides[key]
        text = format(value, "g") if isinstance(value, float) else _value_text(value)
        parts.append(f"{short}{text}")
    readable = re.sub(r"[^A-Za-z0-9._+-]", "_", "-".join(parts))[:80]
    return f"{readable}-{digest}" if readable else digest


def load_sweep(path: str | Path) -> Sweep:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise SweepError(f"no such sweep file {path}")
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise SweepError(f"malformed sweep file {path}: {e}") from None
    if not isinstance(spec, dict):
        raise SweepError(f"sweep file {path} must be a mapping with 'base', 'tasks' and 'grid'/'zip'/'points'")
    unknown = set(spec) - SWEEP_KEYS
    if unknown:
        raise SweepError(f"unknown key(s) {sorted(unknown)} in sweep file {path}; known: {sorted(SWEEP_KEYS)}")
    base = spec.get("base")
    if not isinstance(base, str) or not Path(base).is_file():
        raise SweepError(f"'base' in {path} must name an existing config file, got {base!r}")
    tasks = spec.get("tasks")
    tasks = [tasks] if isinstance(tasks, str) else tasks
    if not isinstance(tasks, list) or not tasks:
        raise SweepError(f"'tasks' in {path} must be a non-empty list of GLUE tasks, got {tasks!r}")
    try:
        tasks = list(dict.fromkeys(get_task(str(t)).name for t in tasks))
    except (KeyError, ValueError) as e:
        raise SweepError(f"'tasks' in {path}: {e}") from None
    fixed = spec.get("fixed") or {}
    if not isinstance(fixed, dict):
        raise SweepError(f"'fixed' in {path} must map dotted keys to values, got {fixed!r}")
    export = spec.get("export", False)
    if not isinstance(export, bool):
        raise SweepError(f"'export' in {path} must be true or false, got {export!r}")
    return Sweep(base=base, tasks=tasks, points=expand(spec), fixed=fixed, export=export, source=str(path))


# ----------------------------------------------------------------------------------------------
# Run directories and commands
# ----------------------------------------------------------------------------------------------


def sweep_root(sweep: Sweep, task: str) -> Path:
    """``<save_dir>/<name>/sweep`` of the base config's logger, ``{task}`` filled in."""
    import yaml

    config = yaml.safe_load(Path(sweep.base).read_text()) or {}
    logger = ((config.get("trainer") or {}).get("logger"))
    args = logger.get("init_args", {}) if isinstance(logger, dict) else {}
    if not isinstance(logger, dict) or "save_dir" not in args:
        raise SweepError(f"base config {sweep.base} needs a trainer.logger with init_args.save_dir "
                         "(a TensorBoardLogger, as in configs/): each point's results go under it")
    save_dir = str(sweep.fixed.get("trainer.logger.init_args.save_dir", args["save_dir"]))
    name = str(sweep.fixed.get("trainer.logger.init_args.name", args.get("name", "lightning_logs")))
    return Path(save_dir.replace("{task}", task)) / name.replace("{task}", task) / "sweep"


def point_dir(sweep: Sweep, task: str, overrides: dict[str, Any]) -> Path:
    return sweep_root(sweep, task) / point_id(overrides)


def finished_version(directory: Path) -> Optional[Path]:
    """The version directory of a finished attempt of the point in `directory`, else None."""
    for version in sorted(directory.glob("version_*")):
        if is_finished(version):
            return version
    return None


def is_finished(version: Path) -> bool:
    """results.json with val_best (or a recorded divergence) and the runner's done marker."""
    results, marker = version / RESULTS_FILE, version / DONE_MARKER
    if not (results.is_file() and marker.is_file()):
        return False
    try:
        data = json.loads(results.read_text())
    except json.JSONDecodeError:
        return False
    return bool(data.get("val_best") or data.get("diverged"))


def next_version(directory: Path) -> int:
    numbers = [int(m.group(1)) for p in directory.glob("version_*") for m in [re.fullmatch(r"version_(\d+)", p.name)] if m]
    return max(numbers, default=-1) + 1


def resumable(directory: Path) -> Optional[Path]:
    """The `last.ckpt` of the point's newest unfinished attempt that wrote one, else None."""
    versions = [(int(m.group(1)), p) for p in directory.glob("version_*") for m in [re.fullmatch(r"version_(\d+)", p.name)] if m]
    for _, version in sorted(versions, reverse=True):
        if not is_finished(version) and (version / LAST_CKPT).is_file():
            return version / LAST_CKPT
    return None


def train_args(sweep: Sweep, task: str, overrides: dict[str, Any], version: int,
               ckpt_path: Optional[Path] = None) -> list[str]:
    """The `train.py` arguments of one point: `fit`, base config, task, fixed and point overrides, its own logger dir."""
    directory = point_dir(sweep, task, overrides)
    command = ["fit", "--config", sweep.base, "--data.task", task]
    for key, value in {**sweep.fixed, **overrides}.items():
        command += [f"--{key}", _value_text(value)]
    command += ["--trainer.logger.init_args.save_dir", str(directory.parent),
                "--trainer.logger.init_args.name", directory.name,
                "--trainer.logger.init_args.version", str(version)]
    export_dir = directory / f"version_{version}" / "export"
    command += ["--model.init_args.export.enabled", "true", "--model.init_args.export.dir", str(export_dir)] if sweep.export \
        else ["--model.init_args.export.enabled", "false"]
    return command + (["--ckpt_path", str(ckpt_path)] if ckpt_path else [])


def train_command(sweep: Sweep, task: str, overrides: dict[str, Any], version: int,
                  launcher: Sequence[str] = (), ckpt_path: Optional[Path] = None) -> list[str]:
    """The command of one point: `train.py` and `train_args`, run by this interpreter or `launcher`."""
    return [*(launcher or [sys.executable]), str(TRAIN_PY) if TRAIN_PY.is_file() else "train.py",
            *train_args(sweep, task, overrides, version, ckpt_path)]


def next_attempt(sweep: Sweep, task: str, overrides: dict[str, Any]) -> tuple[int, Optional[Path]]:
    """(version, last.ckpt to resume or None) of the point's next attempt."""
    directory = point_dir(sweep, task, overrides)
    last = resumable(directory)
    return (int(last.parent.parent.name.split("_", 1)[1]), last) if last else (next_version(directory), None)


def check_points(sweep: Sweep, points: Sequence[tuple[str, dict[str, Any]]]) -> None:
    """Parse the arguments of the points with the training CLI's own parser (built once), running nothing:
    a SweepError naming the first point whose options or values the CLI refuses. A point's options do
    not depend on its task, so each point is parsed on one task, and each task once."""
    from argparse import ArgumentError

    from kdlora.cli import argument_checker, cli_class_for, clean_error

    firsts: dict[str, tuple[str, dict[str, Any]]] = {}
    for task, p in points:
        firsts.setdefault(point_id(p), (task, p))
    for task, p in points:
        firsts.setdefault(task, (task, p))
    checkers: dict[type, Any] = {}
    for task, p in firsts.values():
        args = train_args(sweep, task, p, 0)
        cli_class = cli_class_for(args)[0]  # the point's model selects the CLI; each one's parser is built once
        checker = checkers[cli_class] = checkers.get(cli_class) or argument_checker(args)
        try:
            checker.parse_arguments(checker.parser, args)
        except (ArgumentError, ValueError, KeyError, TypeError) as e:
            raise SweepError(f"point {task}/{point_id(p)}: the training CLI refuses its arguments: {clean_error(e)}; "
                             "nothing was run") from None


def run_point(sweep: Sweep, task: str, overrides: dict[str, Any], launcher: Sequence[str] = (),
              out=sys.stdout) -> str:
    """Run one point unless finished: 'skipped', 'finished', 'diverged' or 'failed (exit N)'."""
    directory = point_dir(sweep, task, overrides)
    if finished_version(directory) is not None:
        return "skipped"
    version, last = next_attempt(sweep, task, overrides)
    command = train_command(sweep, task, overrides, version, launcher, last)
    run = directory / f"version_{version}"
    write_atomic(directory / POINT_FILE, json.dumps({"id": directory.name, "task": task, "overrides": overrides,
                                                     "base": sweep.base, "sweep": sweep.source}, indent=2) + "\n")
    print(f"[kdlora.experiments.sweep] {task}/{directory.name} -> {run}" + (f" (resuming {last})" if last else ""), file=out, flush=True)
    start = time.time()
    code = subprocess.call(command)
    end = time.time()
    results = run / RESULTS_FILE
    try:
        data = json.loads(results.read_text()) if results.is_file() else {}
    except json.JSONDecodeError:
        data = {}
    if code == 2 and not run.exists():
        # The CLI stopped before the run started: a bad override, config or data, which every point shares.
        raise SweepError(f"point {task}/{directory.name} stopped before training started (exit 2, the error is above): "
                         f"fix the sweep file or its base config {sweep.base}; the sweep stops here")
    status = "diverged" if data.get("diverged") else "finished" if code == 0 and data.get("val_best") else f"failed (exit {code})"
    if status in ("finished", "diverged"):
        write_atomic(run / DONE_MARKER, json.dumps({"status": status, "exit_code": code, "started": start, "ended": end,
                                                    "seconds": end - start, "command": command}, indent=2) + "\n")
    return status


def _ray_trial(config: dict[str, Any], sweep: Sweep, launcher: Sequence[str], cwd: str) -> None:
    """One Ray Tune trial: run the point `config["point"]` (TASK/ID) as `run_point` does, from the sweep's directory."""
    from ray import tune

    os.chdir(cwd)  # the sweep's paths are relative to where it was started; Tune starts trials elsewhere
    task, overrides = select_point(sweep, config["point"])
    try:
        status = run_point(sweep, task, overrides, launcher)
    except SweepError as e:
        status = f"failed ({e})"
    tune.report({"status": status})


def run_with_ray(sweep: Sweep, points: Sequence[tuple[str, dict[str, Any]]], launcher: Sequence[str] = (),
                 address: Optional[str] = None, cpus_per_trial: float = 1, gpus_per_trial: float = 0) -> dict[str, str]:
    """Run the points as Ray Tune trials, at most as many at once as the cluster's CPUs and GPUs hold:
    TASK/ID -> what `run_point` returned (finished points are 'skipped' without a trial)."""
    try:
        import ray
        from ray import tune
    except ImportError:
        raise SweepError("--engine ray needs Ray Tune: pip install 'kdlora[ray]' (or pip install \"ray[tune]\")") from None
    import tempfile

    outcomes = {f"{t}/{point_id(p)}": "skipped" for t, p in points if finished_version(point_dir(sweep, t, p)) is not None}
    todo = [f"{t}/{point_id(p)}" for t, p in points if f"{t}/{point_id(p)}" not in outcomes]
    if not todo:
        return outcomes
    started, output = not ray.is_initialized(), os.environ.get("RAY_AIR_NEW_OUTPUT")
    if started:
        try:
            ray.init(address=address, include_dashboard=False, logging_level="WARNING")
        except (ConnectionError, ValueError, RuntimeError) as e:
            raise SweepError(f"cannot start or reach the Ray cluster{f' at {address}' if address else ''}: {e}") from None
    try:
        available = ray.cluster_resources()  # a cluster may grow (autoscaling); this machine does not
        if address is None and (available.get("CPU", 0) < cpus_per_trial or available.get("GPU", 0) < gpus_per_trial):
            raise SweepError(f"a trial needs {cpus_per_trial:g} CPU(s) and {gpus_per_trial:g} GPU(s), the Ray cluster has "
                             f"{available.get('CPU', 0):g} and {available.get('GPU', 0):g}: lower --cpus-per-trial/--gpus-per-trial")
        trainable = tune.with_resources(tune.with_parameters(_ray_trial, sweep=sweep, launcher=list(launcher), cwd=os.getcwd()),
                                        {"cpu": cpus_per_trial, "gpu": gpus_per_trial})
        # Tune's own records (trial logs, experiment state) are scratch: each point's run directory
        # and done marker say what ran; a rerun of the sweep resumes from them. Tune's console output
        # (which would point at the scratch directory) is off: the trials' own output is what shows.
        os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
        with tempfile.TemporaryDirectory(prefix="kdlora-sweep-ray-") as scratch:
            tuner = tune.Tuner(trainable, param_space={"point": tune.grid_search(todo)},
                               tune_config=tune.TuneConfig(reuse_actors=False),
                               run_config=tune.RunConfig(name="kdlora-sweep", storage_path=scratch, verbose=0))
            for result in tuner.fit():
                status = (result.metrics or {}).get("status")
                outcomes[result.config["point"]] = status or f"failed ({type(result.error).__name__ if result.error else 'no result'})"
    finally:
        if output is not None:
            os.environ["RAY_AIR_NEW_OUTPUT"] = output
        else:
            os.environ.pop("RAY_AIR_NEW_OUTPUT", None)
        if started:
            ray.shutdown()
    return outcomes


def all_points(sweep: Sweep) -> list[tuple[str, dict[str, Any]]]:
    return [(task, p) for task in sweep.tasks for p in sweep.points]


def select_point(sweep: Sweep, name: str) -> tuple[str, dict[str, Any]]:
    """`TASK/ID` -> (task, overrides)."""
    task, _, pid = name.partition("/")
    for t, p in all_points(sweep):
        if t == task and point_id(p) == pid:
            return t, p
    raise SweepError(f"no point {name!r} in {sweep.source}: expected TASK/ID, e.g. {sweep.tasks[0]}/{point_id(sweep.points[0])}")


def emit(sweep: Sweep, kind: str, out_dir: Path, launcher: Sequence[str] = (), slurm_args: Sequence[str] = (),
         parallel: Optional[int] = None) -> list[Path]:
    """Write `commands.txt` (one resumable `python -m kdlora.experiments.sweep SWEEP --point TASK/ID` per unfinished
    point) and, for slurm, `sweep.sbatch`, a job array running line $SLURM_ARRAY_TASK_ID + 1 of it."""
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise SweepError(f"--out {out_dir} exists and is not an empty directory: give a new one")
    todo = [(t, p) for t, p in all_points(sweep) if finished_version(point_dir(sweep, t, p)) is None]
    if not todo:
        raise SweepError(f"every point of {sweep.source} is finished: nothing to emit")
    extra = ["--launcher", shlex.join(launcher)] if launcher else []
    lines = [shlex.join([sys.executable, "-m", "kdlora.experiments.sweep", sweep.source, "--point", f"{t}/{point_id(p)}", *extra]) for t, p in todo]
    files = [out_dir / "commands.txt"]
    write_atomic(files[0], "\n".join(lines) + "\n")
    if kind == "slurm":
        array = f"0-{len(lines) - 1}" + (f"%{parallel}" if parallel else "")
        where = out_dir.resolve()  # absolute: sbatch may be called from anywhere
        script = ["#!/bin/bash", "#SBATCH --job-name=kdlora-sweep", f"#SBATCH --array={array}",
                  f"#SBATCH --chdir={os.getcwd()}",  # the sweep's paths are relative to where it was emitted
                  f"#SBATCH --output={where}/logs/%A_%a.out",
                  *[f"#SBATCH {a}" for a in slurm_args],
                  f"# {len(lines)} points of {sweep.source}; each line of commands.txt is one resumable point.",
                  f'CMD=$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" {shlex.quote(str(where / "commands.txt"))})',
                  'echo "$CMD"', 'eval "$CMD"']
        files.append(out_dir / "sweep.sbatch")
        (out_dir / "logs").mkdir(parents=True, exist_ok=True)
        write_atomic(files[1], "\n".join(script) + "\n")
    return files


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kdlora.experiments.sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep", help="sweep YAML (configs/sweeps/*.yaml)")
    parser.add_argument("--dry-run", action="store_true", help="print the train.py command of every unfinished point")
    parser.add_argument("--emit", choices=["slurm", "commands"], help="write a SLURM job array / a command list to --out")
    parser.add_argument("--out", help="directory for --emit (new or empty)")
    parser.add_argument("--point", help="run only TASK/ID (what emitted commands call)")
    parser.add_argument("--launcher", default="", help="run train.py with this instead of the current python, "
                        "e.g. 'torchrun --nproc_per_node 4' (set trainer.devices to match)")
    parser.add_argument("--slurm-arg", action="append", default=[], help="extra #SBATCH line, e.g. --gres=gpu:1 (repeatable)")
    parser.add_argument("--parallel", type=int, help="SLURM array: at most this many points at once")
    parser.add_argument("--engine", choices=["sequential", "ray"], default="sequential",
                        help="run the points one after another, or as parallel Ray Tune trials (pip install 'kdlora[ray]')")
    parser.add_argument("--cpus-per-trial", type=float, help="--engine ray: CPUs each point holds (default 1)")
    parser.add_argument("--gpus-per-trial", type=float, help="--engine ray: GPUs each point holds (default 0)")
    parser.add_argument("--address", help="--engine ray: a running Ray cluster ('auto' or host:port); default: "
                        "a Ray instance on this machine")
    args = parser.parse_args(argv)
    if args.parallel is not None and args.parallel < 1:
        parser.error(f"--parallel must be at least 1, got {args.parallel}")
    ray_options = [f"--{k.replace('_', '-')}" for k in ("cpus_per_trial", "gpus_per_trial", "address") if getattr(args, k) is not None]
    if ray_options and args.engine != "ray":
        parser.error(f"{', '.join(ray_options)} only apply to --engine ray")
    cpus, gpus = (1.0 if args.cpus_per_trial is None else args.cpus_per_trial), (args.gpus_per_trial or 0.0)
    if cpus <= 0 or gpus < 0:
        parser.error(f"--cpus-per-trial must be positive and --gpus-per-trial not negative, got {cpus:g} and {gpus:g}")
    launcher = shlex.split(args.launcher)
    try:
        sweep = load_sweep(args.sweep)
        points = [select_point(sweep, args.point)] if args.point else all_points(sweep)
        if args.emit and not args.out:
            raise SweepError("--emit needs --out DIR")
        check_points(sweep, all_points(sweep) if args.emit else points)
        if args.emit:
            files = emit(sweep, args.emit, Path(args.out), launcher, args.slurm_arg, args.parallel)
            print(f"[kdlora.experiments.sweep] wrote {', '.join(map(str, files))}")
            return 0
        if args.dry_run:
            for t, p in points:
                directory = point_dir(sweep, t, p)
                state = "finished" if finished_version(directory) else "to run"
                print(f"# {t}/{point_id(p)} ({state})")
                if state == "to run":
                    version, last = next_attempt(sweep, t, p)
                    print(shlex.join(train_command(sweep, t, p, version, launcher, last)))
            return 0
        print(f"[kdlora.experiments.sweep] {len(points)} point(s) of {sweep.source} ({len(sweep.points)} per task × {len(sweep.tasks)} task(s))")
        if args.engine == "ray":
            outcomes = run_with_ray(sweep, points, launcher, args.address, cpus, gpus)
        else:
            outcomes = {f"{t}/{point_id(p)}": run_point(sweep, t, p, launcher) for t, p in points}
    except SweepError as e:
        print(f"kdlora.experiments.sweep: error: {e}", file=sys.stderr)
        return 2
    counts: dict[str, int] = {}
    for status in outcomes.values():
        counts[status.split(" ")[0]] = counts.get(status.split(" ")[0], 0) + 1
    print("[kdlora.experiments.sweep] " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    failed = [f"{k}: {v}" for k, v in outcomes.items() if v.startswith("failed")]
    for line in failed:
        print(f"[kdlora.experiments.sweep] {line}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
