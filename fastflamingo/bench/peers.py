"""The peers' own models, built offline in a preset's shape with random weights.

* :func:`open_flamingo_model`: open_flamingo 2.0.1's ``Flamingo``, built the way its
  ``create_model_and_transforms`` builds it (an open_clip ViT registered from the preset's vision
  shape, the preset's Hugging Face LM, FlamingoLMMixin). Its resampler and cross-attention are
  open_flamingo's fixed ones (6 layers, 8 x 64 heads, 64 latents), as in the released models.
* :func:`idefics_model`: transformers' ``IdeficsForVisionText2Text`` from a config (the 9B shape
  on a GPU, the transformers test-suite's tiny sizes on the CPU).

fastflamingo then runs the same weights through :func:`fastflamingo.convert.open_flamingo.from_open_flamingo`
and ``fastflamingo.convert.idefics.from_idefics`` (when present). Where open_flamingo cannot be
built (:func:`open_flamingo_missing`), :func:`open_flamingo_shaped` builds fastflamingo's own model
in the shape it would have had: fastflamingo's rows are measured, the peer's read n/a.
"""
from __future__ import annotations

import json
import os
import tempfile

import torch

from ..config import FlamingoConfig


def _register_open_clip_vit(config: FlamingoConfig) -> str:
    import open_clip
    hf = config.vision.hf_config or {}
    width = hf.get("hidden_size", config.vision.dim)
    name = f"fastflamingo-bench-vit-{width}-{hf.get('num_hidden_layers', 2)}-{hf.get('patch_size', 14)}"
    if name not in open_clip.list_models():
        heads = hf.get("num_attention_heads", 8)
        vision = {"image_size": hf.get("image_size", config.vision.image_size), "layers": hf.get("num_hidden_layers", 2),
                  "width": width, "head_width": width // heads, "patch_size": hf.get("patch_size", 14),
                  "mlp_ratio": hf.get("intermediate_size", 4 * width) / width}
        cfg = {"embed_dim": 16, "vision_cfg": vision,
               "text_cfg": {"context_length": 16, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1}}
        register_open_clip_config(name, cfg)
    return name


def register_open_clip_config(name: str, cfg: dict) -> None:
    """Register a model config with open_clip the way its own configs are (a JSON file), from a
    temporary folder removed at once: open_clip reads the file when it is added and keeps it."""
    import open_clip
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, name + ".json"), "w") as f:
            json.dump(cfg, f)
        open_clip.add_model_config(d)


def _perturb(model: torch.nn.Module, blocks, gate: float, seed: int) -> None:
    """Non-zero gates and LayerNorms off the identity, so the comparison is not trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in blocks:
            if block is None:
                continue
            for name, p in block.named_parameters():
                if "gate" in name or "alpha" in name:
                    p.fill_(gate if "attn" in name else -gate)
                elif "norm" in name:
                    p.add_(0.1 * torch.randn(p.shape, generator=g).to(p))


def open_flamingo_model(config: FlamingoConfig, device: str, dtype: torch.dtype, seed: int = 0):
    """open_flamingo's own ``Flamingo`` in the shape of ``config`` (open_flamingo style presets)."""
    import open_clip
    from open_flamingo.src.flamingo import Flamingo
    from open_flamingo.src.flamingo_lm import FlamingoLMMixin
    from open_flamingo.src.utils import extend_instance
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..lm import DECODER_LAYERS_ATTR
    lm_cfg = dict(config.lm)
    family = lm_cfg.pop("model_type")
    hf_config = AutoConfig.for_model(family, **lm_cfg)
    torch.manual_seed(seed)
    with torch.device(device):
        clip = open_clip.create_model(_register_open_clip_vit(config), pretrained=None)
        clip.visual.output_tokens = True
        lm = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
        extend_instance(lm, FlamingoLMMixin)
        lm.set_decoder_layers_attr_name(DECODER_LAYERS_ATTR[family])
        model = Flamingo(clip, lm, config.eoc_token_id, config.media_token_id, vis_dim=config.vision.dim,
                         cross_attn_every_n_layers=config.cross_attention.every_n_layers)
    model = model.to(device=device, dtype=dtype)
    _perturb(model, model.lang_encoder.gated_cross_attn_layers, 0.5, seed)
    _generate_shim(model.lang_encoder)
    # what open_flamingo's create_model_and_transforms trains
    model.requires_grad_(False)
    model.perceiver.requires_grad_(True)
    model.lang_encoder.gated_cross_attn_layers.requires_grad_(True)
    model.lang_encoder.get_input_embeddings().requires_grad_(True)
    return model.eval()


