"""The Flamingo model on many LMs and vision encoders; training; input validation."""
import copy
import re

import pytest
import torch
from torch import nn

from fastflamingo import CrossAttentionConfig, Flamingo, FlamingoConfig, ResamplerConfig, VisionConfig, mpt, setup_tokenizer
from fastflamingo.presets import preset_config
from fastflamingo.vision import vision_features

from peers import EOS_ID, MEDIA_ID, tiny_lm, tiny_open_clip, tiny_tokenizer

FAMILIES = ["llama", "mpt", "gpt_neox", "opt", "gptj", "gpt2"]
TINY_CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 image_size=32, patch_size=8)


def config(**kw):
    base = dict(vision=VisionConfig(source="hf_clip", dim=32, hf_config=TINY_CLIP, image_size=32),
                resampler=ResamplerConfig(depth=2, heads=2, dim_head=8, num_latents=4, max_num_frames=3),
                cross_attention=CrossAttentionConfig(every_n_layers=2, heads=2, dim_head=8),
                media_token_id=MEDIA_ID, eoc_token_id=126, eos_token_id=EOS_ID)
    base.update(kw)
    return FlamingoConfig(**base)


def set_gates(model, value):
    with torch.no_grad():
        for block in model.gated_cross_attn_layers:
            for name, p in block.named_parameters():
                if "gate" in name or "alpha" in name:
                    p.fill_(value)


def batch(B=2, T=16, N=2, F=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 120, (B, T), generator=g)
    ids[:, 2] = MEDIA_ID
    ids[0, 9] = MEDIA_ID
    return torch.randn(B, N, F, 3, 32, 32, generator=g), ids


@pytest.mark.parametrize("family", FAMILIES)
def test_every_supported_lm_family(family):
    lm = tiny_lm(family)
    plain = copy.deepcopy(lm)
    model = Flamingo(config(), lang_encoder=lm).eval()
    # the model runs an MPT's attention with SDPA (fastflamingo.mpt; Hugging Face's logits within
    # fp32 rounding, tests/test_mpt.py): the plain LM too, for the bitwise comparison below
    assert mpt.prepare(plain) == (family == "mpt")
    vx, ids = batch()
    with torch.no_grad():
        # gates start at 0: the frozen LM's own output, exactly
        assert torch.equal(model(vx, ids).logits, plain(input_ids=ids).logits)
        set_gates(model, 0.5)
        with_images = model(vx, ids).logits
        other_images = model(vx.flip(1), ids).logits
    # only tokens after an image are conditioned on it
    assert torch.equal(with_images[:, :2], model(vx, ids).logits[:, :2])
    assert (with_images[:, 2:] - other_images[:, 2:]).abs().max() > 1e-4
    # composition: the LM's class is untouched, other instances are unaffected
    assert type(model.lang_encoder) is type(plain)
    with torch.no_grad():
        assert torch.equal(plain(input_ids=ids).logits, copy.deepcopy(plain)(input_ids=ids).logits)


def test_unsupported_lm_lists_supported_families():
    from transformers import BertConfig, BertLMHeadModel
    lm = BertLMHeadModel(BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                    intermediate_size=64, is_decoder=True))
    with pytest.raises(ValueError, match=r"model_type='bert'.*Supported LM families: \['falcon', 'gemma', 'gemma2'"):
        Flamingo(config(), lang_encoder=lm)
    # with an explicit path it works (one layer: a block before every one)
    model = Flamingo(config(decoder_layers_attr="bert.encoder.layer",
                            cross_attention=CrossAttentionConfig(every_n_layers=1, heads=2, dim_head=8)), lang_encoder=lm)
    assert len(model.gated_cross_attn_layers) == 1


def test_cross_attention_placement_rules():
    of = Flamingo(config(cross_attention=CrossAttentionConfig(every_n_layers=2, heads=2, dim_head=8)),
                  lang_encoder=tiny_lm("llama"))
    idefics_rule = Flamingo(config(cross_attention=CrossAttentionConfig(
        style="idefics", every_n_layers=2, placement="first_of_every_n")), lang_encoder=tiny_lm("llama"))
    layers = of.lang_encoder.model.layers
    assert [i for i, layer in enumerate(layers) if layer.gated_cross_attn_layer is not None] == [1, 3]
    layers = idefics_rule.lang_encoder.model.layers
    assert [i for i, layer in enumerate(layers) if layer.gated_cross_attn_layer is not None] == [0, 2]


def test_vision_adapters():
    pixels = torch.randn(2, 3, 32, 32)
    clip = tiny_open_clip().visual
    with pytest.raises(ValueError, match="explicit vision.ln_post_on_tokens"):
        Flamingo(config(vision=VisionConfig(source="open_clip", dim=32)), vision_encoder=clip,
                 lang_encoder=tiny_lm("llama"))
    with_ln = vision_features(clip, pixels, VisionConfig(source="open_clip", dim=32, ln_post_on_tokens=True))
    without = vision_features(clip, pixels, VisionConfig(source="open_clip", dim=32, ln_post_on_tokens=False))
    assert with_ln.shape == without.shape == (2, 16, 32)
    torch.testing.assert_close(with_ln, clip.ln_post(without))
    cls = vision_features(clip, pixels, VisionConfig(source="open_clip", dim=32, ln_post_on_tokens=False,
                                                     keep_cls=True))
    assert cls.shape == (2, 17, 32)

    import timm
    nfnet = timm.create_model("test_nfnet", pretrained=False, num_classes=0)
    feats = vision_features(nfnet, pixels, VisionConfig(source="timm", dim=nfnet.num_features))
    assert feats.dim() == 3 and feats.shape[2] == nfnet.num_features

    class Custom(nn.Module):
        def forward(self, x):
            return x.flatten(2).transpose(1, 2)[:, :, :3]  # (B, H*W, 3)

    assert vision_features(Custom(), pixels, VisionConfig(source="module", dim=3)).shape == (2, 1024, 3)

    class Bad(nn.Module):
        def forward(self, x):
            return x.mean()

    with pytest.raises(ValueError, match="must return \\(B, V, D\\)"):
        vision_features(Bad(), pixels, VisionConfig(source="module", dim=3))


def test_timm_nfnet_model_end_to_end():
    import timm
    nfnet = timm.create_model("test_nfnet", pretrained=False, num_classes=0)
    cfg = config(vision=VisionConfig(source="timm", dim=nfnet.num_features, timm_name="test_nfnet"))
    model = Flamingo(cfg, vision_encoder=nfnet, lang_encoder=tiny_lm("gpt2")).eval()
    vx, ids = batch()
    assert model(vx, ids).logits.shape == (2, 16, 128)


