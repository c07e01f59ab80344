"""The fused image-causal cross-attention (issue 3): Triton forward and backward, the custom op,
the PyTorch backend and torch.compile.

Every fast result is held to the flash-attention rule (fastflamingo.testing.assert_close_by_rule):
at most 2x (outputs) or 3x (gradients) further from a high-precision reference than the same
reference computed in the input dtype. For fp16 / bf16 the high reference is the fp32 one
(``upcast``); for fp32 inputs it is fp64, with the fp32 reference as the low one.

Without a GPU, Triton runs in its interpreter (tests/conftest.py sets TRITON_INTERPRET=1) at
about 0.1-1 s per call: shapes stay small. On a GPU the same tests run the compiled kernels.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastflamingo.ops as ops
from fastflamingo.ops import dispatch
from fastflamingo.ops.reference import (image_causal_attention_reference, image_causal_mask,
                                        text_time_from_media_locations)
from fastflamingo.testing import assert_close_by_rule

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
MODES = pytest.mark.parametrize("only_immediate", [True, False], ids=["immediate", "all_previous"])
# each case runs fp32 on contiguous tensors and fp16 on views of a projection, as a model makes them
DTYPE_LAYOUTS = pytest.mark.parametrize("dtype,projection", [(torch.float32, False), (torch.float16, True)],
                                        ids=["fp32", "fp16_projection_views"])
SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ----------------------------------------------------------------------------- inputs

def make_qkv(B, H, T, D, N, L, dtype, *, projection=False, seed=0, device=DEVICE):
    """q (B, H, T, D), k, v (B, H, N·L, D) as leaves that require grad.

    ``projection``: q is a transposed view of a (B, T, H·D) projection and k, v are views of the
    two halves of a fused (B, N·L, 2·H·D) key-value projection — non-contiguous, as in a model.
    """
    g = torch.Generator().manual_seed(seed)
    if projection:
        x = torch.randn(B, T, H * D, generator=g).to(device, dtype)
        kv = torch.randn(B, N * L, 2 * H * D, generator=g).to(device, dtype)
        q = x.view(B, T, H, D).transpose(1, 2)
        k, v = (half.view(B, N * L, H, D).transpose(1, 2) for half in kv.chunk(2, dim=-1))
    else:
        q = torch.randn(B, H, T, D, generator=g).to(device, dtype)
        k = torch.randn(B, H, N * L, D, generator=g).to(device, dtype)
        v = torch.randn(B, H, N * L, D, generator=g).to(device, dtype)
    # detach keeps the strides: leaves with the views' layout
    return tuple(t.detach().requires_grad_() for t in (q, k, v))


def text_time_from_rows(T, image_positions):
    """(B, T) int32 text_time from each row's list of <image> token positions."""
    media = torch.zeros(len(image_positions), T, dtype=torch.bool)
    for b, positions in enumerate(image_positions):
        media[b, list(positions)] = True
    return text_time_from_media_locations(media).to(DEVICE)


def idefics_text_time(T, image_positions, eos_positions):
    """text_time with IDEFICS's reset: 0 after an EOS token until the next <image> token."""
    rows = []
    for images, eos in zip(image_positions, eos_positions):
        count, off, row = 0, False, []
        for t in range(T):
            if t in images:
                count, off = count + 1, False
            elif t in eos:
                off = True
            row.append(0 if off else count)
        rows.append(row)
    return torch.tensor(rows, dtype=torch.int32, device=DEVICE)


# ----------------------------------------------------------------------------- checking

def forward_backward(fn, q, k, v, dout):
    """fn(q, k, v) and the gradients of <fn(q, k, v), dout> w.r.t. fresh leaves of q, k, v."""
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, dout)
    return out.detach(), grads


