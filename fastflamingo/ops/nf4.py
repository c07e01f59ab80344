"""4-bit (NF4) linear layers at decode time: ``y = x @ W.T + bias`` with W in bitsandbytes' layout.

* :func:`dequantize_4bit_reference` / :func:`nf4_linear_reference` — the readable math.
* :func:`nf4_linear` — one signature for every backend (``backend=``):

  - ``"triton"``: the fused dequantize-matmul kernel (:mod:`fastflamingo.kernels.nf4`) behind
    the custom op ``fastflamingo::nf4_linear``, which reads the packed weights once (weight-
    bandwidth bound: 0.5 byte per weight plus the scales). For a few rows (decoding).
  - ``"torch"``: bitsandbytes' own ``matmul_4bit`` (what ``Linear4bit`` runs: its gemm / gemv
    kernels on CUDA, dequantize + matmul on the CPU). bitsandbytes 0.50's native CPU
    dequantization scales rows wrongly when K is a multiple of 16 but not of the block size
    (K = 48 or 96 with blocksize 64, K = 64 with 128): "auto" avoids it there.
  - ``"reference"``: :func:`nf4_linear_reference`.
  - ``"auto"``: Triton for CUDA inputs of at most :data:`AUTO_MAX_ROWS` rows; bitsandbytes for
    other CUDA inputs and, where K is a multiple of the block size, CPU ones; the reference
    otherwise (and where bitsandbytes is not installed).

* :func:`use_fused_nf4` — route the small-row inputs of every ``bitsandbytes.nn.Linear4bit``
  of a model through the fused op.

bitsandbytes' layout (``bitsandbytes.functional.quantize_4bit``, checked against its
``dequantize_4bit`` in tests/test_nf4_kernel.py): the row-major flattened W (N, K), two codes
per uint8 byte, the high nibble first (element 2i is ``byte[i] >> 4``, element 2i + 1 is
``byte[i] & 15``); ``W[i] = code[q_i] · absmax[i // blocksize]`` over the *flattened* index
(blocks run across rows when K is not a multiple of the block size); nested statistics
(``compress_statistics=True``): absmax is uint8 and
``absmax[b] = code2[qabsmax[b]] · absmax2[b // blocksize2] + offset``.

Gradients: the op is for inference, but it does not cut the graph: the gradient w.r.t. x is
``grad @ dequantize(W)`` and w.r.t. the bias ``grad.sum(0)`` (plain PyTorch in the backward);
the packed weight and its statistics get none (they are frozen integers and scales).

Triton and bitsandbytes are imported lazily: this module imports without them.
"""
from __future__ import annotations

import math
import types
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .dispatch import HAS_TRITON, TRITON_DTYPES

BACKENDS = ("auto", "triton", "torch", "reference")
AUTO_MAX_ROWS = 16       # "auto" takes the fused kernel up to this many rows (decode batches)
QUANT_TYPES = ("nf4", "fp4")  # one code table each: the kernel looks codes up, it takes both

__all__ = ["nf4_linear", "nf4_linear_reference", "dequantize_4bit_reference", "use_fused_nf4",
           "guard_cpu_forward", "linear4bit_forward",
           "BACKENDS", "AUTO_MAX_ROWS"]


def _kernels():
    from fastflamingo.kernels import nf4
    return nf4


def _bnb():
    from ..quant import import_bitsandbytes
    try:
        return import_bitsandbytes()
    except ImportError as e:
        raise ImportError("the 'torch' backend of nf4_linear and use_fused_nf4 need bitsandbytes: "
                          "pip install bitsandbytes") from e


# ----------------------------------------------------------------------------- quant state

class QuantTensors(NamedTuple):
    """What the math needs from a bitsandbytes ``QuantState``: tensors and Python ints."""
    absmax: torch.Tensor                # (blocks,) fp32, or uint8 when nested
    code: torch.Tensor                  # (16,) fp32 code table
    absmax2: torch.Tensor | None        # nested: (ceil(blocks / blocksize2),) fp32
    code2: torch.Tensor | None          # nested: (256,) fp32
    offset: torch.Tensor | None         # nested: 0-d fp32
    out_features: int                   # N
    in_features: int                    # K
    blocksize: int
    blocksize2: int


def _repacked_for_cpu(quant_state) -> bool:
    # QuantState's own __getattr__ raises for unknown names: read the instance dict
    return bool(vars(quant_state).get("packing_format_for_cpu", False))


