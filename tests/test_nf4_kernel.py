"""The fused NF4 dequantize-matmul: bitsandbytes' layout, the Triton kernel, the custom op,
:func:`fastflamingo.ops.nf4.nf4_linear`'s backends and :func:`use_fused_nf4`.

Weights are quantized with ``bitsandbytes.functional.quantize_4bit``, never through a
``Linear4bit`` forward first: on AVX512-BF16 CPUs that forward repacks the weight into a CPU-only
layout (ENVIRONMENT.md), and the kernel reads the standard (CUDA) one.

Results are held to the flash-attention rule (:func:`fastflamingo.testing.assert_close_by_rule`):
at most 2x further from a float64 reference than the same computation in x's dtype
(:func:`nf4_linear_reference`, which dequantizes in fp32 and casts, as bitsandbytes does).
Without a GPU, Triton runs in its interpreter (tests/conftest.py): shapes stay small.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from fastflamingo.ops import nf4 as nf4_ops
from fastflamingo.ops.nf4 import (dequantize_4bit_reference, nf4_linear, nf4_linear_reference,
                                  use_fused_nf4)
from fastflamingo.testing import assert_close_by_rule

bnb = pytest.importorskip("bitsandbytes")
BF = bnb.functional

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")

# (N, K): multiples of 64, K not a multiple of the block (blocks run across rows), N not a
# multiple of the kernel's 64-row tile, an aligned bs=128 case with a ragged N, an odd K
SHAPES = [(64, 64), (96, 200), (130, 72), (40, 256), (33, 45)]


# ----------------------------------------------------------------------------- inputs

def quantized(N, K, blocksize=64, nested=False, *, quant_type="nf4", seed=0, device=DEVICE):
    """(packed uint8 (ceil(N·K/2), 1), QuantState) of a random (N, K) weight, as a Params4bit holds them."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(N, K, generator=g) * 0.5).to(device)
    return BF.quantize_4bit(w, blocksize=blocksize, compress_statistics=nested, quant_type=quant_type)


def randn(*shape, dtype=torch.float32, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)


def check(y, x, packed, state, bias=None, *, name="output"):
    """y vs the float64 reference, by the rule against the same math in x's dtype."""
    high = nf4_linear_reference(x.double(), packed, state, None if bias is None else bias.double())
    low = nf4_linear_reference(x, packed, state, bias)
    assert y.shape == low.shape and y.dtype == x.dtype, (y.shape, y.dtype, low.shape, x.dtype)
    assert torch.isfinite(y).all()
    assert_close_by_rule(y, high, low, factor=2.0, name=name)


# ----------------------------------------------------------------------------- layout

def test_nibble_order_and_flat_blocks_by_hand():
    """Pin the layout on values whose codes are known: NF4 code 0 is -1, 15 is +1, 7 is 0.
    Row-major flattening, high nibble first, one scale per 64 elements of the flattened W."""
    w = torch.zeros(2, 40)
    code = BF.get_4bit_type("nf4", device="cpu")
    w[0, 0], w[0, 1], w[0, 2] = -2.0, 2.0, 2 * code[13]   # block 0 (elements 0..63): absmax 2
    w[1, 39] = 3.0                                 # element 79, block 1 (64..79): absmax 3
    packed, state = BF.quantize_4bit(w.to(DEVICE), blocksize=64, quant_type="nf4")
    b = packed.reshape(-1).cpu()
    assert packed.shape == (40, 1) and packed.dtype == torch.uint8
    assert b[0].item() == 0x0F, "element 0 (-1 -> code 0) is the high nibble, element 1 (+1 -> 15) the low"
    assert b[1].item() == 0xD7, "element 2 (code 13) high, element 3 (0.0 -> code 7) low"
    assert b[39].item() == 0x7F, "element 79 (row 1, col 39) is the low nibble of byte 39"
    assert state.absmax.cpu().tolist() == [2.0, 3.0]
    assert state.code[[0, 7, 15]].tolist() == [-1.0, 0.0, 1.0]
    torch.testing.assert_close(dequantize_4bit_reference(packed, state)[0, :3].cpu(),
                               torch.tensor([-2.0, 2.0, 2 * code[13].item()]))