def fp32_floor(*factors):
    """The rounding floor of an fp32 result: 4 ulps of the product of the magnitudes it is built
    from, not of the result itself. Gradients can cancel to ~0 while their terms do not: with one
    visible key the softmax backward's dO·vᵀ - rowsum(dO·O) is exactly 0, but any fp32 order of
    summation leaves a few ulps of |dO|·|v|, times |q| or |k|."""
    magnitude = 1.0
    for t in factors:
        magnitude *= max(1.0, t.detach().abs().max().item() if t.numel() else 0.0)
    return 4 * torch.finfo(torch.float32).eps * magnitude


def check_against_references(backend, q, k, v, text_time, L, only_immediate, *, scale=None, seed=1):
    """Forward + backward of ``backend`` vs the references by the rule (2x for the output, 3x
    for the gradients), plus the exact zeros: output and dq of tokens without an image, dk and
    dv of keys no token may see. fp32 results get the floor of :func:`fp32_floor`. ``scale``:
    the softmax scale given to both (None: their default, D ** -0.5)."""
    dtype = q.dtype
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(seed)).to(q.device, dtype)

    def fast(q_, k_, v_):
        return ops.image_causal_attention(q_, k_, v_, text_time=text_time, latents_per_media=L,
                                          only_immediate=only_immediate, scale=scale, backend=backend)

    def reference(q_, k_, v_):
        return image_causal_attention_reference(q_, k_, v_, text_time, latents_per_media=L,
                                                only_immediate=only_immediate, scale=scale)

    high = torch.float64 if dtype == torch.float32 else torch.float32
    out, grads = forward_backward(fast, q, k, v, dout)
    ref_out, ref_grads = forward_backward(reference, *(t.to(high) for t in (q, k, v)), dout.to(high))
    low_out, low_grads = forward_backward(reference, q, k, v, dout)

    fp32 = dtype == torch.float32
    assert out.shape == q.shape and out.dtype == dtype
    assert_close_by_rule(out, ref_out, low_out, factor=2.0, name="out", floor=fp32_floor(v) if fp32 else None)
    largest = max((q, k, v), key=lambda t: t.detach().abs().max().item() if t.numel() else 0.0)
    grad_floor = fp32_floor(dout, largest, largest) if fp32 else None
    for name, g, ref_g, low_g, x in zip(("dq", "dk", "dv"), grads, ref_grads, low_grads, (q, k, v)):
        assert g.shape == x.shape and g.dtype == dtype
        assert_close_by_rule(g, ref_g, low_g, factor=3.0, name=name, floor=grad_floor)

    no_image = (text_time == 0)[:, None, :, None].expand(q.shape)
    assert (out[no_image] == 0).all(), "tokens without an image must get an output of exactly 0"
    assert (grads[0][no_image] == 0).all(), "tokens without an image must get dq exactly 0"
    num_media = k.shape[2] // L
    seen = image_causal_mask(text_time, num_media, L, only_immediate).any(dim=1)  # (B, N·L)
    unseen = (~seen)[:, None, :, None].expand(k.shape)
    assert (grads[1][unseen] == 0).all() and (grads[2][unseen] == 0).all(), \
        "keys of images no token may see must get dk = dv = 0 exactly"


def check_double_backward_is_refused(call, inputs, op):
    """Gradients through ``call(*inputs)`` taken with create_graph=True are the plain ones, and
    differentiating them again (a gradient penalty on dq) raises, naming the backend that can,
    rather than silently dropping the kernels' second-order terms; also for a loss linear in the
    output, whose constant dout does not require grad."""
    leaves = [t.detach().requires_grad_() for t in inputs]
    for loss in (torch.square, lambda out: out):
        plain = torch.autograd.grad(loss(call(*leaves)).sum(), leaves)
        out = call(*leaves)
        grads = torch.autograd.grad(loss(out).sum(), leaves, create_graph=True)
        for g, p in zip(grads, plain):
            torch.testing.assert_close(g.detach(), p, rtol=0, atol=0)
        with pytest.raises(RuntimeError, match=f'{op}: .* cannot be differentiated again .*backend="reference"'):
            (grads[0].square().sum() + out.sum()).backward()


# ----------------------------------------------------------------------------- edge cases

