"""The shipped configs: every one parses, they all follow one run layout, and per family the chain
teacher -> KD-LoRA student -> MLFS supernet runs from the real files with only the pretrained
checkpoints, the data and the trainer limits overridden (tiny models, a few CPU steps)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import REPO, make_tiny_model_dir

from kdlora import cli
from kdlora.experiments import report

# configs/supernet/tasks/*.yaml are per-task overlays on a supernet config, not configs of their own;
# configs/sweeps/*.yaml are kdlora.experiments.sweep grids over the configs.
TASK_OVERLAYS = sorted((REPO / "configs" / "supernet" / "tasks").glob("*.yaml"))
SWEEPS = sorted((REPO / "configs" / "sweeps").glob("*.yaml"))
# configs/decoder/<family>-<method>.yaml are causal-LM configs (kdlora.cli.DecoderCLI): no GLUE task.
DECODER_CONFIGS = sorted((REPO / "configs" / "decoder").glob("*.yaml"))
CONFIGS = sorted(set((REPO / "configs").rglob("*.yaml")) - set(TASK_OVERLAYS) - set(SWEEPS) - set(DECODER_CONFIGS))  # GLUE configs
PAPER_FAMILIES = {"bert": "bert-base-uncased", "roberta": "roberta-base", "deberta": "microsoft/deberta-v3-base"}
METHODS = ("fft", "lora", "kdlora", "mlfs")


@pytest.fixture(scope="module")
def parse():
    """`parse(*args)`: the fit config the CLI builds from `train.py fit *args` ({task} filled), stopped
    before anything is instantiated; one CLI (and parser) for all, building it is the slow part."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cli.KDLoRACLI, "instantiate_classes", lambda self: None)
        mp.setattr(cli.KDLoRACLI, "after_instantiate_classes", lambda self: None)
        mp.setattr(cli.KDLoRACLI, "_run_subcommand", lambda self, subcommand: None)
        app = cli.main(["fit", "--config", str(CONFIGS[0])])

    def parse(*args: str):
        app.parse_arguments(app.parser, ["fit", *args])
        return app.config.fit

    return parse


def layout_of(config_file: Path) -> tuple[str, str]:
    """(family, method) a config's runs belong to: configs/teacher/bert-fft.yaml -> (bert, fft)."""
    kind, stem = config_file.parent.name, config_file.stem
    if kind == "teacher":
        return tuple(stem.split("-"))
    if kind in ("student", "supernet"):
        return stem, {"student": "kdlora", "supernet": "mlfs"}[kind]
    names = {"teacher": "fft", "student": "kdlora", "supernet": "mlfs", "fft": "fft", "lora": "lora"}
    if kind == "demo":
        return "demo", names[stem]
    assert kind == "local" and stem.startswith("minilm-"), f"{config_file}: no layout rule for it"
    return "minilm", names[stem.removeprefix("minilm-").removesuffix("-paper")]  # -paper: the paper's recipe


@pytest.mark.parametrize("config_file", DECODER_CONFIGS, ids=lambda f: f.name)
def test_every_decoder_config_parses_and_follows_the_run_layout(config_file, monkeypatch):
    """configs/decoder/<family>-<method>.yaml runs a causal-LM module under the decoder CLI: runs under
    runs/<family>/<corpus>/<method>/ with the export beside them, the checkpoint selected on the held-out
    palette loss, the tokenizer the model's, {stdlib} filled, one epoch per stage."""
    import sysconfig

    for name in ("instantiate_classes", "after_instantiate_classes", "_run_subcommand"):
        monkeypatch.setattr(cli.KDLoRACLI, name, lambda self, *a: None)
    monkeypatch.chdir(REPO)
    app = cli.main(["fit", "--config", str(config_file)])
    assert type(app) is cli.DecoderCLI
    family, method = config_file.stem.split("-", 1)
    fit = app.config.fit
    logger = fit.trainer.logger.init_args
    corpus = Path(logger.save_dir).relative_to(Path("runs") / family)
    assert len(corpus.parts) == 1 and logger.name == method
    model = fit.model.init_args
    assert model.export.dir == f"{logger.save_dir}/{method}/export"
    assert (fit.checkpoint.monitor, fit.checkpoint.mode) == ("val/palette_loss", "min")
    assert fit.data.tokenizer_name == model.model_name_or_path
    assert sum(model.stages.epochs) == fit.trainer.max_epochs
    if "{stdlib}" in yaml.safe_load(config_file.read_text())["data"]["source"]:
        assert Path(fit.data.source) == Path(sysconfig.get_paths()["stdlib"])