def bnb_generic_dequantize(packed, state):
    """bitsandbytes' device-independent dequantize_4bit (its "default" backend, which mirrors
    the CUDA kernel), called without the torch.compile wrapper bitsandbytes puts around it."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    absmax = state.absmax
    if state.nested:
        absmax = BF.dequantize_blockwise(state.absmax, state.state2) + state.offset
    compute = getattr(_dequantize_4bit_compute, "__wrapped__", _dequantize_4bit_compute)
    return compute(packed.reshape(-1), absmax, state.code, state.blocksize, state.shape, torch.float32)


@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
@pytest.mark.parametrize("blocksize", [64, 128])
def test_reference_dequantize_is_bitsandbytes(blocksize, nested):
    """The readable dequantization equals bitsandbytes' own bit for bit: its generic (CUDA-like)
    dequantize_4bit always, and its public dequantize_4bit where that is right. bitsandbytes
    0.50's native CPU kernel gives rows the wrong scale when K is a multiple of 16 but not of
    the block size (e.g. K = 64 with blocksize 128, or 48 / 96 with 64), so on the CPU the
    public one is compared only for K a multiple of the block size or not of 16."""
    for N, K in SHAPES:
        packed, state = quantized(N, K, blocksize, nested)
        assert state.nested == nested and (state.absmax.dtype == torch.uint8) == nested
        ref = dequantize_4bit_reference(packed, state)
        assert ref.shape == (N, K) and ref.dtype == torch.float32
        assert torch.equal(ref, bnb_generic_dequantize(packed, state))
        if CUDA or K % blocksize == 0 or (K % 16 and K % 2 == 0):  # odd K: bitsandbytes compiles its fallback
            assert torch.equal(ref, BF.dequantize_4bit(packed, state).float())


# ----------------------------------------------------------------------------- Triton kernel

def kernel_args(packed, state):
    qt = nf4_ops.quant_tensors(state)
    return packed.reshape(-1), qt.absmax, qt.code, qt.absmax2, qt.code2, qt.offset


@pytest.mark.parametrize("with_bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
@pytest.mark.parametrize("N,K,blocksize", [(N, K, 64) for N, K in SHAPES] + [(64, 64, 128), (130, 72, 128)])
def test_triton_matches_reference(N, K, blocksize, nested, with_bias):
    """Both paths (K % 32 == 0: the vector path, blocks crossing rows included; otherwise the
    general one), rows in every class the kernel keeps (M itself up to 4, then 8, and tiles
    of 8 beyond: 16, 17), fp32 and fp16 x."""
    packed, state = quantized(N, K, blocksize, nested)
    bias = randn(N, seed=3) if with_bias else None
    for dtype, rows in ((torch.float32, (1, 2, 3, 4, 5, 16, 17)), (torch.float16, (1, 4, 16))):
        for M in rows:
            x = randn(M, K, dtype=dtype, seed=M)
            y = nf4_linear(x, packed, state, None if bias is None else bias.to(dtype), backend="triton")
            check(y, x, packed, state, None if bias is None else bias.to(dtype), name=f"M={M} {dtype}")


def test_triton_equals_bitsandbytes_dequantize_in_fp32():
    """Against bitsandbytes' own dequantization (its generic kernel) + an fp64 matmul: the kernel
    accumulates in fp32, so fp32 x lands within fp32 rounding of it, on both paths."""
    for N, K, blocksize, nested in ((96, 320, 64, True), (130, 72, 128, False), (33, 45, 64, True)):
        packed, state = quantized(N, K, blocksize, nested)
        w = bnb_generic_dequantize(packed, state).double()
        for M in (1, 4, 17):
            x = randn(M, K, seed=M)
            y = nf4_linear(x, packed, state, backend="triton")
            torch.testing.assert_close(y.double(), x.double() @ w.T, rtol=1e-5, atol=1e-5)


def test_triton_takes_both_kernel_paths():
    """The vector path needs K and the block size to be multiples of 32 (each 16-byte vector in
    one block); the shapes above reach both paths. Rows per program: M itself up to 4, then
    8 rows, then tiles of 8."""
    from fastflamingo.kernels.nf4 import launch_config
    cpu = torch.device("cpu")
    paths = {(N, K, bs): launch_config(3, N, K, bs, cpu)["ALIGNED"] for N, K in SHAPES for bs in (64, 128)}
    assert paths[(64, 64, 64)] and paths[(40, 256, 128)] and paths[(64, 64, 128)] and paths[(96, 200, 64)] is False
    assert paths[(130, 72, 128)] is False and paths[(33, 45, 64)] is False
    assert [launch_config(M, 64, 64, 64, cpu)["BLOCK_M"] for M in (1, 3, 4, 5, 9, 16, 17)] == [1, 3, 4, 8, 8, 8, 8]
    assert [launch_config(M, 64, 64, 64, cpu)["m_tiles"] for M in (8, 16, 17)] == [1, 2, 3]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("N,K,blocksize", [(96, 320, 64), (130, 150, 64), (72, 320, 256)],
                         ids=["aligned", "general", "aligned_bs256_blocks_across_rows"])
def test_triton_split_k_and_tiles(N, K, blocksize, dtype):
    """K split across programs (fp32 atomics into a zeroed buffer, bias added once), in uneven
    splits and in more splits than some configs have steps; several N tiles, N not a multiple of
    the tile; other tiles than the heuristic's (the autotuner's candidates). bf16 x is read as
    bit pairs (exact in the interpreter too)."""
    from fastflamingo.kernels.nf4 import TUNE_CONFIGS, launch_config, nf4_matmul
    packed, state = quantized(N, K, blocksize, nested=True)
    bias = randn(N, dtype=dtype, seed=4)
    x = randn(5, K, dtype=dtype)
    aligned = launch_config(5, N, K, blocksize, x.device)["ALIGNED"]
    block_kb = 32 if aligned else 16   # 5 steps of 32 bytes (aligned) / 10 of 16 elements
    for split_k in (2, 3):
        p = launch_config(5, N, K, blocksize, x.device, split_k=split_k, block_n=16, block_kb=block_kb)
        assert p["SPLIT_K"] == split_k, p
        y = nf4_matmul(x, *kernel_args(packed, state), bias, N, blocksize, 256, split_k=split_k, block_n=16,
                       block_kb=block_kb, num_warps=1)
        check(y, x, packed, state, bias, name=f"split_k={split_k}")
    if aligned and dtype == torch.float32:
        for block_n, block_kb, num_warps in TUNE_CONFIGS[1:]:
            y = nf4_matmul(x, *kernel_args(packed, state), bias, N, blocksize, 256, block_n=block_n,
                           block_kb=block_kb, num_warps=num_warps)
            check(y, x, packed, state, bias, name=f"config {(block_n, block_kb, num_warps)}")


@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
def test_triton_bf16_and_fp4(nested):
    """bf16 activations (bit pairs on the vector path, upcast at load on the general one) and the
    FP4 code table (same layout, another table), on both paths, with and without a bias."""
    for quant_type, dtype in (("nf4", torch.bfloat16), ("fp4", torch.float32), ("fp4", torch.bfloat16)):
        for N, K in ((96, 128), (40, 90)):
            packed, state = quantized(N, K, 64, nested, quant_type=quant_type)
            for M, bias in ((1, None), (4, randn(N, dtype=dtype, seed=2)), (17, None)):
                x = randn(M, K, dtype=dtype, seed=M)
                check(nf4_linear(x, packed, state, bias, backend="triton"), x, packed, state, bias,
                      name=f"{quant_type} {dtype} M={M} K={K}")


def test_pair_table_and_its_cache():
    """Entry b of the pair table holds (code[b >> 4], code[b & 15]) as one int64 (low half
    first); it is built once per code table and rebuilt when the table changes in place."""
    from fastflamingo.kernels.nf4 import pair_table
    code = BF.get_4bit_type("nf4", device=DEVICE).float()
    table = pair_table(code)
    assert table.dtype == torch.int64 and table.shape == (256,)
    pairs = table.view(torch.float32).reshape(256, 2)
    b = torch.arange(256, device=DEVICE)
    assert torch.equal(pairs[:, 0], code[b >> 4]) and torch.equal(pairs[:, 1], code[b & 15])
    assert pair_table(code) is table
    code.mul_(2)
    assert torch.equal(pair_table(code).view(torch.float32).reshape(256, 2)[:, 1], code[b & 15])


@pytest.mark.parametrize("N,K", [(64, 128), (33, 45)])
def test_triton_strided_and_3d_inputs(N, K):
    packed, state = quantized(N, K, 64, nested=True)
    bias = randn(N, seed=5)
    # non-contiguous 2-D: a transposed buffer, and every other column of a wider one
    for x in (randn(K, 3).t(), randn(4, 2 * K)[:, ::2]):
        assert not x.is_contiguous()
        check(nf4_linear(x, packed, state, bias, backend="triton"), x, packed, state, bias)
    # one row of an odd-width buffer, and rows at an odd storage offset: not viewable as pairs
    flat = randn(3 * K + 1)
    for x in (randn(3, K + 1)[1:2, :K], randn(3, K + 1)[1:2, :K].unsqueeze(0), flat[1:1 + 3 * K].view(3, K)):
        check(nf4_linear(x, packed, state, bias, backend="triton"), x, packed, state, bias)
    y = nf4_linear(randn(K), packed, state, bias, backend="triton")   # one row, no leading dims
    assert y.shape == (N,)
    check(y, randn(K), packed, state, bias)
    # (B, T, K), contiguous and as a transposed (T, B, K) buffer
    for x in (randn(2, 3, K), randn(3, 2, K).transpose(0, 1)):
        y = nf4_linear(x, packed, state, bias, backend="triton")
        assert y.shape == (2, 3, N)
        check(y, x, packed, state, bias)


def test_triton_empty_and_many_rows():
    """Zero rows; more rows than one program keeps (M tiles of 8)."""
    packed, state = quantized(40, 64, 64)
    assert nf4_linear(randn(0, 64), packed, state, backend="triton").shape == (0, 40)
    x = randn(40, 64)
    check(nf4_linear(x, packed, state, randn(40, seed=2), backend="triton"), x, packed, state, randn(40, seed=2))


def test_quant_storage_other_than_uint8():
    """bitsandbytes may store the packed bytes as another dtype (quant_storage, for FSDP)."""
    w = randn(64, 64)
    packed, state = BF.quantize_4bit(w, blocksize=64, quant_type="nf4", quant_storage=torch.float16)
    assert packed.dtype == torch.float16
    x = randn(2, 64)
    check(nf4_linear(x, packed, state, backend="triton"), x, packed, state)


def test_gradients_through_the_op():
    """Not an inference-only dead end: dx = grad @ dequantize(W), dbias = grad.sum(0)."""
    packed, state = quantized(48, 96, 64, nested=True)
    x = randn(2, 3, 96).requires_grad_()
    bias = randn(48, seed=2).requires_grad_()
    nf4_linear(x, packed, state, bias, backend="triton").square().sum().backward()
    x_ref, b_ref = x.detach().clone().requires_grad_(), bias.detach().clone().requires_grad_()
    nf4_linear_reference(x_ref, packed, state, b_ref).square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(bias.grad, b_ref.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
def test_opcheck(nested):
    """torch.library's checks of the schema, the fake (meta) function and the autograd
    registration, with and without the optional (nested statistics) tensors."""
    packed, state = quantized(40, 64, 64, nested=nested)
    qt = nf4_ops.quant_tensors(state)
    x = randn(3, 64).requires_grad_()
    torch.library.opcheck(torch.ops.fastflamingo.nf4_linear.default,
                          (x, packed.reshape(-1), qt.absmax, qt.code, qt.absmax2, qt.code2, qt.offset,
                           randn(40, seed=2), 40, 64, 64, qt.blocksize2))


# ----------------------------------------------------------------------------- other backends

@pytest.mark.parametrize("N,K,blocksize,nested", [(64, 64, 64, False), (96, 200, 64, True), (130, 72, 128, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_backends_agree(N, K, blocksize, nested, dtype):
    """bitsandbytes' own matmul ("torch"), the reference and "auto" give the same result by the rule."""
    packed, state = quantized(N, K, blocksize, nested)
    x, bias = randn(2, 3, K, dtype=dtype), randn(N, dtype=dtype, seed=2)
    for backend in ("torch", "reference", "auto"):
        check(nf4_linear(x, packed, state, bias, backend=backend), x, packed, state, bias, name=backend)


