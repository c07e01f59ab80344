"""Fast pure-PyTorch paths for the attention ops (the CPU backend of the custom ops).

Immediate mode is block-diagonal: every token sees exactly the L keys of one image. Instead of
scoring each token against all N·L keys and masking (cost O(T·N·L·D), what open_flamingo does),
each token gathers the keys of its own image: cost O(T·L·D), independent of the number of images.
Tokens are processed in chunks so the gathered (chunk, L, D) keys stay small.
"""
from __future__ import annotations

import torch

from .reference import image_causal_mask

# tokens per gather chunk: bounds the temporary (B, H, chunk, L, D) tensors
_CHUNK = 256


def _immediate(q, k, v, text_time, latents_per_media, scale):
    B, H, T, D = q.shape
    L = latents_per_media
    N = k.shape[-2] // L
    kb = k.reshape(B, H, N, L, D)
    vb = v.reshape(B, H, N, L, D)
    has_media = text_time > 0
    # tokens with no image read image 1's keys (any valid index) and are zeroed below
    idx = (text_time.long() - 1).clamp(min=0)
    outs = []
    for t0 in range(0, T, _CHUNK):
        t1 = min(t0 + _CHUNK, T)
        i = idx[:, None, t0:t1].expand(B, H, t1 - t0)
        kg = torch.gather(kb, 2, i[..., None, None].expand(B, H, t1 - t0, L, D))
        vg = torch.gather(vb, 2, i[..., None, None].expand(B, H, t1 - t0, L, D))
        s = torch.einsum("bhtd,bhtld->bhtl", q[:, :, t0:t1], kg) * scale
        p = torch.softmax(s, dim=-1)
        outs.append(torch.einsum("bhtl,bhtld->bhtd", p, vg))
    out = torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]
    return out.masked_fill(~has_media[:, None, :, None], 0.0)


def _all_previous(q, k, v, text_time, latents_per_media, scale):
    N = k.shape[-2] // latents_per_media
    mask = image_causal_mask(text_time, N, latents_per_media, only_immediate=False)[:, None]
    has_media = (text_time > 0)[:, None, :, None]
    # a row with no visible key: let it see everything, then zero it (softmax of all -inf is nan)
    mask = mask | ~has_media
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return out.masked_fill(~has_media, 0.0)


def image_causal_attention_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 text_time: torch.Tensor, *, latents_per_media: int,
                                 only_immediate: bool = True,
                                 scale: float | None = None) -> torch.Tensor:
    """Same signature and result as :func:`~fastflamingo.ops.reference.image_causal_attention_reference`.

    Differentiable with autograd. Accumulates in the input dtype (fp32 on the CPU in practice);
    low-precision inputs are upcast to fp32 internally and cast back.
    """
    dtype = q.dtype
    if dtype in (torch.float16, torch.bfloat16):
        q, k, v = q.float(), k.float(), v.float()
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    fn = _immediate if only_immediate else _all_previous
    return fn(q, k, v, text_time, latents_per_media, scale).to(dtype)


def perceiver_attention_torch(q, k_media, v_media, k_latents, v_latents, *, scale=None):
    """Same signature and result as :func:`~fastflamingo.ops.reference.perceiver_attention_reference`,
    through PyTorch's fused SDPA."""
    k = torch.cat([k_media, k_latents], dim=-2)
    v = torch.cat([v_media, v_latents], dim=-2)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)
