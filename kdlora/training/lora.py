"""LoRA: the target registry per model family, checking and applying adapters, counting and unwrapping.

Knows nothing of Lightning: these functions take and return plain `transformers`/`peft` objects."""

from __future__ import annotations

import logging
from typing import Optional, Sequence

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import PreTrainedModel

from kdlora.elastic.families import FAMILIES
from kdlora.training.heads import check_head, classifier_head_modules, final_classifier_modules
from kdlora.training.loading import model_family

log = logging.getLogger(__name__)


# Attention query/value projections per `config.model_type`: the KD-LoRA paper's LoRA targets,
# read from the family registry (which also names each family's other projections).
LORA_TARGETS: dict[str, list[str]] = {name: list(f.default_lora_targets) for name, f in FAMILIES.items()}


def lora_targets_for(model_type: str, override: Optional[Sequence[str]] = None) -> list[str]:
    """LoRA target module names: the override if given, else the family's query/value projections."""
    if override:
        return list(override)
    if model_type not in LORA_TARGETS:
        raise ValueError(
            f"no default LoRA targets for model family {model_type!r} (known: {', '.join(sorted(LORA_TARGETS))}); "
            "set lora.targets explicitly, e.g. lora: {targets: [query, value]}"
        )
    return list(LORA_TARGETS[model_type])


def check_lora_targets(model: torch.nn.Module, targets: Sequence[str]) -> None:
    """Every LoRA target must name (as peft matches it: the full name or a dotted suffix) a module of `model`.

    peft adapts whatever matches and ignores the rest, so ``[query, bogus]`` would silently adapt only ``query``.
    """
    names = [name for name, _ in model.named_modules()]
    unknown = [t for t in targets if not any(n == t or n.endswith(f".{t}") for n in names)]
    if unknown:
        linear = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ValueError(f"unknown lora.targets {', '.join(map(repr, unknown))}: no module of this {model_family(model)} model "
                         f"has that name; its linear layers are: {', '.join(linear)}")


def apply_lora(
    model: PreTrainedModel,
    r: int = 8,
    alpha: int = 16,
    dropout: float = 0.1,
    targets: Optional[Sequence[str]] = None,
    trainable_modules: Sequence[str] = (),
    head: str = "new",
) -> PeftModel:
    """Wrap `model` with peft LoRA on the family's query/value (or `targets`) and a trainable head.

    `head` ``new``: every head module (`classifier_head_modules`) and `trainable_modules` (the
    newly initialised ones, e.g. a pooler the checkpoint lacks) train. ``seq_cls``: only the final
    classifier layer (`final_classifier_modules`) trains; `trainable_modules` outside it are kept
    in the adapter (peft's ``modules_to_save``, so a saved adapter reproduces them) but stay frozen
    at their random init. (peft matches ``modules_to_save`` by name suffix: its own ``SEQ_CLS``
    task type, ``classifier``, also trains DistilBERT's ``pre_classifier`` and RoBERTa's
    ``classifier.dense``; here they are frozen.)
    """
    if r <= 0:
        raise ValueError(f"LoRA rank must be positive, got {r}")
    check_head(head)
    if head == "seq_cls":
        final = final_classifier_modules(model)
        if not final:
            raise ValueError(f"head: seq_cls trains the final classifier layer (in a classifier or score module), but "
                             f"this {model_family(model)} model has none; use head: new")
        frozen_new = sorted(set(trainable_modules) - set(final))
        if frozen_new:
            log.warning("head: seq_cls leaves the newly initialised %s frozen at their random init", ", ".join(frozen_new))
        modules_to_save = sorted(set(final) | set(trainable_modules))
    else:
        modules_to_save = sorted(set(classifier_head_modules(model)) | set(trainable_modules))
    target_modules = lora_targets_for(model_family(model), targets)
    check_lora_targets(model, target_modules)
    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout,
        target_modules=target_modules,
        modules_to_save=modules_to_save,
    )
    peft_model = get_peft_model(model, config)
    if head == "seq_cls":
        # peft trains every module whose name ends with a modules_to_save entry ("pre_classifier"
        # ends with "classifier"): train exactly the final layer's copy.
        from peft.utils import ModulesToSaveWrapper

        inner = peft_model.get_base_model()
        for name, module in inner.named_modules():
            if isinstance(module, ModulesToSaveWrapper):
                module.modules_to_save.requires_grad_(name in final)
    return peft_model


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(total, trainable) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


def plain_model(model: torch.nn.Module) -> PreTrainedModel:
    """A plain `transformers` model: LoRA merged into the base weights if `model` is a peft model."""
    if isinstance(model, PeftModel):
        return model.merge_and_unload()
    return model