def test_auto_on_cpu_avoids_the_bitsandbytes_cpu_kernel_where_it_is_wrong():
    """K = 96 with blocksize 64: bitsandbytes' CPU dequantization scales rows wrongly there
    (see test_reference_dequantize_is_bitsandbytes); "auto" must still be right."""
    packed, state = quantized(40, 96, 64)
    x = randn(3, 96)
    check(nf4_linear(x, packed, state), x, packed, state)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_torch_compile_fullgraph(backend):
    """torch.compile(fullgraph=True) (an error on any graph break) through nf4_linear: its
    checks, the reference math, bitsandbytes' ops."""
    packed, state = quantized(64, 128, 64, nested=True)
    bias = randn(64, seed=2)

    def step(x):
        return torch.relu(nf4_linear(x, packed, state, bias, backend=backend)) * 2

    x = randn(2, 128)
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    torch.testing.assert_close(compiled(x), step(x), rtol=1e-5, atol=1e-5)


def test_benchmark_checks_then_times():
    """fastflamingo.bench.nf4: "n/a" rows at once off CUDA; its cases (here one tiny one, the
    kernel in the interpreter) pass the output check before any time is reported."""
    from fastflamingo.bench import nf4 as nf4_bench
    if not CUDA:
        rows = nf4_bench.run("cpu", quick=True, progress=False)
        assert len(rows) == 3 * 2 * 3 and all(r.status.startswith("n/a: needs a CUDA GPU") for r in rows)
    rows = nf4_bench.run_cases(DEVICE, [(64, 128)], [2], quick=True, progress=False)
    by_provider = {r.provider: r for r in rows}
    assert set(by_provider) == {*nf4_bench.PROVIDERS, "roofline nf4", "roofline bf16"}
    assert all(r.ok for r in rows), [(r.provider, r.status) for r in rows]
    assert by_provider["roofline nf4"].median < by_provider["roofline bf16"].median


