"""KDLoRAStudent: a smaller same-family student trains LoRA adapters + head, distilling a frozen teacher."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Literal, Optional

import torch
from torch import nn

from kdlora.data.tasks import TaskSpec
from kdlora.data.tokenizer import load_tokenizer
from kdlora.kd.student_init import copy_head_from_teacher, layer_dropped_copy
from kdlora.losses import check_weight, distillation_loss, feature_loss, orthonormal_projection, renamed_argument
from kdlora.training.checkpoint import current_class_path, read_checkpoint
from kdlora.training.args import ExportArgs, OptimizerArgs
from kdlora.training.heads import check_head, head_parameter_names, new_weight_modules
from kdlora.training.loading import check_tokenizer_fits, load_classifier
from kdlora.training.lora import apply_lora
from kdlora.training.module import GLUEModule

CACHE_FORMAT = 1


# ----------------------------------------------------------------------------------------------
# Teacher loading and checks
# ----------------------------------------------------------------------------------------------


def load_teacher(teacher_path: str, spec: TaskSpec) -> tuple[nn.Module, str]:
    """(frozen eval-mode plain HF model, its tokenizer source) from an export dir or a Teacher `.ckpt`."""
    path = Path(teacher_path)
    if path.is_file():
        from kdlora.kd.teacher import Teacher

        hparams = read_checkpoint(path, Teacher, spec.name).get("hyper_parameters") or {}
        teacher = Teacher.load_from_checkpoint(str(path), map_location="cpu", export=False,
                                               **current_class_path(hparams, Teacher))
        model, tokenizer_source = teacher.merged_model(), teacher.hparams.model_name_or_path
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"teacher_path {teacher_path} has no config.json: expected an exported Teacher directory")
        from transformers import AutoModelForSequenceClassification

        model, tokenizer_source = AutoModelForSequenceClassification.from_pretrained(str(path)), str(path)
    else:
        raise FileNotFoundError(f"teacher_path {teacher_path!r} is neither an exported Teacher directory nor a Teacher .ckpt")
    if model.config.num_labels != spec.num_labels:
        raise ValueError(f"teacher {teacher_path} has {model.config.num_labels} outputs but task {spec.name!r} needs {spec.num_labels}")
    model.requires_grad_(False)
    return model.eval(), tokenizer_source


def check_same_vocabulary(student_tokenizer, teacher_tokenizer, student_name: str, teacher_name: str) -> None:
    """KD compares outputs on the same token ids: teacher and student must share one vocabulary."""
    s_vocab, t_vocab = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    if len(s_vocab) != len(t_vocab) or s_vocab != t_vocab:
        differing = len(set(s_vocab.items()) ^ set(t_vocab.items()))
        raise ValueError(
            f"tokenizer mismatch: student {student_name!r} ({len(s_vocab)} tokens) and teacher {teacher_name!r} "
            f"({len(t_vocab)} tokens) do not share a vocabulary ({differing} differing entries); "
            "knowledge distillation needs a same-family student with the teacher's tokenizer")


def files_signature(path: str | Path) -> list[list]:
    """Name, size and mtime of a checkpoint file or of a model directory's files (changes when weights do)."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def dataset_digest(dataset) -> str:
    """SHA-1 of a tokenized dataset's `idx` and `input_ids` (respects select/shuffle index mappings)."""
    import pyarrow.compute as pc

    h = hashlib.sha1()
    for table in dataset.with_format("arrow").iter(batch_size=8192):
        for column in ("idx", "input_ids"):
            arr = table.column(column).combine_chunks()
            if column == "input_ids":
                h.update(pc.list_value_length(arr).to_numpy(zero_copy_only=False).tobytes())
                arr = arr.flatten()
            h.update(arr.to_numpy(zero_copy_only=False).astype("int64").tobytes())
    return h.hexdigest()


def default_layer_map(student_layers: int, teacher_layers: int, kept: Optional[list[int]]) -> list[list[int]]:
    """[student, teacher] hidden-state indices (0 = embeddings): kept layers map to themselves, else uniform."""
    if kept:
        return [[i + 1, t + 1] for i, t in enumerate(kept)]
    return [[i, round(i * teacher_layers / student_layers)] for i in range(1, student_layers + 1)]