# name -> (H, D, N, L, T, text_time builder)
EDGE_CASES = {
    "tokens_before_first_image": (2, 32, 2, 16, 20, lambda T: text_time_from_rows(T, [[6, 13]])),
    "image_at_last_token": (1, 40, 2, 7, 17, lambda T: text_time_from_rows(T, [[3, 16], [16]])),
    "consecutive_images": (2, 24, 3, 16, 19, lambda T: text_time_from_rows(T, [[4, 5, 6]])),
    "rows_with_different_counts_and_a_row_without_image":
        (1, 64, 3, 7, 21, lambda T: text_time_from_rows(T, [[0], [2, 9, 15], []])),
    "idefics_eos_resets": (2, 32, 3, 16, 16, lambda T: idefics_text_time(
        T, [[1, 5, 9], [0]], [[3, 4, 11], [6]])),
    # image 2 of row 0 is skipped (text_time jumps 1 -> 3) and image 4 never comes: in immediate
    # mode neither is seen; in all-previous mode image 2 is
    "unseen_images": (1, 16, 4, 5, 12, lambda T: torch.tensor(
        [[0, 1, 1, 1, 3, 3, 3, 3, 3, 3, 3, 3], [1] * 12], dtype=torch.int32, device=DEVICE)),
    "decoding_T1": (2, 64, 2, 16, 1, lambda T: torch.tensor([[2], [0], [1]], dtype=torch.int32, device=DEVICE)),
    "one_latent_per_image": (1, 16, 5, 1, 9, lambda T: text_time_from_rows(T, [[0, 3, 4, 8]])),
    "head_dim_96_odd_L": (1, 96, 4, 5, 23, lambda T: text_time_from_rows(T, [[2, 7, 8, 20]])),
    # two key blocks per image (L > BLOCK_N)
    "image_larger_than_a_key_block": (1, 16, 2, 80, 14, lambda T: text_time_from_rows(T, [[1, 9]])),
    # several query tiles, dK/dV programs looping over several of them
    "several_query_tiles": (1, 16, 5, 16, 150, lambda T: idefics_text_time(
        T, [[0, 40, 41, 100, 149], [70]], [[60, 120], []])),
}


@pytest.mark.parametrize("case", list(EDGE_CASES))
@MODES
@DTYPE_LAYOUTS
def test_triton_edge_cases(case, only_immediate, dtype, projection):
    H, D, N, L, T, build = EDGE_CASES[case]
    text_time = build(T)
    q, k, v = make_qkv(text_time.shape[0], H, T, D, N, L, dtype, projection=projection)
    check_against_references("triton", q, k, v, text_time, L, only_immediate)


@pytest.mark.parametrize("scale", [0.37, 0.0, -2.0])
@MODES
def test_triton_non_default_scale(scale, only_immediate):
    """The kernels use the scale given, not D ** -0.5 (0.25 here): forward and backward; 0 gives
    uniform attention over the visible keys, a negative scale reverses the scores' order."""
    H, D, N, L, T, build = EDGE_CASES["idefics_eos_resets"]
    text_time = build(T)
    q, k, v = make_qkv(text_time.shape[0], H, T, 16, N, L, torch.float32)
    check_against_references("triton", q, k, v, text_time, L, only_immediate, scale=scale)


@st.composite
def layouts(draw):
    """A random batch: shapes, and per row random image tokens with optional EOS resets."""
    B, H = draw(st.integers(1, 3)), draw(st.integers(1, 2))
    T, N = draw(st.integers(1, 40)), draw(st.integers(1, 4))
    L = draw(st.sampled_from([1, 3, 5, 7, 16, 20]))
    D = draw(st.sampled_from([8, 16, 24, 40, 64]))
    images, eos = [], []
    for _ in range(B):
        n = draw(st.integers(0, min(N, T)))
        images.append(set(draw(st.lists(st.integers(0, T - 1), min_size=n, max_size=n, unique=True))))
        eos.append(set(draw(st.lists(st.integers(0, T - 1), max_size=3))))
    return B, H, T, D, N, L, idefics_text_time(T, images, eos)


