"""Peak memory of one call of a stage.

GPU: ``torch.cuda.max_memory_allocated`` over the call. Given ``held_bytes`` (the model's weights,
an optimizer's state: what a user of the call holds anyway), the peak is what the call allocates
above what was allocated before it, plus those bytes: the footprint a user needs, without the
tensors the benchmark itself holds (its reference outputs, other models, buffers of earlier
suites), which ``max_memory_allocated`` alone would count. Without it, everything allocated (a
script that holds only what it measures). CPU: the peak of the tensor memory the torch profiler's
memory timeline sees during the call: what the call allocates, and also the tensors made before it
that it reads (the weights it uses, a reused cache): not the allocations alone.
tracemalloc does not see torch's allocations and RSS does not drop when torch frees, so neither
would be right.
"""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Callable

import torch

from .env import device_name

CPU_METHOD = ("CPU: peak of the tensors allocated or read during the call (torch.profiler memory timeline; "
              "the weights it reads included)")
GPU_METHOD = "GPU: torch.cuda.max_memory_allocated during the call (everything allocated, weights included)"
GPU_HELD_METHOD = ("GPU: what the call allocates at its peak above what was allocated before it "
                   "(torch.cuda.max_memory_allocated), plus {held}: not the benchmark's own tensors")


def peak_memory_call(fn: Callable[[], object], device: str, *, held_bytes: int | None = None,
                     held: str = "the model's weights") -> tuple[object, float | None, str]:
    """(fn's result, peak MiB, how it was measured). ``held_bytes``: on a GPU, count the call's
    own allocations plus these bytes (``held`` says what they are) instead of everything
    allocated; the CPU's timeline counts what the call allocates and the older tensors it reads
    (its weights included) either way."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        if held_bytes is None:
            return out, peak / 2**20, GPU_METHOD
        return out, (peak - before + held_bytes) / 2**20, GPU_HELD_METHOD.format(held=held)
    from torch.profiler import ProfilerActivity, profile
    with _quiet_native_output(), profile(activities=[ProfilerActivity.CPU], profile_memory=True,
                                         record_shapes=True, with_stack=True) as prof:
        out = fn()
    try:
        from torch.profiler._memory_profiler import MemoryProfileTimeline
        _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline(torch.device("cpu"))
        peak = max((sum(s) for s in sizes), default=0) / 2**20
    except Exception as e:  # noqa: BLE001 - a private API: say so rather than guess
        return out, None, f"CPU memory timeline unavailable ({type(e).__name__})"
    return out, peak, CPU_METHOD


@contextlib.contextmanager
def _quiet_native_output():
    """Silence the profiler's native start/stop log lines (written to fds 1 and 2 from C++)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, devnull):
            os.close(fd)


def training_batch(model, B: int, N: int, T: int, device: str, dtype: torch.dtype):
    """(vision_x, lang_x) of the training-memory scripts (benchmarks/activation_checkpointing.py,
    finetune_memory.py): random ids, N images per row, their <image> tokens spread over T tokens."""
    c = model.config
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, (c.num_base_tokens or model.vocab_size) - 1, (B, T), generator=g)
    for i in range(N):
        ids[:, i * (T // N)] = c.media_token_id
    size = c.vision.image_size
    return torch.randn(B, N, 1, 3, size, size, generator=g).to(device, dtype), ids.to(device)


def write_report(out: str | None, name: str, device: str, argv: list[str] | None, **fields) -> dict:
    """``{device, command, **fields}``, written to ``out/name`` when ``out`` is given."""
    import json
    info = dict(device=device_name(device), command="python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])]),
                **fields)
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, name), "w") as f:
            json.dump(info, f, indent=1)
    return info