# ----------------------------------------------------------------------------------------------
# Module
# ----------------------------------------------------------------------------------------------


class KDLoRAStudent(GLUEModule):
    """KD-LoRA: a student with LoRA adapters (and a trainable head) distils a frozen fine-tuned teacher.

    Loss (w = task_weight): ``w·CE(s, y) + (1−w)·T²·KL(softmax(t/T) ‖ softmax(s/T))``; for regression
    (STS-B) ``w·MSE(s, y) + (1−w)·MSE(s, t)``; plus ``β·Σ_k mean_tokens ‖U_s·h_s − U_t·h_t‖²`` with
    feature distillation (MLFS, Algorithm 2; `kdlora.losses.feature_loss`).

    Args:
        model_name_or_path: the student (hub id or local dir, e.g. ``distilbert-base-uncased``). With
            `student_layers` it only names the tokenizer, which must be the teacher's.
        teacher_path: an exported Teacher directory or a Teacher ``.ckpt`` (then merged).
        task: GLUE task (linked from the data module by the CLI).
        student_layers: build the student from the teacher by keeping these teacher layers (0-based,
            e.g. ``[0, 2, 4, 6, 8, 10]``), DistilBERT-style, instead of loading `model_name_or_path`.
        lora_r, lora_alpha, lora_dropout, lora_targets: LoRA on the student (default: family query/value).
        head: which head modules train beside the adapters. ``new``: the whole head and every newly
            initialised weight (e.g. DistilBERT's ``pre_classifier``, a pooler the checkpoint lacks).
            ``seq_cls``: only the final classifier layer, as the report's "adapters + final
            classifier" count assumes (BERT, DistilBERT, DeBERTa ``classifier``; RoBERTa
            ``classifier.out_proj``); newly initialised non-final layers (DistilBERT's ``pre_classifier``,
            a missing pooler) then stay frozen at their random init, loaded ones
            (or, with `student_layers`, the teacher's) at their loaded values.
        head_init: ``new`` (the student checkpoint's head; weights it lacks, e.g. the classifier and a
            pooler, newly initialised) or ``teacher``: the student's pooler and classifier start as copies
            of the fine-tuned teacher's (same name and shape; DistilBERT's ``pre_classifier`` from BERT's
            pooler), which `head` then trains or freezes as usual.
        task_weight: weight of the task loss; ``1 − task_weight`` weighs the distillation term (paper: 0.5).
        temperature: softmax temperature of the KD term (classification).
        teacher_targets: ``online`` (teacher runs on every batch) or ``cached`` (teacher logits computed
            once over the training set, keyed by example ``idx``, reused across epochs and reruns).
        teacher_cache_dir: where cached targets live; default ``<runs>/<name>/teacher_targets`` beside the run dirs
            (without a run directory, as under fast_dev_run, beside the data module's tokenized cache).
        feature_distill_beta: weight β of feature distillation (0 = off; needs online targets).
        feature_layer_map: ``[[student_hidden, teacher_hidden], ...]`` hidden-state indices (0 =
            embeddings, i = output of layer i); default maps kept layers to themselves, else uniformly.
        feature_dim: rank of the learned projections U_s, U_t (orthonormal rows, so they cannot collapse to 0).
        learning_rate, weight_decay, warmup_ratio: AdamW + linear warmup/decay (KD-LoRA uses ~5e-4).
        export, export_dir: write the best student (LoRA merged, adapter kept) at fit end.
        alpha: the old name of task_weight; setting it is an error.
    """

    def __init__(
        self,
        model_name_or_path: str = "distilbert-base-uncased",
        teacher_path: Optional[str] = None,
        task: str = "mrpc",
        student_layers: Optional[list[int]] = None,
        lora_r: int = 8,
        lora_alpha: int = 16,
        lora_dropout: float = 0.1,
        lora_targets: Optional[list[str]] = None,
        head: str = "new",
        head_init: str = "new",
        task_weight: float = 0.5,
        temperature: float = 2.0,
        teacher_targets: Literal["online", "cached"] = "online",
        teacher_cache_dir: Optional[str] = None,
        feature_distill_beta: float = 0.0,
        feature_layer_map: Optional[list[list[int]]] = None,
        feature_dim: int = 128,
        learning_rate: float = 5e-4,
        weight_decay: float = 0.01,
        warmup_ratio: float = 0.06,
        export: bool = True,
        export_dir: Optional[str] = None,
        alpha: Optional[float] = None,
    ) -> None:
        renamed_argument("alpha", "task_weight", "the weight of the task loss; distillation gets 1 − task_weight", alpha)
        super().__init__(task, OptimizerArgs(learning_rate, weight_decay, warmup_ratio), ExportArgs(export, export_dir))
        if teacher_path is None:
            raise ValueError("teacher_path is required: an exported Teacher directory or a Teacher .ckpt")
        check_weight("task_weight", task_weight)
        check_head(head)
        if head_init not in ("new", "teacher"):
            raise ValueError(f"head_init must be 'new' (the student's own or newly initialised head) or 'teacher' "
                             f"(copied from the fine-tuned teacher), got {head_init!r}")
        if head_init == "teacher" and student_layers:
            raise ValueError("head_init='teacher' with student_layers: a layer-dropped copy already has the teacher's head")
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if teacher_targets not in ("online", "cached"):
            raise ValueError(f"teacher_targets must be 'online' or 'cached', got {teacher_targets!r}")
        if feature_distill_beta < 0:
            raise ValueError(f"feature_distill_beta must be >= 0, got {feature_distill_beta}")
        if feature_distill_beta > 0 and teacher_targets == "cached":
            raise ValueError("feature distillation needs the teacher's hidden states on every batch: "
                             "use teacher_targets: online (or feature_distill_beta: 0)")
        self.save_hyperparameters(ignore=["alpha"])

        teacher, teacher_tokenizer_source = load_teacher(teacher_path, self.spec)
        # Kept outside the module tree: never in parameters() (optimizer, DDP), state_dict
        # (checkpoints) or train()/eval() switching. `_apply` below still moves it with the module.
        object.__setattr__(self, "_teacher", teacher)
        student_tokenizer = load_tokenizer(model_name_or_path, "model_name_or_path")
        teacher_tokenizer = load_tokenizer(teacher_tokenizer_source, "teacher_path" if Path(teacher_path).is_dir()
                                           else f"the model_name_or_path of teacher_path {teacher_path}")
        check_same_vocabulary(student_tokenizer, teacher_tokenizer, model_name_or_path, teacher_tokenizer_source)
        check_tokenizer_fits(teacher, teacher_tokenizer, teacher_path, teacher_tokenizer_source)

        if student_layers:
            model, new_weights = layer_dropped_copy(teacher, student_layers), []
            model.requires_grad_(True)
        else:
            model, new_weights = load_classifier(model_name_or_path, self.spec.num_labels, self.spec.is_regression)
            check_tokenizer_fits(model, student_tokenizer, model_name_or_path, model_name_or_path)
            if head_init == "teacher":
                copy_head_from_teacher(model, teacher, head_parameter_names(model))
        # Newly initialised weights (classifier, a pooler the checkpoint lacks) train with the adapters (head: new).
        model = apply_lora(model, lora_r, lora_alpha, lora_dropout, lora_targets, new_weight_modules(new_weights), head)
        self.model: nn.Module = model.train()  # transformers returns eval-mode models
        self.newly_initialised = new_weights

        self.layer_map: list[list[int]] = []
        if feature_distill_beta > 0:
            s_cfg, t_cfg = model.get_base_model().config, teacher.config
            self.layer_map = [list(map(int, p)) for p in feature_layer_map] if feature_layer_map else default_layer_map(
                s_cfg.num_hidden_layers, t_cfg.num_hidden_layers, student_layers)
            for s, t in self.layer_map:
                if not (0 <= s <= s_cfg.num_hidden_layers and 0 <= t <= t_cfg.num_hidden_layers):
                    raise ValueError(f"feature_layer_map pair {[s, t]} out of range: student hidden states 0..{s_cfg.num_hidden_layers}, "
                                     f"teacher 0..{t_cfg.num_hidden_layers}")
            self.student_projections = nn.ModuleList(orthonormal_projection(s_cfg.hidden_size, feature_dim) for _ in self.layer_map)
            self.teacher_projections = nn.ModuleList(orthonormal_projection(t_cfg.hidden_size, feature_dim) for _ in self.layer_map)
        self._cached_logits: Optional[torch.Tensor] = None  # [max_idx + 1, num_labels] on CPU
        self._cached_present: Optional[torch.Tensor] = None

    # ---- the frozen teacher ----
    @property
    def teacher(self) -> nn.Module:
        return self._teacher

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        if self.__dict__.get("_teacher") is not None:  # device/dtype moves follow the student
            self._teacher._apply(fn, *args, **kwargs)
        return self

    def train(self, mode: bool = True):
        super().train(mode)
        if self.__dict__.get("_teacher") is not None:
            self._teacher.eval()  # dropout stays off in the teacher whatever Lightning does
        return self

    @torch.no_grad()
    def _teacher_forward(self, batch: dict[str, torch.Tensor], hidden_states: bool = False):
        return self._teacher(**self.model_inputs(batch, self._teacher), output_hidden_states=hidden_states)

    def teacher_logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The teacher's logits for `batch`: from the cache by `batch["idx"]`, or by running it."""
        if self.hparams.teacher_targets == "cached":
            if self._cached_logits is None:
                raise RuntimeError("teacher targets are not cached yet: call cache_teacher_targets(dataset) "
                                   "(done automatically at fit start)")
            idx = batch["idx"].cpu()
            if int(idx.max()) >= len(self._cached_logits) or not bool(self._cached_present[idx].all()):
                missing = [int(i) for i in idx if i >= len(self._cached_present) or not self._cached_present[i]]
                raise KeyError(f"examples {missing[:5]} are not in the teacher target cache (built on another training set?)")
            return self._cached_logits[idx].to(batch["input_ids"].device)
        return self._teacher_forward(batch).logits

    # ---- cached targets ----
    def teacher_fingerprint(self, dataset, max_seq_length=None, tokenizer_name=None) -> dict:
        return {
            "format": CACHE_FORMAT,
            "teacher": str(Path(self.hparams.teacher_path).resolve()),
            "teacher_files": files_signature(self.hparams.teacher_path),
            "task": self.spec.name,
            "max_seq_length": max_seq_length,
            "tokenizer": tokenizer_name,
            "num_examples": len(dataset),
            "data": dataset_digest(dataset),
        }

    @torch.no_grad()
    def compute_teacher_logits(self, dataset, collate_fn, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
        """(idx, logits) of the teacher over `dataset` in order, on the module's device."""
        from torch.utils.data import DataLoader

        all_idx, all_logits = [], []
        device = self.device
        for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_fn):
            batch = {k: v.to(device) for k, v in batch.items()}
            all_idx.append(batch["idx"].cpu())
            all_logits.append(self._teacher_forward(batch).logits.float().cpu())
        return torch.cat(all_idx), torch.cat(all_logits)

    def cache_teacher_targets(self, dataset, collate_fn, cache_dir: str | Path, batch_size: int = 64,
                              max_seq_length=None, tokenizer_name=None, strategy=None) -> Path:
        """Load the cached teacher logits for `dataset`, computing them first if absent or stale.

        The file's name and contents carry the fingerprint (teacher files, task, data, max length),
        so a changed teacher or data set builds a new cache. With a `strategy`, rank 0 computes and
        the other ranks wait and read.
        """
        fingerprint = self.teacher_fingerprint(dataset, max_seq_length, tokenizer_name)
        key = hashlib.sha1(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]
        path = Path(cache_dir) / f"teacher-{self.spec.name}-{key}.pt"
        is_zero = strategy is None or strategy.is_global_zero
        if is_zero:
            if self._cache_valid(path, fingerprint):
                print(f"[kdlora] reusing cached teacher targets {path}")
            else:
                idx, logits = self.compute_teacher_logits(dataset, collate_fn, batch_size)
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
                torch.save({"fingerprint": fingerprint, "idx": idx, "logits": logits}, tmp)
                os.replace(tmp, path)
                print(f"[kdlora] cached teacher targets for {len(idx)} examples at {path}")
        if strategy is not None:
            strategy.barrier("kdlora-teacher-cache")
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved["fingerprint"] != fingerprint:
            raise RuntimeError(f"teacher target cache {path} does not match this run (written concurrently?)")
        idx, logits = saved["idx"].long(), saved["logits"]
        size = int(idx.max()) + 1 if len(idx) else 0
        self._cached_logits = torch.zeros(size, logits.shape[-1], dtype=logits.dtype)
        self._cached_present = torch.zeros(size, dtype=torch.bool)
        self._cached_logits[idx] = logits
        self._cached_present[idx] = True
        return path

    @staticmethod
    def _cache_valid(path: Path, fingerprint: dict) -> bool:
        if not path.is_file():
            return False
        try:
            return torch.load(path, map_location="cpu", weights_only=True)["fingerprint"] == fingerprint
        except Exception:  # a truncated or foreign file is rebuilt
            return False

    def on_fit_start(self) -> None:
        if self.hparams.teacher_targets != "cached":
            return
        dm = getattr(self.trainer, "datamodule", None)
        dataset = getattr(dm, "datasets", {}).get("train") if dm is not None else None
        if dataset is None or "idx" not in dataset.column_names:
            raise ValueError("teacher_targets: cached needs a data module with a tokenized datasets['train'] "
                             "carrying an idx column (kdlora.data.glue.GLUEDataModule)")
        from transformers import DataCollatorWithPadding

        log_dir = self.trainer.log_dir  # on every rank: a collective under DDP
        if self.hparams.teacher_cache_dir:
            cache_dir = Path(self.hparams.teacher_cache_dir)
        elif log_dir is not None and not self.trainer.fast_dev_run:
            cache_dir = Path(log_dir).parent / "teacher_targets"  # beside the run directories
        else:  # no run directory (fast_dev_run): the data module's cache, never the working directory
            cache_dir = Path(getattr(dm, "cache_dir", Path.home() / ".cache" / "kdlora" / "tokenized")).parent / "teacher_targets"
        self.cache_teacher_targets(
            dataset, DataCollatorWithPadding(dm.tokenizer, return_tensors="pt"), cache_dir,
            batch_size=getattr(dm, "eval_batch_size", 64), max_seq_length=getattr(dm, "max_seq_length", None),
            tokenizer_name=getattr(dm, "tokenizer_name", None), strategy=self.trainer.strategy)

    # ---- training ----
    def feature_loss(self, student_hidden, teacher_hidden, attention_mask: torch.Tensor) -> torch.Tensor:
        """Σ over mapped layers of `kdlora.losses.feature_loss` (‖U_s·h_s − U_t·h_t‖², mean over real tokens)."""
        loss = student_hidden[0].new_zeros((), dtype=torch.float32)
        for (s, t), u_s, u_t in zip(self.layer_map, self.student_projections, self.teacher_projections):
            loss = loss + feature_loss(u_s(student_hidden[s]), u_t(teacher_hidden[t].to(student_hidden[s].dtype)), attention_mask)
        return loss

    def training_step(self, batch, batch_idx):
        beta = self.hparams.feature_distill_beta
        out = self.model(**self.model_inputs(batch, self.model), output_hidden_states=beta > 0)
        if beta > 0:
            teacher_out = self._teacher_forward(batch, hidden_states=True)
            t_logits = teacher_out.logits
        else:
            t_logits = self.teacher_logits(batch)
        loss = distillation_loss(out.logits, t_logits, batch["labels"], self.spec.is_regression,
                                 self.hparams.task_weight, self.hparams.temperature)
        if beta > 0:
            f_loss = self.feature_loss(out.hidden_states, teacher_out.hidden_states, batch["attention_mask"])
            self.log("train/feature_loss", f_loss)
            loss = loss + beta * f_loss
        self.log("train/loss", loss, prog_bar=True)
        return loss


