"""Fused 4-bit (NF4 / FP4) dequantize-matmul in Triton for a few activation rows (decoding).

``y = x @ W.T (+ bias)`` for x (M, K) with small M, where W (N, K) is stored exactly as
bitsandbytes' ``Params4bit`` stores it (``bitsandbytes.functional.quantize_4bit``):

* ``weight``: uint8, the row-major flattened W, two 4-bit codes per byte, the **high nibble
  first**: element ``i = n·K + k`` is nibble ``i & 1`` of byte ``i >> 1``, ``byte >> 4`` for even
  i and ``byte & 15`` for odd i (ceil(N·K / 2) bytes; one pad nibble when N·K is odd).
* ``absmax``: one scale per ``BLOCKSIZE`` consecutive elements of the *flattened* W (blocks run
  across rows when K is not a multiple of the block size): ``W[i] = code[q_i] · absmax[i // BLOCKSIZE]``.
* nested ("double quantization", ``compress_statistics=True``): ``absmax`` is uint8 and the
  scale is ``code2[absmax[b]] · absmax2[b // BLOCKSIZE2] + offset`` (``code2``: bitsandbytes'
  256-entry dynamic map; BLOCKSIZE2 is 256 in every bitsandbytes layer).

The kernel reads each packed byte and each scale once, dequantizes in registers and accumulates
in fp32: the op is bound by the weight bytes (0.5 per weight plus the scales), four times less
than a bf16 weight.

Tiling (a GEMV with up to 32 rows; every choice is about streaming W once at full bandwidth):

* Grid (cdiv(N, BLOCK_N), SPLIT_K, cdiv(M, BLOCK_M)). A program owns BLOCK_N output features
  and a contiguous range of K steps, and keeps all (<= 32) rows of x for them, so W is read
  exactly once (M > 32 re-reads it per 32 rows: large M belongs to bitsandbytes' dequantize +
  cuBLAS path). At decode shapes cdiv(N, BLOCK_N) alone is 64-172 programs, about one per SM of
  an H100: too few loads in flight to saturate HBM, so K is split (SPLIT_K programs per tile,
  chosen for ~4 programs per SM, each keeping at least a few K steps) and the partial sums are
  added with fp32 atomics into a zeroed fp32 buffer (then one cast). Atomics make the summation
  order, hence the last bits of fp32 partials, vary from run to run; SPLIT_K = 1 (one plain
  store, bias and cast fused) is deterministic.
* x tiles go through ``tl.dot`` padded to 16 rows (its minimum): with M <= 16 the tensor cores
  are idle most of the time anyway, and the padding costs no memory traffic.
* Aligned path (ALIGNED, the common case: K a multiple of BLOCK_K, BLOCK_K a power of two
  <= BLOCKSIZE, so every (row, K step) segment lies inside one quantization block): a step
  loads a (BLOCK_N, BLOCK_K / 2) tile of bytes, splits it into the even (high nibble) and odd
  (low nibble) columns, looks the codes up in the 16-entry table (an L1-resident gather), and
  takes two dots against the even and odd columns of x — no interleave. The scale, one per
  (row, step), multiplies the step's partial dot in fp32 (not every weight).
* General path (any K, odd included, any block layout): per element byte gather with the
  nibble chosen by the parity of ``n·K + k`` and a per-element scale; masks on N and K. Slower,
  exact, for shapes that real models do not have.

Under the Triton interpreter (the CPU) bf16 arithmetic is wrong, so bf16 x is upcast to fp32 at
load there (``UPCAST``); on a GPU the codes are cast to x's dtype and the dots run in it
(fp32 x: exact "ieee" dots).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import DTYPES, INTERPRET, dtype_options, num_sms

__all__ = ["nf4_matmul", "block_sizes", "INTERPRET", "DTYPES", "MAX_BLOCK_M"]

MAX_BLOCK_M = 32        # rows of x one program keeps (registers); more rows -> more M tiles
MIN_BLOCK_K = 32        # tl.dot needs >= 16 along K, and the aligned path takes half a step per dot
MAX_BLOCK_K = 64        # 128 doubles the registers (214 at BLOCK_M 16, spills at 32; ptxas, sm_90)


# ----------------------------------------------------------------------------- device helpers

@triton.jit
def _scales(Absmax, Absmax2, Code2, offset, blk, mask, NESTED: tl.constexpr, BLOCKSIZE2: tl.constexpr):
    """fp32 scales of quantization blocks ``blk`` (any shape); 0 where ``mask`` is False."""
    if NESTED:
        q = tl.load(Absmax + blk, mask=mask, other=0).to(tl.int32)
        s = tl.load(Code2 + q) * tl.load(Absmax2 + blk // BLOCKSIZE2, mask=mask, other=0.0) + offset
        return tl.where(mask, s, 0.0)
    return tl.load(Absmax + blk, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _x_tile(X, offs_m, m_ok, cols, col_ok, stride_xm, stride_xk, UPCAST: tl.constexpr):
    """(BLOCK_M, len(cols)) tile of x, zeros outside the rows and columns given."""
    x = tl.load(X + offs_m[:, None] * stride_xm + cols[None, :] * stride_xk,
                mask=m_ok[:, None] & col_ok[None, :], other=0.0)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _codes(Code, q, like, UPCAST: tl.constexpr):
    """Code-table values of 4-bit codes q, in the dtype the dot takes against ``like``."""
    c = tl.load(Code + q)
    if UPCAST:
        return c
    return c.to(like.dtype)


# ----------------------------------------------------------------------------- kernel

@triton.jit
def _nf4_matmul_kernel(X, W, Absmax, Code, Absmax2, Code2, Offset, Bias, Out,
                       M, N, K, stride_xm, stride_xk, stride_om, steps_per_split,
                       BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr,
                       HAS_BIAS: tl.constexpr, ALIGNED: tl.constexpr, ATOMIC: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    offset = 0.0
    if NESTED:
        offset = tl.load(Offset).to(tl.float32)
    row_start = offs_n.to(tl.int64) * K            # flat index of W[n, 0]: N·K may pass 2**31
    s_lo = pid_k * steps_per_split
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)

    if ALIGNED:
        s_hi = tl.minimum(s_lo + steps_per_split, K // BLOCK_K)
        offs_j = tl.arange(0, BLOCK_K // 2)
        all_cols = offs_j < BLOCK_K // 2           # no K mask: K is a multiple of BLOCK_K
        for step in range(s_lo, s_hi):
            k0 = step * BLOCK_K
            # bytes (n, k0/2 + j) hold elements k0 + 2j (high nibble) and k0 + 2j + 1 (low)
            b = tl.load(W + (row_start[:, None] + k0) // 2 + offs_j[None, :], mask=n_ok[:, None], other=0)
            b = b.to(tl.int32)
            x_even = _x_tile(X, offs_m, m_ok, k0 + 2 * offs_j, all_cols, stride_xm, stride_xk, UPCAST)
            x_odd = _x_tile(X, offs_m, m_ok, k0 + 2 * offs_j + 1, all_cols, stride_xm, stride_xk, UPCAST)
            w_even = _codes(Code, b >> 4, x_even, UPCAST)
            w_odd = _codes(Code, b & 15, x_even, UPCAST)
            part = tl.dot(x_even, tl.trans(w_even), input_precision=DOT_PRECISION)
            part = tl.dot(x_odd, tl.trans(w_odd), part, input_precision=DOT_PRECISION)
            # the whole (row, step) segment lies in block (n·K + k0) // BLOCKSIZE: one scale
            scale = _scales(Absmax, Absmax2, Code2, offset, (row_start + k0) // BLOCKSIZE, n_ok,
                            NESTED, BLOCKSIZE2)
            acc += part * scale[None, :]
    else:
        s_hi = tl.minimum(s_lo + steps_per_split, tl.cdiv(K, BLOCK_K))
        offs_k = tl.arange(0, BLOCK_K)
        for step in range(s_lo, s_hi):
            cols = step * BLOCK_K + offs_k
            k_ok = cols < K
            ok = n_ok[:, None] & k_ok[None, :]
            idx = row_start[:, None] + cols[None, :]
            b = tl.load(W + (idx >> 1), mask=ok, other=0).to(tl.int32)
            q = (b >> (4 - 4 * (idx & 1)).to(tl.int32)) & 15      # even index: high nibble
            x = _x_tile(X, offs_m, m_ok, cols, k_ok, stride_xm, stride_xk, UPCAST)
            w = tl.load(Code + q) * _scales(Absmax, Absmax2, Code2, offset, idx // BLOCKSIZE, ok,
                                            NESTED, BLOCKSIZE2)
            if not UPCAST:
                w = w.to(x.dtype)
            acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)

    if HAS_BIAS:
        bias = tl.load(Bias + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        if ATOMIC:
            bias = tl.where(pid_k == 0, bias, 0.0)   # added once, by the first K split
        acc += bias[None, :]
    out_ptrs = Out + offs_m[:, None] * stride_om + offs_n[None, :]
    out_ok = m_ok[:, None] & n_ok[None, :]
    if ATOMIC:
        tl.atomic_add(out_ptrs, acc, mask=out_ok)
    else:
        tl.store(out_ptrs, acc.to(Out.dtype.element_ty), mask=out_ok)


# ----------------------------------------------------------------------------- host side

def _aligned_block_k(K: int, blocksize: int) -> int | None:
    """The largest power of two in [MIN_BLOCK_K, min(MAX_BLOCK_K, blocksize)] dividing K, or
    None (then the general path runs). Such a BLOCK_K divides the block size too, so every
    BLOCK_K-long segment of a row starting at a multiple of BLOCK_K lies in one block."""
    bk = min(MAX_BLOCK_K, blocksize)
    while bk >= MIN_BLOCK_K:
        if K % bk == 0:
            return bk
        bk //= 2
    return None


def block_sizes(M: int, N: int, K: int, blocksize: int, device: torch.device, *,
                split_k: int | None = None, block_n: int | None = None) -> dict:
    """Launch parameters: BLOCK_M, BLOCK_N, BLOCK_K, ALIGNED, the K split, the grid, warps and stages.

    Chosen without a GPU at hand: the tiles are the largest whose sm_90 build (ptxas -v on the
    kernel compiled for an H100 target) needs no register spills with 4 warps, about 120
    registers on the aligned path at BLOCK_M 16 (four programs per SM); the split and BLOCK_N
    are unmeasured starting points to tune with ``fastflamingo.bench.nf4`` on the GPU.
    ``split_k`` / ``block_n`` override them.
    """
    block_m = max(16, min(MAX_BLOCK_M, triton.next_power_of_2(max(M, 1))))
    bk = _aligned_block_k(K, blocksize)
    aligned = bk is not None
    # the general path's per-element gathers hold more registers: smaller tiles, no pipelining
    # (fp32, 32 rows: 96 registers, no spills, where 64x64 with 3 stages spilled kilobytes)
    block_n = block_n or (64 if aligned else 32)
    block_k = bk if aligned else MIN_BLOCK_K
    n_steps = K // block_k if aligned else triton.cdiv(K, block_k)
    n_tiles, m_tiles = triton.cdiv(N, block_n), triton.cdiv(M, block_m)
    if split_k is None:
        # ~4 programs per SM, each with at least 4 K steps (CPU tensors: no split)
        target = 4 * num_sms(device)
        split_k = max(1, min(triton.cdiv(target, n_tiles * m_tiles), n_steps // 4))
    split_k = max(1, min(split_k, n_steps))
    steps_per_split = triton.cdiv(n_steps, split_k)
    split_k = triton.cdiv(n_steps, steps_per_split)         # no program without a step
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, ALIGNED=aligned, split_k=split_k,
                steps_per_split=steps_per_split, grid=(n_tiles, split_k, m_tiles),
                num_warps=4, num_stages=3 if aligned else 1)


def nf4_matmul(x: torch.Tensor, weight: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
               absmax2: torch.Tensor | None, code2: torch.Tensor | None, offset: torch.Tensor | None,
               bias: torch.Tensor | None, out_features: int, blocksize: int, blocksize2: int = 256, *,
               split_k: int | None = None, block_n: int | None = None) -> torch.Tensor:
    """``x @ W.T (+ bias)`` with W (out_features, K) in bitsandbytes' packed 4-bit layout.

    The caller (:mod:`fastflamingo.ops.nf4`) validates shapes and dtypes; this checks only what
    the kernel itself relies on.

    Args:
        x: (M, K) fp16 / bf16 / fp32, any strides.
        weight: uint8, ceil(N·K / 2) packed bytes (any shape, e.g. bitsandbytes' (bytes, 1)).
        absmax: (ceil(N·K / blocksize),) fp32 scales, or uint8 when nested.
        code: (16,) fp32 code table (``quant_state.code``: NF4 or FP4).
        absmax2, code2, offset: nested statistics (``state2.absmax``, ``state2.code``,
            ``quant_state.offset`` as a 0-d tensor), or all None.
        bias: (N,) or None.
        out_features: N.
        blocksize, blocksize2: elements per scale, scales per nested scale.
        split_k, block_n: override the launch heuristic (:func:`block_sizes`).

    Returns:
        (M, N) in x's dtype.
    """
    if x.dtype not in DTYPES:
        raise TypeError(f"nf4_matmul: the Triton kernel takes x in {DTYPES}, got {x.dtype}")
    if weight.dtype != torch.uint8:
        raise TypeError(f"nf4_matmul: weight must be the packed uint8 bytes, got {weight.dtype}")
    M, K = x.shape
    N = int(out_features)
    nested = absmax2 is not None
    out = torch.empty((M, N), device=x.device, dtype=x.dtype)
    if M == 0 or N == 0:
        return out
    if K == 0:
        return out.zero_() if bias is None else out.copy_(bias.expand(M, N))
    p = block_sizes(M, N, K, blocksize, x.device, split_k=split_k, block_n=block_n)
    atomic = p["split_k"] > 1
    # split K: partial sums meet in an fp32 buffer (fp32 x: the output itself)
    acc = (out.zero_() if x.dtype == torch.float32 else torch.zeros((M, N), device=x.device,
                                                                   dtype=torch.float32)) if atomic else out
    dummy = absmax  # never read: stands in for the absent optional tensors
    _nf4_matmul_kernel[p["grid"]](
        x, weight, absmax, code,
        absmax2 if nested else dummy, code2 if nested else dummy, offset if nested else dummy,
        bias if bias is not None else dummy, acc,
        M, N, K, x.stride(0), x.stride(1), acc.stride(0), p["steps_per_split"],
        BLOCKSIZE=int(blocksize), BLOCKSIZE2=int(blocksize2), NESTED=nested, HAS_BIAS=bias is not None,
        ALIGNED=p["ALIGNED"], ATOMIC=atomic, BLOCK_M=p["BLOCK_M"], BLOCK_N=p["BLOCK_N"], BLOCK_K=p["BLOCK_K"],
        num_warps=p["num_warps"], num_stages=p["num_stages"], **dtype_options(x.dtype))
    return out if acc is out else out.copy_(acc)
