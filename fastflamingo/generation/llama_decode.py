"""A LLaMA LM's eager prefill and decode step, without Hugging Face's per-call machinery.

At the sizes where a decode step is not bound by its matrix products (a small model, a CPU, any
model's uncompiled step on a GPU), Hugging Face's ``LlamaForCausalLM.forward`` spends a third of
the step on Python around the tensor work: the causal mask built by ``create_causal_mask``, the
output-capturing, kwargs-merging and argument-renaming wrappers of every model and layer call,
the module calls and module attribute reads themselves. :class:`LeanLlama`'s ``decode`` (one
token per row) and ``prefill`` (the prompt) compute the same operations in the same order: the
embedding and rotary embedding modules; per layer the cross-attention block (bound once:
:mod:`.lean_blocks`), the RMSNorms (``LlamaRMSNorm.forward``'s operations), the q/k/v
projections, ``apply_rotary_pos_emb``'s products and sum (its ``rotate_half`` as a roll, the
sign carried by the sines: exact), the cache's ``update``, Hugging Face's own SDPA attention
function, the output projection and the MLP; the final norm, and the LM head for the last
position only. Their logits are the Hugging Face forward's, bit for bit on the CPU
(tests/test_llama_decode.py). The decode step's mask is the key-padding mask of one new token per
row on a static cache, made from the session's attention mask (what Hugging Face builds there);
otherwise, as for the prompt, Hugging Face's ``create_causal_mask``, called as
``LlamaModel.forward`` calls it (a dynamic cache without padding gets no mask from it).

:class:`~fastflamingo.generation.session.Session` uses them for its prefill and uncompiled steps
where :func:`supports` says so; the compiled step traces Hugging Face's forward, whose overhead
tracing removes.
"""
from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn

from ..lm import FlamingoLayer
from .lean_blocks import bound_block, bound_linear


def _silu_types() -> tuple[type, ...]:
    try:
        from transformers.activations import SiLUActivation
    except ImportError:
        return (nn.SiLU,)
    return (nn.SiLU, SiLUActivation)


_SILU = _silu_types()  # activations whose forward is F.silu


def supports(lm: nn.Module) -> bool:
    """Whether :class:`LeanLlama` computes ``lm``'s forward (its ``prefill`` also needs
    :func:`knows_prompt_mask`): Hugging Face's ``LlamaForCausalLM`` with its own layer classes
    (no subclass that could change them: FSDP2's sharded layers are one), SDPA attention, and
    nothing attached to the calls the step skips (the model's, the decoder layers', their
    attention, norms and MLPs', the plain linear layers'): no hooks there and no accelerate hooks
    anywhere (a model placed with ``device_map`` moves weights and tensors around module calls)."""
    try:
        from transformers.models.llama.modeling_llama import (LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM,
                                                              LlamaMLP, LlamaRMSNorm)
    except ImportError:
        return False
    if type(lm) is not LlamaForCausalLM or getattr(lm.config, "_attn_implementation", None) != "sdpa":
        return False
    layers = lm.model.layers
    decoders = [f.decoder_layer for f in layers]
    if not all(type(f) is FlamingoLayer for f in layers) or not all(
            type(d) is LlamaDecoderLayer and type(d.self_attn) is LlamaAttention and type(d.mlp) is LlamaMLP
            and type(d.input_layernorm) is LlamaRMSNorm and type(d.post_attention_layernorm) is LlamaRMSNorm
            for d in decoders) or type(lm.model.norm) is not LlamaRMSNorm:
        return False
    skipped = [lm, lm.model, lm.model.norm, *layers, *decoders]
    for d in decoders:
        skipped += [d.self_attn, d.mlp, d.mlp.act_fn, d.input_layernorm, d.post_attention_layernorm]
    skipped += [m for m in lm.modules() if type(m) is nn.Linear]  # called through F.linear
    if any(m._forward_hooks or m._forward_pre_hooks or "forward" in m.__dict__ for m in skipped):
        return False
    return not any("_hf_hook" in m.__dict__ for m in lm.modules())  # (hasattr: 0.5 ms a call)


_BUILDER: list = []


def knows_prompt_mask() -> bool:
    """Whether :meth:`LeanLlama.prefill` can build the prompt's mask as this transformers version does."""
    return _causal_mask_builder() is not None


def _causal_mask_builder():
    """``(config, embeds, attention_mask, cache, position_ids) -> mask`` calling transformers'
    ``create_causal_mask`` with the keywords of this version (``cache``, formerly
    ``past_key_values``), or None where its signature is not one of those known (older versions
    also took ``cache_position``): the prefill then keeps Hugging Face's forward."""
    if not _BUILDER:
        try:
            from transformers.masking_utils import create_causal_mask
            params = inspect.signature(create_causal_mask).parameters
        except (ImportError, TypeError, ValueError):
            params, create_causal_mask = {}, None
        cache_arg = next((n for n in ("cache", "past_key_values") if n in params), None)
        known = {"config", "inputs_embeds", "attention_mask", "position_ids", cache_arg}
        required = {n for n, p in params.items() if p.default is inspect.Parameter.empty}
        ok = cache_arg is not None and "position_ids" in params and required <= known
        _BUILDER.append((lambda config, embeds, mask, cache, positions: create_causal_mask(
            config=config, inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
            **{cache_arg: cache})) if ok else None)
    return _BUILDER[0]


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``LlamaRMSNorm.forward``: the same operations in the same order (its casts to fp32 and back
    skipped where they are no-ops)."""
    dtype = x.dtype
    h = x if dtype == torch.float32 else x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True).add_(eps))
    return weight * (h if dtype == torch.float32 else h.to(dtype))


def _rotary(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, signed sin) (B, 1, T, D) from the rotary embedding's (B, T, D), such that
    ``apply_rotary_pos_emb``'s ``x * cos + rotate_half(x) * sin`` is
    ``x * cos + x.roll(D // 2, -1) * signed_sin``, equal bit for bit (rotate_half negates the
    first half, which here the sines carry: an exact sign flip), in 4 operations instead of 7,
    with the unsqueezes done once for every layer."""
    half = sin.shape[-1] // 2
    return cos.unsqueeze(1), torch.cat((-sin[..., :half], sin[..., half:]), dim=-1).unsqueeze(1)


