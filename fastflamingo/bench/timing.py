"""Timing: medians and p20/p80 spreads, warm-up outside the measured region.

GPU: ``triton.testing.do_bench`` (CUDA events, L2 flushed between runs) when Triton is there,
CUDA events otherwise. CPU: ``time.perf_counter`` around each call, repeated until a time
budget is spent.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class Timing:
    median: float  # milliseconds
    p20: float
    p80: float
    reps: int


def _quantiles(samples: list[float]) -> Timing:
    samples = sorted(samples)
    if len(samples) == 1:
        return Timing(samples[0], samples[0], samples[0], 1)
    q = statistics.quantiles(samples, n=10, method="inclusive")
    return Timing(statistics.median(samples), q[1], q[7], len(samples))


def measure(fn: Callable[[], object], device: str, *, quick: bool = False,
            budget_s: float | None = None, min_reps: int | None = None) -> Timing:
    """Time ``fn()`` in milliseconds. ``fn`` must already have run once (compiled, warmed)."""
    if torch.device(device).type == "cuda":
        return _measure_cuda(fn, quick)
    budget = budget_s if budget_s is not None else (0.2 if quick else 0.6)
    min_reps = min_reps if min_reps is not None else (5 if quick else 9)
    fn()  # warm-up: allocator and caches
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < min_reps or (time.perf_counter() - start < budget and len(samples) < 200):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return _quantiles(samples)


def _measure_cuda(fn, quick: bool) -> Timing:
    warmup, rep = (10, 40) if quick else (25, 100)
    try:
        from triton.testing import do_bench
    except ImportError:
        return _measure_events(fn, rep)
    med, p20, p80 = do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.5, 0.2, 0.8])
    return Timing(med, p20, p80, -1)


def _measure_events(fn, rep_ms: int) -> Timing:
    fn()
    torch.cuda.synchronize()
    samples = []
    budget = time.perf_counter() + rep_ms * 1e-3
    while len(samples) < 5 or time.perf_counter() < budget:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end))
    return _quantiles(samples)


def time_once(fn: Callable[[], object], device: str) -> tuple[object, float]:
    """(result, milliseconds) of one synchronised call: for long end-to-end stages."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return out, (time.perf_counter() - t0) * 1e3


def measure_calls(fn: Callable[[], object], device: str, reps: int) -> tuple[object, Timing]:
    """For stages of tens of milliseconds or more, already run once (checked, warmed up):
    ``reps`` synchronised calls. Returns the last result and the timing."""
    out, samples = None, []
    for _ in range(reps):
        out, ms = time_once(fn, device)
        samples.append(ms)
    return out, _quantiles(samples)
