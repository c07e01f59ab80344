"""How far a quantized model is from its 16/32-bit reference: memory and agreement (for benchmarks)."""
from __future__ import annotations

import torch

from ..quant import model_bytes
from . import generate


@torch.no_grad()
def compare_quantized(reference, quantized, vision_x: torch.Tensor, lang_x: torch.Tensor,
                      attention_mask: torch.Tensor | None = None, *, max_new_tokens: int = 16) -> dict:
    """Compare two models with the same weights before quantization on one prompt batch.

    The reference generates ``max_new_tokens`` greedy tokens (no stop); both models then score
    that sequence (teacher forcing, so one early difference does not cascade).

    Returns:
        dict: ``bytes_reference`` / ``bytes_quantized`` (parameters, buffers, quantization
        statistics), ``logits_rel_error`` (||q - r|| / ||r|| over the generated positions),
        ``top1_agreement`` (fraction of those positions with the same argmax), and
        ``greedy_agreement`` (fraction of positions where the two models' own greedy
        generations agree).
    """
    ref_out = generate(reference, vision_x, lang_x, attention_mask, max_new_tokens=max_new_tokens, eos_token_id=[])
    q_out = generate(quantized, vision_x, lang_x, attention_mask, max_new_tokens=max_new_tokens, eos_token_id=[])
    T = lang_x.shape[1]
    mask = None if attention_mask is None else torch.cat(
        [attention_mask, attention_mask.new_ones(lang_x.shape[0], max_new_tokens)], dim=1)
    positions = None if mask is None else {"position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}
    scored = [m(vision_x, ref_out, attention_mask=mask, **(positions or {})).logits[:, T - 1:-1].float()
              for m in (reference, quantized)]
    r, q = scored
    return {
        "bytes_reference": model_bytes(reference),
        "bytes_quantized": model_bytes(quantized),
        "logits_rel_error": ((q - r).norm() / r.norm()).item(),
        "top1_agreement": (q.argmax(-1) == r.argmax(-1)).float().mean().item(),
        "greedy_agreement": (q_out[:, T:] == ref_out[:, T:]).float().mean().item(),
    }
