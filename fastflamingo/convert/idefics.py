"""Import Hugging Face IDEFICS (``IdeficsForVisionText2Text``), live or from a local directory.

IDEFICS is a Flamingo with ``idefics``-style blocks (SEMANTICS.md). The mapping:

* the decoder becomes a plain ``LlamaForCausalLM`` (IDEFICS's decoder layers are LLaMA's, without
  grouped K/V); the decoupled ``additional_embedding`` / ``additional_fc`` rows are appended to
  the embedding and output matrices, and ``num_base_tokens`` keeps only those rows trainable;
* the vision tower becomes a ``CLIPVisionModel`` (same layers and names, ``last_hidden_state``
  with CLS, before the post-layernorm), so the model rebuilds from ``config.json`` alone;
* ``model.gated_cross_attn_layers.j`` sits before decoder layer ``j * cross_layer_interval``
  (placement ``first_of_every_n``); ``perceiver_resampler`` becomes the ``idefics``-style resampler;
* ``eos_resets_media``: after an EOS, text sees no image until the next ``<image>``, as IDEFICS's
  processor builds ``image_attention_mask``; generated tokens see what the prompt's last token
  sees, EOS or not, as IDEFICS's ``generate`` repeats the mask's last row.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from ..config import CrossAttentionConfig, FlamingoConfig, ResamplerConfig, VisionConfig
from ..warn import warn_caller
from .io import has_tokenizer, load_state_dir
from .load import CheckpointMismatchError, build_and_load, check_placement

IMAGE_TOKEN = "<image>"


def _rope_parameters(cfg) -> dict:
    """The LM's rotary parameters: ``cfg.rope_parameters`` where this transformers' IdeficsConfig
    has them (5.1x on); before, ``IdeficsEmbedding`` took no parameters from the config and used
    the default rotary embedding with base 10000."""
    params = getattr(cfg, "rope_parameters", None)
    return dict(params) if params else {"rope_type": "default", "rope_theta": 10000.0}


def config_from_idefics(cfg, *, media_token_id: int) -> FlamingoConfig:
    """An ``IdeficsConfig`` -> the :class:`FlamingoConfig` of the same architecture."""
    if cfg.hidden_act != "silu":  # the blocks' MLP (and the lean decode path's) is IDEFICS's SwiGLU with SiLU
        raise ValueError(f"IdeficsConfig.hidden_act={cfg.hidden_act!r}: fastflamingo's IDEFICS cross-attention "
                         "blocks compute IDEFICS's MLP with 'silu' (every released IDEFICS model's), and would "
                         "give other logits with another activation")
    _warn_other_trainable_set(cfg)
    v, p = cfg.vision_config, cfg.perceiver_config
    vocab = cfg.vocab_size + cfg.additional_vocab_size
    heads = cfg.num_attention_heads
    lm = dict(model_type="llama", vocab_size=vocab, hidden_size=cfg.hidden_size,
              intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
              num_attention_heads=heads, num_key_value_heads=heads, head_dim=cfg.hidden_size // heads,
              hidden_act=cfg.hidden_act, max_position_embeddings=cfg.max_position_embeddings,
              rms_norm_eps=cfg.rms_norm_eps, rope_parameters=_rope_parameters(cfg),
              tie_word_embeddings=cfg.tie_word_embeddings, attention_bias=False, mlp_bias=False,
              pad_token_id=cfg.pad_token_id, bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id)
    clip = dict(hidden_size=v.embed_dim, intermediate_size=v.intermediate_size,
                num_hidden_layers=v.num_hidden_layers, num_attention_heads=v.num_attention_heads,
                num_channels=v.num_channels, image_size=v.image_size, patch_size=v.patch_size,
                hidden_act=v.hidden_act, layer_norm_eps=v.layer_norm_eps)
    return FlamingoConfig(
        vision=VisionConfig(source="hf_clip", dim=v.embed_dim, hf_config=clip, keep_cls=True, image_size=v.image_size),
        resampler=ResamplerConfig(enabled=cfg.use_resampler, style="idefics", depth=p.resampler_depth,
                                  heads=p.resampler_n_heads, dim_head=p.resampler_head_dim,
                                  num_latents=p.resampler_n_latents, ff_mult=4,
                                  qk_layer_norms=p.qk_layer_norms_perceiver),
        cross_attention=CrossAttentionConfig(style="idefics", every_n_layers=cfg.cross_layer_interval,
                                             placement="first_of_every_n", heads=heads,
                                             dim_head=cfg.hidden_size // heads,
                                             intermediate_size=cfg.intermediate_size,
                                             qk_layer_norms=cfg.qk_layer_norms, alpha_type=cfg.alpha_type,
                                             rms_norm_eps=cfg.rms_norm_eps),
        lm=lm, decoder_layers_attr="model.layers", only_attend_immediate_media=True,
        media_token_id=media_token_id, eoc_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id,
        eos_resets_media=True, eos_token_id=cfg.eos_token_id, num_base_tokens=cfg.vocab_size)


# IdeficsConfig's freeze_* settings as the released models have them (its defaults differ:
# freeze_lm_head=False trains every lm_head row), and what each one False trains besides
RELEASED_FREEZE = {"freeze_lm_head": True, "freeze_text_layers": True, "freeze_vision_layers": True}
_UNFROZEN = {"freeze_lm_head": "Hugging Face trains every lm_head row",
             "freeze_text_layers": "it trains the decoder layers and every embedding row",
             "freeze_vision_layers": "it trains the vision tower"}


# the module types HF's freeze_model keeps trainable in what a freeze_* = True freezes (the
# released models list none): setting -> (that freeze_*, where)
_EXCEPTIONS = {"freeze_text_module_exceptions": ("freeze_text_layers", "in the decoder layers and the final norm"),
               "freeze_vision_module_exceptions": ("freeze_vision_layers", "in the vision tower")}


def _warn_other_trainable_set(cfg) -> None:
    """fastflamingo trains IDEFICS's released set (:data:`RELEASED_FREEZE`): the blocks, the
    resampler and the added tokens' rows. A config that unfreezes more is said so, not dropped."""
    more = [f"{name}=False ({_UNFROZEN[name]})" for name in RELEASED_FREEZE if not getattr(cfg, name, True)]
    more += [f"{name}={list(types)} (Hugging Face keeps these module types trainable {where})"
             for name, (frozen, where) in _EXCEPTIONS.items()
             if getattr(cfg, frozen, True) and (types := getattr(cfg, name, None))]
    if more:
        warn_caller(f"the IDEFICS config says {', '.join(more)}; fastflamingo trains the cross-attention blocks, the "
                    "resampler and the added tokens' embedding rows only (the released models' settings), and does not "
                    "apply these: fine_tune(..., train='all') trains every weight, or set requires_grad yourself")


