"""Export sub-networks of a trained super-transformer as plain Hugging Face model directories.

    python -m kdlora.mlfs.export --checkpoint runs/.../best.ckpt --subnet h256-a4-f1024-l4 --out exports/h256
    python -m kdlora.mlfs.export --checkpoint best.ckpt --subnet subnet.yaml --out exports/small
    python -m kdlora.mlfs.export --checkpoint best.ckpt --subnet max --subnet h192-a3-f768-l0.2.5 --out exports/

The checkpoint is a `SuperTransformer`'s (GLUE) or a `CausalLMSuperTransformer`'s (decoders). Each export
has every LoRA stage merged, weights physically sliced and a smaller config, and loads with
`AutoModelForSequenceClassification.from_pretrained` (`AutoModelForCausalLM` for a decoder's, with the
base model's tokenizer beside it). With several --subnet values, --out is
a parent directory holding one folder per subnet name. A subnet is a name (see
`SubnetConfig.name`; ``l<n>`` = first n layers, dotted = explicit lists), ``max``, or a JSON/YAML
file with hidden_size, num_heads, intermediate_size and layers.

An export replaces a previous kdlora export at the same place (each carries ``kdlora_export.json``),
so re-running a command refreshes its output; any other existing, non-empty directory is refused
before the checkpoint is even loaded: nothing of yours is ever deleted.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

from kdlora.data.tokenizer import load_tokenizer
from kdlora.elastic.config import SubnetConfig
from kdlora.elastic.model import ElasticTransformer
from kdlora.io import check_export_dir

log = logging.getLogger(__name__)


def parse_subnet(spec: str, encoder: ElasticTransformer) -> SubnetConfig:
    """A SubnetConfig from a name, ``max``, or a .json/.yaml/.yml file; validated against the maxnet."""
    if spec in ("max", "maxnet"):
        return encoder.max_config
    path = Path(spec)
    if path.suffix.lower() in (".json", ".yaml", ".yml"):
        if not path.is_file():
            raise FileNotFoundError(f"subnet file {spec} does not exist")
        import yaml

        text = path.read_text()
        try:
            data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
        except (ValueError, yaml.YAMLError) as e:
            reason = " ".join(str(e).split())
            raise ValueError(f"subnet file {spec} is not valid {'JSON' if path.suffix.lower() == '.json' else 'YAML'}: {reason}") from None
        if not isinstance(data, dict):
            raise ValueError(f"subnet file {spec} must hold a mapping with hidden_size, num_heads, intermediate_size, layers")
        cfg = SubnetConfig.from_dict(data)
    else:
        cfg = SubnetConfig.from_name(spec)
    cfg.validate(encoder.max_config)
    return cfg


def supernet_class(checkpoint: str | Path) -> type:
    """The super-transformer class a Lightning checkpoint was written by: `SuperTransformer` or
    `CausalLMSuperTransformer` (a subclass's checkpoint loads as its base); a CheckpointError if neither."""
    from kdlora.mlfs.causal_lm import CausalLMSuperTransformer  # lazy: Lightning is slow to import
    from kdlora.mlfs.glue import SuperTransformer
    from kdlora.training.checkpoint import CheckpointError, _check_class, read_checkpoint

    hparams = read_checkpoint(checkpoint).get("hyper_parameters") or {}
    reasons = []
    for cls in (SuperTransformer, CausalLMSuperTransformer):
        try:
            _check_class(Path(checkpoint), hparams, cls)
            return cls
        except CheckpointError as e:
            reasons.append(str(e))
    raise CheckpointError(f"{checkpoint} is not a super-transformer checkpoint: {'; '.join(reasons)}")


def load_encoder(checkpoint: str | Path):
    """(ElasticTransformer, tokenizer or None) of a SuperTransformer or CausalLMSuperTransformer Lightning checkpoint."""
    from kdlora.training.args import nested_hparams
    from kdlora.training.checkpoint import current_class_path, read_checkpoint

    cls = supernet_class(checkpoint)
    hparams = read_checkpoint(checkpoint).get("hyper_parameters") or {}
    # A checkpoint written before the argument groups holds flat keys (lora_r, ...): given as the groups they
    # are now, they override the saved ones, which the module no longer takes (Lightning leaves those out).
    grouped = {k: v for k, v in nested_hparams(hparams, cls.__name__).items() if hparams.get(k) != v}
    module = cls.load_from_checkpoint(checkpoint, map_location="cpu", **current_class_path(hparams, cls), **grouped)
    module.eval()
    tokenizer = None
    name = module.hparams.get("model_name_or_path")
    if name:
        try:
            tokenizer = load_tokenizer(name, "the checkpoint's model_name_or_path")
        except (OSError, ValueError) as e:
            log.warning("no tokenizer saved with the export: cannot load %r (%s)", name, e)
    return module.encoder, tokenizer


def export_targets(specs: Sequence[str], out: str | Path) -> list[Optional[Path]]:
    """Where each subnet spec will be written (None where the name is known only from the model: ``max``)."""
    out = Path(out)
    if len(specs) == 1:
        return [out]
    targets: list[Optional[Path]] = []
    for spec in specs:
        try:
            is_file = Path(spec).suffix.lower() in (".json", ".yaml", ".yml")
            targets.append(None if spec in ("max", "maxnet") or is_file else out / SubnetConfig.from_name(spec).name)
        except ValueError:
            targets.append(None)  # parse_subnet reports it once the model is loaded
    return targets


def export_subnets(encoder: ElasticTransformer, subnets: Sequence[SubnetConfig], out: str | Path, tokenizer=None) -> list[Path]:
    """Write each subnet: to `out` itself for one subnet, else to `out/<name>`."""
    out = Path(out)
    targets = [out] if len(subnets) == 1 else [out / cfg.name for cfg in subnets]
    for target in targets:  # all of them before anything is written
        check_export_dir(target)
    encoder.eval()
    written = []
    for cfg, target in zip(subnets, targets):
        encoder.export_hf(cfg, target, tokenizer)
        log.info("exported %s (%d parameters) to %s", cfg.name, encoder.parameter_count(cfg), target)
        written.append(target)
    return written


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kdlora.mlfs.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="SuperTransformer or CausalLMSuperTransformer Lightning checkpoint (.ckpt)")
    parser.add_argument("--subnet", required=True, action="append",
                        help="subnet name (e.g. h256-a4-f1024-l4), 'max', or a JSON/YAML file; repeatable")
    parser.add_argument("--out", required=True, help="output directory, replaced only if empty or a previous kdlora export; "
                        "with several subnets, a parent directory (kept as it is) holding one such directory per subnet")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        checkpoint = Path(args.checkpoint)
        if not checkpoint.is_file():  # before the slow imports and model loading
            raise FileNotFoundError(f"checkpoint {checkpoint} " + ("is a directory, not a checkpoint file" if checkpoint.is_dir()
                                                                   else "does not exist"))
        for target in [t for t in export_targets(args.subnet, args.out) if t is not None]:
            check_export_dir(target)  # before the slow model loading; write_export checks again
        encoder, tokenizer = load_encoder(checkpoint)
        subnets = [parse_subnet(s, encoder) for s in args.subnet]  # all validated before anything is written
        for i, cfg in enumerate(subnets):  # one directory each: a repeat would overwrite the first
            same = [args.subnet[j] for j, other in enumerate(subnets) if other.name == cfg.name]
            if len(same) > 1:
                raise ValueError(f"--subnet {' and '.join(same)} are the same subnet ({cfg.name}): give it once")
        for path in export_subnets(encoder, subnets, args.out, tokenizer):
            print(path)
    except (ValueError, OSError, KeyError) as e:  # OSError: a missing file, a full disk (OutOfSpaceError), ...
        print(f"kdlora: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