def test_there_are_configs_for_every_family_and_stage():
    names = {str(f.relative_to(REPO / "configs")) for f in CONFIGS}
    for family in ("bert", "roberta", "deberta"):
        assert {f"teacher/{family}-fft.yaml", f"teacher/{family}-lora.yaml", f"student/{family}.yaml",
                f"supernet/{family}.yaml"} <= names


@pytest.mark.parametrize("config_file", CONFIGS, ids=lambda f: str(f.relative_to(REPO / "configs")))
def test_every_config_parses_and_follows_the_run_layout(config_file, parse):
    """An unknown key or a bad value fails here; every path lands under runs/<family>/<task>/<method>/,
    and a student or supernet reads the teacher from runs/<family>/<task>/fft/export."""
    family, method = layout_of(config_file)
    fit = parse("--config", str(config_file), "--data.task", "STS-B")
    run = f"runs/{family}/stsb/{method}"
    logger = fit.trainer.logger.init_args
    assert (logger.save_dir, logger.name) == (f"runs/{family}/stsb", method)
    model = fit.model.init_args
    assert model.export.dir == f"{run}/export"
    teacher = f"runs/{family}/stsb/fft/export"
    if method == "kdlora":
        assert model.teacher_path == teacher
    if method == "mlfs":
        # The paper configs start from the pretrained checkpoint; the demo and local ones from their teacher.
        paper = family in PAPER_FAMILIES or config_file.stem.endswith("-paper")
        maxnet = PAPER_FAMILIES.get(family, "models/minilm") if paper else teacher
        assert (model.base, model.model_name_or_path) == ("pretrained" if paper else "finetuned", maxnet)
        assert fit.data.tokenizer_name == maxnet
    if method in ("fft", "lora", "kdlora"):  # what kdlora.experiments.report reads for Tables 1 and 2
        callbacks = {c.class_path.rpartition(".")[2]: c.init_args for c in fit.trainer.callbacks}
        assert {"GLUEResults", "ParameterCount", "PeakMemory", "InferenceLatency"} <= set(callbacks)
        if family in ("bert", "roberta", "deberta"):  # the paper's latency protocol
            assert callbacks["InferenceLatency"].num_runs == 100
    assert "{task}" not in str(fit.as_dict())


@pytest.mark.parametrize("sweep_file", SWEEPS, ids=lambda f: f.name)
def test_every_sweep_point_parses_and_gets_its_own_run_directory(sweep_file, parse, monkeypatch):
    """Each point's command (base config + overrides + its logger directory) is one the CLI accepts,
    with the override applied, under runs/[<group>/]<family>/<task>/<method>/sweep/<point id>, and no export."""
    from kdlora.experiments import sweep

    monkeypatch.chdir(REPO)
    s = sweep.load_sweep(sweep_file.relative_to(REPO))
    family, method = layout_of(REPO / s.base)
    model = s.fixed.get("model.init_args.model_name_or_path")
    if model:  # a sweep over another model of the family (the student's own FFT): runs/<that model>/...
        family = Path(model).name
    task = s.tasks[0]
    for point in s.points[:2] + s.points[-1:]:  # every point sets every key of the grid; parsing takes ~0.2 s
        command = sweep.train_command(s, task, point, version=0)
        fit = parse(*command[command.index("fit") + 1:])
        logger = fit.trainer.logger.init_args
        # runs/[<group>/]<family>/<task>/<method>/sweep: a group (e.g. runs/full/) keeps variants of a study apart
        assert logger.save_dir.startswith("runs/") and logger.save_dir.endswith(f"{family}/{task}/{method}/sweep")
        assert logger.save_dir.count("/") <= 6
        assert (logger.name, logger.version) == (sweep.point_id(point), 0)
        assert fit.model.init_args.export.enabled is False
        for key, value in point.items():
            node = fit
            for part in key.split("."):
                node = node[part]
            assert node == value, (key, node, value)