def quant_tensors(quant_state) -> QuantTensors:
    """The tensors and sizes of a bitsandbytes 4-bit ``QuantState``, checked."""
    for attr in ("absmax", "shape", "code", "blocksize", "quant_type", "nested"):
        if not hasattr(quant_state, attr):
            raise TypeError(f"nf4_linear: quant_state must be a bitsandbytes QuantState (the .quant_state of a "
                            f"Params4bit), got {type(quant_state).__name__} without .{attr}")
    if _repacked_for_cpu(quant_state):
        raise ValueError("nf4_linear: this weight was repacked by bitsandbytes for its AVX512-BF16 CPU kernel "
                         "(quant_state.packing_format_for_cpu, done on a Linear4bit's first eval/no-grad CPU "
                         "forward): use backend='torch', or take the Params4bit before any CPU forward (or set "
                         "the layer's support_avx512bf16_for_cpu = False)")
    if quant_state.quant_type not in QUANT_TYPES:
        raise ValueError(f"nf4_linear: quant_type {quant_state.quant_type!r} is not one of {QUANT_TYPES}")
    if quant_state.shape is None or len(quant_state.shape) != 2:
        raise ValueError(f"nf4_linear: quant_state.shape must be the weight's (out_features, in_features), "
                         f"got {quant_state.shape}")
    N, K = (int(s) for s in quant_state.shape)
    blocks = math.ceil(N * K / quant_state.blocksize)
    if quant_state.absmax.numel() != blocks:
        raise ValueError(f"nf4_linear: quant_state.absmax has {quant_state.absmax.numel()} scales but a "
                         f"({N}, {K}) weight in blocks of {quant_state.blocksize} needs {blocks}")
    if quant_state.nested:
        s2 = quant_state.state2
        if quant_state.absmax.dtype != torch.uint8:
            raise TypeError(f"nf4_linear: nested statistics need uint8 absmax, got {quant_state.absmax.dtype}")
        offset = torch.as_tensor(quant_state.offset, dtype=torch.float32, device=quant_state.absmax.device)
        return QuantTensors(quant_state.absmax, quant_state.code, s2.absmax, s2.code, offset, N, K,
                            int(quant_state.blocksize), int(s2.blocksize))
    return QuantTensors(quant_state.absmax, quant_state.code, None, None, None, N, K, int(quant_state.blocksize), 256)


def _packed_bytes(weight_packed: torch.Tensor, qt: QuantTensors) -> torch.Tensor:
    """The packed weight as a flat uint8 tensor (bitsandbytes may store it as another dtype,
    ``quant_storage``), checked against the shape it was quantized from."""
    w = weight_packed.reshape(-1)
    if w.dtype != torch.uint8:
        w = w.view(torch.uint8)
    need = (qt.out_features * qt.in_features + 1) // 2
    if w.numel() != need:
        raise ValueError(f"nf4_linear: weight_packed holds {w.numel()} bytes but quant_state.shape "
                         f"({qt.out_features}, {qt.in_features}) needs {need}: pass the Params4bit this "
                         "quant_state belongs to")
    return w


# ----------------------------------------------------------------------------- reference

def _dequantize(w: torch.Tensor, qt: QuantTensors) -> torch.Tensor:
    n = qt.out_features * qt.in_features
    codes = torch.stack((w >> 4, w & 15), dim=-1).reshape(-1)[:n]  # high nibble first
    absmax = qt.absmax
    if qt.absmax2 is not None:  # nested: 8-bit scales, themselves scaled per blocksize2 of them
        scale2 = qt.absmax2.repeat_interleave(qt.blocksize2)[:absmax.numel()]
        absmax = qt.code2[absmax.long()] * scale2 + qt.offset
    scale = absmax.float().repeat_interleave(qt.blocksize)[:n]
    return (qt.code[codes.long()] * scale).reshape(qt.out_features, qt.in_features)


def dequantize_4bit_reference(weight_packed: torch.Tensor, quant_state) -> torch.Tensor:
    """The (N, K) fp32 weight that a bitsandbytes 4-bit ``Params4bit`` holds (what
    ``bitsandbytes.functional.dequantize_4bit`` returns, in plain PyTorch)."""
    qt = quant_tensors(quant_state)
    return _dequantize(_packed_bytes(weight_packed, qt), qt)


