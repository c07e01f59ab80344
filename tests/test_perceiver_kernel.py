"""The fused Perceiver attention (Triton kernels and custom op) against the reference math.

Without a GPU the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1):
bf16 then goes through the kernels' fp32 upcast path. With a GPU the same tests run on CUDA.

Tolerances follow flash-attention's rule (fastflamingo.testing.assert_close_by_rule): the kernel
may be at most 2x (outputs) / 3x (gradients) further from a high-precision reference than the
same reference math run in the kernel's dtype is. The high-precision reference is fp32 for
fp16/bf16 inputs and fp64 for fp32 inputs, so fp32 is held to fp32 accuracy too.
"""
from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from fastflamingo.ops import perceiver_attention, perceiver_attention_reference
from fastflamingo.ops import dispatch, perceiver_op
from fastflamingo.testing import assert_close_by_rule

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NAMES = ("q", "k_media", "v_media", "k_latents", "v_latents")
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def make_inputs(B, H, L, V, D, dtype, device=DEVICE, seed=0):
    """q, k_media, v_media, k_latents, v_latents, each (B, H, S, D), contiguous."""
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, S, D, generator=g).to(device=device, dtype=dtype) for S in (L, V, V, L, L))


def reference_with_grads(inputs, dout, dtype, scale=None):
    """The reference output and its gradients for ``dout``, computed on copies in ``dtype``
    (not with ``upcast=True``, which would compute fp64 copies in fp32)."""
    leaves = [x.detach().to(dtype).requires_grad_() for x in inputs]
    out = perceiver_attention_reference(*leaves, scale=scale)
    return out, torch.autograd.grad(out, leaves, dout.to(dtype))


def check_by_rule(out, grads, inputs, dout, scale=None):
    """Output (factor 2) and the five gradients (factor 3) against the high-precision reference,
    relative to the same reference run in the inputs' dtype."""
    dtype = inputs[0].dtype
    hi = torch.float64 if dtype == torch.float32 else torch.float32
    leaves_lo = [x.detach().requires_grad_() for x in inputs]
    ref_lo = perceiver_attention_reference(*leaves_lo, scale=scale)
    grads_lo = torch.autograd.grad(ref_lo, leaves_lo, dout)
    ref_hi, grads_hi = reference_with_grads(inputs, dout, hi, scale)
    assert out.shape == ref_hi.shape and out.dtype == dtype
    assert_close_by_rule(out, ref_hi, ref_lo, factor=2.0, name="out")
    for name, g, g_hi, g_lo in zip(NAMES, grads, grads_hi, grads_lo):
        assert g.shape == g_hi.shape and g.dtype == dtype, name
        assert_close_by_rule(g, g_hi, g_lo, factor=3.0, name=f"d{name}")


def kernel_fwd_bwd(inputs, scale, seed=1, **bwd_kwargs):
    from fastflamingo.kernels.perceiver import perceiver_bwd, perceiver_fwd
    out, lse = perceiver_fwd(*inputs, scale)
    g = torch.Generator().manual_seed(seed)
    dout = torch.randn(out.shape, generator=g).to(out.device, out.dtype)
    grads = perceiver_bwd(dout, *inputs, out, lse, scale, **bwd_kwargs)
    return out, lse, dout, grads


# Covering subset of V x L x D x dtype (the full product is slow in the interpreter): every V
# with (L, D, dtype) = (16, 64, fp16) (V = 257, 577 in the second list); every (L, D, dtype)
# with V = 257 and 577 (one key past a multiple of 64, the tails real images have).
_ALL_V = [(16, V, 64, torch.float16) for V in (1, 63, 256)]
_ALL_LD = [(L, V, D, dt) for V in (257, 577) for L in (16, 64) for D in (64, 96)
           for dt in (torch.float32, torch.float16)]
# odd sizes: latents below a tile, head dims far from a power of two, no media at all, and an
# fp32 head over 128 (its query tile is capped below L: the backward's multi-tile path)
_ODD = [(5, 63, 8, torch.float32), (8, 1, 40, torch.float16), (64, 0, 64, torch.float32),
        (64, 63, 160, torch.float32)]