@SETTINGS
@given(layout=layouts(), only_immediate=st.booleans(), dtype=st.sampled_from([torch.float32, torch.float16]),
       projection=st.booleans())
def test_triton_random_layouts(layout, only_immediate, dtype, projection):
    B, H, T, D, N, L, text_time = layout
    q, k, v = make_qkv(B, H, T, D, N, L, dtype, projection=projection)
    check_against_references("triton", q, k, v, text_time, L, only_immediate)


@MODES
def test_triton_bf16(only_immediate):
    """bf16 is checked wherever the tests run: in the interpreter this is the path whose tiles
    are upcast to fp32 at load (bf16 dots there are silently wrong), on a GPU the tensor cores."""
    text_time = idefics_text_time(24, [[0, 9, 10], [5]], [[7], []])
    q, k, v = make_qkv(2, 2, 24, 40, 3, 7, torch.bfloat16, projection=True)
    check_against_references("triton", q, k, v, text_time, 7, only_immediate)


def test_output_laid_out_like_projection_queries():
    """q as a transposed view of a (B, T, H·D) projection: out and dq come back in q's layout,
    so merging the heads again (transpose + reshape) is free."""
    text_time = text_time_from_rows(10, [[2, 6]])
    q, k, v = (t.detach() for t in make_qkv(1, 2, 10, 16, 2, 4, torch.float32, projection=True))
    out, lse = torch.ops.fastflamingo.image_causal_attention(q, k, v, text_time, 4, True, 0.25)
    assert out.stride() == q.stride()
    assert out.transpose(1, 2).reshape(1, 10, 32).data_ptr() == out.data_ptr()
    dq, dk, dv = torch.ops.fastflamingo.image_causal_attention_backward(
        torch.ones_like(out), q, k, v, out, lse, text_time, 4, True, 0.25)
    assert dq.stride() == q.stride()


def test_triton_double_backward_is_a_clear_error():
    """Through the eager autograd Function and through the custom op called directly."""
    text_time = text_time_from_rows(7, [[1, 4]])
    qkv = make_qkv(1, 2, 7, 16, 2, 3, torch.float32)
    check_double_backward_is_refused(
        lambda q, k, v: ops.image_causal_attention(q, k, v, text_time=text_time, latents_per_media=3,
                                                   backend="triton"), qkv, "image_causal_attention")
    check_double_backward_is_refused(
        lambda q, k, v: torch.ops.fastflamingo.image_causal_attention(q, k, v, text_time, 3, True, 0.3)[0],
        qkv, "image_causal_attention")


def test_triton_from_media_locations():
    """The public entry point with media_locations (its own cumsum) reaches the kernel."""
    media = torch.zeros(2, 11, dtype=torch.bool, device=DEVICE)
    media[0, [1, 4]] = True
    media[1, 10] = True
    q, k, v = make_qkv(2, 1, 11, 16, 2, 3, torch.float32)
    out = ops.image_causal_attention(q, k, v, media, latents_per_media=3, backend="triton")
    ref = image_causal_attention_reference(q, k, v, text_time_from_media_locations(media),
                                           latents_per_media=3)
    torch.testing.assert_close(out, ref)


# ----------------------------------------------------------------------------- custom op

@pytest.mark.parametrize("layout", ["projection_views", "strided_head_dim"])
def test_opcheck(layout):
    """torch.library's own checks of the schema, fake (meta) kernels — shapes and strides — and
    autograd registration; "strided_head_dim": q, k, v whose last dim is not unit-stride."""
    text_time = idefics_text_time(9, [[1, 5]], [[3]])
    q, k, v = make_qkv(1, 2, 9, 16, 2, 3, torch.float32, projection=True)
    if layout == "strided_head_dim":
        q, k, v = (t.detach().transpose(-1, -2).contiguous().transpose(-1, -2).requires_grad_() for t in (q, k, v))
        assert q.stride(-1) != 1
    torch.library.opcheck(torch.ops.fastflamingo.image_causal_attention.default,
                          (q, k, v, text_time, 3, True, 0.25))
    q, k, v = (t.detach() for t in (q, k, v))
    out, lse = torch.ops.fastflamingo.image_causal_attention(q, k, v, text_time, 3, True, 0.25)
    assert lse.shape == (1, 2, 9) and lse.dtype == torch.float32
    assert torch.isneginf(lse[0, :, 0]).all(), "a token that sees no key has log-sum-exp -inf"
    torch.library.opcheck(torch.ops.fastflamingo.image_causal_attention_backward.default,
                          (torch.randn_like(out), q, k, v, out, lse, text_time, 3, True, 0.25))


