"""Fused image-causal cross-attention in Triton: forward and backward.

Text queries q (B, H, T, D) attend to the visual keys k, v (B, H, N·L, D) of their images.
``text_time`` (B, T) int32 says which image each token sees: 0 = none (exact zero output and
zero gradients), m >= 1 = image m, whose keys are [(m - 1)·L, m·L). Immediate mode sees image
``text_time[t]`` only; all-previous mode sees images ``1 .. text_time[t]``. ``text_time`` need
not be monotone (IDEFICS resets it to 0 after an EOS token), but its nonzero values never
decrease along T, so the tokens of one image are contiguous — the kernels rely on that.

Design (memory-bound op: every choice is about reading q, k, v once and skipping keys):

* Forward, one program per (query tile, batch·head). The tile loads its ``text_time`` and from
  it the only keys any of its tokens may see: [(min nonzero tt - 1)·L, max tt·L) in immediate
  mode, [0, max tt·L) in all-previous mode. It loops over those key blocks only, with an
  online softmax in fp32, so immediate-mode cost does not grow with the number of images.
  No dense mask, no per-batch mask build, no host synchronisation.
* Backward, FA2-style without atomics: a small kernel computes ``delta = rowsum(dO·O)``; then
  one launch runs two kinds of programs per batch·head: dK/dV programs, one per key block,
  loop over the query range that may see the block, and dQ programs, one per query tile, loop
  over the forward's key range. Each output element is written by exactly one program (no
  atomics, no fp32 scratch buffers, no zero-fill, no extra cast kernel; images nobody sees get
  zero dK/dV naturally) at the cost of recomputing q·kᵀ in both kinds of program — cheap here,
  where the op is memory-bound and each key block is seen by only a few query tiles.
  The query range of each image comes from an on-device search: ``searchsorted`` on
  ``cummax(text_time)`` gives the first token whose image is >= m, for every m.

Launch configs: key blocks are sized to one image (BLOCK_N, fixed by L); on a GPU Triton's
autotuner picks the query tile, warps and pipeline stages (BLOCK_M, num_warps, num_stages) of the
forward and of the backward's main kernel among spill-free candidates, the heuristic's
(``_block_sizes``) among them, once per (T and B·H rounded up to powers of two, L, head size,
dtype, mode). ``FASTFLAMINGO_AUTOTUNE=0`` (read at each launch) turns that off: the heuristic
config only, no timing runs. Small launches (under one wave of programs) and the interpreter
always take the heuristic config. Timing runs repeat a launch on its real arguments, which is
safe: every output element is written once, never accumulated (no reset between runs).

Under the Triton interpreter (``TRITON_INTERPRET=1``, the CPU) bf16 arithmetic and bf16
``tl.dot`` are wrong, so bf16 tiles are upcast to fp32 at load there (``UPCAST``); on a GPU
the dots run in the input dtype on the tensor cores, fp32 inputs with exact ("ieee") dots.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# INTERPRET: the kernels are defined for Triton's interpreter; LOG2E: they work in base 2;
# DTYPES, MAX_HEAD_DIM: what they take (larger heads would not fit a tile in registers)
# (load_tile / store_tile get HEAD_DIM with EVEN_D=False: the head-dim mask always applies)
from .common import (DTYPES, INTERPRET, LOG2E, MAX_HEAD_DIM, autotune_enabled, bhs_strides,
                     check_dtype_and_head_dim, check_row_offsets, dtype_options, load_tile, num_sms,
                     padded_head_dim, slab, store_tile, tune_bench)

__all__ = ["image_causal_fwd", "image_causal_bwd", "image_query_start", "INTERPRET", "DTYPES", "MAX_HEAD_DIM"]


# ----------------------------------------------------------------------------- launch configs


def _block_sizes(q: torch.Tensor, latents_per_media: int, only_immediate: bool,
                 *, max_block_m: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D, num_warps) for queries q (B, H, T, D) from its head size,
    dtype and length, and the image size: the heuristic launch (with 2 stages), which is what
    runs without autotuning.

    BLOCK_D is the head size padded to a power of two (>= 16, tl.dot's minimum). In immediate
    mode a token sees L keys, so key blocks are sized to L (a power of two between 16 and 64):
    a key block much larger than an image would mostly load keys nobody in the tile sees.
    Query tiles shrink for heads over 128 or fp32 (registers), for short T (decoding, T = 1),
    and when full-size tiles would leave the GPU's multiprocessors with less than two programs
    each. fp32 takes exact ("ieee") dots, which the GPU runs as FMA loops holding their operands
    in registers: smaller tiles and 8 warps, which compile for sm_90 without register spills in
    Triton 3.6 and 3.8 (``benchmarks/compile_check.py``; 64-key blocks spilled).
    """
    B, H, T, D = q.shape
    block_d = padded_head_dim(D)
    block_n = min(64, max(16, triton.next_power_of_2(latents_per_media))) if only_immediate else 64
    block_m = max_block_m
    fp32 = q.dtype == torch.float32
    if block_d > 128:
        block_n, block_m = min(block_n, 32), block_m // 2
    elif fp32:
        block_m //= 2
    if fp32:
        block_m = min(block_m, 64 if block_d <= 64 else 32)
        block_n = min(block_n, 32 if block_d <= 64 else 16)
    if block_m > 64 and triton.cdiv(T, block_m) * B * H < 2 * num_sms(q.device):
        block_m //= 2
    block_m = min(block_m, max(16, triton.next_power_of_2(T)))
    num_warps = 8 if block_d > 64 or fp32 else 4
    return block_m, block_n, block_d, num_warps


