"""MPT (OpenFlamingo-3B/9B's LM): its attention as one fused SDPA call, in every forward.

Hugging Face's ``MptAttention`` (transformers 5.x) is eager: ``q·kᵀ`` in the input dtype, plus the
ALiBi bias (which promotes the scores to fp32), ``masked_fill``, softmax in fp32, ``·v``: five
passes over a (B, H, T, S) tensor, and in training it keeps the fp32 attention weights of every
layer for the backward. :func:`prepare` gives each ``MptAttention`` of one LM *instance* a
:func:`forward` that computes the same attention with ``F.scaled_dot_product_attention`` (the
memory-efficient kernel on CUDA, which takes an additive bias and saves no weights; the fused
kernel on the CPU): the ALiBi bias and the mask folded into one additive mask, built once per LM
forward and shared by its layers. The class and other instances are untouched; :func:`restore`
puts Hugging Face's forward back. Reference: Hugging Face's forward itself (tests/test_mpt.py).

ALiBi, relative to the query. Hugging Face adds ``(j - S + 1)·slope`` to the score of key j (S keys
held), the same for every query: the softmax of a row does not change when a constant is added to
it, so this module adds ``(p_j - p_i)·slope`` instead, with p_i the query's own position. The two
differ by a per-row constant (same softmax in exact arithmetic) wherever the padding comes before
every token, as left padding does. Positions count tokens, not padding (a key's is the number of
tokens up to it): Hugging Face counts slots, so padding *between* tokens (a few-shot prefix's K/V
followed by a left-padded query: the layout of :mod:`fastflamingo.generation`'s sessions) would
move the prefix further from the query by the row's padding, and a query's scores would depend on
the other queries of its batch. Counted as tokens, the query sees the prefix as if written right
before it, as open_flamingo's evaluation writes its demonstrations. The relative form keeps the bias
of the keys that matter (near the query) small, so it survives the cast of the mask to bf16 / fp16
that SDPA requires (``-1023.5`` in bf16 would be off by up to 4; ``-3.5`` is exact). Masked pairs
get ``finfo(dtype).min``, Hugging Face's ``masked_fill`` value, so a fully masked row (a left-pad
query) averages the values uniformly as Hugging Face's does, rather than giving NaN.

Hugging Face's ``StaticCache`` under ``torch.compile`` (the compiled decode step). Its MPT slices an
(H, 1, max_seq_len) ALiBi table down to the keys at hand with a start computed from the cache's
length, a tensor there (``StaticLayer.cumulative_length``: a Python int would be a new constant,
hence a recompilation, at every step): dynamo calls ``.item()`` and breaks the graph, inside the
loop over blocks, so ``MptModel.forward`` ran as Python around small compiled pieces (measured on
the tests' 4-layer MPT: 24 frames, 11 graphs, 10 graph breaks). Here the bias is computed from the
length tensor over the whole buffer (fixed shape, no slicing; keys past the length are masked by
the causal mask): one graph, no recompilation on later steps or prompts of the same shape.

``output_attentions``: SDPA forms no attention weights, so an LM forward that asks for them raises
(a pre-hook on the ``MptModel``) and says to call :func:`restore` first.
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

from .tensor_cache import SharedByTensors

__all__ = ["prepare", "restore", "forward", "attention_bias", "is_prepared"]


def _classes():
    try:
        from transformers.models.mpt.modeling_mpt import MptAttention, MptModel
    except ImportError:  # a transformers without MPT
        return None, None
    return MptAttention, MptModel


def _layers(lm: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    attn_cls, model_cls = _classes()
    if attn_cls is None:
        return [], []
    mods = list(lm.modules())
    return [m for m in mods if isinstance(m, attn_cls)], [m for m in mods if isinstance(m, model_cls)]


def _ours(attn: nn.Module) -> bool:
    return getattr(attn.__dict__.get("forward"), "__func__", None) is forward


def is_prepared(lm: nn.Module) -> bool:
    """Whether every MPT attention layer of ``lm`` runs :func:`forward`."""
    attns, _ = _layers(lm)
    return bool(attns) and all(_ours(m) for m in attns)


def prepare(lm: nn.Module) -> bool:
    """Give every ``MptAttention`` of ``lm`` the SDPA :func:`forward`. Idempotent. Returns False,
    and does nothing, for any other LM and for an MPT whose attention layers already have an
    instance ``forward`` of someone else's (a hook this one would drop)."""
    attns, models = _layers(lm)
    if not attns or any("forward" in m.__dict__ and not _ours(m) for m in attns):
        return False
    for attn in attns:
        # a bound method in the instance dict: a deepcopy of the module rebinds it to the copy
        attn.forward = types.MethodType(forward, attn)
    for model in models:
        if getattr(model, "_fastflamingo_sdpa_hook", None) is None:
            model._fastflamingo_sdpa_hook = model.register_forward_pre_hook(_refuse_attention_weights,
                                                                            with_kwargs=True)
    return True


def restore(lm: nn.Module) -> None:
    """Hugging Face's own attention forward back on every MPT attention layer of ``lm``."""
    attns, models = _layers(lm)
    for attn in attns:
        if _ours(attn):
            del attn.forward
    for model in models:
        hook = getattr(model, "_fastflamingo_sdpa_hook", None)
        if hook is not None:
            hook.remove()
            model._fastflamingo_sdpa_hook = None


