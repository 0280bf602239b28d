"""GLUE task registry: what each task reads, predicts and is scored by.

Knows nothing of torch or models: it is plain data that the data module, the metrics and the
report all read, so a task is described in exactly one place.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Split:
    """One evaluation split: its hub name, its local TSV file and the suffix of its log names."""

    hub: str  # split name in the hub dataset, e.g. "validation_matched"
    file: str  # file name in the local GLUE directory, e.g. "dev_matched.tsv"
    suffix: str = ""  # appended to metric names, e.g. "_mm" -> val/accuracy_mm
    submission: str = ""  # GLUE submission file stem for predictions, e.g. "MNLI-mm"


@dataclass(frozen=True)
class TaskSpec:
    name: str  # our lower-case name, also the hub config name
    dir_name: str  # directory in the standard GLUE layout, e.g. "SST-2"
    text_keys: tuple[str, ...]  # hub column names of the input text(s)
    label_names: tuple[str, ...]  # hub label order; empty for regression
    metrics: tuple[str, ...]  # metric names, see kdlora.eval.metrics
    # Local TSV layout: the column holding each text key and the label column.
    local_text_columns: tuple[str, ...]
    local_label_column: str
    validation: tuple[Split, ...] = (Split("validation", "dev.tsv"),)
    test: tuple[Split, ...] = (Split("test", "test.tsv"),)
    has_header: bool = True
    # Positional column names for header-less files (CoLA train/dev).
    positional_columns: tuple[str, ...] = ()
    has_train: bool = True
    extra_predict_tasks: tuple[str, ...] = field(default=())  # e.g. MNLI also predicts AX

    @property
    def is_regression(self) -> bool:
        return not self.label_names

    @property
    def num_labels(self) -> int:
        return 1 if self.is_regression else len(self.label_names)

    @property
    def is_pair(self) -> bool:
        return len(self.text_keys) == 2

    def metric_names(self) -> list[str]:
        """Every logged metric name, e.g. ['accuracy', 'accuracy_mm'] for MNLI."""
        return [m + s.suffix for s in self.validation for m in self.metrics]


_NLI3 = ("entailment", "neutral", "contradiction")
_NLI2 = ("entailment", "not_entailment")

TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in [
        TaskSpec(
            "cola", "CoLA", ("sentence",), ("unacceptable", "acceptable"), ("mcc",),
            local_text_columns=("sentence",), local_label_column="label", has_header=False,
            positional_columns=("source", "label", "original_label", "sentence"),
            test=(Split("test", "test.tsv", submission="CoLA"),),
        ),
        TaskSpec(
            "sst2", "SST-2", ("sentence",), ("negative", "positive"), ("accuracy",),
            local_text_columns=("sentence",), local_label_column="label",
            test=(Split("test", "test.tsv", submission="SST-2"),),
        ),
        TaskSpec(
            "mrpc", "MRPC", ("sentence1", "sentence2"), ("not_equivalent", "equivalent"), ("f1", "accuracy"),
            local_text_columns=("#1 String", "#2 String"), local_label_column="Quality",
            test=(Split("test", "test.tsv", submission="MRPC"),),
        ),
        TaskSpec(
            "stsb", "STS-B", ("sentence1", "sentence2"), (), ("pearson", "spearman"),
            local_text_columns=("sentence1", "sentence2"), local_label_column="score",
            test=(Split("test", "test.tsv", submission="STS-B"),),
        ),
        TaskSpec(
            "qqp", "QQP", ("question1", "question2"), ("not_duplicate", "duplicate"), ("f1", "accuracy"),
            local_text_columns=("question1", "question2"), local_label_column="is_duplicate",
            test=(Split("test", "test.tsv", submission="QQP"),),
        ),
        TaskSpec(
            "mnli", "MNLI", ("premise", "hypothesis"), _NLI3, ("accuracy",),
            local_text_columns=("sentence1", "sentence2"), local_label_column="gold_label",
            validation=(
                Split("validation_matched", "dev_matched.tsv", "_m"),
                Split("validation_mismatched", "dev_mismatched.tsv", "_mm"),
            ),
            test=(
                Split("test_matched", "test_matched.tsv", "_m", "MNLI-m"),
                Split("test_mismatched", "test_mismatched.tsv", "_mm", "MNLI-mm"),
            ),
            extra_predict_tasks=("ax",),
        ),
        TaskSpec(
            "qnli", "QNLI", ("question", "sentence"), _NLI2, ("accuracy",),
            local_text_columns=("question", "sentence"), local_label_column="label",
            test=(Split("test", "test.tsv", submission="QNLI"),),
        ),
        TaskSpec(
            "rte", "RTE", ("sentence1", "sentence2"), _NLI2, ("accuracy",),
            local_text_columns=("sentence1", "sentence2"), local_label_column="label",
            test=(Split("test", "test.tsv", submission="RTE"),),
        ),
        TaskSpec(
            "wnli", "WNLI", ("sentence1", "sentence2"), ("not_entailment", "entailment"), ("accuracy",),
            local_text_columns=("sentence1", "sentence2"), local_label_column="label",
            test=(Split("test", "test.tsv", submission="WNLI"),),
        ),
        # The diagnostic set: test only, predicted with an MNLI model (same labels).
        TaskSpec(
            "ax", "diagnostic", ("premise", "hypothesis"), _NLI3, ("accuracy",),
            local_text_columns=("sentence1", "sentence2"), local_label_column="",
            validation=(), test=(Split("test", "diagnostic.tsv", submission="AX"),), has_train=False,
        ),
    ]
}

ALIASES = {"sst-2": "sst2", "sts-b": "stsb", "mnli-m": "mnli", "diagnostic": "ax"}


def get_task(name: str) -> TaskSpec:
    """The task spec for a name such as 'rte', 'SST-2' or 'sts-b'; a clear error otherwise."""
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key not in TASKS:
        raise ValueError(f"unknown GLUE task {name!r}; choose one of: {', '.join(TASKS)}")
    return TASKS[key]