def _stages(block_m: int, num_warps: int, stages=(1, 2, 3)) -> list[tuple[int, int, int]]:
    """(block_m, num_warps, s) for each number of pipeline stages s."""
    return [(block_m, num_warps, s) for s in stages]


# What autotuning may offer, as (BLOCK_M, num_warps, num_stages), by (backward, fp32, BLOCK_D
# class: 64 for heads up to 64, 128, 256). Each list holds the heuristic's configs at long T and
# only triples that compile for sm_90 without register spills in Triton 3.6 and 3.8 with every
# BLOCK_N the heuristic pairs with them (``benchmarks/compile_check.py`` builds every one).
# BLOCK_N stays the heuristic's (key blocks sized to one image). What is missing spilled in one
# version at some point: bf16 / fp16 forward 128-token tiles with 4 warps for heads over 64, the
# backward's 128-token tiles but for (128, 8 warps, 1 stage) at heads up to 64, and for fp32
# (exact dots: FMA loops with their operands in registers) every alternative to the heuristic's
# (32, 8, 2) for heads over 64, 4 warps in the backward, (32, 8, 2) in the forward at head 64.
_TUNE_TABLE = {
    (False, False, 64): _stages(128, 4) + _stages(128, 8) + _stages(64, 4) + _stages(64, 8),
    (False, False, 128): _stages(128, 8) + _stages(64, 8) + _stages(64, 4),
    (False, False, 256): _stages(64, 8) + _stages(32, 8),
    (False, True, 64): _stages(64, 8, (2, 3)) + _stages(32, 8, (1, 3)) + _stages(32, 4),
    (False, True, 128): [(32, 8, 2)],
    (False, True, 256): [(32, 8, 2)],
    (True, False, 64): _stages(64, 4) + _stages(64, 8) + _stages(32, 4, (2,)) + _stages(32, 8, (2,)) + [(128, 8, 1)],
    (True, False, 128): _stages(64, 8) + _stages(32, 8) + _stages(32, 4, (2,)),
    (True, False, 256): _stages(32, 8),
    (True, True, 64): _stages(32, 8),
    (True, True, 128): [(32, 8, 2)],
    (True, True, 256): [(32, 8, 2)],
}


