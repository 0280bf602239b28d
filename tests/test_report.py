"""The report: Table 1 from runs' results, Table 2 parameter counts from configs, and the CLI end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_config

from kdlora.cli import main as cli_main
from kdlora.data.tasks import get_task
from kdlora.experiments import report
from kdlora.io import update_results
from kdlora.kd.student import load_teacher


def test_lora_parameter_counts_match_a_hand_count():
    cfg = tiny_config("bert", vocab_size=200, layers=4)  # H=32, FFN=64, 4 layers, 160 positions, 2 types
    counts = report.lora_parameter_counts(cfg, ranks=(8, 16))
    h, ffn, layers, head = 32, 64, 4, 32 * 2 + 2
    embeddings = (200 + 160 + 2) * h + 2 * h
    layer = 4 * (h * h + h) + (h * ffn + ffn) + (ffn * h + h) + 2 * 2 * h
    assert counts["total"] == embeddings + layers * layer + (h * h + h) + head
    for r in (8, 16):  # query and value: A (r x H) and B (H x r) in every layer, plus the head
        assert counts[f"r{r}"] == layers * 2 * (r * h + h * r) + head


def test_shipped_configs_give_the_known_model_sizes():
    # bert-base-uncased: 109,482,240 encoder parameters (+ 1,538 for a 2-label head).
    assert report.lora_parameter_counts(report.load_config("bert-base-uncased"), ranks=(8,))["total"] == 109_482_240 + 1_538
    deberta = report.load_config("microsoft/deberta-v3-base")
    assert (deberta.model_type, deberta.vocab_size, deberta.num_hidden_layers) == ("deberta-v2", 128100, 12)
    assert report.load_config("deberta-v3-small").num_hidden_layers == 6
    with pytest.raises(FileNotFoundError, match="no config"):
        report.load_config("no-such-model-anywhere")


def _fake_run(root, name, module, task, score, finetune=None, **extra):
    hparams = {"task": task, **({"finetune": finetune} if finetune else {})}
    update_results(root / name / "results.json", {"run": {"module": module, "task": task, "hparams": hparams},
                                                  "val_best": score, **extra})


def test_table1_averages_runs_and_tasks(tmp_path):
    _fake_run(tmp_path, "a", "Teacher", "mrpc", {"accuracy": 0.8, "f1": 0.9, "score": 0.85}, "full")
    _fake_run(tmp_path, "b", "Teacher", "mrpc", {"accuracy": 0.7, "f1": 0.8, "score": 0.75}, "full")
    _fake_run(tmp_path, "c", "Teacher", "rte", {"accuracy": 0.6, "score": 0.6}, "full")
    _fake_run(tmp_path, "d", "Teacher", "rte", {"accuracy": 0.5, "score": 0.5}, "lora")
    _fake_run(tmp_path, "e", "KDLoRAStudent", "stsb", {"pearson": 0.5, "spearman": 0.7, "score": 0.6},
              parameters={"total": 10, "trainable": 4}, peak_memory={"fit": {"device": "cpu", "cpu_peak_rss_mb": 123.0}})
    t1 = report.table1(report.find_runs([tmp_path]))
    assert t1["FFT"]["mrpc"]["score"] == pytest.approx(80.0) and t1["FFT"]["mrpc"]["n"] == 2
    assert t1["FFT"]["mrpc"]["metrics"]["accuracy"] == pytest.approx(75.0)
    assert t1["FFT"]["average"] == pytest.approx((80.0 + 60.0) / 2)
    assert t1["LoRA"]["average"] == pytest.approx(50.0) and t1["KD-LoRA"]["stsb"]["score"] == pytest.approx(60.0)
    eff = report.efficiency(report.find_runs([tmp_path]))
    assert eff["KD-LoRA"]["trainable_params"] == 4 and eff["KD-LoRA"]["peak_memory_mb"] == 123.0
    md = report.render_markdown(t1, {}, eff)
    assert "| Method | MRPC | STS-B | RTE | Avg. |" in md  # GLUE's task order
    assert "| FFT | 80.0 (n=2) | – | 60.0 | 70.0 † |" in md  # no STS-B run: not comparable with a full row


def _config(path, model, data, trainer):
    path.write_text(yaml.safe_dump({"model": model, "data": data, "trainer": trainer}))
    return str(path)


def test_teacher_student_report_end_to_end_with_the_cli(tiny_bert_dir, small_glue_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the CLI logs under ./runs
    data = {"task": "mrpc", "data_dir": str(small_glue_dir), "batch_size": 16, "max_seq_length": 64,
            "cache_dir": str(tmp_path / "tok")}
    callbacks = [{"class_path": f"kdlora.training.callbacks.{c}"} for c in ("GLUEResults", "PeakMemory", "ParameterCount")]
    callbacks.append({"class_path": "kdlora.training.callbacks.InferenceLatency", "init_args": {"max_batches": 1, "warmup_batches": 1}})
    trainer = {"max_epochs": 1, "accelerator": "cpu", "enable_progress_bar": False, "callbacks": callbacks,
               "enable_model_summary": False}
    teacher = {"class_path": "kdlora.kd.Teacher",
               "init_args": {"model_name_or_path": str(tiny_bert_dir), "export": {"dir": str(tmp_path / "teacher")}}}
    # The teacher logs with the CLI's defaults only (no results callbacks): the report reads TensorBoard.
    cli_main(["fit", "--config", _config(tmp_path / "t.yaml", teacher, data, {**trainer, "callbacks": []})])
    # The teacher as a Lightning checkpoint gives the same (merged) model as its export.
    ckpt = next((tmp_path / "runs" / "kdlora" / "version_0" / "checkpoints").glob("best-*.ckpt"))
    from_ckpt, tok_source = load_teacher(str(ckpt), get_task("mrpc"))
    from_export, _ = load_teacher(str(tmp_path / "teacher"), get_task("mrpc"))
    ids = torch.randint(5, 150, (2, 10))
    torch.testing.assert_close(from_ckpt(input_ids=ids).logits, from_export(input_ids=ids).logits)
    assert tok_source == str(tiny_bert_dir)

    student = {"class_path": "kdlora.kd.KDLoRAStudent",
               "init_args": {"model_name_or_path": str(tiny_bert_dir), "teacher_path": str(ckpt),
                             "student_layers": [0, 2], "teacher_targets": {"mode": "cached"}}}
    cli_main(["fit", "--config", _config(tmp_path / "s.yaml", student, data, trainer)])
    assert list((tmp_path / "runs" / "kdlora" / "teacher_targets").glob("teacher-mrpc-*.pt"))  # beside the runs

    assert report.main(["--runs", "runs", "--out", str(tmp_path / "report.md"), "--no-default-pairs",
                        "--pair", f"tiny={tiny_bert_dir}:{tiny_bert_dir}", "--ranks", "8"]) == 0
    data = json.loads((tmp_path / "report.json").read_text())
    assert set(data["table1"]) == {"FFT", "KD-LoRA"}
    best_score = torch.load(ckpt, weights_only=False)["callbacks"]
    best_score = next(v["best_model_score"] for k, v in best_score.items() if k.startswith("ModelCheckpoint"))
    assert data["table1"]["FFT"]["mrpc"]["score"] == pytest.approx(100 * float(best_score), abs=1e-4)
    assert data["table2_efficiency"]["KD-LoRA"]["trainable_params"] < data["table2_parameters"]["tiny"]["FFT"]["r8"]
    student_hparams = yaml.safe_load((tmp_path / "runs" / "kdlora" / "version_1" / "hparams.yaml").read_text())
    assert "teacher_path" in student_hparams  # ParameterCount logs after the module's hparams, never instead
    md = (tmp_path / "report.md").read_text()
    assert "| KD-LoRA |" in md and "| tiny | KD-LoRA" in md


def test_student_fast_dev_run_via_cli(tiny_bert_dir, small_glue_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = {"class_path": "kdlora.kd.KDLoRAStudent",
             "init_args": {"model_name_or_path": str(tiny_bert_dir), "teacher_path": str(tiny_bert_dir),
                           "student_layers": [1], "teacher_targets": {"mode": "online"},
                           "distillation": {"feature_weight": 0.1}, "export": {"enabled": False}}}
    data = {"task": "sst2", "data_dir": str(small_glue_dir), "batch_size": 8, "cache_dir": str(tmp_path / "tok")}
    cli = cli_main(["fit", "--config", _config(tmp_path / "s.yaml", model, data,
                                                {"fast_dev_run": True, "accelerator": "cpu"})])
    assert cli.trainer.state.finished and cli.model.spec.name == "sst2"


def test_palette_section_sits_beside_the_teacher(tmp_path):
    _fake_run(tmp_path, "fft", "Teacher", "mrpc", {"accuracy": 0.78, "f1": 0.86, "score": 0.82}, "full",
              parameters={"total": 22_700_000, "trainable": 22_700_000})
    _fake_run(tmp_path, "fft-worse", "Teacher", "mrpc", {"accuracy": 0.5, "f1": 0.5, "score": 0.5}, "full")
    _fake_run(tmp_path, "sn", "SuperTransformer", "mrpc", {"accuracy": 0.8, "f1": 0.9, "score": 0.85})
    rows = [{"name": "h384-a12-f1536-l6", "role": "max", "params": 20_000_000, "score": 0.85,
             "metrics": {"accuracy": 0.8, "f1": 0.9}, "latency_ms": 10.0, "latency_batch_size": 1, "latency_seq_len": 128},
            {"name": "h96-a3-f384-l0.5", "role": "min", "params": 5_000_000, "score": 0.7,
             "metrics": {"accuracy": 0.6, "f1": 0.8}, "latency_ms": 2.5}]
    (tmp_path / "sn" / "palette.json").write_text(json.dumps(rows))
    items = report.palettes(report.find_runs([tmp_path]))
    assert len(items) == 1 and items[0]["teacher"]["score"] == 0.82  # the best FFT run of the task
    md = "\n".join(report.render_palettes(items))
    assert "| FFT teacher | 22.70M | – | 86.0 | 78.0 | 82.0 | – | – |" in md
    assert "| h96-a3-f384-l0.5 (min) | 5.00M | 0.25 | 80.0 | 60.0 | 70.0 | 2.50 | 0.25 |" in md
    markdown, data = report.build_report([str(tmp_path)], pairs={})
    assert "## MLFS palettes" in markdown and data["palettes"][0]["task"] == "mrpc"
    # Beside the MLFS paper (45M minnet of a 110M maxnet; accurate at 1/4 the teacher's size and 1/3 its latency):
    # the member nearest 22.7M / 4 is the 5M one: 5 / 22.7 of the teacher, 2.5 / 10 ms, 0.70 / 0.82 of its score.
    assert "| minnet params / maxnet | 0.41 (45M / 110M) | 0.25 |" in md
    assert "| member's params / teacher | 0.25 | 0.22 |" in md
    assert "| member's latency / maxnet (the teacher's shape) | 0.33 (single GPU) | 0.25 |" in md
    assert f"| 85.4 % |" in md and "nearest a quarter of the teacher's parameters, h96-a3-f384-l0.5" in md


def test_malformed_palette_file_is_named_in_the_error(tmp_path, capsys):
    _fake_run(tmp_path, "sn", "SuperTransformer", "mrpc", {"accuracy": 0.8, "f1": 0.9, "score": 0.85})
    (tmp_path / "sn" / "palette.json").write_text("{not json")
    assert report.main(["--runs", str(tmp_path), "--out", str(tmp_path / "r.md"), "--no-default-pairs"]) == 2
    assert "malformed palette file" in capsys.readouterr().err and not (tmp_path / "r.md").exists()
    (tmp_path / "sn" / "palette.json").write_text(json.dumps([{"name": "h96-a3-f384-l0.5"}]))  # no params
    with pytest.raises(ValueError, match=r"malformed palette file .*palette.json.*'params'"):
        report.palettes(report.find_runs([tmp_path]))


@pytest.mark.parametrize("content, reason", [
    ('{"run": {"module": "Teacher", "task": "mrpc"}, "val_best": {', "Expecting"),  # cut off mid-write
    ('["not", "a", "run"]', "expected a JSON object"),
])
def test_malformed_results_file_is_named_in_the_error(tmp_path, capsys, content, reason):
    _fake_run(tmp_path, "good", "Teacher", "mrpc", {"accuracy": 0.8, "f1": 0.9, "score": 0.85}, "full")
    bad = tmp_path / "bad" / "results.json"
    bad.parent.mkdir()
    bad.write_text(content)
    assert report.main(["--runs", str(tmp_path), "--out", str(tmp_path / "r.md"), "--no-default-pairs"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"kdlora.experiments.report: error: malformed results file {bad}: ") and reason in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "r.md").exists()


def test_median_of_top_k_per_cell_against_a_hand_computation(tmp_path):
    scores = [0.50, 0.90, 0.70, 0.80, 0.60, 0.40, 0.85]  # 7 runs: top 6 = .9 .85 .8 .7 .6 .5, median (.8 + .7) / 2
    for i, s in enumerate(scores):
        _fake_run(tmp_path, f"fft{i}", "Teacher", "rte", {"accuracy": s, "score": s}, "full")
    for i, s in enumerate([0.3, 0.9, 0.6]):  # 3 runs with k = 6: clipped, median of all three
        _fake_run(tmp_path, f"lora{i}", "Teacher", "rte", {"accuracy": s, "score": s}, "lora")
    runs = report.find_runs([tmp_path])
    t1 = report.table1(runs, top_k=6)
    assert t1["FFT"]["rte"]["score"] == pytest.approx(75.0) and (t1["FFT"]["rte"]["n"], t1["FFT"]["rte"]["k"]) == (7, 6)
    assert t1["LoRA"]["rte"]["score"] == pytest.approx(60.0) and (t1["LoRA"]["rte"]["n"], t1["LoRA"]["rte"]["k"]) == (3, 3)
    assert report.table1(runs, top_k=1)["FFT"]["rte"]["score"] == pytest.approx(90.0)  # the best run
    md = report.render_markdown(t1, {}, {}, top_k=6)
    assert "| FFT | 75.0 (n=7) | 75.0 |" in md
    assert "Fewer than 6 runs, so the median is over all of them (k clipped to n): LoRA / RTE (n=3)." in md
    assert "FFT / RTE" not in md.split("k clipped to n")[1].splitlines()[0]


def test_mnli_matched_and_mismatched_are_separate_columns_of_the_average(tmp_path):
    _fake_run(tmp_path, "m", "Teacher", "mnli", {"accuracy_m": 0.80, "accuracy_mm": 0.70, "score": 0.75}, "full")
    _fake_run(tmp_path, "r", "Teacher", "rte", {"accuracy": 0.60, "score": 0.60}, "full")
    t1 = report.table1(report.find_runs([tmp_path]))
    assert t1["FFT"]["average"] == pytest.approx((80.0 + 70.0 + 60.0) / 3)  # not (75 + 60) / 2
    md = report.render_markdown(t1, {}, {})
    assert "| Method | MNLI-m | MNLI-mm | RTE | Avg. |" in md and "| FFT | 80.0 | 70.0 | 60.0 | 70.0 |" in md


def test_unfinished_sweep_attempts_are_left_out(tmp_path):
    from kdlora.experiments.sweep import DONE_MARKER, POINT_FILE

    point = tmp_path / "sweep" / "lr1e-05-abc123"
    _fake_run(point, "version_0", "Teacher", "rte", {"accuracy": 0.9, "score": 0.9}, "full")  # crashed: no marker
    _fake_run(point, "version_1", "Teacher", "rte", {"accuracy": 0.6, "score": 0.6}, "full")
    (point / POINT_FILE).write_text("{}")
    (point / "version_1" / DONE_MARKER).write_text("{}")
    markdown, data = report.build_report([str(tmp_path)], pairs={})
    assert data["table1"]["FFT"]["rte"]["score"] == pytest.approx(60.0) and data["table1"]["FFT"]["rte"]["n"] == 1
    assert data["unfinished_sweep_attempts"] == [str(point / "version_0")]
    assert "1 unfinished sweep attempt(s)" in markdown


def test_paper_claims_beside_our_ratios(tmp_path):
    def eff(trainable, inference_mb, total_s):
        return {"parameters": {"total": 100, "trainable": trainable},
                "latency": {"fit": {"total_s": total_s, "batch_mean_ms": 1.0, "examples_per_s": 1.0, "device": "cpu", "num_runs": 100,
                                    "memory": {"device": "cpu", "peak_rss_mb": inference_mb}}}}
    _fake_run(tmp_path, "f", "Teacher", "cola", {"mcc": 0.60, "score": 0.60}, "full", **eff(100, 1000.0, 10.0))
    _fake_run(tmp_path, "l", "Teacher", "cola", {"mcc": 0.50, "score": 0.50}, "lora", **eff(10, 800.0, 10.0))
    _fake_run(tmp_path, "k", "KDLoRAStudent", "cola", {"mcc": 0.45, "score": 0.45}, **eff(6, 600.0, 6.0))
    _fake_run(tmp_path, "k2", "KDLoRAStudent", "rte", {"accuracy": 0.9, "score": 0.9}, **eff(6, 0.0, 60.0))  # no FFT/LoRA on RTE
    markdown, data = report.build_report([str(tmp_path)], pairs={"BERT": ("bert-base-uncased", "distilbert-base-uncased")}, ranks=(8,))
    c = data["paper_comparison"]
    assert c["score_vs_fft"]["paper"] == 0.97 and c["score_vs_lora"]["paper"] == 0.98
    assert c["score_vs_fft"]["ours"] == {"ratio": pytest.approx(0.45 / 0.60), "columns": ["CoLA"]}  # shared columns only
    assert c["score_vs_lora"]["ours"]["ratio"] == pytest.approx(0.9)
    assert c["memory_vs_lora"]["ours"]["change"] == pytest.approx(600 / 800 - 1)  # CoLA runs only: the paper's timing task
    assert c["time_vs_fft"]["ours"]["change"] == pytest.approx(-0.4) and c["time_vs_lora"]["ours"]["tasks"] == ["CoLA"]
    params = c["params_vs_lora"]["ours"]
    assert params["measured"] == pytest.approx(-0.4)
    bert = params["families"]["BERT"]  # LoRA r=8 q,v on BERT-base: 294,912; DistilBERT: 147,456; heads 1,538 and 590,592 + 1,538
    assert bert["adapters"] == pytest.approx(147_456 / 294_912 - 1)
    assert bert["adapters_and_head"] == pytest.approx((147_456 + 592_130) / (294_912 + 1_538) - 1)
    assert bert["final_classifier"] == pytest.approx((147_456 + 1_538) / (294_912 + 1_538) - 1)
    assert "| GLUE score, KD-LoRA / FFT | 97.0 % | 75.0 % (over CoLA) |" in markdown
    assert "| inference time, KD-LoRA vs LoRA | -30.0 % | -40.0 % (CoLA validation; cpu) |" in markdown
    assert "| BERT | LoRA | 8 | 294,912 | 296,450 | 296,450 |" in markdown
    assert "12 × 2 × (768·8 + 8·768) = 294,912" in markdown


def _run_of(root, name, module, task, score, model, finetune=None, **extra):
    hparams = {"task": task, "model_name_or_path": model, **({"finetune": finetune} if finetune else {})}
    update_results(root / name / "results.json", {"run": {"module": module, "task": task, "hparams": hparams},
                                                  "val_best": score, **extra})


def test_paper_tables_beside_ours_per_task(tmp_path):
    """The paper's Table 1 cells (typed here from the paper) and Table 2 rows beside ours, each row naming its
    teacher → student pair, with KD-LoRA / FFT and KD-LoRA / LoRA per row; only the columns we have runs for."""
    def eff(total_s, memory_mb):
        return {"parameters": {"total": 100_000, "trainable": 10_000},
                "latency": {"fit": {"total_s": total_s, "batch_mean_ms": 1.0, "examples_per_s": 1.0, "device": "cpu", "num_runs": 3,
                                    "memory": {"device": "cpu", "peak_rss_mb": memory_mb}}}}
    _run_of(tmp_path, "f", "Teacher", "cola", {"mcc": 0.60, "score": 0.60}, "tiny-teacher", "full", **eff(10.0, 1000.0))
    _run_of(tmp_path, "l", "Teacher", "cola", {"mcc": 0.50, "score": 0.50}, "tiny-teacher", "lora", **eff(8.0, 800.0))
    _run_of(tmp_path, "k", "KDLoRAStudent", "cola", {"mcc": 0.45, "score": 0.45}, "tiny-student", **eff(6.0, 600.0))
    _run_of(tmp_path, "s", "KDLoRAStudent", "stsb", {"pearson": 0.8, "spearman": 0.6, "score": 0.7}, "tiny-student")
    markdown, data = report.build_report([str(tmp_path)], pairs={})
    assert data["paper_table1"]["columns"] == ["CoLA", "STS-B"]  # the paper's order, only where we have runs
    lines = markdown.splitlines()
    assert "| CoLA | ours | tiny-teacher → tiny-student | 60.0 | 50.0 | 45.0 | 75.0 % | 90.0 % |" in lines
    assert "| CoLA | paper | BERT-base → DistilBERT-base | 57.7 | 56.9 | 56.3 | 97.6 % | 98.9 % |" in lines
    assert "| CoLA | paper | RoBERTa-base → DistilRoBERTa-base | 60.9 | 59.4 | 56.8 | 93.3 % | 95.6 % |" in lines
    assert "| STS-B | ours | tiny-teacher → tiny-student | – | – | 70.0 | – | – |" in lines
    assert "| STS-B | paper | DeBERTa-v3-base → DeBERTa-v3-small | 91.5 | 91.1 | 89.8 | 98.1 % | 98.6 % |" in lines
    assert not any(line.startswith("| RTE |") for line in lines)
    # Table 2: 358.3 / 1515.9 MB, 358.3 / 531.9 MB; 4.44 / 7.21 s, 4.44 / 7.19 s
    assert ("| paper | RoBERTa-base → DistilRoBERTa-base | KD-LoRA | 1.5M / 2.9M / 5.9M / 11.8M | 358.3 | 4.44 | CoLA ×100; A100 "
            "| -76.4 % / -32.6 % | -38.4 % / -38.2 % |") in lines
    assert "| ours | tiny-teacher → tiny-student | KD-LoRA | 10.0K | 600.0 (CPU RSS) | 6.00 | CoLA ×3; cpu | -40.0 % / -25.0 % | -40.0 % / -25.0 % |" in lines


def test_report_renders_again_from_its_json(tmp_path):
    """The markdown comes back from the saved JSON alone (`render`, `--from-json`), the paper's values included;
    notes go under the title."""
    _run_of(tmp_path / "runs", "f", "Teacher", "rte", {"accuracy": 0.6, "score": 0.6}, "t", "full")
    _run_of(tmp_path / "runs", "k", "KDLoRAStudent", "rte", {"accuracy": 0.5, "score": 0.5}, "s")
    out = tmp_path / "report.md"
    assert report.main(["--runs", str(tmp_path / "runs"), "--out", str(out), "--no-default-pairs"]) == 0
    markdown, saved = out.read_text(), json.loads(out.with_suffix(".json").read_text())
    assert "| RTE | paper | BERT-base → DistilBERT-base | 71.6 | 70.1 | 64.0 | 89.4 % | 91.3 % |" in markdown
    assert report.render(saved) == markdown
    del saved["paper_table1"], saved["paper_comparison"]  # recomputed from the tables and kdlora.experiments.paper
    assert report.render(saved) == markdown
    assert report.render(saved, "Read this first.").startswith("# KD-LoRA report\n\nRead this first.\n\n## Table 1")
    again = tmp_path / "again.md"
    assert report.main(["--from-json", str(out.with_suffix(".json")), "--out", str(again)]) == 0
    assert again.read_text() == markdown
    (tmp_path / "bad.json").write_text("[1]")
    assert report.main(["--from-json", str(tmp_path / "bad.json"), "--out", str(tmp_path / "bad.md")]) == 2
    assert not (tmp_path / "bad.md").exists()


def test_inference_ratios_compare_the_same_tasks(tmp_path):
    """FFT timed on CoLA and STS-B, KD-LoRA on STS-B only: the time ratio is taken on STS-B for both (not
    FFT's CoLA against KD-LoRA's STS-B); with no task in common, no ratio is drawn."""
    def eff(total_s):
        return {"latency": {"fit": {"total_s": total_s, "batch_mean_ms": 1.0, "examples_per_s": 1.0, "device": "cpu", "num_runs": 1}}}
    _fake_run(tmp_path / "a", "f1", "Teacher", "cola", {"mcc": 0.3, "score": 0.3}, "full", **eff(2.0))
    _fake_run(tmp_path / "a", "f2", "Teacher", "stsb", {"pearson": 0.8, "spearman": 0.8, "score": 0.8}, "full", **eff(10.0))
    _fake_run(tmp_path / "a", "k", "KDLoRAStudent", "stsb", {"pearson": 0.7, "spearman": 0.7, "score": 0.7}, **eff(6.0))
    _, data = report.build_report([str(tmp_path / "a")], pairs={})
    assert data["paper_comparison"]["time_vs_fft"]["ours"] == {"change": pytest.approx(-0.4), "tasks": ["STS-B"], "devices": ["cpu"]}
    _fake_run(tmp_path / "b", "f", "Teacher", "cola", {"mcc": 0.3, "score": 0.3}, "full", **eff(2.0))
    _fake_run(tmp_path / "b", "k", "KDLoRAStudent", "stsb", {"pearson": 0.7, "spearman": 0.7, "score": 0.7}, **eff(6.0))
    markdown, data = report.build_report([str(tmp_path / "b")], pairs={})
    assert "change" not in data["paper_comparison"]["time_vs_fft"]["ours"]
    assert "| inference time, KD-LoRA vs FFT | -30.0 % | – (timed on different tasks: KD-LoRA on STS-B, the baseline on CoLA) |" in markdown


def test_bad_top_k_is_one_clear_error(tmp_path, capsys):
    assert report.main(["--runs", str(tmp_path), "--out", str(tmp_path / "r.md"), "--no-default-pairs", "--top-k", "0"]) == 2
    assert "--top-k must be at least 1, got 0" in capsys.readouterr().err and not (tmp_path / "r.md").exists()


def test_split_test_ranks_by_held_out_and_reports_dev(tmp_path):
    """`--split test`: the top-k runs by held-out score (val_best), then the median of their dev scores."""
    held_out = [0.9, 0.8, 0.7, 0.6]  # ranking on held-out keeps runs 0, 1, 2 for k = 3
    dev = [0.60, 0.70, 0.50, 0.95]   # run 3 is the best on dev but is not among the top 3 held out
    for i, (h, d) in enumerate(zip(held_out, dev)):
        _fake_run(tmp_path, f"r{i}", "Teacher", "rte", {"accuracy": h, "score": h}, "full", test={"accuracy": d, "score": d})
    runs = report.find_runs([tmp_path])
    cell = report.table1(runs, split="test", top_k=3)["FFT"]["rte"]
    assert cell["score"] == pytest.approx(60.0) and cell["metrics"]["accuracy"] == pytest.approx(60.0)  # median(.6, .7, .5)
    assert report.table1(runs, split="val_best", top_k=3)["FFT"]["rte"]["score"] == pytest.approx(80.0)
    md, _ = report.build_report([str(tmp_path)], pairs={}, split="test", top_k=3)
    assert "selected on a held-out part of train" in md


def test_a_pair_naming_a_file_that_is_no_model_config_is_one_clear_error(tmp_path, capsys):
    _fake_run(tmp_path, "a", "Teacher", "rte", {"accuracy": 0.6, "score": 0.6}, "full")
    config = tmp_path / "teacher.yaml"
    config.write_text("model:\n  class_path: kdlora.kd.Teacher\n")
    assert report.main(["--runs", str(tmp_path), "--out", str(tmp_path / "r.md"), "--no-default-pairs",
                        "--pair", f"x={config}:{config}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"kdlora.experiments.report: error: {config} is not a model config (a config.json or a model directory)"
    assert not (tmp_path / "r.md").exists()


def test_an_average_over_fewer_tasks_is_marked(tmp_path):
    _fake_run(tmp_path, "a", "Teacher", "rte", {"accuracy": 0.6, "score": 0.6}, "full")
    _fake_run(tmp_path, "b", "Teacher", "mrpc", {"accuracy": 0.8, "f1": 0.8, "score": 0.8}, "full")
    _fake_run(tmp_path, "c", "KDLoRAStudent", "mrpc", {"accuracy": 0.9, "f1": 0.9, "score": 0.9})
    md = report.render_markdown(report.table1(report.find_runs([tmp_path])), {}, {})
    assert "| FFT | 80.0 | 60.0 | 70.0 |" in md and "| KD-LoRA | 90.0 | – | 90.0 † |" in md
    assert "† averaged over only the tasks" in md


def test_selection_and_artifacts_sections(tmp_path, monkeypatch, capsys):
    """The member `select` chose (budget, held-out and dev score, latency ratio) and where each artifact is,
    as paths relative to the folder the report is made from."""
    monkeypatch.chdir(tmp_path)
    runs = Path("runs")
    _fake_run(runs, "fft", "Teacher", "sst2", {"accuracy": 0.8, "score": 0.8}, "full")
    _fake_run(runs, "sn", "SuperTransformer", "sst2", {"accuracy": 0.78, "score": 0.78})
    (runs / "fft" / "export").mkdir()
    rows = [{"name": "max", "role": "max", "params": 20_000_000, "score": 0.78, "metrics": {"accuracy": 0.78}}]
    (runs / "sn" / "palette.json").write_text(json.dumps(rows))
    (runs / "sn" / "palette.png").write_bytes(b"png")
    sel = Path("sel")
    (sel / "model").mkdir(parents=True)
    (sel / "search.md").write_text("# search\n")
    (sel / "model" / "subnet.json").write_text(json.dumps({
        "name": "h256-a6-f768-l3", "parameters": 9_800_000, "dev_score": 0.755,
        "selected_by": {"budget": {"max_latency_ms": None, "max_latency_ratio": 0.5, "max_params": None},
                        "split": "holdout", "score": 0.7625, "latency_ms": 4.2, "latency_ratio": 0.42, "device": "cpu"}}))
    assert report.main(["--runs", "runs", "--selection", "sel", "--out", "report.md", "--no-default-pairs"]) == 0
    md = Path("report.md").read_text()
    # The supernet's validation score (held-out where it has a split) is its palette's, not a Table 1 row.
    data = json.loads(Path("report.json").read_text())
    assert set(data["table1"]) == {"FFT"} and "| SuperTransformer |" not in md
    assert "| h256-a6-f768-l3 | latency ratio ≤ 0.5 | 9.80M | 76.2 | 75.5 | 4.20 | 0.42 | cpu |" in md
    assert "- FFT / sst2: exported model(s): `runs/fft/export`" in md
    assert "- MLFS / sst2: palette (png): `runs/sn/palette.png`" in md
    assert "- MLFS / sst2: exported model(s)" not in md  # it exported nothing
    assert "- selection h256-a6-f768-l3: the chosen member, exported: `sel/model`" in md
    assert "- selection h256-a6-f768-l3: every candidate searched (md): `sel/search.md`" in md
    assert "Figure (score vs parameters and vs latency): `runs/sn/palette.png`" in md
    # Rendered again from its JSON alone, the report is the same.
    assert report.render(json.loads(Path("report.json").read_text())) == md
    # A folder select did not write is one clear error.
    assert report.main(["--runs", "runs", "--selection", "runs", "--out", "r2.md"]) == 2
    assert "holds no selected model" in capsys.readouterr().err and not Path("r2.md").exists()
