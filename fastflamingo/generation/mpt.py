"""MPT (OpenFlamingo-3B/9B's LM) with Hugging Face's ``StaticCache`` and a compiled decode step.

Why Hugging Face's MPT does not compile with a static cache (``MptAttention.forward``): MPT's
ALiBi bias is one (H, 1, max_seq_len) table, ``(j - max_seq_len + 1) * slope`` for key j, built
for the whole context and sliced down to the keys at hand::

    query_length = seq_length + cache.get_seq_length()
    position_bias = position_bias[:, max(0, 1 - query_length):, max(0, max_seq_len - key_length):]

A ``StaticCache`` counts its tokens in a tensor (``StaticLayer.cumulative_length``: a Python int
would be a new constant, hence a recompilation, at every step), so ``query_length`` is a tensor and
the slice start a data-dependent value: dynamo calls ``.item()`` and breaks the graph, and as the
break is inside the loop over blocks it gives up on ``MptModel.forward``, which runs as Python
around small compiled pieces: no single graph to CUDA-graph (measured on the tests' 4-layer MPT,
first decode step: 24 frames, 11 graphs, 10 graph breaks; later steps add none. With this module:
1 frame, 1 graph, no recompilation on later steps or later prompts of the same shape).

The static buffer also changes what the slice means: ``key_length`` is the buffer's length, not
the number of tokens held, so Hugging Face's bias of key j becomes ``(j - S_max + 1) * slope``
instead of ``(j - length + 1) * slope``: the same softmax in exact arithmetic (a constant per row),
other roundings in floating point. The mask needs nothing: ``create_causal_mask`` reads the static
cache's tensor offset, as for the other families.

The fix is per instance (the class and other instances are untouched): each ``MptAttention`` of
the LM gets a ``forward`` that, for a static cache, computes the bias of the keys held from the
tensor length, ``bias[j] = (j - length + 1) * slope`` over the whole buffer (fixed shape, no
slicing: keys past ``length`` are masked anyway), bitwise the values Hugging Face's slice gives
for those keys; every other call (no cache, ``DynamicCache``) runs the original forward, so plain
forwards of the LM are unchanged. The rest of the attention is Hugging Face's code, line by line.
"""
from __future__ import annotations

import types

import torch
from torch import nn


def _attention_class():
    try:
        from transformers.models.mpt.modeling_mpt import MptAttention
    except ImportError:  # a transformers without MPT
        return None
    return MptAttention


def prepare_static(lm: nn.Module) -> bool:
    """Make an MPT LM's attention layers work with a ``StaticCache`` under ``torch.compile``.
    Idempotent. False, and nothing done, for any other LM, and for an MPT whose attention
    layers already have an instance ``forward`` of someone else's (a hook this one would drop):
    that LM keeps the dynamic cache."""
    cls = _attention_class()
    layers = [m for m in lm.modules() if cls is not None and isinstance(m, cls)]
    if not layers or any("forward" in m.__dict__ and not getattr(m, "_fastflamingo_static", False) for m in layers):
        return False
    for attn in layers:
        # a bound method in the instance dict: a deepcopy of the module rebinds it to the copy
        attn.forward = types.MethodType(forward, attn)
        attn._fastflamingo_static = True
    return True


def alibi_bias(position_bias: torch.Tensor, key_length: int, length: torch.Tensor | int) -> torch.Tensor:
    """(H, 1, key_length) ALiBi bias of the first ``key_length`` keys when ``length`` tokens are held:
    ``(j - length + 1) * slope``, the values of Hugging Face's table slice for keys ``j < length``.

    ``position_bias`` is Hugging Face's (H, 1, max_seq_len) table, ``(int j - max_seq_len + 1) * slope``
    in fp32: its next-to-last column is exactly ``-slope``, and an int offset times the slope
    rounds as the table's own entries do."""
    slopes = -position_bias[:, :, -2:-1]
    offsets = torch.arange(key_length, device=position_bias.device) - (length - 1)
    return offsets * slopes


def forward(self, hidden_states: torch.Tensor, position_bias: torch.Tensor, cache=None,
            attention_mask: torch.Tensor | None = None, **kwargs):
    """``MptAttention.forward`` (transformers 5.x) with the static-cache ALiBi of :func:`alibi_bias`;
    any call without a static cache runs the original forward. transformers before the rename
    (5.1x, e.g. 5.17) passes the cache as ``past_key_values``: taken under either name."""
    name = "cache"
    if cache is None and "past_key_values" in kwargs:
        name, cache = "past_key_values", kwargs.pop("past_key_values")
    if cache is None or not getattr(cache, "is_compileable", False):
        return type(self).forward(self, hidden_states, position_bias, attention_mask=attention_mask,
                                  **{name: cache}, **kwargs)
    batch_size, seq_length = hidden_states.shape[:2]
    mixed_qkv = self.Wqkv(hidden_states)
    if self.clip_qkv:
        mixed_qkv = mixed_qkv.clamp(min=-self.clip_qkv, max=self.clip_qkv)
    query_states, key_states, value_states = (t.reshape(batch_size, seq_length, self.n_heads, self.head_dim)
                                              .transpose(1, 2) for t in mixed_qkv.chunk(3, dim=2))
    key_states, value_states = cache.update(key_states, value_states, self.layer_idx)
    attention_scores = torch.matmul(query_states, key_states.transpose(-1, -2)) * self.softmax_scale
    if position_bias is not None:
        length = cache.get_seq_length(self.layer_idx)  # a tensor: tokens held, this call's included
        attention_scores = attention_scores + alibi_bias(position_bias, key_states.shape[-2], length)
    if attention_mask is not None:
        attention_scores = attention_scores.masked_fill(attention_mask, torch.finfo(query_states.dtype).min)
    attn_weights = nn.functional.softmax(attention_scores.float(), dim=-1).to(value_states.dtype)
    attn_weights = nn.functional.dropout(attn_weights, p=self.attn_dropout_p, training=self.training)
    context_states = torch.matmul(attn_weights, value_states)
    context_states = context_states.permute(0, 2, 1, 3).contiguous().view(batch_size, seq_length, -1)
    return self.out_proj(context_states), attn_weights