def test_video_frames_use_frame_embeddings():
    model = Flamingo(config(), lang_encoder=tiny_lm("llama")).eval()
    set_gates(model, 0.5)
    vx, ids = batch(F=3)
    with torch.no_grad():
        out = model(vx, ids).logits
        swapped = model(vx.flip(2), ids).logits  # same frames, other order
    assert (out[:, 2:] - swapped[:, 2:]).abs().max() > 1e-4
    with pytest.raises(ValueError, match="F=4 frames .* max_num_frames=3"):
        model(torch.randn(2, 2, 4, 3, 32, 32), ids)


def test_text_only_and_rows_with_fewer_images():
    model = Flamingo(config(), lang_encoder=tiny_lm("llama")).eval()
    set_gates(model, 0.5)
    ids = torch.randint(3, 120, (2, 10))
    out = model(None, ids).logits  # no images: attention contributes 0, the FF still applies
    assert out.shape == (2, 10, 128)
    ids[0, 3] = MEDIA_ID  # row 1 has no image, row 0 one
    out = model(torch.randn(2, 1, 1, 3, 32, 32), ids).logits
    assert torch.isfinite(out).all()


def test_input_errors_name_the_problem():
    model = Flamingo(config(resampler=ResamplerConfig(depth=1, heads=2, dim_head=8, num_latents=4,
                                                      max_num_media=2)),
                     lang_encoder=tiny_lm("llama")).eval()
    vx, ids = batch(N=2)
    ids[1, [5, 6, 7]] = MEDIA_ID
    with pytest.raises(ValueError, match=r"row 1 of the batch has 4 <image> tokens but only 2 images"):
        model(vx, ids)
    with pytest.raises(ValueError, match=r"vision_x must be a \(B, N_media, F_frames, C, H, W\) tensor, got \(2, 3, 32, 32\)"):
        model(torch.randn(2, 3, 32, 32), ids)
    with pytest.raises(ValueError, match="vision_x has batch 1 but lang_x has batch 2"):
        model(vx[:1], ids)
    with pytest.raises(ValueError, match="N=3 media per row but the model supports max_num_media=2"):
        model(torch.randn(2, 3, 1, 3, 32, 32), ids)
    with pytest.raises(TypeError, match="float pixels"):
        model(vx.long(), ids)
    # the tensor's rank is what is wrong here, not its batch (its first dim, 3, is a channel count)
    for call in (model, lambda v, x: model.generate(v, x, max_new_tokens=1)):
        with pytest.raises(ValueError, match=r"tensor, got \(3, 32, 32\); add singleton dims"):
            call(torch.randn(3, 32, 32), ids)


def test_images_of_another_size_or_channel_count_are_refused_by_name():
    """ViT encoders (Hugging Face CLIP, open_clip) take one resolution and channel count: other
    images fail with a message naming both sizes (not a conv or position-embedding shape error)."""
    from fastflamingo.vision import expected_pixels
    clip = tiny_open_clip().visual
    models = [Flamingo(config(), lang_encoder=tiny_lm("llama")).eval(),
              Flamingo(config(vision=VisionConfig(source="open_clip", dim=32, ln_post_on_tokens=False)),
                       vision_encoder=clip, lang_encoder=tiny_lm("llama")).eval()]
    _, ids = batch(N=2)
    for model in models:
        assert expected_pixels(model.vision_encoder, model.config.vision) == (3, 32, 32)
        model(torch.randn(2, 2, 1, 3, 32, 32), ids)  # the size it takes
        for shape, chw in (((2, 2, 1, 3, 64, 64), r"\(3, 64, 64\)"), ((2, 2, 1, 4, 32, 32), r"\(4, 32, 32\)"),
                           ((2, 2, 1, 3, 32, 48), r"\(3, 32, 48\)")):
            for call in (model, lambda v, x: model.generate(v, x, max_new_tokens=1)):
                with pytest.raises(ValueError, match=rf"vision_x images are \(C, H, W\) = {chw} but the vision "
                                                     r"encoder takes \(3, 32, 32\): preprocess them"):
                    call(torch.randn(*shape), ids)
    # a conv net takes any resolution: nothing to check
    import timm
    nfnet = timm.create_model("test_nfnet", pretrained=False, num_classes=0)
    assert expected_pixels(nfnet, VisionConfig(source="timm", dim=nfnet.num_features)) is None


def test_token_ids_and_unused_images_are_checked_in_forward_and_generate():
    model = Flamingo(config(), lang_encoder=tiny_lm("llama")).eval()
    vx, ids = batch(N=2)  # row 0 has 2 <image> tokens, row 1 has 1
    vocab = model.lang_encoder.get_input_embeddings().num_embeddings
    bad = ids.clone()
    bad[1, 4] = vocab
    for call in (lambda x: model(vx, x), lambda x: model.generate(vx, x, max_new_tokens=1)):
        with pytest.raises(ValueError, match=rf"token id {vocab} \(row 1, position 4\) but the LM's input embedding "
                                             rf"has {vocab} rows \(ids 0..{vocab - 1}\)"):
            call(bad)
        with pytest.raises(ValueError, match=r"token id -1 \(row 0, position 0\)"):
            call(torch.cat([ids.new_full((2, 1), -1), ids], 1))
        with pytest.raises(TypeError, match="integer token ids, got torch.float32"):
            call(ids.float())
        with pytest.raises(ValueError, match=r"lang_x \(2, 0\) holds no tokens"):
            call(ids[:, :0])
    with pytest.raises(ValueError, match=r"labels \(2, 15\) must have lang_x's shape \(2, 16\)"):
        model(vx, ids, labels=ids[:, 1:])
    # a third image that no row's text refers to: seen by no token, so the caller hears of it
    vx3 = torch.randn(2, 3, 1, 3, 32, 32)
    for call in (lambda: model(vx3, ids), lambda: model.generate(vx3, ids, max_new_tokens=1)):
        with pytest.warns(UserWarning, match=r"3 images were given per row but no row of lang_x has more than 2 "
                                             r"<image> tokens: image 3 is seen by no token") as caught:
            call()
        assert caught[0].filename == __file__  # points at the caller's line, not fastflamingo's
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(vx, ids)  # row 1 has fewer images than row 0: padding, nothing to say
        model.generate(vx, ids, max_new_tokens=1)
        model(vx3, ids, text_time=model.text_time(ids))  # explicit text_time: the caller chose


