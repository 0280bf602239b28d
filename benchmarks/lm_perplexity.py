"""A causal LM on CPU: load time, forward time of a batch, and perplexity on held-out files through
`CausalLMDataModule` (by default Python's own standard library, ``sysconfig.get_paths()["stdlib"]``).

A sanity check of a converted checkpoint (e.g. `scripts/fetch_models.sh smollm2`): a right conversion
scores a perplexity well under 20 on Python code, a broken one hundreds or more.

    PYTHONPATH=. python benchmarks/lm_perplexity.py --model models/smollm2 --out benchmarks/results/lm_perplexity/smollm2_cpu

Writes ``<out>.md`` and ``<out>.json`` (when --out is given).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

from kdlora.data.causal_lm import CausalLMDataModule  # noqa: E402
from kdlora.eval.latency import timed  # noqa: E402
from kdlora.eval.perplexity import heldout_perplexity  # noqa: E402
from kdlora.io import write_atomic  # noqa: E402
from results_files import notes_for_output  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--source", default=sysconfig.get_paths()["stdlib"], help="folder of files (default: the stdlib)")
    parser.add_argument("--pattern", default="*.py", help="glob under --source (default: top-level stdlib modules)")
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-files", type=int, default=40)
    parser.add_argument("--val-fraction", type=float, default=0.25)
    parser.add_argument("--max-val-tokens", type=int, default=8192)
    parser.add_argument("--timing-repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", default=None, help="write <out>.md and <out>.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    load_average = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    load_s = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as cache:
        dm = CausalLMDataModule(args.model, args.source, pattern=args.pattern, block_size=args.block_size,
                                val_fraction=args.val_fraction, max_files=args.max_files, max_val_tokens=args.max_val_tokens,
                                batch_size=args.batch_size, seed=0, cache_dir=cache)
        start = time.perf_counter()
        dm.setup("validate")
        tokenize_s = time.perf_counter() - start
        loader = dm.val_dataloader()
        batch = next(iter(loader))
        with torch.no_grad():
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])  # warm-up
            times = []
            for _ in range(args.timing_repeats):
                times.append(timed(lambda: model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]))[1])
        start = time.perf_counter()
        heldout = heldout_perplexity(lambda b: model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, loader)
        nll, tokens = heldout["nll"], heldout["tokens"]
        eval_s = time.perf_counter() - start
    c = model.config
    result = {
        "model": args.model, "source": "stdlib" if args.source == sysconfig.get_paths()["stdlib"] else args.source,
        "pattern": args.pattern, "files": dm.files["validation"],
        "config": {k: getattr(c, k, None) for k in ("hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size",
                                                    "num_hidden_layers", "vocab_size", "tie_word_embeddings", "max_position_embeddings")},
        "parameters": sum(p.numel() for p in model.parameters()),
        "load_seconds": round(load_s, 2), "tokenize_seconds": round(tokenize_s, 2),
        "forward_batch": list(batch["input_ids"].shape), "forward_seconds_median": round(statistics.median(times), 3),
        "forward_seconds": [round(t, 3) for t in times], "threads": torch.get_num_threads(),
        "eval_tokens": tokens, "eval_seconds": round(eval_s, 1), "nll_per_token": nll / tokens, "perplexity": math.exp(nll / tokens),
        "load_average": load_average, "cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
        "max_files": args.max_files, "max_val_tokens": args.max_val_tokens, "block_size": args.block_size,
    }
    md = render(result, notes_for_output(args.out) if args.out else None)
    print(md)
    if args.out:
        write_atomic(Path(args.out + ".md"), md)
        write_atomic(Path(args.out + ".json"), json.dumps(result, indent=2) + "\n")
    return 0


def render(result: dict, notes: str | None = None) -> str:
    """The markdown of an lm_perplexity run from its JSON; `notes` go under the title."""
    load_average = result["load_average"]
    return "\n".join([
        f"# {Path(result['model']).name} on CPU", "",
        *([notes, ""] if notes else []),
        f"`python benchmarks/lm_perplexity.py --model {result['model']}` ({result['threads']} threads, torch {result['torch']}, Python {result['python']})", "",
        "| hidden | heads | kv heads | FFN | layers | vocab | tied embeddings | parameters |", "|---|---|---|---|---|---|---|---|",
        "| {hidden_size} | {num_attention_heads} | {num_key_value_heads} | {intermediate_size} | {num_hidden_layers} | {vocab_size} | "
        "{tie_word_embeddings} |".format(**result["config"]) + f" {result['parameters'] / 1e6:.1f}M |", "",
        f"- load (from_pretrained, fp32): {result['load_seconds']} s",
        f"- forward of a batch {result['forward_batch'][0]} × {result['forward_batch'][1]} tokens: median {result['forward_seconds_median']} s "
        f"of {len(result['forward_seconds'])} ({result['forward_seconds']})",
        f"- perplexity on the held-out split ({len(result['files'])} of {result['max_files']} seeded {result['source']} files `{result['pattern']}`, "
        f"its first {result['max_val_tokens']} tokens, blocks of {result['block_size']}: {result['eval_tokens']} predicted tokens): "
        f"**{result['perplexity']:.2f}** (NLL {result['nll_per_token']:.3f} nats/token; {result['eval_seconds']} s)",
        f"- held-out files in packing order (the token limit reaches only the first ones): {', '.join(result['files'])}",
        f"- load average at the start: {load_average:.2f} ({result['cpus']} cores, shared with other jobs)" if load_average is not None else "",
        ""])


if __name__ == "__main__":
    sys.exit(main())