class TinyCrossAttention(torch.nn.Module):
    """Flamingo's masked cross-attention shape: project, split heads, attend, merge, project."""

    def __init__(self, dim=32, heads=2, dim_head=16, latents=4, backend="torch"):
        super().__init__()
        self.heads, self.dim_head, self.latents, self.backend = heads, dim_head, latents, backend
        self.to_q = torch.nn.Linear(dim, heads * dim_head, bias=False)
        self.to_kv = torch.nn.Linear(dim, 2 * heads * dim_head, bias=False)
        self.to_out = torch.nn.Linear(heads * dim_head, dim, bias=False)

    def forward(self, x, media, media_locations):
        B, T, _ = x.shape
        H, D = self.heads, self.dim_head
        q = self.to_q(x).view(B, T, H, D).transpose(1, 2)
        k, v = (t.view(B, -1, H, D).transpose(1, 2) for t in self.to_kv(media).chunk(2, dim=-1))
        # validate=False, as the model passes (it checks text_time once per forward, outside the graph)
        out = ops.image_causal_attention(q, k, v, media_locations, latents_per_media=self.latents,
                                         backend=self.backend, validate=False)
        return self.to_out(out.transpose(1, 2).reshape(B, T, H * D))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_torch_compile_fullgraph(backend):
    """torch.compile(fullgraph=True) — an error on any graph break — gives eager's output and
    gradients. The Triton op is opaque to the compiler (fake + autograd registrations)."""
    torch.manual_seed(0)
    layer = TinyCrossAttention(backend=backend).to(DEVICE)
    x = torch.randn(2, 12, 32, device=DEVICE, requires_grad=True)
    media = torch.randn(2, 3 * 4, 32, device=DEVICE)
    media_locations = torch.zeros(2, 12, dtype=torch.bool, device=DEVICE)
    media_locations[0, [2, 5, 9]] = True
    media_locations[1, 0] = True

    def run(fn):
        x.grad = None
        layer.zero_grad()
        y = fn(x, media, media_locations)
        y.square().sum().backward()
        return y.detach(), x.grad.clone(), layer.to_kv.weight.grad.clone()

    torch._dynamo.reset()
    compiled = run(torch.compile(layer, fullgraph=True))
    eager = run(layer)
    for c, e in zip(compiled, eager):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- PyTorch backend

@SETTINGS
@given(layout=layouts(), only_immediate=st.booleans())
def test_torch_backend_matches_reference(layout, only_immediate):
    """The PyTorch backend (the CPU default), forward and gradients, fp32 vs fp64 by the rule."""
    B, H, T, D, N, L, text_time = layout
    q, k, v = make_qkv(B, H, T, D, N, L, torch.float32)
    check_against_references("torch", q, k, v, text_time, L, only_immediate)


# ----------------------------------------------------------------------------- errors

def test_triton_backend_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    from fastflamingo.kernels import image_causal
    monkeypatch.setattr(image_causal, "INTERPRET", False)
    q, k, v = (torch.randn(1, 1, 4, 16) for _ in range(3))
    text_time = torch.ones(1, 4, dtype=torch.int32)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        ops.image_causal_attention(q, k, v, text_time=text_time, latents_per_media=4, backend="triton")
    # auto on CPU tensors is the PyTorch path, which needs no Triton
    ops.image_causal_attention(q, k, v, text_time=text_time, latents_per_media=4, backend="auto")