def test_tokenizer_setup_adds_tokens_and_only_new_rows_train():
    tok = tiny_tokenizer()
    lm = tiny_lm("llama")
    n_before = lm.get_input_embeddings().weight.shape[0]
    ids = setup_tokenizer(tok, lm)
    assert tok.convert_ids_to_tokens(ids["media_token_id"]) == "<image>"
    assert tok.convert_ids_to_tokens(ids["eoc_token_id"]) == "<|endofchunk|>"
    assert tok.pad_token == "<PAD>"
    assert lm.get_input_embeddings().weight.shape[0] == len(tok) == 123
    assert ids["num_base_tokens"] == 120 <= n_before
    assert tok("w5 <image> w7<|endofchunk|>")["input_ids"] == [5, ids["media_token_id"], 7, ids["eoc_token_id"]]


def test_tiny_preset_trains_and_only_the_right_parameters_get_gradients():
    torch.manual_seed(0)
    model = Flamingo.from_preset("tiny").train()
    c = model.config
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, c.num_base_tokens, (4, 24), generator=g)
    ids[:, [0, 12]] = c.media_token_id
    ids[:, [11, 23]] = c.eoc_token_id
    vx = torch.randn(4, 2, 1, 3, 32, 32, generator=g)
    labels = ids.clone()
    labels[ids == c.media_token_id] = -100
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameter_groups(weight_decay=0.1), lr=3e-3)
    losses = []
    for step in range(8):
        opt.zero_grad()
        loss = model(vx, ids, labels=labels).loss
        loss.backward()
        if step == 0:
            # gradients reach exactly the resampler, the cross-attention blocks and the embedding
            with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
            embeddings = ("lang_encoder.model.embed_tokens.weight", "lang_encoder.lm_head.weight")
            assert all(n.startswith("perceiver.") or "gated_cross_attn_layer." in n or n in embeddings
                       for n in with_grad), sorted(with_grad)
            assert any(n.startswith("perceiver.") for n in with_grad)
            assert any("gated_cross_attn_layer." in n for n in with_grad)
            for emb in (model.lang_encoder.get_input_embeddings(), model.lang_encoder.get_output_embeddings()):
                assert emb.weight.grad[:c.num_base_tokens].abs().sum() == 0  # the LM's own rows: frozen
                assert emb.weight.grad[c.num_base_tokens:].abs().sum() > 0   # <image>, <|endofchunk|> rows
        if step == 7:  # once the tanh gates have opened, the resampler learns too
            assert model.perceiver.latents.grad.abs().sum() > 0
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    after = dict(model.named_parameters())
    for emb in ("lang_encoder.model.embed_tokens.weight", "lang_encoder.lm_head.weight"):
        assert torch.equal(after[emb][:c.num_base_tokens], frozen_before[emb][:c.num_base_tokens])
        assert not torch.equal(after[emb][c.num_base_tokens:], frozen_before[emb][c.num_base_tokens:])
    for n, p in after.items():
        if not p.requires_grad:
            assert torch.equal(p, frozen_before[n]), n


def test_token_ids_outside_the_vocabulary_and_dtype_names_are_checked_at_build():
    """An <image> id that is no row of the LM's embedding would leave every image unseen: refused
    when the model is built. Dtypes are taken by name too, as transformers takes them; a non-float
    one is refused by name."""
    with pytest.raises(ValueError, match=r"config.media_token_id=600 is not a row of the LM's input embedding "
                                         r"\(512 rows, ids 0..511\): add Flamingo's tokens"):
        Flamingo.from_preset("tiny", media_token_id=600)
    with pytest.raises(ValueError, match=r"config.media_token_id=-1 is not a row"):
        Flamingo.from_preset("tiny", media_token_id=-1)  # never set
    with pytest.raises(ValueError, match=r"config.eoc_token_id=512 is not a row"):
        Flamingo.from_preset("tiny", eoc_token_id=512)
    assert Flamingo.from_preset("tiny", eoc_token_id=-1).config.eoc_token_id == -1  # none: allowed
    assert Flamingo.from_preset("tiny", dtype="bfloat16").dtype == torch.bfloat16
    assert Flamingo.from_preset("tiny", dtype="torch.float16").dtype == torch.float16
    for bad in ("int8", torch.int8, "auto"):
        with pytest.raises(ValueError, match=rf"dtype={bad!r} is not a floating-point torch dtype"):
            Flamingo.from_preset("tiny", dtype=bad)


def test_config_json_round_trip_and_errors():
    cfg = config()
    assert FlamingoConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['colour'\]"):
        FlamingoConfig.from_dict({**cfg.to_dict(), "colour": 1})
    with pytest.raises(ValueError, match="cross_attention.style='perceiver'"):
        config(cross_attention=CrossAttentionConfig(style="perceiver"))
    from fastflamingo import preset_config
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        preset_config("huge")


def test_a_misspelt_keyword_or_a_mask_of_another_length_is_refused():
    """forward handed unknown keywords to the LM's **kwargs, which dropped them: attn_mask= ran
    unmasked, without a word. A (B, T - 2) attention_mask was padded with zeros by Hugging Face:
    the last two tokens masked out, silently. Continuing after a cache, the mask covers cached + T."""
    model = Flamingo.from_preset("tiny").eval()
    c = model.config
    ids = torch.randint(3, c.num_base_tokens, (2, 12))
    ids[:, 1] = c.media_token_id
    vx = torch.randn(2, 1, 1, 3, c.vision.image_size, c.vision.image_size)
    mask = torch.ones_like(ids)
    with pytest.raises(TypeError, match=r"unexpected keyword\(s\) \['attn_mask'\] \('attn_mask': did you mean "
                                        r"'attention_mask'\?\): the LM \(LlamaForCausalLM\) would ignore them"):
        model(vx, ids, attn_mask=mask)
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 10\), lang_x \(2, 12\): it must be "
                                         r"\(B, T\) = \(2, 12\)"):
        model(vx, ids, attention_mask=mask[:, :10])
    with torch.no_grad():  # what the LM takes by name or through its **kwargs still goes through
        out = model(vx, ids[:, :8], attention_mask=mask[:, :8], use_cache=True, output_hidden_states=True)
        assert out.hidden_states is not None
        tt = model.text_time(ids)
        more = model(lang_x=ids[:, 8:], visual_tokens=model.encode_vision(vx), text_time=tt[:, 8:],
                     attention_mask=mask, past_key_values=out.past_key_values)
        whole = model(vx, ids, attention_mask=mask)
    assert torch.allclose(more.logits, whole.logits[:, 8:], atol=1e-5)