class LeanLlama:
    """The prefill and decode step of one LLaMA LM that :func:`supports` accepts, with what they
    read from its modules looked up once, when a session starts (a module attribute costs ~0.5 us
    and a step reads ~150 of them).

    Both methods take ``(lm, input_ids, kwargs)``, as the session's other decode functions, and
    return the last position's logits (B, V) in fp32, as
    ``lm(input_ids=input_ids, **kwargs).logits[:, -1].float()``, filling the cache. ``kwargs``:
    :meth:`fastflamingo.generation.lm_cache.LMCall.kwargs`: the KV cache (under ``cache`` or
    ``past_key_values``), ``attention_mask`` (B, S) over the cache's slots, 1 exactly where a slot
    holds a token of the row (the new ones included), and ``position_ids`` (B, T). Both need
    :func:`knows_prompt_mask`, except ``decode`` on a static cache.
    """

    def __init__(self, lm: nn.Module):
        model = lm.model
        self.config, self.embed, self.rotary = model.config, model.embed_tokens, model.rotary_emb
        self.norm = (model.norm.weight, model.norm.variance_epsilon)
        self.head = bound_linear(lm.lm_head)
        self.layers = []
        for f in model.layers[:lm.config.num_hidden_layers]:
            d = f.decoder_layer
            a, mlp = d.self_attn, d.mlp
            self.layers.append((
                bound_block(f.gated_cross_attn_layer), f._media,
                (d.input_layernorm.weight, d.input_layernorm.variance_epsilon),
                bound_linear(a.q_proj), bound_linear(a.k_proj), bound_linear(a.v_proj), a, a.head_dim, a.scaling,
                a.attention_dropout if a.training else 0.0, bound_linear(a.o_proj),
                (d.post_attention_layernorm.weight, d.post_attention_layernorm.variance_epsilon),
                bound_linear(mlp.gate_proj), bound_linear(mlp.up_proj), bound_linear(mlp.down_proj),
                F.silu if type(mlp.act_fn) in _SILU else mlp.act_fn))

    def decode(self, lm: nn.Module, input_ids: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """One new token per row: ``input_ids`` (B, 1)."""
        if input_ids.shape[1] != 1:
            raise ValueError(f"decode takes one new token per row, got input_ids {tuple(input_ids.shape)}")
        return self._forward_last(input_ids, kwargs, prompt=False)

    def prefill(self, lm: nn.Module, input_ids: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """The prompt ``input_ids`` (B, T), where :func:`knows_prompt_mask`."""
        return self._forward_last(input_ids, kwargs, prompt=True)

    def _forward_last(self, input_ids: torch.Tensor, kwargs: dict, prompt: bool) -> torch.Tensor:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        cache = kwargs["cache"] if "cache" in kwargs else kwargs["past_key_values"]
        hidden = self.embed(input_ids)
        if prompt or not getattr(cache, "is_compileable", False):
            # Hugging Face's own mask, which may be none at all (then SDPA takes another path)
            mask = _causal_mask_builder()(self.config, hidden, kwargs["attention_mask"], cache,
                                          kwargs["position_ids"])
        else:
            # a static cache's decode step: Hugging Face always builds the mask then (no skip for
            # compileable caches at one query), and for one query per row the causal mask is the
            # key-padding mask, every slot that holds a token: made here directly (~35 us less)
            mask = kwargs["attention_mask"][:, None, None, :].bool()
        cos, sin = _rotary(*self.rotary(hidden, kwargs["position_ids"]))
        half = cos.shape[-1] // 2
        B, T = input_ids.shape
        for i, (block, media, norm_in, q_proj, k_proj, v_proj, attn, head_dim, scaling, dropout, o_proj,
                norm_post, gate, up, down, act) in enumerate(self.layers):
            if block is not None:
                hidden = block(hidden, media)
            x = _rms_norm(hidden, *norm_in)
            q = q_proj(x).view(B, T, -1, head_dim).transpose(1, 2)
            k = k_proj(x).view(B, T, -1, head_dim).transpose(1, 2)
            v = v_proj(x).view(B, T, -1, head_dim).transpose(1, 2)
            q = q * cos + q.roll(half, -1) * sin
            k = k * cos + k.roll(half, -1) * sin
            k, v = cache.update(k, v, i)
            out, _ = sdpa_attention_forward(attn, q, k, v, mask, scaling=scaling, dropout=dropout)
            hidden = hidden + o_proj(out.reshape(B, T, -1))
            x = _rms_norm(hidden, *norm_post)
            hidden = hidden + down(act(gate(x)) * up(x))
        # as LlamaForCausalLM with logits_to_keep=1: the final norm of every position (its reduction
        # may be split differently for fewer rows on a GPU), the head of the last one's view
        return self.head(_rms_norm(hidden, *self.norm)[:, -1:, :])[:, -1].float()