# ----------------------------------------------------------------------------- errors

def test_validation_errors(monkeypatch):
    packed, state = quantized(40, 64, 64)
    x = randn(2, 64)
    with pytest.raises(ValueError, match=r"2, 63\) has 63 features .* \(40, 64\)"):
        nf4_linear(randn(2, 63), packed, state, backend="reference")
    with pytest.raises(TypeError, match="floating-point.*torch.int64"):
        nf4_linear(torch.ones(2, 64, dtype=torch.long, device=DEVICE), packed, state)
    with pytest.raises(TypeError, match="backend='triton' takes .*got torch.float64"):
        nf4_linear(x.double(), packed, state, backend="triton")
    with pytest.raises(ValueError, match="holds 1279 bytes .* needs 1280"):
        nf4_linear(x, packed.reshape(-1)[1:], state, backend="triton")
    with pytest.raises(ValueError, match=r"bias has shape \(41,\), expected \(40,\)"):
        nf4_linear(x, packed, state, randn(41), backend="triton")
    with pytest.raises(ValueError, match="backend='fast' is not one of"):
        nf4_linear(x, packed, state, backend="fast")
    with pytest.raises(TypeError, match="must be a bitsandbytes QuantState"):
        nf4_linear(x, packed, {"absmax": state.absmax}, backend="reference")
    with pytest.raises(ValueError, match="has 1 scales .* needs 40"):
        nf4_linear(x, packed, BF.QuantState(state.absmax[:1], shape=state.shape, code=state.code,
                                            blocksize=64, quant_type="nf4", dtype=torch.float32))
    with pytest.raises(ValueError, match="use_fused_nf4: backend='torch'"):
        use_fused_nf4(nn.Sequential(), backend="torch")
    from fastflamingo.kernels import nf4 as nf4_kernels
    monkeypatch.setattr(nf4_kernels, "INTERPRET", False)
    if not CUDA:
        with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
            nf4_linear(x, packed, state, backend="triton")


