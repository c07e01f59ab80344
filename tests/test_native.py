"""The native CPU kernels (csrc/image_causal.cpp, csrc/perceiver.cpp, built by CMakeLists.txt):
forward and backward against the references by the flash-attention tolerance rule, on random
layouts and the edge cases of the Triton kernels' tests, fp32 / fp16 / bf16, contiguous and
projection views; the operators' registrations (opcheck), torch.compile without graph breaks,
the model through them, their dispatch and their errors.

tests/conftest.py builds and loads the extension before the session; a failed build fails
these tests with the build's error (they never skip).
"""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import conftest
import fastflamingo.ops as ops
from fastflamingo import native
from fastflamingo.ops.reference import image_causal_attention_reference
from test_image_causal_kernel import (EDGE_CASES, MODES, SETTINGS, TinyCrossAttention, check_against_references,
                                      check_double_backward_is_refused, idefics_text_time, layouts, make_qkv,
                                      text_time_from_rows)
from test_perceiver_kernel import _ALL_LD, _ALL_V, _BF16, _ODD, NAMES, check_by_rule, make_inputs

DTYPES = pytest.mark.parametrize("dtype,projection", [
    (torch.float32, False), (torch.float16, True), (torch.bfloat16, False), (torch.bfloat16, True)],
    ids=["fp32", "fp16_projection_views", "bf16", "bf16_projection_views"])


@pytest.fixture(autouse=True)
def built():
    assert conftest.NATIVE_BUILD_ERROR is None, f"the native extension did not build: {conftest.NATIVE_BUILD_ERROR}"
    assert native.available()


def cpu_qkv(*args, **kw):
    return make_qkv(*args, device="cpu", **kw)


@pytest.mark.parametrize("case", list(EDGE_CASES))
@MODES
@DTYPES
def test_native_edge_cases(case, only_immediate, dtype, projection):
    H, D, N, L, T, build = EDGE_CASES[case]
    text_time = build(T).cpu()
    q, k, v = cpu_qkv(text_time.shape[0], H, T, D, N, L, dtype, projection=projection)
    check_against_references("native", q, k, v, text_time, L, only_immediate)


@SETTINGS
@given(layout=layouts(), only_immediate=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), projection=st.booleans())
def test_native_random_layouts(layout, only_immediate, dtype, projection):
    B, H, T, D, N, L, text_time = layout
    q, k, v = cpu_qkv(B, H, T, D, N, L, dtype, projection=projection)
    check_against_references("native", q, k, v, text_time.cpu(), L, only_immediate)


@pytest.mark.parametrize("shape", [
    # (B, H, T, D, N, L): the model's head sizes and image sizes; more tokens than a block (64),
    # keys of an image in two blocks (L = 300 > 256), odd head sizes, many images
    (2, 2, 150, 64, 4, 64), (1, 3, 70, 96, 3, 32), (1, 1, 40, 128, 2, 128), (1, 2, 50, 33, 2, 300),
    (2, 1, 200, 24, 32, 16)], ids=lambda s: "B{}H{}T{}D{}N{}L{}".format(*s))
@MODES
def test_native_model_shapes(shape, only_immediate):
    B, H, T, D, N, L = shape
    g = torch.Generator().manual_seed(T)
    rows = [sorted(torch.randperm(T, generator=g)[:n].tolist()) for n in torch.randint(0, N + 1, (B,), generator=g)]
    text_time = text_time_from_rows(T, rows).cpu()
    q, k, v = cpu_qkv(B, H, T, D, N, L, torch.float32, seed=T)
    check_against_references("native", q, k, v, text_time, L, only_immediate)


def test_native_opcheck():
    """torch.library's checks of the C++ operators' schemas, fake functions (shapes, strides,
    dtypes) and autograd registration, on projection views."""
    text_time = idefics_text_time(9, [[1, 5]], [[3]]).cpu()
    q, k, v = cpu_qkv(1, 2, 9, 16, 2, 3, torch.float32, projection=True)
    fwd = torch.ops.fastflamingo_native.image_causal_attention.default
    bwd = torch.ops.fastflamingo_native.image_causal_attention_backward.default
    torch.library.opcheck(fwd, (q, k, v, text_time, 3, True, 0.25))
    q, k, v = (t.detach() for t in (q, k, v))
    out, lse = fwd(q, k, v, text_time, 3, True, 0.25)
    assert out.is_contiguous() and lse.shape == (1, 2, 9) and lse.dtype == torch.float32
    assert torch.isneginf(lse[0, :, 0]).all(), "a token that sees no key has log-sum-exp -inf"
    torch.library.opcheck(bwd, (torch.randn_like(out), q, k, v, out, lse, text_time, 3, True, 0.25))


