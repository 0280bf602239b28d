"""An MLFS palette of SmolLM2-135M on Python code, and its recovery curve against the slice trained alone.

Data: the Python standard library's own top-level modules (``<sysconfig stdlib>/*.py``), documents
held out by file (`CausalLMDataModule`, seeded), packed into `--block` token blocks. The training
stream is cut at exactly ``steps · batch · block`` tokens, so one epoch is the run; the held-out
stream at `--val-tokens`. The base is the pretrained model (LoRA only, the supernet's staged adapters).

    # MLFS (CausalLMSuperTransformer, stage 2 only, K = --num-subnets subnets per step besides the maxnet,
    # the sandwich's smallest one among them every step; K = 1: the smallest alone): the curve slice
    # (the smallest) held-out perplexity every --eval-every steps, the whole palette at step 0 (sliced,
    # untrained) and at the end, every member exported as a causal LM
    python benchmarks/decoder_palette.py mlfs
    # the same slice, trained alone: LM loss only, same adapters, lr, schedule, batches and tokens
    python benchmarks/decoder_palette.py alone
    # CPU latency per generated token of the exported members (greedy, kv cache, batch 1), round-robin
    python benchmarks/decoder_palette.py latency
    # md + json + png into benchmarks/results/decoder_palette/decoder_palette*
    python benchmarks/decoder_palette.py report

Work files go to ``--work`` (default runs/decoder_palette): ``mlfs.json``, ``alone.json``,
``latency.json`` and the export ``mlfs/export/<member>/``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import sysconfig
import time
from pathlib import Path

import torch

from kdlora.eval.latency import timed
from kdlora.eval.perplexity import heldout_perplexity
from kdlora.io import write_atomic
from results_files import notes_for_output

ROOT = Path(__file__).resolve().parent.parent

RESULTS = ROOT / "benchmarks" / "results"
# Palette: the maxnet and two members below it. 9 query heads over 3 key/value heads of SmolLM2: head
# counts must keep 3 query heads per kv head (9 -> 3 kv, 6 -> 2 kv); hidden stays 576 (tied embeddings).
# Untrained, evenly spread depth costs least (depth 27: ppl ~58, 24: ~370 on 1k held-out tokens, maxnet ~30), the
# leading-neuron FFN and head slices most (FFN 1024 at full depth ~14k, 6 heads ~1.7k): the minnet starts broken.
SEARCH_SPACE = {"hidden_sizes": [576], "num_heads": [9, 6], "intermediate_sizes": [1536, 1024], "depths": [30, 24, 18]}
PALETTE = ["max", {"hidden_size": 576, "num_heads": 9, "intermediate_size": 1536, "depth": 24}, "min"]


def stdlib_source() -> str:
    return sysconfig.get_paths()["stdlib"]


def data_module(a):
    from kdlora.data.causal_lm import CausalLMDataModule

    return CausalLMDataModule(a.model, stdlib_source(), pattern="*.py", block_size=a.block, val_fraction=a.val_fraction,
                              seed=a.seed, max_train_tokens=a.steps * a.batch * a.block, max_val_tokens=a.val_tokens,
                              batch_size=a.batch, eval_batch_size=a.eval_batch, cache_dir=a.cache_dir)


def member_perplexity(encoder, cfg, loader) -> float:
    """Held-out perplexity (`kdlora.eval.perplexity.heldout_perplexity`) of subnet `cfg` over every block."""
    was_training = encoder.training
    encoder.eval()
    try:
        encoder.set_sub_network(cfg)
        return heldout_perplexity(lambda batch: encoder(batch["input_ids"], batch["attention_mask"]).logits, loader)["perplexity"]
    finally:
        encoder.reset_super_network()
        encoder.train(was_training)


def build_module(a, alone: bool):
    from kdlora.mlfs.causal_lm import CausalLMSuperTransformer

    from kdlora.mlfs.training import MLFSStep

    class SliceAloneStep(MLFSStep):
        """The curve slice trained on its own next-token loss: no maxnet, no distillation, no other subnet;
        the same staged adapters (only the slice's part of them gets gradients), optimizer and schedule."""

        def accumulate_gradients(self, batch, subnets, stage):
            cfg, task = self.space.smallest(), self.task
            self.encoder.set_sub_network(cfg)
            try:
                loss = task.maxnet_loss(self.encoder(**task.encoder_inputs(batch)).logits, batch)
                task.check_finite_loss(loss, f"slice {cfg.name} loss")
                task.manual_backward(loss)
            finally:
                self.encoder.reset_super_network()
            return {"loss": loss.detach(), "maxnet": loss.detach()}

    work = Path(a.work)
    module = CausalLMSuperTransformer(
        model_name_or_path=a.model, stages={"epochs": [0, 0, 1]},
        lora={"r": a.lora_r, "alpha": 2 * a.lora_r, "targets": ["query", "key", "value", "intermediate", "output"]},
        sampling={"num_subnets": a.num_subnets, "sandwich": True, "search_space": SEARCH_SPACE, "sampler_seed": a.seed},
        evaluation={"members": PALETTE if not alone else ["max", "min"]},
        optimizer={"learning_rate": a.lr, "warmup_ratio": 0.06},
        importance={"reorder": a.importance_batches > 0, "batches": max(1, a.importance_batches)},
        distillation={"feature_weight": a.beta, "feature_normalization": a.feature_normalization},
        export={"enabled": not alone, "dir": str(work / "mlfs" / "export") if not alone else None})
    if alone:
        module.mlfs_step = SliceAloneStep(module, module.encoder, module.space, module.projections, module.distillation)
    return module


def cmd_train(a, alone: bool) -> None:
    import lightning as L
    from lightning.pytorch.callbacks import Callback

    torch.set_num_threads(a.threads)
    L.seed_everything(a.seed, workers=True)
    name = "alone" if alone else "mlfs"
    work = Path(a.work)
    out_json = work / f"{name}.json"
    dm = data_module(a)
    dm.prepare_data()
    dm.setup("fit")
    val_loader = dm.val_dataloader()
    model = build_module(a, alone)
    slice_cfg = model.space.smallest()
    record: dict = {"mode": name, "command": " ".join(["python", "benchmarks/decoder_palette.py", *sys.argv[1:]]),
                    "model": a.model, "seed": a.seed, "block": a.block, "batch": a.batch, "steps": a.steps, "lr": a.lr,
                    "lora_r": a.lora_r, "num_subnets": a.num_subnets, "search_space": SEARCH_SPACE,
                    "importance_batches": a.importance_batches, "beta": a.beta, "feature_normalization": a.feature_normalization,
                    "data": {"source": "<stdlib>/*.py", "files": {k: len(v) for k, v in dm.files.items()}, **dm.summary()},
                    "slice": slice_cfg.name, "curve": [], "palette_start": [], "palette_end": [], "threads": a.threads}
    t0 = time.time()

    def save() -> None:
        record["wall_s"] = round(time.time() - t0, 1)
        write_atomic(out_json, json.dumps(record, indent=2) + "\n")

    def palette_rows(key: str) -> None:
        members = model.palette_run.members if not alone else []
        for cfg in members:
            ppl = member_perplexity(model.encoder, cfg, val_loader)
            record[key].append({"name": cfg.name, "role": model.palette_run.roles.get(cfg.name, ""),
                                "params": model.encoder.parameter_count(cfg), "perplexity": ppl, **cfg.to_dict()})
            print(f"[decoder_palette] {key} {cfg.name}: perplexity {ppl:.2f}", flush=True)

    class Curve(Callback):
        def point(self, step: int) -> None:
            ppl = member_perplexity(model.encoder, slice_cfg, val_loader)
            record["curve"].append({"step": step, "tokens": step * a.batch * a.block, "perplexity": ppl,
                                    "elapsed_s": round(time.time() - t0, 1)})
            print(f"[decoder_palette] {name} step {step}: {slice_cfg.name} held-out perplexity {ppl:.2f} "
                  f"({time.time() - t0:.0f} s)", flush=True)
            save()

        def on_train_start(self, trainer, pl_module) -> None:
            palette_rows("palette_start")
            self.point(0)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            step = trainer.global_step
            if step % a.eval_every == 0 or step == a.steps:
                self.point(step)

    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, default_root_dir=str(work / name), callbacks=[Curve()], log_every_n_steps=10)
    trainer.fit(model, datamodule=dm)  # importance ordering (if any) ranks on dm.importance_dataloader() first
    if not record["curve"] or record["curve"][-1]["step"] != trainer.global_step:
        Curve().point(trainer.global_step)
    palette_rows("palette_end")
    save()
    print(f"[decoder_palette] wrote {out_json}")


