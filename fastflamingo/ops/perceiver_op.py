"""The Perceiver latent attention as a torch custom op, and its backend dispatch.

The Triton kernels (:mod:`fastflamingo.kernels.perceiver`) are registered as two custom ops,
``fastflamingo::perceiver_attention_fwd`` -> (out, lse) and
``fastflamingo::perceiver_attention_bwd`` -> the five input gradients, tied together with
``register_autograd`` and given ``register_fake`` shape functions, so that
``torch.compile(fullgraph=True)`` sees one opaque node per call instead of a graph break.

The native CPU kernel (``csrc/perceiver.cpp``, built by ``fastflamingo build-native``) is the
C++ operator ``fastflamingo_native::perceiver_attention`` (and ``_backward``), with the same
contract as the Triton pair; :func:`register_native` gives it fake and autograd functions once
:mod:`fastflamingo.native` has loaded it, so it too compiles without a graph break.

The PyTorch path (:func:`~fastflamingo.ops.cpu.perceiver_attention_torch`, SDPA over the
concatenation) needs no registration: autograd and torch.compile trace it directly.

Triton is imported only when the Triton path is taken: ``import fastflamingo`` works without it.
"""
from __future__ import annotations

import torch

from .. import native
from .cpu import perceiver_attention_torch
from .dispatch import kernel_backward, needs_grad, use_native, use_triton


def _kernels():
    from fastflamingo.kernels import perceiver
    return perceiver


def _bshd_like(t: torch.Tensor, S: int) -> torch.Tensor:
    """A (B, H, S, D) tensor like t (B, H, *, D) in (B, S, H, D) memory layout: the kernels'
    output layout (kernels.perceiver.empty_bshd), for the fake functions, which need no triton."""
    B, H, _, D = t.shape
    return t.new_empty(B, S, H, D).transpose(1, 2)


@torch.library.custom_op("fastflamingo::perceiver_attention_fwd", mutates_args=())
def _perceiver_fwd_op(q: torch.Tensor, k_media: torch.Tensor, v_media: torch.Tensor,
                      k_latents: torch.Tensor, v_latents: torch.Tensor, scale: float
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H, L, D), (B, H, V, D) x2, (B, H, L, D) x2 -> out (B, H, L, D), lse (B, H, L) fp32."""
    return _kernels().perceiver_fwd(q, k_media, v_media, k_latents, v_latents, scale)


@_perceiver_fwd_op.register_fake
def _(q, k_media, v_media, k_latents, v_latents, scale):
    B, H, L, _ = q.shape
    return _bshd_like(q, L), q.new_empty(B, H, L, dtype=torch.float32)


@torch.library.custom_op("fastflamingo::perceiver_attention_bwd", mutates_args=())
def _perceiver_bwd_op(dout: torch.Tensor, q: torch.Tensor, k_media: torch.Tensor, v_media: torch.Tensor,
                      k_latents: torch.Tensor, v_latents: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                      scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of the five inputs of :func:`_perceiver_fwd_op` given dout (B, H, L, D)."""
    return _kernels().perceiver_bwd(dout, q, k_media, v_media, k_latents, v_latents, out, lse, scale)


@_perceiver_bwd_op.register_fake
def _(dout, q, k_media, v_media, k_latents, v_latents, out, lse, scale):
    L, V = q.shape[2], k_media.shape[2]
    return _bshd_like(q, L), _bshd_like(q, V), _bshd_like(q, V), _bshd_like(q, L), _bshd_like(q, L)


def _save(ctx, inputs, out, lse) -> None:
    """What the backward needs, for the custom op's autograd and the eager Function alike."""
    *tensors, scale = inputs
    ctx.save_for_backward(*tensors, out, lse)
    ctx.scale = scale


def _grads(ctx, dout, backward) -> tuple:
    """The inputs' gradients from ``backward`` (the backward custom op, or the kernels' launcher),
    which refuse to be differentiated again (:func:`~fastflamingo.ops.dispatch.kernel_backward`)."""
    return (*kernel_backward("perceiver_attention", backward, dout, *ctx.saved_tensors, ctx.scale), None)


def _setup_context(ctx, inputs, output):
    out, lse = output
    ctx.mark_non_differentiable(lse)  # an auxiliary output for the backward only
    _save(ctx, inputs, out, lse)


def _backward(ctx, dout, _dlse):
    return _grads(ctx, dout, _perceiver_bwd_op)


_perceiver_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def _native_ops():
    return torch.ops.fastflamingo_native.perceiver_attention.default, \
        torch.ops.fastflamingo_native.perceiver_attention_backward.default


def register_native() -> None:
    """Fake and autograd functions of the native operators (called once they are loaded); the
    fakes give the layouts the operators return, (B, S, H, D) memory as the Triton kernels'."""
    name = native.OPS + "::perceiver_attention"

    def fake_forward(q, k_media, v_media, k_latents, v_latents, scale):
        B, H, L, _ = q.shape
        return _bshd_like(q, L), q.new_empty(B, H, L, dtype=torch.float32)

    def fake_backward(dout, q, k_media, v_media, k_latents, v_latents, out, lse, scale):
        L, V = q.shape[2], k_media.shape[2]
        return _bshd_like(q, L), _bshd_like(q, V), _bshd_like(q, V), _bshd_like(q, L), _bshd_like(q, L)

    def backward(ctx, dout, _dlse):
        return _grads(ctx, dout, _native_ops()[1])

    torch.library.register_fake(name, fake_forward)
    torch.library.register_fake(name + "_backward", fake_backward)
    torch.library.register_autograd(name, backward, setup_context=_setup_context)