def open_flamingo_missing() -> str | None:
    """Why :func:`open_flamingo_model` cannot be built here (open_flamingo or open_clip, its vision
    encoder, not importable), or None."""
    from .env import has_module
    if not has_module("open_flamingo"):
        return "open_flamingo is not installed"
    if not has_module("open_clip"):
        return "open_clip (open_flamingo's vision encoder) is not installed"
    return None


def open_flamingo_shaped(config: FlamingoConfig, device: str, dtype: torch.dtype, seed: int = 0):
    """fastflamingo's own model in the shape ``from_open_flamingo(open_flamingo_model(config))``
    has (open_flamingo's fixed resampler and cross-attention heads, every input embedding row
    trained, the gates and norms perturbed alike), with random weights, but with the preset's own
    vision encoder (``config.vision``: for ``tiny`` a transformers CLIP ViT of the same shape)
    where the peer has open_clip's: fastflamingo's entrant when open_flamingo is missing (there is
    no peer whose weights it must share), needing neither open_flamingo nor open_clip."""
    import copy

    from ..config import CrossAttentionConfig, ResamplerConfig
    from ..model import Flamingo
    config = copy.deepcopy(config)
    config.resampler = ResamplerConfig()  # open_flamingo's: 6 layers, 8 x 64 heads, 64 latents
    config.cross_attention = CrossAttentionConfig(every_n_layers=config.cross_attention.every_n_layers)
    config.num_base_tokens, config.train_output_embeddings = 0, False  # as from_open_flamingo reads the peer
    torch.manual_seed(seed)
    with torch.device(device):
        model = Flamingo(config)
    model = model.to(device=device, dtype=dtype)
    _perturb(model, model.gated_cross_attn_layers, 0.5, seed)
    return model.eval()


def _generate_shim(lm) -> None:
    """open_flamingo's LM mixin takes ``attention_mask`` positionally, and transformers 5.x's
    generate drops an all-ones mask: give the instance a forward with a default (same math)."""
    from open_flamingo.src.flamingo_lm import FlamingoLMMixin
    lm.forward = lambda input_ids=None, attention_mask=None, **kw: FlamingoLMMixin.forward(
        lm, input_ids, attention_mask, **kw)


def idefics_config(device: str):
    """The IDEFICS-9B shape on a GPU; the transformers test-suite's tiny sizes on the CPU. No
    additional vocabulary: transformers' IDEFICS loss reshapes logits by ``vocab_size`` alone and
    fails with ``additional_vocab_size > 0``."""
    from transformers import IdeficsConfig
    from ..convert.idefics import RELEASED_FREEZE as released  # what the fastflamingo entrants, imported from it, train
    if torch.device(device).type == "cuda":  # IDEFICS-9B: LLaMA-7B, ViT-H/14, cross-attention every 4 layers
        return IdeficsConfig(
            use_resampler=True, cross_layer_interval=4, alpha_type="float", qk_layer_norms=False, **released,
            vision_config={"embed_dim": 1280, "image_size": 224, "patch_size": 14, "num_hidden_layers": 32,
                           "num_attention_heads": 16, "intermediate_size": 5120})
    return IdeficsConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        cross_layer_interval=2, use_resampler=True, additional_vocab_size=0, **released,
        vision_config={"embed_dim": 32, "image_size": 32, "patch_size": 8, "num_hidden_layers": 2,
                       "num_attention_heads": 4, "intermediate_size": 64},
        perceiver_config={"use_resampler": True, "resampler_n_latents": 8, "resampler_depth": 2,
                          "resampler_n_heads": 2, "resampler_head_dim": 16})


def idefics_model(device: str, dtype: torch.dtype, seed: int = 0):
    from transformers import IdeficsForVisionText2Text
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in the working dtype: no fp32 copy of 9B weights first
    try:
        with torch.device(device):
            model = IdeficsForVisionText2Text(idefics_config(device)).to(dtype)
    finally:
        torch.set_default_dtype(default)
    _perturb(model, model.model.gated_cross_attn_layers, 0.5, seed)
    return model.eval()
