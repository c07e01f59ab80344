"""Helpers shared by the tests and the benchmarks' output checks.

The tolerance rule is flash-attention's: compute the reference in fp32 and the same reference
in the low-precision dtype; a fast path may be at most ``factor`` times further from the fp32
reference than the low-precision reference is (2x for outputs, 3x for gradients), plus a small
absolute floor for values that are exactly representable.
"""
from __future__ import annotations

import torch


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item() if a.numel() else 0.0


def assert_close_by_rule(fast: torch.Tensor, ref_fp32: torch.Tensor, ref_lowp: torch.Tensor,
                         *, factor: float = 2.0, floor: float | None = None, name: str = "output"):
    """Assert ``|fast - ref_fp32| <= factor * |ref_lowp - ref_fp32| + floor`` (max norms).

    ``floor`` defaults to a few units in the last place of the dtype of ``fast``, so that an
    fp32 fast path is compared at fp32 precision.
    """
    if floor is None:
        eps = torch.finfo(fast.dtype).eps if fast.dtype.is_floating_point else 0.0
        floor = 4 * eps * max(1.0, ref_fp32.float().abs().max().item() if ref_fp32.numel() else 1.0)
    err = max_abs_diff(fast, ref_fp32)
    base = max_abs_diff(ref_lowp, ref_fp32)
    bound = factor * base + floor
    if not err <= bound:
        raise AssertionError(
            f"{name}: max |fast - ref_fp32| = {err:.3e} exceeds {factor} x |ref_{fast.dtype} - ref_fp32| "
            f"({base:.3e}) + {floor:.1e} = {bound:.3e}")
