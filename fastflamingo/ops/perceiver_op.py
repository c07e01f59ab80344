"""The Perceiver latent attention as a torch custom op, and its backend dispatch.

The Triton kernels (:mod:`fastflamingo.kernels.perceiver`) are registered as two custom ops,
``fastflamingo::perceiver_attention_fwd`` -> (out, lse) and
``fastflamingo::perceiver_attention_bwd`` -> the five input gradients, tied together with
``register_autograd`` and given ``register_fake`` shape functions, so that
``torch.compile(fullgraph=True)`` sees one opaque node per call instead of a graph break.

The PyTorch path (:func:`~fastflamingo.ops.cpu.perceiver_attention_torch`, SDPA over the
concatenation) needs no registration: autograd and torch.compile trace it directly.

Triton is imported only when the Triton path is taken: ``import fastflamingo`` works without it.
"""
from __future__ import annotations

import importlib.util
import os

import torch

from .cpu import perceiver_attention_torch

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_TRITON_MAX_HEAD_DIM = 256  # kernels.perceiver.MAX_HEAD_DIM, repeated so the check needs no triton


def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _triton_on_cpu() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _use_triton(q: torch.Tensor, backend: str) -> bool:
    """Whether ``backend`` on these inputs means the Triton kernels; a clear error when "triton"
    is forced on inputs it cannot take."""
    if backend == "torch":
        return False
    if backend == "auto":
        return (q.is_cuda and q.dtype in _TRITON_DTYPES and q.shape[-1] <= _TRITON_MAX_HEAD_DIM
                and _triton_installed())
    if backend != "triton":
        raise ValueError(f"perceiver_attention_op: backend={backend!r} is not 'auto', 'triton' or 'torch'")
    if not _triton_installed():
        raise ImportError("backend='triton' needs the triton package: pip install triton (or use backend='torch')")
    if not q.is_cuda and not _triton_on_cpu():
        raise ValueError(f"backend='triton' needs CUDA tensors, got tensors on {q.device}; on the CPU use "
                         "backend='torch', or set TRITON_INTERPRET=1 before importing fastflamingo to run the "
                         "kernels in Triton's interpreter (slow, for tests)")
    if q.dtype not in _TRITON_DTYPES:
        raise TypeError(f"backend='triton' supports {_TRITON_DTYPES}, got {q.dtype}; use backend='torch'")
    if q.shape[-1] > _TRITON_MAX_HEAD_DIM:
        raise ValueError(f"backend='triton' supports head_dim <= {_TRITON_MAX_HEAD_DIM}, got {q.shape[-1]}; "
                         "use backend='torch'")
    return True


def _bshd_like(t: torch.Tensor, S: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Same as kernels.perceiver.empty_bshd (the kernels' output layout), for the fake functions,
    which must not need triton."""
    B, H, _, D = t.shape
    return t.new_empty(B, S, H, D, dtype=dtype).transpose(1, 2)


@torch.library.custom_op("fastflamingo::perceiver_attention_fwd", mutates_args=())
def _perceiver_fwd_op(q: torch.Tensor, k_media: torch.Tensor, v_media: torch.Tensor,
                      k_latents: torch.Tensor, v_latents: torch.Tensor, scale: float
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    from fastflamingo.kernels.perceiver import perceiver_fwd
    return perceiver_fwd(q, k_media, v_media, k_latents, v_latents, scale)


@_perceiver_fwd_op.register_fake
def _(q, k_media, v_media, k_latents, v_latents, scale):
    B, H, L, _ = q.shape
    return _bshd_like(q, L), q.new_empty(B, H, L, dtype=torch.float32)


@torch.library.custom_op("fastflamingo::perceiver_attention_bwd", mutates_args=())
def _perceiver_bwd_op(dout: torch.Tensor, q: torch.Tensor, k_media: torch.Tensor, v_media: torch.Tensor,
                      k_latents: torch.Tensor, v_latents: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                      scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from fastflamingo.kernels.perceiver import perceiver_bwd
    return perceiver_bwd(dout, q, k_media, v_media, k_latents, v_latents, out, lse, scale)


@_perceiver_bwd_op.register_fake
def _(dout, q, k_media, v_media, k_latents, v_latents, out, lse, scale):
    L, V = q.shape[2], k_media.shape[2]
    return _bshd_like(q, L), _bshd_like(q, V), _bshd_like(q, V), _bshd_like(q, L), _bshd_like(q, L)


def _setup_context(ctx, inputs, output):
    q, k_media, v_media, k_latents, v_latents, scale = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)  # an auxiliary output for the backward only
    ctx.save_for_backward(q, k_media, v_media, k_latents, v_latents, out, lse)
    ctx.scale = scale


def _backward(ctx, dout, _dlse):
    q, k_media, v_media, k_latents, v_latents, out, lse = ctx.saved_tensors
    grads = _perceiver_bwd_op(dout, q, k_media, v_media, k_latents, v_latents, out, lse, ctx.scale)
    return (*grads, None)


_perceiver_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def perceiver_attention_op(q: torch.Tensor, k_media: torch.Tensor, v_media: torch.Tensor,
                           k_latents: torch.Tensor, v_latents: torch.Tensor, *,
                           scale: float | None = None, backend: str = "auto") -> torch.Tensor:
    """Perceiver latent attention, dispatched to a backend (inputs already validated by
    :func:`fastflamingo.ops.perceiver_attention`).

    Args:
        q: (B, H, L, D); k_media, v_media: (B, H, V, D); k_latents, v_latents: (B, H, L, D).
            Any strides; a non-contiguous last dim costs a copy on the Triton path.
        scale: softmax scale, default ``D ** -0.5``.
        backend: "auto" (Triton for CUDA fp16/bf16/fp32 tensors with head_dim <= 256, the
            PyTorch path otherwise), "triton" (forced; CPU tensors only under
            TRITON_INTERPRET=1), or "torch".

    Returns:
        (B, H, L, D). From the Triton path it is stored in (B, L, H, D) memory layout, so
        ``out.transpose(1, 2).reshape(B, L, H * D)`` is a free view.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if _use_triton(q, backend):
        out, _ = _perceiver_fwd_op(q, k_media, v_media, k_latents, v_latents, scale)
        return out
    return perceiver_attention_torch(q, k_media, v_media, k_latents, v_latents, scale=scale)
