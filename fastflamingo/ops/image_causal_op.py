"""Temporary: the custom-op registration arrives with the Triton kernel (issue 3)."""
from __future__ import annotations

from .cpu import image_causal_attention_torch


def image_causal_attention_op(q, k, v, text_time, *, latents_per_media, only_immediate=True,
                              scale=None, backend="auto"):
    if backend == "triton" or (backend == "auto" and q.is_cuda):
        raise NotImplementedError("the Triton backend is being written")
    return image_causal_attention_torch(q, k, v, text_time, latents_per_media=latents_per_media,
                                        only_immediate=only_immediate, scale=scale)
