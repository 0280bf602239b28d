"""Loading models by family, the LoRA target registry, and Hugging Face export.

Knows nothing of Lightning: these functions take and return plain `transformers`/`peft` objects.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import secrets
import shutil
import stat
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel

from kdlora.elastic.families import FAMILIES

log = logging.getLogger(__name__)

# Attention query/value projections per `config.model_type`: the KD-LoRA paper's LoRA targets,
# read from the family registry (which also names each family's other projections).
LORA_TARGETS: dict[str, list[str]] = {name: list(f.default_lora_targets) for name, f in FAMILIES.items()}


def model_family(model_or_config) -> str:
    config = getattr(model_or_config, "config", model_or_config)
    return config.model_type


def lora_targets_for(model_type: str, override: Optional[Sequence[str]] = None) -> list[str]:
    """LoRA target module names: the override if given, else the family's query/value projections."""
    if override:
        return list(override)
    if model_type not in LORA_TARGETS:
        raise ValueError(
            f"no default LoRA targets for model family {model_type!r} (known: {', '.join(sorted(LORA_TARGETS))}); "
            "set lora_targets explicitly, e.g. lora_targets: [query, value]"
        )
    return list(LORA_TARGETS[model_type])


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


def new_weight_modules(new_param_names: Sequence[str]) -> list[str]:
    """Module names owning newly initialised parameters (for peft's `modules_to_save`)."""
    return sorted({name.rsplit(".", 1)[0] for name in new_param_names})


def classifier_head_modules(model: PreTrainedModel) -> list[str]:
    """Top-level head modules of a sequence classifier (always trainable)."""
    base = getattr(model, "base_model_prefix", "")
    return [n for n, _ in model.named_children() if n != base and n not in ("dropout",)]


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


def head_parameter_names(model: PreTrainedModel) -> list[str]:
    """Every parameter of a sequence classifier's head modules (pooler-less heads, `classifier_head_modules`)
    and of a pooler inside its base model."""
    heads = tuple(classifier_head_modules(model))
    base = getattr(model, "base_model_prefix", "")
    return [n for n, _ in model.named_parameters() if n.split(".", 1)[0] in heads or n.startswith(f"{base}.pooler.")]


# Which head modules train beside the LoRA adapters (`apply_lora(head=...)`).
HEADS = ("new", "seq_cls")


def check_head(head: str) -> None:
    if head not in HEADS:
        raise ValueError(f"head must be 'new' (the whole head and every newly initialised weight train) or 'seq_cls' "
                         f"(only the final classifier layer trains), got {head!r}")


def final_classifier_modules(model: torch.nn.Module) -> list[str]:
    """The final classifier layer of a sequence classifier: its top-level ``classifier``/``score``
    module if that is a Linear (BERT, DistilBERT, DeBERTa), else that module's last Linear (RoBERTa,
    ELECTRA, MPNet: ``classifier.out_proj``). Never DistilBERT's ``pre_classifier`` or a pooler."""
    found = []
    for name, module in model.named_children():
        if name not in ("classifier", "score"):
            continue
        if isinstance(module, torch.nn.Linear):
            found.append(name)
        else:
            linear = [n for n, m in module.named_modules() if isinstance(m, torch.nn.Linear)]
            found += [f"{name}.{linear[-1]}"] if linear else []
    return found


def in_classifier_head(name: str) -> bool:
    """Whether a parameter/module name lies in a classifier head (``classifier``, ``classifier.out_proj``, peft copies)."""
    return any(part.startswith("classifier") for part in name.split("."))


def regression_output_layers(model: torch.nn.Module) -> list[torch.nn.Linear]:
    """The one-output Linear layers of a classifier head (where a regression score comes out).

    BERT/DeBERTa/DistilBERT ``classifier``, RoBERTa ``classifier.out_proj``; under peft both the
    frozen original and the trained ``modules_to_save`` copy.
    """
    return [m for n, m in model.named_modules()
            if in_classifier_head(n) and isinstance(m, torch.nn.Linear) and m.out_features == 1 and m.bias is not None]


def init_regression_bias(model: torch.nn.Module, label_mean: float) -> int:
    """Start a new regression head at the mean label: returns how many output biases were set.

    A head initialised at 0 meets STS-B labels averaging ~2.7, and that common offset dominates the
    first gradients: with a frozen backbone + LoRA it pushes every example's representation the same
    way and collapses them (measured on MiniLM-L6: dev Pearson 0.03 vs 0.86 with this init).
    """
    layers = regression_output_layers(model)
    with torch.no_grad():
        for layer in layers:
            layer.bias.fill_(label_mean)
    return len(layers)


def check_lora_targets(model: torch.nn.Module, targets: Sequence[str]) -> None:
    """Every LoRA target must name (as peft matches it: the full name or a dotted suffix) a module of `model`.

    peft adapts whatever matches and ignores the rest, so ``[query, bogus]`` would silently adapt only ``query``.
    """
    names = [name for name, _ in model.named_modules()]
    unknown = [t for t in targets if not any(n == t or n.endswith(f".{t}") for n in names)]
    if unknown:
        linear = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ValueError(f"unknown lora_targets {', '.join(map(repr, unknown))}: no module of this {model_family(model)} model "
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


EXPORT_MARKER = "kdlora_export.json"


def _is_kdlora_export(path: Path) -> bool:
    """Whether directory `path` carries our marker file (written into every export by `write_export`)."""
    marker = path / EXPORT_MARKER
    try:
        return marker.is_file() and json.loads(marker.read_text()).get("exported_by") == "kdlora"
    except (OSError, ValueError, AttributeError):
        return False


def check_export_dir(path: str | Path) -> Path:
    """`path` if an export may be written there, else a ValueError naming it.

    An export replaces its directory, so that directory must not exist, be empty, or be a previous
    kdlora export (it carries ``kdlora_export.json``): nothing a user keeps there is ever deleted.
    """
    path = Path(path)
    if path.is_symlink():
        raise ValueError(f"export directory {path} is a symbolic link: refusing to replace it; choose another directory")
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"export directory {path} is an existing file: refusing to replace it; choose another directory")
        if any(path.iterdir()) and not _is_kdlora_export(path):
            raise ValueError(f"export directory {path} already exists and is not a kdlora export (it has no {EXPORT_MARKER}): "
                             "refusing to replace it; choose another directory or remove it yourself")
    for parent in path.absolute().parents:  # mkdir -p must be able to create it
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"cannot create export directory {path}: {parent} is a file")
            break
    return path