def _launch_configs(q: torch.Tensor, latents_per_media: int, only_immediate: bool,
                    *, backward: bool, sizes: tuple[int, int, int, int] | None = None) -> list[tuple[int, int, int]]:
    """(BLOCK_M, num_warps, num_stages) candidates for one launch, the heuristic's first.

    Only the heuristic's without autotuning, and for launches of less than one program per
    multiprocessor at 64-token tiles (decoding, short prompts, small batches): their time is
    mostly launch latency, not worth seconds of compiling and timing the candidates.
    ``sizes``: the launch's :func:`_block_sizes`, where the caller has them already.
    """
    block_m, _, block_d, num_warps = sizes or _block_sizes(q, latents_per_media, only_immediate,
                                                           max_block_m=64 if backward else 128)
    heuristic = (block_m, num_warps, 2)
    B, H, T, _ = q.shape
    if not autotune_enabled() or B * H * triton.cdiv(T, 64) < num_sms(q.device):
        return [heuristic]
    fits = max(16, triton.next_power_of_2(T))
    table = _TUNE_TABLE[(backward, q.dtype == torch.float32, max(64, block_d))]
    return [heuristic] + [c for c in table if c[0] <= fits and c != heuristic]


def _tune_configs() -> list[triton.Config]:
    """Every config the kernels' autotuners may be offered; :func:`_prune` keeps a launch's."""
    triples = dict.fromkeys((m, w, s) for m in (16, 32, 64, 128) for w in (4, 8) for s in (1, 2, 3))
    return [triton.Config({"BLOCK_M": m}, num_warps=w, num_stages=s) for m, w, s in triples]


# what changes the best config (with the dtypes, which Triton's autotuner adds itself)
_TUNE_KEY = ["T_BUCKET", "BH_BUCKET", "L", "HEAD_DIM", "IMMEDIATE"]


def _prune(backward: bool):
    """Autotune pruning: the configs of :func:`_launch_configs` for this launch."""
    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        want = _launch_configs(args["Q"], args["L"], args["IMMEDIATE"], backward=backward)
        return [c for triple in want for c in configs
                if (c.kwargs["BLOCK_M"], c.num_warps, c.num_stages) == triple]
    return prune


def _tune_buckets(q: torch.Tensor) -> dict:
    """The autotune key's size classes: T and B·H rounded up to powers of two (>= 16, so that
    Triton specialises them alike), so that a new length re-tunes only in a new class."""
    B, H, T, _ = q.shape
    return dict(T_BUCKET=max(16, triton.next_power_of_2(T)), BH_BUCKET=max(16, triton.next_power_of_2(B * H)))


def _launch(kernel, grid, configs: list[tuple[int, int, int]], *args, **meta) -> None:
    """Run autotuned ``kernel`` with the one config of ``configs`` (no timing runs, no autotuner),
    or let its autotuner time them (its pruning offers exactly ``configs``)."""
    if len(configs) == 1:
        block_m, num_warps, num_stages = configs[0]
        kernel.fn[grid](*args, **meta, BLOCK_M=block_m, num_warps=num_warps, num_stages=num_stages)
    else:
        kernel[grid](*args, **meta)


# ----------------------------------------------------------------------------- device helpers

@triton.jit
def _visible_key_range(tt, L, NKEYS, IMMEDIATE: tl.constexpr):
    """[lo, hi) of the keys some token of a tile (text_time ``tt``) may see; empty if none."""
    max_tt = tl.max(tt, axis=0)
    hi = tl.minimum(max_tt * L, NKEYS)
    if IMMEDIATE:
        # zeros are tokens without an image; the smallest real image bounds the range below
        min_tt = tl.min(tl.where(tt > 0, tt, max_tt), axis=0)
        lo = tl.maximum(min_tt - 1, 0) * L
    else:
        lo = hi * 0
    return lo, hi