# ----------------------------------------------------------------------------- use_fused_nf4

def linear4bit(in_features, out_features, bias, nested, seed):
    """A Linear4bit quantized from a known nn.Linear, before any forward (standard layout)."""
    torch.manual_seed(seed)
    ref = nn.Linear(in_features, out_features, bias=bias)
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=bias, compute_dtype=torch.float32, quant_type="nf4",
                              compress_statistics=nested, device="meta")
    layer.weight = bnb.nn.Params4bit(ref.weight.data.to(DEVICE), requires_grad=False, quant_type="nf4",
                                     compress_statistics=nested, module=layer)
    layer.weight._quantize(torch.device(DEVICE))
    if bias:
        layer.bias = nn.Parameter(ref.bias.data.to(DEVICE))
    return layer


class KernelCalls:
    """Counts launches of the fused kernel."""

    def __init__(self, monkeypatch):
        from fastflamingo.kernels import nf4 as nf4_kernels
        self.n, real = 0, nf4_kernels.nf4_matmul

        def counted(*args, **kwargs):
            self.n += 1
            return real(*args, **kwargs)
        monkeypatch.setattr(nf4_kernels, "nf4_matmul", counted)


@pytest.fixture
def tiny_model():
    # in_features 64 and 72: shapes bitsandbytes' CPU forward gets right (not 48 or 96, see
    # test_reference_dequantize_is_bitsandbytes); 72 takes the kernel's general path
    model = nn.Sequential(linear4bit(64, 72, True, True, 0), nn.GELU(), linear4bit(72, 40, False, False, 1)).eval()
    for m in model:
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False  # keep the standard layout for the comparison
    return model


