"""``cache_media`` / ``uncache_media``: score many texts against the same images (open_flamingo's API).

The images are encoded once and every cross-attention layer's K/V of them is kept (the visual
KV cache). Until ``uncache_media``, a model call given no images uses them: tokens of a row
with ``<image>`` tokens see images by their own count (as open_flamingo; at most the row's
cached images), tokens of a row with none see their row's last cached image (none after an EOS
when ``eos_resets_media``), each row by its own tokens, whatever the other rows hold. The same
holds for ``generate`` and ``score`` given no images (:func:`cached`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..model import text_time_for

_HOOK = "_fastflamingo_media_cache_hook"
_STATE = "_fastflamingo_cached_media"
_POSITIONAL = ("vision_x", "lang_x", "attention_mask", "labels")


@dataclass
class CachedMedia:
    """What :func:`cache_media` keeps: the visual tokens (B, N, L, D_vis) and each row's image
    count (B, 1), which text without ``<image>`` tokens sees."""
    visual: torch.Tensor
    num_media: torch.Tensor


def cached(model) -> CachedMedia | None:
    """The media cached on ``model`` by :func:`cache_media`, or None."""
    return model.__dict__.get(_STATE)


def cache_media(model, input_ids: torch.Tensor, vision_x: torch.Tensor) -> None:
    """Encode ``vision_x`` (B, N, F, C, H, W) for the rows of ``input_ids`` (B, T), whose
    ``<image>`` tokens say how many of the N images each row has."""
    uncache_media(model)
    c = model.config
    if input_ids.dim() != 2 or input_ids.shape[0] != vision_x.shape[0]:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} must be (B, T) with the batch of vision_x "
                         f"{tuple(vision_x.shape)}")
    with torch.no_grad():
        visual = model.encode_vision(vision_x)
    if visual is None:
        raise ValueError(f"vision_x {tuple(vision_x.shape)} holds no image (N = 0): there is nothing to cache")
    num_media = (input_ids == c.media_token_id).sum(-1, keepdim=True).to(torch.int32)  # (B, 1)
    if int(num_media.max()) > visual.shape[1]:
        raise ValueError(f"input_ids has a row with {int(num_media.max())} <image> tokens but vision_x has "
                         f"N={visual.shape[1]} images")
    kv: dict = {}

    def use_cached_media(module, args, kwargs):
        kwargs = dict(kwargs, **dict(zip(_POSITIONAL, args)))  # forward's positional parameters
        if any(kwargs.get(k) is not None for k in ("vision_x", "pixel_values", "visual_tokens")):
            return (), kwargs  # images given explicitly win
        lang_x = kwargs.get("lang_x", kwargs.get("input_ids"))
        if lang_x is None or lang_x.shape[0] != visual.shape[0]:
            raise ValueError(f"cached media has batch {visual.shape[0]} but the call's lang_x is "
                             f"{None if lang_x is None else tuple(lang_x.shape)}")
        kwargs.update(visual_tokens=visual, media_kv_cache=kv)
        if kwargs.get("text_time") is None and kwargs.get("image_attention_mask") is None:
            kwargs["text_time"] = _cached_text_time(model, lang_x, num_media)
        return (), kwargs

    setattr(model, _HOOK, model.register_forward_pre_hook(use_cached_media, with_kwargs=True))
    setattr(model, _STATE, CachedMedia(visual, num_media))


def _cached_text_time(model, lang_x: torch.Tensor, num_media: torch.Tensor) -> torch.Tensor:
    c = model.config
    sees = rows_seeing_last_image(lang_x == c.media_token_id, num_media)
    by_tokens = text_time_for(lang_x, c.media_token_id, c.eos_token_id if c.eos_resets_media else None)
    return torch.where(sees < 0, by_tokens, seeing_last_image(model, lang_x, sees.clamp(min=0)))


def rows_seeing_last_image(media: torch.Tensor, num_media: torch.Tensor) -> torch.Tensor:
    """(B, 1): for each row of a call on cached media whose ``<image>`` tokens are ``media``
    (B, T) bool, -1 where they say which images its tokens see, else the row's cached image count
    (all its tokens see its last image). A row with more ``<image>`` tokens than it has cached
    images is an error naming it (its tokens would see zero padding images)."""
    counts = media.sum(-1, keepdim=True)
    over = (counts > num_media.to(counts.device)).nonzero()
    if over.numel():
        row = int(over[0, 0])
        raise ValueError(f"row {row} has {int(counts[row])} <image> tokens but cache_media kept "
                         f"{int(num_media[row])} image(s) for it: cache_media again with these texts, or pass vision_x")
    return torch.where(counts > 0, -1, num_media.to(counts.device)).to(torch.int32)


def seeing_last_image(model, lang_x: torch.Tensor, num_media: torch.Tensor) -> torch.Tensor:
    """``text_time`` of text without ``<image>`` tokens (B, T) whose every token sees its row's
    last cached image, ``num_media`` (B, 1), unless an EOS before it resets (``eos_resets_media``)."""
    c = model.config
    lead = torch.full_like(lang_x[:, :1], c.media_token_id)  # as if an <image> came first
    sees = text_time_for(torch.cat([lead, lang_x], dim=1), c.media_token_id,
                         c.eos_token_id if c.eos_resets_media else None)[:, 1:]
    return sees * num_media.to(lang_x.device)


def uncache_media(model) -> None:
    """Forget the cached images (a no-op when there are none)."""
    model.__dict__.pop(_STATE, None)
    hook = model.__dict__.pop(_HOOK, None)
    if hook is not None:
        hook.remove()
