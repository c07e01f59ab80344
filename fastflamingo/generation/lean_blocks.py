"""The gated cross-attention blocks' forward for a decode session, with their weights bound once.

A decode step of a small model is bound by Python around its tensor work, not by the work: each
module call costs ~1.5 us and each module attribute read ~0.5 us, and a block's forward does ~10
of the first and ~30 of the second. :func:`bound_block` returns a function equal to
``block.forward`` (bit for bit: the same operations in the same order; tests/test_lean_blocks.py)
that reads the block's parameters and settings once, when the session starts: norms and linear
layers run as their functional calls, ``tanh`` of the gates is taken once. Blocks that are not
exactly :mod:`fastflamingo.blocks`' own (hooks, replaced submodules) are called as they are.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from ..blocks import (GatedCrossAttentionBlock, IdeficsCrossAttention, IdeficsGatedCrossAttentionBlock,
                      MaskedCrossAttention, RMSNorm, SwiGLU, _attend_to_media, _heads, rms_norm)


def bound_linear(proj: nn.Module):
    """``proj`` as a callable: for a plain ``nn.Linear`` its forward's one call with its weight and
    bias bound (no module call, no attribute reads); other layers (quantized ones) as they are."""
    if type(proj) is nn.Linear:
        return functools.partial(F.linear, weight=proj.weight, bias=proj.bias)
    return proj


def _rms_norm(norm: RMSNorm):
    return functools.partial(rms_norm, weight=norm.weight, eps=norm.variance_epsilon)


def _layer_norm(norm: nn.LayerNorm):
    return functools.partial(F.layer_norm, normalized_shape=norm.normalized_shape, weight=norm.weight,
                             bias=norm.bias, eps=norm.eps)


def _only_own_modules(block: nn.Module) -> bool:
    """No hooks anywhere in the block, no forward replaced, and every submodule of the type its
    forward expects; a linear layer may be quantized (a subclass): that one is called as a module,
    its own forward and hooks included."""
    expected = {GatedCrossAttentionBlock: (MaskedCrossAttention, nn.Sequential, nn.LayerNorm, nn.GELU, nn.Linear),
                IdeficsGatedCrossAttentionBlock: (IdeficsCrossAttention, SwiGLU, RMSNorm, nn.Linear)}[type(block)]
    for m in block.modules():
        if isinstance(m, nn.Linear) and type(m) is not nn.Linear:
            continue
        if m._forward_hooks or m._forward_pre_hooks or "forward" in m.__dict__:
            return False
        if m is not block and type(m) not in expected:
            return False
    return True


def bound_block(block: nn.Module | None):
    """A function ``(x, media) -> x`` equal to ``block(x, media)`` for a session's decode, or the
    block itself where it is not exactly fastflamingo's (then it is called as a module); None for None."""
    if block is None or type(block) not in (GatedCrossAttentionBlock, IdeficsGatedCrossAttentionBlock) \
            or block.training or not _only_own_modules(block):
        return block
    with torch.no_grad():
        if type(block) is IdeficsGatedCrossAttentionBlock:
            return _idefics_block(block)
        return _open_flamingo_block(block)


def _idefics_block(block: IdeficsGatedCrossAttentionBlock):
    ca, mlp = block.cross_attn, block.mlp
    norm_in, norm_post = _rms_norm(block.input_layernorm), _rms_norm(block.post_attention_layernorm)
    q_proj, o_proj = bound_linear(ca.q_proj), bound_linear(ca.o_proj)
    q_norm = _rms_norm(ca.q_layer_norm) if ca.qk_layer_norms else None
    gate, up, down = bound_linear(mlp.gate_proj), bound_linear(mlp.up_proj), bound_linear(mlp.down_proj)
    gate_attn, gate_dense = torch.tanh(block.alpha_cross_attn), torch.tanh(block.alpha_dense)
    heads = ca.heads

    def forward(x: torch.Tensor, media) -> torch.Tensor:
        if media.visual is not None:
            q = _heads(q_proj(norm_in(x)), heads)
            if q_norm is not None:
                q = q_norm(q)
            x = x + gate_attn * o_proj(_attend_to_media(ca, q, media))
        h = norm_post(x)
        return x + gate_dense * down(F.silu(gate(h)) * up(h))
    return forward


def _open_flamingo_block(block: GatedCrossAttentionBlock):
    attn = block.attn
    if len(block.ff) != 4 or type(block.ff[2]) is not nn.GELU or block.ff[2].approximate != "none":
        return block
    norm, to_q, to_out = _layer_norm(attn.norm), bound_linear(attn.to_q), bound_linear(attn.to_out)
    ff_norm, ff_in, ff_out = _layer_norm(block.ff[0]), bound_linear(block.ff[1]), bound_linear(block.ff[3])
    gate_attn, gate_ff = block.attn_gate.tanh(), block.ff_gate.tanh()
    heads = attn.heads

    def forward(x: torch.Tensor, media) -> torch.Tensor:
        if media.visual is not None:
            x = to_out(_attend_to_media(attn, _heads(to_q(norm(x)), heads), media)) * gate_attn + x
        return ff_out(F.gelu(ff_in(ff_norm(x)))) * gate_ff + x
    return forward