_BF16 = [(16, 257, 64, torch.bfloat16), (64, 63, 96, torch.bfloat16)]


@needs_triton
@pytest.mark.parametrize("L,V,D,dtype", _ALL_V + _ALL_LD + _ODD + _BF16,
                         ids=lambda p: str(p).replace("torch.", "") if not isinstance(p, int) else None)
def test_kernel_matches_reference(L, V, D, dtype):
    inputs = make_inputs(2, 2, L, V, D, dtype)
    scale = D ** -0.5
    out, lse, dout, grads = kernel_fwd_bwd(inputs, scale)
    check_by_rule(out, grads, inputs, dout)
    # lse is what the backward trusts: the log-sum-exp of each row's scaled scores
    q, k = inputs[0].double(), torch.cat([inputs[1], inputs[3]], 2).double()
    torch.testing.assert_close(lse.double(), torch.logsumexp(q @ k.transpose(-1, -2) * scale, -1),
                               atol=1e-5, rtol=1e-5)


@needs_triton
@pytest.mark.parametrize("L,V,block_m,num_splits", [
    (40, 63, 16, 1),      # queries over several tiles: dq read-added-written per key block
    (16, 257, None, 3),   # one head's keys shared by 3 programs; the last spans media and latents
    (40, 63, 16, 2),      # both at once; the second split starts inside the latents
    (64, 1, None, 2),     # the second split holds latents only
])
def test_kernel_multi_tile_and_split_paths(L, V, block_m, num_splits):
    """The backward's fallbacks for L > 128 latents and for too few heads to fill a GPU."""
    inputs = make_inputs(1, 2, L, V, 32, torch.float32)
    out, _, dout, grads = kernel_fwd_bwd(inputs, 32 ** -0.5, block_m=block_m, num_splits=num_splits)
    check_by_rule(out, grads, inputs, dout)