def test_triton_backend_without_triton_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(dispatch, "HAS_TRITON", False)
    q, k, v = (torch.randn(1, 1, 4, 16, device=DEVICE) for _ in range(3))
    with pytest.raises(RuntimeError, match="needs the triton package"):
        ops.image_causal_attention(q, k, v, text_time=torch.ones(1, 4, dtype=torch.int32, device=DEVICE),
                                   latents_per_media=4, backend="triton")


def test_triton_backend_rejects_dtypes_and_head_sizes_it_cannot_take():
    text_time = torch.ones(1, 4, dtype=torch.int32, device=DEVICE)
    q = torch.randn(1, 1, 4, 16, dtype=torch.float64, device=DEVICE)
    with pytest.raises(TypeError, match="float64"):
        ops.image_causal_attention(q, q, q, text_time=text_time, latents_per_media=4, backend="triton")
    q = torch.randn(1, 1, 4, 320, device=DEVICE)
    with pytest.raises(ValueError, match="head_dim <= 256, got 320"):
        ops.image_causal_attention(q, q, q, text_time=text_time, latents_per_media=4, backend="triton")
    # the dispatch's limits (kept apart from the kernels so that the dispatch needs no triton) are the kernels'
    from fastflamingo.kernels import image_causal
    assert dispatch.TRITON_DTYPES == image_causal.DTYPES
    assert dispatch.TRITON_MAX_HEAD_DIM == image_causal.MAX_HEAD_DIM


def test_kernel_rejects_bad_text_time():
    from fastflamingo.kernels.image_causal import image_causal_fwd
    q, k, v = (torch.randn(1, 1, 4, 16, device=DEVICE) for _ in range(3))
    with pytest.raises(TypeError, match="int32"):
        image_causal_fwd(q, k, v, torch.ones(1, 4, dtype=torch.int64, device=DEVICE), 4, True, 0.25)
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        image_causal_fwd(q, k, v, torch.ones(1, 5, dtype=torch.int32, device=DEVICE), 4, True, 0.25)


def test_kernel_and_registered_op_reject_keys_and_values_that_do_not_fit_q():
    """The registered op (a documented entry point) and the launchers check k and v against q as
    the public function does, naming the tensor: they would otherwise read past a short k or v."""
    from fastflamingo.kernels.image_causal import image_causal_bwd, image_causal_fwd
    q, k, v = (t.detach() for t in make_qkv(1, 1, 4, 16, 2, 3, torch.float32))
    tt = torch.ones(1, 4, dtype=torch.int32, device=DEVICE)
    bad = {
        "k head_dim": ((q, k[..., :8], v, tt, 3), ValueError, r"k shape \(1, 1, 6, 8\) does not match q"),
        "k heads": ((q, k.expand(1, 2, 6, 16), v, tt, 3), ValueError, r"k shape \(1, 2, 6, 16\) does not match q"),
        "v batch": ((q, k, v.expand(2, 1, 6, 16), tt, 3), ValueError, r"v shape \(2, 1, 6, 16\) does not match q"),
        "k dtype": ((q, k.half(), v, tt, 3), TypeError, "k has dtype torch.float16 but q has torch.float32"),
        "v shorter than k": ((q, k, v[:, :, :3], tt, 3), ValueError, r"k \(1, 1, 6, 16\) and v \(1, 1, 3, 16\) differ"),
        "part of an image": ((q, k[:, :, :5], v[:, :, :5], tt, 3), ValueError, "the 5 keys are not a whole number"),
        "no latents": ((q, k, v, tt, 0), ValueError, "the 6 keys are not a whole .* latents_per_media=0"),
    }
    for case, (args, error, match) in bad.items():
        for call in (image_causal_fwd, torch.ops.fastflamingo.image_causal_attention):
            with pytest.raises(error, match=f"image_causal: {match}"):
                call(*args, True, 0.25)
    out, lse = image_causal_fwd(q, k, v, tt, 3, True, 0.25)
    with pytest.raises(ValueError, match=r"image_causal: k \(1, 1, 6, 16\) and v \(1, 1, 3, 16\) differ"):
        image_causal_bwd(out, q, k, v[:, :, :3], out, lse, tt, 3, True, 0.25)
    for name, args in (("dout", (out[:, :, :2], q, k, v, out, lse)), ("out", (out, q, k, v, out.half(), lse)),
                       ("lse", (out, q, k, v, out, lse[..., :2]))):
        with pytest.raises(ValueError, match=f"image_causal: {name} is"):
            image_causal_bwd(*args, tt, 3, True, 0.25)


