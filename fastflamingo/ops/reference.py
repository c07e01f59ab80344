"""The readable math of fastflamingo's two attention ops.

Everything here is plain PyTorch, written to be read, and is the contract every fast path
(the CPU gather path in :mod:`fastflamingo.ops.cpu`, the Triton kernels in
``fastflamingo.kernels``) is tested against.

Names used throughout (one name per concept):

* ``media_locations`` (B, T) bool: True where token t is an ``<image>`` token.
* ``text_time`` (B, T) int: for each token, the 1-based index of the image it may see,
  ``cumsum(media_locations)``; 0 means "no image yet" (the token's cross-attention output is 0).
  IDEFICS-style inputs (EOS resets the image index) are also expressed as a ``text_time``.
* ``latents_per_media`` L: visual tokens per image. Image m (1-based) owns keys
  ``[(m - 1) * L, m * L)``.
* immediate mode (``only_immediate=True``): token t attends to the keys of image
  ``text_time[t]`` only. All-previous mode: to the keys of images ``1 .. text_time[t]``.
"""
from __future__ import annotations

import torch


def text_time_from_media_locations(media_locations: torch.Tensor) -> torch.Tensor:
    """(B, T) bool -> (B, T) int32: number of ``<image>`` tokens at or before each token."""
    return media_locations.to(torch.int32).cumsum(-1, dtype=torch.int32)


def image_causal_mask(text_time: torch.Tensor, num_media: int, latents_per_media: int,
                      only_immediate: bool = True) -> torch.Tensor:
    """The dense (B, T, N·L) bool mask the image-causal rule describes (True = may attend).

    Only for references and tests: its size grows with T x N, which is what the fast paths avoid.
    """
    media_time = torch.arange(num_media, device=text_time.device).repeat_interleave(latents_per_media) + 1
    tt = text_time.long()[:, :, None]
    if only_immediate:
        return tt == media_time[None, None, :]
    return tt >= media_time[None, None, :]


def image_causal_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                     text_time: torch.Tensor, *, latents_per_media: int,
                                     only_immediate: bool = True, scale: float | None = None,
                                     upcast: bool = False) -> torch.Tensor:
    """Masked cross-attention of text queries over visual keys, image-causal.

    Args:
        q: (B, H, T, D) text queries.
        k, v: (B, H, N·L, D) keys and values of the visual tokens, image-major.
        text_time: (B, T) int, see the module docstring.
        latents_per_media: L.
        only_immediate: immediate mode (True) or all-previous mode (False).
        scale: softmax scale, default ``D ** -0.5``.
        upcast: compute in fp32 and cast the result back (the flash-attention tolerance rule
            compares a kernel with this fp32 reference and with the same math in low precision).

    Returns:
        (B, H, T, D). Tokens with ``text_time == 0`` get exactly 0 in both modes.
    """
    dtype = q.dtype
    if upcast:
        q, k, v = q.float(), k.float(), v.float()
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    num_media = k.shape[-2] // latents_per_media
    mask = image_causal_mask(text_time, num_media, latents_per_media, only_immediate)[:, None]
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    has_media = mask.any(-1, keepdim=True)  # (text_time > 0 and, unvalidated, <= N)
    # rows with no visible key would be softmax(-inf, ...) = nan: give them zeros instead, as the kernels
    scores = torch.where(has_media, scores, torch.zeros((), dtype=scores.dtype, device=scores.device))
    probs = torch.softmax(scores, dim=-1).masked_fill(~has_media, 0.0)
    return torch.matmul(probs, v).to(dtype)


def perceiver_attention_reference(q: torch.Tensor, k_media: torch.Tensor, v_media: torch.Tensor,
                                  k_latents: torch.Tensor, v_latents: torch.Tensor, *,
                                  scale: float | None = None, upcast: bool = False) -> torch.Tensor:
    """Perceiver latent attention: latents attend to [media tokens ; latents] with one softmax.

    Args:
        q: (B, H, L, D) queries of the latents.
        k_media, v_media: (B, H, V, D) keys/values of the media (patch) tokens.
        k_latents, v_latents: (B, H, L, D) keys/values of the latents themselves.
        scale: default ``D ** -0.5``.
        upcast: compute in fp32 and cast back.

    Returns:
        (B, H, L, D): ``softmax(q [k_media; k_latents]^T * scale) [v_media; v_latents]``.
    """
    dtype = q.dtype
    if upcast:
        q, k_media, v_media = q.float(), k_media.float(), v_media.float()
        k_latents, v_latents = k_latents.float(), v_latents.float()
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    k = torch.cat([k_media, k_latents], dim=-2)
    v = torch.cat([v_media, v_latents], dim=-2)
    probs = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * scale, dim=-1)
    return torch.matmul(probs, v).to(dtype)