def test_settings_that_silently_changed_behaviour_are_refused_and_mixed_dtypes_and_modes_are_taken():
    """eos_resets_media without an eos_token_id (the reset was silently off), a negative
    num_base_tokens (every input row trained, only the last output rows); vision_x where the LM
    (its blocks with it) was cast apart from the resampler (a raw dtype error, where
    visual_tokens= ran); an RGBA or grayscale image through the fallback transforms (a reshape error)."""
    import dataclasses

    from PIL import Image

    from fastflamingo.inputs import _normalise
    cfg = preset_config("tiny")
    with pytest.raises(ValueError, match=r"eos_resets_media=True .* but eos_token_id is None"):
        dataclasses.replace(cfg, eos_resets_media=True, eos_token_id=None)
    with pytest.raises(ValueError, match=r"num_base_tokens must be an int >= 0 .*, got -3"):
        dataclasses.replace(cfg, num_base_tokens=-3)
    model = Flamingo(cfg).eval()
    model.lang_encoder.to(torch.bfloat16)
    ids = torch.randint(3, cfg.num_base_tokens, (2, 8))
    ids[:, 1] = cfg.media_token_id
    vx = torch.randn(2, 1, 1, 3, cfg.vision.image_size, cfg.vision.image_size)
    with torch.no_grad():
        a = model(vx, ids).logits
        b = model(lang_x=ids, visual_tokens=model.encode_vision(vx)).logits
    assert torch.equal(a, b)
    rgb = Image.new("RGB", (8, 6), (200, 10, 30))
    for mode in ("RGBA", "L", "P"):
        assert torch.equal(_normalise(rgb.convert(mode)), _normalise(rgb.convert(mode).convert("RGB")))


@pytest.mark.parametrize("part,field,value", [
    ("cross_attention", "heads", 0), ("cross_attention", "dim_head", 0),
    ("cross_attention", "heads", None), ("cross_attention", "dim_head", None),  # None: idefics style only
    ("cross_attention", "heads", 2.0), ("cross_attention", "ff_mult", 0), ("cross_attention", "intermediate_size", 0),
    ("cross_attention", "every_n_layers", 0), ("cross_attention", "every_n_layers", 2.5),
    ("cross_attention", "every_n_layers", True), ("cross_attention", "rms_norm_eps", -1.0),
    ("cross_attention", "rms_norm_eps", 0), ("resampler", "ff_mult", 0), ("resampler", "max_num_frames", -1),
    ("resampler", "max_num_frames", 0), ("resampler", "max_num_media", 0), ("resampler", "depth", True),
])
def test_config_values_are_refused_naming_the_field(part, field, value):
    """Each would fail deep in the model (a reshape of 0 elements, a division by zero), or build a
    degenerate one (a feed-forward of width 0, a model without cross-attention): refused when the
    config is made, and when a model is built from one changed since."""
    cfg = preset_config("tiny")
    setattr(getattr(cfg, part), field, value)
    with pytest.raises(ValueError, match=rf"{part}\.{field} must be .*, got {re.escape(repr(value))}"):
        cfg.validate()
    with pytest.raises(ValueError, match=rf"{part}\.{field} must be"):
        Flamingo(cfg)
    with pytest.raises(ValueError, match=rf"{part}\.{field} must be"):
        FlamingoConfig.from_dict(cfg.to_dict())


def test_idefics_heads_that_do_not_divide_the_width_are_refused():
    """IDEFICS's blocks take dim_head = width / heads: 3 heads of a 64-wide LM would make a
    63-wide attention (IDEFICS itself raises); a given dim_head needs no division."""
    idefics = dict(style="idefics", every_n_layers=2, placement="first_of_every_n")
    with pytest.raises(ValueError, match=r"cross_attention.heads=3 does not divide the LM's width 64"):
        Flamingo.from_preset("tiny", cross_attention=CrossAttentionConfig(heads=3, dim_head=None, **idefics))
    model = Flamingo.from_preset("tiny", cross_attention=CrossAttentionConfig(heads=3, dim_head=16, **idefics))
    assert model.gated_cross_attn_layers[0].cross_attn.q_proj.out_features == 48


@pytest.mark.parametrize("every_n_layers", [5, 9])
def test_a_placement_that_puts_no_block_in_the_lm_is_refused(every_n_layers):
    """Every n-th layer of a 4-layer LM with n > 4 is none: the model would ignore its images (and
    its resampler would never get a gradient)."""
    with pytest.raises(ValueError, match=rf"cross_attention.every_n_layers={every_n_layers} puts no cross-attention "
                                         r"block in the LM's 4 decoder layers \(placement 'after_every_n': a block "
                                         r"before layer i when \(i \+ 1\) % n == 0\).*every_n_layers <= 4"):
        Flamingo.from_preset("tiny", cross_attention=CrossAttentionConfig(every_n_layers=every_n_layers))
    first = Flamingo.from_preset("tiny", cross_attention=CrossAttentionConfig(
        every_n_layers=every_n_layers, placement="first_of_every_n"))  # layer 0 always has one
    assert len(first.gated_cross_attn_layers) == 1
    assert len(Flamingo.from_preset("tiny", cross_attention=CrossAttentionConfig(every_n_layers=4))
               .gated_cross_attn_layers) == 1


def test_visual_tokens_are_checked_and_cast_like_pixels():
    model = Flamingo.from_preset("tiny", seed=0).eval()
    set_gates(model, 0.8)
    ids = torch.tensor([[1, 510, 5, 6, 7], [1, 5, 510, 6, 7]])
    with torch.no_grad():
        vt = model.encode_vision(torch.randn(2, 1, 1, 3, 32, 32))
        want = model(lang_x=ids, visual_tokens=vt).logits
        for dtype in (torch.bfloat16, torch.float64):  # cast to the blocks' dtype, as pixels to the encoder's
            got = model(lang_x=ids, visual_tokens=vt.to(dtype)).logits
            torch.testing.assert_close(got, want, atol=0.05 if dtype == torch.bfloat16 else 1e-6, rtol=0)
    with pytest.raises(TypeError, match=r"visual_tokens must be float, got torch.int64"):
        model(lang_x=ids, visual_tokens=vt.long())
    with pytest.raises(ValueError, match=r"visual_tokens must be \(B, N_media, L_tokens, D_vis\).*got \(2, 8, 32\)"):
        model(lang_x=ids, visual_tokens=vt[:, 0])
    with pytest.raises(ValueError, match=r"visual_tokens \(2, 1, 8, 16\) are 16 wide but config.vision.dim is 32"):
        model(lang_x=ids, visual_tokens=vt[..., :16])
    for bad in (vt[:1], vt.repeat(2, 1, 1, 1)):
        with pytest.raises(ValueError, match=rf"has batch {bad.shape[0]} but lang_x has batch 2"):
            model(lang_x=ids, visual_tokens=bad)
    with pytest.raises(ValueError, match=r"visual_tokens \(2, 8, 1, 32\) has L=1 tokens per image but the "
                                         r"resampler makes 8 \(config.resampler.num_latents\)"):
        model(lang_x=ids, visual_tokens=vt.transpose(1, 2))  # (B, L, N, D): would run as 8 images


