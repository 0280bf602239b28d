"""Loading models by family, the LoRA target registry, and Hugging Face export.

Knows nothing of Lightning: these functions take and return plain `transformers`/`peft` objects.
"""

from __future__ import annotations

from typing import Optional

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, PreTrainedModel

from kdlora.training.heads import classifier_head_modules


def model_family(model_or_config) -> str:
    config = getattr(model_or_config, "config", model_or_config)
    return config.model_type


def load_classifier(
    name_or_path: str, num_labels: int, is_regression: bool = False, **config_overrides
) -> tuple[PreTrainedModel, list[str]]:
    """An `AutoModelForSequenceClassification` and the names of its newly initialised weights.

    The new weights (classifier, and e.g. a pooler the checkpoint lacks) must always be trained:
    leaving them frozen at random init is a classic KD-LoRA bug. Only those may be new: any other
    weight the checkpoint lacks or holds in another shape (a config whose vocab_size or hidden_size
    differs from the weights) is an error naming it, never a silently random embedding table.
    """
    problem_type = "regression" if is_regression else "single_label_classification"
    try:
        config = AutoConfig.from_pretrained(name_or_path, num_labels=num_labels, problem_type=problem_type, **config_overrides)
    except OSError as e:
        raise FileNotFoundError(f"cannot load model {name_or_path!r}: not a local model directory nor a reachable hub id ({e})") from None
    model, info = AutoModelForSequenceClassification.from_pretrained(
        name_or_path, config=config, output_loading_info=True, ignore_mismatched_sizes=True
    )
    missing, mismatched = set(info.get("missing_keys", ())), set(info.get("mismatched_keys", ()))
    head = set(classifier_head_modules(model))
    replaceable = lambda name: name.split(".")[0] in head or "pooler" in name.split(".")  # noqa: E731
    wrong = [f"{k} is {tuple(saved)} in the checkpoint but {tuple(wanted)} in the config"
             for k, saved, wanted in sorted(mismatched) if not replaceable(k)]
    wrong += [f"{k} is missing from the checkpoint" for k in sorted(missing) if not replaceable(k)]
    if wrong:
        raise ValueError(
            f"model {name_or_path!r}: only the classification head may start from random weights, but "
            f"{len(wrong)} other weight(s) would: {'; '.join(wrong[:4])}{'; ...' if len(wrong) > 4 else ''} "
            "(do the config's vocab_size/hidden_size/layers match the weights?)")
    new = sorted(missing | {k for k, *_ in mismatched})
    return model, new


def check_tokenizer_fits(model: PreTrainedModel, tokenizer, model_name: str, tokenizer_name: str) -> None:
    """Token ids index the model's embedding table: a tokenizer with more tokens than it has rows is an error."""
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise ValueError(f"tokenizer {tokenizer_name!r} has {len(tokenizer)} tokens but model {model_name!r} embeds only "
                         f"{rows} (its vocab_size): token ids from {rows} on would index out of range (tokenizer and weights of different models?)")


# Learned absolute position tables: BERT-like encoders' and GPT-2's.
POSITION_TABLES = ("position_embeddings", "wpe")


def max_input_length(model: torch.nn.Module) -> Optional[int]:
    """The most tokens `model` takes in one input: the rows of its learned absolute position table (a
    RoBERTa-style table starts after its padding row); None without one (relative or rotary positions)."""
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in POSITION_TABLES and isinstance(module, torch.nn.Embedding):
            return module.num_embeddings - (module.padding_idx + 1 if module.padding_idx is not None else 0)
    return None
