"""Latency of exported palette members vs the maxnet (plain HF models, CPU by default).

Palette members are the subnets whose parameter count is nearest to ~3/4, ~1/2 and ~1/4 of the
maxnet's (uniform widths with attention width = hidden width, FFN = 4·hidden as in BERT, layers
evenly spread), exported through `ElasticTransformer.materialize` (the same plain model `export_hf`
writes). Models are timed round-robin (one forward of each per round) so load on the machine hits
all alike; we report the median of the rounds after warm-up, and ratios to the maxnet.

    PYTHONPATH=. python benchmarks/palette_latency.py --model bert-base --model models/minilm
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

from kdlora.elastic import ElasticTransformer, SubnetConfig, evenly_spread_layers
from kdlora.eval.latency import round_robin_latency_ms
from kdlora.io import write_atomic
from results_files import notes_for_output

RESULTS = Path(__file__).resolve().parent / "results"


def load_maxnet(name: str):
    if name == "bert-base":  # BertConfig() defaults = bert-base-uncased shapes; random weights suffice for latency
        torch.manual_seed(0)
        return BertForSequenceClassification(BertConfig(num_labels=2)).eval()
    return AutoModelForSequenceClassification.from_pretrained(name, num_labels=2).eval()


def palette(encoder: ElasticTransformer, fractions=(0.75, 0.5, 0.25)) -> list[tuple[str, SubnetConfig]]:
    """(label, config) of the maxnet and the candidates nearest each parameter fraction."""
    m, d = encoder.max_config, encoder.head_dim
    L, ffn_ratio = len(m.layers), max(m.ffn_per_layer()) / m.hidden_size
    candidates = [
        SubnetConfig(h, h // d, int(round(ffn_ratio * h)), evenly_spread_layers(L, depth))
        for h in range(d, m.hidden_size + 1, d) for depth in range(1, L + 1)
    ]
    n_max = encoder.parameter_count(m)
    members = [("maxnet", m)]
    for f in fractions:
        # nearest in size; among near-ties (within 2 %) prefer the deeper one (shallow nets lose most accuracy)
        best = min(abs(encoder.parameter_count(c) / n_max - f) for c in candidates)
        near = [c for c in candidates if abs(encoder.parameter_count(c) / n_max - f) <= best + 0.02]
        members.append((f"~{f:g}", max(near, key=lambda c: (len(c.layers), c.hidden_size))))
    return members


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", help="'bert-base' (random BertConfig()) or a model path/hub id")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, action="append", help="default: 1 and 32")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--repeats-large", type=int, default=3, help="repeats for batch sizes > 1")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--subnet", action="append",
                        help="time these subnets (names such as h288-a9-f1152-l6) instead of the size fractions")
    parser.add_argument("--out", default=str(RESULTS / "palette_latency" / "palette_latency"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    models = args.model or ["bert-base", "models/minilm"]
    batch_sizes = args.batch_size or [1, 32]

    rows = []
    for name in models:
        encoder = ElasticTransformer(load_maxnet(name)).eval()
        members = ([("maxnet", encoder.max_config)] + [(n, SubnetConfig.from_name(n)) for n in args.subnet]
                   if args.subnet else palette(encoder))
        plain = [encoder.materialize(cfg) for _, cfg in members]
        n_max = encoder.parameter_count(encoder.max_config)
        for batch_size in batch_sizes:
            repeats = args.repeats if batch_size == 1 else args.repeats_large
            ms = round_robin_latency_ms(plain, batch_size, args.seq_len, encoder.model.config.vocab_size, args.warmup, repeats)
            for (label, cfg), model, t in zip(members, plain, ms):
                params = sum(p.numel() for p in model.parameters())
                row = {"model": name, "member": label, "subnet": cfg.name, "params": params,
                       "param_ratio": params / n_max, "batch_size": batch_size, "seq_len": args.seq_len,
                       "latency_ms": t, "latency_ratio": t / ms[0], "repeats": repeats}
                rows.append(row)
                print(f"{name:>22} b{batch_size:<3} {label:>7} {cfg.name:<22} params {params / 1e6:6.2f}M "
                      f"({row['param_ratio']:.2f})  {t:9.1f} ms  ratio {row['latency_ratio']:.2f}", flush=True)

    meta = {"device": "cpu", "threads": args.threads, "torch": torch.__version__, "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(), "warmup": args.warmup,
            "cpu_count": os.cpu_count(), "load_average_at_end": os.getloadavg()[0],
            "note": "plain HF models materialised from an ElasticTransformer; median of round-robin rounds; "
                    "ratio = member latency / maxnet latency measured in the same rounds",
            "command": "PYTHONPATH=. python benchmarks/palette_latency.py " + " ".join(sys.argv[1:])}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {"meta": meta, "rows": rows}
    write_atomic(out.with_suffix(".json"), json.dumps(record, indent=2) + "\n")
    write_atomic(out.with_suffix(".md"), render(record, notes_for_output(out)))
    print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.json')}")


def render(data: dict, notes: str | None = None) -> str:
    """The markdown of a palette_latency run from its JSON; `notes` go under the first paragraph."""
    meta, rows = data["meta"], data["rows"]
    repeats = {r["batch_size"]: r["repeats"] for r in rows}
    large = sorted({n for b, n in repeats.items() if b > 1})
    load = (f"; {meta['cpu_count']} CPUs, load average {meta['load_average_at_end']:.1f} at the end (absolute times inflate "
            "under load; ratios are measured in the same rounds)" if meta.get("load_average_at_end") is not None else "")
    lines = ["# Palette latency (exported subnets vs maxnet)", "",
             f"CPU, {meta['threads']} threads, torch {meta['torch']}, seq len {', '.join(str(n) for n in sorted({r['seq_len'] for r in rows}))}, "
             f"median of {repeats.get(1, '–')} (batch 1) / {'/'.join(map(str, large)) or '–'} (larger) round-robin rounds after "
             f"{meta['warmup']} warm-up{load}.",
             *([notes] if notes else []),
             f"Command: `{meta['command']}`", "",
             "| model | batch | member | subnet | params (M) | params ratio | latency (ms) | latency ratio |",
             "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['batch_size']} | {r['member']} | `{r['subnet']}` | {r['params'] / 1e6:.2f} | "
                     f"{r['param_ratio']:.2f} | {r['latency_ms']:.1f} | {r['latency_ratio']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