@triton.jit
def _visible(tt, img, IMMEDIATE: tl.constexpr):
    """Which (token, key) pairs may attend, from the tokens' text_time and the keys' image
    (broadcast against each other)."""
    if IMMEDIATE:
        return tt == img
    return img <= tt


@triton.jit
def _query_tile(q_base, tt_row, m0, T, stride_qt, L, NKEYS, IMMEDIATE: tl.constexpr, HEAD_DIM: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr):
    """Tokens [m0, m0 + BLOCK_M): their offsets, validity, text_time, queries, and the range
    [k_lo, k_hi) of the keys any of them may see."""
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < T
    # q before text_time: both loads are then in flight together, and the first key block's,
    # which waits for text_time's reduction, follows one memory round trip later, not two
    q = load_tile(q_base, offs_m, stride_qt, m_ok, offs_d, HEAD_DIM, False, UPCAST)
    tt = tl.load(tt_row + offs_m, mask=m_ok, other=0)
    k_lo, k_hi = _visible_key_range(tt, L, NKEYS, IMMEDIATE)
    return offs_m, offs_d, m_ok, tt, q, k_lo, k_hi


@triton.jit
def _key_block(q, tt, k_base, v_base, start_n, k_hi, stride_kn, stride_vn, offs_d, L, qk_scale_log2,
               IMMEDIATE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
               UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Keys [start_n, start_n + BLOCK_N) below k_hi: their k and v tiles, the tokens' scores
    against them in log2 units (exp2 is the native instruction), and which pairs may attend."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    n_ok = offs_n < k_hi
    k = load_tile(k_base, offs_n, stride_kn, n_ok, offs_d, HEAD_DIM, False, UPCAST)
    v = load_tile(v_base, offs_n, stride_vn, n_ok, offs_d, HEAD_DIM, False, UPCAST)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale_log2
    visible = _visible(tt[:, None], (offs_n // L + 1)[None, :], IMMEDIATE) & n_ok[None, :]
    return k, v, s, visible


# ----------------------------------------------------------------------------- forward

@triton.autotune(configs=_tune_configs(), key=_TUNE_KEY, prune_configs_by={"early_config_prune": _prune(False)},
                 do_bench=tune_bench)
@triton.jit
def _fwd_kernel(Q, K, V, TT, Out, Lse,
                stride_qb, stride_qh, stride_qt,
                stride_kb, stride_kh, stride_kn,
                stride_vb, stride_vh, stride_vn,
                stride_ob, stride_oh, stride_ot,
                H, T, NKEYS, L, qk_scale_log2, T_BUCKET, BH_BUCKET,
                IMMEDIATE: tl.constexpr, HEAD_DIM: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    # T_BUCKET, BH_BUCKET: the autotune key's size classes (unused here).
    # 1-D grid, tiles fastest: neighbouring programs share (b, h) and mostly the same image's
    # K/V in L2, and B·H is not limited to the 65535 of a second grid axis.
    n_tiles = tl.cdiv(T, BLOCK_M)
    pid = tl.program_id(0)
    bh = pid // n_tiles
    b = bh // H
    h = bh % H
    k_base = slab(K, b, h, stride_kb, stride_kh)
    v_base = slab(V, b, h, stride_vb, stride_vh)
    offs_m, offs_d, m_ok, tt, q, k_lo, k_hi = _query_tile(
        slab(Q, b, h, stride_qb, stride_qh), TT + b * T, (pid % n_tiles) * BLOCK_M, T, stride_qt, L, NKEYS,
        IMMEDIATE, HEAD_DIM, BLOCK_M, BLOCK_D, UPCAST)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(k_lo, k_hi, BLOCK_N):
        k, v, s, visible = _key_block(q, tt, k_base, v_base, start_n, k_hi, stride_kn, stride_vn, offs_d, L,
                                      qk_scale_log2, IMMEDIATE, HEAD_DIM, BLOCK_N, UPCAST, DOT_PRECISION)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # a row with nothing visible so far keeps m = -inf; subtract 0 there instead (no nan)
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_sub[:, None])
        alpha = tl.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new

    # tokens without a visible key (text_time 0) have acc = 0, l = 0: output exactly 0, lse -inf
    has_keys = l_i > 0.0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    store_tile(slab(Out, b, h, stride_ob, stride_oh), out, offs_m, stride_ot, m_ok, offs_d, HEAD_DIM, False)
    lse = tl.where(has_keys, (m_i + tl.log2(tl.where(has_keys, l_i, 1.0))) / LOG2E,
                   float("-inf"))
    tl.store(Lse + bh.to(tl.int64) * T + offs_m, lse, mask=m_ok)


# ----------------------------------------------------------------------------- backward

@triton.jit
def _bwd_delta_kernel(Out, DOut, Delta,
                      stride_ob, stride_oh, stride_ot,
                      stride_dob, stride_doh, stride_dot,
                      H, T,
                      HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """delta = rowsum(dO · O) in fp32, (B, H, T): the softmax backward's per-row term."""
    n_tiles = tl.cdiv(T, BLOCK_M)
    pid = tl.program_id(0)
    bh = pid // n_tiles
    b = bh // H
    h = bh % H
    offs_m = (pid % n_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < T
    o = load_tile(slab(Out, b, h, stride_ob, stride_oh), offs_m, stride_ot, m_ok, offs_d, HEAD_DIM, False, True)
    do = load_tile(slab(DOut, b, h, stride_dob, stride_doh), offs_m, stride_dot, m_ok, offs_d, HEAD_DIM, False, True)
    tl.store(Delta + bh.to(tl.int64) * T + offs_m, tl.sum(o * do, axis=1), mask=m_ok)


@triton.jit
def _bwd_dkdv(q_base, k_base, v_base, do_base, dk_base, dv_base, tt_row, lse_row, delta_row,
              qstart_row, k0,
              stride_qt, stride_kn, stride_vn, stride_dot, stride_dkn, stride_dvn,
              T, NKEYS, L, qk_scale_log2, sm_scale,
              IMMEDIATE: tl.constexpr, HEAD_DIM: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
              UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """dK, dV of keys [k0, k0 + BLOCK_N), over the tokens that may see them.

    Computed transposed (keys x tokens) so that no tile needs a transpose before its dot.
    """
    offs_n = k0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < NKEYS
    img = offs_n // L + 1
    k = load_tile(k_base, offs_n, stride_kn, n_ok, offs_d, HEAD_DIM, False, UPCAST)
    v = load_tile(v_base, offs_n, stride_vn, n_ok, offs_d, HEAD_DIM, False, UPCAST)
    # tokens seeing images m_lo..m_hi of this block: from the first token whose image is
    # >= m_lo, to the first whose image is > m_hi (immediate) or to the end (all-previous)
    m_lo = k0 // L + 1
    q_lo = tl.load(qstart_row + m_lo - 1)
    if IMMEDIATE:
        m_hi = (tl.minimum(k0 + BLOCK_N, NKEYS) - 1) // L + 1
        q_hi = tl.load(qstart_row + m_hi)
    else:
        q_hi = T

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start_m in range(q_lo, q_hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_ok = offs_m < q_hi
        q = load_tile(q_base, offs_m, stride_qt, m_ok, offs_d, HEAD_DIM, False, UPCAST)
        do = load_tile(do_base, offs_m, stride_dot, m_ok, offs_d, HEAD_DIM, False, UPCAST)
        tt = tl.load(tt_row + offs_m, mask=m_ok, other=0)
        lse = tl.load(lse_row + offs_m, mask=m_ok, other=0.0) * LOG2E
        delta = tl.load(delta_row + offs_m, mask=m_ok, other=0.0)

        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale_log2
        visible = _visible(tt[None, :], img[:, None], IMMEDIATE) & n_ok[:, None]
        # tokens without keys have lse = -inf: the where drops their inf before any product
        p_t = tl.where(visible, tl.exp2(s_t - lse[None, :]), 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION)

    store_tile(dk_base, dk * sm_scale, offs_n, stride_dkn, n_ok, offs_d, HEAD_DIM, False)
    store_tile(dv_base, dv, offs_n, stride_dvn, n_ok, offs_d, HEAD_DIM, False)


@triton.jit
def _bwd_dq(q_base, k_base, v_base, do_base, dq_base, tt_row, lse_row, delta_row, m0,
            stride_qt, stride_kn, stride_vn, stride_dot, stride_dqt,
            T, NKEYS, L, qk_scale_log2, sm_scale,
            IMMEDIATE: tl.constexpr, HEAD_DIM: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
            UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """dQ of tokens [m0, m0 + BLOCK_M), over the same key range as the forward."""
    offs_m, offs_d, m_ok, tt, q, k_lo, k_hi = _query_tile(q_base, tt_row, m0, T, stride_qt, L, NKEYS, IMMEDIATE,
                                                          HEAD_DIM, BLOCK_M, BLOCK_D, UPCAST)
    do = load_tile(do_base, offs_m, stride_dot, m_ok, offs_d, HEAD_DIM, False, UPCAST)
    lse = tl.load(lse_row + offs_m, mask=m_ok, other=0.0) * LOG2E
    delta = tl.load(delta_row + offs_m, mask=m_ok, other=0.0)

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(k_lo, k_hi, BLOCK_N):
        k, v, s, visible = _key_block(q, tt, k_base, v_base, start_n, k_hi, stride_kn, stride_vn, offs_d, L,
                                      qk_scale_log2, IMMEDIATE, HEAD_DIM, BLOCK_N, UPCAST, DOT_PRECISION)
        p = tl.where(visible, tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    store_tile(dq_base, dq * sm_scale, offs_m, stride_dqt, m_ok, offs_d, HEAD_DIM, False)


@triton.autotune(configs=_tune_configs(), key=_TUNE_KEY, prune_configs_by={"early_config_prune": _prune(True)},
                 do_bench=tune_bench)
@triton.jit
def _bwd_kernel(Q, K, V, DO, TT, Lse, Delta, QStart, DQ, DK, DV,
                stride_qb, stride_qh, stride_qt,
                stride_kb, stride_kh, stride_kn,
                stride_vb, stride_vh, stride_vn,
                stride_dob, stride_doh, stride_dot,
                stride_dqb, stride_dqh, stride_dqt,
                stride_dkb, stride_dkh, stride_dkn,
                stride_dvb, stride_dvh, stride_dvn,
                H, T, NKEYS, L, qk_scale_log2, sm_scale, T_BUCKET, BH_BUCKET,
                IMMEDIATE: tl.constexpr, HEAD_DIM: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One launch, per batch·head: cdiv(N·L, BLOCK_N) dK/dV programs, then cdiv(T, BLOCK_M) dQ ones.
    T_BUCKET, BH_BUCKET: the autotune key's size classes (unused here)."""
    n_kv = tl.cdiv(NKEYS, BLOCK_N)
    n_per_bh = n_kv + tl.cdiv(T, BLOCK_M)
    pid = tl.program_id(0)
    bh = pid // n_per_bh
    role = pid % n_per_bh
    b = bh // H
    h = bh % H
    q_base = slab(Q, b, h, stride_qb, stride_qh)
    k_base = slab(K, b, h, stride_kb, stride_kh)
    v_base = slab(V, b, h, stride_vb, stride_vh)
    do_base = slab(DO, b, h, stride_dob, stride_doh)
    tt_row = TT + b * T
    lse_row = Lse + bh.to(tl.int64) * T
    delta_row = Delta + bh.to(tl.int64) * T
    if role < n_kv:
        _bwd_dkdv(q_base, k_base, v_base, do_base,
                  slab(DK, b, h, stride_dkb, stride_dkh), slab(DV, b, h, stride_dvb, stride_dvh),
                  tt_row, lse_row, delta_row, QStart + b * (NKEYS // L + 1), role * BLOCK_N,
                  stride_qt, stride_kn, stride_vn, stride_dot, stride_dkn, stride_dvn,
                  T, NKEYS, L, qk_scale_log2, sm_scale,
                  IMMEDIATE, HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D, UPCAST, DOT_PRECISION)
    else:
        _bwd_dq(q_base, k_base, v_base, do_base, slab(DQ, b, h, stride_dqb, stride_dqh),
                tt_row, lse_row, delta_row, (role - n_kv) * BLOCK_M,
                stride_qt, stride_kn, stride_vn, stride_dot, stride_dqt,
                T, NKEYS, L, qk_scale_log2, sm_scale,
                IMMEDIATE, HEAD_DIM, BLOCK_M, BLOCK_N, BLOCK_D, UPCAST, DOT_PRECISION)


# ----------------------------------------------------------------------------- host side

def _as_kernel_operand(name: str, x: torch.Tensor) -> torch.Tensor:
    """x with a unit-stride last dim (a copy only if it had none: the custom op's fake functions
    repeat this rule for the outputs' layout), checked for int32 row offsets."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    check_row_offsets("image_causal", name, x, "pass a contiguous tensor or split the sequence")
    return x


def _prepare_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, text_time: torch.Tensor,
                    latents_per_media: int):
    """Raise on what the kernels cannot take (shapes, dtypes and devices only: no sync), naming
    the tensor; q, k, v as kernel operands, text_time contiguous (it is tiny)."""
    from fastflamingo.ops import check_image_causal_inputs  # (here: the kernels import without the package)
    check_image_causal_inputs("image_causal", q, k, v, latents_per_media)
    check_dtype_and_head_dim("image_causal", q)
    if text_time.dtype != torch.int32:
        raise TypeError(f"image_causal: text_time must be int32, got {text_time.dtype}")
    if tuple(text_time.shape) != (q.shape[0], q.shape[2]):
        raise ValueError(f"image_causal: text_time shape {tuple(text_time.shape)} is not (B, T) = "
                         f"{(q.shape[0], q.shape[2])}")
    return (_as_kernel_operand("q", q), _as_kernel_operand("k", k), _as_kernel_operand("v", v),
            text_time.contiguous())


def image_causal_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, text_time: torch.Tensor,
                     latents_per_media: int, only_immediate: bool,
                     scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward of the image-causal cross-attention.

    Args:
        q: (B, H, T, D) queries, any strides with a unit-stride last dim.
        k, v: (B, H, N·L, D) keys and values, image-major, same rule for strides.
        text_time: (B, T) int32, 0 = no image, m = image m; nonzero values non-decreasing in T.
        latents_per_media: L.
        only_immediate: immediate (True) or all-previous (False) mode.
        scale: softmax scale.

    Returns:
        out: (B, H, T, D) in q's dtype, laid out like q when q is dense (a transposed view of a
            (B, T, H·D) projection gives an output whose reshape back is free).
        lse: (B, H, T) fp32 natural-log log-sum-exp of each row's scaled scores; -inf for
            tokens that see no key.
    """
    q, k, v, text_time = _prepare_inputs(q, k, v, text_time, latents_per_media)
    B, H, T, D = q.shape
    nkeys = k.shape[2]
    out = torch.empty_like(q)
    lse = torch.empty((B, H, T), device=q.device, dtype=torch.float32)
    if out.numel() == 0:
        return out, lse.fill_(float("-inf"))
    sizes = _block_sizes(q, latents_per_media, only_immediate, max_block_m=128)
    _, block_n, block_d, _ = sizes
    configs = _launch_configs(q, latents_per_media, only_immediate, backward=False, sizes=sizes)
    _launch(_fwd_kernel, lambda meta: (triton.cdiv(T, meta["BLOCK_M"]) * B * H,), configs,
            q, k, v, text_time, out, lse,
            *bhs_strides(q), *bhs_strides(k), *bhs_strides(v), *bhs_strides(out),
            H, T, nkeys, latents_per_media, scale * LOG2E.value, **_tune_buckets(q),
            IMMEDIATE=only_immediate, HEAD_DIM=D, BLOCK_N=block_n, BLOCK_D=block_d, **dtype_options(q.dtype))
    return out, lse


def image_query_start(text_time: torch.Tensor, num_media: int) -> torch.Tensor:
    """(B, T) int32 -> (B, N + 1) int32: the first token whose image is >= m, for m = 1 .. N + 1.

    Nonzero text_time values never decrease, so the tokens of image m (and with it the tokens
    that may see image m) start there. On the device, without a host sync.
    """
    B = text_time.shape[0]
    running_max = torch.cummax(text_time, dim=1).values
    images = torch.arange(1, num_media + 2, device=text_time.device, dtype=text_time.dtype)
    return torch.searchsorted(running_max, images.expand(B, num_media + 1).contiguous(), out_int32=True)


def image_causal_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     out: torch.Tensor, lse: torch.Tensor, text_time: torch.Tensor,
                     latents_per_media: int, only_immediate: bool,
                     scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of :func:`image_causal_fwd`.

    Args:
        dout: (B, H, T, D) gradient of ``out``, any strides.
        q, k, v, text_time, latents_per_media, only_immediate, scale: as given to the forward.
        out, lse: the forward's outputs.

    Returns:
        dq, dk, dv shaped and (when dense) laid out like q, k, v. Tokens with text_time 0 get
        dq = 0 exactly; keys of images no token sees get dk = dv = 0.
    """
    q, k, v, text_time = _prepare_inputs(q, k, v, text_time, latents_per_media)
    for name, t, shape, dtype in (("out", out, q.shape, q.dtype), ("dout", dout, q.shape, q.dtype),
                                  ("lse", lse, q.shape[:3], torch.float32)):
        if t.shape != shape or t.dtype != dtype or t.device != q.device:
            raise ValueError(f"image_causal: {name} is {tuple(t.shape)} {t.dtype} on {t.device}, expected "
                             f"{tuple(shape)} {dtype} on {q.device} (the forward's, for q {tuple(q.shape)})")
    out = _as_kernel_operand("out", out)
    dout = _as_kernel_operand("dout", dout)
    B, H, T, D = q.shape
    nkeys = k.shape[2]
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if B * H == 0 or T == 0:
        return dq, dk.zero_(), dv.zero_()
    lse = lse.contiguous()

    sizes = _block_sizes(q, latents_per_media, only_immediate, max_block_m=64)
    block_m, block_n, block_d, _ = sizes
    delta = torch.empty((B, H, T), device=q.device, dtype=torch.float32)
    _bwd_delta_kernel[(triton.cdiv(T, block_m) * B * H,)](
        out, dout, delta,
        *bhs_strides(out), *bhs_strides(dout),
        H, T, HEAD_DIM=D, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=4)
    qstart = image_query_start(text_time, nkeys // latents_per_media)

    n_kv = triton.cdiv(nkeys, block_n)
    configs = _launch_configs(q, latents_per_media, only_immediate, backward=True, sizes=sizes)
    _launch(_bwd_kernel, lambda meta: ((n_kv + triton.cdiv(T, meta["BLOCK_M"])) * B * H,), configs,
            q, k, v, dout, text_time, lse, delta, qstart, dq, dk, dv,
            *bhs_strides(q), *bhs_strides(k), *bhs_strides(v), *bhs_strides(dout),
            *bhs_strides(dq), *bhs_strides(dk), *bhs_strides(dv),
            H, T, nkeys, latents_per_media, scale * LOG2E.value, scale, **_tune_buckets(q),
            IMMEDIATE=only_immediate, HEAD_DIM=D, BLOCK_N=block_n, BLOCK_D=block_d, **dtype_options(q.dtype))
    return dq, dk, dv