def test_vision_x_without_frames_is_refused():
    model = Flamingo.from_preset("tiny", seed=0).eval()
    with pytest.raises(ValueError, match=r"vision_x \(1, 1, 0, 3, 32, 32\) has F=0 frames"):
        model(torch.randn(1, 1, 0, 3, 32, 32), torch.tensor([[1, 510, 5]]))


class _WideEncoder(nn.Module):
    """A 'module' vision encoder: (B, 3, H, W) -> (B, 4, 48) features."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3, 48)

    def forward(self, pixels):
        return self.proj(pixels.flatten(2).transpose(1, 2)[:, :4])


def test_vision_dim_other_than_the_encoders_width_is_refused_naming_vision_dim():
    """Known from the encoder's own config (Hugging Face CLIP, open_clip): at build; else at the
    first encode, before the resampler fails on a broadcast."""
    from transformers import CLIPVisionConfig, CLIPVisionModel
    wide = CLIPVisionModel(CLIPVisionConfig(**{**TINY_CLIP, "hidden_size": 48}))
    with pytest.raises(ValueError, match=r"config.vision.dim=32 but the vision encoder is 48 wide: set vision.dim=48"):
        Flamingo(preset_config("tiny"), vision_encoder=wide)
    clip = tiny_open_clip().visual
    with pytest.raises(ValueError, match=r"config.vision.dim=48 but the vision encoder is 32 wide"):
        Flamingo(config(vision=VisionConfig(source="open_clip", dim=48, ln_post_on_tokens=False, image_size=32)),
                 vision_encoder=clip, lang_encoder=tiny_lm("llama"))
    model = Flamingo(preset_config("tiny", vision=VisionConfig(source="module", dim=32, image_size=32)),
                     vision_encoder=_WideEncoder()).eval()
    with pytest.raises(ValueError, match=r"config.vision.dim=32 but the vision encoder's features are 48 wide"):
        model(torch.randn(1, 1, 1, 3, 32, 32), torch.tensor([[1, 510, 5]]))


def test_set_trainable_train_embeddings():
    """None: as config.num_base_tokens says; False: no row; True: the new rows, which needs
    num_base_tokens (which rows are new?), else an error rather than nothing."""
    model = Flamingo.from_preset("tiny")
    emb = model.lang_encoder.get_input_embeddings().weight
    model.set_trainable(train_embeddings=False)
    assert not emb.requires_grad
    model.set_trainable(train_embeddings=True)
    assert emb.requires_grad
    untracked = Flamingo.from_preset("tiny", num_base_tokens=None)
    with pytest.raises(ValueError, match=r"train_embeddings=True\) needs config.num_base_tokens.*0: every row"):
        untracked.set_trainable(train_embeddings=True)
    assert not untracked.lang_encoder.get_input_embeddings().weight.requires_grad
    assert Flamingo.from_preset("tiny", num_base_tokens=0).lang_encoder.get_input_embeddings().weight.requires_grad


@pytest.mark.parametrize("tied", [False, True])
def test_train_output_embeddings_false_trains_the_input_embeddings_new_rows_only(tied):
    """open_flamingo's recipe (create_model_and_transforms): an untied lm_head stays frozen; a tied
    one is the input matrix, whose gradient through lm_head is masked to the new rows too."""
    lm = {**preset_config("tiny").lm, "tie_word_embeddings": tied}
    model = Flamingo.from_preset("tiny", lm=lm, train_output_embeddings=False).train()
    inp, out = model.lang_encoder.get_input_embeddings().weight, model.lang_encoder.get_output_embeddings().weight
    assert (inp is out) == tied and out.requires_grad == tied
    ids = torch.tensor([[1, 510, 5, 6, 511, 7, 8]])
    model(torch.randn(1, 1, 1, 3, 32, 32), ids, labels=ids).loss.backward()
    base = model.config.num_base_tokens
    assert inp.grad[:base].abs().sum() == 0 and inp.grad[base:].abs().sum() > 0
    assert tied or out.grad is None
    back = Flamingo(FlamingoConfig.from_json(model.config.to_json()))  # kept in config.json
    assert back.lang_encoder.get_output_embeddings().weight.requires_grad == tied


def test_kernels_folder_never_takes_the_top_level_name(tmp_path):
    """The repository's kernels/ is fastflamingo.kernels. Run from the repository root (its folder
    first on sys.path), ``import kernels`` must give PyPI's package of that name where one is
    installed (transformers and bitsandbytes import it; transformers >= 5.25 requires it), and
    otherwise an empty module, as a folder without ``__init__.py`` would give, which transformers
    takes for "not installed"; never fastflamingo's kernels."""
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    other = tmp_path / "kernels"
    other.mkdir()
    (other / "__init__.py").write_text("def get_kernel(name):\n    return 'hub ' + name\n")
    probe = ("import kernels, fastflamingo.kernels.image_causal as ours\n"
             "print(kernels.get_kernel('x'), ours.__name__)")

    def run(code, path):
        return subprocess.run([sys.executable, "-c", code], cwd=root, env={**os.environ, "PYTHONPATH": path},
                              capture_output=True, text=True)
    out = run(probe, str(tmp_path))
    assert out.returncode == 0 and out.stdout.split() == ["hub", "x", "fastflamingo.kernels.image_causal"], out
    # with the environment as it is: transformers >= 5.25 requires PyPI's kernels, so it may be
    # installed; then ``import kernels`` must be that package, else the empty module
    from importlib import metadata
    try:
        metadata.distribution("kernels")
        installed = True
    except metadata.PackageNotFoundError:
        installed = False
    check = ("assert kernels.__file__ and 'site-packages' in kernels.__file__ and hasattr(kernels, 'get_kernel'), "
             "kernels.__file__\n" if installed else
             "assert kernels.__file__ is None and not hasattr(kernels, 'image_causal'), vars(kernels)\n")
    probe = ("import kernels\n" + check +
             "try:\n    import kernels.image_causal\nexcept ImportError:\n    pass\n"
             "else:\n    raise AssertionError('fastflamingo kernels imported as kernels')\n"
             "from transformers.utils import is_kernels_available\n"
             "from transformers import CLIPVisionModel\n"
             "import fastflamingo.kernels.image_causal\n"
             "print(is_kernels_available())")
    out = run(probe, "")
    assert out.returncode == 0 and out.stdout.split() == [str(installed)], out.stderr[-800:]


