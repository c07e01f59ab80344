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

The op is bound by the weight bytes (0.5 per weight plus the scales: 8.4 MB for 4096 x 4096,
~2.8 us at the H100's 3 TB/s); the kernel reads each packed byte and scale once.

Design: a GEMV on the CUDA cores, no ``tl.dot``. The first version padded x to 16 rows for
``tl.dot`` and gathered codes into 64 x 32-byte tiles; on an H100 it took 68.9 us at 4096 x 4096
(bitsandbytes' gemv: 10.6 us): at M <= 16 the tensor cores have nothing to do, while the dot
operands went through shared-memory layout conversions every step. Here every value stays in the
registers of the thread that loaded it:

* Grid (cdiv(N, BLOCK_N), SPLIT_K, cdiv(M, BLOCK_M)). A program owns BLOCK_N rows of W and a
  range of K; it walks K in steps of BLOCK_KB bytes per row, a (BLOCK_N, BLOCK_KB / 16, 16) tile:
  each thread loads 16 contiguous bytes of one row (one 128-bit load; a warp reads 256-512
  contiguous bytes per row) and keeps all 32 weights of them. The next step's bytes and scales
  are loaded before the current step is computed (a two-deep software pipeline by hand: Triton's
  own pipeliner only stages loads that feed dots).
* Codes: a byte holds two codes; one gather from a 256-entry table of code pairs (2 KB, L1-
  resident, built once per code table and cached: :func:`pair_table`) gives both as one 64-bit
  load; its halves are the two fp32 weights (no shifts, half the gathers and address arithmetic
  of two 16-entry lookups: 199 vs 295 SASS instructions per 16-byte step at M = 1, sm_90).
* x is read as pairs (bf16 / fp16 pairs as int32, fp32 pairs as int64: ``(x[2j], x[2j+1])``
  lines up with byte j), loaded with the pointers broadcast over the tile's rows, so the load takes
  the byte tile's register layout: no shared-memory layout conversion in the loop (a plain
  (BLOCK_KB,) x tile costs 8 barriers per step through shared memory). Unpacking is bit
  operations (exact, and free of the interpreter's bf16 trap), math in fp32.
* The M rows are a static loop inside the program over a tuple of accumulators: W is read and
  decoded once for all rows. Each (row, 16-byte vector) partial dot is reduced in the thread,
  then scaled once (all 32 weights of a vector lie in one quantization block: K and the block
  size are multiples of 32), and accumulated per vector; one cross-thread sum at the end.
  BLOCK_M is M for M <= 4, else 8; larger M takes M tiles of 8 (W is read once per tile, the
  second time mostly from L2; 16 rows in one program spilled registers with Triton 3.6. Large M
  belongs to bitsandbytes' dequantize + cuBLAS path, which ``"auto"`` takes above 16 rows).
* Enough programs: N / BLOCK_N is 512 for N = 4096 at BLOCK_N = 8, several per SM. Small N
  (fewer than ~2 programs per SM) splits K: SPLIT_K programs per tile add fp32 partial sums with
  atomics into a zeroed fp32 buffer (then one cast; the run-to-run summation order, hence the
  last bits, vary). Without a split (every decode shape of a 7B/9B model) each output element
  is written once, in x's dtype, with the bias: no zero-fill, no extra kernel, deterministic.
* Launch config: on a GPU Triton's autotuner picks (BLOCK_N, BLOCK_KB, num_warps) among
  :data:`TUNE_CONFIGS` once per (N, K, BLOCK_M, statistics, dtype); every candidate compiles for
  sm_90 without register spills (``benchmarks/compile_check.py``). ``FASTFLAMINGO_AUTOTUNE=0``
  (read at each launch) and the interpreter take the heuristic config
  (:data:`HEURISTIC_CONFIG`) only.
* General path (K not a multiple of 32, odd K included, or a block size that is not; blocks
  crossing rows): per element byte gather with the nibble chosen by the parity of ``n·K + k``
  and a per-element scale; masks on N and K. Slower, exact, for shapes real models do not have.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import DTYPES, INTERPRET, autotune_enabled, num_sms, tune_bench

__all__ = ["nf4_matmul", "launch_config", "pair_table", "autotune_enabled", "INTERPRET", "DTYPES",
           "MAX_BLOCK_M", "TUNE_CONFIGS", "HEURISTIC_CONFIG"]

MAX_BLOCK_M = 8         # rows of x one program keeps (a static loop over them); more -> M tiles
VEC = 16                # bytes of W per thread per step: one 128-bit load, 32 weights

# (BLOCK_N, BLOCK_KB bytes, num_warps): each gives every thread exactly one 16-byte vector of one
# row per step (BLOCK_N · BLOCK_KB / 16 == 32 · num_warps, with Triton's thread order over the
# tile: a thread holding two rows would load and unpack x twice). They trade programs per SM
# (N / BLOCK_N) against bytes per program step.
TUNE_CONFIGS = ((8, 256, 4), (4, 512, 4), (2, 1024, 4), (16, 256, 8), (8, 512, 8), (4, 1024, 8))
HEURISTIC_CONFIG = (8, 256, 4)
GENERAL_CONFIG = (16, 64, 4)  # general path: BLOCK_N, BLOCK_K (elements), num_warps
if INTERPRET:  # the interpreter's time goes by programs and ops, not elements: fewer, wider tiles
    HEURISTIC_CONFIG, GENERAL_CONFIG = (32, 128, 4), (32, 64, 4)



# ----------------------------------------------------------------------------- device helpers

@triton.jit
def _raw_scales(Absmax, blk, mask):
    """The stored statistics of quantization blocks ``blk``: uint8 (nested) or fp32."""
    return tl.load(Absmax + blk, mask=mask, other=0)


@triton.jit
def _decode_scales(raw, Absmax2, Code2, offset, blk, mask, NESTED: tl.constexpr, BLOCKSIZE2: tl.constexpr):
    """fp32 scales of blocks ``blk`` from their stored statistics ``raw``; 0 where ``mask`` is False."""
    if NESTED:
        s = tl.load(Code2 + raw.to(tl.int32)) * tl.load(Absmax2 + blk // BLOCKSIZE2, mask=mask, other=0.0) + offset
        return tl.where(mask, s, 0.0)
    return raw.to(tl.float32)


@triton.jit
def _unpair(p, XKIND: tl.constexpr):
    """(even, odd) fp32 halves of pairs ``p``: int32 pairs of bf16 (XKIND 0) or fp16 (1), int64
    pairs of fp32 (2); little-endian, the even element in the low half. Bit operations only:
    exact, and free of the interpreter's bf16 trap."""
    if XKIND == 0:
        even = (p << 16).to(tl.float32, bitcast=True)
        odd = (p & -65536).to(tl.float32, bitcast=True)
    elif XKIND == 1:
        even = (p & 65535).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
        odd = ((p >> 16) & 65535).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    else:
        even = (p & 4294967295).to(tl.uint32).to(tl.float32, bitcast=True)
        odd = ((p >> 32) & 4294967295).to(tl.uint32).to(tl.float32, bitcast=True)
    return even, odd


@triton.jit
def _store_rows(Out, Bias, ys, offs_n, n_ok, m0, M, stride_om, pid_k,
                HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr):
    """Write (or, split over K, atomically add) the BLOCK_M rows ``ys`` of (BLOCK_N,) sums."""
    bias = tl.zeros([BLOCK_N], tl.float32)
    if HAS_BIAS:
        bias = tl.load(Bias + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        if SPLIT_K > 1:
            bias = tl.where(pid_k == 0, bias, 0.0)   # added once, by the first K split
    for m in tl.static_range(BLOCK_M):
        out_ptrs = Out + (m0 + m).to(tl.int64) * stride_om + offs_n
        out_ok = n_ok & (m0 + m < M)
        if SPLIT_K > 1:
            tl.atomic_add(out_ptrs, ys[m] + bias, mask=out_ok)
        else:
            tl.store(out_ptrs, (ys[m] + bias).to(Out.dtype.element_ty), mask=out_ok)


# ----------------------------------------------------------------------------- kernel

# what changes the best config (with the dtypes, which Triton's autotuner adds itself)
_TUNE_KEY = ["N", "K", "BLOCK_M", "NESTED", "HAS_BIAS", "SPLIT_K", "BLOCKSIZE"]


def _tune_configs() -> list[triton.Config]:
    """The candidates as autotune configs (one stage: the kernel pipelines its loads by hand)."""
    return [triton.Config({"BLOCK_N": n, "BLOCK_KB": kb}, num_warps=w, num_stages=1) for n, kb, w in TUNE_CONFIGS]


def _prune(configs, named_args, **kwargs):
    """No tile wider than N needs (rounded up to a power of two); never an empty list."""
    fits = max(2, triton.next_power_of_2(named_args["N"]))
    kept = [c for c in configs if c.kwargs["BLOCK_N"] <= fits]
    return kept or configs[:1]


@triton.autotune(configs=_tune_configs(), key=_TUNE_KEY, prune_configs_by={"early_config_prune": _prune},
                 reset_to_zero=["Out"], do_bench=tune_bench)  # split K adds into Out: every timing run starts from zeros
@triton.jit
def _nf4_matmul_kernel(X, XP, W, Absmax, Pairs, Code, Absmax2, Code2, Offset, Bias, Out,
                       M, N, K, stride_wn, stride_xm, stride_xk, stride_pm, stride_om,
                       BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr,
                       HAS_BIAS: tl.constexpr, ALIGNED: tl.constexpr, XKIND: tl.constexpr,
                       SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_KB: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    m0 = tl.program_id(2) * BLOCK_M
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offset = 0.0
    if NESTED:
        offset = tl.load(Offset).to(tl.float32)
    row_start = offs_n.to(tl.int64) * K            # flat index of W[n, 0]: N·K may pass 2**31
    if ALIGNED:
        # K % 32 == 0: a row is K / 2 bytes, a multiple of 16, and each 16-byte vector (32
        # weights) lies in one quantization block (the block size is a multiple of 32 too)
        NVEC: tl.constexpr = BLOCK_KB // 16
        KB = stride_wn                                   # bytes per row, K / 2: a multiple of 16
        XP = XP + m0.to(tl.int64) * stride_pm
        offs_v = tl.arange(0, NVEC) * 16
        offs_b = tl.arange(0, 16)
        n_steps = tl.cdiv(KB, BLOCK_KB)
        per_split = tl.cdiv(n_steps, SPLIT_K)
        s_lo = pid_k * per_split
        s_hi = tl.minimum(s_lo + per_split, n_steps)
        w_rows = W + offs_n.to(tl.int64)[:, None, None] * stride_wn   # (the divisibility of stride_wn
        # by 16, which Triton specialises on, is what lets each thread load 16 bytes at once)
        accs = ()
        for m in tl.static_range(BLOCK_M):
            accs = accs + (tl.zeros([BLOCK_N, NVEC], tl.float32),)
        # step s_lo's bytes and statistics; each iteration loads the next step's first
        kb = s_lo * BLOCK_KB + offs_v                    # (NVEC,) byte offset of each vector in its row
        ok = n_ok[:, None] & (kb < KB)[None, :] & (s_lo < s_hi)
        b = tl.load(w_rows + (kb[None, :, None] + offs_b[None, None, :]), mask=ok[:, :, None], other=0)
        blk = (row_start[:, None] + 2 * kb[None, :]) // BLOCKSIZE
        raw = _raw_scales(Absmax, blk, ok)
        for step in range(s_lo, s_hi):
            kb_next = kb + BLOCK_KB
            ok_next = n_ok[:, None] & (kb_next < KB)[None, :] & (step + 1 < s_hi)
            b_next = tl.load(w_rows + (kb_next[None, :, None] + offs_b[None, None, :]),
                             mask=ok_next[:, :, None], other=0)
            blk_next = (row_start[:, None] + 2 * kb_next[None, :]) // BLOCKSIZE
            raw_next = _raw_scales(Absmax, blk_next, ok_next)

            # both codes of a byte with one 64-bit gather: (code[b >> 4], code[b & 15])
            w_even, w_odd = _unpair(tl.load(Pairs + b.to(tl.int32)), 2)
            scale = _decode_scales(raw, Absmax2, Code2, offset, blk, ok, NESTED, BLOCKSIZE2)
            # x pair j of a vector meets byte j; the pointers span the tile (see the docstring)
            x_ptrs = tl.broadcast_to(XP + ((kb[:, None] + offs_b[None, :]))[None, :, :], (BLOCK_N, NVEC, 16))
            x_ok = tl.broadcast_to((kb < KB)[None, :, None], (BLOCK_N, NVEC, 16))
            new = ()
            for m in tl.static_range(BLOCK_M):
                x_even, x_odd = _unpair(tl.load(x_ptrs + m * stride_pm, mask=x_ok & (m0 + m < M), other=0), XKIND)
                part = tl.sum(w_even * x_even + w_odd * x_odd, axis=2)      # (BLOCK_N, NVEC), in-thread
                new = new + (accs[m] + part * scale,)
            accs = new
            kb, ok, b, blk, raw = kb_next, ok_next, b_next, blk_next, raw_next
        ys = ()
        for m in tl.static_range(BLOCK_M):
            ys = ys + (tl.sum(accs[m], axis=1),)
    else:
        X = X + m0.to(tl.int64) * stride_xm
        offs_k = tl.arange(0, BLOCK_KB)                  # BLOCK_KB counts elements here
        n_steps = tl.cdiv(K, BLOCK_KB)
        per_split = tl.cdiv(n_steps, SPLIT_K)
        s_lo = pid_k * per_split
        s_hi = tl.minimum(s_lo + per_split, n_steps)
        accs = ()
        for m in tl.static_range(BLOCK_M):
            accs = accs + (tl.zeros([BLOCK_N, BLOCK_KB], tl.float32),)
        for step in range(s_lo, s_hi):
            cols = step * BLOCK_KB + offs_k
            k_ok = cols < K
            ok = n_ok[:, None] & k_ok[None, :]
            idx = row_start[:, None] + cols[None, :]
            byte = tl.load(W + (idx >> 1), mask=ok, other=0).to(tl.int32)
            q = (byte >> (4 - 4 * (idx & 1)).to(tl.int32)) & 15      # even index: high nibble
            blk = idx // BLOCKSIZE
            w = tl.load(Code + q) * _decode_scales(_raw_scales(Absmax, blk, ok), Absmax2, Code2, offset, blk, ok,
                                                   NESTED, BLOCKSIZE2)
            new = ()
            for m in tl.static_range(BLOCK_M):
                x = tl.load(X + m * stride_xm + cols * stride_xk, mask=k_ok & (m0 + m < M), other=0.0)
                new = new + (accs[m] + w * x.to(tl.float32)[None, :],)
            accs = new
        ys = ()
        for m in tl.static_range(BLOCK_M):
            ys = ys + (tl.sum(accs[m], axis=1),)
    _store_rows(Out, Bias, ys, offs_n, n_ok, m0, M, stride_om, pid_k, HAS_BIAS, BLOCK_M, BLOCK_N, SPLIT_K)


# ----------------------------------------------------------------------------- host side

_PAIR_TABLES: dict = {}


def pair_table(code: torch.Tensor) -> torch.Tensor:
    """(256,) int64: entry b holds the fp32 pair (code[b >> 4], code[b & 15]) (low half first),
    the codes of both nibbles of byte b. Built once per code table and cached (the cache keeps
    the code tensor alive, so its address names it; an in-place change bumps its version). Not
    cached while a CUDA graph is being captured (its kernels would not have run)."""
    key = (code.device, code.data_ptr(), code._version)
    hit = _PAIR_TABLES.get(key)
    if hit is not None:
        return hit[1]
    c = code.reshape(16).float()
    table = torch.stack((c.repeat_interleave(16), c.repeat(16)), dim=1).contiguous().view(torch.int64).reshape(256)
    capturing = code.is_cuda and torch.cuda.is_current_stream_capturing()
    if not capturing:
        if len(_PAIR_TABLES) >= 4096:
            _PAIR_TABLES.clear()
        _PAIR_TABLES[key] = (code, table)
    return table


def _x_pairs(x: torch.Tensor) -> torch.Tensor:
    """x (M, K), K even, viewed as (M, K / 2) pairs: int32 for 16-bit x, int64 for fp32 (a copy
    only when x's rows are not contiguous pairs)."""
    dtype = torch.int64 if x.dtype == torch.float32 else torch.int32
    try:
        return x.view(dtype)
    except RuntimeError:
        # a fresh buffer: .contiguous() returns a one-row x with an odd row stride or offset as it is
        return x.clone(memory_format=torch.contiguous_format).view(dtype)


def _block_m(M: int) -> int:
    """Rows per program: M itself up to 4 (decode batches, no wasted row), then 8."""
    return M if M <= 4 else min(MAX_BLOCK_M, triton.next_power_of_2(M))


def launch_config(M: int, N: int, K: int, blocksize: int, device: torch.device, *,
                  split_k: int | None = None, block_n: int | None = None, block_kb: int | None = None,
                  num_warps: int | None = None) -> dict:
    """The launch: BLOCK_M, ALIGNED, SPLIT_K, the M tiles, and the heuristic tile
    (BLOCK_N, BLOCK_KB, num_warps), which runs without autotuning (``configs`` lists what the
    autotuner may time instead). The keyword arguments override the heuristic (tests)."""
    aligned = K % 32 == 0 and blocksize % 32 == 0
    n, kb, w = HEURISTIC_CONFIG if aligned else GENERAL_CONFIG
    block_n, block_kb, num_warps = block_n or n, block_kb or kb, num_warps or w
    block_m = _block_m(M)
    m_tiles = triton.cdiv(M, block_m)
    n_steps = triton.cdiv(K // 2, block_kb) if aligned else triton.cdiv(K, block_kb)
    if split_k is None:
        # at least ~2 programs per SM (CPU tensors: no split), each with >= 2 K steps
        tiles = triton.cdiv(N, block_n) * m_tiles
        target = 2 * num_sms(device)
        split_k = max(1, min(triton.cdiv(target, tiles), n_steps // 2)) if tiles < target else 1
    split_k = max(1, min(split_k, n_steps))
    tune = aligned and autotune_enabled() and block_n == n and block_kb == kb and num_warps == w
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_KB=block_kb, num_warps=num_warps, ALIGNED=aligned,
                SPLIT_K=split_k, m_tiles=m_tiles, n_steps=n_steps, autotune=tune)


def nf4_matmul(x: torch.Tensor, weight: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
               absmax2: torch.Tensor | None, code2: torch.Tensor | None, offset: torch.Tensor | None,
               bias: torch.Tensor | None, out_features: int, blocksize: int, blocksize2: int = 256, *,
               split_k: int | None = None, block_n: int | None = None, block_kb: int | None = None,
               num_warps: int | None = None) -> torch.Tensor:
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
        split_k, block_n, block_kb, num_warps: override the heuristic launch (:func:`launch_config`;
            no autotuning then).

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
    p = launch_config(M, N, K, blocksize, x.device, split_k=split_k, block_n=block_n, block_kb=block_kb,
                      num_warps=num_warps)
    atomic = p["SPLIT_K"] > 1
    # split K: partial sums meet in a zeroed fp32 buffer (fp32 x: the output itself)
    acc = (out.zero_() if x.dtype == torch.float32 else torch.zeros((M, N), device=x.device,
                                                                   dtype=torch.float32)) if atomic else out
    xp = _x_pairs(x) if p["ALIGNED"] else x
    pairs = pair_table(code) if p["ALIGNED"] else code
    dummy = absmax  # never read: stands in for the absent optional tensors
    args = (x, xp, weight, absmax, pairs, code,
            absmax2 if nested else dummy, code2 if nested else dummy, offset if nested else dummy,
            bias if bias is not None else dummy, acc,
            M, N, K, K // 2, x.stride(0), x.stride(1), xp.stride(0), acc.stride(0))
    meta = dict(BLOCKSIZE=int(blocksize), BLOCKSIZE2=int(blocksize2), NESTED=nested, HAS_BIAS=bias is not None,
                ALIGNED=p["ALIGNED"], XKIND={torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}[x.dtype],
                SPLIT_K=p["SPLIT_K"], BLOCK_M=p["BLOCK_M"])
    if p["autotune"]:
        grid = lambda cfg: (triton.cdiv(N, cfg["BLOCK_N"]), p["SPLIT_K"], p["m_tiles"])  # noqa: E731
        _nf4_matmul_kernel[grid](*args, **meta)
    else:
        grid = (triton.cdiv(N, p["BLOCK_N"]), p["SPLIT_K"], p["m_tiles"])
        _nf4_matmul_kernel.fn[grid](*args, **meta, BLOCK_N=p["BLOCK_N"], BLOCK_KB=p["BLOCK_KB"],
                                    num_warps=p["num_warps"], num_stages=1)
    return out if acc is out else out.copy_(acc)
