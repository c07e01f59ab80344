"""Edge cases of the public ops: higher-order derivatives on the PyTorch path, zero images, and
arguments of the wrong type or value (named errors)."""
import numpy as np
import pytest
import torch

from fastflamingo import ops

L, N, T, D = 2, 2, 5, 4
TEXT_TIME = torch.tensor([[0, 1, 1, 2, 2]], dtype=torch.int32)


def _inputs(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 1, s, D, generator=g, dtype=dtype) for s in (T, N * L, N * L)]


def _image_causal(backend, only_immediate):
    def f(q, k, v):
        return ops.image_causal_attention(q, k, v, text_time=TEXT_TIME, latents_per_media=L,
                                          only_immediate=only_immediate, backend=backend)
    return f


def _perceiver(backend):
    def f(q, k, v):  # q (1, 1, T, D) as latents, k, v as media
        return ops.perceiver_attention(q, k, v, q * 0.5, q.flip(-1), backend=backend)
    return f


OPS = {"immediate": lambda be: _image_causal(be, True), "all_previous": lambda be: _image_causal(be, False),
       "perceiver": _perceiver}
TRANSFORMS = {
    "jacfwd": lambda f: torch.func.jacfwd(f, argnums=(0, 1, 2)),
    "hessian": lambda f: torch.func.hessian(lambda *a: f(*a).square().sum(), argnums=(0, 1, 2)),
    "jacrev_of_jacrev": lambda f: torch.func.jacrev(torch.func.jacrev(lambda *a: f(*a).square().sum(),
                                                                      argnums=(0, 1, 2)), argnums=(0, 1, 2)),
}


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("op", OPS)
def test_torch_path_takes_forward_mode_and_higher_order_func_transforms(op, transform, backend):
    """Under torch.func the PyTorch path runs SDPA's math kernel, whose derivatives have forward-mode
    and second-order formulas (the CPU flash kernel has neither): jacfwd, hessian and jacrev of
    jacrev agree with the reference's (fp64)."""
    inputs = _inputs()
    got = TRANSFORMS[transform](OPS[op](backend))(*inputs)
    want = TRANSFORMS[transform](OPS[op]("reference"))(*inputs)
    torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-7)


@pytest.mark.parametrize("op", OPS)
def test_torch_path_double_backward_in_fp64(op):
    """A create_graph double backward (a gradient penalty) of fp64 inputs (gradgradcheck's dtype)
    on the PyTorch path: the math SDPA, second derivatives right."""
    inputs = [t.requires_grad_() for t in _inputs()]
    assert torch.autograd.gradgradcheck(OPS[op]("torch"), inputs)


def _zero_images(T_, requires_grad=True):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 1, T_, D, generator=g, requires_grad=requires_grad)
    k = torch.randn(2, 1, 0, D, generator=g, requires_grad=requires_grad)
    v = torch.randn(2, 1, 0, D, generator=g, requires_grad=requires_grad)
    return q, k, v, torch.zeros(2, T_, dtype=torch.int32)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("only_immediate", [True, False], ids=["immediate", "all_previous"])
@pytest.mark.parametrize("T_", [1, 5])
def test_zero_images_give_zeros_and_zero_grads(T_, only_immediate, compiled):
    """N = 0 images (k, v with no keys): exact zeros and zero gradients on the PyTorch path, eager
    and under torch.compile (whose gather path once indexed the empty image axis)."""
    import torch._dynamo

    def f(q, k, v, tt):
        return ops.image_causal_attention(q, k, v, text_time=tt, latents_per_media=3,
                                          only_immediate=only_immediate, backend="torch")
    torch._dynamo.reset()
    fn = torch.compile(f, backend="inductor", fullgraph=True) if compiled else f
    q, k, v, tt = _zero_images(T_)
    out = fn(q, k, v, tt)
    assert out.shape == q.shape and (out == 0).all()
    out.sum().backward()
    assert (q.grad == 0).all() and k.grad.shape == k.shape and v.grad.shape == v.shape
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", ["torch", "reference", "auto"])
@pytest.mark.parametrize("bad", [1.5, True, 2.0, "2", None])
def test_latents_per_media_must_be_an_int(bad, backend):
    q, k, v = _inputs(torch.float32)
    with pytest.raises(TypeError, match=f"latents_per_media={bad!r} must be an int"):
        ops.image_causal_attention(q, k, v, text_time=TEXT_TIME, latents_per_media=bad, backend=backend)


def test_latents_per_media_may_be_a_numpy_int():
    q, k, v = _inputs(torch.float32)
    want = ops.image_causal_attention(q, k, v, text_time=TEXT_TIME, latents_per_media=L, backend="reference")
    for backend in ("torch", "reference", "auto"):
        got = ops.image_causal_attention(q, k, v, text_time=TEXT_TIME, latents_per_media=np.int64(L), backend=backend)
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("bad", ["False", 0, 1, None])
def test_only_immediate_must_be_a_bool(bad):
    q, k, v = _inputs(torch.float32)
    with pytest.raises(TypeError, match=f"only_immediate={bad!r} must be a bool"):
        ops.image_causal_attention(q, k, v, text_time=TEXT_TIME, latents_per_media=L, only_immediate=bad)


def test_negative_text_time_is_named_as_negative_not_as_going_back():
    q, k, v = _inputs(torch.float32)
    tt = torch.tensor([[0, 1, -1, 2, 2]], dtype=torch.int32)
    for backend in ("reference", "torch", "auto"):
        with pytest.raises(ValueError, match=r"text_time must be >= 0 \(0 = no image yet\): row 0 has -1 at token 2"):
            ops.image_causal_attention(q, k, v, text_time=tt, latents_per_media=L, backend=backend)


@pytest.mark.parametrize("backend", ["torch", "triton", "reference"])
def test_unvalidated_text_time_beyond_the_images_sees_nothing_on_every_backend(backend):
    """validate=False trusts the caller; still, a token past the last image got 0 from the kernels
    but NaN from the reference, and an int64 2**32 + 2 wrapped to image 2 in the int32 cast."""
    from fastflamingo.ops import dispatch
    if backend == "triton" and (not dispatch.HAS_TRITON or torch.cuda.is_available()):
        pytest.skip("the Triton kernels on CPU tensors run in the interpreter only (no GPU here)")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, s, 8, generator=g) for s in (4, 8, 8))
    good = ops.image_causal_attention(q, k, v, text_time=torch.tensor([[1, 1, 2, 2]], dtype=torch.int32),
                                      latents_per_media=4, backend=backend)
    for tt in (torch.tensor([[1, 1, 3, 3]], dtype=torch.int32), torch.tensor([[1, 1, 2 ** 32 + 2, 2 ** 32 + 2]])):
        out = ops.image_causal_attention(q, k, v, text_time=tt, latents_per_media=4, backend=backend, validate=False)
        assert torch.equal(out[:, :, 2:], torch.zeros_like(out[:, :, 2:])), tt
        assert torch.allclose(out[:, :, :2], good[:, :, :2], atol=1e-6)