# ----------------------------------------------------------------------------- positions

TABLES = {"gpt2": "n_positions", "opt": "max_position_embeddings", "gptj": "n_positions"}


def _text(k):
    """k text token ids (no <image>, within the tiny vocabulary)."""
    return [3 + i % 100 for i in range(k)]


def _fill_to(model, vx, ids, new, **kw):
    """generate exactly ``new`` tokens (no early stop), the LM fed ``new - 1`` of them."""
    out = model.generate(vx, ids, max_new_tokens=new, min_new_tokens=new, **kw)
    assert out.shape[1] == ids.shape[1] + new
    return out


@pytest.mark.parametrize("family", sorted(TABLES))
def test_positions_past_a_position_table_are_refused_before_any_work(family, monkeypatch):
    """GPT-2, OPT, GPT-J index a table of positions: a call that would read past it fails with a
    message naming the lengths and the table (not an IndexError deep in the LM; on a GPU, a device
    assert), before any work; a call that fills it exactly runs. Positions count each row's own
    tokens (left padding takes none), the few-shot prefix's, and new tokens but the last."""
    model = Flamingo(config(), lang_encoder=tiny_lm(family)).eval()
    field, n = TABLES[family], getattr(model.lang_encoder.config, TABLES[family])
    table = rf"has {field}={n}, the size of its position table"
    long = torch.randint(3, 120, (1, n + 1))
    model(None, long[:, :n])
    with pytest.raises(ValueError, match=rf"needs {n + 1} positions \(lang_x of {n + 1} tokens\), but .* {table}"):
        model(None, long)

    vx, ids = batch(T=16)
    _fill_to(model, vx, ids, n - 16 + 1)  # 16 + (n - 15) - 1 = n positions
    with pytest.raises(ValueError, match=rf"needs {n + 1} positions \(16 prompt tokens and max_new_tokens={n - 14}, "
                                         rf"the last of which is not fed back\), but .* {table}"):
        model.generate(vx, ids, max_new_tokens=n - 14)
    # left padding: positions follow each row's own tokens, not the padded width
    wide = torch.cat([ids.new_full((2, 24), 1), ids], dim=1)
    mask = torch.cat([torch.zeros(2, 24, dtype=torch.long), torch.ones_like(ids)], dim=1)
    mask[1, 20:24] = 1  # row 1 holds 20 tokens: the longest
    _fill_to(model, vx, wide, n - 20 + 1, attention_mask=mask)  # 40 + (n - 20) slots > n: still fits
    with pytest.raises(ValueError, match=rf"needs {n + 1} positions \(20 prompt tokens and max_new_tokens"):
        model.generate(vx, wide, mask, max_new_tokens=n - 18)
    # scoring: the prompt, then every continuation's tokens but its last
    fits = [_text(n - 15), [5, 6]]
    assert model.score(vx, ids, fits).shape == (2, 2)
    with pytest.raises(ValueError, match=rf"needs {n + 1} positions \(16 prompt tokens and continuations of up to "
                                         rf"{n - 14} tokens"):
        model.score(vx, ids, [_text(n - 14)])

    # refused before any work: no image is encoded
    def boom(*args, **kwargs):
        raise AssertionError("work before the check")
    monkeypatch.setattr(model, "encode_vision", boom)
    with pytest.raises(ValueError, match=table):
        model.generate(vx, ids, max_new_tokens=n)
    with pytest.raises(ValueError, match=table):
        model.score(vx, ids, [_text(n)])


def test_prefix_positions_count_before_the_prompt():
    from fastflamingo.generation import encode_prefix
    model = Flamingo(config(), lang_encoder=tiny_lm("gpt2")).eval()
    n = model.lang_encoder.config.n_positions
    demo = torch.randint(3, 120, (1, 100))
    demo[0, 0] = MEDIA_ID
    prefix = encode_prefix(model, torch.randn(1, 1, 1, 3, 32, 32), demo)
    vx, ids = batch(T=16)
    _fill_to(model, vx, ids, n - 116 + 1, prefix=prefix)
    with pytest.raises(ValueError, match=rf"needs {n + 1} positions \(16 prompt tokens after a 100-token prefix"):
        model.generate(vx, ids, max_new_tokens=n - 114, prefix=prefix)
    with pytest.raises(ValueError, match=rf"needs {n + 1} positions \(position_ids up to {n}\)"):
        encode_prefix(model, None, torch.randint(3, 120, (1, n + 1)))


