"""Named model shapes, built from config with random weights and no download.

``tiny`` runs on a CPU in seconds (tests, the CPU benchmark). The others have the shapes of the
released checkpoints (OpenFlamingo-3B/4B/9B, IDEFICS-9B) and of the paper's models
(Flamingo-3B/9B/80B: the paper's depths, widths and heads, with LLaMA-shaped stand-ins for
Chinchilla, their gated MLPs at LLaMA's 8/3 d so the LMs have Chinchilla's 1.4B / 7B / 70B-class
parameter counts, and timm's NFNet-F6; 3.67B / 9.28B / 74.9B in all, tests/test_model.py), for
benchmarking; load real weights with :mod:`fastflamingo.convert`.
"""
from __future__ import annotations

import copy

from .config import CrossAttentionConfig, FlamingoConfig, ResamplerConfig, VisionConfig

_OF_VOCAB = 50280  # GPT-NeoX tokenizer + <|endofchunk|>, <image>, <PAD>


def _clip(hidden, layers, heads, inter, patch=14, image=224):
    return dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                intermediate_size=inter, patch_size=patch, image_size=image)


_VIT_L14 = VisionConfig(source="hf_clip", dim=1024, hf_config=_clip(1024, 24, 16, 4096), image_size=224)
_VIT_H14 = VisionConfig(source="hf_clip", dim=1280, hf_config=_clip(1280, 32, 16, 5120), keep_cls=True,
                        image_size=224)
_NFNET_F6 = VisionConfig(source="timm", dim=3072, timm_name="dm_nfnet_f6", image_size=320)


def _mpt(d, layers, heads):
    return dict(model_type="mpt", d_model=d, n_layers=layers, n_heads=heads, expansion_ratio=4,
                max_seq_len=2048, vocab_size=_OF_VOCAB)


def _llama(d, layers, heads, inter, vocab=32000, kv_heads=None):
    return dict(model_type="llama", hidden_size=d, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=kv_heads or heads, intermediate_size=inter, vocab_size=vocab,
                max_position_embeddings=4096)


def _of(vision, lm, every, media_token_id=50278, eoc_token_id=50277, pad_token_id=50279):
    return FlamingoConfig(vision=copy.deepcopy(vision), resampler=ResamplerConfig(),
                          cross_attention=CrossAttentionConfig(every_n_layers=every), lm=lm,
                          media_token_id=media_token_id, eoc_token_id=eoc_token_id, pad_token_id=pad_token_id,
                          eos_token_id=0, num_base_tokens=50277)


def _paper(lm, every, heads):
    return FlamingoConfig(
        vision=copy.deepcopy(_NFNET_F6),
        resampler=ResamplerConfig(depth=6, heads=16, dim_head=96, num_latents=64),
        cross_attention=CrossAttentionConfig(every_n_layers=every, placement="first_of_every_n",
                                             heads=heads, dim_head=128),
        lm=lm, media_token_id=31998, eoc_token_id=31999, pad_token_id=0, eos_token_id=2, num_base_tokens=31997)


def _tiny() -> FlamingoConfig:
    return FlamingoConfig(
        vision=VisionConfig(source="hf_clip", dim=32, image_size=32,
                            hf_config=_clip(32, 2, 4, 64, patch=8, image=32)),
        resampler=ResamplerConfig(depth=2, heads=2, dim_head=16, num_latents=8, max_num_frames=4),
        cross_attention=CrossAttentionConfig(every_n_layers=2, heads=4, dim_head=16),
        lm=_llama(64, 4, 4, 128, vocab=512) | {"max_position_embeddings": 1024},
        media_token_id=510, eoc_token_id=511, pad_token_id=0, eos_token_id=2, num_base_tokens=509)


PRESETS = {
    "tiny": _tiny,
    "openflamingo-3b": lambda: _of(_VIT_L14, _mpt(2048, 24, 16), every=1),
    "openflamingo-4b": lambda: _of(_VIT_L14, dict(model_type="gpt_neox", hidden_size=2560, num_hidden_layers=32,
                                                  num_attention_heads=32, intermediate_size=10240,
                                                  vocab_size=_OF_VOCAB, max_position_embeddings=2048), every=2),
    "openflamingo-9b": lambda: _of(_VIT_L14, _mpt(4096, 32, 32), every=4),
    "idefics-9b": lambda: FlamingoConfig(
        vision=copy.deepcopy(_VIT_H14),
        resampler=ResamplerConfig(style="idefics", depth=6, heads=16, dim_head=96, num_latents=64),
        cross_attention=CrossAttentionConfig(style="idefics", every_n_layers=4, placement="first_of_every_n",
                                             heads=None, dim_head=None, alpha_type="float"),
        lm=_llama(4096, 32, 32, 11008, vocab=32002), media_token_id=32001, eoc_token_id=32000,
        pad_token_id=0, eos_token_id=2, eos_resets_media=True, num_base_tokens=32000),
    "flamingo-3b": lambda: _paper(_llama(2048, 24, 16, 5632), every=1, heads=16),
    "flamingo-9b": lambda: _paper(_llama(4096, 32, 32, 11008), every=4, heads=32),
    "flamingo-80b": lambda: _paper(_llama(8192, 80, 64, 22016), every=7, heads=64),
}


def preset_config(name: str, **overrides) -> FlamingoConfig:
    """The :class:`FlamingoConfig` of a named preset; keyword overrides replace top-level fields."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    config = PRESETS[name]()
    for key, value in overrides.items():
        if not hasattr(config, key):
            raise ValueError(f"preset override {key!r} is not a FlamingoConfig field")
        setattr(config, key, value)
    config.validate()
    return config
