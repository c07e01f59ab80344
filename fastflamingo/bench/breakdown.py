"""Where a GPU stage's time goes: one profiled call, its CUDA kernels summed by kind.

The end-to-end suite measures wall time per stage; this says what fills it, for the next round of
work (which kernels a prefill spends its milliseconds in, whether a decode step is bound by its
kernels or by the host). Set ``FASTFLAMINGO_BREAKDOWN=DIR`` and every end-to-end prefill and
decode on CUDA is profiled once more (after its timed calls, so the times are untouched) with
``torch.profiler``; ``DIR/breakdown-<group>-<entrant>-<stage>.json`` gets, per kind of kernel
(matmul, attention, fastflamingo's Triton kernels, inductor's fused kernels, norms,
elementwise, copies, other), the kernels' summed GPU
time and count, the top kernels, and the call's wall time; ``DIR/breakdown.txt`` a table of all.
"""
from __future__ import annotations

import json
import os
import re
import time
from typing import Callable

import torch

ENV = "FASTFLAMINGO_BREAKDOWN"

# first match wins; kernel names are those CUDA / cuBLAS / PyTorch / Triton give their kernels
KINDS = (
    ("attention", re.compile(r"flash|fmha|attention|attn|sdpa|cudnn.*mha", re.I)),
    ("inductor (fused)", re.compile(r"^triton_(poi|red|per|tem)_")),
    ("fastflamingo triton", re.compile(r"^_\w*kernel$|nf4")),
    ("matmul", re.compile(r"gemm|gemv|cutlass|xmma|nvjet|cublas|sm\d+_.*_\d+x\d+|dot", re.I)),
    ("norm / softmax", re.compile(r"norm|softmax", re.I)),
    ("copy / cast", re.compile(r"copy|memcpy|memset|cat|fill|index|gather|scatter", re.I)),
    ("elementwise", re.compile(r"elementwise|vectorized|reduce|unrolled", re.I)),
)


def directory() -> str | None:
    return os.environ.get(ENV) or None


def kind_of(name: str) -> str:
    for kind, pattern in KINDS:
        if pattern.search(name):
            return kind
    return "other"


def profile_call(fn: Callable[[], object]) -> dict:
    """Profile one call of ``fn`` (already warm) on CUDA: per-kind and top kernel GPU times (ms)."""
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) * 1e3
    kernels: dict[str, list[float]] = {}
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            kernels.setdefault(ev.name, []).append(ev.device_time / 1e3)  # us -> ms
    kinds: dict[str, dict] = {}
    for name, times in kernels.items():
        k = kinds.setdefault(kind_of(name), {"ms": 0.0, "count": 0})
        k["ms"] += sum(times)
        k["count"] += len(times)
    top = sorted(((sum(t), len(t), n) for n, t in kernels.items()), reverse=True)[:20]
    gpu = sum(k["ms"] for k in kinds.values())
    return {"wall_ms_profiled": wall, "gpu_kernel_ms": gpu, "kernels": sum(k["count"] for k in kinds.values()),
            "by_kind": {k: {"ms": round(v["ms"], 3), "count": v["count"]} for k, v in
                        sorted(kinds.items(), key=lambda kv: -kv[1]["ms"])},
            "top": [{"ms": round(ms, 3), "count": n, "kernel": name[:160]} for ms, n, name in top]}


def record(group: str, entrant: str, stage: str, fn: Callable[[], object], device: str) -> None:
    """Profile ``fn`` once into the breakdown directory, when one is set and ``device`` is CUDA.
    Never raises: a failed profile is written down instead."""
    out = directory()
    if out is None or torch.device(device).type != "cuda":
        return
    os.makedirs(out, exist_ok=True)
    try:
        with torch.no_grad():
            result = profile_call(fn)
    except Exception as ex:  # noqa: BLE001 - diagnostics must not fail a benchmark
        result = {"error": f"{type(ex).__name__}: {str(ex)[:300]}"}
    result.update(group=group, entrant=entrant, stage=stage)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", f"{group}-{entrant}-{stage}").strip("-")
    with open(os.path.join(out, f"breakdown-{slug}.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(out, "breakdown.txt"), "a") as f:
        f.write(summary(result) + "\n")


def summary(result: dict) -> str:
    head = f"{result.get('group')} | {result.get('entrant')} | {result.get('stage')}"
    if "error" in result:
        return f"{head}: profile failed: {result['error']}"
    kinds = ", ".join(f"{k} {v['ms']:.2f} ms ({v['count']})" for k, v in result["by_kind"].items())
    return (f"{head}: wall {result['wall_ms_profiled']:.2f} ms (profiled), kernels {result['gpu_kernel_ms']:.2f} ms "
            f"in {result['kernels']} launches: {kinds}")
