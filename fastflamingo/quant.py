"""Quantized frozen weights through bitsandbytes: NF4 (4-bit NormalFloat) or int8 (LLM.int8()).

:func:`quantize_model` replaces, in place, the frozen ``nn.Linear`` layers of the LM (and
optionally of the vision encoder, and for inference of the cross-attention blocks) by
bitsandbytes layers. Trainable layers (the resampler, the cross-attention blocks while
training, trainable LM layers) and the LM head stay in 16/32-bit.
NF4 layers compute in their part's dtype, and follow a later cast of the model
(``model.to(torch.bfloat16)``: :func:`nf4_compute_follows_cast`).

bitsandbytes 0.50 on CPUs with AVX512-BF16 repacks NF4 weights for a fast kernel on the first
eval/no-grad forward, for good. That kernel crashes unless ``in_features % 64 == 0`` and
``out_features`` is a multiple of its block (ENVIRONMENT.md); where it runs, it computes in bf16
(an fp32 model's outputs change by ~3e-3 after its first no-grad call) and has no backward (a
later training step gets no gradient through the layer, with only a warning). So every NF4 layer
gets ``support_avx512bf16_for_cpu = False`` (the generic kernel: exact, gradients, ~1.2x slower
at the ``tiny`` preset's CPU decode), here and in :func:`guard_cpu_4bit`, which every model
built or loaded by fastflamingo runs (models quantized elsewhere, e.g. with transformers'
BitsAndBytesConfig, included). A layer repacked before it got here cannot be unpacked exactly:
a forward that needs its input's gradient is refused.
Its native CPU dequantization (from 0.49) also scales rows wrongly where ``in_features`` is not a
multiple of the block size (silently wrong outputs, e.g. K = 48 or 96): those layers' CPU inputs take
fastflamingo's reference dequantization (:mod:`fastflamingo.ops.nf4`).
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys

import torch
from torch import nn

from . import versions

QUANTIZATIONS = ("nf4", "int8")
INT8_THRESHOLD = 6.0  # LLM.int8() outlier threshold, transformers' default


def _drop_int8_cast_notice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("MatMul8bitLt: inputs will be cast")


_HUB_KERNEL_NOTICE = "Failed to load CPU gemm_4bit_forward from kernels-community"
_ABSENT = object()


def import_bitsandbytes():
    """``import bitsandbytes`` without its download of code from the Hugging Face Hub.

    On CPUs with AVX512-BF16, bitsandbytes (0.50) tries at import, where the ``kernels`` package is
    installed, to download and run a CPU kernel from the Hub (``kernels-community``). fastflamingo
    runs no remote code unless asked: that import of ``kernels`` fails (bitsandbytes then keeps its
    own CPU kernels, and its notice of the failure is dropped), unless ``FASTFLAMINGO_HUB_KERNELS=1``
    (the user's choice). Whether ``kernels`` was imported before says nothing of that choice:
    transformers imports it to see whether it is installed. Raises ImportError without bitsandbytes."""
    if "bitsandbytes" in sys.modules:
        if sys.modules["bitsandbytes"] is None:  # Python's marker of a blocked import
            raise ImportError("import of bitsandbytes blocked (sys.modules['bitsandbytes'] is None)")
        return sys.modules["bitsandbytes"]
    if os.environ.get("FASTFLAMINGO_HUB_KERNELS", "0") not in ("", "0"):
        import bitsandbytes
        return bitsandbytes
    notices = logging.getLogger("bitsandbytes.backends.cpu.ops")
    drop = logging.Filter()
    drop.filter = lambda record: not record.getMessage().startswith(_HUB_KERNEL_NOTICE)
    before = sys.modules.get("kernels", _ABSENT)
    sys.modules["kernels"] = None  # for this import, `from kernels import ...` raises ImportError
    notices.addFilter(drop)
    try:
        import bitsandbytes
    finally:
        notices.removeFilter(drop)
        if before is _ABSENT:
            del sys.modules["kernels"]
        else:
            sys.modules["kernels"] = before
    return bitsandbytes


def _bnb(purpose: str = "quantization"):
    try:
        bnb = import_bitsandbytes()
    except ImportError as e:
        raise ImportError(f"{purpose} needs bitsandbytes: pip install bitsandbytes") from e
    versions.require("bitsandbytes", bnb.__version__)
    return bnb


def guard_cpu_4bit(model: nn.Module) -> int:
    """Route every bitsandbytes 4-bit layer to the generic CPU kernel, away from the AVX512-BF16
    one (which crashes at some shapes, computes in bf16 and has no backward: the module's
    docstring), every one whose shape bitsandbytes' CPU dequantization scales wrongly
    (in_features not a multiple of the block size: silently wrong outputs) to fastflamingo's
    reference dequantization (:func:`fastflamingo.ops.nf4.linear4bit_forward`) for CPU inputs,
    and every one already repacked for that kernel to a forward that refuses to be
    differentiated. Returns the number of layers changed. A no-op (0) without bitsandbytes
    imported: nothing can hold its layers then."""
    if sys.modules.get("bitsandbytes") is None:
        return 0
    from .ops.nf4 import guard_cpu_forward
    bnb = _bnb()
    changed = 0
    for m in model.modules():
        if not isinstance(m, bnb.nn.Linear4bit):
            continue
        fixed = False
        if getattr(m, "support_avx512bf16_for_cpu", False):
            m.support_avx512bf16_for_cpu = False
            fixed = True
        changed += guard_cpu_forward(m) or fixed
    return changed


def _quantized_linear(linear: nn.Linear, quantization: str) -> nn.Module:
    bnb = _bnb()
    w = linear.weight.data
    has_bias = linear.bias is not None
    if quantization == "nf4":
        q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=has_bias, compute_dtype=w.dtype,
                              quant_type="nf4", device="meta")
        q.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", module=q)
        q.support_avx512bf16_for_cpu = False  # the module's docstring: bf16 compute, no backward
    else:
        q = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=has_bias, has_fp16_weights=False,
                                threshold=INT8_THRESHOLD, device="meta")
        q.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
    q.weight._quantize(w.device)
    if has_bias:
        q.bias = nn.Parameter(linear.bias.data, requires_grad=False)
    if quantization == "nf4":
        from .ops.nf4 import guard_cpu_forward
        guard_cpu_forward(q)  # bitsandbytes' CPU dequantization mis-scales some shapes
    return q.train(linear.training)


def _replace_linears(root: nn.Module, quantization: str, skip: set[int], frozen_only: bool) -> int:
    count = 0
    for name, child in list(root.named_children()):
        if id(child) in skip:
            continue
        # exactly nn.Linear: subclasses such as nn.MultiheadAttention's out_proj are read as raw weights
        if type(child) is nn.Linear and not (frozen_only and child.weight.requires_grad):
            setattr(root, name, _quantized_linear(child, quantization))
            count += 1
        else:
            count += _replace_linears(child, quantization, skip, frozen_only)
    return count


def check_quantization(quantization) -> None:
    """Refuse a ``quantization=`` value that is not ``"nf4"``, ``"int8"`` or None, naming it."""
    if quantization is not None and quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization={quantization!r} is not one of {QUANTIZATIONS} or None")


def quantize_model(model: nn.Module, quantization: str | None, *, vision: bool = False,
                   cross_attention: bool = False, fused: bool = False) -> nn.Module:
    """Quantize a :class:`~fastflamingo.Flamingo` model's frozen linear layers in place.

    Args:
        model: the model (its weights on the device they will run on: bitsandbytes quantizes there).
        quantization: ``"nf4"``, ``"int8"`` or None (no change).
        vision: also the vision encoder's linear layers.
        cross_attention: also the gated cross-attention blocks' layers, for inference only (they
            are what Flamingo trains): refused while ``model.training``.
        fused: NF4 only: on CUDA, inputs of at most 16 rows (decode steps) take fastflamingo's
            fused dequantize-matmul Triton kernel instead of bitsandbytes' own
            (:func:`fastflamingo.ops.nf4.use_fused_nf4`); other inputs and the CPU are unchanged.

    Returns:
        ``model``. The LM head, the embeddings, the resampler, and any LM layer that requires
        grad stay as they are.
    """
    if quantization is None:
        return model
    check_quantization(quantization)
    meta = next((name for name, p in model.named_parameters() if p.is_meta), None)
    if meta is not None:
        raise ValueError(f"quantize_model: parameter {meta} is on the meta device (no values to quantize); "
                         "load or build the model on the device it will run on ('cuda' or 'cpu') first")
    if cross_attention and model.training:
        raise ValueError("cross_attention=True quantizes the layers Flamingo trains: call model.eval() first "
                         "(quantize them for inference only; training keeps them in 16-bit)")
    if fused and quantization != "nf4":
        raise ValueError(f"fused=True is for NF4 weights; quantization={quantization!r}")
    if quantization == "int8":
        # bitsandbytes logs at every call that fp32/bf16 activations enter its int8 matmul as fp16
        logging.getLogger("bitsandbytes.autograd._functions").addFilter(_drop_int8_cast_notice)
    blocks = {id(b) for b in model.gated_cross_attn_layers}
    head = model.lang_encoder.get_output_embeddings()
    skip = blocks | ({id(head)} if head is not None else set())
    count = _replace_linears(model.lang_encoder, quantization, skip, frozen_only=True)
    if vision:
        count += _replace_linears(model.vision_encoder, quantization, set(), frozen_only=True)
    if cross_attention:
        for block in model.gated_cross_attn_layers:
            count += _replace_linears(block, quantization, set(), frozen_only=False)
    if count == 0:
        held = quantized_modules(model)
        if held:
            raise ValueError(f"quantize_model found no frozen nn.Linear layer to quantize: this model is already "
                             f"quantized ({len(held)} bitsandbytes layers, e.g. {held[0]}); build or load it "
                             f"again to quantize it another way")
        raise ValueError("quantize_model found no frozen nn.Linear layer to quantize in this model")
    if fused:
        from .ops.nf4 import use_fused_nf4
        use_fused_nf4(model)
    return model


def _nf4_parts(model: nn.Module) -> list[tuple[nn.Module, object]]:
    """(layer, dtype of its part) for every bitsandbytes 4-bit layer of a Flamingo model: its
    activations' dtype, read from a floating tensor a cast changes with them (a block's gate, the
    LM's input embeddings, :attr:`Flamingo.vision_encoder_dtype`)."""
    if sys.modules.get("bitsandbytes") is None:
        return []
    linear4bit = _bnb().nn.Linear4bit
    lm = model.lang_encoder.get_input_embeddings()
    parts = [(block, lambda block=block: block.attn_gate.dtype) for block in model.gated_cross_attn_layers]
    parts += [(model.vision_encoder, lambda: model.vision_encoder_dtype),
              (model.lang_encoder, lambda: None if lm is None else lm.weight.dtype)]
    seen, pairs = set(), []
    for part, dtype in parts:
        for m in part.modules():
            if isinstance(m, linear4bit) and id(m) not in seen:
                seen.add(id(m))
                pairs.append((m, dtype))
    return pairs