@torch.no_grad()
def test_use_fused_nf4_routes_small_inputs(tiny_model, monkeypatch):
    """Forced backend="triton" (the interpreter on the CPU): inputs of <= max_rows rows take the
    kernel, larger ones the layer's own forward; both give the layers' own outputs."""
    calls = KernelCalls(monkeypatch)
    small, large = randn(2, 3, 64), randn(5, 4, 64, seed=2)
    expected = [tiny_model(x) for x in (small, large)]
    assert use_fused_nf4(tiny_model, max_rows=6, backend="triton") == 2
    torch.testing.assert_close(tiny_model(small), expected[0], rtol=1e-5, atol=1e-5)
    assert calls.n == 2, "a (2, 3, K) input (6 rows) goes through the kernel in both layers"
    torch.testing.assert_close(tiny_model(large), expected[1], rtol=1e-5, atol=1e-5)
    assert calls.n == 2, "20 rows > max_rows: the layers' own forward"
    # fp16 input into fp32-compute layers: cast like Linear4bit does, output back in fp16
    y = tiny_model(small.half())
    assert y.dtype == torch.float16 and calls.n == 4
    torch.testing.assert_close(y, expected[0].half(), rtol=2e-3, atol=2e-3)
    assert use_fused_nf4(tiny_model, max_rows=0) == 2
    # back to the layers' own forward, or fastflamingo's CPU guard for K not a multiple of the block (72)
    from fastflamingo.ops.nf4 import linear4bit_forward
    assert [getattr(vars(m).get("forward"), "__func__", None) for m in tiny_model[::2]] == [None, linear4bit_forward]
    tiny_model(small)
    assert calls.n == 4


@torch.no_grad()
def test_use_fused_nf4_model_compiles_fullgraph(tiny_model):
    """The routing forward and the op trace with no graph break (the kernel stays opaque: on the
    CPU the interpreter runs it when the compiled graph calls the op)."""
    x = randn(2, 64)
    expected = tiny_model(x)
    use_fused_nf4(tiny_model, backend="triton")
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(tiny_model, fullgraph=True)(x), expected, rtol=1e-5, atol=1e-5)


