"""benchmarks/mlfs_palette.py: the run seed reaches train.py where LightningCLI keeps it (after every --config); a
matched-budget run trains as many steps as MLFS trained the slice; `decide` pairs arms by seed with t-intervals."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import make_tiny_model_dir

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))


@pytest.mark.parametrize("cmd", ["mlfs", "alone", "student"])
def test_seed_reaches_the_resolved_config(cmd, monkeypatch, tmp_path, tiny_bert_dir):
    import mlfs_palette

    # The runs each command needs are built here: `student` distils the `fft` run's export; `alone` cuts
    # its member from a pretrained model (the tiny BERT, H32 with 4 layers, for MiniLM).
    runs = tmp_path / "runs"
    monkeypatch.setattr(mlfs_palette, "RUNS", runs)
    make_tiny_model_dir(runs / "sst2" / "fft" / "export", "bert")
    captured = []
    monkeypatch.setattr(mlfs_palette, "run_fit", lambda args, *where: captured.append(args))
    extra = {"mlfs": [], "alone": ["--member", "h16-a2-f32-l0.2", "--pretrained", str(tiny_bert_dir)], "student": []}[cmd]
    assert mlfs_palette.main([cmd, "--task", "sst2", "--seed", "43", *extra]) == 0
    assert len(captured) == 1
    args = captured[0]
    if cmd == "alone":  # the member's slice was exported for the run to train, without the classifier
        from safetensors.torch import load_file
        from transformers import AutoConfig

        model_dir = Path(args[args.index("--model.init_args.model_name_or_path") + 1])
        assert model_dir == runs / "sst2" / "alone-h16-a2-f32-l0.2-s43" / "model"
        config = AutoConfig.from_pretrained(model_dir)
        assert (config.hidden_size, config.num_hidden_layers, config.intermediate_size) == (16, 2, 32)
        assert not [k for k in load_file(model_dir / "model.safetensors") if k.startswith("classifier.")]
    if cmd == "student":
        assert args[args.index("--model.init_args.teacher_path") + 1] == str(runs / "sst2" / "fft" / "export")
    # What LightningCLI resolves from exactly these arguments (nothing is trained: --print_config exits).
    out = subprocess.run([sys.executable, "train.py", "fit", *args, "--print_config"], cwd=ROOT,
                         capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1", "PATH": ""}, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "\nseed_everything: 43\n" in "\n" + out.stdout


def write_run(run: Path, seed: int, rows: list[dict], selected: list[dict] | None = None, wall_s: float = 60.0,
              train_samples: int = 8000) -> None:
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(f"seed_everything: {seed}\ndata:\n  max_train_samples: {train_samples}\n")
    (run / "palette_final.json").write_text(json.dumps(rows))
    (run / "palette.json").write_text(json.dumps(selected or rows))
    (run / "wall_time.json").write_text(json.dumps({"seconds": wall_s, "threads": 1}))


def rows(scores: dict[str, float], steps: dict[str, int]) -> list[dict]:
    return [{"name": n, "role": "maxnet" if i == 0 else "", "params": 100 // (i + 1), "score": v, "trained_steps": steps[n],
             "metrics": {}} for i, (n, v) in enumerate(scores.items())]


MAX, SMALL = "h32-a4-f64-l4", "h16-a2-f32-l0.2"


def use_tmp_runs(monkeypatch, tmp_path) -> Path:
    """Run folders and records under tmp_path (records relative to the repository root, as in the benchmark)."""
    import mlfs_palette

    runs = tmp_path / "runs"
    monkeypatch.setattr(mlfs_palette, "RUNS", runs)
    monkeypatch.setattr(mlfs_palette, "RECORDS", tmp_path / "records")
    return runs


def test_matched_budget_trains_the_steps_mlfs_gave_the_slice(monkeypatch, tmp_path, tiny_bert_dir):
    import mlfs_palette

    runs = use_tmp_runs(monkeypatch, tmp_path)
    # The step counts come from the MLFS run's record, which outlives its run folder.
    assert mlfs_palette.main(["alone", "--task", "sst2", "--seed", "43", "--member", SMALL, "--pretrained", str(tiny_bert_dir),
                              "--matched-to", "paper"]) == 2
    write_run(runs / "sst2" / "paper-s43" / "version_0", 43, rows({MAX: 0.8, SMALL: 0.7}, {MAX: 300, SMALL: 130}))
    assert mlfs_palette.main(["record", "--task", "sst2"]) == 0
    shutil.rmtree(runs / "sst2" / "paper-s43")
    captured = []
    monkeypatch.setattr(mlfs_palette, "run_fit", lambda args, *where: captured.append(args))
    # 8000 rows in batches of 64 (the SST-2 schedule): 125 per epoch, so 130 steps are 2 epochs of 65 batches.
    assert mlfs_palette.main(["alone", "--task", "sst2", "--seed", "43", "--train-samples", "8000", "--member", SMALL,
                              "--pretrained", str(tiny_bert_dir), "--matched-to", "paper"]) == 0
    args = captured[0]
    assert args[args.index("--trainer.limit_train_batches") + 1] == "65" and args[args.index("--trainer.max_epochs") + 1] == "2"
    assert args[args.index("--trainer.logger.init_args.name") + 1] == f"alone-matched-paper-{SMALL}-s43"
    # The maxnet trains every step: its matched run is the full-budget one, said in one line.
    assert mlfs_palette.main(["alone", "--task", "sst2", "--seed", "43", "--member", MAX, "--pretrained", str(tiny_bert_dir),
                              "--matched-to", "paper"]) == 2


def test_decide_pairs_by_seed_with_t_intervals(monkeypatch, tmp_path):
    import mlfs_palette

    runs = use_tmp_runs(monkeypatch, tmp_path)
    mlfs = {42: (0.80, 0.70), 43: (0.82, 0.74), 44: (0.81, 0.69)}
    alone = {42: (0.81, 0.71), 43: (0.82, 0.71), 44: (0.83, 0.72)}
    for seed, (mx, sm) in mlfs.items():
        write_run(runs / "sst2" / mlfs_palette.seeded("paper", seed) / "version_0", seed, rows({MAX: mx, SMALL: sm}, {MAX: 300, SMALL: 100}),
                  wall_s=600.0)
        for name, score in zip((MAX, SMALL), alone[seed]):
            write_run(runs / "sst2" / mlfs_palette.seeded(f"alone-{name}", seed) / "version_0", seed,
                      rows({"max": score}, {"max": 300}), wall_s=400.0)
        write_run(runs / "sst2" / mlfs_palette.seeded(f"alone-matched-paper-{SMALL}", seed) / "version_0", seed,
                  rows({"max": 0.6}, {"max": 100}), wall_s=100.0)
        # Variants: one whose sampler gave the small member the same steps (paper's matched runs are its baseline too),
        # one that gave it more (no matched run of its own: no baseline).
        for name, steps in (("same", 100), ("more", 200)):
            write_run(runs / "sst2" / mlfs_palette.seeded(name, seed) / "version_0", seed, rows({MAX: mx, SMALL: sm}, {MAX: 300, SMALL: steps}))
    # A run of other training rows is recorded but refused by a decision over 8000 rows.
    write_run(runs / "sst2" / "fft" / "version_0", 42, [], train_samples=640)
    (runs / "sst2" / "fft" / "version_0" / "results.json").write_text(json.dumps({"test": {"score": 0.9}}))
    assert mlfs_palette.main(["record", "--task", "sst2"]) == 0
    assert mlfs_palette.main(["record", "--task", "mrpc"]) == 2  # no run folder of that task: one line, not silence
    matched = json.loads((tmp_path / "records" / "sst2" / "alone-matched-paper-h16-a2-f32-l0.2-s44.json").read_text())
    assert (matched["member"], matched["matched_to"]) == (SMALL, "paper")
    out = tmp_path / "results" / "mlfs_decision_sst2"
    decide = ["decide", "--task", "sst2", "--runs", "paper", "--seeds", "42", "43", "44", "--train-samples", "8000", "--out", str(out)]
    assert mlfs_palette.main(decide) == 2 and not out.with_suffix(".md").exists()
    (tmp_path / "records" / "sst2" / "fft.json").unlink()
    shutil.rmtree(runs)  # the decision is made from the records alone
    assert mlfs_palette.main(decide) == 0
    record = json.loads(out.with_suffix(".json").read_text())
    md = out.with_suffix(".md").read_text()
    assert md == mlfs_palette.render_decision(record)
    # The smallest member, MLFS end − alone end per seed: -0.01, +0.03, -0.03: mean -0.0033, sd 0.0306, t(2) = 4.303.
    diffs = [-0.01, 0.03, -0.03]
    mean = sum(diffs) / 3
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 2)
    half = 4.303 * sd / math.sqrt(3)
    assert f"{100 * mean:+.1f} [{100 * (mean - half):+.1f}, {100 * (mean + half):+.1f}]" in md.split(SMALL)[1].splitlines()[0]
    assert "| 71.0 ± 2.6 (3) |" in md  # MLFS end of the small member: mean 0.71, sd 0.0265
    # The targets: the maxnet's interval (-0.01, 0, -0.02: [-3.5, +1.5]) reaches below -1; the small member beats its matched
    # run; on average it is below its full-budget run; 600 s against 400 + 400 s.
    assert "missed (interval reaches below −1)" in md
    assert "Every member not below its matched-budget alone run (end; the interval excludes worse): 1 of 1." in md
    assert "mean difference -0.3 points, missed." in md
    assert "0.75× the wall time, met." in md
    variants = decide[:4] + ["paper", "same", "more"] + decide[5:]
    assert mlfs_palette.main(variants) == 0
    md = out.with_suffix(".md").read_text()
    small_row = {name: md.split(f"## MLFS `{name}`")[1].split(f"| {SMALL} |")[1].splitlines()[0] for name in ("same", "more")}
    assert "| 60.0 ± 0.0 (3) | +11.0 [" in small_row["same"] and small_row["more"].endswith("| – | – | 200 / – |")


@pytest.mark.parametrize("decision", sorted((ROOT / "benchmarks/results/mlfs_palette").glob("mlfs_decision_*.json")), ids=lambda p: p.stem)
def test_committed_decision_is_rebuilt_from_its_records(decision, tmp_path):
    """Every committed decision is what `decide` makes of the committed run records (no run folder needed)."""
    import mlfs_palette

    data = json.loads(decision.read_text())
    out = tmp_path / decision.stem
    args = ["decide", "--task", data["task"], "--runs", data["recipe"], *data["variants"], "--seeds", *map(str, data["seeds"]),
            "--train-samples", str(data["train_samples"]), "--held-out-rows", str(data["held_out_rows"]), "--out", str(out)]
    if data["latency"]:
        args += ["--latency", data["latency"]["file"]]
    assert mlfs_palette.main(args) == 0
    assert json.loads(out.with_suffix(".json").read_text()) == data