_RENAMES = [  # IDEFICS name (regex) -> fastflamingo name; cross-attention layers handled apart
    (r"model\.vision_model\.", "vision_encoder."),
    (r"model\.perceiver_resampler\.", "perceiver."),
    (r"model\.layers\.(\d+)\.", r"lang_encoder.model.layers.\1.decoder_layer."),
    (r"model\.norm\.", "lang_encoder.model.norm."),
]


def map_idefics_state_dict(state: dict[str, torch.Tensor], cfg) -> dict[str, torch.Tensor]:
    """IDEFICS state-dict keys -> fastflamingo keys; the decoupled extra rows are concatenated."""
    out, interval = {}, cfg.cross_layer_interval
    embed = state["model.embed_tokens.weight"]
    head = state.get("lm_head.weight", embed if cfg.tie_word_embeddings else None)
    if head is None:
        raise ValueError("the IDEFICS checkpoint has no lm_head.weight and tie_word_embeddings is False")
    if cfg.additional_vocab_size:
        extra = state.get("model.embed_tokens.additional_embedding.weight")
        # tied: the extra output rows are the extra embedding rows (HF saves no additional_fc then)
        extra_head = state.get("lm_head.additional_fc.weight", extra if cfg.tie_word_embeddings else None)
        missing = [k for k, v, needed in (("model.embed_tokens.additional_embedding.weight", extra, True),
                                          ("lm_head.additional_fc.weight", extra_head, not cfg.tie_word_embeddings))
                   if v is None and needed]
        if missing:
            raise CheckpointMismatchError(missing, [], [], hint=(
                f"additional_vocab_size={cfg.additional_vocab_size} and tie_word_embeddings="
                f"{cfg.tie_word_embeddings}: the checkpoint must hold the added tokens' rows (untied: their output "
                "rows too, lm_head.additional_fc.weight). Pass the complete IDEFICS checkpoint"))
        embed = torch.cat([embed, extra])
        head = torch.cat([head, extra_head])
    out["lang_encoder.model.embed_tokens.weight"] = embed
    out["lang_encoder.lm_head.weight"] = head
    for key, value in state.items():
        if key.startswith(("model.embed_tokens.", "lm_head.")):
            continue
        m = re.match(r"model\.gated_cross_attn_layers\.(\d+)\.(.*)", key)
        if m:
            out[f"lang_encoder.model.layers.{int(m.group(1)) * interval}.gated_cross_attn_layer.{m.group(2)}"] = value
            continue
        for pattern, repl in _RENAMES:
            new, n = re.subn("^" + pattern, repl, key)
            if n:
                out[new] = value
                break
        else:
            raise ValueError(f"unexpected key {key!r} in the IDEFICS checkpoint")
    return out


