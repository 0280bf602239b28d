"""Execute a notebook top to bottom (nbclient, the kernel of this interpreter) and fail on the first cell
that raises: keeps `notebooks/read_runs.ipynb` working against the runs the demo leaves.

    python scripts/run_notebook.py notebooks/read_runs.ipynb [--out executed.ipynb]

The notebook runs in its own folder (its relative paths are relative to it). The executed copy, with
outputs, goes to --out when given; the notebook itself is never rewritten.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from kdlora.io import write_atomic


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebook", type=Path)
    parser.add_argument("--out", type=Path, help="where to write the executed copy (default: nowhere)")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per cell")
    args = parser.parse_args(argv)
    if not args.notebook.is_file():
        print(f"error: no notebook {args.notebook}", file=sys.stderr)
        return 2
    nb = nbformat.read(args.notebook, as_version=4)
    client = NotebookClient(nb, timeout=args.timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(args.notebook.parent.resolve())}})
    try:
        client.execute()
    except CellExecutionError as e:
        print(f"error: {args.notebook} failed:\n{e}", file=sys.stderr)
        return 1
    if args.out:
        write_atomic(args.out, nbformat.writes(nb))
    cells = sum(c.cell_type == "code" for c in nb.cells)
    print(f"[kdlora] executed {args.notebook}: {cells} code cells, no errors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
