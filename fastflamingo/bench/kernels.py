"""The kernel suite: image-causal cross-attention, Perceiver attention, the resampler layer.

Head geometry comes from the preset (cross-attention heads x head_dim, latents per image,
resampler heads, vision width, ViT tokens per image); the sweep sizes from the device and
``--quick``.

On a GPU every provider is timed by CUDA-graph replay (its GPU time, :mod:`.timing`), and
fastflamingo gets one more column, ``fastflamingo eager`` (:data:`.harness.EAGER`): its eager call
timed by CUDA events (what a call costs with its host launch and dispatch time, where that is
longer than the GPU work), next to its GPU time.
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..presets import preset_config
from . import image_causal, perceiver
from .harness import run_case
from .rows import Row


@dataclass
class KernelConfig:
    dtype: torch.dtype
    heads: int                 # cross-attention H
    dim_head: int              # cross-attention D
    latents: int               # L, visual tokens per image
    n_sweep: tuple             # (B, T, [N, ...]): images per sequence at fixed text length
    t_sweep: tuple             # (B, N, [T, ...]): text length at fixed images
    extra: list                # [(B, N, T), ...] more single points (the ANCHORS rows)
    images: list               # Perceiver sweep: images (x frames) per batch
    tokens: int                # V, ViT tokens per image
    r_heads: int
    r_dim_head: int
    dim: int                   # vision width (the resampler layer's width)
    bwd_sweeps: tuple = ("N", "images")  # sweeps that also run fwd+bwd


def default_config(preset: str, device: str, quick: bool) -> KernelConfig:
    c = preset_config(preset)
    x, r, v = c.cross_attention, c.resampler, c.vision
    hf = v.hf_config or {}
    patches = (hf.get("image_size", v.image_size) // hf.get("patch_size", 14)) ** 2
    # IDEFICS-style cross-attention uses the LM's own heads (heads/dim_head None in the config)
    heads = x.heads or c.lm.get("num_attention_heads") or c.lm.get("n_heads")
    width = c.lm.get("hidden_size") or c.lm.get("d_model")
    geometry = dict(heads=heads, dim_head=x.dim_head or width // heads, latents=r.num_latents, tokens=patches + 1,
                    r_heads=r.heads, r_dim_head=r.dim_head, dim=v.dim)
    if torch.device(device).type == "cuda":
        sizes = dict(dtype=torch.bfloat16, n_sweep=(8, 2048, [4, 16, 64] if quick else [4, 8, 16, 32, 64]),
                     t_sweep=(8, 8, [256, 1024, 4096] if quick else [256, 512, 1024, 2048, 4096]),
                     extra=[] if quick else [(8, 4, 256), (8, 16, 1024), (2, 64, 4096)],
                     images=[64, 256])
    elif quick:
        sizes = dict(dtype=torch.float32, n_sweep=(2, 256, [2, 4, 8]), t_sweep=(2, 4, [128, 512]), extra=[],
                     images=[4, 16])
    else:
        sizes = dict(dtype=torch.float32, n_sweep=(2, 512, [2, 4, 8, 16, 32]), t_sweep=(2, 8, [128, 256, 1024, 2048]),
                     extra=[], images=[8, 32, 64])
    return KernelConfig(**geometry, **sizes)


def _points(cfg: KernelConfig):
    """(sweep, x_value, B, N, T) for every image-causal point."""
    B, T, Ns = cfg.n_sweep
    out = [("N", N, B, N, T) for N in Ns]
    B, N, Ts = cfg.t_sweep
    out += [("T", T, B, N, T) for T in Ts]
    out += [("anchor", N, B, N, T) for B, N, T in cfg.extra]
    return out


# issue 3's goal points (B, N, T): measured before the sweeps, so that a suite cut off by its time
# limit on the GPU machine (first uses autotune and compile) has them
GOAL_POINTS = ((8, 32, 2048), (8, 4, 256))


def _priority(task) -> int:
    """Run order: the Perceiver cases (issue 6's goals, all of them), issue 3's goal points, the
    N sweep, the other anchors, the T sweep."""
    kind, point = task
    if kind != "xattn":
        return 0
    sweep, _, B, N, T = point
    return 1 if (B, N, T) in GOAL_POINTS else {"N": 2, "anchor": 3}.get(sweep, 4)


def _modes(cfg: KernelConfig, sweep: str) -> tuple[str, ...]:
    return ("fwd", "fwd+bwd") if sweep in cfg.bwd_sweeps else ("fwd",)


def run(cfg: KernelConfig, device: str, *, quick: bool = False, progress: bool = True, on_rows=None) -> list[Row]:
    """Every case of ``cfg``; ``on_rows(rows)`` after each (to save partial results). The cases run
    in :func:`_priority` order; the rows come in the order of the sweeps."""
    warnings.filterwarnings("ignore", message=".*flex_attention.*")
    tasks = [("perceiver", n) for n in cfg.images] + [("layer", n) for n in cfg.images] + \
            [("xattn", p) for p in _points(cfg)]
    order = sorted(range(len(tasks)), key=lambda i: (_priority(tasks[i]), i))
    by_task: dict[int, list[Row]] = {}

    def in_sweep_order() -> list[Row]:
        return [r for j in sorted(by_task) for r in by_task[j]]
    # a point in two sweeps (B=8 N=8 T=2048 on a GPU) is measured once, in every mode either
    # sweep asks for: two measurements of it disagreed (one run's flex 49 vs 108 us), and the table
    # and goals, keyed on the point, kept one of them
    wanted: dict[tuple, set] = {}
    for kind, point in tasks:
        if kind == "xattn":
            wanted.setdefault(point[2:], set()).update(_modes(cfg, point[0]))
    done: dict = {}
    for i in tqdm(order, desc="kernels", disable=not progress, unit="case"):
        kind, point = tasks[i]
        by_task[i] = rows = []
        if kind == "xattn":
            sweep, xv, B, N, T = point
            if (B, N, T) not in done:
                modes = tuple(m for m in ("fwd", "fwd+bwd") if m in wanted[B, N, T])
                case = image_causal.make_case(B, cfg.heads, T, N, cfg.latents, cfg.dim_head, cfg.dtype, device)
                done[B, N, T] = run_case(case, image_causal.providers(device, cfg.latents), modes, device, quick=quick)
            rows += [dataclasses.replace(r, sweep=sweep, x_value=xv) for r in done[B, N, T]
                     if r.mode in _modes(cfg, sweep) or r.mode not in ("fwd", "fwd+bwd")]
        elif kind == "perceiver":
            case = perceiver.attention_case(point, cfg.tokens, cfg.latents, cfg.r_heads, cfg.r_dim_head,
                                            cfg.dtype, device)
            rows += run_case(case, perceiver.attention_providers(device), ("fwd", "fwd+bwd"), device, quick=quick)
        else:
            case, layer = perceiver.layer_case(point, cfg.tokens, cfg.latents, cfg.dim, cfg.r_heads,
                                               cfg.r_dim_head, cfg.dtype, device)
            providers = perceiver.layer_providers(layer, point, cfg.tokens, cfg.latents)
            rows += run_case(case, providers, ("fwd", "fwd+bwd"), device, quick=quick, roofline=False)
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
        if on_rows is not None:
            on_rows(in_sweep_order())
    return in_sweep_order()
