"""What the Triton kernels (:mod:`.image_causal`, :mod:`.perceiver`) share: flags and constants,
tile loads and stores, and the host-side checks and launch options.

The device helpers are ``triton.jit`` functions that the kernels call; non-tensor arguments
(``HEAD_DIM``, ``EVEN_D``, ``UPCAST``) reach them as compile-time constants.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# the limits the kernels take, defined once with the dispatch (which must not import triton)
from fastflamingo.ops.dispatch import TRITON_DTYPES as DTYPES
from fastflamingo.ops.dispatch import TRITON_MAX_HEAD_DIM as MAX_HEAD_DIM

# Decided when the kernels are defined: triton.jit reads the variable at decoration time.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# log2(e): the kernels work in base 2 (exp2 is the native instruction)
LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)

__all__ = ["INTERPRET", "LOG2E", "DTYPES", "MAX_HEAD_DIM", "load_tile", "store_tile", "slab",
           "padded_head_dim", "num_sms", "bhs_strides", "dtype_options", "check_dtype_and_head_dim",
           "check_row_offsets"]


# ----------------------------------------------------------------------------- device helpers

@triton.jit
def load_tile(base, rows, stride_row, rows_ok, offs_d, D, EVEN_D: tl.constexpr, UPCAST: tl.constexpr):
    """A (len(rows), BLOCK_D) tile of a (rows, D) matrix whose last dim is contiguous; zeros
    outside ``rows_ok`` and ``d < D`` (padding keeps the dots exact; EVEN_D: BLOCK_D == D, no
    column mask). fp32 under ``UPCAST`` (the interpreter's bf16 trap)."""
    ptrs = base + rows[:, None] * stride_row + offs_d[None, :]
    if EVEN_D:
        x = tl.load(ptrs, mask=rows_ok[:, None], other=0.0)
    else:
        x = tl.load(ptrs, mask=rows_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def store_tile(base, x, rows, stride_row, rows_ok, offs_d, D, EVEN_D: tl.constexpr):
    """Store tile x, cast to the element type of ``base``, where ``rows_ok`` and ``d < D``."""
    ptrs = base + rows[:, None] * stride_row + offs_d[None, :]
    if EVEN_D:
        tl.store(ptrs, x.to(base.dtype.element_ty), mask=rows_ok[:, None])
    else:
        tl.store(ptrs, x.to(base.dtype.element_ty), mask=rows_ok[:, None] & (offs_d[None, :] < D))


@triton.jit
def slab(ptr, b, h, stride_b, stride_h):
    """The (b, h) slab of a (B, H, S, D) tensor. int64 offsets: B·H·S·D can exceed 2**31;
    offsets inside one slab stay int32 (:func:`check_row_offsets` checks that they fit)."""
    return ptr + b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h


# ----------------------------------------------------------------------------- host helpers

def padded_head_dim(head_dim: int) -> int:
    """The head size padded to a power of two, at least tl.dot's minimum of 16."""
    return max(16, triton.next_power_of_2(head_dim))


def autotune_enabled() -> bool:
    """Whether a launch may time several configs on first use of a shape class: on a GPU unless
    ``FASTFLAMINGO_AUTOTUNE=0`` (read at each launch); never under the interpreter."""
    return not INTERPRET and os.environ.get("FASTFLAMINGO_AUTOTUNE", "1") != "0"


def tune_bench(kernel_call, quantiles):
    """The autotuners' timer: ``triton.testing.do_bench`` with 5 ms of warm-up and 25 ms of
    repetitions per config (Triton's defaults: 25 / 100 ms). A shape class's first launch times
    every candidate config; these kernels run for microseconds, so 25 ms holds hundreds of runs."""
    return triton.testing.do_bench(kernel_call, warmup=5, rep=25, quantiles=quantiles)


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device, 0 for others (torch caches the properties:
    no sync, no query per call)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 0


def bhs_strides(t: torch.Tensor) -> tuple[int, int, int]:
    """Strides of the batch, head and sequence dims of a (B, H, S, D) tensor."""
    return t.stride(0), t.stride(1), t.stride(2)


def dtype_options(dtype: torch.dtype) -> dict:
    """Constexprs that depend on the dtype and on whether the interpreter runs the kernel."""
    return dict(UPCAST=INTERPRET and dtype == torch.bfloat16,
                # fp32 inputs get exact dots (tl.dot would round them to tf32 on a GPU);
                # fp16 / bf16 take the default (tensor cores)
                DOT_PRECISION="ieee" if dtype == torch.float32 else None)


def check_dtype_and_head_dim(where: str, q: torch.Tensor) -> None:
    """Raise, naming ``where``, if the kernels cannot take q's dtype or head size."""
    if q.dtype not in DTYPES:
        raise TypeError(f"{where}: the Triton kernels take {DTYPES}, got {q.dtype}")
    if q.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"{where}: the Triton kernels take head_dim <= {MAX_HEAD_DIM}, got {q.shape[-1]}")


def check_row_offsets(where: str, name: str, x: torch.Tensor, advice: str) -> None:
    """Raise if the row offsets of (B, H, S, D) operand x within one (b, h) slab pass int32
    (the slabs' own offsets are int64, see :func:`slab`)."""
    span = (x.shape[2] - 1) * x.stride(2) + x.shape[3] if x.dim() == 4 and x.shape[2] else 0
    if span >= 2 ** 31:
        raise ValueError(f"{where}: {name} of shape {tuple(x.shape)} and strides {x.stride()} has "
                         f"offsets of {span} within one (batch, head), beyond int32: {advice}")
