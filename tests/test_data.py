"""GLUE loading: local TSV layouts vs the hub layout, labels, idx, holdout, malformed input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from datasets import Dataset, DatasetDict

import kdlora.data.glue as data_mod
from kdlora.data.glue import GLUEDataError, GLUEDataModule, read_glue_tsv
from kdlora.data.tasks import get_task

# Row counts published for the GLUE files (../shared/glue/README.md), independent of our reader.
GLUE_ROWS = {
    "cola": (8551, 1043), "sst2": (67349, 872), "mrpc": (3668, 408), "stsb": (5749, 1500),
    "rte": (2490, 277), "wnli": (635, 71),
}


@pytest.mark.parametrize("task", sorted(GLUE_ROWS))
def test_local_files_read_completely_with_valid_labels(shared_glue_dir, task):
    spec = get_task(task)
    train_rows, dev_rows = GLUE_ROWS[task]
    for file, rows in (("train.tsv", train_rows), ("dev.tsv", dev_rows)):
        cols = read_glue_tsv(shared_glue_dir / spec.dir_name / file, spec, labelled=True)
        assert len(cols["idx"]) == rows
        assert cols["idx"] == list(range(rows))
        if spec.is_regression:
            assert all(0.0 <= y <= 5.0 for y in cols["label"])
        else:
            assert set(cols["label"]) == set(range(spec.num_labels))
        assert all(isinstance(t, str) and t for t in cols[spec.text_keys[0]])


def test_qnli_dev_reads(shared_glue_dir):
    spec = get_task("qnli")
    cols = read_glue_tsv(shared_glue_dir / "QNLI" / "dev.tsv", spec, labelled=True)
    assert len(cols["idx"]) == 5463


def test_known_rows_parse_to_hub_label_ids(shared_glue_dir):
    # First data rows of the files, read by eye: RTE row 0 is not_entailment (hub id 1),
    # MRPC row 0 has Quality 1 (equivalent), CoLA row 0 is acceptable (1), STS-B row 0 scores 5.0.
    rte = read_glue_tsv(shared_glue_dir / "RTE" / "train.tsv", get_task("rte"), True)
    first_rte = (shared_glue_dir / "RTE" / "train.tsv").read_text().splitlines()[1].split("\t")
    assert rte["label"][0] == ("entailment", "not_entailment").index(first_rte[3])
    assert rte["sentence1"][0] == first_rte[1]
    mrpc = read_glue_tsv(shared_glue_dir / "MRPC" / "train.tsv", get_task("mrpc"), True)
    assert mrpc["label"][0] == 1 and mrpc["sentence1"][0].startswith("Amrozi accused his brother")
    cola = read_glue_tsv(shared_glue_dir / "CoLA" / "train.tsv", get_task("cola"), True)
    first_cola = (shared_glue_dir / "CoLA" / "train.tsv").read_text().splitlines()[0].split("\t")
    assert cola["label"][0] == int(first_cola[1]) and cola["sentence"][0] == first_cola[3]
    stsb = read_glue_tsv(shared_glue_dir / "STS-B" / "train.tsv", get_task("stsb"), True)
    assert stsb["label"][0] == pytest.approx(5.0)


# --- local layout vs hub layout -----------------------------------------------------------------
# The same examples written once in each task's GLUE TSV layout and once as the hub's columns.
HUB_ROWS = {
    "cola": [{"sentence": "the company said it.", "label": 1}, {"sentence": "it said the the.", "label": 0},
             {"sentence": "they have \"one\" year.", "label": 1}],
    "mrpc": [{"sentence1": "he said it was new.", "sentence2": "it was new , he said .", "label": 1},
             {"sentence1": "shares fell 2 percent", "sentence2": "the government said no", "label": 0}],
    "stsb": [{"sentence1": "a man is here", "sentence2": "a man is there", "label": 3.8},
             {"sentence1": "one two", "sentence2": "three", "label": 0.25}],
    "rte": [{"sentence1": "the company has shares.", "sentence2": "shares exist.", "label": 0},
            {"sentence1": "she was first.", "sentence2": "she was last.", "label": 1}],
    "qqp": [{"question1": "who said it?", "question2": "who said that?", "label": 1},
            {"question1": "when was it?", "question2": "what is it?", "label": 0}],
    "mnli": [{"premise": "he was there.", "hypothesis": "he was not there.", "label": 2},
             {"premise": "they have one.", "hypothesis": "they have a thing.", "label": 0},
             {"premise": "it is new.", "hypothesis": "it was bought last year.", "label": 1}],
}


def _write_local(root: Path, task: str, rows: list[dict]) -> None:
    spec = get_task(task)
    d = root / spec.dir_name
    d.mkdir(parents=True, exist_ok=True)

    def lines() -> list[str]:
        if task == "cola":  # no header: source, label, original label, sentence
            return [f"src\t{r['label']}\t\t{r['sentence']}" for r in rows]
        if task == "mrpc":
            return ["Quality\t#1 ID\t#2 ID\t#1 String\t#2 String"] + [
                f"{r['label']}\t{i}\t{i + 100}\t{r['sentence1']}\t{r['sentence2']}" for i, r in enumerate(rows)]
        if task == "stsb":
            return ["index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"] + [
                f"{i}\tmain\tf\t2012\t{i}\tnone\tnone\t{r['sentence1']}\t{r['sentence2']}\t{r['label']}" for i, r in enumerate(rows)]
        if task == "rte":
            names = ("entailment", "not_entailment")
            return ["index\tsentence1\tsentence2\tlabel"] + [
                f"{i}\t{r['sentence1']}\t{r['sentence2']}\t{names[r['label']]}" for i, r in enumerate(rows)]
        if task == "qqp":
            return ["id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate"] + [
                f"{i}\t{2 * i}\t{2 * i + 1}\t{r['question1']}\t{r['question2']}\t{r['label']}" for i, r in enumerate(rows)]
        if task == "mnli":
            names = ("entailment", "neutral", "contradiction")
            return ["index\tpromptID\tpairID\tgenre\tsentence1\tsentence2\tlabel1\tgold_label"] + [
                f"{i}\t{i}\t{i}n\tfiction\t{r['premise']}\t{r['hypothesis']}\t{names[r['label']]}\t{names[r['label']]}"
                for i, r in enumerate(rows)]
        raise AssertionError(task)

    files = ["train.tsv"] + [s.file for s in spec.validation]
    for f in files:
        (d / f).write_text("\n".join(lines()) + "\n", encoding="utf-8")


@pytest.mark.parametrize("task", sorted(HUB_ROWS))
def test_local_and_hub_sources_give_identical_batches(tmp_path, tiny_bert_dir, monkeypatch, task):
    spec = get_task(task)
    rows = HUB_ROWS[task]
    _write_local(tmp_path / "glue", task, rows)
    hub_split = Dataset.from_list([{**r, "idx": i} for i, r in enumerate(rows)])
    hub = DatasetDict({"train": hub_split, **{s.hub: hub_split for s in spec.validation}})
    monkeypatch.setattr(data_mod, "load_hub_glue", lambda name: hub)

    kwargs = dict(task=task, tokenizer_name=str(tiny_bert_dir), cache_dir=str(tmp_path / "cache"))
    local = GLUEDataModule(data_dir=str(tmp_path / "glue"), **kwargs)
    remote = GLUEDataModule(data_dir=None, **kwargs)
    for dm in (local, remote):
        dm.setup("fit")
    for split in ["train"] + [s.hub for s in spec.validation]:
        assert local.datasets[split].to_list() == remote.datasets[split].to_list(), split
    labels = local.datasets["train"]["labels"]
    assert labels == pytest.approx([r["label"] for r in rows])


def test_tokenized_local_split_is_cached(tmp_path, tiny_bert_dir):
    _write_local(tmp_path / "glue", "rte", HUB_ROWS["rte"])
    kwargs = dict(task="rte", tokenizer_name=str(tiny_bert_dir), data_dir=str(tmp_path / "glue"), cache_dir=str(tmp_path / "c"))
    GLUEDataModule(**kwargs).setup("fit")
    cached = sorted((tmp_path / "c" / "tokenized").glob("rte-*.arrow"))
    assert len(cached) == 2  # train + validation
    mtimes = [p.stat().st_mtime_ns for p in cached]
    GLUEDataModule(**kwargs).setup("fit")  # second run reuses the files
    assert [p.stat().st_mtime_ns for p in cached] == mtimes
    GLUEDataModule(**{**kwargs, "max_seq_length": 16}).setup("fit")  # a new setting gets new files
    assert len(list((tmp_path / "c" / "tokenized").glob("rte-*.arrow"))) == 4


def test_batches_keep_idx_aligned_under_shuffling(small_glue_dir, tiny_bert_dir, tmp_path):
    dm = GLUEDataModule("rte", str(tiny_bert_dir), data_dir=str(small_glue_dir), batch_size=8, max_seq_length=32,
                        cache_dir=str(tmp_path))
    dm.setup("fit")
    raw = read_glue_tsv(small_glue_dir / "RTE" / "train.tsv", get_task("rte"), True)
    tok = dm.tokenizer
    torch.manual_seed(0)
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) >= {"input_ids", "attention_mask", "labels", "idx"}
    assert batch["input_ids"].shape[1] <= 32
    # Dynamic padding: the batch is as long as its longest example, not max_seq_length.
    assert batch["attention_mask"].sum(1).max() == batch["input_ids"].shape[1]
    for row in range(batch["idx"].shape[0]):
        i = int(batch["idx"][row])
        expected = tok(raw["sentence1"][i], raw["sentence2"][i], truncation=True, max_length=32)["input_ids"]
        n = int(batch["attention_mask"][row].sum())
        assert batch["input_ids"][row, :n].tolist() == expected
        assert int(batch["labels"][row]) == raw["label"][i]


def test_holdout_is_seeded_disjoint_and_dev_goes_to_test(small_glue_dir, tiny_bert_dir, tmp_path):
    def make(seed):
        dm = GLUEDataModule("mrpc", str(tiny_bert_dir), data_dir=str(small_glue_dir), holdout_fraction=0.25,
                            seed=seed, cache_dir=str(tmp_path))
        dm.setup("fit")
        dm.setup("test")
        return dm

    a, b, c = make(1), make(1), make(2)
    held, train = set(a.datasets["holdout"]["idx"]), set(a.datasets["train"]["idx"])
    assert not held & train and len(held | train) == 64 and len(held) == 16
    assert held == set(b.datasets["holdout"]["idx"]) and held != set(c.datasets["holdout"]["idx"])
    assert a.eval_suffixes == [""]
    val_idx = torch.cat([x["idx"] for x in a.val_dataloader()]).tolist()
    test_idx = torch.cat([x["idx"] for x in a.test_dataloader()]).tolist()
    assert set(val_idx) == held and test_idx == list(range(32))


def test_mnli_has_two_validation_loaders(tmp_path, tiny_bert_dir):
    _write_local(tmp_path / "glue", "mnli", HUB_ROWS["mnli"])
    dm = GLUEDataModule("mnli", str(tiny_bert_dir), data_dir=str(tmp_path / "glue"), cache_dir=str(tmp_path / "c"))
    dm.setup("fit")
    assert len(dm.val_dataloader()) == 2 and dm.eval_suffixes == ["_m", "_mm"]
    assert get_task("mnli").metric_names() == ["accuracy_m", "accuracy_mm"]


def test_num_labels_known_after_init(tiny_bert_dir):
    assert GLUEDataModule("stsb", str(tiny_bert_dir)).num_labels == 1
    assert GLUEDataModule("mnli", str(tiny_bert_dir)).num_labels == 3
    assert GLUEDataModule("SST-2", str(tiny_bert_dir)).is_regression is False


# --- bad input ----------------------------------------------------------------------------------

def test_unknown_task_is_a_clear_error():
    with pytest.raises(ValueError, match=r"unknown GLUE task 'foo'.*rte"):
        GLUEDataModule("foo")


def test_missing_file_names_expected_path(tmp_path):
    (tmp_path / "RTE").mkdir()
    with pytest.raises(GLUEDataError, match=r"RTE/train\.tsv"):
        GLUEDataModule("rte", data_dir=str(tmp_path))


def test_malformed_rows_are_counted_skipped_or_fatal(tmp_path, caplog):
    spec = get_task("rte")
    good = [f"{i}\tthe premise {i}\tthe hypothesis\tentailment" for i in range(199)]
    path = tmp_path / "train.tsv"
    path.write_text("index\tsentence1\tsentence2\tlabel\n" + "\n".join(good[:100] + ["100\tonly two fields"] + good[100:]) + "\n")
    cols = read_glue_tsv(path, spec, True)
    assert len(cols["idx"]) == 199
    assert "1 of 200 rows malformed" in caplog.text and "line(s) [102]" in caplog.text

    bad = good[:10] + ["x\ty"] * 5 + ["10\ta\tb\tentailment"] * 5
    path.write_text("index\tsentence1\tsentence2\tlabel\n" + "\n".join(bad) + "\n")
    with pytest.raises(GLUEDataError, match=r"5 of 20 rows malformed"):
        read_glue_tsv(path, spec, True)


def test_missing_column_is_reported(tmp_path):
    path = tmp_path / "dev.tsv"
    path.write_text("index\tpremise\thypothesis\tlabel\n0\ta\tb\tentailment\n")
    with pytest.raises(GLUEDataError, match=r"missing column\(s\) \['sentence1', 'sentence2'\]"):
        read_glue_tsv(path, get_task("rte"), True)


def test_mnli_predicts_matched_mismatched_and_ax(tmp_path, tiny_bert_dir):
    _write_local(tmp_path / "glue", "mnli", HUB_ROWS["mnli"])
    header = "index\tpromptID\tpairID\tgenre\tsentence1\tsentence2\n"
    for f in ("test_matched.tsv", "test_mismatched.tsv"):
        (tmp_path / "glue" / "MNLI" / f).write_text(header + "0\t1\t1n\tfiction\the was there.\the was.\n")
    (tmp_path / "glue" / "diagnostic").mkdir()
    (tmp_path / "glue" / "diagnostic" / "diagnostic.tsv").write_text(
        "index\tsentence1\tsentence2\n0\tthe cat sat.\tno cat sat.\n1\tit is new.\tit is old.\n")
    dm = GLUEDataModule("mnli", str(tiny_bert_dir), data_dir=str(tmp_path / "glue"), cache_dir=str(tmp_path / "c"))
    dm.setup("predict")
    names = [(t.name, s.submission) for t, s in dm.predict_targets]
    assert names == [("mnli", "MNLI-m"), ("mnli", "MNLI-mm"), ("ax", "AX")]
    loaders = dm.predict_dataloader()
    assert [len(loader.dataset) for loader in loaders] == [1, 1, 2]
    assert "labels" in next(iter(loaders[2])) and next(iter(loaders[2]))["idx"].tolist() == [0, 1]
