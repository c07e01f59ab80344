"""Temporary: the custom-op registration arrives with the Triton kernel (issue 6)."""
from __future__ import annotations

from .cpu import perceiver_attention_torch


def perceiver_attention_op(q, k_media, v_media, k_latents, v_latents, *, scale=None, backend="auto"):
    if backend == "triton" or (backend == "auto" and q.is_cuda):
        raise NotImplementedError("the Triton backend is being written")
    return perceiver_attention_torch(q, k_media, v_media, k_latents, v_latents, scale=scale)