def test_native_lse_matches_the_triton_contract():
    """lse is the natural log-sum-exp of the scaled scores over the keys a token sees."""
    text_time = text_time_from_rows(12, [[0, 5]]).cpu()
    q, k, v = (t.detach() for t in cpu_qkv(1, 2, 12, 8, 2, 4, torch.float32))
    _, lse = torch.ops.fastflamingo_native.image_causal_attention(q, k, v, text_time, 4, False, 0.3)
    keys = torch.arange(8)[None, :] < 4 * text_time[0, :, None]  # all-previous: images 1..m
    scores = (q[0] @ k[0].transpose(-1, -2) * 0.3).masked_fill(~keys, float("-inf"))
    torch.testing.assert_close(lse[0], scores.logsumexp(-1))


def check_compiled_like_eager(layer, x, rest, dtype):
    """``torch.compile(layer, fullgraph=True)`` (which fails on a graph break) gives eager's
    output, gradient of ``x`` and gradient of the layer's ``to_kv`` weight."""
    def run(fn):
        x.grad = None
        layer.zero_grad()
        y = fn(x, *rest)
        y.float().square().sum().backward()
        return y.detach(), x.grad.clone(), layer.to_kv.weight.grad.clone()

    torch._dynamo.reset()
    compiled = run(torch.compile(layer, fullgraph=True))
    eager = run(layer)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for c, e in zip(compiled, eager):
        torch.testing.assert_close(c, e, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_torch_compile_fullgraph(dtype):
    """torch.compile(fullgraph=True) of a cross-attention layer through the native operator:
    eager's output and gradients, no graph break."""
    torch.manual_seed(0)
    layer = TinyCrossAttention(backend="native").to(dtype)
    x = torch.randn(2, 12, 32, dtype=dtype, requires_grad=True)
    media = torch.randn(2, 3 * 4, 32, dtype=dtype)
    media_locations = torch.zeros(2, 12, dtype=torch.bool)
    media_locations[0, [2, 5, 9]] = True
    media_locations[1, 0] = True

    check_compiled_like_eager(layer, x, (media, media_locations), dtype)


def test_auto_runs_native_on_cpu_when_built(monkeypatch):
    """backend="auto" on CPU tensors takes the native kernel once it is loaded; the result is
    the torch path's."""
    calls = []
    real = ops.image_causal_op._native_ops

    def counted():
        calls.append(1)
        return real()

    monkeypatch.setattr(ops.image_causal_op, "_native_ops", counted)
    text_time = text_time_from_rows(10, [[2, 6]]).cpu()
    q, k, v = (t.detach() for t in cpu_qkv(1, 2, 10, 16, 2, 4, torch.float32))
    auto = ops.image_causal_attention(q, k, v, text_time=text_time, latents_per_media=4)
    assert calls, "auto did not run the native kernel"
    torch_path = ops.image_causal_attention(q, k, v, text_time=text_time, latents_per_media=4, backend="torch")
    torch.testing.assert_close(auto, torch_path)


def test_model_forward_and_backward_through_native():
    """A tiny Flamingo (gates opened), native cross-attention and resampler attention vs the
    PyTorch paths: same loss and gradients."""
    from fastflamingo import Flamingo
    from peers import tiny_lm
    from test_model import batch, config, set_gates
    model = Flamingo(config(), lang_encoder=tiny_lm("llama"))
    set_gates(model, 0.5)
    vx, ids = batch()
    results = {}
    for backend in ("native", "torch"):
        model.zero_grad()
        model.set_attention_backend(backend)
        assert {m.backend for m in model.modules() if hasattr(m, "backend")} == {backend}
        loss = model(vx, ids, labels=ids).loss
        loss.backward()
        results[backend] = (loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None])
    torch.testing.assert_close(results["native"][0], results["torch"][0], rtol=1e-5, atol=1e-6)
    for a, b in zip(results["native"][1], results["torch"][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_native_double_backward_is_a_clear_error():
    """backend "native", "auto" (native on the CPU) and the operators called directly (their
    registered autograd): a gradient penalty through them raises instead of losing its terms."""
    text_time = text_time_from_rows(7, [[1, 4]]).cpu()
    qkv = cpu_qkv(1, 2, 7, 16, 2, 3, torch.float32)
    for backend in ("native", "auto"):
        check_double_backward_is_refused(
            lambda q, k, v: ops.image_causal_attention(q, k, v, text_time=text_time, latents_per_media=3,
                                                       backend=backend), qkv, "image_causal_attention")
    check_double_backward_is_refused(
        lambda q, k, v: torch.ops.fastflamingo_native.image_causal_attention(q, k, v, text_time, 3, True, 0.3)[0],
        qkv, "image_causal_attention")
    inputs = make_inputs(2, 2, 8, 17, 16, torch.float32, device="cpu")
    check_double_backward_is_refused(lambda *x: ops.perceiver_attention(*x, backend="native"), inputs,
                                     "perceiver_attention")
    check_double_backward_is_refused(lambda *x: torch.ops.fastflamingo_native.perceiver_attention(*x, 0.3)[0],
                                     inputs, "perceiver_attention")


# ----------------------------------------------------------------------------- errors

def test_native_errors_name_the_value():
    q, k, v = (torch.randn(1, 1, 4, 16) for _ in range(3))
    op = torch.ops.fastflamingo_native.image_causal_attention
    with pytest.raises(RuntimeError, match=r"text_time\[0, 2\] = 5 refers to no image: there are N=1"):
        op(q, k, v, torch.tensor([[0, 1, 5, 1]], dtype=torch.int32), 4, True, 0.25)
    with pytest.raises(RuntimeError, match="text_time must be int32"):
        op(q, k, v, torch.ones(1, 4, dtype=torch.int64), 4, True, 0.25)
    with pytest.raises(RuntimeError, match="not a whole number of images of latents_per_media=3"):
        op(q, k, v, torch.ones(1, 4, dtype=torch.int32), 3, True, 0.25)
    with pytest.raises(RuntimeError, match="takes float32, float16 or bfloat16, got Double"):
        op(q.double(), k.double(), v.double(), torch.ones(1, 4, dtype=torch.int32), 4, True, 0.25)
    with pytest.raises(TypeError, match="backend='native' takes"):
        ops.image_causal_attention(q.double(), k.double(), v.double(), text_time=torch.ones(1, 4, dtype=torch.int32),
                                   latents_per_media=4, backend="native")
    with pytest.raises(TypeError, match="backend='native' takes"):
        ops.perceiver_attention(*(t.double() for t in (q, k, v, q, q)), backend="native")
    perceiver = torch.ops.fastflamingo_native.perceiver_attention
    with pytest.raises(RuntimeError, match=r"k_latents has 3 tokens, q has 4 latents"):
        perceiver(q, k, v, q[:, :, :3], v[:, :, :3], 0.25)
    with pytest.raises(RuntimeError, match="keys and values must have the same shapes"):
        perceiver(q, k, v[:, :, :2], q, q, 0.25)
    with pytest.raises(RuntimeError, match="takes float32, float16 or bfloat16, got Double"):
        perceiver(*(t.double() for t in (q, k, v, q, q)), 0.25)
    with pytest.raises(RuntimeError, match="must share one dtype"):
        perceiver(q, k.half(), v, q, q, 0.25)


def test_native_backend_not_built_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(native._state, "loaded", False)
    monkeypatch.setitem(native._state, "probed", True)
    q = torch.randn(1, 1, 4, 16)
    with pytest.raises(RuntimeError, match="fastflamingo build-native"):
        ops.image_causal_attention(q, q, q, text_time=torch.ones(1, 4, dtype=torch.int32), latents_per_media=4,
                                   backend="native")
    with pytest.raises(RuntimeError, match="fastflamingo build-native"):
        ops.perceiver_attention(q, q, q, q, q, backend="native")
    assert ops.perceiver_backend(q) == "torch"
    # auto falls back to the PyTorch path
    out = ops.image_causal_attention(q, q, q, text_time=torch.ones(1, 4, dtype=torch.int32), latents_per_media=4)
    torch.testing.assert_close(out, image_causal_attention_reference(q, q, q, torch.ones(1, 4, dtype=torch.int32),
                                                                     latents_per_media=4))


def test_stale_build_is_not_loaded(tmp_path, monkeypatch):
    """A library older than its sources is reported, not loaded."""
    monkeypatch.setenv("FASTFLAMINGO_NATIVE_BUILD", str(tmp_path))
    lib = tmp_path / native.LIBRARY
    lib.write_bytes(b"")
    import os
    os.utime(lib, (0, 0))
    assert not native.up_to_date()
    monkeypatch.setitem(native._state, "loaded", False)
    with pytest.raises(RuntimeError, match="older than its sources"):
        native.load()


def test_build_native_command_is_incremental():
    """`fastflamingo build-native` on a built tree: nothing to compile, and it reports the ops."""
    done = subprocess.run([sys.executable, "-c", "import sys; from fastflamingo.cli import main; "
                           "sys.exit(main(['build-native']))"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "torch.ops.fastflamingo_native.image_causal_attention and .perceiver_attention" in done.stdout


def test_compiled_before_any_eager_call_runs_native():
    """In a fresh process, torch.compile(fullgraph=True) of the ops before any eager call traces the
    native kernels (backend "native" and "auto"): the build is loaded when fastflamingo is imported,
    not on first use (inside a trace, the load could touch no file: "native" failed, "auto" fell
    back to the PyTorch path)."""
    code = """
import torch, fastflamingo.ops as ops
from torch._dynamo.testing import CompileCounterWithBackend
q = torch.randn(1, 2, 6, 16)
tt = torch.tensor([[0, 1, 1, 2, 2, 2]], dtype=torch.int32)
for backend in ("native", "auto"):
    seen = CompileCounterWithBackend("eager")
    f = torch.compile(lambda q: ops.image_causal_attention(q, q[:, :, :4], q[:, :, :4], text_time=tt,
                      latents_per_media=2, backend=backend), backend=seen, fullgraph=True)
    f(q)
    p = torch.compile(lambda q: ops.perceiver_attention(q, q, q, q, q, backend=backend), backend=seen, fullgraph=True)
    p(torch.randn(64, 8, 64, 64))
    code = " ".join(str(g.graph) for g in seen.graphs)
    print(backend, code.count("fastflamingo_native.image_causal_attention"), code.count("fastflamingo_native.perceiver"))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split("\n")[:2] == ["native 1 1", "auto 1 1"], done.stdout


# ----------------------------------------------------------------------------- the Perceiver kernel

def native_perceiver(inputs, seed=1):
    """The public op on the native backend, forward and the five gradients of a random dout."""
    leaves = [x.detach().requires_grad_() for x in inputs]
    out = ops.perceiver_attention(*leaves, backend="native")
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.dtype)
    return out, torch.autograd.grad(out, leaves, dout), dout


# the Triton kernel's cases (every V of issue 6: 1, 63, 256, 257, 577; latents 16 and 64; heads
# 64 and 96; odd sizes, no media at all), plus latents over one block of 64 queries (70, 130) and
# media over one chunk of 256 keys with a short tail (513)
_MORE = [(70, 257, 64, torch.float32), (130, 63, 32, torch.float16), (64, 513, 64, torch.bfloat16)]


@pytest.mark.parametrize("L,V,D,dtype", _ALL_V + _ALL_LD + _ODD + _BF16 + _MORE,
                         ids=lambda p: str(p).replace("torch.", "") if not isinstance(p, int) else None)
def test_native_perceiver_matches_reference(L, V, D, dtype):
    inputs = make_inputs(2, 2, L, V, D, dtype, device="cpu")
    out, grads, dout = native_perceiver(inputs)
    check_by_rule(out, grads, inputs, dout)


def test_native_perceiver_views_layout_and_lse():
    """q/k/v as views of (B, S, H*D) projections, as the resampler passes them: the contiguous
    case's results; outputs and gradients in (B, S, H, D) memory (the Triton kernels' layout, a
    free reshape back to (B, S, H*D)); lse the log-sum-exp of each latent's scaled scores."""
    B, H, L, V, D = 2, 3, 16, 63, 32
    g = torch.Generator().manual_seed(0)
    heads = lambda x: x.unflatten(-1, (H, D)).transpose(1, 2)  # noqa: E731
    q = heads(torch.randn(B, L, H * D, generator=g))
    k_media, v_media = map(heads, torch.randn(B, V, 2 * H * D, generator=g).chunk(2, dim=-1))
    k_latents, v_latents = map(heads, torch.randn(B, L, 2 * H * D, generator=g).chunk(2, dim=-1))
    views = (q, k_media, v_media, k_latents, v_latents)
    out, grads, dout = native_perceiver(views)
    out_c, grads_c, _ = native_perceiver(tuple(x.contiguous() for x in views))
    torch.testing.assert_close(out, out_c, rtol=0, atol=0)
    for name, a, b in zip(NAMES, grads, grads_c):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=lambda m: f"d{name}: {m}")
    check_by_rule(out, grads, views, dout)
    for t in (out, *grads):
        assert t.transpose(1, 2).is_contiguous(), t.stride()
    _, lse = torch.ops.fastflamingo_native.perceiver_attention(*views, 0.3)
    keys = torch.cat([k_media, k_latents], 2)
    torch.testing.assert_close(lse, (q @ keys.transpose(-1, -2) * 0.3).logsumexp(-1))


def test_native_perceiver_opcheck():
    """torch.library's checks of the C++ operators' schemas, fake functions (shapes, strides,
    dtypes) and autograd registration."""
    inputs = make_inputs(1, 2, 8, 17, 16, torch.float32, device="cpu")
    fwd = torch.ops.fastflamingo_native.perceiver_attention.default
    bwd = torch.ops.fastflamingo_native.perceiver_attention_backward.default
    torch.library.opcheck(fwd, (*[x.clone().requires_grad_() for x in inputs], 0.25))
    out, lse = fwd(*inputs, 0.25)
    torch.library.opcheck(bwd, (torch.randn_like(out), *inputs, out, lse, 0.25))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_perceiver_torch_compile_fullgraph(dtype):
    """torch.compile(fullgraph=True) of the resampler's attention layer through the native
    operator: eager's output and gradients, no graph break."""
    from fastflamingo.blocks import PerceiverAttention
    torch.manual_seed(0)
    layer = PerceiverAttention(dim=32, dim_head=16, heads=2).to(dtype)
    layer.backend = "native"
    x = torch.randn(3, 17, 32, dtype=dtype, requires_grad=True)
    latents = torch.randn(3, 8, 32, dtype=dtype)

    check_compiled_like_eager(layer, x, (latents,), dtype)


def test_auto_runs_native_perceiver_on_cpu_when_built(monkeypatch):
    """backend="auto" on CPU tensors takes the native Perceiver kernel once it is loaded, in
    inference, for calls of at least NATIVE_MIN_WORK (below it one SDPA call costs less host
    time; in training SDPA with its backward measured faster); the result is the PyTorch path's
    either way."""
    from fastflamingo.ops import perceiver_op
    calls = []
    real = perceiver_op._native_ops

    def counted():
        calls.append(1)
        return real()

    monkeypatch.setattr(perceiver_op, "_native_ops", counted)
    large = make_inputs(8, 4, 16, 63, 32, torch.float32, device="cpu")  # 8·4·16·(63 + 16)·32 multiply-adds
    small = make_inputs(2, 2, 8, 17, 16, torch.float32, device="cpu")
    assert 8 * 4 * 16 * 79 * 32 >= perceiver_op.NATIVE_MIN_WORK > 2 * 2 * 8 * 25 * 16
    for inputs, native_expected in ((large, True), (small, False)):
        calls.clear()
        assert ops.perceiver_backend(inputs[0], media_tokens=inputs[1].shape[2]) == (
            "native" if native_expected else "torch")
        auto = ops.perceiver_attention(*inputs)
        assert bool(calls) == native_expected
        torch.testing.assert_close(auto, ops.perceiver_attention(*inputs, backend="torch"))
    # in training (a gradient to compute) auto keeps SDPA
    calls.clear()
    leaves = [x.clone().requires_grad_() for x in large]
    assert ops.perceiver_backend(leaves[0], media_tokens=63) == "torch"
    ops.perceiver_attention(*leaves).sum().backward()
    assert not calls
    with torch.no_grad():
        ops.perceiver_attention(*leaves)
    assert calls
    # forced, the size and the gradient do not matter; without the media size, the large calls' backend
    calls.clear()
    ops.perceiver_attention(*small, backend="native")
    ops.perceiver_attention(*leaves, backend="native").sum().backward()
    assert len(calls) == 2
    assert ops.perceiver_backend(small[0]) == "native"
    # float64 has no native kernel: auto takes PyTorch's
    assert ops.perceiver_backend(large[0].double(), media_tokens=63) == "torch"