def _refuse_attention_weights(module, args, kwargs):
    want = kwargs.get("output_attentions")
    if want is None:
        want = getattr(module.config, "output_attentions", False)
    if want:
        raise ValueError("output_attentions=True: fastflamingo runs this MPT's attention with "
                         "scaled_dot_product_attention, which forms no attention weights. Call "
                         "fastflamingo.mpt.restore(model.lang_encoder) for Hugging Face's eager "
                         "attention (it returns them), or pass output_attentions=False.")


def attention_bias(position_bias: torch.Tensor, mask: torch.Tensor | None, q_len: int, k_len: int,
                   length: torch.Tensor | int, dtype: torch.dtype) -> torch.Tensor:
    """The additive SDPA mask, (B or 1, H, q_len, k_len) in ``dtype``.

    Args:
        position_bias: Hugging Face's (H, 1, max_seq_len) fp32 ALiBi table,
            ``(j - max_seq_len + 1)·slope``: its next-to-last column is exactly ``-slope``.
        mask: (B, 1, q_len, k_len) bool, True where a pair may not attend, or None (no mask, as
            Hugging Face's attention does without one).
        length: tokens held once this call's keys are written (an int, or the static cache's
            tensor): the queries sit in slots ``length - q_len .. length - 1``.
    """
    device = position_bias.device
    slopes = -position_bias[:, :, -2:-1]                                    # (H, 1, 1)
    query_slots = torch.arange(q_len, device=device) + (length - q_len)
    if mask is None:  # no padding: a token's position is its slot
        offsets = torch.arange(k_len, device=device)[None, :] - query_slots[:, None]  # (q_len, k_len)
        return (offsets * slopes).unsqueeze(0).to(dtype)
    # a token's position counts the tokens before it, not the padding: the keys the last query may
    # see are every token held (causality hides nothing from it), so their running count is each
    # key's position; the queries' are those of their own slots
    key_pos = (~mask[:, 0, -1, :]).cumsum(-1)                               # (B, k_len)
    query_pos = key_pos[:, query_slots]                                     # (B, q_len)
    offsets = key_pos[:, None, :] - query_pos[:, :, None]                   # (B, q_len, k_len)
    bias = offsets[:, None].to(slopes.dtype) * slopes                       # (B, H, q_len, k_len) fp32
    return bias.masked_fill(mask, torch.finfo(dtype).min).to(dtype)


# one LM forward builds its mask once: the layers get the same (mask, ALiBi table) objects
_SHARED = SharedByTensors()


def _shared_bias(position_bias, mask, q_len, k_len, length, dtype):
    if torch.compiler.is_compiling() or not isinstance(length, int):
        # compiled: inductor fuses it into the step; a tensor length (a static cache run eagerly):
        # reading it would be a host sync per layer
        return attention_bias(position_bias, mask, q_len, k_len, length, dtype)
    return _SHARED.get((q_len, k_len, length, dtype), (position_bias, mask),
                       lambda: attention_bias(position_bias, mask, q_len, k_len, length, dtype))


def forward(self, hidden_states: torch.Tensor, position_bias: torch.Tensor | None, cache=None,
            attention_mask: torch.Tensor | None = None, **kwargs):
    """``MptAttention.forward`` with SDPA (see the module docstring). transformers before the
    rename (5.1x, e.g. 5.17) passes the cache as ``past_key_values``: taken under either name.
    Returns (output, None): no attention weights (a forward asking for them was refused)."""
    if cache is None and "past_key_values" in kwargs:
        cache = kwargs.pop("past_key_values")
    if position_bias is not None and position_bias.dim() != 3:
        raise ValueError(f"Expecting position_bias shape to be 3 dimensions, got {position_bias.dim()}")
    batch_size, seq_length = hidden_states.shape[:2]
    mixed_qkv = self.Wqkv(hidden_states)
    if self.clip_qkv:
        mixed_qkv = mixed_qkv.clamp(min=-self.clip_qkv, max=self.clip_qkv)
    query_states, key_states, value_states = (t.reshape(batch_size, seq_length, self.n_heads, self.head_dim)
                                              .transpose(1, 2) for t in mixed_qkv.chunk(3, dim=2))
    if cache is not None:
        key_states, value_states = cache.update(key_states, value_states, self.layer_idx)
    k_len = key_states.shape[-2]
    if getattr(cache, "is_compileable", False):
        length = cache.get_seq_length(self.layer_idx)  # a tensor: tokens held, this call's included
    else:
        length = k_len
    if position_bias is not None:
        bias = _shared_bias(position_bias, attention_mask, seq_length, k_len, length, query_states.dtype)
    elif attention_mask is not None:
        bias = torch.zeros((), dtype=query_states.dtype, device=query_states.device).masked_fill(
            attention_mask, torch.finfo(query_states.dtype).min)
    else:
        bias = None
    context = F.scaled_dot_product_attention(query_states, key_states, value_states, attn_mask=bias,
                                             dropout_p=self.attn_dropout_p if self.training else 0.0,
                                             scale=self.softmax_scale)
    context = context.transpose(1, 2).reshape(batch_size, seq_length, -1)
    return self.out_proj(context), None
