"""``create_model_and_transforms``: open_flamingo's entry point, same signature and meaning, so that
switching to fastflamingo is a change of import.

One deliberate difference: nothing runs remote code unless ``trust_remote_code=True`` is passed
(open_flamingo always passes True), and open_clip's ``ln_post`` on patch tokens must be chosen
(``ln_post_on_tokens``: False for OpenFlamingo's released weights, SEMANTICS.md).
"""
from __future__ import annotations

from .config import CrossAttentionConfig, FlamingoConfig, ResamplerConfig, VisionConfig
from .convert.io import load_hf_causal_lm
from .convert.open_flamingo import open_clip_image_size
from .convert.pretrained import record_sources
from .lm import decoder_layers_attr_for
from .tokens import setup_tokenizer

_FLAMINGO_KWARGS = {"only_attend_immediate_media", "gradient_checkpointing"}


def create_model_and_transforms(clip_vision_encoder_path: str, clip_vision_encoder_pretrained: str | None,
                                lang_encoder_path: str, tokenizer_path: str, cross_attn_every_n_layers: int = 1,
                                use_local_files: bool = False, decoder_layers_attr_name: str | None = None,
                                freeze_lm_embeddings: bool = False, cache_dir: str | None = None, *,
                                ln_post_on_tokens: bool | None = None, trust_remote_code: bool = False,
                                quantization=None, device_map=None, max_memory=None, offload_folder=None, **flamingo_kwargs):
    """A Flamingo from an open_clip vision encoder and a Hugging Face LM, as open_flamingo builds it.

    Args:
        clip_vision_encoder_path: open_clip model name, e.g. ``"ViT-L-14"``.
        clip_vision_encoder_pretrained: open_clip pretrained tag (``"openai"``), a local checkpoint
            path, or None for random weights.
        lang_encoder_path, tokenizer_path: Hugging Face names or local directories.
        cross_attn_every_n_layers: a cross-attention block before every n-th decoder layer
            (open_flamingo placement: layers n-1, 2n-1, ...).
        use_local_files: never reach the network (``local_files_only``).
        decoder_layers_attr_name: dotted path of the LM's decoder layers (None: by LM family).
        freeze_lm_embeddings: open_flamingo trains the whole input embedding matrix unless True
            (only the input one: an untied output embedding, ``lm_head``, stays frozen, as there).
        cache_dir: Hugging Face / open_clip download cache.
        ln_post_on_tokens: required; whether open_clip's ``ln_post`` applies to the patch tokens.
        trust_remote_code: allow the LM's / tokenizer's own code (e.g. MosaicML's MPT repos).
        quantization: passed to :func:`fastflamingo.quant.quantize_model`.
        device_map, max_memory, offload_folder: spread the model over devices with accelerate
            (:func:`fastflamingo.distribute.dispatch`).
        **flamingo_kwargs: ``only_attend_immediate_media``; ``gradient_checkpointing=True``: activation
            checkpointing in training (:meth:`Flamingo.activation_checkpointing_enable`), which
            open_flamingo's flag asks of its training script.

    Returns:
        (model, image_processor, tokenizer): the image processor is open_clip's evaluation transform
        (PIL image -> (3, H, W)); the tokenizer has ``<image>``, ``<|endofchunk|>`` (and ``<PAD>``).
        ``model.load_state_dict(open_flamingo_checkpoint, strict=False)`` loads open_flamingo weights.
    """
    import open_clip
    from transformers import AutoTokenizer
    from .convert.load import check_placement
    check_placement(quantization=quantization, device_map=device_map, max_memory=max_memory,
                    offload_folder=offload_folder)
    unknown = set(flamingo_kwargs) - _FLAMINGO_KWARGS
    if unknown:
        raise TypeError(f"create_model_and_transforms got unexpected keyword(s) {sorted(unknown)}; "
                        f"accepted: {sorted(_FLAMINGO_KWARGS)}")
    if not flamingo_kwargs.get("only_attend_immediate_media", True):
        from .convert.open_flamingo import warn_all_previous_mode
        warn_all_previous_mode()
    clip, _, image_processor = open_clip.create_model_and_transforms(
        clip_vision_encoder_path, pretrained=clip_vision_encoder_pretrained, cache_dir=cache_dir)
    visual = clip.visual.eval()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path, local_files_only=use_local_files,
                                              trust_remote_code=trust_remote_code, cache_dir=cache_dir)
    lm = load_hf_causal_lm(lang_encoder_path, trust_remote_code=trust_remote_code, cache_dir=cache_dir,
                           local_files_only=use_local_files)
    ids = setup_tokenizer(tokenizer, lm)
    vis_dim = open_clip.get_model_config(clip_vision_encoder_path)["vision_cfg"]["width"]
    config = FlamingoConfig(
        vision=VisionConfig(source="open_clip", dim=vis_dim, open_clip_name=clip_vision_encoder_path, keep_cls=False,
                            ln_post_on_tokens=ln_post_on_tokens, image_size=open_clip_image_size(visual)),
        resampler=ResamplerConfig(),  # open_flamingo's: depth 6, 8 x 64 heads, 64 latents
        cross_attention=CrossAttentionConfig(every_n_layers=cross_attn_every_n_layers, heads=8, dim_head=64),
        lm=lm.config.to_dict(), decoder_layers_attr=decoder_layers_attr_for(lm, decoder_layers_attr_name),
        only_attend_immediate_media=flamingo_kwargs.get("only_attend_immediate_media", True),
        media_token_id=ids["media_token_id"], eoc_token_id=ids["eoc_token_id"], pad_token_id=ids["pad_token_id"],
        eos_token_id=getattr(lm.config, "eos_token_id", None),
        # open_flamingo trains every row of the input embeddings (0 = from row 0 on), not the output ones
        num_base_tokens=None if freeze_lm_embeddings else 0, train_output_embeddings=False)
    from .convert.load import finish
    from .model import Flamingo
    model = finish(Flamingo(config, vision_encoder=visual, lang_encoder=lm), quantization=quantization,
                   device_map=device_map, max_memory=max_memory, offload_folder=offload_folder)
    record_sources(model, lang_encoder_path, (clip_vision_encoder_path, clip_vision_encoder_pretrained), cache_dir)
    if flamingo_kwargs.get("gradient_checkpointing"):
        model.activation_checkpointing_enable()
    return model, image_processor, tokenizer
