"""How far a quantized model is from its 16/32-bit reference: memory and agreement (for benchmarks).

:func:`relative_error` and :func:`top1_agreement` are the two measures, also used by the benchmark's
checks of its quantized entrants (:mod:`fastflamingo.bench.stages`); :func:`compare_quantized` runs
them on two models.
"""
from __future__ import annotations

import torch

from ..quant import model_bytes
from . import generate


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| (in fp32; a zero ``b`` counts as a tiny one)."""
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def top1_agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """The share of positions (all but the last dimension) where logits ``a`` and ``b`` have the
    same argmax."""
    if a.shape != b.shape:
        raise ValueError(f"top1_agreement: logits of shape {tuple(a.shape)} and {tuple(b.shape)}; expected the same")
    return (a.argmax(-1) == b.argmax(-1)).float().mean().item()


def _same_model(reference, quantized) -> None:
    """Refuse two models that cannot hold the same weights before quantization: another vocabulary,
    another shape, or other unquantized weights (the token embeddings, which quantization keeps)."""
    vocab = [getattr(m, "vocab_size", None) for m in (reference, quantized)]
    if vocab[0] != vocab[1]:
        raise ValueError(f"compare_quantized: the models' vocabularies differ ({vocab[0]} vs {vocab[1]} tokens); "
                         f"compare a model with its own quantized copy")
    shapes = [getattr(m, "config", None) for m in (reference, quantized)]
    if all(hasattr(c, "to_dict") for c in shapes) and shapes[0].to_dict() != shapes[1].to_dict():
        a, b = (c.to_dict() for c in shapes)
        keys = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
        raise ValueError(f"compare_quantized: the models' configs differ in {keys}; compare a model with its own "
                         f"quantized copy")
    emb = [m.lang_encoder.get_input_embeddings().weight if hasattr(m, "lang_encoder") else None
           for m in (reference, quantized)]
    if emb[0] is not None and emb[1] is not None:
        if emb[0].shape != emb[1].shape:
            raise ValueError(f"compare_quantized: token embeddings of shape {tuple(emb[0].shape)} and "
                             f"{tuple(emb[1].shape)}; compare a model with its own quantized copy")
        err = relative_error(emb[1].detach().to(emb[0].device), emb[0].detach())
        if err > 1e-2:  # bf16 rounding of a copy: ~4e-3
            raise ValueError(f"compare_quantized: the token embeddings differ (relative error {err:.2g}): not the "
                             f"same weights before quantization (another seed or checkpoint?)")


@torch.no_grad()
def compare_quantized(reference, quantized, vision_x: torch.Tensor, lang_x: torch.Tensor,
                      attention_mask: torch.Tensor | None = None, *, max_new_tokens: int = 16) -> dict:
    """Compare two models with the same weights before quantization on one prompt batch.

    The reference generates ``max_new_tokens`` greedy tokens (no stop); both models then score
    that sequence (teacher forcing, so one early difference does not cascade). Models with other
    vocabularies, configs or token embeddings (which quantization leaves as they are) are refused
    with a ValueError: their agreement would measure nothing.

    Returns:
        dict: ``bytes_reference`` / ``bytes_quantized`` (parameters, buffers, quantization
        statistics), ``logits_rel_error`` (||q - r|| / ||r|| over the generated positions),
        ``top1_agreement`` (fraction of those positions with the same argmax), and
        ``greedy_agreement`` (fraction of positions where the two models' own greedy
        generations agree).
    """
    _same_model(reference, quantized)
    ref_out = generate(reference, vision_x, lang_x, attention_mask, max_new_tokens=max_new_tokens, eos_token_id=[])
    q_out = generate(quantized, vision_x, lang_x, attention_mask, max_new_tokens=max_new_tokens, eos_token_id=[])
    T = lang_x.shape[1]
    mask = None if attention_mask is None else torch.cat(
        [attention_mask, attention_mask.new_ones(lang_x.shape[0], max_new_tokens)], dim=1)
    positions = None if mask is None else {"position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}
    # the generated tokens see what the prompt's last token sees, as in generate: a generated <image>
    # (or EOS, under eos_resets_media) is no new image for the teacher-forced pass either
    tt = reference.text_time(lang_x if attention_mask is None else lang_x.masked_fill(attention_mask == 0, -1))
    tt = torch.cat([tt, tt[:, -1:].expand(-1, max_new_tokens)], dim=1)
    r, q = (m(vision_x, ref_out, attention_mask=mask, text_time=tt, **(positions or {})).logits[:, T - 1:-1].float()
            for m in (reference, quantized))
    return {
        "bytes_reference": model_bytes(reference),
        "bytes_quantized": model_bytes(quantized),
        "logits_rel_error": relative_error(q, r),
        "top1_agreement": top1_agreement(q, r),
        "greedy_agreement": (q_out[:, T:] == ref_out[:, T:]).float().mean().item(),
    }