@needs_triton
@pytest.mark.parametrize("block_m,num_splits", [(None, None), (16, 3)], ids=["one_tile", "tiles_and_splits"])
def test_launch_grids_stay_within_cuda_limits(block_m, num_splits, monkeypatch):
    """CUDA caps a grid's axes 1 and 2 at 65535 programs: B*H = 2**16 heads (the resampler's
    8192 images of 8 heads) must not sit there. The launches' grids, captured on meta tensors
    (no kernel runs), cover every (query tile or split, head) program."""
    from fastflamingo.kernels import perceiver as pc
    grids = {}

    class Capture:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            grids[self.name] = grid
            return lambda *args, **kwargs: None

    monkeypatch.setattr(pc, "INTERPRET", True)  # meta tensors pass the kernels' device check
    monkeypatch.setattr(pc, "_perceiver_fwd_kernel", Capture("fwd"))
    monkeypatch.setattr(pc, "_perceiver_bwd_kernel", Capture("bwd"))
    B, H, L, V, D = 2 ** 13, 8, 64, 257, 64
    inputs = [torch.empty(B, H, S, D, device="meta", dtype=torch.bfloat16) for S in (L, V, V, L, L)]
    out, lse = pc.perceiver_fwd(*inputs, 0.125, block_m=block_m)
    pc.perceiver_bwd(torch.empty_like(out), *inputs, out, lse, 0.125, block_m=block_m, num_splits=num_splits)
    programs = {"fwd": B * H * (1 if block_m is None else L // block_m), "bwd": B * H * (num_splits or 1)}
    for name, grid in grids.items():
        assert all(n <= 65535 for n in grid[1:]) and grid[0] < 2 ** 31, (name, grid)
        assert math.prod(grid) == programs[name], (name, grid)
    assert set(grids) == {"fwd", "bwd"}


@cuda_only
@needs_triton
def test_cuda_more_heads_than_a_second_grid_axis_takes():
    """B*H = 65536 heads (one over the 65535 of a second grid axis), tiny otherwise."""
    inputs = make_inputs(2 ** 16, 1, 16, 1, 16, torch.float16)
    out, _, dout, grads = kernel_fwd_bwd(inputs, 0.25)
    check_by_rule(out, grads, inputs, dout, scale=0.25)


@needs_triton
def test_kernel_strided_views_and_output_layout():
    """q/k/v as views of (B, S, H*D) projections (k and v of one fused to_kv), as the resampler
    passes them: no copies needed, results equal the contiguous case; outputs in (B, S, H, D)."""
    from fastflamingo.kernels.perceiver import perceiver_bwd, perceiver_fwd
    B, H, L, V, D = 2, 2, 16, 63, 32
    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g).to(DEVICE)
    heads = lambda x: x.unflatten(-1, (H, D)).transpose(1, 2)  # (B, S, H*D) -> (B, H, S, D) view
    q = heads(rnd(B, L, H * D))
    k_media, v_media = map(heads, rnd(B, V, 2 * H * D).chunk(2, dim=-1))
    k_latents, v_latents = map(heads, rnd(B, L, 2 * H * D).chunk(2, dim=-1))
    inputs = (q, k_media, v_media, k_latents, v_latents)
    assert not any(x.is_contiguous() for x in inputs)
    scale = D ** -0.5
    out, lse = perceiver_fwd(*inputs, scale)
    assert out.transpose(1, 2).is_contiguous() and out.shape == (B, H, L, D)
    dout = heads(rnd(B, L, H * D))
    grads = perceiver_bwd(dout, *inputs, out, lse, scale)
    for x, gx in zip(inputs, grads):
        assert gx.shape == x.shape and gx.transpose(1, 2).is_contiguous()
    check_by_rule(out, grads, inputs, dout)

    contiguous = tuple(x.contiguous() for x in inputs)
    out_c, lse_c = perceiver_fwd(*contiguous, scale)
    grads_c = perceiver_bwd(dout.contiguous(), *contiguous, out_c, lse_c, scale)
    torch.testing.assert_close(out, out_c, atol=0, rtol=0)
    for gx, gc in zip(grads, grads_c):
        torch.testing.assert_close(gx, gc, atol=0, rtol=0)

    # a last dim that is not contiguous is copied, not misread
    q_t = q.contiguous().transpose(-1, -2).contiguous().transpose(-1, -2)
    assert q_t.stride(-1) != 1
    torch.testing.assert_close(perceiver_fwd(q_t, *inputs[1:], scale)[0], out, atol=0, rtol=0)


@needs_triton
def test_kernel_rejects_bad_inputs():
    from fastflamingo.kernels.perceiver import perceiver_fwd
    q, km, vm, kl, vl = make_inputs(1, 2, 16, 63, 32, torch.float32)
    with pytest.raises(ValueError, match=r"k_latents has shape \(1, 2, 8, 32\), expected \(1, 2, 16, 32\)"):
        perceiver_fwd(q, km, vm, kl[:, :, :8], vl, 1.0)
    with pytest.raises(ValueError, match="v_media"):
        perceiver_fwd(q, km, vm[:, :, :5], kl, vl, 1.0)
    with pytest.raises(TypeError, match="float64"):
        perceiver_fwd(*(x.double() for x in (q, km, vm, kl, vl)), 1.0)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_public_op_triton_backend_autograd(dtype):
    """perceiver_attention(backend="triton"): the custom op and its registered autograd."""
    inputs = [x.requires_grad_() for x in make_inputs(2, 2, 16, 63, 64, dtype)]
    out = perceiver_attention(*inputs, backend="triton", scale=0.2)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, dout)
    check_by_rule(out, grads, inputs, dout, scale=0.2)


@needs_triton
def test_public_op_triton_backend_double_backward_is_a_clear_error():
    from test_image_causal_kernel import check_double_backward_is_refused
    check_double_backward_is_refused(lambda *x: perceiver_attention(*x, backend="triton"),
                                     make_inputs(2, 2, 8, 17, 16, torch.float32), "perceiver_attention")