def nf4_linear_reference(x: torch.Tensor, weight_packed: torch.Tensor, quant_state,
                         bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, dequantize(W), bias)`` in x's dtype: the weight dequantized in fp32, then
    cast, as bitsandbytes computes it."""
    w = dequantize_4bit_reference(weight_packed, quant_state).to(x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


# ----------------------------------------------------------------------------- custom op

@torch.library.custom_op("fastflamingo::nf4_linear", mutates_args=())
def _nf4_linear_op(x: torch.Tensor, weight: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                   absmax2: torch.Tensor | None, code2: torch.Tensor | None, offset: torch.Tensor | None,
                   bias: torch.Tensor | None, out_features: int, in_features: int, blocksize: int,
                   blocksize2: int) -> torch.Tensor:
    """(M, K) x, packed uint8 weight and its statistics -> (M, N) in x's dtype (Triton)."""
    return _kernels().nf4_matmul(x, weight, absmax, code, absmax2, code2, offset, bias, out_features,
                                 blocksize, blocksize2)


@_nf4_linear_op.register_fake
def _(x, weight, absmax, code, absmax2, code2, offset, bias, out_features, in_features, blocksize, blocksize2):
    return x.new_empty((x.shape[0], out_features))


def _setup_context(ctx, inputs, output):
    x, weight, absmax, code, absmax2, code2, offset, bias, N, K, blocksize, blocksize2 = inputs
    ctx.save_for_backward(weight, absmax, code, absmax2, code2, offset)
    ctx.sizes = (N, K, blocksize, blocksize2)


def _backward(ctx, grad):
    weight, absmax, code, absmax2, code2, offset = ctx.saved_tensors
    dx = dbias = None
    if ctx.needs_input_grad[0]:
        N, K, blocksize, blocksize2 = ctx.sizes
        qt = QuantTensors(absmax, code, absmax2, code2, offset, N, K, blocksize, blocksize2)
        dx = grad @ _dequantize(weight, qt).to(grad.dtype)
    if ctx.needs_input_grad[7]:
        dbias = grad.sum(0)
    return dx, None, None, None, None, None, None, dbias, None, None, None, None


_nf4_linear_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public function

