"""Inference latency: the one timer (`measure_latency_ms`) and the summary of timed batches (`latency_summary`)."""

from __future__ import annotations

import math
import statistics
import time
from typing import Optional

import torch


@torch.inference_mode()
def measure_latency_ms(model: torch.nn.Module, vocab_size: int, batch_size: int = 1, seq_len: int = 128,
                       repeats: int = 10, warmup: int = 2, device: Optional[torch.device] = None) -> float:
    """Median wall time in milliseconds of one forward pass on a random batch of full-length sequences."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, vocab_size, (batch_size, seq_len), generator=generator).to(device)
    attention_mask = torch.ones_like(input_ids)
    times = []
    for i in range(warmup + repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        model(input_ids=input_ids, attention_mask=attention_mask)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1000.0)
    model.train(was_training)
    return float(statistics.median(times))


def latency_summary(batch_seconds: list[float], examples: int, num_runs: int) -> dict[str, float]:
    """Total seconds, per-batch mean/p50/p90 (ms) and throughput of timed inference passes."""
    ordered = sorted(batch_seconds)
    total = sum(batch_seconds)

    def quantile(q: float) -> float:  # nearest-rank
        return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]

    return {"total_s": total, "per_run_s": total / num_runs, "batch_mean_ms": 1e3 * statistics.fmean(batch_seconds),
            "batch_p50_ms": 1e3 * quantile(0.5), "batch_p90_ms": 1e3 * quantile(0.9),
            "examples_per_s": examples * num_runs / total if total > 0 else float("inf"),
            "num_batches": len(batch_seconds) // num_runs, "num_examples": examples, "num_runs": num_runs}
