"""Where a benchmark runs: the device in words, the package versions, the memory bandwidth.

Every row the suite writes carries :func:`device_name` and :func:`versions`, so a number is
never separated from the machine that produced it.
"""
from __future__ import annotations

import functools
import os
import platform

import torch

from ..info import _has as has_module  # noqa: F401 - importable here: re-exported for the suites
from ..info import import_module

PACKAGES = ("torch", "triton", "transformers", "open_flamingo", "open_clip", "bitsandbytes",
            "xformers", "flash_attn")


@functools.lru_cache(maxsize=None)
def device_name(device: str) -> str:
    """'NVIDIA H100 80GB HBM3' or '<cpu model>, N cores' (what the rows and table print)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} cores"


@functools.lru_cache(maxsize=None)
def versions() -> str:
    """'torch 2.14.1; triton 3.8.0; ...' for the packages that are importable."""
    from importlib import metadata
    parts = []
    for name in PACKAGES:
        try:
            module = import_module(name)
        except Exception:  # noqa: BLE001 - not importable here: leave it out
            continue
        version = getattr(module, "__version__", None)
        if version is None:
            try:
                version = metadata.version(name.replace("_", "-"))
            except metadata.PackageNotFoundError:
                version = "?"
        parts.append(f"{name} {version}")
    return "; ".join(parts)


@functools.lru_cache(maxsize=None)
def code_version() -> str:
    """``git describe --always --dirty`` of the checkout fastflamingo runs from, where it is one,
    else the installed package's version (``fastflamingo <version>``)."""
    import subprocess
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "-C", here, "describe", "--always", "--dirty"], capture_output=True,
                             text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        out = ""
    if out:
        return out
    from importlib.metadata import PackageNotFoundError, version
    try:
        return f"fastflamingo {version('fastflamingo')}"
    except PackageNotFoundError:
        return "unknown"


@functools.lru_cache(maxsize=None)
def copy_bandwidth(device: str) -> float:
    """Measured device copy bandwidth in bytes/s (bytes read + bytes written).

    GPU: a 1 GiB device-to-device copy timed with do_bench. CPU: a 256 MiB memcpy through
    ``Tensor.copy_`` (the median of 5), which is what a memory-bound CPU op can hope for.
    """
    from .timing import measure
    n = (1 << 30 if torch.device(device).type == "cuda" else 1 << 28) // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    t = measure(lambda: dst.copy_(src), device, quick=True)
    return 2 * src.numel() * src.element_size() / (t.median * 1e-3)