def _check_inputs(x: torch.Tensor, qt: QuantTensors, bias: torch.Tensor | None, tensors: dict) -> None:
    if not x.dtype.is_floating_point:
        raise TypeError(f"nf4_linear: x must be a floating-point tensor, got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] != qt.in_features:
        raise ValueError(f"nf4_linear: x of shape {tuple(x.shape)} has {x.shape[-1] if x.dim() else 0} features "
                         f"but the weight was quantized from (out_features, in_features) = "
                         f"({qt.out_features}, {qt.in_features}): pass x (..., {qt.in_features}) (a weight "
                         "quantized from a transposed (in, out) tensor must be quantized again from (out, in))")
    if bias is not None and tuple(bias.shape) != (qt.out_features,):
        raise ValueError(f"nf4_linear: bias has shape {tuple(bias.shape)}, expected ({qt.out_features},)")
    for name, t in tensors.items():
        if t is not None and t.device != x.device:
            raise ValueError(f"nf4_linear: {name} is on {t.device} but x is on {x.device}; move them to one device")


def _use_triton(x: torch.Tensor, rows: int, backend: str) -> bool:
    if backend == "auto":
        return x.is_cuda and rows <= AUTO_MAX_ROWS and x.dtype in TRITON_DTYPES and HAS_TRITON
    if backend != "triton":
        return False
    if not HAS_TRITON:
        raise RuntimeError("nf4_linear: backend='triton' needs the triton package (pip install triton); "
                           "use backend='torch' or 'reference' without it")
    if x.dtype not in TRITON_DTYPES:
        raise TypeError(f"nf4_linear: backend='triton' takes x in {TRITON_DTYPES}, got {x.dtype}; "
                        "use backend='torch' or 'reference'")
    if not x.is_cuda and (x.device.type != "cpu" or not _kernels().INTERPRET):
        raise ValueError(f"nf4_linear: backend='triton' got x on {x.device}; Triton runs on CUDA tensors, or on "
                         "CPU tensors only in its interpreter: set TRITON_INTERPRET=1 before importing "
                         "fastflamingo (the kernels read it when they are defined). Use backend='torch' or "
                         "'auto' for CPU tensors")
    return True


def nf4_linear(x: torch.Tensor, weight_packed: torch.Tensor, quant_state, bias: torch.Tensor | None = None,
               backend: str = "auto") -> torch.Tensor:
    """``x @ W.T + bias`` with W a bitsandbytes 4-bit weight (NF4, or FP4).

    Args:
        x: (..., K) activations; fp16 / bf16 / fp32 for Triton, any float for the others; any
            strides (the leading dims are flattened into rows, a copy only where they must be).
        weight_packed: the packed weight, a ``Params4bit`` (``layer.weight``) or its data:
            ceil(N·K / 2) bytes, any shape (bitsandbytes keeps (bytes, 1)), uint8 or the
            layer's ``quant_storage`` dtype.
        quant_state: its ``bitsandbytes.functional.QuantState`` (``layer.weight.quant_state``),
            plain or nested (``compress_statistics=True``), any block size bitsandbytes allows.
        bias: (N,) or None; cast to x's dtype, as ``Linear4bit`` does.
        backend: one of :data:`BACKENDS`.

    Returns:
        (..., N) in x's dtype.
    """
    if backend not in BACKENDS:
        raise ValueError(f"nf4_linear: backend={backend!r} is not one of {BACKENDS}")
    if backend == "torch" or (backend == "auto" and _repacked_for_cpu(quant_state)):
        # bitsandbytes' own path (it knows its CPU repacking)
        return _bnb().matmul_4bit(x, weight_packed, quant_state=quant_state,
                                  bias=None if bias is None else bias.to(x.dtype))
    qt = quant_tensors(quant_state)
    _check_inputs(x, qt, bias, {"weight_packed": weight_packed, "quant_state.absmax": qt.absmax,
                                "quant_state.code": qt.code, "state2.absmax": qt.absmax2, "state2.code": qt.code2,
                                "bias": bias})
    bias = None if bias is None else bias.to(x.dtype)
    lead = x.shape[:-1]
    rows = math.prod(lead)
    if _use_triton(x, rows, backend):
        w = _packed_bytes(weight_packed, qt)
        x2 = x if x.dim() == 2 else x.reshape(rows, qt.in_features)
        args = (x2, w, qt.absmax, qt.code, qt.absmax2, qt.code2, qt.offset, bias)
        grad = torch.is_grad_enabled() and (x2.requires_grad or (bias is not None and bias.requires_grad))
        if grad or torch.compiler.is_compiling():
            y = _nf4_linear_op(*args, qt.out_features, qt.in_features, qt.blocksize, qt.blocksize2)
        else:  # inference, eager: the kernel without the custom op's eager dispatch cost (~100 us, H100)
            y = _kernels().nf4_matmul(*args, qt.out_features, qt.blocksize, qt.blocksize2)
        return y.reshape(*lead, qt.out_features)
    if backend == "auto" and (x.is_cuda or qt.in_features % qt.blocksize == 0):
        try:
            bnb = _bnb()
        except ImportError:
            bnb = None
        if bnb is not None:
            return bnb.matmul_4bit(x, weight_packed, quant_state=quant_state, bias=bias)
    return F.linear(x, _dequantize(_packed_bytes(weight_packed, qt), qt).to(x.dtype), bias)


# ----------------------------------------------------------------------------- Linear4bit routing

def bnb_cpu_dequantize_is_wrong(in_features: int, blocksize: int) -> bool:
    """Whether bitsandbytes 0.50's native CPU dequantization mis-scales this layer: where a
    row's K is not a multiple of the block size (blocks running across rows), measured wrong
    for K = 48, 96 at blocksize 64 and K = 64, 192, 320 at 128 (tests/test_quant.py); taken
    conservatively for every such K."""
    return in_features % blocksize != 0


def linear4bit_forward(self, x: torch.Tensor) -> torch.Tensor:
    """``Linear4bit.forward``, except CPU inputs of a layer whose shape bitsandbytes' CPU
    dequantization gets wrong (:func:`bnb_cpu_dequantize_is_wrong`): those take the reference
    dequantization (same compute-dtype handling as the layer); and a layer bitsandbytes already
    repacked for its CPU inference kernel (no backward) refuses a call that needs the input's
    gradient."""
    state = getattr(self.weight, "quant_state", None)
    repacked = state is not None and _repacked_for_cpu(state)
    if repacked and torch.is_grad_enabled() and x.requires_grad:
        raise RuntimeError(
            "this NF4 layer's weight was repacked by bitsandbytes for its AVX512-BF16 CPU inference kernel "
            "(on a forward before fastflamingo guarded it), which has no backward: the gradient through it "
            "would be missing. Load or quantize the model again (fastflamingo keeps that kernel off: "
            "fastflamingo.quant.guard_cpu_4bit) before training, or run this call under torch.no_grad()")
    if (x.device.type != "cpu" or state is None or repacked or state.shape is None
            or not bnb_cpu_dequantize_is_wrong(int(state.shape[1]), int(state.blocksize))):
        return type(self).forward(self, x)
    compute = self.compute_dtype or x.dtype
    return nf4_linear(x.to(compute), self.weight, state, self.bias, backend="reference").to(x.dtype)


def _fused_forward(self, x: torch.Tensor) -> torch.Tensor:
    """``Linear4bit.forward`` with inputs of at most ``self.fused_nf4_max_rows`` rows through
    the fused op (CUDA, or any device under ``backend="triton"``), the layer's own forward
    otherwise. Mirrors the layer's compute-dtype handling."""
    from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module
    fix_4bit_weight_quant_state_from_module(self)
    state = self.weight.quant_state
    rows = x.numel() // x.shape[-1] if x.dim() and x.shape[-1] else 0
    fused = (rows <= self.fused_nf4_max_rows and state.quant_type in QUANT_TYPES
             and not _repacked_for_cpu(state) and state.shape is not None and len(state.shape) == 2
             and x.shape[-1] == state.shape[1]
             and (self.fused_nf4_backend == "triton" or (x.is_cuda and HAS_TRITON)))
    if not fused:
        return linear4bit_forward(self, x)
    if not self.compute_type_is_set:
        self.set_compute_type(x)
        self.compute_type_is_set = True
    inp_dtype = x.dtype
    if self.compute_dtype is not None:
        x = x.to(self.compute_dtype)
    return nf4_linear(x, self.weight, state, self.bias, backend="triton").to(inp_dtype)


def guard_cpu_forward(layer: nn.Module) -> bool:
    """Give a ``Linear4bit`` whose own forward goes wrong on the CPU the forward
    :func:`linear4bit_forward` (unless it already has an instance forward): a shape bitsandbytes'
    CPU dequantization scales wrongly, or a weight bitsandbytes already repacked for its
    AVX512-BF16 kernel (no backward). Returns whether it was changed."""
    state = getattr(layer.weight, "quant_state", None)
    if "forward" in layer.__dict__ or state is None:
        return False
    wrong = state.shape is not None and bnb_cpu_dequantize_is_wrong(int(state.shape[1]), int(state.blocksize))
    if not (wrong or _repacked_for_cpu(state)):
        return False
    layer.forward = types.MethodType(linear4bit_forward, layer)
    return True


def use_fused_nf4(model: nn.Module, max_rows: int = AUTO_MAX_ROWS, *, backend: str = "auto") -> int:
    """Route the small inputs of every ``bitsandbytes.nn.Linear4bit`` of ``model`` through the
    fused NF4 kernel, in place.

    An input of at most ``max_rows`` rows (leading dims flattened: a decode step) on CUDA takes
    :func:`nf4_linear` (Triton); any other input (prefill, training batches, CPU tensors, a
    weight bitsandbytes repacked for its CPU kernel) takes the layer's own forward.

    Args:
        model: any module holding ``Linear4bit`` layers (``quantize_model(..., "nf4")``,
            transformers' ``BitsAndBytesConfig``).
        max_rows: the largest row count routed; 0 restores every layer's own forward.
        backend: ``"auto"`` (fused on CUDA only) or ``"triton"`` (fused on any device Triton
            runs on: the CPU under ``TRITON_INTERPRET=1``, for tests).

    Returns:
        The number of ``Linear4bit`` layers changed.
    """
    if backend not in ("auto", "triton"):
        raise ValueError(f"use_fused_nf4: backend={backend!r} is not 'auto' or 'triton'")
    if max_rows < 0:
        raise ValueError(f"use_fused_nf4: max_rows must be >= 0, got {max_rows}")
    bnb = _bnb()
    count = 0
    for m in model.modules():
        if not isinstance(m, bnb.nn.Linear4bit):
            continue
        if max_rows == 0:
            m.__dict__.pop("forward", None)
            guard_cpu_forward(m)
            for attr in ("fused_nf4_max_rows", "fused_nf4_backend"):
                m.__dict__.pop(attr, None)
        else:
            m.fused_nf4_max_rows, m.fused_nf4_backend = int(max_rows), backend
            m.forward = types.MethodType(_fused_forward, m)
        count += 1
    return count