def test_fused_nf4_flamingo_compiled_decode_is_one_graph(monkeypatch):
    """The e2e suite's "fastflamingo nf4 fused" entrant on a GPU: a Flamingo model with every
    frozen layer in NF4 (LM, vision, cross-attention), decode steps through the kernel, the decode
    step compiled. Here with the interpreter: one graph, no break, the kernel called, the same
    tokens as the eager decode."""
    from torch._dynamo.utils import counters
    import fastflamingo
    from fastflamingo.generation import generate
    from fastflamingo.quant import quantize_model
    torch.manual_seed(0)
    model = fastflamingo.Flamingo.from_preset("tiny").eval()
    c = model.config
    quantize_model(model, "nf4", vision=True, cross_attention=True)
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False  # the standard layout the kernel reads (a GPU's)
    assert use_fused_nf4(model, backend="triton") > 0
    vx = torch.randn(2, 2, 1, 3, c.vision.image_size, c.vision.image_size)
    ids = torch.randint(0, 100, (2, 24))
    ids[:, [0, 10]] = c.media_token_id
    torch._dynamo.reset()
    counters.clear()
    calls = KernelCalls(monkeypatch)
    compiled = generate(model, vx, ids, max_new_tokens=3, cache="static", compile=True)
    assert calls.n > 0
    assert not counters["graph_break"] and counters["stats"]["unique_graphs"] == 1, dict(counters["graph_break"])
    assert torch.equal(compiled, generate(model, vx, ids, max_new_tokens=3, cache="static", compile=False))


@torch.no_grad()
def test_use_fused_nf4_auto_falls_back_off_cuda(tiny_model, monkeypatch):
    calls = KernelCalls(monkeypatch)
    x = randn(1, 64)
    expected = tiny_model(x)
    use_fused_nf4(tiny_model)
    torch.testing.assert_close(tiny_model(x), expected)
    assert calls.n == (2 if CUDA else 0)


@pytest.mark.skipif(CUDA or not BF.has_avx512bf16(), reason="bitsandbytes' CPU repacking needs an AVX512-BF16 CPU")
@torch.no_grad()
def test_use_fused_nf4_leaves_cpu_repacked_weights_to_bitsandbytes(monkeypatch):
    """A weight bitsandbytes repacked for its CPU kernel (first eval/no-grad CPU forward, shapes
    in multiples of 64) is not in the layout the kernel reads: the layer's own forward runs."""
    calls = KernelCalls(monkeypatch)
    layer = linear4bit(64, 64, True, True, 0).eval()
    layer.support_avx512bf16_for_cpu = True
    x = randn(1, 64)
    expected = layer(x)
    assert vars(layer.weight.quant_state).get("packing_format_for_cpu")
    use_fused_nf4(layer, backend="triton")
    torch.testing.assert_close(layer(x), expected)
    assert calls.n == 0
    with pytest.raises(ValueError, match="packing_format_for_cpu"):
        nf4_linear(x, layer.weight, layer.weight.quant_state, backend="triton")


# ----------------------------------------------------------------------------- GPU only

@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("N,K", [(4096, 4096), (1024, 11008), (11008, 1024)])
def test_cuda_model_shapes(N, K, dtype):
    """LLaMA-like shapes in real bf16 / fp16 on the GPU, M = 1, 4, 16, nested statistics (the
    Linear4bit default), against the rule and against bitsandbytes' own matmul."""
    packed, state = quantized(N, K, 64, nested=True)
    bias = randn(N, dtype=dtype, seed=2)
    for M in (1, 4, 16):
        x = randn(M, K, dtype=dtype, seed=M)
        y = nf4_linear(x, packed, state, bias, backend="triton")
        check(y, x, packed, state, bias, name=f"M={M}")
        check(nf4_linear(x, packed, state, bias, backend="torch"), x, packed, state, bias, name="bitsandbytes")


@needs_cuda
def test_cuda_auto_and_compile(monkeypatch):
    """auto takes the kernel for <= 16 rows on CUDA, bitsandbytes above; the op compiles whole."""
    calls = KernelCalls(monkeypatch)
    packed, state = quantized(256, 512, 64, nested=True)
    nf4_linear(randn(16, 512, dtype=torch.bfloat16), packed, state)
    assert calls.n == 1
    nf4_linear(randn(17, 512, dtype=torch.bfloat16), packed, state)
    assert calls.n == 1
    x = randn(2, 512, dtype=torch.bfloat16)
    torch._dynamo.reset()
    step = torch.compile(lambda t: nf4_linear(t, packed, state, backend="triton").float().softmax(-1),
                         fullgraph=True)
    torch.testing.assert_close(step(x), nf4_linear(x, packed, state, backend="triton").float().softmax(-1))
