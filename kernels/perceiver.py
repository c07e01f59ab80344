"""Fused Perceiver latent attention: Triton forward and backward.

The Perceiver resampler's latents attend to the media (patch) tokens of their image and to
themselves, with one softmax over the concatenation ``[media ; latents]``:

    out = softmax(q [k_media ; k_latents]^T * scale) [v_media ; v_latents]

These kernels never build the concatenation: each program walks the media key blocks, then the
latent key blocks, with the same running max and sum (one online softmax over both sources).

Shapes: ``q`` (B, H, L, D) latent queries; ``k_media``/``v_media`` (B, H, V, D);
``k_latents``/``v_latents`` (B, H, L, D). B = images x frames. Any strides are accepted as long
as the last dim is contiguous (the resampler passes views of its (B, S, H*D) projections).
One launch covers all B*H heads, on a 1-D grid (CUDA caps a grid's second and third axes at
65535 programs, which B*H passes at 8192 images of 8 heads; the first takes 2**31 - 1).

Outputs are allocated in the (B, S, H, D) memory layout and returned as (B, H, S, D) views (see
:func:`empty_bshd`): that is the layout the resampler's projections produce and consume, so
``out.transpose(1, 2).reshape(B, L, H * D)`` and the gradients' way back into the projections
are free (no copy).

Under ``TRITON_INTERPRET=1`` (CPU) bf16 arithmetic is silently wrong in the interpreter, so bf16
tiles are upcast to fp32 after loading (``UPCAST``); on a GPU the dots stay in the input dtype
(tensor cores) with fp32 accumulation. fp32 inputs use IEEE fp32 dots (not TF32), so that fp32
means fp32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# INTERPRET: the kernels are defined for Triton's interpreter; LOG2E: they work in base 2 (exp2
# is the native instruction); DTYPES, MAX_HEAD_DIM: what they take
from .common import (DTYPES, INTERPRET, LOG2E, MAX_HEAD_DIM, bhs_strides, check_dtype_and_head_dim,
                     check_row_offsets, dtype_options, load_tile, num_sms, padded_head_dim, slab, store_tile,
                     tune_bench)

# lse is kept in natural log
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)
NAMES = ("q", "k_media", "v_media", "k_latents", "v_latents")

__all__ = ["perceiver_fwd", "perceiver_bwd", "empty_bshd", "INTERPRET", "DTYPES", "MAX_HEAD_DIM"]

# bwd splits the keys of one (b, h) over programs in chunks of a multiple of this (>= every
# bwd BLOCK_N below), so that media key blocks stay aligned whatever config autotune picks
_SPLIT_GRANULE = 64


def _configs(table: dict[tuple[bool, bool], list[tuple[int, int, int]]]) -> list[triton.Config]:
    """Every (BLOCK_N, num_warps, num_stages) triple of ``table`` -> autotune configs; one under
    the interpreter, where autotuning with more than one config fails (no GPU to time on)."""
    gpu = list(dict.fromkeys(t for triples in table.values() for t in triples))
    if INTERPRET:
        gpu = [(64, 4, 1)]
    return [triton.Config({"BLOCK_N": n}, num_warps=w, num_stages=s) for n, w, s in gpu]


def _prune(table: dict[tuple[bool, bool], list[tuple[int, int, int]]]):
    """Autotune pruning: the configs of ``table[(fp32, BLOCK_D > 64)]`` (all of them under the
    interpreter, which has one)."""
    def prune(configs, named_args, **kwargs):
        if INTERPRET:
            return configs
        want = table[(kwargs["DOT_PRECISION"] == "ieee", kwargs["BLOCK_D"] > 64)]
        return [c for c in configs if (c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in want]
    return prune


# Both kernels are memory-bound at the resampler's shapes (L = 64 queries per head, D = 64):
# the candidates trade pipelining depth against registers. Keyed by (fp32, BLOCK_D > 64): each
# list holds only configs that compile for sm_90 without register spills in Triton 3.6 and 3.8
# at the BLOCK_M the launchers pick for 64 latents and heads of 64 and 96
# (``benchmarks/compile_check.py``; heads of 256 still spill in the backward). fp32 takes exact
# ("ieee") dots, which the GPU runs as FMA loops holding their operands in registers: small key
# blocks and 8 warps; the backward of bf16 / fp16 heads over 64 spills with 4 warps.
_FWD_16BIT = [(64, 4, 2), (64, 4, 3), (128, 4, 2), (128, 8, 3), (32, 4, 3), (64, 8, 2)]
_FWD_FP32 = [(16, 8, 2), (16, 8, 3), (32, 8, 2)]
_FWD_TABLE = {(False, False): _FWD_16BIT, (False, True): _FWD_16BIT, (True, False): _FWD_FP32, (True, True): _FWD_FP32}
_BWD_TABLE = {(False, False): [(32, 4, 1), (32, 4, 2), (64, 4, 1), (64, 4, 2), (64, 8, 1), (64, 8, 2)],
              (False, True): [(16, 8, 2), (32, 8, 1), (32, 8, 2), (64, 8, 2)],
              (True, False): [(16, 8, 1), (16, 8, 2)], (True, True): [(16, 8, 1), (32, 8, 1)]}
_FWD_CONFIGS = _configs(_FWD_TABLE)
_BWD_CONFIGS = _configs(_BWD_TABLE)


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------

@triton.jit
def _fwd_source(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, n_keys, D, qk_scale,
                BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
                UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Fold the ``n_keys`` keys of one source into the running (acc, max, sum); log2 domain."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    for start in range(0, n_keys, BLOCK_N):
        rows = start + offs_n
        k = load_tile(k_base, rows, stride_kn, rows < n_keys, offs_d, D, EVEN_D, UPCAST)
        v = load_tile(v_base, rows, stride_vn, rows < n_keys, offs_d, D, EVEN_D, UPCAST)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        s = tl.where((rows < n_keys)[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.autotune(configs=_FWD_CONFIGS, key=["L", "V", "D"],
                 prune_configs_by={"early_config_prune": _prune(_FWD_TABLE)}, do_bench=tune_bench)
@triton.jit
def _perceiver_fwd_kernel(
        Q, KM, VM, KL, VL, O, LSE,
        s_qb, s_qh, s_ql, s_kmb, s_kmh, s_kmn, s_vmb, s_vmh, s_vmn,
        s_klb, s_klh, s_kln, s_vlb, s_vlh, s_vln, s_ob, s_oh, s_ol,
        H, L, V, D, qk_scale,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        EVEN_D: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """1-D grid of cdiv(L, BLOCK_M) * B*H programs, query tiles fastest.
    ``qk_scale`` = scale * log2(e); LSE is (B*H, L) fp32, natural log."""
    n_tiles = tl.cdiv(L, BLOCK_M)
    pid = tl.program_id(0)
    bh = pid // n_tiles
    pid_m = pid % n_tiles
    b = bh // H
    h = bh % H
    rows_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)

    q = load_tile(slab(Q, b, h, s_qb, s_qh), rows_m, s_ql, rows_m < L, offs_d, D, EVEN_D, UPCAST)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # media keys, then the latents' own keys: one softmax over [media ; latents]
    acc, m_i, l_i = _fwd_source(acc, m_i, l_i, q, slab(KM, b, h, s_kmb, s_kmh), slab(VM, b, h, s_vmb, s_vmh),
                                s_kmn, s_vmn, V, D, qk_scale, BLOCK_N, BLOCK_D, EVEN_D, UPCAST, DOT_PRECISION)
    acc, m_i, l_i = _fwd_source(acc, m_i, l_i, q, slab(KL, b, h, s_klb, s_klh), slab(VL, b, h, s_vlb, s_vlh),
                                s_kln, s_vln, L, D, qk_scale, BLOCK_N, BLOCK_D, EVEN_D, UPCAST, DOT_PRECISION)
    # l_i >= 1 on every row (the row max contributes exp2(0)), also on padded query rows
    store_tile(slab(O, b, h, s_ob, s_oh), acc / l_i[:, None], rows_m, s_ol, rows_m < L, offs_d, D, EVEN_D)
    tl.store(LSE + bh.to(tl.int64) * L + rows_m, (m_i + tl.log2(l_i)) * LN2, mask=rows_m < L)


@triton.jit
def _bwd_tile(q, do, lse2, delta, k, v, col_valid, qk_scale, DOT_PRECISION: tl.constexpr):
    """Gradient contributions of one (query tile, key block) pair, before the softmax scale:
    returns (dS k, dS^T q, P^T dO) for dq, dk, dv."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    # padded key columns load as zeros and would get exp2(-lse) > 0: mask them
    p = tl.where(col_valid[None, :], tl.exp2(s - lse2[:, None]), 0.0)
    dv = tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PRECISION)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    ds = (p * (dp - delta[:, None])).to(q.dtype)
    dk = tl.dot(tl.trans(ds), q, input_precision=DOT_PRECISION)
    dq = tl.dot(ds, k, input_precision=DOT_PRECISION)
    return dq, dk, dv


