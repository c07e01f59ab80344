"""Import from open_flamingo: a live ``open_flamingo.Flamingo`` or its checkpoints.

fastflamingo's parameter names are open_flamingo's, so a state dict maps over with one rule:
open_flamingo registers every cross-attention block twice (``lang_encoder.gated_cross_attn_layers.k``
beside ``lang_encoder.<layers>.k.gated_cross_attn_layer``) and the original decoder layers twice
(``lang_encoder.old_decoder_blocks.k``): the duplicates are dropped. Checkpoint files are read by
:mod:`.open_flamingo_ckpt`.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..config import CrossAttentionConfig, FlamingoConfig, ResamplerConfig, VisionConfig
from ..warn import warn_caller

_DUPLICATE_PREFIXES = ("lang_encoder.gated_cross_attn_layers.", "lang_encoder.old_decoder_blocks.")


def _is_duplicate(key: str, prefix: str = "") -> bool:
    return key.startswith(tuple(prefix + p for p in _DUPLICATE_PREFIXES))


def map_open_flamingo_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """open_flamingo state-dict keys -> fastflamingo keys (drops the duplicate registrations)."""
    return {k: v for k, v in state_dict.items() if not _is_duplicate(k)}


def drop_duplicate_keys_hook(module, state_dict, prefix, *args) -> None:
    """A load_state_dict pre-hook, registered by every Flamingo: an open_flamingo state dict
    loads as it is (its duplicate registrations are dropped first)."""
    for key in [k for k in state_dict if _is_duplicate(k, prefix)]:
        del state_dict[key]


def config_from_open_flamingo(live: nn.Module, *, ln_post_on_tokens: bool | None = None,
                              num_base_tokens: int | None = None) -> FlamingoConfig:
    """Read the architecture of a live open_flamingo ``Flamingo``."""
    perceiver = live.perceiver
    p_attn, p_ff = perceiver.layers[0]
    dim = perceiver.latents.shape[1]
    blocks = [(i, b) for i, b in enumerate(live.lang_encoder.gated_cross_attn_layers) if b is not None]
    if not blocks:
        raise ValueError("the open_flamingo model has no cross-attention layers")
    every_n = blocks[0][0] + 1
    expected = [i for i in range(len(live.lang_encoder.gated_cross_attn_layers)) if (i + 1) % every_n == 0]
    if [i for i, _ in blocks] != expected:
        raise ValueError(f"cross-attention layers at {[i for i, _ in blocks]} do not follow open_flamingo's "
                         f"(i + 1) % n == 0 rule for any n")
    x_attn = blocks[0][1].attn
    if not x_attn.only_attend_immediate_media:
        warn_all_previous_mode()
    visual = live.vision_encoder
    if ln_post_on_tokens is None:
        # open_clip >= 2.23 applies ln_post to the tokens unless final_ln_after_pool is set
        ln_post_on_tokens = not getattr(visual, "final_ln_after_pool", True)
    lm = live.lang_encoder
    return FlamingoConfig(
        vision=VisionConfig(source="open_clip", dim=dim, keep_cls=False, ln_post_on_tokens=ln_post_on_tokens,
                            image_size=open_clip_image_size(visual)),
        resampler=ResamplerConfig(
            depth=len(perceiver.layers), heads=p_attn.heads, dim_head=p_attn.to_q.out_features // p_attn.heads,
            num_latents=perceiver.latents.shape[0], ff_mult=p_ff[1].out_features // dim,
            max_num_media=None if perceiver.media_time_embs is None else perceiver.media_time_embs.shape[0],
            max_num_frames=None if perceiver.frame_embs is None else perceiver.frame_embs.shape[0]),
        cross_attention=CrossAttentionConfig(
            every_n_layers=every_n, heads=x_attn.heads, dim_head=x_attn.to_q.out_features // x_attn.heads,
            ff_mult=blocks[0][1].ff[1].out_features // blocks[0][1].ff[1].in_features),
        lm=lm.config.to_dict(),
        decoder_layers_attr=lm.decoder_layers_attr_name,
        only_attend_immediate_media=x_attn.only_attend_immediate_media,
        media_token_id=live.media_token_id, eoc_token_id=live.eoc_token_id,
        pad_token_id=getattr(lm.config, "pad_token_id", None), eos_token_id=getattr(lm.config, "eos_token_id", None),
        num_base_tokens=num_base_tokens,
        train_output_embeddings=False)  # open_flamingo trains no output embedding rows


def warn_all_previous_mode() -> None:
    """An all-previous-mode open_flamingo model computes one thing otherwise (README, "Where
    fastflamingo differs from the peers"): said where such a model is made."""
    warn_caller("only_attend_immediate_media=False (all-previous mode): open_flamingo gives a token before its "
                "row's first image a uniform average over all the row's images, later ones included (not causal: "
                "it changes as images are added, so no prompt or prefix could be cached); fastflamingo gives it 0, "
                "as immediate mode does. Where text precedes the first image (a LLaMA tokenizer's BOS), every "
                "later token's logits differ from open_flamingo's through self-attention; prompts that start "
                "with <image> match it")


def open_clip_image_size(visual: nn.Module) -> int:
    """The input resolution of an open_clip vision tower (224 when it does not say)."""
    size = getattr(visual, "image_size", 224)
    return size[0] if isinstance(size, (tuple, list)) else int(size)


def _fill_meta_buffers(model: nn.Module, live: nn.Module) -> None:
    """Non-persistent buffers (rotary tables) are not in state dicts: take them from ``live``."""
    live_buffers = dict(live.named_buffers(remove_duplicate=False))
    for name, buf in list(model.named_buffers(remove_duplicate=False)):
        if buf.is_meta:
            if name not in live_buffers:
                raise RuntimeError(f"buffer {name} was not loaded and the open_flamingo model has no buffer of "
                                   "that name")
            module_name, _, attr = name.rpartition(".")
            model.get_submodule(module_name)._buffers[attr] = live_buffers[name]


def from_open_flamingo(source, *, lang_encoder=None, vision_encoder=None, ln_post_on_tokens: bool | None = None,
                       cross_attn_every_n_layers: int | None = None, tokenizer=None,
                       media_token_id: int | None = None, eoc_token_id: int | None = None,
                       num_base_tokens: int | None = None, decoder_layers_attr_name: str | None = None,
                       trust_remote_code: bool = False, dtype: torch.dtype | None = None, quantization=None,
                       device_map=None, max_memory=None, offload_folder=None):
    """A fastflamingo :class:`~fastflamingo.Flamingo` computing what an open_flamingo model does.

    Args:
        source: a live ``open_flamingo.src.flamingo.Flamingo`` (its tensors are shared, not copied:
            ``copy.deepcopy`` the result for an independent model; a ``dtype``, quantization or
            device given casts the result's own, and leaves the live model as it was), or an open_flamingo checkpoint
            (.pt / .bin / .safetensors path, or a state dict), full or trainable-only, e.g.
            OpenFlamingo-3B/4B/9B or Med-Flamingo.
        lang_encoder, vision_encoder, tokenizer, media_token_id, eoc_token_id, cross_attn_every_n_layers,
        decoder_layers_attr_name, trust_remote_code: for a checkpoint only, see
            :func:`fastflamingo.convert.open_flamingo_ckpt.from_open_flamingo_checkpoint`.
        ln_post_on_tokens: whether open_clip's ``ln_post`` applies to the patch tokens; for a live
            model it is read from its encoder unless given, so outputs match it.
        num_base_tokens: vocabulary size before the Flamingo tokens (to train only their rows);
            for a live model whose input embedding trains (open_flamingo's factory's default) None
            trains every row, as it does.
        dtype, quantization: cast / quantize the result (:func:`fastflamingo.quant.quantize_model`).
        device_map, max_memory, offload_folder: spread the result over devices with accelerate
            (:func:`fastflamingo.distribute.dispatch`).
    """
    from .load import check_placement, finish
    check_placement(dtype=dtype, quantization=quantization, device_map=device_map, max_memory=max_memory,
                    offload_folder=offload_folder)
    if not isinstance(source, nn.Module):
        from .open_flamingo_ckpt import from_open_flamingo_checkpoint
        return from_open_flamingo_checkpoint(
            source, lang_encoder=lang_encoder, vision_encoder=vision_encoder, ln_post_on_tokens=ln_post_on_tokens,
            cross_attn_every_n_layers=cross_attn_every_n_layers, tokenizer=tokenizer, media_token_id=media_token_id,
            eoc_token_id=eoc_token_id, num_base_tokens=num_base_tokens,
            decoder_layers_attr_name=decoder_layers_attr_name, trust_remote_code=trust_remote_code,
            dtype=dtype, quantization=quantization, device_map=device_map, max_memory=max_memory, offload_folder=offload_folder)
    unused = {k: v for k, v in dict(lang_encoder=lang_encoder, vision_encoder=vision_encoder, tokenizer=tokenizer,
                                    media_token_id=media_token_id, eoc_token_id=eoc_token_id,
                                    cross_attn_every_n_layers=cross_attn_every_n_layers,
                                    decoder_layers_attr_name=decoder_layers_attr_name).items() if v is not None}
    if unused:
        raise ValueError(f"{sorted(unused)} apply to a checkpoint source only: a live open_flamingo model "
                         "already holds its LM, vision encoder and token ids")
    model = _from_live(source, ln_post_on_tokens=ln_post_on_tokens, num_base_tokens=num_base_tokens)
    training = source.training
    return finish(model, dtype=dtype, quantization=quantization, device_map=device_map, max_memory=max_memory, offload_folder=offload_folder).train(training)


def _from_live(live: nn.Module, *, ln_post_on_tokens: bool | None, num_base_tokens: int | None):
    from transformers import AutoModelForCausalLM

    from ..model import Flamingo
    if num_base_tokens is None and live.lang_encoder.get_input_embeddings().weight.requires_grad:
        num_base_tokens = 0  # it trains its whole input embedding (open_flamingo's factory's default): so does this
    config = config_from_open_flamingo(live, ln_post_on_tokens=ln_post_on_tokens, num_base_tokens=num_base_tokens)
    hf_config = type(live.lang_encoder.config).from_dict(live.lang_encoder.config.to_dict())
    with torch.device("meta"):  # (running the live LM's attention: from_config's default is "sdpa")
        lm = AutoModelForCausalLM.from_config(
            hf_config, attn_implementation=getattr(live.lang_encoder.config, "_attn_implementation", None))
    # the vision encoder as a module of its own over the same tensors: casting, freezing or moving
    # the result must not change the live model's encoder (its LM is rebuilt above for the same reason)
    # (its own Parameter objects, over the live ones' storage: Flamingo() freezes them first)
    memo = {id(p): nn.Parameter(p.detach(), requires_grad=p.requires_grad) for p in live.vision_encoder.parameters()}
    memo |= {id(b): b for b in live.vision_encoder.buffers()}
    visual = copy.deepcopy(live.vision_encoder, memo=memo)
    model = Flamingo(config, vision_encoder=visual, lang_encoder=lm)
    model.load_state_dict(live.state_dict(), strict=True, assign=True)  # duplicates: drop_duplicate_keys_hook
    _fill_meta_buffers(model, live)
    if getattr(hf_config, "tie_word_embeddings", False):
        model.lang_encoder.tie_weights()
    return model
