"""The eager decode step of a LLaMA LM, without Hugging Face's per-call machinery.

At the sizes where a decode step is not bound by its matrix products (a small model, a CPU, any
model's uncompiled step on a GPU), Hugging Face's ``LlamaForCausalLM.forward`` spends a third of
the step on Python around the tensor work: the causal mask built by ``create_causal_mask``, the
output-capturing, kwargs-merging and argument-renaming wrappers of every model and layer call.
:func:`decode` runs the same modules and functions in the same order (embedding, rotary
embedding, per layer the cross-attention block, the norms, the q/k/v projections,
``apply_rotary_pos_emb``, the cache's ``update``, Hugging Face's own SDPA attention function, the
output projection and the MLP; the final norm and the LM head), so its logits are the Hugging Face
forward's (bit for bit on the CPU: tests/test_llama_decode.py), with the key-padding mask of one
new token per row made directly from the session's attention mask.

:class:`~fastflamingo.generation.session.Session` uses it for its uncompiled steps where
:func:`supports` says so; the compiled step traces Hugging Face's forward, whose overhead
tracing removes.
"""
from __future__ import annotations

import torch
from torch import nn

from ..lm import FlamingoLayer


def supports(lm: nn.Module) -> bool:
    """Whether :func:`decode` computes ``lm``'s forward: Hugging Face's ``LlamaForCausalLM`` with
    its own layer classes (no subclass that could change them: FSDP2's sharded layers are one),
    SDPA attention, and nothing attached to the calls the step skips (the model's, the decoder
    layers', the attention modules'): no hooks there and no accelerate hooks anywhere (a model placed
    with ``device_map`` moves weights and tensors around module calls)."""
    try:
        from transformers.models.llama.modeling_llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM
    except ImportError:
        return False
    if type(lm) is not LlamaForCausalLM or getattr(lm.config, "_attn_implementation", None) != "sdpa":
        return False
    layers = lm.model.layers
    if not all(type(f) is FlamingoLayer and type(f.decoder_layer) is LlamaDecoderLayer
               and type(f.decoder_layer.self_attn) is LlamaAttention for f in layers):
        return False
    skipped = [lm, lm.model, *layers, *(f.decoder_layer for f in layers),
               *(f.decoder_layer.self_attn for f in layers)]
    if any(m._forward_hooks or m._forward_pre_hooks or "forward" in m.__dict__ for m in skipped):
        return False
    return not any("_hf_hook" in m.__dict__ for m in lm.modules())  # (hasattr: 0.5 ms a call)


def decode(lm: nn.Module, input_ids: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """One token per row through ``lm`` (a LLaMA that :func:`supports` accepts); returns the new
    logits (B, V) in fp32, as ``lm(input_ids=input_ids, **kwargs).logits[:, -1].float()``.

    Args:
        input_ids: (B, 1) the new tokens.
        kwargs: :meth:`fastflamingo.generation.lm_cache.LMCall.kwargs` of a decode step: the KV
            cache (under ``cache`` or ``past_key_values``), ``attention_mask`` (B, S) over the
            cache's slots, 1 exactly where a slot holds a token of the row (the new one included),
            and ``position_ids`` (B, 1).
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    if input_ids.shape[1] != 1:
        raise ValueError(f"decode takes one new token per row, got input_ids {tuple(input_ids.shape)}")
    cache = kwargs["cache"] if "cache" in kwargs else kwargs["past_key_values"]
    model = lm.model
    hidden = model.embed_tokens(input_ids)
    cos, sin = model.rotary_emb(hidden, kwargs["position_ids"])
    # one query per row sees every slot that holds a token: the key-padding mask is the causal mask
    mask = kwargs["attention_mask"][:, None, None, :].bool()
    B = input_ids.shape[0]
    for i, layer in enumerate(model.layers[:lm.config.num_hidden_layers]):
        if layer.gated_cross_attn_layer is not None:
            hidden = layer.gated_cross_attn_layer(hidden, layer._media)
        decoder = layer.decoder_layer
        attn = decoder.self_attn
        x = decoder.input_layernorm(hidden)
        q, k, v = (proj(x).view(B, 1, -1, attn.head_dim).transpose(1, 2)
                   for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        k, v = cache.update(k, v, i)
        out, _ = sdpa_attention_forward(attn, q, k, v, mask, scaling=attn.scaling,
                                        dropout=attn.attention_dropout if attn.training else 0.0)
        hidden = hidden + attn.o_proj(out.reshape(B, 1, -1).contiguous())
        hidden = hidden + decoder.mlp(decoder.post_attention_layernorm(hidden))
    return lm.lm_head(model.norm(hidden)[:, -1]).float()