def test_the_paper_supernets_search_the_paper_space():
    """The paper configs use the `paper` preset: on the paper's base models a minnet of about 0.41 of the maxnet."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from kdlora.elastic import ElasticTransformer
    from kdlora.mlfs.search_space import SearchSpace

    for family, hub in PAPER_FAMILIES.items():
        init = yaml.safe_load((REPO / "configs" / "supernet" / f"{family}.yaml").read_text())["model"]["init_args"]
        assert (init["base"], init["model_name_or_path"], init["sampling"]["search_space"]) == ("pretrained", hub, "paper"), family
        with torch.device("meta"):
            base = AutoModelForSequenceClassification.from_config(report.load_config(hub))
        encoder = ElasticTransformer(base, 8, 16, 0.0, tuple(init["lora"]["targets"]))
        space = SearchSpace.build(encoder.max_config, init["sampling"]["search_space"], count=encoder.parameter_count)
        ratio = encoder.parameter_count(space.smallest()) / encoder.parameter_count(encoder.max_config)
        assert abs(ratio - 0.41) <= 0.03, (family, space.smallest().name, ratio)
        assert (space.num_heads, space.intermediate_sizes, space.depths) == ((12, 9, 6), (3072, 2304, 1536), (12, 9, 6)), family


PAPER_SCHEDULE = {  # task: (batch size, epochs, learning rate, gamma), from the MLFS paper
    "cola": (64, 8, 1e-3, 2.0), "sst2": (64, 3, 1e-3, 1.0), "mrpc": (64, 8, 1e-3, 2.0), "stsb": (64, 8, 1e-3, 2.0),
    "qqp": (128, 8, 1e-3, 2.0), "mnli": (128, 8, 5e-4, 2.0), "qnli": (128, 8, 5e-4, 2.0), "rte": (64, 8, 1e-3, 2.0)}


@pytest.mark.parametrize("family", sorted(PAPER_FAMILIES))
def test_the_paper_schedule_per_task_overlays_every_paper_config(family, parse):
    assert sorted(f.stem for f in TASK_OVERLAYS) == sorted(PAPER_SCHEDULE)
    for task, (batch, epochs, lr, gamma) in PAPER_SCHEDULE.items():
        fit = parse("--config", str(REPO / "configs" / "supernet" / f"{family}.yaml"),
                    "--config", str(REPO / "configs" / "supernet" / "tasks" / f"{task}.yaml"))
        model = fit.model.init_args
        assert (fit.data.task, fit.data.batch_size, fit.trainer.max_epochs) == (task, batch, epochs), task
        assert (model.optimizer.learning_rate, model.distillation.gamma, sum(model.stages.epochs)) == (lr, gamma, epochs), task
        # What the overlay does not set stays the family's: the paper's base, space and held-out selection.
        assert (model.base, model.sampling.search_space, fit.data.holdout_fraction) == ("pretrained", "paper", 0.1)
        assert model.model_name_or_path == PAPER_FAMILIES[family]
        assert fit.trainer.logger.init_args.save_dir == f"runs/{family}/{task}"


# ---- {task} placeholders ---------------------------------------------------------------------


def test_task_placeholder_is_filled_everywhere_with_the_canonical_name(parse):
    fit = parse("--config", str(REPO / "configs" / "student" / "bert.yaml"), "--data.task", "SST-2",
                 "--data.cache_dir", "cache/{task}", "--predictions.output_dir", "submission/{task}",
                 "--checkpoint.filename", "{task}-{epoch}-{val/score:.3f}")
    assert fit.model.init_args.teacher_path == "runs/bert/sst2/fft/export"
    assert fit.trainer.logger.init_args.save_dir == "runs/bert/sst2"
    assert (fit.data.cache_dir, fit.predictions.output_dir) == ("cache/sst2", "submission/sst2")
    # ModelCheckpoint fills its own {epoch} and metric fields later.
    assert fit.checkpoint.filename == "sst2-{epoch}-{val/score:.3f}"


def test_fill_task_walks_namespaces_dicts_and_lists():
    from jsonargparse import Namespace

    config = Namespace(a="x/{task}/y", b=[{"c": "{task}-{task}"}, 3, None], d=Namespace(e=r"l\.\d{1,2}\.q{2}"),
                       f=Path("{task}"))
    cli.fill_task(config, "rte")
    assert config.a == "x/rte/y" and config.b == [{"c": "rte-rte"}, 3, None]
    assert config.d.e == r"l\.\d{1,2}\.q{2}"  # regex quantifiers are not placeholders
    assert config.f == Path("{task}")  # only strings: the --config paths are files already read


@pytest.mark.parametrize("bad", ["runs/{family}/{task}", "runs/{Task}/x", "runs/{tsak}"])
def test_an_unknown_placeholder_is_one_clear_error(bad, capsys):
    code = cli.cli_main(["fit", "--config", str(REPO / "configs" / "teacher" / "bert-fft.yaml"), "--data.task", "rte",
                         "--trainer.logger.init_args.save_dir", bad])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("kdlora: error: unknown placeholder {") and "trainer.logger.init_args.save_dir" in err[0]
    assert repr(bad) in err[0] and "only {task}" in err[0]


def test_a_bad_task_is_still_one_clear_error(capsys):
    code = cli.cli_main(["fit", "--config", str(REPO / "configs" / "student" / "bert.yaml"), "--data.task", "rtee"])
    assert code == 2 and capsys.readouterr().err.strip() == (
        "kdlora: error: unknown GLUE task 'rtee'; choose one of: cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, wnli, ax")


# ---- the chain -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chain_models(tiny_model_dirs, tmp_path_factory):
    """family -> (teacher, student): tiny models sharing one vocabulary, the student smaller."""
    root = tmp_path_factory.mktemp("students")
    return {
        "bert": (tiny_model_dirs["bert"], tiny_model_dirs["distilbert"]),
        "roberta": (tiny_model_dirs["roberta"], make_tiny_model_dir(root / "roberta", "roberta", layers=2, seed=1)),
        "deberta": (tiny_model_dirs["deberta-v2"], make_tiny_model_dir(root / "deberta", "deberta-v2", layers=2, seed=1)),
    }


def fit(config: str, small_glue_dir: Path, *args: str) -> None:
    """`train.py fit` on a shipped config; only data and trainer limits change (and what `args` add)."""
    code = cli.cli_main([
        "fit", "--config", str(REPO / "configs" / config), "--data.task", "rte",
        "--data.data_dir", str(small_glue_dir), "--data.cache_dir", "cache", "--data.batch_size", "16",
        "--data.max_seq_length", "32", "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1",
        "--trainer.precision", "32", "--trainer.accelerator", "cpu", "--trainer.devices", "1",
        "--trainer.strategy", "auto", "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        *args,
    ])
    assert code == 0, f"train.py fit --config configs/{config} failed"


def saved_config(run: Path) -> dict:
    return yaml.safe_load((run / "version_0" / "config.yaml").read_text())


@pytest.mark.parametrize("family", ["bert", "roberta", "deberta"])  # ~15 s each on one CPU core
def test_teacher_student_supernet_chain_through_the_configs(family, chain_models, small_glue_dir, tmp_path, monkeypatch):
    """Nothing tells the student or the supernet where the teacher is: a broken path in a config fails."""
    monkeypatch.chdir(tmp_path)
    teacher, student = chain_models[family]
    runs = Path("runs") / family / "rte"
    fit(f"teacher/{family}-fft.yaml", small_glue_dir, "--model.init_args.model_name_or_path", str(teacher),
        "--trainer.max_epochs", "1")
    assert (runs / "fft" / "export" / "config.json").is_file()
    if family == "bert":  # the LoRA column of Tables 1 and 2
        fit(f"teacher/{family}-lora.yaml", small_glue_dir, "--model.init_args.model_name_or_path", str(teacher),
            "--trainer.max_epochs", "1")
    fit(f"student/{family}.yaml", small_glue_dir, "--model.init_args.model_name_or_path", str(student),
        "--trainer.max_epochs", "1")
    assert saved_config(runs / "kdlora")["model"]["init_args"]["teacher_path"] == str(runs / "fft" / "export")
    assert any((runs / "kdlora" / "teacher_targets").glob("teacher-rte-*.pt"))  # the teacher's logits were computed
    assert (runs / "kdlora" / "export" / "config.json").is_file()
    # From the teacher (the configs' documented `base: finetuned` override; their default is the pretrained
    # checkpoint), one batch per stage; validation on the held-out part of train, the palettes on dev.
    fit(f"supernet/{family}.yaml", small_glue_dir, "--model.init_args.base", "finetuned",
        "--model.init_args.model_name_or_path", f"runs/{family}/{{task}}/fft/export",
        "--model.init_args.stages.epochs", "[1, 1, 1]", "--trainer.max_epochs", "3")
    assert saved_config(runs / "mlfs")["model"]["init_args"]["model_name_or_path"] == str(runs / "fft" / "export")
    palette = json.loads((runs / "mlfs" / "version_0" / "palette.json").read_text())
    assert palette and all((runs / "mlfs" / "export" / row["name"] / "config.json").is_file() for row in palette)
    final = json.loads((runs / "mlfs" / "version_0" / "palette_final.json").read_text())
    assert {(r["base"], r["split"]) for r in palette + final} == {("finetuned", "dev")}
    assert {r["stage"] for r in final} == {2} and all(r["selected_on"] == "holdout" for r in palette)

    runs_found = report.find_runs(["runs"])  # what `python -m kdlora.experiments.report --runs runs` reads
    trained = ["fft", "lora", "kdlora", "mlfs"] if family == "bert" else ["fft", "kdlora", "mlfs"]
    assert sorted(Path(r["dir"]).as_posix() for r in runs_found) == sorted(f"runs/{family}/rte/{m}/version_0" for m in trained)
    scored = [r for r in runs_found if r["run"]["module"] != "SuperTransformer"]  # the supernet's table is its palette
    assert all(r["latency"]["fit"]["num_runs"] == 100 for r in scored)  # the configs' paper protocol
    methods = ["FFT", "LoRA", "KD-LoRA"] if family == "bert" else ["FFT", "KD-LoRA"]
    assert set(methods) <= set(report.table1(runs_found))
    efficiency = report.efficiency(runs_found)  # Table 2b
    for method in methods:
        assert {"trainable_params", "peak_memory_mb", "latency_batch_ms"} <= set(efficiency[method]), method
