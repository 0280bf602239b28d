"""Bad input and a bad environment end in one line naming the problem, a non-zero exit and nothing half-written:
a full disk under an export, a trainer setting this machine cannot run, a folder without its tokenizer files;
and `--trainer.enable_checkpointing false` trains and exports the weights at the end of fit."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedModel

from kdlora.cli import cli_main

REPO = Path(__file__).resolve().parents[1]


def _args(model_dir, glue_dir, tmp_path, *extra, model="kdlora.kd.Teacher"):
    return [
        "--model", model,
        "--model.model_name_or_path", str(model_dir),
        "--data.data_dir", str(glue_dir),
        "--data.cache_dir", str(tmp_path / "cache"),
        "--data.task", "rte",
        "--data.batch_size", "8",
        "--trainer.logger.class_path", "lightning.pytorch.loggers.TensorBoardLogger",
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
        *extra,
    ]


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert "Traceback" not in err and len(lines) >= 1, err
    assert lines[-1].startswith("kdlora: error: "), err
    assert all(not line.startswith("kdlora: error: ") for line in lines[:-1]), err
    return lines[-1]


def _without_tokenizer(model_dir: Path, out: Path) -> Path:
    """A copy of `model_dir` with its weights and config only (as a run's checkpoint folder might hold)."""
    out.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(model_dir / name, out / name)
    return out


# ---- a full disk under an export ----

# What a full disk raises inside `save_pretrained`: a plain OSError (config, tokenizer: Python's open), or
# safetensors' own error (the weights, written by its Rust writer) quoting the system's message.
def _enospc_errors():
    from safetensors import SafetensorError

    return [OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
            SafetensorError(f"Error while serializing: I/O error: {os.strerror(errno.ENOSPC)} (os error {errno.ENOSPC})")]


@pytest.fixture(params=range(2), ids=["OSError", "SafetensorError"])
def full_disk(request, monkeypatch):
    """`save_pretrained` writes part of a weights file, then fails as on a full disk."""
    error = _enospc_errors()[request.param]

    def save_pretrained(self, save_directory, *args, **kwargs):
        Path(save_directory).mkdir(parents=True, exist_ok=True)
        (Path(save_directory) / "model.safetensors").write_bytes(b"\0" * 64)
        raise error

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", save_pretrained)


@pytest.fixture(scope="module")
def supernet_checkpoint(tiny_bert_dir, tmp_path_factory) -> Path:
    import lightning

    from kdlora.mlfs.glue import SuperTransformer

    module = SuperTransformer(model_name_or_path=str(tiny_bert_dir), task="mrpc", evaluation={"measure_latency": False}, export={"enabled": False})
    path = tmp_path_factory.mktemp("supernet") / "supernet.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                "pytorch-lightning_version": lightning.__version__}, path)
    return path


def test_export_cli_onto_a_full_disk_is_one_line_and_leaves_nothing(supernet_checkpoint, tmp_path, capsys, full_disk):
    from kdlora.mlfs.export import main

    out = tmp_path / "exports" / "max"
    code = main(["--checkpoint", str(supernet_checkpoint), "--subnet", "max", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 2
    assert _one_error_line(captured.err).startswith(f"kdlora: error: no space left on device writing {out} ")
    assert captured.out == ""
    assert list((tmp_path / "exports").iterdir()) == []  # neither the export nor its temporary directory


def test_fit_end_export_onto_a_full_disk_is_one_line_and_leaves_nothing(tiny_bert_dir, small_glue_dir, tmp_path, capsys,
                                                                      full_disk):
    export = tmp_path / "exports" / "teacher"
    code = cli_main(["fit", *_args(tiny_bert_dir, small_glue_dir, tmp_path, "--model.export.dir", str(export),
                                   "--trainer.max_steps", "1", "--trainer.limit_val_batches", "1")])
    assert code == 2
    assert _one_error_line(capsys.readouterr().err).startswith(f"kdlora: error: no space left on device writing {export} ")
    assert list((tmp_path / "exports").iterdir()) == []
    assert len(list((tmp_path / "runs").rglob("last.ckpt"))) == 1  # the run's own checkpoints are kept


def _can_mount_tmpfs() -> bool:
    if shutil.which("unshare") is None or sys.platform != "linux":
        return False
    probe = subprocess.run(["unshare", "-r", "-m", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                           capture_output=True, timeout=30)
    return probe.returncode == 0


@pytest.mark.slow
def test_fit_onto_a_real_full_filesystem_leaves_no_truncated_checkpoint(tiny_bert_dir, small_glue_dir, tmp_path):
    """Runs logged onto a 300 kB tmpfs: the first checkpoint does not fit."""
    if not _can_mount_tmpfs():
        pytest.skip("cannot mount a tmpfs in a user namespace here")
    disk = tmp_path / "disk"
    disk.mkdir()
    fit = [sys.executable, str(REPO / "train.py"), "fit",
           *_args(tiny_bert_dir, small_glue_dir, tmp_path, "--trainer.logger.init_args.save_dir", str(disk / "runs"),
                  "--model.export.enabled", "false", "--trainer.max_epochs", "1")]
    script = f"mount -t tmpfs -o size=300k tmpfs {disk} && {subprocess.list2cmdline(fit)}; code=$?; find {disk} -name '*ckpt*'; exit $code"
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(["unshare", "-r", "-m", "sh", "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert _one_error_line(proc.stderr).startswith(f"kdlora: error: no space left on device writing checkpoint {disk / 'runs'}")
    assert proc.stdout.strip() == ""  # `find`: no checkpoint, whole or partial, nor a temporary one


@pytest.mark.slow
def test_export_cli_onto_a_real_full_filesystem(supernet_checkpoint, tmp_path):
    """The same on a 100 kB tmpfs (mounted in a user namespace, where the kernel allows one)."""
    if not _can_mount_tmpfs():
        pytest.skip("cannot mount a tmpfs in a user namespace here")
    disk = tmp_path / "disk"
    disk.mkdir()
    export = [sys.executable, "-m", "kdlora.mlfs.export", "--checkpoint", str(supernet_checkpoint), "--subnet", "max",
              "--out", str(disk / "max")]
    script = f"mount -t tmpfs -o size=100k tmpfs {disk} && {subprocess.list2cmdline(export)}; code=$?; ls -A {disk}; exit $code"
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(["unshare", "-r", "-m", "sh", "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert _one_error_line(proc.stderr).startswith(f"kdlora: error: no space left on device writing {disk / 'max'} ")
    assert proc.stdout.strip() == ""  # `ls -A` of the full filesystem: nothing left on it


def test_a_checkpoint_onto_a_full_disk_is_one_line_and_leaves_no_part_of_it(tiny_bert_dir, small_glue_dir, tmp_path, capsys,
                                                                            monkeypatch):
    """The disk fills while a checkpoint is written: its first half lands, then the write fails."""
    write_bytes = Path.write_bytes

    def half_then_full(self, data):
        if ".ckpt" in self.name:
            write_bytes(self, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return write_bytes(self, data)

    monkeypatch.setattr(Path, "write_bytes", half_then_full)
    code = cli_main(["fit", *_args(tiny_bert_dir, small_glue_dir, tmp_path, "--model.export.enabled", "false",
                                   "--trainer.max_epochs", "1", "--trainer.limit_val_batches", "1")])
    line = _one_error_line(capsys.readouterr().err)
    assert code == 2
    assert line.startswith("kdlora: error: no space left on device writing checkpoint ") and "best-0-" in line, line
    checkpoints = next((tmp_path / "runs").rglob("checkpoints"))
    assert list(checkpoints.iterdir()) == []


# ---- checkpointing off ----

def test_fit_without_checkpointing_trains_and_exports_the_final_weights(tiny_bert_dir, small_glue_dir, tmp_path):
    export = tmp_path / "export"
    args = _args(tiny_bert_dir, small_glue_dir, tmp_path, "--model.export.dir", str(export), "--trainer.max_steps", "2",
                 "--trainer.limit_val_batches", "1", "--trainer.enable_checkpointing", "false")
    assert cli_main(["fit", *args]) == 0
    assert list(tmp_path.rglob("*.ckpt")) == []
    assert json.loads((export / "kdlora_export.json").read_text())["weights"] == "the weights at the end of fit"
    assert (export / "model.safetensors").is_file()


# ---- a trainer setting this machine cannot run ----

@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_a_gpu_accelerator_without_a_gpu_is_one_line(tiny_bert_dir, small_glue_dir, tmp_path, capsys):
    code = cli_main(["fit", *_args(tiny_bert_dir, small_glue_dir, tmp_path, "--trainer.accelerator", "gpu")])
    line = _one_error_line(capsys.readouterr().err)
    assert code == 2
    assert "gpu" in line and "this machine has: cpu" in line, line
    assert not (tmp_path / "runs").exists()


# ---- a folder without its tokenizer files ----

def test_load_tokenizer_names_the_missing_files(tiny_bert_dir, tmp_path):
    from kdlora.data.tokenizer import load_tokenizer

    assert len(load_tokenizer(str(tiny_bert_dir))) > 100
    bare = _without_tokenizer(tiny_bert_dir, tmp_path / "bare")
    with pytest.raises(FileNotFoundError) as e:
        load_tokenizer(str(bare), "teacher_path")
    assert str(e.value).startswith(f"teacher_path {bare} has no tokenizer files (none of tokenizer.json, tokenizer_config.json, "
                                   "vocab.txt; it holds config.json, model.safetensors)")
    # Its vocabulary alone is a tokenizer (a folder of the older format).
    shutil.copy(tiny_bert_dir / "vocab.txt", bare / "vocab.txt")
    assert load_tokenizer(str(bare)).get_vocab() == load_tokenizer(str(tiny_bert_dir)).get_vocab()


@pytest.mark.parametrize("which", ["teacher_path", "model_name_or_path"])
def test_a_student_folder_without_tokenizer_files_is_named(tiny_bert_dir, small_glue_dir, tmp_path, capsys, which):
    bare = _without_tokenizer(tiny_bert_dir, tmp_path / "bare")
    teacher, student = (bare, tiny_bert_dir) if which == "teacher_path" else (tiny_bert_dir, bare)
    code = cli_main(["fit", *_args(student, small_glue_dir, tmp_path, "--model.teacher_path", str(teacher),
                                   model="kdlora.kd.KDLoRAStudent")])
    line = _one_error_line(capsys.readouterr().err)
    assert code == 2
    assert line.startswith(f"kdlora: error: {which} {bare} has no tokenizer files (none of "), line
    assert "vocabulary" not in line
    assert not (tmp_path / "runs").exists()


def test_supernet_and_data_folders_without_tokenizer_files_are_named(tiny_bert_dir, tmp_path):
    from kdlora.data.causal_lm import CausalLMDataModule
    from kdlora.data.glue import GLUEDataModule
    from kdlora.mlfs.glue import SuperTransformer

    bare = _without_tokenizer(tiny_bert_dir, tmp_path / "bare")
    with pytest.raises(FileNotFoundError, match=f"{bare} has no tokenizer files"):
        SuperTransformer(model_name_or_path=str(bare), task="rte", evaluation={"measure_latency": False}, export={"enabled": False})
    with pytest.raises(FileNotFoundError, match=f"^data.tokenizer_name {bare} has no tokenizer files"):
        GLUEDataModule("rte", str(bare)).tokenizer
    (tmp_path / "docs").mkdir()
    for i in range(4):
        (tmp_path / "docs" / f"{i}.txt").write_text(f"some text {i}\n")
    with pytest.raises(FileNotFoundError, match=f"^data.tokenizer_name {bare} has no tokenizer files"):
        CausalLMDataModule(tokenizer_name=str(bare), source=str(tmp_path / "docs")).tokenizer


# ---- inputs longer than the model's position table ----

@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert", "mpnet", "deberta-v2", "gpt2"])
def test_max_input_length_is_the_longest_input_the_model_takes(family):
    from transformers import AutoModel, GPT2Config

    from conftest import tiny_config
    from kdlora.training.loading import max_input_length

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=200, n_embd=32, n_layer=1, n_head=4, n_positions=48) if family == "gpt2" else tiny_config(family, 200)
    model = AutoModel.from_config(config).eval()
    limit = max_input_length(model)
    if family == "deberta-v2":  # relative positions only: no table to outgrow
        assert limit is None
        return
    assert limit is not None and 40 < limit <= 160
    ids = torch.randint(5, 200, (1, limit + 1))  # no padding token: every position is used
    with torch.no_grad():
        model(input_ids=ids[:, :limit])
        with pytest.raises((IndexError, RuntimeError)):
            model(input_ids=ids)


def test_a_max_seq_length_the_model_cannot_take_is_one_line(tiny_bert_dir, small_glue_dir, tmp_path, capsys):
    code = cli_main(["fit", *_args(tiny_bert_dir, small_glue_dir, tmp_path, "--data.max_seq_length", "161")])
    assert code == 2
    assert _one_error_line(capsys.readouterr().err) == (
        f"kdlora: error: data.max_seq_length 161 is longer than {tiny_bert_dir} takes (160 positions): use at most 160")
    assert not (tmp_path / "runs").exists()


def test_a_decoder_block_size_the_model_cannot_take_is_one_line(tmp_path, capsys):
    from conftest import write_tiny_bpe_tokenizer

    texts = [f"def f{i}(x):\n    return x + {i}\n" for i in range(20)]
    write_tiny_bpe_tokenizer(tmp_path / "tok", texts)
    (tmp_path / "docs").mkdir()
    for i in range(8):
        (tmp_path / "docs" / f"{i}.py").write_text("".join(texts[i:i + 10]))
    model_config = "{model_type: gpt2, vocab_size: 300, n_embd: 32, n_inner: 64, n_layer: 2, n_head: 4, n_positions: 64}"
    code = cli_main(["fit", "--model", "kdlora.mlfs.CausalLMSuperTransformer", "--model.model_config", model_config,
                     "--data.tokenizer_name", str(tmp_path / "tok"), "--data.source", str(tmp_path / "docs"),
                     "--data.cache_dir", str(tmp_path / "cache"), "--data.block_size", "65",
                     "--trainer.logger.class_path", "lightning.pytorch.loggers.TensorBoardLogger",
                     "--trainer.logger.init_args.save_dir", str(tmp_path / "runs")])
    assert code == 2
    assert _one_error_line(capsys.readouterr().err) == (
        "kdlora: error: data.block_size 65 is longer than the model takes (64 positions): use at most 64")
    assert not (tmp_path / "runs").exists()


def test_a_zero_batch_size_is_refused_before_the_run_starts(tiny_bert_dir, small_glue_dir, tmp_path, capsys):
    code = cli_main(["fit", *_args(tiny_bert_dir, small_glue_dir, tmp_path, "--data.batch_size", "0")])
    assert code == 2
    assert _one_error_line(capsys.readouterr().err) == (
        "kdlora: error: batch_size and eval_batch_size must be at least 1, got 0 and None")
    assert not (tmp_path / "runs").exists()


# ---- the export CLI ----

def test_export_cli_names_a_broken_subnet_file_a_directory_checkpoint_and_a_repeated_subnet(supernet_checkpoint, tmp_path,
                                                                                              capsys):
    from kdlora.mlfs.export import main

    (tmp_path / "broken.json").write_text('{"hidden_size": 16\n')
    out = str(tmp_path / "out")
    cases = [
        (["--checkpoint", str(supernet_checkpoint), "--subnet", str(tmp_path / "broken.json")],
         f"kdlora: error: subnet file {tmp_path / 'broken.json'} is not valid JSON: Expecting ',' delimiter"),
        (["--checkpoint", str(tmp_path), "--subnet", "max"],
         f"kdlora: error: checkpoint {tmp_path} is a directory, not a checkpoint file"),
        (["--checkpoint", str(supernet_checkpoint), "--subnet", "max", "--subnet", "h32-a4-f64-l4"],
         "kdlora: error: --subnet max and h32-a4-f64-l4 are the same subnet (h32-a4-f64-l4): give it once"),
    ]
    for args, message in cases:
        assert main([*args, "--out", out]) == 2
        assert _one_error_line(capsys.readouterr().err).startswith(message)
        assert not (tmp_path / "out").exists()


def test_write_atomic_onto_a_full_disk_names_the_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    from kdlora.io import write_atomic
    from kdlora.io import OutOfSpaceError

    target = tmp_path / "results.json"
    target.write_text("the previous results\n")
    write_text = Path.write_text

    def half_then_full(self, data, *args, **kwargs):
        write_text(self, data[: len(data) // 2], *args, **kwargs)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Path, "write_text", half_then_full)
    with pytest.raises(OutOfSpaceError) as e:
        write_atomic(target, '{"new": "results"}\n')
    assert str(e.value).startswith(f"no space left on device writing {target} ")
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]
    assert target.read_text() == "the previous results\n"