@contextlib.contextmanager
def nf4_compute_follows_cast(model: nn.Module):
    """Around a cast of a Flamingo model (``model.to(torch.bfloat16)``, ``.half()``): every NF4
    layer that computed in its part's dtype before computes in the part's new dtype after
    (bitsandbytes fixes a layer's compute dtype when it is made: an fp32-quantized model cast to
    bf16 kept dequantizing and multiplying in fp32). A layer given another compute dtype
    (transformers' ``bnb_4bit_compute_dtype``) keeps it."""
    followers = [(m, dtype) for m, dtype in _nf4_parts(model)
                 if m.compute_dtype is not None and m.compute_dtype == dtype()]
    yield
    for m, dtype in followers:
        new = dtype()
        if new is None or new == m.compute_dtype:
            continue
        m.compute_dtype = new
        state = getattr(m.weight, "quant_state", None)
        if state is not None:
            state.dtype = new  # what dequantization returns: as if quantized at this dtype


def quantized_modules(model: nn.Module) -> list[str]:
    """Names of the bitsandbytes 4- and 8-bit layers in ``model`` (none where bitsandbytes was never
    imported)."""
    return _bnb_modules(model, "Linear4bit", "Linear8bitLt")


def int8_modules(model: nn.Module) -> list[str]:
    """Names of the bitsandbytes int8 (``Linear8bitLt``) layers in ``model``."""
    return _bnb_modules(model, "Linear8bitLt")


def _bnb_modules(model: nn.Module, *classes: str) -> list[str]:
    if sys.modules.get("bitsandbytes") is None:
        return []
    kinds = tuple(getattr(_bnb().nn, c) for c in classes)
    return [name for name, m in model.named_modules() if isinstance(m, kinds)]


def model_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers, quantization statistics included."""
    seen, total = set(), 0
    tensors = list(model.parameters()) + list(model.buffers())
    for m in model.modules():
        state = getattr(getattr(m, "weight", None), "quant_state", None)
        if state is not None:  # 4-bit: absmax (and nested statistics), code book
            tensors += [t for t in state.as_dict(packed=True).values() if torch.is_tensor(t)]
        scb = getattr(getattr(m, "weight", None), "SCB", None)
        if torch.is_tensor(scb):
            tensors.append(scb)
    for t in tensors:
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total
