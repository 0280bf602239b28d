"""Inference latency: the one timer (`timed`), forward latency of one model (`measure_latency_ms`) or of
several taking turns (`round_robin_latency_ms`), and the summary of timed batches (`latency_summary`)."""

from __future__ import annotations

import math
import statistics
import time
from typing import Callable, Optional, Sequence, TypeVar

import torch

T = TypeVar("T")


def timed(fn: Callable[[], T], device: Optional[torch.device] = None) -> tuple[T, float]:
    """`fn()` and its wall time in seconds (`time.perf_counter`), between synchronisations of `device`
    where it is a CUDA device (its queued work finished before the clock starts and counted before it stops)."""
    sync = device is not None and torch.device(device).type == "cuda"
    if sync:
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = fn()
    if sync:
        torch.cuda.synchronize(device)
    return result, time.perf_counter() - start


def _random_batch(vocab_size: int, batch_size: int, seq_len: int, device: Optional[torch.device] = None) -> dict:
    """Full-length sequences of random token ids (seed 0) and their all-ones attention mask."""
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, vocab_size, (batch_size, seq_len), generator=generator)
    input_ids = input_ids.to(device) if device is not None else input_ids
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


@torch.inference_mode()
def measure_latency_ms(model: torch.nn.Module, vocab_size: int, batch_size: int = 1, seq_len: int = 128,
                       repeats: int = 10, warmup: int = 2, device: Optional[torch.device] = None) -> float:
    """Median wall time in milliseconds of one forward pass on a random batch of full-length sequences."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    inputs = _random_batch(vocab_size, batch_size, seq_len, device)
    times = []
    for i in range(warmup + repeats):
        _, seconds = timed(lambda: model(**inputs), device)
        if i >= warmup:
            times.append(seconds * 1000.0)
    model.train(was_training)
    return float(statistics.median(times))


@torch.inference_mode()
def round_robin_latency_ms(models: Sequence[Callable], batch_size: int, seq_len: int, vocab_size: int, warmup: int,
                           repeats: int) -> list[float]:
    """Median forward time (ms) per model on one random CPU batch (`measure_latency_ms`'s), one forward of each
    model per round, so drifts in the machine's load hit every model alike; `warmup` untimed rounds first."""
    inputs = _random_batch(vocab_size, batch_size, seq_len)
    times: list[list[float]] = [[] for _ in models]
    for round_ in range(warmup + repeats):
        for i, model in enumerate(models):
            _, seconds = timed(lambda: model(**inputs))
            if round_ >= warmup:
                times[i].append(seconds * 1000.0)
    return [statistics.median(t) for t in times]


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
