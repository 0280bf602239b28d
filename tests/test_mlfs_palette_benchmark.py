"""benchmarks/mlfs_palette.py hands train.py the run seed where LightningCLI keeps it (after every --config)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))


@pytest.mark.parametrize("cmd", ["mlfs", "alone", "student"])
def test_seed_reaches_the_resolved_config(cmd, monkeypatch, tmp_path):
    import mlfs_palette

    captured = []
    monkeypatch.setattr(mlfs_palette, "run_fit", captured.append)
    monkeypatch.setattr(mlfs_palette, "export_pretrained_slice", lambda *a, **k: None)
    extra = {"mlfs": [], "alone": ["--member", "h256-a6-f768-l0.3.5"], "student": []}[cmd]
    try:
        mlfs_palette.main([cmd, "--task", "sst2", "--seed", "43", *extra])
    except (FileNotFoundError, SystemExit):
        pass
    if not captured:
        pytest.skip(f"{cmd} needs earlier runs to build its command")
    # What LightningCLI resolves from exactly these arguments (nothing is trained: --print_config exits).
    out = subprocess.run([sys.executable, "train.py", "fit", *captured[0], "--print_config"], cwd=ROOT,
                         capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1", "PATH": ""}, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "\nseed_everything: 43\n" in "\n" + out.stdout
