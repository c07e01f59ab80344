"""``fastflamingo info``: versions, devices and which backends this machine can run."""
from __future__ import annotations

import importlib
import os
import platform

from . import versions


def import_module(name: str):
    """``importlib.import_module``, but bitsandbytes without its download of Hub code
    (:func:`fastflamingo.quant.import_bitsandbytes`)."""
    if name == "bitsandbytes":
        from .quant import import_bitsandbytes
        return import_bitsandbytes()
    return importlib.import_module(name)


def _version(name: str) -> str:
    try:
        module = import_module(name)
    except Exception as e:  # noqa: BLE001 - any import failure means "not usable here"
        return f"not available ({type(e).__name__})"
    return getattr(module, "__version__", "installed")


def collect() -> dict:
    import torch

    import fastflamingo
    info = {
        "fastflamingo": fastflamingo.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
    }
    for pkg in ("triton", "transformers", "bitsandbytes", "xformers", "flash_attn", "open_flamingo", "open_clip",
                "timm"):
        info[pkg] = _version(pkg)
    for pkg, minimum in versions.OPTIONAL.items():  # (torch and transformers: checked at import)
        if info[pkg][:1].isdigit() and versions.too_old(info[pkg], minimum):
            info[pkg] += f" (too old: fastflamingo needs >= {minimum})"
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    has_triton = not info["triton"].startswith("not available")
    info["backends"] = {
        "ops backend triton": ("yes (CUDA)" if info["cuda_available"] and has_triton else
                               "interpreter (TRITON_INTERPRET=1)" if interp and has_triton else "no"),
        "ops backend native": _native(),
        "ops backend torch": "yes",
        "ops backend reference": "yes",
        "baseline flex_attention": "yes" if _has("torch.nn.attention.flex_attention") else "no",
        # torch's varlen attention runs flash-attention kernels: CUDA only (the CPU raises)
        "baseline varlen_attn": ("no" if not _has("torch.nn.attention.varlen") else
                                 "yes (CUDA)" if info["cuda_available"] else "CUDA only (no GPU here)"),
    }
    return info


def _native() -> str:
    from . import native
    if native.available():
        return f"yes (loaded {native.library_path()})"
    return f"no: {native.unavailable_reason()} (fastflamingo build-native builds it)"


def _has(module: str) -> bool:
    try:
        import_module(module)
        return True
    except Exception:  # noqa: BLE001
        return False


def run(args) -> int:
    info = collect()
    if args.json:
        import json
        print(json.dumps(info, indent=2))
        return 0
    width = max(len(k) for k in info)
    for key, value in info.items():
        if isinstance(value, dict):
            print(f"{key}:")
            for k, v in value.items():
                print(f"  {k}: {v}")
        else:
            print(f"{key:<{width}}  {value}")
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("info", help="versions, devices and available backends")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)