# "auto" takes the native kernel for CPU tensors in inference (no gradient to compute) from this
# much work up: B·H·L·(V + L)·D multiply-adds of q·kᵀ. Measured on 2 CPU cores (benchmarks/
# RESULTS.md, 2026-12-07): below it, the ~10 us more host time of a C++ operator's dispatch from
# Python outweigh what the kernel saves over one SDPA call (the tiny preset's resampler, 2 heads
# of 16, 8 latents, 17 media tokens: 51k at 8 images saves nothing, 205k at 32 images ~20 us);
# above it the forward is 1.2-1.6x SDPA's. In training "auto" keeps SDPA: with its backward the
# native path measured 1.34x slower at the tiny shape (the autograd Function, and the views'
# gradients summed back into the one projection) and even at OpenFlamingo-9B's (a layer +-3%).
NATIVE_MIN_WORK = 1 << 17


def runs_native(q: torch.Tensor, media_tokens: int | None, backend: str, grad: bool | None = None) -> bool:
    """Whether :func:`perceiver_attention_op` runs the native kernel for latent queries ``q``
    (B, H, L, D) over ``media_tokens`` media keys: forced ("native"), or "auto" on CPU tensors
    where it is built, when no gradient is to be computed (``grad``; None: whether one flows to
    ``q``) and the call holds at least :data:`NATIVE_MIN_WORK` (``media_tokens`` None: whatever
    the size)."""
    if not use_native("perceiver_attention", q, backend):
        return False
    if backend == "native":
        return True
    if needs_grad((q,)) if grad is None else grad:
        return False
    if media_tokens is None:
        return True
    B, H, L, D = q.shape
    return B * H * L * (media_tokens + L) * D >= NATIVE_MIN_WORK


def runs_triton(q: torch.Tensor, backend: str) -> bool:
    """Whether :func:`perceiver_attention_op` runs the Triton kernels for queries ``q``."""
    return use_triton("perceiver_attention", q, backend, lambda: _kernels().INTERPRET)


def perceiver_attention_op(q: torch.Tensor, k_media: torch.Tensor, v_media: torch.Tensor,
                           k_latents: torch.Tensor, v_latents: torch.Tensor, *,
                           scale: float | None = None, backend: str = "auto") -> torch.Tensor:
    """Perceiver latent attention, dispatched to a backend (inputs already validated by
    :func:`fastflamingo.ops.perceiver_attention`).

    Args:
        q: (B, H, L, D); k_media, v_media: (B, H, V, D); k_latents, v_latents: (B, H, L, D).
            Any strides; a non-contiguous last dim costs a copy on the Triton path.
        scale: softmax scale, default ``D ** -0.5``.
        backend: "auto" (Triton for CUDA fp16/bf16/fp32 tensors with head_dim <= 256; for CPU
            tensors the native kernel where it is built, in inference, for calls large enough
            (:data:`NATIVE_MIN_WORK`), else the PyTorch path), "triton"
            (forced; CPU tensors only under TRITON_INTERPRET=1), "native" or "torch".

    Returns:
        (B, H, L, D). From the Triton and native paths it is stored in (B, L, H, D) memory
        layout, so ``out.transpose(1, 2).reshape(B, L, H * D)`` is a free view.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    inputs = (q, k_media, v_media, k_latents, v_latents)
    grad = needs_grad(inputs)
    if runs_native(q, k_media.shape[2], backend, grad):
        forward, backward = _native_ops()
        if torch.compiler.is_compiling() or not grad:
            return forward(*inputs, scale)[0]
        return _EagerPerceiver.apply(*inputs, scale, forward, backward)
    if runs_triton(q, backend):
        if torch.compiler.is_compiling():
            out, _ = _perceiver_fwd_op(*inputs, scale)
            return out
        if not grad:  # inference: the launcher alone, no autograd node
            return _kernels().perceiver_fwd(*inputs, scale)[0]
        return _EagerPerceiver.apply(*inputs, scale)
    return perceiver_attention_torch(q, k_media, v_media, k_latents, v_latents, scale=scale)


class _EagerPerceiver(torch.autograd.Function):
    """The custom op's kernels for eager calls, without its eager dispatch cost (~100-200 us of
    host time per call on the H100 machine, several times the kernel; see the image-causal op).
    ``forward`` / ``backward``: the kernels to run (default the Triton launchers; the native
    operators for the native backend)."""

    @staticmethod
    def forward(ctx, q, k_media, v_media, k_latents, v_latents, scale, forward=None, backward=None):
        forward = forward or _kernels().perceiver_fwd
        out, lse = forward(q, k_media, v_media, k_latents, v_latents, scale)
        _save(ctx, (q, k_media, v_media, k_latents, v_latents, scale), out, lse)
        ctx.backward_kernel = backward
        return out

    @staticmethod
    def backward(ctx, dout):
        return *_grads(ctx, dout, ctx.backward_kernel or _kernels().perceiver_bwd), None, None
