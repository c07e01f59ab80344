"""Backend choice shared by the attention ops: their Triton kernels, the native CPU kernel
(:mod:`fastflamingo.native`, where built) or their PyTorch path.

Plain Python that torch.compile traces; it imports no triton (``import fastflamingo`` works
without it) until a forced "triton" backend on CPU tensors asks whether the kernels were defined
for Triton's interpreter.
"""
from __future__ import annotations

import importlib.util
from typing import Callable

import torch
from torch._C import _functions  # DelayedError, the node of torch's own @once_differentiable

# looked up once (not per call, and not inside a torch.compile trace)
HAS_TRITON = importlib.util.find_spec("triton") is not None
# what the kernels take: the one definition, which fastflamingo.kernels.common (DTYPES, MAX_HEAD_DIM)
# imports, kept here so that the checks need no triton
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TRITON_MAX_HEAD_DIM = 256


def under_func_transform() -> bool:
    """Whether a ``torch.func`` transform (grad, vjp, jacrev, jacfwd, hessian, vmap, ...) runs
    this call: the kernels' autograd Functions take none of them (their backward is not
    differentiable, and they have no batching rule), so "auto" takes the PyTorch path there,
    which takes every one: its SDPA calls then run on the math kernel, whose derivatives have
    forward-mode and second-order formulas (:func:`fastflamingo.ops.cpu._differentiable_sdpa`).

    A plain double backward (``torch.autograd.grad(..., create_graph=True)``, a gradient penalty)
    outside torch.func cannot be seen at forward time: the kernels refuse it with a message, and
    the PyTorch path's fused SDPA fails in torch ("derivative for ..._backward is not
    implemented"), except for fp64 inputs (gradgradcheck's), which it runs on the math kernel.
    For other dtypes take the second derivative through torch.func (``grad`` of ``grad``,
    ``hessian``), or use backend="reference"."""
    return not torch.compiler.is_compiling() and torch._C._functorch.maybe_current_level() is not None


def _refuse_under_func_transform(op: str, backend: str) -> None:
    if under_func_transform():
        raise RuntimeError(f"{op}: backend={backend!r} runs kernels that torch.func transforms (grad, vjp, vmap, "
                           "...) cannot see into: use backend='auto' or 'torch' there (the PyTorch path)")


def use_triton(op: str, q: torch.Tensor, backend: str, interpreted: Callable[[], bool]) -> bool:
    """Whether ``backend`` means the Triton kernels of ``op`` for queries ``q`` (B, H, T, D).

    "auto": Triton for CUDA tensors of a dtype and head size the kernels take, else PyTorch.
    "triton": forced, with a clear error (naming ``op``) where the kernels cannot take the inputs.
    ``interpreted()`` says whether the op's kernels were defined for Triton's interpreter, the
    only way they take CPU tensors.
    """
    if backend in ("torch", "native"):
        return False
    if backend == "auto":
        return (q.is_cuda and q.dtype in TRITON_DTYPES and q.shape[-1] <= TRITON_MAX_HEAD_DIM and HAS_TRITON
                and not under_func_transform())
    if backend != "triton":
        raise ValueError(f"{op}: backend={backend!r} is not 'auto', 'triton', 'native' or 'torch'")
    _refuse_under_func_transform(op, backend)
    if not HAS_TRITON:
        raise RuntimeError(f"{op}: backend='triton' needs the triton package "
                           "(pip install triton, or fastflamingo[gpu]); use backend='torch' without it")
    if not q.is_cuda and (q.device.type != "cpu" or not interpreted()):
        raise ValueError(f"{op}: backend='triton' got tensors on {q.device}; Triton runs on CUDA tensors, "
                         "or on CPU tensors only in its interpreter: set TRITON_INTERPRET=1 before importing "
                         "fastflamingo (the kernels read it when they are defined). "
                         "Use backend='torch' or 'auto' for CPU tensors")
    if q.dtype not in TRITON_DTYPES:
        raise TypeError(f"{op}: backend='triton' takes {TRITON_DTYPES}, got {q.dtype}; use backend='torch'")
    if q.shape[-1] > TRITON_MAX_HEAD_DIM:
        raise ValueError(f"{op}: backend='triton' takes head_dim <= {TRITON_MAX_HEAD_DIM}, "
                         f"got {q.shape[-1]}; use backend='torch'")
    return True


NATIVE_DTYPES = TRITON_DTYPES


def use_native(op: str, q: torch.Tensor, backend: str) -> bool:
    """Whether ``backend`` means the native CPU kernel of ``op`` for queries ``q``.

    "auto": for CPU tensors of a dtype it takes, where the extension is built (and loaded when
    fastflamingo is imported: :func:`fastflamingo.native.available`). "native": forced, with a clear error
    where it is not built or cannot take the inputs.
    """
    if backend not in ("auto", "native"):
        return False
    from .. import native
    if backend == "auto":
        return (q.device.type == "cpu" and q.dtype in NATIVE_DTYPES and native.available()
                and not under_func_transform())
    _refuse_under_func_transform(op, backend)
    if q.device.type != "cpu":
        raise ValueError(f"{op}: backend='native' runs on CPU tensors, got them on {q.device}; "
                         "use backend='auto' or 'triton' for CUDA tensors")
    if q.dtype not in NATIVE_DTYPES:
        raise TypeError(f"{op}: backend='native' takes {NATIVE_DTYPES}, got {q.dtype}; use backend='torch'")
    reason = native.unavailable_reason()
    if reason is not None:
        import os
        if os.environ.get("FASTFLAMINGO_NATIVE") == "0":
            raise RuntimeError(f"{op}: backend='native' asked for, but FASTFLAMINGO_NATIVE=0 turns the native "
                               "extension off: unset it, or use backend='auto' / 'torch'")
        raise RuntimeError(f"{op}: backend='native' needs the native extension, which is not loaded: {reason}. Run "
                           "`fastflamingo build-native` in the source checkout (cmake and g++), or use "
                           "backend='auto' / 'torch'")
    return True


def needs_grad(tensors) -> bool:
    """Whether autograd would record an op on ``tensors``: eager calls that it would not
    (inference, ``torch.no_grad``) run the kernels without an autograd Function around them,
    ~7 us less host time per call."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def kernel_backward(op: str, backward: Callable[..., tuple], *args) -> tuple:
    """The input gradients ``backward(*args)`` of a Triton or native kernel, which autograd cannot
    see into: computed without recording, and, under ``create_graph=True``, made to raise if they
    are differentiated again. Without this a double backward (a gradient penalty) would silently
    lose the kernel's second-order terms. Like torch's ``once_differentiable``, with a message
    naming the remedy, and whatever ``dout`` is: a constant ``dout`` (a ``.sum()`` loss) still
    gives gradients that depend on the saved inputs."""
    with torch.no_grad():
        grads = backward(*args)
    if not torch.is_grad_enabled():  # create_graph=False: the usual backward
        return grads
    refuse = _functions.DelayedError(
        f"{op}: the Triton and native kernels' backward cannot be differentiated again (double backward, "
        f"create_graph=True): use backend=\"reference\", whose plain PyTorch math supports it".encode(), len(grads))
    return refuse(*(g.detach().requires_grad_() for g in grads))
