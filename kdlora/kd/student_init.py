"""A KD-LoRA student's initialisation from its teacher: a copy with layers dropped, and the teacher's
classification head copied in."""

from __future__ import annotations

from typing import Sequence

import torch
from peft import PeftModel
from transformers import PreTrainedModel


# A student head module whose teacher counterpart has another name: DistilBERT's pre_classifier is BERT's pooler.
_TEACHER_HEAD_NAMES = {"pre_classifier": "{base}.pooler.dense"}


@torch.no_grad()
def copy_head_from_teacher(student: PreTrainedModel, teacher: PreTrainedModel, names: Sequence[str]) -> None:
    """Initialise the student's head parameters `names` (e.g. its newly initialised pooler and classifier)
    with the fine-tuned teacher's: the same name (BERT/MiniLM pooler, RoBERTa ``classifier.dense``, DeBERTa
    ``pooler.dense``, every ``classifier``), or BERT's pooler for DistilBERT's ``pre_classifier``, of the same
    shape. A parameter without such a counterpart is a ValueError naming it (and nothing is copied)."""
    t_params = dict(teacher.named_parameters())
    s_params = dict(student.named_parameters())
    base = getattr(teacher, "base_model_prefix", "")
    sources, missing = {}, []
    for name in names:
        module, leaf = name.rsplit(".", 1)
        candidates = [name]
        if module in _TEACHER_HEAD_NAMES:
            candidates.append(f"{_TEACHER_HEAD_NAMES[module].format(base=base)}.{leaf}")
        source = next((c for c in candidates if c in t_params and t_params[c].shape == s_params[name].shape), None)
        if source is None:
            missing.append(f"{name} {tuple(s_params[name].shape)}")
            continue
        sources[name] = source
    if missing:
        raise ValueError(f"head_init='teacher': the teacher ({type(teacher).__name__}) has no weight of the same name "
                         f"and shape for {', '.join(missing)}; use head_init='new'")
    for name, source in sources.items():
        s_params[name].copy_(t_params[source])


def encoder_layers(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """(name, ModuleList) of the transformer blocks of an encoder classifier.

    BERT/RoBERTa/DeBERTa-v2/MPNet/ELECTRA keep them at ``<base>.encoder.layer``, DistilBERT at
    ``distilbert.transformer.layer``; anything else is found as the one ModuleList whose length is
    the config's number of layers.
    """
    n_layers = model.config.num_hidden_layers
    candidates = [(name, m) for name, m in model.named_modules()
                  if isinstance(m, torch.nn.ModuleList) and len(m) == n_layers and name.rsplit(".", 1)[-1] in ("layer", "layers")]
    if len(candidates) != 1:
        raise ValueError(f"cannot locate the transformer layers of {type(model).__name__} "
                         f"(found {[n for n, _ in candidates]}); layer dropping supports BERT-like encoders")
    return candidates[0]


def layer_dropped_copy(model: PreTrainedModel, keep_layers: Sequence[int]) -> PreTrainedModel:
    """A copy of `model` keeping only the transformer layers `keep_layers` (DistilBERT-style student).

    Embeddings, the kept layers (in the given order), the pooler and the classification head are
    copied with their weights; `model` is left untouched.
    """
    import copy

    if isinstance(model, PeftModel):
        raise ValueError("merge LoRA before dropping layers (kdlora.training.lora.plain_model)")
    n_layers = model.config.num_hidden_layers
    keep = [int(i) for i in keep_layers]
    if not keep:
        raise ValueError("student_layers is empty: keep at least one teacher layer")
    bad = [i for i in keep if not 0 <= i < n_layers]
    if bad or len(set(keep)) != len(keep):
        raise ValueError(f"student_layers {keep} must be distinct layer indices in [0, {n_layers - 1}] of the teacher")
    name, _ = encoder_layers(model)
    student = copy.deepcopy(model)
    parent_name, attr = name.rsplit(".", 1)
    parent = student.get_submodule(parent_name)
    layers = getattr(parent, attr)
    kept = torch.nn.ModuleList([layers[i] for i in keep])
    for new_idx, layer in enumerate(kept):
        for module in layer.modules():  # KV-cache bookkeeping in newer transformers (unused by encoders)
            if hasattr(module, "layer_idx") and isinstance(module.layer_idx, int):
                module.layer_idx = new_idx
    setattr(parent, attr, kept)
    student.config.num_hidden_layers = len(keep)  # DistilBertConfig maps this to n_layers
    return student