@pytest.mark.parametrize("family", ["llama", "gpt_neox", "mpt"])
def test_positions_past_rotary_or_alibi_training_length_warn_once(family):
    """Rotary and (fastflamingo's SDPA) ALiBi positions extrapolate: past the trained length the
    call runs, with one warning per model at the caller's line. Hugging Face's own eager MPT fails
    past its ALiBi table: refused there."""
    import warnings
    model = Flamingo(config(), lang_encoder=tiny_lm(family)).eval()
    field = "max_seq_len" if family == "mpt" else "max_position_embeddings"
    n = getattr(model.lang_encoder.config, field)
    vx, ids = batch(T=16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _fill_to(model, vx, ids, n - 16 + 1)
        model(None, torch.randint(3, 120, (1, n)))
    with pytest.warns(UserWarning, match=rf"needs {n + 1} positions .* has {field}={n}: positions past {n} "
                                         "extrapolate") as caught:
        _fill_to(model, vx, ids, n - 16 + 2)
    assert len(caught) == 1 and caught[0].filename == __file__
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per model
        model(None, torch.randint(3, 120, (1, n + 8)))
    if family == "mpt":
        mpt.restore(model.lang_encoder)
        with pytest.raises(ValueError, match=rf"needs {n + 1} positions .* max_seq_len={n}, the size of its"):
            model(None, torch.randint(3, 120, (1, n + 1)))


# ----------------------------------------------------------------------------- activation checkpointing

def _train_step(model, vx, ids):
    """(loss, gradients by name, bytes autograd saved for the backward) of one step, seeded (dropout)."""
    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(vx, ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, saved[0]


def _idefics_style():
    from fastflamingo.convert.idefics import from_idefics
    from peers_idefics import idefics_model
    return from_idefics(idefics_model(cross_layer_interval=2))


@pytest.mark.parametrize("family", ["llama", "mpt", "gpt2", "idefics", "llama-nf4"])
def test_activation_checkpointing_gives_the_same_step_and_keeps_far_less(family):
    """Decoder layers, cross-attention blocks and resampler layers recompute in the backward: the
    same loss and gradients bit for bit (GPT-2's dropout included: the RNG state is replayed), and
    autograd keeps a fraction of the activations (what it saved, counted by a saved-tensors hook).
    In eval mode, or without gradients, nothing changes."""
    if family == "idefics":
        from peers_idefics import idefics_inputs
        model = _idefics_style().train()
        inputs = idefics_inputs()
        vx, ids = inputs["pixel_values"][:, :, None], inputs["input_ids"]
    else:
        model = Flamingo(config(), lang_encoder=tiny_lm(family.removesuffix("-nf4"))).train()
        if family.endswith("-nf4"):  # QLoRA-style: the frozen LM in 4 bits, gradients through it
            pytest.importorskip("bitsandbytes")
            from fastflamingo.quant import quantize_model
            quantize_model(model, "nf4")
            assert any(type(m).__name__ == "Linear4bit" for m in model.lang_encoder.modules())
        set_gates(model, 0.5)
        vx, ids = batch()
    for p in model.vision_encoder.parameters():
        p.requires_grad_(False)
    plain = _train_step(model, vx, ids)
    model.activation_checkpointing_enable()
    assert model.is_gradient_checkpointing
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning from the LM's layers about its cache
        checkpointed = _train_step(model, vx, ids)
    assert torch.equal(plain[0], checkpointed[0])
    assert plain[1].keys() == checkpointed[1].keys() and len(plain[1]) > 10
    for name, g in plain[1].items():
        assert torch.equal(g, checkpointed[1][name]), name
    assert checkpointed[2] < 0.25 * plain[2], (checkpointed[2], plain[2])
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(vx, ids).logits, (model.activation_checkpointing_disable() or model)(vx, ids).logits)
    model.train()
    assert not model.is_gradient_checkpointing and _train_step(model, vx, ids)[2] == plain[2]


def test_activation_checkpointing_every_n_layers_and_offload():
    """transformers' options: every n-th decoder layer (with the blocks in front of them), and the
    kept inputs in CPU memory (on a GPU machine; nothing to move without one). The step stays the
    same bit for bit; every second layer keeps more than all layers and less than none."""
    model = Flamingo(config(cross_attention=CrossAttentionConfig(every_n_layers=1, heads=2, dim_head=8)),
                     lang_encoder=tiny_lm("llama")).train()
    set_gates(model, 0.5)
    vx, ids = batch()
    plain = _train_step(model, vx, ids)
    model.activation_checkpointing_enable(every_n_layers=2)
    blocks = model.gated_cross_attn_layers
    assert [b.gradient_checkpointing for b in blocks] == [True, False] * (len(blocks) // 2)
    half = _train_step(model, vx, ids)
    model.activation_checkpointing_enable(offload=True)
    offloaded = _train_step(model, vx, ids)
    model.activation_checkpointing_enable()
    full = _train_step(model, vx, ids)
    for step in (half, offloaded):
        assert torch.equal(step[0], plain[0]) and all(torch.equal(g, step[1][n]) for n, g in plain[1].items())
    assert full[2] < half[2] < plain[2]
    with pytest.raises(ValueError, match="every_n_layers must be an int >= 1, got 0"):
        model.activation_checkpointing_enable(every_n_layers=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_activation_checkpointing_offload():
    """On a GPU, offload=True keeps the checkpoints' inputs in pinned CPU memory: the same step,
    bf16, Triton cross-attention (within bf16 rounding: CUDA's SDPA backward accumulates with
    atomics, so two runs of one step need not agree bit for bit)."""
    model = Flamingo(config(), lang_encoder=tiny_lm("llama")).to("cuda", torch.bfloat16).train()
    set_gates(model, 0.5)
    vx, ids = (t.cuda() for t in batch())
    vx = vx.bfloat16()
    plain = _train_step(model, vx, ids)
    model.activation_checkpointing_enable(offload=True)
    assert model.perceiver.checkpoint_offload
    offloaded = _train_step(model, vx, ids)
    torch.testing.assert_close(offloaded[0], plain[0], rtol=1e-2, atol=1e-2)
    for name, g in plain[1].items():
        torch.testing.assert_close(offloaded[1][name].float(), g.float(), rtol=2e-2,
                                   atol=2e-2 * float(g.abs().max()) + 1e-6, msg=name)


def test_transformers_trainer_trains_with_activation_checkpointing(tmp_path):
    """transformers' Trainer with activation_checkpointing=True (it calls the model's
    activation_checkpointing_enable with its own arguments) trains the model: the loss goes down."""
    from transformers import Trainer, TrainingArguments
    model = Flamingo(config(), lang_encoder=tiny_lm("llama")).train()
    set_gates(model, 0.5)
    vx, ids = batch(B=4)

    class Batch(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return {"vision_x": vx[i], "lang_x": ids[i], "labels": ids[i]}
    kw = dict(activation_checkpointing=True) if "activation_checkpointing" in \
        TrainingArguments.__dataclass_fields__ else dict(gradient_checkpointing=True)  # transformers 5.1x
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=6, learning_rate=1e-2,
                             report_to=[], use_cpu=True, save_strategy="no", logging_steps=1, disable_tqdm=True, **kw)
    trainer = Trainer(model=model, args=args, train_dataset=Batch())
    trainer.train()
    assert model.is_gradient_checkpointing
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 6 and losses[-1] < losses[0], losses


def test_activation_checkpointing_refuses_reentrant_and_takes_transformers_older_name():
    model = Flamingo(config(), lang_encoder=tiny_lm("llama"))
    with pytest.raises(ValueError, match=r"use_reentrant=True: .* \(no gradient would reach the resampler\)"):
        model.activation_checkpointing_enable({"use_reentrant": True})
    assert not model.is_gradient_checkpointing
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"preserve_rng_state": False})
    assert model.is_gradient_checkpointing and model.perceiver.checkpoint_kwargs == {"preserve_rng_state": False}
    model.gradient_checkpointing_disable()
    assert not model.is_gradient_checkpointing


@pytest.mark.parametrize("name,total,lm", [("flamingo-3b", 3.67e9, 1.36e9), ("flamingo-9b", 9.28e9, 6.74e9),
                                          ("flamingo-80b", 74.9e9, 65.3e9)])
def test_paper_presets_have_the_documented_parameter_counts(name, total, lm):
    """README and presets.py give these totals (the paper: 3.2B, 9.3B, 80B in all; 1.4B, 7B, 70B
    LMs); a LLaMA MLP at 4 d had made them 4.05B, 11.4B and 96.1B."""
    with torch.device("meta"):
        model = Flamingo(preset_config(name))
    blocks = sum(p.numel() for b in model.gated_cross_attn_layers for p in b.parameters())
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(total, rel=0.01)
    assert sum(p.numel() for p in model.lang_encoder.parameters()) - blocks == pytest.approx(lm, rel=0.01)


def test_torch_func_grad_of_the_model_equals_its_backward():
    """torch.func.grad (functional_call over the trainable parameters): on the CPU "auto" had taken
    the native kernels' autograd Function (where built), and the embedding-row mask's, which
    torch.func refused; now "auto" takes the PyTorch path under a transform, the mask takes the
    transforms, and a forced kernel backend says what to do."""
    from fastflamingo.ops import image_causal_attention
    torch.manual_seed(0)
    model = Flamingo.from_preset("tiny").eval()
    model.config.num_base_tokens = 500  # (the added rows train: the row mask is in the graph)
    model.set_trainable()
    ids, vx = torch.tensor([[510, 5, 6, 7, 511, 510, 8]]), torch.randn(1, 2, 1, 3, 32, 32)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}

    def loss(p):
        return torch.func.functional_call(model, p, (vx, ids)).logits.square().mean()
    got = torch.func.grad(loss)(params)
    loss(params).backward()
    for n, p in params.items():
        torch.testing.assert_close(got[n], p.grad, atol=1e-7, rtol=1e-5, msg=n)
    assert got["lang_encoder.model.embed_tokens.weight"][:500].abs().sum() == 0  # the base rows stay masked
    q, kv = torch.randn(1, 2, 5, 16), torch.randn(1, 2, 8, 16)
    loc = torch.tensor([[True, False, False, True, False]])
    for backend in ("triton", "native"):
        with pytest.raises(RuntimeError, match=f"backend='{backend}' runs kernels that torch.func transforms"):
            torch.func.grad(lambda q: image_causal_attention(q, kv, kv, loc, latents_per_media=4,
                                                             backend=backend).sum())(q)


