"""benchmarks/student_throughput.py: end-to-end times count the teacher-target build, and the dev score is shown
only where an arm trained past the majority class. Synthetic rounds: nothing is trained."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import student_throughput as st  # noqa: E402

MAJORITY = 0.748


def arm(build_s: float, epoch_s: float, score: float, examples_per_s: float = 10.0) -> dict:
    result = st.summary([3.2, 3.2], [6.4, 6.4], 32, [64, 64], build_s, epoch_s)
    return {**result, "examples_per_s": examples_per_s, "dev": {"accuracy": score, "f1": score, "score": score}}


def data(rounds: list[dict]) -> dict:
    meta = {"teacher": "t", "student": "s", "batch_size": 32, "timed_steps": 2, "warmup_steps": 0, "max_seq_length": 128,
            "threads": 2, "rounds": len(rounds), "seed": 42, "torch": "x", "benchmark_wall_s": 60.0,
            "load_average_before": [1.0], "load_average_after": [1.0], "command": "c", "arms": st.ARMS,
            "majority_margin": st.MAJORITY_MARGIN}
    return {"meta": meta, **st.analyse(rounds), "rounds": rounds,
            "majority_class": {"score": MAJORITY, "label": 1}, "step_profiles": {}}


def test_end_to_end_counts_the_build_once_and_every_epoch():
    # The reference predicts its targets once (2 s) and trains 4 s an epoch; an arm without a build trains 5 s an epoch.
    rounds = [{k: arm(2.0, 4.0, MAJORITY) if k == st.REFERENCE else arm(0.0, 5.0, MAJORITY) for k in st.ARMS}]
    assert rounds[0][st.REFERENCE]["end_to_end_s"] == {"1": 6.0, "3": 14.0, "5": 22.0}
    ratios = st.analyse(rounds)["end_to_end_ratios"]
    assert ratios["1"]["online"]["median"] == pytest.approx(6 / 5)  # faster than the reference for one epoch
    assert ratios["5"]["online"]["median"] == pytest.approx(22 / 25)  # slower from the third epoch on
    assert st.REFERENCE not in ratios["1"]


def score_cells(markdown: str) -> dict[str, list[str]]:
    """Arm label -> the cells of its row in the first table."""
    rows = [line for line in markdown.splitlines() if line.startswith("| ")]
    header = rows[0].strip("|").split(" | ")
    return {cells[0]: cells for cells in (r.strip("| ").split(" | ") for r in rows[1:len(st.ARMS) + 1])} | {"": header}


def test_no_score_column_when_no_arm_trained_past_the_majority_class():
    # Within the margin of the majority class, or below it: no learning shown.
    rounds = [{k: arm(0.0, 5.0, s) for k in st.ARMS} for s in (MAJORITY, MAJORITY + 0.004, 0.70)]
    markdown = st.render(data(rounds))
    assert not any("Dev score" in h for h in score_cells(markdown)[""])
    assert "no arm trained past the majority class" in markdown
    assert "74.8" in markdown


def test_score_shown_only_for_rounds_past_the_majority_class():
    rounds = [{k: arm(0.0, 5.0, 0.80 if k == "cached" else MAJORITY) for k in st.ARMS},
              {k: arm(0.0, 5.0, MAJORITY + 0.02 if k == "cached" else MAJORITY) for k in st.ARMS}]
    cells = score_cells(st.render(data(rounds)))
    assert cells[""][-1].startswith("Dev score")
    assert cells[st.ARMS["cached"]][-1] == "80.0, 76.8"
    assert cells[st.ARMS["online"]][-1] == "–, –"