def cmd_latency(a) -> None:
    """Per generated token: (t(generate N) − t(generate 1)) / (N − 1), greedy with the kv cache, batch 1, a
    held-out prompt; members round-robin, `--rounds` rounds after one warm-up round, the median."""
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(a.threads)
    work = Path(a.work)
    if a.from_pretrained:  # the same architectures, sliced from the pretrained model: timing does not depend on the weights
        from kdlora.elastic.model import ElasticTransformer, with_head_count
        from kdlora.mlfs.search_space import SearchSpace, palette_members

        encoder = ElasticTransformer(AutoModelForCausalLM.from_pretrained(a.model)).eval()
        space = SearchSpace.build(encoder.max_config, SEARCH_SPACE)
        members = palette_members(space, PALETTE)
        names = [c.name for c in members]
        models = {c.name: encoder.materialize(c) for c in members}
        for c in members:  # beside it, the export as it was before Llama exports dropped their zero-padded heads
            padded = encoder.export_config(c, padded=True)
            if padded.num_attention_heads != models[c.name].config.num_attention_heads:
                names.append(f"{c.name} (zero-padded to {padded.num_attention_heads} heads)")
                models[names[-1]] = with_head_count(models[c.name], padded).eval()  # the same function, more heads to run
    else:
        mlfs = json.loads((work / "mlfs.json").read_text())
        export = work / "mlfs" / "export"
        names = [r["name"] for r in mlfs["palette_end"]]
        models = {n: AutoModelForCausalLM.from_pretrained(export / n).eval() for n in names}
    dm = data_module(a)
    dm.setup("validate")
    prompt = dm.datasets["validation"][0]["input_ids"][: a.prompt_tokens][None, :]

    def generation_s(model, new: int) -> float:
        with torch.no_grad():
            out, seconds = timed(lambda: model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new,
                                                        min_new_tokens=new, do_sample=False, use_cache=True, pad_token_id=0))
        assert out.shape[1] == prompt.shape[1] + new
        return seconds

    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(a.rounds + 1):
        for n in names:
            t_full, t_one = generation_s(models[n], a.new_tokens), generation_s(models[n], 1)
            if r > 0:
                samples[n].append(1000 * (t_full - t_one) / (a.new_tokens - 1))
        print(f"[decoder_palette] latency round {r}: " + ", ".join(f"{n} {samples[n][-1]:.1f} ms" for n in names if samples[n]), flush=True)
    rows = [{"name": n, "params": models[n].num_parameters(), "ms_per_token": statistics.median(samples[n]),
             "samples_ms": samples[n]} for n in names]
    weights = "sliced from the pretrained model (untrained: same shapes as the exports)" if a.from_pretrained else "the MLFS exports"
    record = {"command": " ".join(["python", "benchmarks/decoder_palette.py", *sys.argv[1:]]), "threads": a.threads, "weights": weights,
              "prompt_tokens": int(prompt.shape[1]), "new_tokens": a.new_tokens, "rounds": a.rounds, "rows": rows,
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"}
    write_atomic(work / "latency.json", json.dumps(record, indent=2) + "\n")
    write_atomic(work / "latency.md", render_latency(record))
    print(render_latency(record))


def variant_label(run: dict) -> str:
    """What an MLFS run did differently: slice ordering and feature-loss normalization (older records: neither)."""
    order = "importance-ordered" if run.get("importance_batches") else "leading heads/neurons"
    norm = run.get("feature_normalization", "none")
    loss = "paper loss (β 0.1, squared L2 features)" if norm == "none" and run.get("beta", 0.1) == 0.1 else \
        f"β {run.get('beta', 0.1)}, {norm} features"
    return f"{order}, {loss}"


def cmd_report(a) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    work = Path(a.work)
    runs = [json.loads((work / "mlfs.json").read_text())]
    for other in a.variants or []:
        runs.append(json.loads((Path(other) / "mlfs.json").read_text()))
    mlfs = runs[0]
    labels = [variant_label(r) for r in runs]
    alone = json.loads((work / "alone.json").read_text()) if (work / "alone.json").is_file() else None
    latency = json.loads((work / "latency.json").read_text()) if (work / "latency.json").is_file() else None
    lat = {r["name"]: r for r in (latency or {}).get("rows", [])}
    out = Path(a.out)
    d = mlfs["data"]
    alone_end = {r["name"]: r["perplexity"] for r in (alone or {}).get("palette_end", [])}
    if alone and alone.get("curve"):
        alone_end.setdefault(alone["slice"], alone["curve"][-1]["perplexity"])
    table = []
    for r in mlfs["palette_start"]:
        row = {"name": r["name"], "role": r["role"], "params": r["params"], "exported_params": lat.get(r["name"], {}).get("params"),
               "ms_per_token": lat.get(r["name"], {}).get("ms_per_token"), "runs": [], "alone": alone_end.get(r["name"])}
        for run in runs:
            start = {x["name"]: x["perplexity"] for x in run["palette_start"]}.get(r["name"])
            after = {x["name"]: x["perplexity"] for x in run["palette_end"]}.get(r["name"])
            partial = None
            if after is None and r["name"] == run["slice"] and run["curve"] and run["curve"][-1]["step"] < run["steps"]:
                after, partial = run["curve"][-1]["perplexity"], run["curve"][-1]["step"]
            row["runs"].append({"start": start, "after": after, "stopped_at_step": partial})
        table.append(row)
    alone_curve = {p["step"]: p["perplexity"] for p in (alone or {}).get("curve", [])}
    curves = [{p["step"]: p["perplexity"] for p in r["curve"]} for r in runs]
    curve = [{"step": step, "tokens": step * mlfs["batch"] * mlfs["block"], "mlfs": [c.get(step) for c in curves],
              "alone": alone_curve.get(step)} for step in sorted(set(alone_curve).union(*curves))]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for i, (r, lab) in enumerate(zip(runs, labels)):
        ax.plot([p["tokens"] for p in r["curve"]], [p["perplexity"] for p in r["curve"]], "o-", label=f"MLFS ({i + 1}) {lab}")
    if alone:
        ax.plot([p["tokens"] for p in alone["curve"]], [p["perplexity"] for p in alone["curve"]], "s--",
                label=f"alone ({variant_label(alone).split(',')[0]}), LM loss only")
    ax.set_yscale("log")
    ax.set_xlabel("training tokens seen")
    ax.set_ylabel("held-out perplexity")
    ax.set_title(f"SmolLM2-135M slice {mlfs['slice'][:40]}… on stdlib Python", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    png = out.with_name(out.name + "_curve.png")
    tmp = png.with_name(f".{png.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(png)
    record = {"commands": [*[r["command"] for r in runs], *([alone["command"]] if alone else []), *([latency["command"]] if latency else [])],
              "report_command": " ".join(["python", "benchmarks/decoder_palette.py", *sys.argv[1:]]),
              "runs": labels, "alone_order": variant_label(alone).split(",")[0] if alone else None,
              "data": d, "seed": mlfs["seed"], "steps": mlfs["steps"], "batch": mlfs["batch"], "block": mlfs["block"],
              "lr": mlfs["lr"], "lora_r": mlfs["lora_r"], "num_subnets": mlfs["num_subnets"], "search_space": mlfs["search_space"],
              "palette": table, "curve_slice": mlfs["slice"], "curve": curve, "curve_png": png.name, "latency": latency,
              "wall_s": {"mlfs": [r["wall_s"] for r in runs], "alone": alone["wall_s"] if alone else None},
              "threads": {"mlfs": [r["threads"] for r in runs], "alone": alone["threads"] if alone else None}}
    md = render_report(record, notes_for_output(out, a.notes))
    write_atomic(out.with_suffix(".json"), json.dumps(record, indent=2) + "\n")
    write_atomic(out.with_suffix(".md"), md)
    print(md)


def render_report(record: dict, notes: str | None = None) -> str:
    """The markdown of `decoder_palette.py report` from its JSON; `notes` go under the title."""
    labels, latency, d, alone = record["runs"], record["latency"], record["data"], record["alone_order"] is not None
    md = ["# MLFS palette of SmolLM2-135M-Instruct on Python code (stdlib), CPU", ""]
    if notes:
        md += [notes, ""]
    md += ["## Commands", "", "```", *record["commands"], record["report_command"], "```", ""]
    threads = record["threads"]
    walls = "; ".join(f"MLFS ({lab}) {w / 60:.1f} min, {t} thread(s)" for w, t, lab in zip(record["wall_s"]["mlfs"], threads["mlfs"], labels))
    md += [f"Data: `{d['source']}`, {d['files']['train']} train / {d['files']['validation']} held-out files; "
           f"{d['train']['tokens']} training tokens ({record['steps']} steps × batch {record['batch']} × block {record['block']}), "
           f"{d['validation']['tokens']} held-out tokens. Seed {record['seed']}, one run each. LoRA r={record['lora_r']}, "
           f"lr {record['lr']}, {record['num_subnets']} subnet(s) per step besides the maxnet (sandwich). Wall time: {walls}"
           + (f"; alone {record['wall_s']['alone'] / 60:.1f} min, {threads['alone']} thread(s)" if alone else "")
           + "; on CPU cores shared with other jobs.", ""]
    md += ["MLFS runs: " + "; ".join(f"**({i + 1})** {lab}" for i, lab in enumerate(labels)) + ". "
           + (f"Alone: {record['alone_order']}, LM loss only." if alone else ""), ""]
    max_lat = next((r["ms_per_token"] for r in record["palette"] if r["role"] == "maxnet"), None)
    head = ["member", "role", "parameters (exported)", "ms / generated token", "vs maxnet"]
    for i in range(len(labels)):
        head += [f"start ({i + 1})", f"after MLFS ({i + 1})"]
    if alone:
        head.append("alone, end")
    md += ["## Palette: held-out perplexity", "", "Start: sliced, untrained. After MLFS: the end of the run "
           "(a run stopped early: its curve slice's last point, marked with the step).", "",
           "| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    for row in record["palette"]:
        cells = []
        for run in row["runs"]:
            start, after, partial = run["start"], run["after"], run["stopped_at_step"]
            cells += ["–" if start is None else f"{start:.5g}",
                      "not measured" if after is None else f"{after:.5g}" + (f" (step {partial} of {record['steps']})" if partial else "")]
        l, exported = row["ms_per_token"], row["exported_params"]
        ratio = f"{l / max_lat:.2f}×" if l is not None and max_lat else "–"
        size = f"{row['params'] / 1e6:.1f}M" + (f" ({exported / 1e6:.1f}M)" if exported and exported != row["params"] else "")
        line = [f"`{row['name']}`", row["role"], size, "%.1f" % l if l is not None else "–", ratio, *cells]
        if alone:
            line.append("–" if row["alone"] is None else f"{row['alone']:.5g}")
        md.append("| " + " | ".join(line) + " |")
    if latency:
        md += ["", f"Latency: plain `LlamaForCausalLM` members ({latency.get('weights', 'the MLFS exports')}), greedy `generate` with the kv cache, batch 1, "
                   f"{latency['prompt_tokens']}-token held-out prompt, (t({latency['new_tokens']} new) − t(1 new)) / "
                   f"{latency['new_tokens'] - 1}; median of {latency['rounds']} round-robin rounds after one warm-up; "
                   f"{latency['threads']} threads on {latency['machine']}, shared with other jobs."]
    md += ["", f"## Recovery curve of `{record['curve_slice']}`", "",
           "Held-out perplexity vs training tokens: MLFS (distilling from the maxnet, the slice is the sandwich's "
           "smallest subnet, trained every step) against the same slice trained alone (LM loss only).", "",
           "| step | tokens | " + " | ".join(f"MLFS ({i + 1})" for i in range(len(labels))) + " | alone |",
           "|---:|---:|" + "---:|" * (len(labels) + 1)]
    for point in record["curve"]:
        al = point["alone"]
        md.append(f"| {point['step']} | {point['tokens']} | "
                  + " | ".join("%.5g" % v if v is not None else "(not reached)" for v in point["mlfs"])
                  + f" | {'%.5g' % al if al is not None else '–'} |")
    md += ["", f"![recovery curve]({record['curve_png']})", ""]
    return "\n".join(md) + "\n"


def member_shape(name: str) -> tuple[int, int]:
    """(layers, attention heads) of a member from its subnet name (``h576-a6-f1024-l0.2.3`` or ``...-l30``),
    a zero-padded export's name (``<subnet> (zero-padded to 9 heads)``) giving the padded head count."""
    subnet, _, padded = name.partition(" (zero-padded to ")
    parts = {p[0]: p[1:] for p in subnet.split("-")}
    layers = parts["l"]
    depth = len(layers.split(".")) if "." in layers else int(layers)
    heads = int(padded.split()[0]) if padded else int(parts["a"])
    return depth, heads


def render_latency(record: dict, notes: str | None = None) -> str:
    """The markdown of a `decoder_palette.py latency` record (its ``latency.json``); `notes` follow the table.
    Each zero-padded export is set beside the export of the same subnet with its own heads."""
    rows = record["rows"]
    base = rows[0]["ms_per_token"]
    md = ["# SmolLM2 palette members: CPU latency per generated token, exports with and without zero-padded heads", "",
          f"`{record['command']}`: {record['weights']}; {record['threads']} thread(s) on {record['machine']}. Per generated "
          f"token after a {record['prompt_tokens']}-token held-out prompt: (t({record['new_tokens']} new) − t(1 new)) / "
          f"{record['new_tokens'] - 1}, greedy, kv cache, batch 1; members round-robin, {record['rounds']} rounds after one "
          "warm-up, median. The first member is the maxnet.", "",
          "| member | layers | heads | exported parameters | ms / token (min–max) | vs maxnet | vs its own-heads export |",
          "|---|---:|---:|---:|---:|---:|---:|"]
    own = {r["name"]: r for r in rows}
    for r in rows:
        depth, heads = member_shape(r["name"])
        subnet, _, padded = r["name"].partition(" (zero-padded to ")
        label = f"`{subnet}`" + (f" zero-padded to {padded.rstrip(')')}" if padded else "")
        versus = "–"
        if padded and subnet in own:
            o = own[subnet]
            versus = f"+{(r['params'] - o['params']) / 1e6:.1f}M, {100 * (r['ms_per_token'] / o['ms_per_token'] - 1):+.1f} % time"
        md.append(f"| {label} | {depth} | {heads} | {r['params'] / 1e6:.1f}M | {r['ms_per_token']:.1f} "
                  f"({min(r['samples_ms']):.1f}–{max(r['samples_ms']):.1f}) | {r['ms_per_token'] / base:.2f}× | {versus} |")
    md.append("")
    if notes:
        md += [notes, ""]
    return "\n".join(md)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("mlfs", "alone", "latency", "report"):
        p = sub.add_parser(name)
        p.add_argument("--model", default="models/smollm2", help="the pretrained causal LM (scripts/fetch_models.sh smollm2)")
        p.add_argument("--work", default="runs/decoder_palette")
        p.add_argument("--steps", type=int, default=40)
        p.add_argument("--eval-every", type=int, default=5)
        p.add_argument("--block", type=int, default=128)
        p.add_argument("--batch", type=int, default=4)
        p.add_argument("--eval-batch", type=int, default=8)
        p.add_argument("--val-fraction", type=float, default=0.1)
        p.add_argument("--val-tokens", type=int, default=4096)
        p.add_argument("--lr", type=float, default=1e-3)
        p.add_argument("--lora-r", type=int, default=8)
        p.add_argument("--num-subnets", type=int, default=1, help="K; 1 = the sandwich's smallest subnet alone")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--threads", type=int, default=2)
        p.add_argument("--cache-dir")
        p.add_argument("--importance-batches", type=int, default=8,
                       help="rank heads (whole key/value groups) and FFN neurons on this many training batches and "
                            "slice the most important first (0: leading heads/neurons, no ordering)")
        p.add_argument("--beta", type=float, default=0.1, help="weight of the feature term (paper 0.1)")
        p.add_argument("--feature-normalization", default="none", choices=["none", "relative"],
                       help="none: the paper's squared L2 feature loss; relative: divided by the maxnet feature's")
        p.add_argument("--variants", nargs="*", help="report: other MLFS runs' work folders (e.g. without importance "
                                                     "ordering) whose palettes and curves go beside this run's")
        p.add_argument("--prompt-tokens", type=int, default=32)
        p.add_argument("--new-tokens", type=int, default=33)
        p.add_argument("--rounds", type=int, default=5)
        p.add_argument("--from-pretrained", action="store_true",
                       help="latency: time the members sliced from --model instead of the MLFS exports (same shapes)")
        p.add_argument("--out", default=str(RESULTS / "decoder_palette" / "decoder_palette"))
        p.add_argument("--notes", help="report: a markdown file of notes put under the title (default: <out>_notes.md where it exists)")
    a = ap.parse_args(argv)
    try:
        {"mlfs": lambda a: cmd_train(a, alone=False), "alone": lambda a: cmd_train(a, alone=True),
         "latency": cmd_latency, "report": cmd_report}[a.cmd](a)
    except (ValueError, FileNotFoundError) as e:
        print(f"decoder_palette: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
