"""Configuration of a Flamingo model: what the paper calls the architecture, in one place.

A :class:`FlamingoConfig` is plain data (JSON round-trip), so a model can be rebuilt from
``config.json`` alone. Two block styles cover the released checkpoints:

* ``"open_flamingo"``: LayerNorm, GELU feed-forward, fused ``to_kv``, scalar tanh gates, 8 x 64
  cross-attention heads whatever the LM width, a block before decoder layer i when
  ``(i + 1) % every_n_layers == 0``.
* ``"idefics"``: RMSNorm, SwiGLU feed-forward, separate q/k/v/o, optional q/k norms, scalar or
  vector tanh gates, the LM's own heads, a block before decoder layer i when
  ``i % every_n_layers == 0``.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

BLOCK_STYLES = ("open_flamingo", "idefics")
PLACEMENTS = ("after_every_n", "first_of_every_n")
VISION_SOURCES = ("hf_clip", "open_clip", "timm", "module")


@dataclass
class VisionConfig:
    """The frozen vision encoder, reduced to what the rest of the model needs.

    Attributes:
        source: ``"hf_clip"`` (a transformers CLIP vision model), ``"open_clip"`` (an open_clip
            VisionTransformer), ``"timm"`` (a timm model, e.g. NFNet as in the paper) or
            ``"module"`` (any module returning (B, V, D)).
        dim: width D of the visual features (the resampler's width).
        hf_config: for ``hf_clip`` presets, the CLIPVisionConfig kwargs to build it from.
        timm_name: for ``timm``, the model name (built with ``pretrained=False`` in presets).
        open_clip_name: for ``open_clip``, the model name.
        keep_cls: keep the CLS token (IDEFICS) or only the patch tokens (OpenFlamingo).
        ln_post_on_tokens: open_clip only: apply ``ln_post`` to the patch tokens. open_clip
            >= 2.23 does, older versions (which OpenFlamingo was trained with) did not; there
            is no default on purpose (SEMANTICS.md).
        image_size: the input resolution, for making inputs and processors.
    """
    source: str = "hf_clip"
    dim: int = 1024
    hf_config: dict[str, Any] | None = None
    timm_name: str | None = None
    open_clip_name: str | None = None
    keep_cls: bool = False
    ln_post_on_tokens: bool | None = None
    image_size: int = 224


@dataclass
class ResamplerConfig:
    """The Perceiver resampler. ``enabled=False`` feeds the vision features straight to the
    cross-attention (IDEFICS ``use_resampler=False``)."""
    enabled: bool = True
    style: str = "open_flamingo"
    depth: int = 6
    heads: int = 8
    dim_head: int = 64
    num_latents: int = 64
    ff_mult: int = 4
    max_num_media: int | None = None
    max_num_frames: int | None = None
    qk_layer_norms: bool = False


@dataclass
class CrossAttentionConfig:
    """The gated cross-attention blocks interleaved with the frozen LM's layers.

    ``heads`` / ``dim_head`` of None take the LM's own (IDEFICS); ``ff_mult`` sizes the
    open_flamingo feed-forward, ``intermediate_size`` the IDEFICS SwiGLU (None: the LM's).
    """
    style: str = "open_flamingo"
    every_n_layers: int = 4
    placement: str = "after_every_n"
    heads: int | None = 8
    dim_head: int | None = 64
    ff_mult: int = 4
    intermediate_size: int | None = None
    qk_layer_norms: bool = False
    alpha_type: str = "float"
    rms_norm_eps: float = 1e-6


@dataclass
class FlamingoConfig:
    """Everything needed to rebuild a Flamingo model's architecture.

    Attributes:
        vision, resampler, cross_attention: see their classes.
        lm: the frozen LM's Hugging Face config as a dict (with ``model_type``); presets build
            the LM from it with random weights.
        decoder_layers_attr: dotted path of the LM's decoder-layer list; None infers it from
            the LM family.
        only_attend_immediate_media: immediate (True, every released checkpoint) or
            all-previous image-causal mode.
        media_token_id, eoc_token_id: ids of ``<image>`` and ``<|endofchunk|>``.
        pad_token_id: the pad id, used for left padding in generation.
        eos_resets_media: IDEFICS semantics: after an EOS token, tokens see no image until the
            next ``<image>`` (in the text given; generated tokens see what the prompt's last token
            sees, as IDEFICS's ``generate``).
        eos_token_id: the LM's EOS id (used when ``eos_resets_media``).
        num_base_tokens: the LM's vocabulary size before the Flamingo tokens were added; the
            embedding rows from here on are trainable (None: embeddings frozen; 0: every row).
        train_output_embeddings: with untied embeddings, the output embedding's rows from
            ``num_base_tokens`` on train too (IDEFICS trains both); False: only the input
            embedding's, as open_flamingo's ``create_model_and_transforms`` (fastflamingo's sets it).
    """
    vision: VisionConfig = field(default_factory=VisionConfig)
    resampler: ResamplerConfig = field(default_factory=ResamplerConfig)
    cross_attention: CrossAttentionConfig = field(default_factory=CrossAttentionConfig)
    lm: dict[str, Any] = field(default_factory=dict)
    decoder_layers_attr: str | None = None
    only_attend_immediate_media: bool = True
    media_token_id: int = -1
    eoc_token_id: int = -1
    pad_token_id: int | None = None
    eos_resets_media: bool = False
    eos_token_id: int | None = None
    num_base_tokens: int | None = None
    train_output_embeddings: bool = True

    def __post_init__(self):
        for name, cls in (("vision", VisionConfig), ("resampler", ResamplerConfig),
                          ("cross_attention", CrossAttentionConfig)):
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, _from_dict(cls, value, name))
        self.validate()

    def validate(self) -> None:
        """Refuse values that would fail deep in the model, or build a degenerate one (a
        feed-forward of width 0), naming the field."""
        v, r, x = self.vision, self.resampler, self.cross_attention
        if v.source not in VISION_SOURCES:
            raise ValueError(f"vision.source={v.source!r} is not one of {VISION_SOURCES}")
        for name, style in (("resampler.style", r.style), ("cross_attention.style", x.style)):
            if style not in BLOCK_STYLES:
                raise ValueError(f"{name}={style!r} is not one of {BLOCK_STYLES}")
        if x.placement not in PLACEMENTS:
            raise ValueError(f"cross_attention.placement={x.placement!r} is not one of {PLACEMENTS}")
        if x.alpha_type not in ("float", "vector"):
            raise ValueError(f"cross_attention.alpha_type={x.alpha_type!r} is not 'float' or 'vector'")
        idefics = x.style == "idefics"  # its heads / dim_head may be None: the LM's own
        for name, value, optional in (
                ("vision.dim", v.dim, False), ("resampler.depth", r.depth, False), ("resampler.heads", r.heads, False),
                ("resampler.dim_head", r.dim_head, False), ("resampler.num_latents", r.num_latents, False),
                ("resampler.ff_mult", r.ff_mult, False), ("resampler.max_num_media", r.max_num_media, True),
                ("resampler.max_num_frames", r.max_num_frames, True),
                ("cross_attention.every_n_layers", x.every_n_layers, False),
                ("cross_attention.heads", x.heads, idefics), ("cross_attention.dim_head", x.dim_head, idefics),
                ("cross_attention.ff_mult", x.ff_mult, False),
                ("cross_attention.intermediate_size", x.intermediate_size, True)):
            if (value is None and optional) or (type(value) is int and value >= 1):
                continue
            hint = ""
            if name in ("cross_attention.heads", "cross_attention.dim_head"):
                hint = ("; None takes the LM's own" if idefics else
                        "; None (the LM's own) is for cross_attention.style='idefics' only")
            raise ValueError(f"{name} must be an int >= 1{' or None' if optional else ''}, got {value!r}{hint}")
        eps = x.rms_norm_eps
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
            raise ValueError(f"cross_attention.rms_norm_eps must be a number > 0, got {eps!r}")
        nb = self.num_base_tokens  # (a negative one trained every input row but the last output rows only)
        if nb is not None and (type(nb) is not int or nb < 0):
            raise ValueError(f"num_base_tokens must be an int >= 0 (0: every embedding row trains) or None, got {nb!r}")
        if self.eos_resets_media and self.eos_token_id is None:  # (the reset was silently off)
            raise ValueError("eos_resets_media=True resets the image after each EOS token, but eos_token_id is None: "
                             "give the LM's EOS id, or eos_resets_media=False")

    def has_cross_attention(self, layer_idx: int) -> bool:
        """Whether a gated cross-attention block sits before decoder layer ``layer_idx``."""
        n = self.cross_attention.every_n_layers
        if self.cross_attention.placement == "after_every_n":
            return (layer_idx + 1) % n == 0
        return layer_idx % n == 0

    @property
    def latents_per_media(self) -> int | None:
        """Visual tokens per image fed to the cross-attention (None: the encoder's token count)."""
        return self.resampler.num_latents if self.resampler.enabled else None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FlamingoConfig":
        return _from_dict(cls, d, "FlamingoConfig")

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "FlamingoConfig":
        return cls.from_dict(json.loads(text))


def _from_dict(cls, d: dict[str, Any], where: str):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown}; known: {sorted(names)}")
    return cls(**d)
