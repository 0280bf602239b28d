"""benchmarks/gpu_check.py on CPU: the accelerator check's path (student and supernet through train.py under
bf16-mixed, the measuring callbacks, the exports, the report) keeps working where there is no GPU."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_check  # noqa: E402

from kdlora.cli import bf16_supported  # noqa: E402


def test_gpu_check_runs_on_cpu_and_reports_what_it_measured(tmp_path, capsys):
    out = tmp_path / "check"
    assert gpu_check.main(["--out", str(out), "--device", "cpu"]) == 0
    markdown, data = (out / "report.md").read_text(), json.loads((out / "report.json").read_text())
    for section in ("# GPU check", "## Machine", "## Runs", "## Memory and inference", "## MLFS palette", "## Exports", "## Checks"):
        assert f"\n{section}\n" in f"\n{markdown}", section
    assert "Result: **passed**" in markdown and "- [ ]" not in markdown
    assert gpu_check.render(data) == markdown  # the markdown is the JSON's
    runs = {run["kind"]: run["results"] for run in data["runs"]}
    precision = "bf16-mixed" if bf16_supported("cpu") else "32-true"  # train.py's fallback where bf16 is not native
    assert set(runs) == {"student", "supernet"}
    for results in runs.values():  # what the runs themselves recorded
        assert results["environment"]["precision"] == precision and results["environment"]["world_size"] == 1
        assert results["peak_memory"]["fit"]["device"] == "cpu" and results["latency"]["fit"]["num_runs"] == 3
    assert runs["student"]["run"]["module"] == "KDLoRAStudent" and runs["supernet"]["run"]["module"] == "SuperTransformer"
    # Every export loads by itself and is the model the run reported: the student's trained size without its
    # adapters, each palette member's parameter count.
    student = AutoModelForSequenceClassification.from_pretrained(out / "export" / "student")
    assert sum(p.numel() for p in student.parameters()) < runs["student"]["parameters"]["total"]
    palette = next(run["palette"] for run in data["runs"] if run["kind"] == "supernet")
    assert {row["role"] for row in palette} == {"maxnet", "minnet"}
    for row in palette:
        member = AutoModelForSequenceClassification.from_pretrained(out / "export" / "supernet" / row["name"])
        assert sum(p.numel() for p in member.parameters()) == row["params"]
        assert torch.isfinite(member(input_ids=torch.tensor([[2, 50, 60, 3]])).logits).all()


def test_gpu_check_refuses_an_output_that_holds_something(tmp_path, capsys):
    (tmp_path / "mine.txt").write_text("keep")
    assert gpu_check.main(["--out", str(tmp_path), "--device", "cpu"]) == 2
    assert "exists and is not an empty directory" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["mine.txt"]