# ----------------------------------------------------------------------------- launch configs

@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "bwd"])
@MODES
def test_autotune_candidates(backward, only_immediate, monkeypatch):
    """At the benchmark's big shape on an H100 (132 SMs) the autotuner is offered several
    configs, the heuristic's first, each one exactly once and each an actual config of the
    kernel's autotuner (its pruning returns exactly them). ``FASTFLAMINGO_AUTOTUNE=0`` and small
    launches leave the heuristic's alone. (That every candidate compiles for sm_90 without
    spills: ``tests/test_sm90_compile.py``.)"""
    from fastflamingo.kernels import common, image_causal as ic
    monkeypatch.setattr(common, "INTERPRET", False)  # as on a GPU (autotune_enabled reads it)
    monkeypatch.setattr(ic, "INTERPRET", False)
    monkeypatch.setattr(ic, "num_sms", lambda device: 132)
    monkeypatch.delenv("FASTFLAMINGO_AUTOTUNE", raising=False)
    kernel = ic._bwd_kernel if backward else ic._fwd_kernel

    def configs(B, T, D, dtype):
        q = torch.empty(B, 8, T, D, device="meta", dtype=dtype)
        return q, ic._launch_configs(q, 64, only_immediate, backward=backward)

    for D, dtype in [(64, torch.bfloat16), (128, torch.float16), (64, torch.float32)]:
        q, candidates = configs(8, 2048, D, dtype)
        block_m, _, _, num_warps = ic._block_sizes(q, 64, only_immediate, max_block_m=64 if backward else 128)
        assert candidates[0] == (block_m, num_warps, 2), "the heuristic's config must compete"
        assert len(candidates) > 1 and len(set(candidates)) == len(candidates), candidates
        meta = dict(IMMEDIATE=only_immediate, BLOCK_D=ic.padded_head_dim(D), **ic.dtype_options(dtype))
        pruned = kernel.early_config_prune(kernel.configs, {"Q": q, "L": 64}, **meta)
        assert [(c.kwargs["BLOCK_M"], c.num_warps, c.num_stages) for c in pruned] == candidates
    _, candidates = configs(8, 2048, 64, torch.bfloat16)
    assert (64 if backward else 128, 4, 2) in candidates
    assert len(configs(1, 1, 64, torch.bfloat16)[1]) == 1, "decoding: no timing runs"
    monkeypatch.setenv("FASTFLAMINGO_AUTOTUNE", "0")
    assert configs(8, 2048, 64, torch.bfloat16)[1] == [candidates[0]]


@MODES
def test_every_tile_height_the_autotuner_may_pick(only_immediate, monkeypatch):
    """Each query-tile height (BLOCK_M) of the autotune table, forced for the forward and the
    backward, gives correct results: in the interpreter (which ignores warps and stages) here,
    every full config on a GPU (test_cuda_every_autotune_candidate)."""
    from fastflamingo.kernels import image_causal as ic
    heights = {backward: sorted({m for (bwd, fp32, _), table in ic._TUNE_TABLE.items() if bwd == backward
                                 for m, _, _ in table}) for backward in (False, True)}
    assert heights[False][-1] == 128 and heights[True][-1] == 128
    text_time = idefics_text_time(150, [[0, 40, 41, 100, 149], [70]], [[60, 120], []])
    q, k, v = make_qkv(2, 1, 150, 16, 5, 16, torch.float16, projection=True)
    for i in range(max(map(len, heights.values()))):
        forced = {b: (h[i % len(h)], 4, 1) for b, h in heights.items()}
        monkeypatch.setattr(ic, "_launch_configs", lambda *args, backward, forced=forced, **kw: [forced[backward]])
        check_against_references("triton", q, k, v, text_time, 16, only_immediate)