def from_idefics(source, *, media_token_id: int | None = None, dtype: torch.dtype | None = None,
                 quantization=None, device_map=None, max_memory=None, offload_folder=None):
    """A fastflamingo :class:`~fastflamingo.Flamingo` computing what an IDEFICS model computes.

    Args:
        source: a live ``IdeficsForVisionText2Text`` (weights are shared where the layout allows),
            or a local directory with its ``config.json`` and weights (safetensors or .bin).
        media_token_id: the ``<image>`` id. None: the directory's tokenizer's, else IDEFICS's
            convention, the last additional token (``vocab_size + additional_vocab_size - 1``).
        dtype: cast the model to this dtype.
        quantization: passed to :func:`fastflamingo.quant.quantize_model`.
        device_map, max_memory, offload_folder: spread the model over devices with accelerate
            (:func:`fastflamingo.distribute.dispatch`).

    The model accepts IDEFICS's inputs, ``model(input_ids=, pixel_values=, image_attention_mask=,
    attention_mask=)``, and open_flamingo's ``model(vision_x, lang_x)`` (image mask derived from
    ``<image>`` tokens and EOS, as IDEFICS's processor does).
    """
    check_placement(dtype=dtype, quantization=quantization, device_map=device_map, max_memory=max_memory,
                    offload_folder=offload_folder)
    if isinstance(source, nn.Module):
        cfg, state = source.config, source.state_dict()
    else:
        cfg, state = _read_dir(source)
        if media_token_id is None:
            media_token_id = _tokenizer_image_id(source)
    if media_token_id is None:
        media_token_id = cfg.vocab_size + cfg.additional_vocab_size - 1
    config = config_from_idefics(cfg, media_token_id=media_token_id)
    return build_and_load(config, map_idefics_state_dict(state, cfg), dtype=dtype, quantization=quantization,
                          device_map=device_map, max_memory=max_memory, offload_folder=offload_folder)


def _read_dir(directory):
    from transformers import IdeficsConfig
    d = Path(directory)
    if not (d / "config.json").is_file():
        raise FileNotFoundError(f"{str(d)!r} is not an IDEFICS model directory (no config.json)")
    try:
        raw = json.loads((d / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{str(d / 'config.json')!r} is not a JSON file: {e}") from e
    # read from the file: IdeficsConfig says "idefics" for a config.json without a model_type
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    if model_type != "idefics":
        if isinstance(raw, dict) and model_type is None and {"vision", "resampler", "cross_attention"} <= raw.keys():
            raise ValueError(f"{str(d)!r} is a fastflamingo directory (already converted), not IDEFICS: load it "
                             "with Flamingo.from_pretrained")
        what = f"a {model_type!r} model" if model_type else "a config.json without a model_type"
        raise ValueError(f"{str(d)!r} holds {what}, not IDEFICS (model_type 'idefics')")
    cfg = IdeficsConfig.from_pretrained(str(d), local_files_only=True)
    return cfg, load_state_dir(d)


def _tokenizer_image_id(directory) -> int | None:
    if not has_tokenizer(directory):
        return None
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    return None if image_id is None or image_id == tok.unk_token_id else image_id
