"""The image-causal cross-attention as a PyTorch custom op, and the backend dispatch
(:func:`fastflamingo.ops.dispatch.use_triton`, shared with the Perceiver op).

``fastflamingo::image_causal_attention`` (q, k, v, text_time, latents_per_media,
only_immediate, scale) -> (out, lse) runs the Triton kernels of
:mod:`fastflamingo.kernels.image_causal`; ``fastflamingo::image_causal_attention_backward``
runs their backward. Both have fake (meta) implementations and the pair is tied together with
``register_autograd``, so ``torch.compile(fullgraph=True)`` traces a model through them with no
graph break, forward and backward. The op trusts ``text_time`` as flash-attention's varlen
functions trust their ``cu_seqlens`` (no host sync): values in 0..N whose nonzero ones never
decrease along T. The Triton backward finds each image's tokens from that order (a row going
back to an earlier image gets wrong dK/dV), so callers check it first:
:func:`fastflamingo.ops.image_causal_attention` does unless ``validate=False`` (on the device
under torch.compile), and the model does once per forward.

The PyTorch backend (:func:`fastflamingo.ops.cpu.image_causal_attention_torch`) is plain
differentiable PyTorch: torch.compile traces it and autograd differentiates it directly, so it
is called as is rather than hidden behind the op (an opaque op would only stop the compiler from
fusing it). A custom op's own kernel runs below autograd, where a recompute-through-autograd
backward could not record a graph anyway.

The native CPU kernel (``csrc/image_causal.cpp``, built by ``fastflamingo build-native``) is
the C++ operator ``fastflamingo_native::image_causal_attention`` (and ``_backward``), with the
same contract as the Triton pair; :func:`register_native` gives it fake and autograd functions
once :mod:`fastflamingo.native` has loaded it, so it too compiles without a graph break.

Triton is imported lazily: ``import fastflamingo`` works where Triton is not installed.
"""
from __future__ import annotations

import torch

from .. import native
from .cpu import image_causal_attention_torch
from .dispatch import kernel_backward, needs_grad, use_native, use_triton

_OP = "fastflamingo::image_causal_attention"


def _kernels():
    from fastflamingo.kernels import image_causal
    return image_causal


@torch.library.custom_op(_OP, mutates_args=())
def _image_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, text_time: torch.Tensor,
                            latents_per_media: int, only_immediate: bool,
                            scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H, T, D), (B, H, N·L, D) x2, (B, T) int32 -> out (B, H, T, D), lse (B, H, T) fp32."""
    return _kernels().image_causal_fwd(q, k, v, text_time, latents_per_media, only_immediate, scale)


def _empty_like_operand(x: torch.Tensor) -> torch.Tensor:
    """The layout the kernels give the output or gradient of x: like x (when x is dense) if its
    last dim has unit stride (they take x as is), contiguous otherwise (they take a copy)."""
    return torch.empty_like(x) if x.stride(-1) == 1 else x.new_empty(x.shape)


@_image_causal_attention.register_fake
def _(q, k, v, text_time, latents_per_media, only_immediate, scale):
    return _empty_like_operand(q), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op(_OP + "_backward", mutates_args=())
def _image_causal_attention_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                     out: torch.Tensor, lse: torch.Tensor, text_time: torch.Tensor,
                                     latents_per_media: int, only_immediate: bool,
                                     scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk, dv) of :func:`_image_causal_attention` given dout (B, H, T, D)."""
    return _kernels().image_causal_bwd(dout, q, k, v, out, lse, text_time, latents_per_media,
                                       only_immediate, scale)


@_image_causal_attention_backward.register_fake
def _(dout, q, k, v, out, lse, text_time, latents_per_media, only_immediate, scale):
    return _empty_like_operand(q), _empty_like_operand(k), _empty_like_operand(v)


def _save(ctx, q, k, v, text_time, out, lse, options) -> None:
    """What the backward needs, for the custom op's autograd and the eager Function alike."""
    if not torch.compiler.is_compiling() and text_time.is_inference():
        text_time = text_time.clone()  # made under inference_mode: autograd cannot save it as it is
    ctx.save_for_backward(q, k, v, text_time, out, lse)
    ctx.options = options


