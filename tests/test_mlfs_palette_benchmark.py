"""benchmarks/mlfs_palette.py hands train.py the run seed where LightningCLI keeps it (after every --config)."""

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
    monkeypatch.setattr(mlfs_palette, "run_fit", captured.append)
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
