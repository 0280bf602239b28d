"""KDLoRAStudent: a smaller same-family student trains LoRA adapters + head, distilling a frozen teacher."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from kdlora.data.tasks import TaskSpec
from kdlora.data.tokenizer import load_tokenizer
from kdlora.kd.args import DistillationArgs, TeacherTargetsArgs
from kdlora.kd.student_init import copy_head_from_teacher, layer_dropped_copy
from kdlora.kd.targets import TeacherTargets
from kdlora.losses import check_weight, distillation_loss, feature_loss, orthonormal_projection
from kdlora.training.args import ExportArgs, LoRAArgs, OptimizerArgs, as_args, nested_hparams, save_plain_hyperparameters
from kdlora.training.checkpoint import current_class_path, read_checkpoint
from kdlora.training.heads import check_head, head_parameter_names, new_weight_modules
from kdlora.training.loading import check_tokenizer_fits, load_classifier
from kdlora.training.lora import apply_lora
from kdlora.training.module import GLUEModule


# ----------------------------------------------------------------------------------------------
# Teacher loading and checks
# ----------------------------------------------------------------------------------------------


def load_teacher(teacher_path: str, spec: TaskSpec) -> tuple[nn.Module, str]:
    """(frozen eval-mode plain HF model, its tokenizer source) from an export dir or a Teacher `.ckpt`."""
    path = Path(teacher_path)
    if path.is_file():
        from kdlora.kd.teacher import Teacher

        ckpt = read_checkpoint(path, Teacher, spec.name)
        hparams = ckpt.get("hyper_parameters") or {}
        no_export = asdict(ExportArgs(enabled=False))  # plain: LightningCLI re-parses it
        grouped = nested_hparams(hparams, "Teacher")
        if grouped != hparams:  # written before the argument groups (lora_r, ...): built from them as groups
            teacher = Teacher(**{k: v for k, v in grouped.items() if not k.startswith("_")} | {"export": no_export})
            teacher.load_state_dict(ckpt["state_dict"])
        else:
            teacher = Teacher.load_from_checkpoint(str(path), map_location="cpu", export=no_export,
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
    (STS-B) ``w·MSE(s, y) + (1−w)·MSE(s, t)``; plus ``feature_weight·Σ_k mean_tokens ‖U_s·h_s − U_t·h_t‖²``
    with feature distillation (MLFS, Algorithm 2; `kdlora.losses.feature_loss`).

    Args:
        model_name_or_path: the student (hub id or local dir, e.g. ``distilbert-base-uncased``). With
            `student_layers` it only names the tokenizer, which must be the teacher's.
        teacher_path: an exported Teacher directory or a Teacher ``.ckpt`` (then merged).
        task: GLUE task (linked from the data module by the CLI).
        student_layers: build the student from the teacher by keeping these teacher layers (0-based,
            e.g. ``[0, 2, 4, 6, 8, 10]``), DistilBERT-style, instead of loading `model_name_or_path`.
        lora: LoRA on the student (`LoRAArgs`; default targets: the family's query/value projections).
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
        distillation: the objective (`DistillationArgs`: task_weight, temperature, feature_weight,
            feature_layer_map, feature_dim).
        teacher_targets: ``mode: online`` (the teacher runs on every batch) or ``cached`` (its logits
            computed once over the training set, keyed by example ``idx``, reused across epochs and reruns,
            in ``cache_dir``; `TeacherTargetsArgs`).
        optimizer: AdamW + linear warmup/decay (`OptimizerArgs`; KD-LoRA uses ~5e-4).
        export: write the best student (LoRA merged, adapter kept) at fit end (`ExportArgs`).
    """

    def __init__(
        self,
        model_name_or_path: str = "distilbert-base-uncased",
        teacher_path: Optional[str] = None,
        task: str = "mrpc",
        student_layers: Optional[list[int]] = None,
        lora: LoRAArgs = LoRAArgs(),
        head: str = "new",
        head_init: str = "new",
        distillation: DistillationArgs = DistillationArgs(),
        teacher_targets: TeacherTargetsArgs = TeacherTargetsArgs(),
        optimizer: OptimizerArgs = OptimizerArgs(learning_rate=5e-4),
        export: ExportArgs = ExportArgs(),
    ) -> None:
        super().__init__(task, optimizer, export)
        lora = as_args(LoRAArgs, lora)
        distillation, targets = as_args(DistillationArgs, distillation), as_args(TeacherTargetsArgs, teacher_targets)
        check_student_arguments(teacher_path, head, head_init, student_layers, distillation, targets)
        save_plain_hyperparameters(self, lora=lora, distillation=distillation, teacher_targets=targets,
                                   optimizer=self.optimizer_args, export=self.export_args)
        self.distillation_args = distillation

        teacher, student_tokenizer = self._load_teacher(model_name_or_path, teacher_path)
        self.teacher_targets = TeacherTargets(teacher, self._teacher_logits, teacher_path, self.spec.name, targets)
        if student_layers:
            model, new_weights = layer_dropped_copy(teacher, student_layers), []
            model.requires_grad_(True)
        else:
            model, new_weights = load_classifier(model_name_or_path, self.spec.num_labels, self.spec.is_regression)
            check_tokenizer_fits(model, student_tokenizer, model_name_or_path, model_name_or_path)
            if head_init == "teacher":
                copy_head_from_teacher(model, teacher, head_parameter_names(model))
        # Newly initialised weights (classifier, a pooler the checkpoint lacks) train with the adapters (head: new).
        model = apply_lora(model, lora.r, lora.alpha, lora.dropout, lora.targets, new_weight_modules(new_weights), head)
        self.model: nn.Module = model.train()  # transformers returns eval-mode models
        self.newly_initialised = new_weights
        self.layer_map: list[list[int]] = []
        if distillation.feature_weight > 0:
            self._init_feature_distillation(distillation, student_layers)

    def _load_teacher(self, model_name_or_path: str, teacher_path: str):
        """(the frozen teacher, kept outside the module tree; the student's tokenizer), checked to share one vocabulary."""
        teacher, teacher_tokenizer_source = load_teacher(teacher_path, self.spec)
        # Kept outside the module tree: never in parameters() (optimizer, DDP), state_dict
        # (checkpoints) or train()/eval() switching. `_apply` below still moves it with the module.
        object.__setattr__(self, "_teacher", teacher)
        student_tokenizer = load_tokenizer(model_name_or_path, "model_name_or_path")
        teacher_tokenizer = load_tokenizer(teacher_tokenizer_source, "teacher_path" if Path(teacher_path).is_dir()
                                           else f"the model_name_or_path of teacher_path {teacher_path}")
        check_same_vocabulary(student_tokenizer, teacher_tokenizer, model_name_or_path, teacher_tokenizer_source)
        check_tokenizer_fits(teacher, teacher_tokenizer, teacher_path, teacher_tokenizer_source)
        return teacher, student_tokenizer

    def _init_feature_distillation(self, distillation: DistillationArgs, student_layers: Optional[list[int]]) -> None:
        """The layer map and the learned projections U_s, U_t of feature distillation."""
        s_cfg, t_cfg = self.model.get_base_model().config, self._teacher.config
        layer_map = distillation.feature_layer_map
        self.layer_map = [list(map(int, p)) for p in layer_map] if layer_map else default_layer_map(
            s_cfg.num_hidden_layers, t_cfg.num_hidden_layers, student_layers)
        for s, t in self.layer_map:
            if not (0 <= s <= s_cfg.num_hidden_layers and 0 <= t <= t_cfg.num_hidden_layers):
                raise ValueError(f"distillation.feature_layer_map pair {[s, t]} out of range: student hidden states "
                                 f"0..{s_cfg.num_hidden_layers}, teacher 0..{t_cfg.num_hidden_layers}")
        dim = distillation.feature_dim
        self.student_projections = nn.ModuleList(orthonormal_projection(s_cfg.hidden_size, dim) for _ in self.layer_map)
        self.teacher_projections = nn.ModuleList(orthonormal_projection(t_cfg.hidden_size, dim) for _ in self.layer_map)

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

    def _teacher_logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self._teacher_forward(batch).logits

    def on_fit_start(self) -> None:
        self.teacher_targets.cache_for_fit(self.trainer)  # cached targets: computed or reused before the first step

    # ---- training ----
    def feature_loss(self, student_hidden, teacher_hidden, attention_mask: torch.Tensor) -> torch.Tensor:
        """Σ over mapped layers of `kdlora.losses.feature_loss` (‖U_s·h_s − U_t·h_t‖², mean over real tokens)."""
        loss = student_hidden[0].new_zeros((), dtype=torch.float32)
        for (s, t), u_s, u_t in zip(self.layer_map, self.student_projections, self.teacher_projections):
            loss = loss + feature_loss(u_s(student_hidden[s]), u_t(teacher_hidden[t].to(student_hidden[s].dtype)), attention_mask)
        return loss

    def training_step(self, batch, batch_idx):
        args = self.distillation_args
        features = args.feature_weight > 0
        out = self.model(**self.model_inputs(batch, self.model), output_hidden_states=features)
        if features:
            teacher_out = self._teacher_forward(batch, hidden_states=True)
            t_logits = teacher_out.logits
        else:
            t_logits = self.teacher_targets.logits(batch)
        loss = distillation_loss(out.logits, t_logits, batch["labels"], self.spec.is_regression,
                                 args.task_weight, args.temperature)
        if features:
            f_loss = self.feature_loss(out.hidden_states, teacher_out.hidden_states, batch["attention_mask"])
            self.log("train/feature_loss", f_loss)
            loss = loss + args.feature_weight * f_loss
        self.log("train/loss", loss, prog_bar=True)
        return loss