def _grads(ctx, dout, backward) -> tuple:
    """The inputs' gradients from ``backward`` (the backward custom op, or the kernels' launcher),
    which refuse to be differentiated again (:func:`~fastflamingo.ops.dispatch.kernel_backward`)."""
    q, k, v, text_time, out, lse = ctx.saved_tensors
    dq, dk, dv = kernel_backward("image_causal_attention", backward, dout, q, k, v, out, lse, text_time, *ctx.options)
    return dq, dk, dv, None, None, None, None


def _setup_context(ctx, inputs, output):
    q, k, v, text_time, *options = inputs
    out, lse = output
    _save(ctx, q, k, v, text_time, out, lse, tuple(options))
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    return _grads(ctx, dout, _image_causal_attention_backward)


_image_causal_attention.register_autograd(_backward, setup_context=_setup_context)


def _native_ops():
    return torch.ops.fastflamingo_native.image_causal_attention.default, \
        torch.ops.fastflamingo_native.image_causal_attention_backward.default


def register_native() -> None:
    """Fake and autograd functions of the native operators (called once they are loaded)."""
    name = native.OPS + "::image_causal_attention"

    def fake_forward(q, k, v, text_time, latents_per_media, only_immediate, scale):
        return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)

    def fake_backward(dout, q, k, v, out, lse, text_time, latents_per_media, only_immediate, scale):
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)

    def backward(ctx, dout, _dlse):
        return _grads(ctx, dout, _native_ops()[1])

    torch.library.register_fake(name, fake_forward)
    torch.library.register_fake(name + "_backward", fake_backward)
    torch.library.register_autograd(name, backward, setup_context=_setup_context)


def image_causal_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, text_time: torch.Tensor, *,
                              latents_per_media: int, only_immediate: bool = True,
                              scale: float | None = None, backend: str = "auto") -> torch.Tensor:
    """Dispatch of :func:`fastflamingo.ops.image_causal_attention` (inputs already validated there).

    Args:
        q: (B, H, T, D); k, v: (B, H, N·L, D); text_time: (B, T) int32.
        latents_per_media, only_immediate, scale: as in the public function (scale None = D**-0.5).
        backend: "auto" (Triton for CUDA tensors of a dtype and head size it takes; for CPU
            tensors the native kernel where it is built, else PyTorch), "triton", "native" or
            "torch".

    Returns:
        (B, H, T, D).
    """
    # custom ops take concrete floats: resolve the default here
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    options = (int(latents_per_media), bool(only_immediate), scale)
    if use_native("image_causal_attention", q, backend):
        forward, backward = _native_ops()
        if torch.compiler.is_compiling() or not needs_grad((q, k, v)):
            return forward(q, k, v, text_time, *options)[0]
        return _EagerImageCausal.apply(q, k, v, text_time, *options, forward, backward)
    if not use_triton("image_causal_attention", q, backend, lambda: _kernels().INTERPRET):
        return image_causal_attention_torch(q, k, v, text_time, latents_per_media=latents_per_media,
                                            only_immediate=only_immediate, scale=scale)
    if torch.compiler.is_compiling():
        out, _ = _image_causal_attention(q, k, v, text_time, *options)
        return out
    if not needs_grad((q, k, v)):  # inference: the launcher alone, no autograd node
        return _kernels().image_causal_fwd(q, k, v, text_time, *options)[0]
    return _EagerImageCausal.apply(q, k, v, text_time, *options)


class _EagerImageCausal(torch.autograd.Function):
    """The same kernels as the custom op, for eager calls: a custom op's eager dispatch cost
    ~100-200 us of host time per call on the H100 machine (torch 2.11; benchmarks/RESULTS.md),
    several times the kernel's own GPU time. torch.compile traces the custom op instead.
    ``forward`` / ``backward``: the kernels to run (default the Triton launchers; the native
    operators for the native backend)."""

    @staticmethod
    def forward(ctx, q, k, v, text_time, latents_per_media, only_immediate, scale, forward=None, backward=None):
        forward = forward or _kernels().image_causal_fwd
        out, lse = forward(q, k, v, text_time, latents_per_media, only_immediate, scale)
        _save(ctx, q, k, v, text_time, out, lse, (latents_per_media, only_immediate, scale))
        ctx.backward_kernel = backward
        return out

    @staticmethod
    def backward(ctx, dout):
        return *_grads(ctx, dout, ctx.backward_kernel or _kernels().image_causal_bwd), None, None
