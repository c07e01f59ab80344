"""Few-shot prefix reuse: the demonstrations shared by many queries are encoded once.

A :class:`Prefix` holds everything the demonstrations contribute to a query's decoding: their
LM KV (every decoder layer's keys and values), their visual tokens and every cross-attention
layer's K/V of them. Queries are then run after it, batched, without recomputing it: the
prefix's LM KV is copied into each row's cache after the row's left padding, as in the prompt
written out whole (the prefill recomputes the prefix tokens that a row's padding pushes past the
prefix's slots); its visual K/V is joined in front of the query images' K/V (projection is per
token, so the K/V of the concatenation is the concatenation of the K/V), and query tokens see
image ``N_prefix + k`` for their k-th image.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch


@dataclass
class Prefix:
    """An encoded few-shot prefix (batch 1).

    Attributes:
        ids: (1, P) the prefix's token ids.
        visual: (1, N_p, L, D_vis) its visual tokens, or None (text-only prefix).
        visual_kv: {id(cross-attention module): (k, v) (1, H, N_p·L, D)}.
        lm_kv: per decoder layer (keys, values) (1, H_kv, P, D).
        owner: (a weak reference to) the model that encoded it: its K/V are of that model's
            weights, so another model refuses it (:meth:`check`). Encode it again after changing
            the weights.
    """
    ids: torch.Tensor
    visual: torch.Tensor | None
    visual_kv: dict
    lm_kv: list
    owner: weakref.ref | None = None

    def check(self, model) -> None:
        """Refuse to run after ``model`` unless it encoded this prefix."""
        if self.owner is not None and self.owner() is not model:
            raise ValueError("this prefix was encoded by another model: its K/V are of that model's weights. "
                             "Encode it with encode_prefix(model, ...) of the model that generates or scores")

    @property
    def length(self) -> int:
        return self.ids.shape[1]

    @property
    def num_media(self) -> int:
        return 0 if self.visual is None else self.visual.shape[1]


@torch.no_grad()
def encode_prefix(model, vision_x: torch.Tensor | None, lang_x: torch.Tensor) -> Prefix:
    """Encode shared demonstrations once.

    Args:
        model: a :class:`~fastflamingo.Flamingo`.
        vision_x: (1, N_p, F, C, H, W) the demonstrations' images (one per ``<image>`` token), or None.
        lang_x: (1, P) their token ids, unpadded.

    Returns:
        A :class:`Prefix` to pass as ``generate(..., prefix=...)`` for any batch of queries.
    """
    from . import lm_cache
    from .session import project_visual_kv
    if lang_x.dim() != 2 or lang_x.shape[0] != 1:
        raise ValueError(f"a prefix is one row of token ids (1, P), got shape {tuple(lang_x.shape)}")
    if vision_x is not None and vision_x.shape[0] != 1:
        raise ValueError(f"a prefix's vision_x must have batch 1, got {tuple(vision_x.shape)}")
    from .media_cache import cached
    visual = None if vision_x is None else model.encode_vision(vision_x)
    if visual is None and cached(model) is not None:
        raise ValueError("encode_prefix of a prefix without images while cache_media's images are cached: the "
                         "model's forward would condition the prefix on them. Call model.uncache_media() first")
    kv = project_visual_kv(model, visual)
    call = lm_cache.LMCall(model.lang_encoder)
    cache = lm_cache.dynamic_cache(model.lang_encoder)
    positions = torch.arange(lang_x.shape[1], device=lang_x.device)[None]
    model(lang_x=lang_x, visual_tokens=visual, media_kv_cache=kv,
          **call.kwargs(cache, torch.ones_like(lang_x), positions, last_only=True))
    return Prefix(ids=lang_x, visual=visual, visual_kv=kv, lm_kv=lm_cache.layer_kv(cache), owner=weakref.ref(model))