@cuda_only
@needs_triton
@pytest.mark.parametrize("images", [8, 64])
def test_cuda_bf16_resampler_shape(images):
    """bf16 tensor-core dots on the GPU at the resampler's shape (8 heads x 64, 64 latents, 257
    tokens), through the auto backend; 8 images also takes the split backward."""
    inputs = [x.requires_grad_() for x in make_inputs(images, 8, 64, 257, 64, torch.bfloat16, device="cuda")]
    out = perceiver_attention(*inputs)
    assert out.transpose(1, 2).is_contiguous()  # the Triton path's layout: auto chose Triton
    dout = torch.randn_like(out)
    check_by_rule(out, torch.autograd.grad(out, inputs, dout), inputs, dout)


def test_torch_backend_matches_reference():
    inputs = [x.requires_grad_() for x in make_inputs(2, 3, 16, 63, 24, torch.float32, device="cpu")]
    out = perceiver_attention(*inputs, backend="torch")
    dout = torch.randn_like(out)
    check_by_rule(out, torch.autograd.grad(out, inputs, dout), inputs, dout)


def _forbid_triton(monkeypatch):
    """Any call of the Triton forward (through the custom op or the eager path) fails."""
    from fastflamingo.kernels import perceiver as kernels

    def no_triton(*args, **kwargs):
        raise AssertionError("the Triton op was called")
    monkeypatch.setattr(kernels, "perceiver_fwd", no_triton)


def test_dispatch_torch_paths(monkeypatch):
    inputs = make_inputs(1, 2, 8, 17, 16, torch.float32, device="cpu")
    _forbid_triton(monkeypatch)
    ref = perceiver_attention_reference(*inputs)
    # auto on CPU tensors is not Triton, whatever TRITON_INTERPRET says (the native kernel or PyTorch)
    torch.testing.assert_close(perceiver_attention(*inputs), ref)
    torch.testing.assert_close(perceiver_attention(*inputs, backend="torch"), ref)
    with pytest.raises(ValueError, match="backend='bogus'"):
        perceiver_op.perceiver_attention_op(*inputs, backend="bogus")
    monkeypatch.setattr(dispatch, "HAS_TRITON", False)
    with pytest.raises(RuntimeError, match="backend='triton' needs the triton package"):
        perceiver_attention(*inputs, backend="triton")


@needs_triton
def test_dispatch_triton_errors(monkeypatch):
    from fastflamingo.kernels import perceiver as kernels
    inputs = make_inputs(1, 2, 8, 17, 16, torch.float32, device="cpu")
    _forbid_triton(monkeypatch)
    monkeypatch.setattr(kernels, "INTERPRET", True)
    with pytest.raises(AssertionError, match="the Triton op was called"):
        perceiver_attention(*inputs, backend="triton")
    with pytest.raises(TypeError, match="float64"):
        perceiver_attention(*(x.double() for x in inputs), backend="triton")
    with pytest.raises(ValueError, match="head_dim <= 256, got 272"):
        perceiver_attention(*make_inputs(1, 1, 4, 4, 272, torch.float32, device="cpu"), backend="triton")
    monkeypatch.setattr(kernels, "INTERPRET", False)
    with pytest.raises(ValueError, match="backend='triton' got tensors on cpu"):
        perceiver_attention(*inputs, backend="triton")


def _compiled_loss(backend):
    def loss(q, k_media, v_media, k_latents, v_latents):
        out = perceiver_attention(q, k_media, v_media, k_latents, v_latents, backend=backend)
        return (out.float() ** 2).sum()
    return loss


def _check_compiled(backend, compile_backend, dtype):
    torch._dynamo.reset()
    inputs = make_inputs(2, 2, 16, 63, 32, dtype, device=DEVICE if backend == "triton" else "cpu")
    eager = [x.detach().clone().requires_grad_() for x in inputs]
    compiled = [x.detach().clone().requires_grad_() for x in inputs]
    loss_eager = _compiled_loss(backend)(*eager)
    loss_eager.backward()
    fn = torch.compile(_compiled_loss(backend), fullgraph=True, backend=compile_backend)  # fails on a graph break
    loss_compiled = fn(*compiled)
    loss_compiled.backward()
    torch.testing.assert_close(loss_compiled, loss_eager)
    for name, a, b in zip(NAMES, compiled, eager):
        torch.testing.assert_close(a.grad, b.grad, msg=lambda m: f"d{name}: {m}")