# ----------------------------------------------------------------------------- GPU only

@needs_cuda
@MODES
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("D,L", [(64, 64), (128, 32), (96, 7), (40, 16)])
def test_cuda_model_shapes(D, L, dtype, only_immediate):
    """The shapes users run, on the GPU's tensor cores (bf16 is only correct there)."""
    T, N = 300, 5
    positions = [[0, 60, 61, 200, 299], [150], []]
    text_time = text_time_from_rows(T, positions)
    q, k, v = make_qkv(3, 4, T, D, N, L, dtype, projection=True)
    check_against_references("triton", q, k, v, text_time, L, only_immediate)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_cuda_decoding(dtype):
    """T = 1 per step, the last image of each row (a generation step)."""
    q, k, v = make_qkv(4, 8, 1, 64, 3, 64, dtype, projection=True)
    text_time = torch.tensor([[3], [1], [0], [2]], dtype=torch.int32, device=DEVICE)
    check_against_references("triton", q, k, v, text_time, 64, True)


@needs_cuda
def test_cuda_every_autotune_candidate(monkeypatch):
    """The autotuner's own pick, then each candidate config forced in turn: all are correct
    (a shape big enough to be autotuned; bf16 immediate mode, the benchmark's)."""
    from fastflamingo.kernels import image_causal as ic
    monkeypatch.delenv("FASTFLAMINGO_AUTOTUNE", raising=False)
    B, H, T, D, N, L = 4, 8, 2048, 64, 16, 64
    g = torch.Generator().manual_seed(0)
    text_time = text_time_from_rows(T, [sorted(torch.randperm(T, generator=g)[:N].tolist()) for _ in range(B)])
    q, k, v = make_qkv(B, H, T, D, N, L, torch.bfloat16, projection=True)
    fwd = ic._launch_configs(q, L, True, backward=False)
    bwd = ic._launch_configs(q, L, True, backward=True)
    assert len(fwd) > 1 and len(bwd) > 1
    check_against_references("triton", q, k, v, text_time, L, True)
    assert (ic._fwd_kernel.best_config.kwargs["BLOCK_M"], ic._fwd_kernel.best_config.num_warps,
            ic._fwd_kernel.best_config.num_stages) in fwd
    for i in range(max(len(fwd), len(bwd))):
        forced = {False: fwd[i % len(fwd)], True: bwd[i % len(bwd)]}
        monkeypatch.setattr(ic, "_launch_configs", lambda *args, backward, forced=forced, **kw: [forced[backward]])
        check_against_references("triton", q, k, v, text_time, L, True)


def check_inference_skips_autograd(monkeypatch, function, call) -> None:
    """An eager ``call()`` that needs no gradient (torch.no_grad, inference_mode) runs its kernel
    without the autograd Function ``function`` around it: the output of the call that records
    one, bit for bit."""
    applied = []
    real = function.apply
    monkeypatch.setattr(function, "apply", lambda *a: applied.append(1) or real(*a))
    recorded = call()
    assert recorded.grad_fn is not None and applied == [1]
    for context in (torch.no_grad, torch.inference_mode):
        with context():
            out = call()
        assert out.grad_fn is None
        torch.testing.assert_close(out, recorded.detach(), rtol=0, atol=0)
    assert applied == [1], "a call without gradient went through the autograd Function"


def test_calls_without_gradient_skip_autograd_and_give_the_same_output(monkeypatch):
    from fastflamingo.ops import image_causal_op
    text_time = text_time_from_rows(40, [[3, 20], [0]]).to(DEVICE)
    q, k, v = make_qkv(2, 2, 40, 16, 2, 8, torch.float32)
    check_inference_skips_autograd(monkeypatch, image_causal_op._EagerImageCausal, lambda: ops.image_causal_attention(
        q, k, v, text_time=text_time, latents_per_media=8, backend="triton"))
