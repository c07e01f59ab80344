"""Fast pure-PyTorch paths for the attention ops (the CPU backend).

Immediate mode is block-diagonal: every token sees exactly the L keys of one image, and the
tokens of one image are contiguous. Scoring each token against all N·L keys and masking (what
open_flamingo does) costs O(T·N·L·D); here the work is O(T·L·D), independent of the number of
images, in one of two ways:

* eager (the default): a row's tokens are cut into chunks spanning a few images
  (:func:`row_chunks`, :func:`max_span`); each chunk scores only the keys of its images with one BLAS matmul, the
  way the Triton kernel skips key blocks. The chunks are planned on the host, which is free on
  the CPU.
* a decode step (T = 1): each row's query gathers the L keys of its image, one SDPA for the batch.
* under torch.compile (no host reads allowed in a graph): each token gathers the L keys of its
  image, chunk by chunk, with static shapes.
"""
from __future__ import annotations

import torch

from .reference import image_causal_mask

# tokens per chunk: bounds the temporary score / gathered-key tensors
_CHUNK = 128
# keys one chunk of the eager path may score: at least two images' worth (L = 64), more for small
# images, where fewer, larger matmuls beat Python overhead. Either way a token's work is bounded
# by max(2·L, _SPAN_KEYS)·D, whatever the number of images.
_SPAN_KEYS = 128


def max_span(latents_per_media: int) -> int:
    """How many images one chunk of the eager path may span."""
    return max(2, _SPAN_KEYS // latents_per_media)


def row_chunks(tt_row: list[int], max_tokens: int, max_span: int):
    """Cut one row's tokens into chunks ``(t0, t1, first_image, last_image)`` for the eager path.

    A chunk covers consecutive runs of tokens, at most ``max_tokens`` of them and at most
    ``max_span`` images, so scoring it against the keys of its images costs at most
    ``max_span`` x the O(len·L·D) a token needs: the total stays O(T·L·D) whatever the number of
    images. Tokens before any image (and IDEFICS's tokens after an EOS) need no chunk of their own.
    """
    chunks = []
    t0 = first = last = None
    for t, m in enumerate(tt_row):
        if t0 is not None and (t - t0 >= max_tokens or (m > 0 and m - first + 1 > max_span)):
            chunks.append((t0, t, first, last))
            t0 = None
        if t0 is None:
            if m == 0:
                continue
            t0, first = t, m
        if m > 0:
            last = m
    if t0 is not None:
        chunks.append((t0, len(tt_row), first, last))
    return chunks


def _immediate_ranges(q, k, v, text_time, latents_per_media, scale):
    B, H, T, D = q.shape
    L = latents_per_media
    key_image = torch.arange(k.shape[2], device=k.device) // L + 1
    out = q.new_zeros(B, H, T, D)
    tt_host = text_time.tolist()
    if not any(m > 0 for row in tt_host for m in row):
        # no token sees an image: exact zeros, still connected to the inputs for autograd
        return out + (q[..., :0].sum() + k[..., :0].sum() + v[..., :0].sum())
    for b in range(B):
        for t0, t1, first, last in row_chunks(tt_host[b], _CHUNK, max_span(L)):
            lo, hi = (first - 1) * L, last * L
            tt = text_time[b, t0:t1, None]
            none = tt == 0  # (chunk, 1): tokens with no image see every key, then get 0
            visible = (tt == key_image[None, lo:hi]) | none
            o = torch.nn.functional.scaled_dot_product_attention(
                q[b, :, t0:t1], k[b, :, lo:hi], v[b, :, lo:hi], attn_mask=visible, scale=scale)
            out[b, :, t0:t1] = o.masked_fill(none, 0.0)
    return out


def _immediate_one_token(q, k, v, text_time, latents_per_media, scale):
    """T = 1 (a decode step): each row's query reads the L keys of its one image, one fused SDPA."""
    B, H, _, D = q.shape
    L = latents_per_media
    N = k.shape[-2] // L
    idx = (text_time[:, 0].long() - 1).clamp(min=0)  # rows with no image read image 1, zeroed below
    rows = torch.arange(B, device=q.device)
    kg = k.reshape(B, H, N, L, D)[rows, :, idx]  # (B, H, L, D)
    vg = v.reshape(B, H, N, L, D)[rows, :, idx]
    out = torch.nn.functional.scaled_dot_product_attention(q, kg, vg, scale=scale)
    return out.masked_fill((text_time == 0)[:, None, :, None], 0.0)


def _immediate_gather(q, k, v, text_time, latents_per_media, scale):
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

    Differentiable with autograd. fp16 / bf16 inputs are computed in fp32 and cast back.
    """
    dtype = q.dtype
    if dtype in (torch.float16, torch.bfloat16):
        q, k, v = q.float(), k.float(), v.float()
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if not only_immediate:
        fn = _all_previous
    elif q.shape[2] == 1:
        fn = _immediate_one_token  # decoding: no host read, one SDPA for the batch
    elif torch.compiler.is_compiling() or q.device.type != "cpu":
        fn = _immediate_gather  # no host reads: traceable, and no device sync off the CPU
    else:
        fn = _immediate_ranges
    return fn(q, k, v, text_time, latents_per_media, scale).to(dtype)


def perceiver_attention_torch(q, k_media, v_media, k_latents, v_latents, *, scale=None):
    """Same signature and result as :func:`~fastflamingo.ops.reference.perceiver_attention_reference`,
    through PyTorch's fused SDPA."""
    k = torch.cat([k_media, k_latents], dim=-2)
    v = torch.cat([v_media, v_latents], dim=-2)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)