@triton.jit
def _load_query_tile(q_base, o_base, do_base, lse_base, rows_m, L, s_ql, s_ol, s_dol, offs_d, D,
                     EVEN_D: tl.constexpr, UPCAST: tl.constexpr):
    """q, dO, lse (log2 units) and delta = rowsum(dO * O) of one query tile. Padded query rows
    get lse = +inf, hence P = 0 and no contribution."""
    q = load_tile(q_base, rows_m, s_ql, rows_m < L, offs_d, D, EVEN_D, UPCAST)
    do = load_tile(do_base, rows_m, s_dol, rows_m < L, offs_d, D, EVEN_D, UPCAST)
    o = load_tile(o_base, rows_m, s_ol, rows_m < L, offs_d, D, EVEN_D, UPCAST)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    lse2 = tl.load(lse_base + rows_m, mask=rows_m < L, other=float("inf")) * LOG2E
    return q, do, lse2, delta


@triton.jit
def _bwd_source(dq, q, do, lse2, delta,
                k_base, v_base, dk_base, dv_base, s_kn, s_vn, s_dkn, s_dvn, lo, hi,
                q_base, o_base, do_base, lse_base, dq_base, s_ql, s_ol, s_dol, s_dql, key_offset, key_lo,
                L, D, qk_scale, sm_scale,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, SINGLE_M: tl.constexpr,
                EVEN_D: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """dK, dV of keys [lo, hi) of one source (stored), and their share of dQ.

    SINGLE_M (all L queries in one tile, the resampler's case): the query tile (q, do, lse2,
    delta) is loaded once by the caller and dq accumulates in registers (returned).
    Otherwise the queries are walked tile by tile for each key block, and dq is
    read-added-written in this program's own fp32 rows of ``dq_base`` (no other program touches
    them, so no atomics); the program's first key block (key ``key_lo`` of the concatenation,
    where this source starts at ``key_offset``) stores instead of adding, so no zero-fill is
    needed and a re-run (autotuning) gives the same result.
    """
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    for start in range(lo, hi, BLOCK_N):
        rows_n = start + offs_n
        col_valid = rows_n < hi
        k = load_tile(k_base, rows_n, s_kn, col_valid, offs_d, D, EVEN_D, UPCAST)
        v = load_tile(v_base, rows_n, s_vn, col_valid, offs_d, D, EVEN_D, UPCAST)
        if SINGLE_M:
            dq_c, dk, dv = _bwd_tile(q, do, lse2, delta, k, v, col_valid, qk_scale, DOT_PRECISION)
            dq += dq_c
        else:
            dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
            dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
            first = start + key_offset == key_lo
            for m0 in range(0, L, BLOCK_M):
                rows_m = m0 + tl.arange(0, BLOCK_M)
                q_t, do_t, lse2_t, delta_t = _load_query_tile(q_base, o_base, do_base, lse_base, rows_m, L,
                                                              s_ql, s_ol, s_dol, offs_d, D, EVEN_D, UPCAST)
                dq_c, dk_c, dv_c = _bwd_tile(q_t, do_t, lse2_t, delta_t, k, v, col_valid, qk_scale, DOT_PRECISION)
                dk += dk_c
                dv += dv_c
                dq_ptrs = dq_base + rows_m[:, None] * s_dql + offs_d[None, :]
                dq_mask = (rows_m < L)[:, None] & (offs_d < D)[None, :]
                dq_old = tl.load(dq_ptrs, mask=dq_mask & (first == 0), other=0.0)
                tl.store(dq_ptrs, dq_old + dq_c * sm_scale, mask=dq_mask)
        store_tile(dk_base, dk * sm_scale, rows_n, s_dkn, col_valid, offs_d, D, EVEN_D)
        store_tile(dv_base, dv, rows_n, s_dvn, col_valid, offs_d, D, EVEN_D)
    return dq


@triton.autotune(configs=_BWD_CONFIGS, key=["L", "V", "D", "SINGLE_M"],
                 prune_configs_by={"early_config_prune": _prune(_BWD_TABLE)}, do_bench=tune_bench)
@triton.jit
def _perceiver_bwd_kernel(
        Q, KM, VM, KL, VL, O, DO, LSE, DQ, DKM, DVM, DKL, DVL,
        s_qb, s_qh, s_ql, s_kmb, s_kmh, s_kmn, s_vmb, s_vmh, s_vmn,
        s_klb, s_klh, s_kln, s_vlb, s_vlh, s_vln, s_ob, s_oh, s_ol, s_dob, s_doh, s_dol,
        s_dqs, s_dqb, s_dqh, s_dql, s_dkmb, s_dkmh, s_dkmn, s_dvmb, s_dvmh, s_dvmn,
        s_dklb, s_dklh, s_dkln, s_dvlb, s_dvlh, s_dvln,
        H, L, V, D, KEYS_PER_SPLIT, qk_scale, sm_scale,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, SINGLE_M: tl.constexpr,
        EVEN_D: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """1-D grid of splits * B*H programs, a head's splits fastest (they share its q, dO and O):
    program (s, bh) owns keys [s*KEYS_PER_SPLIT, (s+1)*KEYS_PER_SPLIT) of the virtual
    concatenation [media ; latents] of head bh, writes their dK, dV, and writes its share of dQ
    to DQ[s] (summed over splits by the host when there is more than one)."""
    splits = tl.cdiv(V + L, KEYS_PER_SPLIT)
    pid = tl.program_id(0)
    bh = pid // splits
    split = pid % splits
    b = bh // H
    h = bh % H
    key_lo = split * KEYS_PER_SPLIT
    key_hi = tl.minimum(key_lo + KEYS_PER_SPLIT, V + L)
    media_lo = tl.minimum(key_lo, V)
    media_hi = tl.minimum(key_hi, V)
    lat_lo = tl.maximum(key_lo - V, 0)
    lat_hi = tl.maximum(key_hi - V, 0)

    q_base = slab(Q, b, h, s_qb, s_qh)
    o_base = slab(O, b, h, s_ob, s_oh)
    do_base = slab(DO, b, h, s_dob, s_doh)
    lse_base = LSE + bh.to(tl.int64) * L
    dq_base = slab(DQ + split.to(tl.int64) * s_dqs, b, h, s_dqb, s_dqh)
    offs_d = tl.arange(0, BLOCK_D)

    rows_m = tl.arange(0, BLOCK_M)
    if SINGLE_M:
        q, do, lse2, delta = _load_query_tile(q_base, o_base, do_base, lse_base, rows_m, L,
                                              s_ql, s_ol, s_dol, offs_d, D, EVEN_D, UPCAST)
    else:  # placeholders: _bwd_source loads the query tiles itself
        q = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        do = q
        lse2 = tl.zeros([BLOCK_M], dtype=tl.float32)
        delta = lse2
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dq = _bwd_source(dq, q, do, lse2, delta,
                     slab(KM, b, h, s_kmb, s_kmh), slab(VM, b, h, s_vmb, s_vmh),
                     slab(DKM, b, h, s_dkmb, s_dkmh), slab(DVM, b, h, s_dvmb, s_dvmh),
                     s_kmn, s_vmn, s_dkmn, s_dvmn, media_lo, media_hi,
                     q_base, o_base, do_base, lse_base, dq_base, s_ql, s_ol, s_dol, s_dql, 0, key_lo,
                     L, D, qk_scale, sm_scale, BLOCK_M, BLOCK_N, BLOCK_D, SINGLE_M, EVEN_D, UPCAST, DOT_PRECISION)
    dq = _bwd_source(dq, q, do, lse2, delta,
                     slab(KL, b, h, s_klb, s_klh), slab(VL, b, h, s_vlb, s_vlh),
                     slab(DKL, b, h, s_dklb, s_dklh), slab(DVL, b, h, s_dvlb, s_dvlh),
                     s_kln, s_vln, s_dkln, s_dvln, lat_lo, lat_hi,
                     q_base, o_base, do_base, lse_base, dq_base, s_ql, s_ol, s_dol, s_dql, V, key_lo,
                     L, D, qk_scale, sm_scale, BLOCK_M, BLOCK_N, BLOCK_D, SINGLE_M, EVEN_D, UPCAST, DOT_PRECISION)
    if SINGLE_M:
        store_tile(dq_base, dq * sm_scale, rows_m, s_dql, rows_m < L, offs_d, D, EVEN_D)


# ----------------------------------------------------------------------------------------------
# Plain functions
# ----------------------------------------------------------------------------------------------

def empty_bshd(B: int, H: int, S: int, D: int, *, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An uninitialised (B, H, S, D) tensor laid out in memory as (B, S, H, D).

    The layout every output of these kernels uses (and the custom op's fake functions repeat).
    """
    return torch.empty(B, S, H, D, device=like.device, dtype=like.dtype if dtype is None else dtype).transpose(1, 2)


def _as_operand(name: str, t: torch.Tensor) -> torch.Tensor:
    """t with a unit-stride last dim (the pointer math assumes it; a copy only if it has none;
    every other stride is passed to the kernels), checked for int32 row offsets within one
    (b, h) slab (the slabs' own offsets are int64)."""
    if t.stride(-1) != 1 and t.shape[-1] != 1:
        t = t.contiguous()
    check_row_offsets("perceiver kernel", name, t, "pass a contiguous tensor")
    return t


def _check(name: str, t: torch.Tensor, q: torch.Tensor, seq: int | None) -> None:
    B, H, L, D = q.shape
    if t.dim() != 4 or t.shape[0] != B or t.shape[1] != H or t.shape[3] != D or (seq is not None and t.shape[2] != seq):
        want = f"({B}, {H}, {'S' if seq is None else seq}, {D})"
        raise ValueError(f"perceiver kernel: {name} has shape {tuple(t.shape)}, expected {want} from q {tuple(q.shape)}")
    if t.dtype != q.dtype or t.device != q.device:
        raise ValueError(f"perceiver kernel: {name} is {t.dtype} on {t.device}, q is {q.dtype} on {q.device}")


def _check_inputs(q, k_media, v_media, k_latents, v_latents) -> None:
    if q.dim() != 4:
        raise ValueError(f"perceiver kernel: q must be (B, H, L, D), got shape {tuple(q.shape)}")
    check_dtype_and_head_dim("perceiver kernel", q)
    if not q.is_cuda and not INTERPRET:
        raise ValueError(f"perceiver kernel: tensors are on {q.device}; the Triton kernels need CUDA "
                         "tensors, or TRITON_INTERPRET=1 set before fastflamingo.kernels is imported")
    _check("k_media", k_media, q, None)
    _check("v_media", v_media, q, k_media.shape[2])
    _check("k_latents", k_latents, q, q.shape[2])
    _check("v_latents", v_latents, q, q.shape[2])


def _block_m(q: torch.Tensor, block_m: int | None) -> int:
    """Query tile: all L latents in one tile up to 128 (the resampler has 64; the backward then
    keeps dq in registers), unless a (BLOCK_M, BLOCK_D) tile would pass 32 KiB (fp32 with heads
    over 128), which would not leave shared memory for the backward's other tiles. fp32 heads
    over 64 take 16 rows: exact fp32 dots are FMA loops with their operands in registers, and
    larger tiles spill on sm_90 (``benchmarks/compile_check.py``)."""
    if block_m is not None:
        return block_m
    block_d = padded_head_dim(q.shape[-1])
    cap = max(16, 32768 // (block_d * q.element_size()))
    if q.dtype == torch.float32 and block_d > 64:
        cap = 16
    return min(128, cap, max(16, triton.next_power_of_2(q.shape[2])))


def _common_meta(q: torch.Tensor) -> dict:
    """Constexprs that depend on the head size, the dtype and whether the interpreter runs."""
    block_d = padded_head_dim(q.shape[-1])
    return dict(BLOCK_D=block_d, EVEN_D=block_d == q.shape[-1], **dtype_options(q.dtype))


def perceiver_fwd(q: torch.Tensor, k_media: torch.Tensor, v_media: torch.Tensor,
                  k_latents: torch.Tensor, v_latents: torch.Tensor, scale: float,
                  *, block_m: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward of the Perceiver latent attention.

    Args:
        q: (B, H, L, D) latent queries.
        k_media, v_media: (B, H, V, D) media keys / values.
        k_latents, v_latents: (B, H, L, D) the latents' own keys / values.
        scale: softmax scale (``D ** -0.5`` in the models).
        block_m: query tile size override (a power of two >= 16), for tests and tuning.

    Returns:
        out (B, H, L, D) in q's dtype, stored in (B, L, H, D) memory layout; lse (B, H, L) fp32,
        the natural-log log-sum-exp of each row's scaled scores (kept for the backward).

    One program per (query tile, head): with the resampler's 64 latents one tile holds all
    queries, so each program streams one head's V + L keys and values exactly once (B*H = 512
    programs for 64 images x 8 heads); autotuning picks the key block and pipelining depth.
    """
    _check_inputs(q, k_media, v_media, k_latents, v_latents)
    q, k_media, v_media, k_latents, v_latents = map(
        _as_operand, NAMES, (q, k_media, v_media, k_latents, v_latents))
    B, H, L, D = q.shape
    V = k_media.shape[2]
    out = empty_bshd(B, H, L, D, like=q)
    lse = torch.empty(B, H, L, device=q.device, dtype=torch.float32)
    if out.numel() == 0:
        return out, lse
    BLOCK_M = _block_m(q, block_m)
    _perceiver_fwd_kernel[(triton.cdiv(L, BLOCK_M) * B * H,)](
        q, k_media, v_media, k_latents, v_latents, out, lse,
        *bhs_strides(q), *bhs_strides(k_media), *bhs_strides(v_media), *bhs_strides(k_latents),
        *bhs_strides(v_latents), *bhs_strides(out),
        H, L, V, D, scale * LOG2E.value, BLOCK_M=BLOCK_M, **_common_meta(q))
    return out, lse


def _num_splits(BH: int, n_keys: int, device: torch.device) -> int:
    """How many programs share the keys of one head in the backward.

    One program per head (splits = 1) reads every K/V block once, keeps dq in registers, and
    writes dq directly: the least traffic and no reduction, which is what the resampler's sizes
    want (B*H = 64 images x 8 heads = 512 or 256 x 8 = 2048 programs for 132 SMs, with L = 64
    queries in one tile). Only when B*H cannot fill the GPU (a few images) are a head's keys
    split over several programs, whose dq shares are then summed (fp32, deterministic, no
    atomics) at the cost of re-reading q, dO and O per split.
    """
    if device.type != "cuda":
        return 1
    target = 2 * num_sms(device)
    if BH >= target:
        return 1
    return max(1, min(triton.cdiv(target, BH), triton.cdiv(n_keys, _SPLIT_GRANULE)))


def perceiver_bwd(dout: torch.Tensor, q: torch.Tensor, k_media: torch.Tensor, v_media: torch.Tensor,
                  k_latents: torch.Tensor, v_latents: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                  scale: float, *, num_splits: int | None = None, block_m: int | None = None,
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of :func:`perceiver_fwd` (FlashAttention-2 style, recomputing P from lse).

    Design, for the resampler's L = 64 queries, V = 257, D = 64, B*H = 512 or 2048: all L
    queries fit one tile, so one program per (b, h) loads q, dO, O (for delta = rowsum(dO * O),
    computed in-kernel: no separate pre-pass launch) once, walks the media key blocks and then
    the latent key blocks, writes each block's dK and dV as soon as it is done, and keeps dQ in
    registers until the end. Every input is read once and every gradient written once, with no
    atomics and one launch. The usual FA2 split (a dK/dV kernel per key block plus a dQ kernel,
    or dQ by atomics) would read K/V twice or contend on dQ; its only gain, parallelism over key
    blocks, is reached here with ``num_splits`` when B*H is too small to fill the GPU.

    Args:
        dout: (B, H, L, D) gradient of ``out``.
        q, k_media, v_media, k_latents, v_latents: the forward inputs.
        out, lse: the forward outputs.
        scale: the forward's softmax scale.
        num_splits: programs per head sharing its keys (default: see :func:`_num_splits`).
        block_m: query tile size override (a power of two >= 16), for tests; below L it
            selects the multi-tile path (what L > 128, or fp32 with heads over 128, take).

    Returns:
        dq, dk_media, dv_media, dk_latents, dv_latents, shaped like the inputs, in their dtype,
        stored in (B, S, H, D) memory layout.
    """
    _check_inputs(q, k_media, v_media, k_latents, v_latents)
    _check("dout", dout, q, q.shape[2])
    _check("out", out, q, q.shape[2])
    dout, q, k_media, v_media, k_latents, v_latents, out = map(
        _as_operand, ("dout", *NAMES, "out"), (dout, q, k_media, v_media, k_latents, v_latents, out))
    B, H, L, D = q.shape
    V = k_media.shape[2]
    if tuple(lse.shape) != (B, H, L) or lse.dtype != torch.float32:
        raise ValueError(f"perceiver kernel: lse must be ({B}, {H}, {L}) float32, got {tuple(lse.shape)} {lse.dtype}")
    lse = lse.contiguous()
    dk_media, dv_media = empty_bshd(B, H, V, D, like=q), empty_bshd(B, H, V, D, like=q)
    dk_latents, dv_latents = empty_bshd(B, H, L, D, like=q), empty_bshd(B, H, L, D, like=q)
    dq = empty_bshd(B, H, L, D, like=q)
    if q.numel() == 0:  # no queries: the media keys get zero gradient
        dk_media.zero_()
        dv_media.zero_()
        return dq, dk_media, dv_media, dk_latents, dv_latents

    BLOCK_M = _block_m(q, block_m)
    single_m = L <= BLOCK_M
    n_keys = V + L
    splits = _num_splits(B * H, n_keys, q.device) if num_splits is None else num_splits
    if splits < 1:
        raise ValueError(f"perceiver kernel: num_splits={splits} must be >= 1")
    keys_per_split = triton.cdiv(triton.cdiv(n_keys, splits), _SPLIT_GRANULE) * _SPLIT_GRANULE
    splits = triton.cdiv(n_keys, keys_per_split)  # no empty split: each one writes its dq share
    if splits == 1 and single_m:
        dq_buf, dq_strides = dq, (0, *bhs_strides(dq))  # dq written straight from registers
    else:
        # fp32 shares (or fp32 read-add-write rows, multi-tile path), summed and cast below
        dq_buf = torch.empty(splits, B, L, H, D, device=q.device, dtype=torch.float32).transpose(2, 3)
        dq_strides = (dq_buf.stride(0), dq_buf.stride(1), dq_buf.stride(2), dq_buf.stride(3))

    _perceiver_bwd_kernel[(splits * B * H,)](
        q, k_media, v_media, k_latents, v_latents, out, dout, lse, dq_buf,
        dk_media, dv_media, dk_latents, dv_latents,
        *bhs_strides(q), *bhs_strides(k_media), *bhs_strides(v_media), *bhs_strides(k_latents),
        *bhs_strides(v_latents), *bhs_strides(out), *bhs_strides(dout),
        *dq_strides, *bhs_strides(dk_media), *bhs_strides(dv_media), *bhs_strides(dk_latents),
        *bhs_strides(dv_latents),
        H, L, V, D, keys_per_split, scale * LOG2E.value, scale,
        BLOCK_M=BLOCK_M, SINGLE_M=single_m, **_common_meta(q))
    if dq_buf is not dq:
        dq.copy_(dq_buf.sum(0))
    return dq, dk_media, dv_media, dk_latents, dv_latents
