"""Write a seeded random subset of a GLUE task's train.tsv (header kept) plus its full dev.tsv.

The demo data embedded in kdlora/assets/glue is made with:
    python scripts/subset_glue.py ../shared/glue/SST-2 kdlora/assets/glue/SST-2 --rows 8000 --seed 0
"""

import argparse
import random
import shutil
from pathlib import Path

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("src", type=Path)
parser.add_argument("dst", type=Path)
parser.add_argument("--rows", type=int, required=True)
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--no-header", action="store_true", help="CoLA's files have no header row")
args = parser.parse_args()

lines = (args.src / "train.tsv").read_text(encoding="utf-8").splitlines(keepends=True)
header, rows = ([], lines) if args.no_header else (lines[:1], lines[1:])
keep = sorted(random.Random(args.seed).sample(range(len(rows)), min(args.rows, len(rows))))
args.dst.mkdir(parents=True, exist_ok=True)
(args.dst / "train.tsv").write_text("".join(header + [rows[i] for i in keep]), encoding="utf-8")
shutil.copy(args.src / "dev.tsv", args.dst / "dev.tsv")
print(f"wrote {len(keep)} of {len(rows)} train rows and the full dev set to {args.dst}")
