"""Loading a tokenizer from a hub name or a local folder, with one clear error when it is not one."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer


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
