"""CPU fixtures: tiny random models of every supported family, and small GLUE directories.

Nothing here touches a network: models are built from configs, the tokenizer from a small
WordPiece vocabulary written on the fly, and GLUE rows come from `tests/fixtures/glue` (the first
64 train / 32 dev rows of each task, carried in the repository so the suite runs on a clone with
nothing beside it). Only checks of the full GLUE files read `../shared/glue`, and skip without it.
"""

from __future__ import annotations

import os
import shutil
import string
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

# One thread: tiny models gain nothing from more, and a busy 2-core machine loses a lot.
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
SHARED_GLUE = Path(os.environ.get("KDLORA_GLUE_DIR", REPO.parent / "shared" / "glue"))
FIXTURE_GLUE = REPO / "tests" / "fixtures" / "glue"
FAMILIES = ("bert", "roberta", "deberta-v2", "distilbert", "mpnet")

_WORDS = (
    "the a an of to and in is was he she it they his her that for on with as by at from this be are not "
    "have had has but said one two new year said would who which their will been more about when there "
    "company million percent shares state government first last could after its than also people"
).split()


def write_tiny_tokenizer(directory: Path) -> None:
    """An uncased WordPiece tokenizer with a ~200-token vocabulary (characters + common words)."""
    from transformers import BertTokenizerFast

    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    vocab = list(dict.fromkeys(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars + ["##" + c for c in chars] + sorted(_WORDS)))
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
    # transformers >= 5 takes `vocab` (path or dict); 4.x took `vocab_file`.
    try:
        tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True, model_max_length=128)
    except TypeError:
        tok = BertTokenizerFast(vocab_file=str(directory / "vocab.txt"), do_lower_case=True, model_max_length=128)
    assert len(tok) == len(vocab), "tiny tokenizer lost its vocabulary"
    tok.save_pretrained(directory)


def write_tiny_bpe_tokenizer(directory: Path, texts, vocab_size: int = 300, eos: bool = True) -> Path:
    """A byte-level BPE tokenizer trained on `texts` (decoding gives back the text, whitespace included),
    with ``<pad>`` (id 0) and, if `eos`, ``<eos>`` (id 1) as special tokens: a causal-LM tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>"] if eos else ["<pad>"]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(list(texts), trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", **({"eos_token": "<eos>"} if eos else {}))
    directory.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(directory)
    return directory


def tiny_config(family: str, vocab_size: int, num_labels: int = 2, layers: int = 4):
    """A small config of `family`: hidden 32, 4 heads, FFN 64 (a shape slicing tests can cut)."""
    from transformers import BertConfig, DebertaV2Config, DistilBertConfig, MPNetConfig, RobertaConfig

    common = dict(vocab_size=vocab_size, num_labels=num_labels, pad_token_id=0)
    if family == "bert":
        return BertConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=64,
                          max_position_embeddings=160, **common)
    if family == "roberta":
        return RobertaConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=64,
                             max_position_embeddings=160, type_vocab_size=1, bos_token_id=2, eos_token_id=3, **common)
    if family == "deberta-v2":
        return DebertaV2Config(hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=64,
                               max_position_embeddings=160, relative_attention=True, position_buckets=32,
                               pos_att_type=["p2c", "c2p"], max_relative_positions=-1, position_biased_input=False,
                               type_vocab_size=0, pooler_hidden_size=32, **common)
    if family == "distilbert":
        return DistilBertConfig(dim=32, n_layers=layers, n_heads=4, hidden_dim=64, max_position_embeddings=160, **common)
    if family == "mpnet":
        return MPNetConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=64,
                           max_position_embeddings=160, **common)
    raise ValueError(family)


def make_tiny_model_dir(directory: Path, family: str, num_labels: int = 2, layers: int = 4, seed: int = 0) -> Path:
    """A saved random `*ForSequenceClassification` of `family` plus tokenizer, loadable by path."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    write_tiny_tokenizer(directory)
    vocab_size = len(AutoTokenizer.from_pretrained(directory))
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(tiny_config(family, vocab_size, num_labels, layers))
    model.save_pretrained(directory)
    return directory


def write_stsb_dir(root: Path, scores) -> Path:
    """A tiny STS-B directory (header-named columns, as in GLUE) whose train labels are `scores`."""
    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    rows = [f"{i}\tmain\tx\t2012\t{i}\tnone\tnone\tthe company said {i}\tthey said {i} more\t{s}\n" for i, s in enumerate(scores)]
    (root / "STS-B").mkdir(parents=True)
    for split in ("train.tsv", "dev.tsv"):
        (root / "STS-B" / split).write_text(header + "".join(rows))
    return root


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> dict[str, Path]:
    """family -> directory of a tiny random 2-label classifier (4 layers, H32)."""
    root = tmp_path_factory.mktemp("tiny_models")
    return {f: make_tiny_model_dir(root / f, f) for f in FAMILIES}


@pytest.fixture(scope="session")
def tiny_bert_dir(tiny_model_dirs) -> Path:
    return tiny_model_dirs["bert"]


@pytest.fixture(scope="session")
def shared_glue_dir() -> Path:
    """The full GLUE files beside the checkout (skips the test where they are absent)."""
    if not SHARED_GLUE.is_dir():
        pytest.skip(f"no GLUE files at {SHARED_GLUE}")
    return SHARED_GLUE


@pytest.fixture(scope="session")
def small_glue_dir(tmp_path_factory) -> Path:
    """A writable copy of `tests/fixtures/glue`: 64 train / 32 dev rows of CoLA, SST-2, MRPC, STS-B,
    RTE, WNLI and 32 QNLI dev rows (no QNLI train), the same on every machine."""
    root = tmp_path_factory.mktemp("glue")
    shutil.copytree(FIXTURE_GLUE, root, dirs_exist_ok=True)
    return root
