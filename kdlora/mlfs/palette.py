"""The palette report: a table (JSON + markdown) and a figure of score vs parameters and latency.

Plain functions over rows of dicts: ``{"name", "role", "params", "score", "metrics": {...},
"latency_ms": float | None}``. No Lightning here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from kdlora.io import write_atomic


def palette_markdown(rows: Sequence[dict], title: str = "") -> str:
    metric_names = sorted({m for r in rows for m in r.get("metrics", {})})
    head = ["subnet", "role", "params (M)", "params / maxnet", *metric_names, "score", "latency (ms)"]
    max_params = max((r["params"] for r in rows), default=1) or 1
    lines = [f"## {title}\n" if title else "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["name"], r.get("role", ""), f"{r['params'] / 1e6:.2f}", f"{r['params'] / max_params:.2f}"]
        cells += [f"{r['metrics'][m]:.4f}" if m in r.get("metrics", {}) else "" for m in metric_names]
        cells.append(f"{r['score']:.4f}" if r.get("score") is not None else "")
        cells.append(f"{r['latency_ms']:.2f}" if r.get("latency_ms") is not None else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(line for line in lines if line) + "\n"


def draw_palette(rows: Sequence[dict], title: str = ""):
    """Score vs parameters (and vs latency when measured): a matplotlib Figure (Agg backend)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    scored = [r for r in rows if r.get("score") is not None]
    with_latency = [r for r in scored if r.get("latency_ms") is not None]
    fig = Figure(figsize=(10 if with_latency else 5, 4), dpi=100)
    axes = fig.subplots(1, 2 if with_latency else 1, squeeze=False)[0]
    panels = [("params", 1e-6, "parameters (M)", scored)]
    if with_latency:
        panels.append(("latency_ms", 1.0, "latency (ms)", with_latency))
    for ax, (key, unit, label, data) in zip(axes, panels):
        data = sorted(data, key=lambda r: r[key])
        ax.plot([r[key] * unit for r in data], [r["score"] for r in data], "o-")
        for r in data:
            ax.annotate(r["name"], (r[key] * unit, r["score"]), fontsize=7, textcoords="offset points", xytext=(3, 3))
        ax.set_xlabel(label)
        ax.set_ylabel("dev score")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def write_palette_report(rows: Sequence[dict], out_dir: str | Path, title: str = "", name: str = "palette") -> dict[str, Path]:
    """``<name>.json``, ``<name>.md`` and ``<name>.png`` (default ``palette.*``) in `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {ext: out_dir / f"{name}.{ext}" for ext in ("json", "md", "png")}
    write_atomic(paths["json"], json.dumps(list(rows), indent=2) + "\n")
    write_atomic(paths["md"], palette_markdown(rows, title))
    fig = draw_palette(rows, title)
    tmp = paths["png"].with_name(f".{name}.tmp.png")
    fig.savefig(tmp)
    tmp.replace(paths["png"])
    return paths
