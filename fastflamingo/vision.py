"""One small adapter (:func:`vision_features`) turns any frozen vision encoder into ``pixels (B, C, H, W) -> (B, V, D)``.

Sources: Hugging Face CLIP vision models (``last_hidden_state``, before the post-layernorm, with
or without CLS), open_clip VisionTransformers (patch tokens, ``ln_post`` on them or not, chosen
explicitly), timm models (``forward_features``; a conv net's (B, C, h, w) map is flattened to
h·w tokens, as the paper does with NFNet), or any module that returns (B, V, D).
"""
from __future__ import annotations

import torch
from torch import nn

from .config import VisionConfig


def check_vision_config(config: VisionConfig) -> None:
    """Refuse an open_clip encoder whose patch-token ``ln_post`` behaviour was not chosen."""
    if config.source == "open_clip" and config.ln_post_on_tokens is None:
        raise ValueError(
            "an open_clip vision encoder needs an explicit vision.ln_post_on_tokens=True/False: open_clip "
            ">= 2.23 applies ln_post to the patch tokens, older versions (which OpenFlamingo's released "
            "weights were trained with) did not. Use False for OpenFlamingo checkpoints, or True to match a "
            "live open_flamingo model running on open_clip >= 2.23.")


def vision_features(model: nn.Module, pixels: torch.Tensor, config: VisionConfig) -> torch.Tensor:
    """Run the frozen encoder ``model`` as ``config`` describes: (B, C, H, W) -> (B, V, D)."""
    source = config.source
    if source == "hf_clip":
        x = model(pixel_values=pixels).last_hidden_state
        return x if config.keep_cls else x[:, 1:]
    if source == "open_clip":
        return _open_clip_tokens(model, pixels, config)
    if source == "timm":
        x = model.forward_features(pixels)
        return x.flatten(2).transpose(1, 2) if x.dim() == 4 else x
    x = model(pixels)
    if isinstance(x, (tuple, list)):
        x = x[0]
    if hasattr(x, "last_hidden_state"):
        x = x.last_hidden_state
    if not torch.is_tensor(x) or x.dim() != 3:
        raise ValueError(f"the vision module returned {type(x).__name__} "
                         f"{tuple(x.shape) if torch.is_tensor(x) else ''}; a 'module' vision encoder must "
                         "return (B, V, D) features")
    return x


def expected_pixels(model: nn.Module, config: VisionConfig) -> tuple[int, int, int] | None:
    """(C, H, W) that the encoder ``model`` takes, where it takes only that: ViTs, whose position
    embeddings fix the resolution (Hugging Face CLIP, open_clip). None for the rest (a conv net
    takes any size)."""
    if config.source == "hf_clip":
        c = getattr(model, "config", None)
        channels, size = getattr(c, "num_channels", None), getattr(c, "image_size", None)
    elif config.source == "open_clip":
        channels = getattr(getattr(model, "conv1", None), "in_channels", None)
        size = getattr(model, "image_size", None)
    else:
        return None
    if channels is None or size is None:
        return None
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return int(channels), int(h), int(w)


def encoder_width(model: nn.Module, config: VisionConfig) -> int | None:
    """The width D of the features the encoder ``model`` gives, where its own config says it:
    Hugging Face CLIP (``config.hidden_size``), open_clip (``transformer.width``). None for the
    rest (timm, any module), whose features are checked as they come (Flamingo.encode_vision)."""
    if config.source == "hf_clip":
        width = getattr(getattr(model, "config", None), "hidden_size", None)
    elif config.source == "open_clip":
        width = getattr(getattr(model, "transformer", None), "width", None)
    else:
        return None
    return width if isinstance(width, int) else None


def check_vision_dim(config: VisionConfig, width: int | None, when: str = "the vision encoder is") -> None:
    """Refuse a ``config.vision.dim`` other than the encoder's width (``width``; None: unknown),
    which the resampler's and the cross-attention's weights are sized by."""
    if width is not None and width != config.dim:
        raise ValueError(f"config.vision.dim={config.dim} but {when} {width} wide: set vision.dim={width}, the "
                         "width the resampler and the cross-attention blocks take the visual features at")


def check_pixels(model: nn.Module, config: VisionConfig, chw: tuple[int, ...]) -> None:
    """Refuse images of another channel count or resolution than the encoder takes, naming both."""
    want = expected_pixels(model, config)
    if want is not None and tuple(chw) != want:
        raise ValueError(f"vision_x images are (C, H, W) = {tuple(chw)} but the vision encoder takes {want}: "
                         f"preprocess them with the model's image processor (resize to {want[1]}x{want[2]}, "
                         "normalize), as create_model_and_transforms returns it")


def _open_clip_tokens(visual: nn.Module, pixels: torch.Tensor, config: VisionConfig) -> torch.Tensor:
    # the transformer's output, before open_clip's version-dependent pooling / ln_post
    captured = {}
    handle = visual.transformer.register_forward_hook(lambda m, i, o: captured.__setitem__("x", o))
    try:
        visual(pixels)
    finally:
        handle.remove()
    x = captured["x"]
    if x.shape[0] != pixels.shape[0]:  # older open_clip runs the transformer sequence-first
        x = x.transpose(0, 1)
    if config.ln_post_on_tokens:
        x = visual.ln_post(x)
    return x if config.keep_cls else x[:, 1:]


def build_vision_model(config: VisionConfig) -> nn.Module:
    """Build the encoder a preset describes, with random weights and no download."""
    check_vision_config(config)
    if config.source == "hf_clip":
        from transformers import CLIPVisionConfig, CLIPVisionModel
        return CLIPVisionModel(CLIPVisionConfig(**(config.hf_config or {})))
    if config.source == "timm":
        import timm
        return timm.create_model(config.timm_name, pretrained=False, num_classes=0)
    if config.source == "open_clip":
        import open_clip
        return open_clip.create_model(config.open_clip_name, pretrained=None).visual
    raise ValueError(f"vision.source={config.source!r} cannot be built from a config: pass the "
                     "vision encoder module to Flamingo(config, vision_encoder=...)")
