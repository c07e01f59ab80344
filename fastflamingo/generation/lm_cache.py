"""The frozen LM's KV cache, across Hugging Face LM families and transformers versions.

Two kinds: Hugging Face's ``StaticCache`` (preallocated (B, H, S_max, D) buffers written in place:
the decode step has fixed shapes and addresses, so it can be compiled and CUDA-graphed) for the
families whose modeling code supports it (``_can_compile_fullgraph``: LLaMA, Mistral, Qwen2,
GPT-NeoX, OPT, GPT-J, ...) and for MPT, whose attention layers :mod:`fastflamingo.mpt` adapts per instance,
and ``DynamicCache`` (grows by concatenation) for the rest.

transformers renamed the forward argument ``past_key_values`` to ``cache`` (5.2x); the name is
read from the LM's forward signature, so the same code runs on both sides of the rename.
"""
from __future__ import annotations

import gc
import inspect
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn

from .. import mpt

_POOL_SIZE = 4  # batch / length shapes kept per model


@dataclass
class Pooled:
    """A static cache kept for reuse, the session using it (weakly), and the decode steps compiled
    for it (:mod:`fastflamingo.generation.session`): they go when the cache leaves the pool."""
    cache: object
    owner: weakref.ref
    steps: dict = field(default_factory=dict)


# the static caches of compiled decode steps are reused across generate calls of one model (same
# objects = no recompilation); an eager session makes its own, of exactly the length it needs
_STATIC_POOL: "weakref.WeakKeyDictionary[nn.Module, dict[tuple, Pooled]]" = weakref.WeakKeyDictionary()


class LMCall:
    """How to call one LM: the keyword names its forward accepts.

    Attributes:
        cache_arg: ``"cache"`` or ``"past_key_values"``.
        positions: whether forward takes ``position_ids`` (MPT does not: ALiBi).
        logits_to_keep: whether forward can compute logits for the last position only.
        static: whether Hugging Face's StaticCache works with this family (for MPT once
            :func:`fastflamingo.mpt.prepare` has adapted the LM's attention layers, as
            :class:`~fastflamingo.Flamingo` does when it is built).
    """

    def __init__(self, lm: nn.Module):
        params = inspect.signature(lm.forward).parameters
        if "cache" in params:
            self.cache_arg = "cache"
        elif "past_key_values" in params:
            self.cache_arg = "past_key_values"
        else:
            raise ValueError(f"{type(lm).__name__}.forward takes neither `cache` nor `past_key_values`: "
                             "fastflamingo cannot keep its KV cache; use cache='none'")
        self.positions = "position_ids" in params
        self.logits_to_keep = "logits_to_keep" in params
        # (read, not made so: the model prepares its MPT once, and mpt.restore stays restored)
        self.static = bool(getattr(type(lm), "_can_compile_fullgraph", False)) or mpt.is_prepared(lm)

    def kwargs(self, cache, attention_mask: torch.Tensor, position_ids: torch.Tensor | None,
               last_only: bool = False) -> dict:
        kw = {self.cache_arg: cache, "use_cache": cache is not None, "attention_mask": attention_mask}
        if self.positions and position_ids is not None:
            kw["position_ids"] = position_ids
        if last_only and self.logits_to_keep:
            kw["logits_to_keep"] = 1
        return kw


def dynamic_cache(lm: nn.Module):
    """An empty DynamicCache whose every layer keeps all its slots. Not Hugging Face's per-config
    one: that crops a sliding-window layer (Mistral, Qwen2, Gemma2) to its last window - 1 slots,
    while :func:`layer_kv`, :func:`fill`, the few-shot prefix and scoring's per-pair caches need
    every layer to hold the whole sequence, slot for slot with the attention mask (a cropped
    prefix or prompt was read as the wrong tokens). The window is then the mask's, as in a forward
    over the whole sequence."""
    from transformers import DynamicCache
    return DynamicCache()


def new_static_cache(lm: nn.Module, max_len: int):
    """An empty StaticCache of ``max_len`` slots (its buffers are made at the first update)."""
    from transformers import StaticCache
    return StaticCache(config=lm.config, max_cache_len=max_len)


def static_cache(lm: nn.Module, batch: int, max_len: int, dtype: torch.dtype, device: torch.device, owner) -> Pooled:
    """A reset StaticCache of ``batch`` rows x ``max_len`` slots for ``owner`` (a session with a
    compiled step), reused from the last session of this shape when that one is gone (same buffers
    and compiled steps: no recompilation). While that session still decodes (an open stream), a new
    one outside the pool."""
    pool = _STATIC_POOL.setdefault(lm, {})
    key = (batch, max_len, dtype, str(device))
    entry = pool.pop(key, None)
    if entry is not None and entry.owner() is not None:
        # a finished session caught in a reference cycle (an exception's traceback, say) lingers
        # until the cyclic collector runs: collect now rather than compile the step again
        gc.collect()
        if entry.owner() is not None:  # still decoding (e.g. an open stream)
            pool[key] = entry
            return Pooled(new_static_cache(lm, max_len), weakref.ref(owner))
    if entry is None:
        while len(pool) >= _POOL_SIZE:  # drop the least recently used shape
            pool.pop(next(iter(pool)))
        entry = Pooled(new_static_cache(lm, max_len), weakref.ref(owner))
    else:
        entry.cache.reset()
        entry.owner = weakref.ref(owner)
    pool[key] = entry
    return entry


def release_static_caches(lm: nn.Module) -> None:
    """Free the pooled static caches of ``lm`` (they are kept to avoid recompiling)."""
    _STATIC_POOL.pop(lm, None)


def layer_kv(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per decoder layer (keys, values) (B, H_kv, S, D) of a filled DynamicCache."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def fill(cache, kv: list[tuple[torch.Tensor, torch.Tensor]], batch: int) -> None:
    """Write per-layer K/V (1 or ``batch`` rows, H, P, D) into an empty cache, for ``batch`` rows
    (a batch-1 prefix is repeated)."""
    for i, (k, v) in enumerate(kv):
        cache.update(k.expand(batch, *k.shape[1:]).contiguous(), v.expand(batch, *v.shape[1:]).contiguous(), i)


def reorder(cache, index: torch.Tensor) -> None:
    """Beam search: row r of the cache becomes row ``index[r]``; static buffers keep their address."""
    for layer in cache.layers:
        if not getattr(layer, "is_initialized", True) or layer.keys is None:
            continue
        if getattr(layer, "is_compileable", False):
            layer.keys.copy_(layer.keys.index_select(0, index))
            layer.values.copy_(layer.values.index_select(0, index))
        else:
            layer.keys = layer.keys.index_select(0, index)
            layer.values = layer.values.index_select(0, index)