class OutOfSpaceError(OSError):
    """A write of `path` failed because its disk (or the user's quota) is full, and the writer removed what
    it had written: the message names `path` (`what` it is, e.g. "checkpoint ")."""

    def __init__(self, path: str | Path, what: str = "") -> None:
        super().__init__(f"no space left on device writing {what}{path} (nothing of it was written there; "
                         "free some space or choose another place)")
        self.errno = errno.ENOSPC


def out_of_space(exc: BaseException) -> bool:
    """Whether `exc`, or an error it was raised from, reports a full disk or quota: an OSError with that errno,
    or a library's own error quoting the system's text for it (safetensors' writer raises a SafetensorError)."""
    texts = (os.strerror(errno.ENOSPC), os.strerror(errno.EDQUOT))
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if (isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)) or any(t in str(exc) for t in texts):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def write_export(out_dir: str | Path, write: Callable[[Path], None], info: dict[str, Any]) -> Path:
    """Write an export directory atomically, without ever replacing what is not a kdlora export.

    `write(tmp)` fills a new sibling directory; `info` (what was exported) goes into its
    ``kdlora_export.json``; then the directory replaces `out_dir`, which `check_export_dir` must
    accept (checked again here, at write time). Directories and files get normal permissions (as
    `mkdir` and `open` give under the umask). A failure leaves `out_dir` as it was; a full disk is an
    `OutOfSpaceError` naming `out_dir`.
    """
    out_dir = check_export_dir(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            tmp.mkdir()  # unlike tempfile.mkdtemp (0700), respects the umask
            break
        except FileExistsError:
            continue
    try:
        write(tmp)
        (tmp / EXPORT_MARKER).write_text(json.dumps({"exported_by": "kdlora", **info}, indent=2, default=str) + "\n")
        # Some writers (safetensors via transformers) create owner-only files: give everything the
        # mode a plain mkdir/open would, which `tmp`'s own mode (0777 minus the umask) tells.
        dir_mode = stat.S_IMODE(tmp.stat().st_mode)
        for root, dirs, files in os.walk(tmp):
            for name in dirs + files:
                path = os.path.join(root, name)
                if not os.path.islink(path):  # a link's target is not ours to change
                    os.chmod(path, dir_mode if name in dirs else dir_mode & 0o666)
        check_export_dir(out_dir)
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, Exception) and out_of_space(e):
            raise OutOfSpaceError(out_dir) from e
        raise
    return out_dir


def export_hf(model: torch.nn.Module, tokenizer, out_dir: str | Path, save_adapter: bool = True,
              info: Optional[dict[str, Any]] = None) -> Path:
    """Write a model as a plain Hugging Face directory loadable by `from_pretrained`.

    A peft model is merged (a copy, so `model` keeps its adapters) and, with `save_adapter`, its
    adapter is saved too under ``adapter/``. Written by `write_export`: atomically, marked as ours
    (with `info`), and never over a directory that is not a previous kdlora export.
    """
    import copy

    def write(tmp: Path) -> None:
        if isinstance(model, PeftModel):
            if save_adapter:
                model.save_pretrained(tmp / "adapter")
            merged = copy.deepcopy(model).merge_and_unload()
        else:
            merged = model
        merged.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    return write_export(out_dir, write, {"lora_merged": isinstance(model, PeftModel), **(info or {})})


# Written by every `save_pretrained`; a folder of an older format may have only its vocabulary files,
# which the tokenizer class names (`vocab_files_names`: vocab.txt, vocab.json and merges.txt, spiece.model...).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def load_tokenizer(name_or_path: str, what: str = "folder"):
    """The tokenizer of a hub id or a local folder; `what` names the argument in errors.

    A local folder without tokenizer files is a FileNotFoundError naming the files it lacks: from
    such a folder (weights and config.json only) transformers builds an empty tokenizer of the
    config's model type, whose few special tokens would fail later as a puzzling vocabulary mismatch.
    """
    path = Path(name_or_path)
    if not path.is_dir():
        return AutoTokenizer.from_pretrained(name_or_path)
    expected, error = set(TOKENIZER_FILES), None
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        expected |= set(getattr(type(tokenizer), "vocab_files_names", {}).values())
    except (OSError, ValueError) as e:
        error = e
    if not any((path / name).is_file() for name in expected):
        held = sorted(p.name for p in path.iterdir())
        listing = ", ".join(held[:8]) + (f" and {len(held) - 8} more" if len(held) > 8 else "") if held else "nothing"
        raise FileNotFoundError(f"{what} {name_or_path} has no tokenizer files (none of {', '.join(sorted(expected))}; "
                                f"it holds {listing}): save the tokenizer of its model into it")
    if error is not None:
        raise error
    return tokenizer


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
        raise ValueError("merge LoRA before dropping layers (kdlora.models.plain_model)")
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