def test_torch_compile_fullgraph_torch_backend():
    _check_compiled("torch", "inductor", torch.float32)


@needs_triton
def test_torch_compile_fullgraph_triton_op():
    """The custom op traces as one node (fake functions, registered autograd); on the CPU the
    compiled graph calls the interpreted kernels (inductor cannot build them there: aot_eager)."""
    _check_compiled("triton", "inductor" if torch.cuda.is_available() else "aot_eager", torch.float32)


@needs_triton
def test_opcheck():
    """torch.library's own checks of the schema, fake functions and autograd registration."""
    inputs = make_inputs(1, 2, 8, 17, 16, torch.float32)
    scale = 0.25
    fwd = torch.ops.fastflamingo.perceiver_attention_fwd.default
    torch.library.opcheck(fwd, (*[x.clone().requires_grad_() for x in inputs], scale))
    out, lse = fwd(*inputs, scale)
    torch.library.opcheck(torch.ops.fastflamingo.perceiver_attention_bwd.default,
                          (torch.randn_like(out), *inputs, out, lse, scale))


@pytest.mark.parametrize("layer", ["open_flamingo", "idefics", "idefics-qk-norms"])
def test_resampler_attention_layers_equal_across_backends(layer):
    """The layers' PyTorch path projects [media ; latents] once and runs one SDPA, the native
    path runs its kernel on the media and latent parts of that projection (views), Triton (in its
    interpreter here) projects the parts apart: same outputs and parameter gradients."""
    from fastflamingo import ops
    from fastflamingo.blocks import IdeficsPerceiverAttention, PerceiverAttention
    torch.manual_seed(0)
    if layer == "open_flamingo":
        module = PerceiverAttention(dim=32, dim_head=16, heads=3)
    else:
        module = IdeficsPerceiverAttention(dim=32, dim_head=16, heads=3, qk_layer_norms=layer.endswith("norms"))
    for p in module.parameters():  # LayerNorms away from the identity
        torch.nn.init.normal_(p, std=0.3)
    x, latents = torch.randn(2, 17, 32), torch.randn(2, 8, 32)
    from fastflamingo import native
    backends = (["torch", "reference"] + (["triton"] if dispatch.HAS_TRITON and _interpreted() else [])
                + (["native"] if native.available() else []))
    # without a GPU, conftest sets TRITON_INTERPRET=1: the kernels run on these CPU tensors
    assert "triton" in backends or torch.cuda.is_available() or not dispatch.HAS_TRITON
    results = {}
    for backend in backends:
        module.backend = backend
        out = module(x, latents)
        results[backend] = (out, torch.autograd.grad(out.square().sum(), list(module.parameters())))
    # "auto" on the CPU: the native kernel where it is built (the tests build it), else PyTorch
    assert ops.perceiver_backend(torch.empty(2, 3, 8, 16)) == ("native" if native.available() else "torch")
    for backend in backends[1:]:
        torch.testing.assert_close(results[backend][0], results["torch"][0], atol=1e-5, rtol=1e-5)
        for a, b in zip(results[backend][1], results["torch"][1]):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def _interpreted() -> bool:
    from fastflamingo.kernels import perceiver as kernels
    return kernels.INTERPRET



@needs_triton
def test_calls_without_gradient_skip_autograd_and_give_the_same_output(monkeypatch):
    from test_image_causal_kernel import check_inference_skips_autograd
    inputs = [x.requires_grad_() for x in make_inputs(2, 2, 16, 63, 32, torch.float32)]
    check_inference_skips_autograd(monkeypatch, perceiver_op._EagerPerceiver,
                                   lambda: perceiver_attention(*inputs, backend="triton"))