def test_torch_func_vmap_over_the_model_per_sample_gradients():
    """torch.func.vmap over the model (vision_x and token ids batched): the input checks read the
    vmapped batch's values ("Cannot access data pointer" before) and still refuse a bad id, and
    the PyTorch path takes its gather route (no host reads); per-example gradients
    (vmap of grad) equal each example's own."""
    from torch.func import functional_call, grad, vmap
    torch.manual_seed(0)
    model = Flamingo.from_preset("tiny").eval()
    model.set_trainable()
    with torch.no_grad():  # open gates: the cross-attention reaches the loss
        for block in model.gated_cross_attn_layers:
            block.attn_gate.fill_(1.0)
    ids = torch.tensor([[510, 5, 6, 7, 511, 510, 8], [9, 510, 10, 11, 12, 13, 510]])
    vx = torch.randn(2, 2, 1, 3, 32, 32)

    def logits(v, i):
        return model(v[None], i[None]).logits[0]
    with torch.no_grad():
        torch.testing.assert_close(vmap(logits)(vx, ids), model(vx, ids).logits, atol=1e-5, rtol=1e-5)
        bad = ids.clone()
        bad[1, 3] = 100000
        with pytest.raises(ValueError, match=r"token id 100000 \(row 1, position 3\)"):
            vmap(logits)(vx, bad)
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    def loss(p, v, i):
        return functional_call(model, p, (v[None], i[None]), {"labels": i[None]}).loss
    per_example = vmap(grad(loss), in_dims=(None, 0, 0))(params, vx, ids)
    for b in range(2):
        one = grad(loss)(params, vx[b], ids[b])
        for n in params:
            torch.testing.assert_close(per_example[n][b], one[n], atol=1e-6, rtol=1e-5, msg=n)
    assert any(per_example[n][0].abs().sum() > 0 for n in params if "to_kv" in n)


def test_lm_families_the_audit_found_unhandled():
    """OPT-350m's decoder width differs from its embeddings' (the blocks were built too narrow and
    crashed); GPT-Neo's learned position table is refused past its end (warned as 'extrapolating',
    then an IndexError); Falcon and Phi need no decoder_layers_attr; a wrong one names the option;
    mpt.restore stays restored after a generate (LMCall re-prepared it)."""
    import dataclasses

    from transformers import AutoModelForCausalLM, FalconConfig, GPTNeoConfig, OPTConfig, PhiConfig

    from fastflamingo.model import check_positions
    common = dict(vocab_size=512, eos_token_id=2, bos_token_id=1, pad_token_id=0)
    torch.manual_seed(0)
    opt = AutoModelForCausalLM.from_config(OPTConfig(hidden_size=48, ffn_dim=96, num_hidden_layers=2,
                                                     num_attention_heads=4, word_embed_proj_dim=32, **common))
    model = Flamingo(preset_config("tiny"), lang_encoder=opt).eval()
    assert model.gated_cross_attn_layers[0].attn.norm.normalized_shape == (48,)
    ids = torch.tensor([[510, 5, 6, 7]])
    assert model(torch.randn(1, 1, 1, 3, 32, 32), ids).logits.shape == (1, 4, 512)
    neo = AutoModelForCausalLM.from_config(GPTNeoConfig(hidden_size=32, num_layers=2, num_heads=4,
                                                        attention_types=[[["global"], 2]], max_position_embeddings=16,
                                                        **common))
    with pytest.raises(ValueError, match="has max_position_embeddings=16, the size of its position table"):
        check_positions(neo, 17, "17 tokens")
    for config in (FalconConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, **common),
                   PhiConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             **common)):
        Flamingo(preset_config("tiny"), lang_encoder=AutoModelForCausalLM.from_config(config))
    falcon = AutoModelForCausalLM.from_config(FalconConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                           **common))
    with pytest.raises(ValueError, match="decoder_layers_attr='model.layers': FalconForCausalLM has no attribute 'model'"):
        Flamingo(dataclasses.replace(preset_config("tiny"), decoder_layers_attr="model.layers"), lang_encoder=falcon)
    from transformers import MptConfig
    mpt_lm = AutoModelForCausalLM.from_config(MptConfig(d_model=48, n_heads=4, n_layers=2, expansion_ratio=2,
                                                        max_seq_len=256, **common))
    m = Flamingo(preset_config("tiny"), lang_encoder=mpt_lm).eval()
    assert mpt.is_prepared(m.lang_encoder)
    mpt.restore(m.lang_encoder)
    m.generate(None, ids[:, 1:], max_new_tokens=2)
    assert not mpt.is_prepared(m.lang_encoder)
