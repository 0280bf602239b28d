"""Are two checkouts' exports bit-identical? Train the demo's three models briefly from the same seed
in each checkout, then compare every exported file byte for byte.

    python scripts/export_identity.py --checkout OLD --checkout NEW --models models --out identity.json

Each checkout runs its own ``train.py`` with its own ``configs/demo/{teacher,student,supernet}.yaml``
(so a change of class paths between the two is allowed), inside a fresh scratch folder that holds only
links to the weights (``models/``) and to the checkout's package (for the embedded GLUE files). The same
short-run overrides go to both: a few training steps on a few examples, fp32, one thread. Exit status 0
when every exported file has the same SHA-256 in both, 1 otherwise; the comparison is written to --out. Measured latencies are
the one thing left out (see `file_hashes`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

SHORT_RUN = [
    "--data.max_train_samples", "64", "--data.max_eval_samples", "32", "--data.batch_size", "16",
    "--trainer.max_steps", "4", "--trainer.precision", "32-true", "--trainer.accelerator", "cpu",
    "--data.group_by_length", "false",
]
STAGES = ("teacher", "student", "supernet")


def without_timings(value):
    """A JSON value without its measured wall-clock timings (keys naming latency), which no seed fixes."""
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if "latency" not in k}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


def file_hashes(root: Path) -> dict[str, str]:
    """SHA-256 of every file under each ``export`` folder below root, keyed by path relative to root.

    The palette report beside an MLFS export holds measured latencies: its JSON is compared without
    them, and its markdown and figure (renderings of those timings) are left out.
    """
    hashes = {}
    for path in sorted(root.rglob("*")):
        if not path.is_file() or "export" not in path.relative_to(root).parts:
            continue
        data = path.read_bytes()
        if path.name.startswith("palette."):
            if path.suffix != ".json":
                continue
            data = json.dumps(without_timings(json.loads(data)), sort_keys=True).encode()
        hashes[str(path.relative_to(root))] = hashlib.sha256(data).hexdigest()
    return hashes


def train_exports(checkout: Path, models: Path, scratch: Path) -> dict[str, str]:
    scratch.mkdir(parents=True)
    (scratch / "models").symlink_to(models.resolve())
    (scratch / "kdlora").symlink_to((checkout / "kdlora").resolve())
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1", PYTHONHASHSEED="0")
    for stage in STAGES:
        cmd = [sys.executable, str(checkout / "train.py"), "fit",
               "--config", str(checkout / "configs" / "demo" / f"{stage}.yaml"), *SHORT_RUN]
        print(f"[{checkout.name}] {stage}", flush=True)
        done = subprocess.run(cmd, cwd=scratch, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if done.returncode != 0:
            raise SystemExit(f"error: {stage} failed in {checkout}:\n{done.stderr[-3000:]}")
    return file_hashes(scratch / "runs")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkout", action="append", required=True, type=Path, help="a checkout (give two)")
    parser.add_argument("--models", type=Path, default=Path("models"), help="folder with minilm/ and minilm-l3/")
    parser.add_argument("--out", type=Path, help="JSON comparison")
    args = parser.parse_args(argv)
    if len(args.checkout) != 2:
        parser.error("give --checkout twice")
    if not (args.models / "minilm" / "config.json").is_file():
        parser.error(f"{args.models}/minilm holds no model: run scripts/fetch_models.sh first")
    with tempfile.TemporaryDirectory() as tmp:
        a, b = (train_exports(c, args.models, Path(tmp) / str(i)) for i, c in enumerate(args.checkout))
    same = sorted(k for k in a if b.get(k) == a[k])
    differ = sorted(k for k in a if k in b and b[k] != a[k])
    only = sorted(set(a) ^ set(b))
    result = {"checkouts": [str(c) for c in args.checkout], "overrides": SHORT_RUN, "files": len(a),
              "identical": same, "different": differ, "in_one_only": only}
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{len(same)} of {len(set(a) | set(b))} exported files bit-identical; "
          f"{len(differ)} differ, {len(only)} in one checkout only")
    for k in differ + only:
        print(f"  not identical: {k}")
    return 0 if same and not differ and not only else 1


if __name__ == "__main__":
    sys.exit(main())