def check_student_arguments(teacher_path: Optional[str], head: str, head_init: str, student_layers: Optional[list[int]],
                            distillation: DistillationArgs, targets: TeacherTargetsArgs) -> None:
    """One clear error for an argument of `KDLoRAStudent` that cannot work."""
    if teacher_path is None:
        raise ValueError("teacher_path is required: an exported Teacher directory or a Teacher .ckpt")
    check_weight("distillation.task_weight", distillation.task_weight)
    check_head(head)
    if head_init not in ("new", "teacher"):
        raise ValueError(f"head_init must be 'new' (the student's own or newly initialised head) or 'teacher' "
                         f"(copied from the fine-tuned teacher), got {head_init!r}")
    if head_init == "teacher" and student_layers:
        raise ValueError("head_init='teacher' with student_layers: a layer-dropped copy already has the teacher's head")
    if distillation.temperature <= 0:
        raise ValueError(f"distillation.temperature must be positive, got {distillation.temperature}")
    if targets.mode not in ("online", "cached"):
        raise ValueError(f"teacher_targets.mode must be 'online' or 'cached', got {targets.mode!r}")
    if distillation.feature_weight < 0:
        raise ValueError(f"distillation.feature_weight must be >= 0, got {distillation.feature_weight}")
    if distillation.feature_weight > 0 and targets.mode == "cached":
        raise ValueError("feature distillation needs the teacher's hidden states on every batch: "
                         "use teacher_targets.mode: online (or distillation.feature_weight: 0)")
