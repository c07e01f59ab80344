"""Drop-in import from open_flamingo: live models, training checkpoints (trainable-only, written the
way open_flamingo's train script writes them), ``create_model_and_transforms`` +
``load_state_dict(strict=False)``, the ``convert`` command, and the errors for checkpoints that do not fit."""
import argparse
import copy

import pytest
import torch

pytest.importorskip("open_flamingo", reason="install the test extras: see README")

from fastflamingo import Flamingo, create_model_and_transforms, from_open_flamingo  # noqa: E402
from fastflamingo.convert.cli import add_parser  # noqa: E402
from fastflamingo.convert.load import CheckpointMismatchError  # noqa: E402

from peers import (EOC_ID, MEDIA_ID, TINY_VIT, layouts, num_media, open_flamingo_model,  # noqa: E402
                   tiny_lm, tiny_lm_config, tiny_open_clip)
from peers_idefics import tiny_tokenizer  # noqa: E402

TOL = 1e-5


def trainable_only_state(live) -> dict:
    """What open_flamingo's train script saves: its factory's trainable set (resampler, cross-attention,
    input embeddings), then ``filter_state_dict_to_trainable``: frozen parameters dropped unless
    "embed" is in the name, duplicates and the vision encoder dropped."""
    live.requires_grad_(False)
    live.perceiver.requires_grad_(True)
    live.lang_encoder.gated_cross_attn_layers.requires_grad_(True)
    live.lang_encoder.get_input_embeddings().requires_grad_(True)
    state = live.state_dict()
    for name, p in live.named_parameters():
        if "embed" not in name and not p.requires_grad:
            state.pop(name, None)
    drop = ("lang_encoder.old_decoder_blocks", "lang_encoder.gated_cross_attn_layers", "vision_encoder")
    return {k: v for k, v in state.items() if not any(d in k for d in drop)}


def base_lm(live, family: str):
    """The frozen LM the live model was built on, as its own Hugging Face model."""
    lm = tiny_lm(family)
    state = {k.replace(".decoder_layer.", "."): v for k, v in live.lang_encoder.state_dict().items()
             if "gated_cross_attn" not in k and "old_decoder_blocks" not in k}
    lm.load_state_dict(state, strict=True)
    return lm


def _vision(ids, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(ids.shape[0], num_media(ids), 1, 3, 32, 32, generator=g)


def _save(state, path):
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file
        save_file({k: v.clone().contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save({"model_state_dict": state, "epoch": 3}, path)  # as open_flamingo's save_checkpoint
    return path




@pytest.mark.parametrize("family,suffix", [("llama", ".pt"), ("mpt", ".safetensors"), ("gpt_neox", ".bin")])
def test_live_and_trainable_only_checkpoint_match_open_flamingo(family, suffix, tmp_path):
    live = open_flamingo_model(family, every_n=2)
    from_live = from_open_flamingo(live)
    path = _save(trainable_only_state(live), tmp_path / f"checkpoint{suffix}")
    from_ckpt = from_open_flamingo(path, lang_encoder=base_lm(live, family),
                                   vision_encoder=copy.deepcopy(live.vision_encoder), ln_post_on_tokens=True,
                                   media_token_id=MEDIA_ID, eoc_token_id=EOC_ID)
    assert from_ckpt.config.cross_attention.every_n_layers == 2  # read from the checkpoint's keys
    for name, ids, mask in layouts():
        vx = _vision(ids)
        with torch.no_grad():
            ref = live(vx, ids, attention_mask=mask).logits
            for label, ours in (("live", from_live), ("checkpoint", from_ckpt)):
                diff = (ref - ours(vx, ids, attention_mask=mask).logits).abs()[mask.bool()].max().item()
                assert diff <= TOL, f"{family} from {label}, layout {name}: max |diff| {diff:.2e}"
    _, ids, mask = layouts()[2]  # left padding
    vx = _vision(ids)
    # open_flamingo stops at <|endofchunk|>; a generated <image> would make it attend to image 1 (a quirk
    # of its cached-media path), so both sides suppress it
    ref_ids = live.generate(vx, ids, attention_mask=mask, max_new_tokens=6, num_beams=1, do_sample=False,
                            suppress_tokens=[MEDIA_ID])
    for ours in (from_live, from_ckpt):
        got = ours.generate(vx, ids, mask, max_new_tokens=6, eos_token_id=EOC_ID, suppress_tokens=[MEDIA_ID])
        assert torch.equal(ref_ids, got[:, :ref_ids.shape[1]]), (ref_ids, got)


@pytest.fixture(scope="module")
def mpt_checkpoint(tmp_path_factory):
    live = open_flamingo_model("mpt", every_n=1)
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint.pt"
    return live, trainable_only_state(live), _save(trainable_only_state(live), path)


def _load(ckpt, lm, live, **kw):
    kw = dict(media_token_id=MEDIA_ID, eoc_token_id=EOC_ID, ln_post_on_tokens=True) | kw
    return from_open_flamingo(ckpt, lang_encoder=lm, vision_encoder=copy.deepcopy(live.vision_encoder), **kw)


def test_blocks_loaded_into_an_lm_on_another_device_follow_it(tmp_path):
    """A checkpoint is read on the CPU; loaded into an LM and vision encoder already on an
    accelerator (the meta device stands in: this machine has none), the new blocks, the resampler
    and the checkpoint's embeddings go where the LM is (they stayed on the CPU), through
    from_open_flamingo and through from_pretrained of a trainable-only directory."""
    live = open_flamingo_model("llama", every_n=2)
    state = trainable_only_state(live)
    assert all(t.device.type == "cpu" for t in state.values())

    def devices(model):
        return {t.device.type for t in [*model.parameters(), *model.buffers()]}
    ours = from_open_flamingo(state, lang_encoder=base_lm(live, "llama").to("meta"),
                              vision_encoder=copy.deepcopy(live.vision_encoder).to("meta"), ln_post_on_tokens=True,
                              media_token_id=MEDIA_ID, eoc_token_id=EOC_ID)
    assert devices(ours) == {"meta"}
    on_cpu = _load(state, base_lm(live, "llama"), live)
    on_cpu.save_pretrained(tmp_path, trainable_only=True)
    back = Flamingo.from_pretrained(tmp_path, lang_encoder=base_lm(live, "llama").to("meta"),
                                    vision_encoder=copy.deepcopy(live.vision_encoder).to("meta"))
    assert devices(back) == {"meta"}
    assert devices(_load(state, base_lm(live, "llama"), live)) == {"cpu"}  # and a CPU LM keeps it all there


def test_a_live_import_leaves_the_live_model_as_it_was_and_trains_what_it_trains():
    """from_open_flamingo(live, dtype=...) cast the live model's own vision encoder (the same module:
    the live model then failed), and froze it; and it froze the input embedding that open_flamingo's
    factory trains."""
    live = open_flamingo_model("llama", every_n=2)
    live.requires_grad_(False)  # open_flamingo's factory's trainable set (freeze_lm_embeddings=False)
    live.perceiver.requires_grad_(True)
    live.lang_encoder.gated_cross_attn_layers.requires_grad_(True)
    live.lang_encoder.get_input_embeddings().requires_grad_(True)
    live.vision_encoder.conv1.weight.requires_grad_(True)  # (a user's choice: it must stay)
    _, ids, mask = layouts()[0]
    vx = _vision(ids)
    with torch.no_grad():
        before = live(vx, ids, attention_mask=mask).logits
    ours = from_open_flamingo(live, dtype=torch.bfloat16)
    assert ours.vision_encoder.conv1.weight.dtype == torch.bfloat16
    assert {p.dtype for p in live.parameters()} == {torch.float32} and live.vision_encoder.conv1.weight.requires_grad
    with torch.no_grad():
        assert torch.equal(live(vx, ids, attention_mask=mask).logits, before)
    shared = from_open_flamingo(live)  # without a cast the tensors are the live model's own
    assert shared.vision_encoder.conv1.weight.data_ptr() == live.vision_encoder.conv1.weight.data_ptr()
    assert not shared.vision_encoder.conv1.weight.requires_grad
    want = {n for n, p in live.named_parameters() if p.requires_grad and not n.startswith(
        ("lang_encoder.gated_cross_attn_layers.", "vision_encoder."))}
    got = {n for n, p in shared.named_parameters() if p.requires_grad}
    assert shared.config.num_base_tokens == 0 and "lang_encoder.model.embed_tokens.weight" in got
    assert sum(p.numel() for n, p in shared.named_parameters() if n in got) == \
        sum(p.numel() for n, p in live.named_parameters() if n in want)
    live.lang_encoder.get_input_embeddings().requires_grad_(False)  # freeze_lm_embeddings=True: frozen here too
    assert from_open_flamingo(live).config.num_base_tokens is None


def test_a_checkpoint_missing_its_first_block_lists_it_missing(tmp_path):
    """The interval is the one every block held fits (gcd), not the first block's: a checkpoint that
    lost its first block was read as every 4 layers and loaded silently wrong, or was refused as
    'not open_flamingo's placement'; now the lost block's keys are listed missing."""
    for every_n, lost in ((2, "lang_encoder.model.layers.1.gated_cross_attn_layer."),
                          (1, "lang_encoder.model.layers.0.gated_cross_attn_layer.")):
        live = open_flamingo_model("llama", every_n=every_n)
        state = {k: v for k, v in trainable_only_state(live).items() if not k.startswith(lost)}
        if every_n == 2:  # one block left (before layer 3): ambiguous, so a warning says to give the interval
            with pytest.warns(UserWarning, match="holds one cross-attention block.*cross_attn_every_n_layers="):
                _load(state, base_lm(live, "llama"), live)
            with pytest.raises(CheckpointMismatchError) as e:
                _load(state, base_lm(live, "llama"), live, cross_attn_every_n_layers=2)
        else:
            with pytest.raises(CheckpointMismatchError) as e:
                _load(state, base_lm(live, "llama"), live)
        assert e.value.missing and all(k.startswith(lost) for k in e.value.missing), e.value.missing


def test_a_ddp_prefix_is_stripped_from_every_checkpoint_format(tmp_path):
    from fastflamingo.convert.io import load_state_file
    state = {"module.perceiver.latents": torch.ones(2, 3), "module.x": torch.zeros(1)}
    for suffix in (".pt", ".safetensors"):
        got = load_state_file(_save(state, tmp_path / f"c{suffix}"))
        assert sorted(got) == ["perceiver.latents", "x"], (suffix, sorted(got))


def test_checkpoint_for_another_lm_family_says_which_lm_it_expects(mpt_checkpoint):
    live, _, path = mpt_checkpoint
    with pytest.raises(CheckpointMismatchError) as e:
        _load(path, tiny_lm("llama"), live)
    msg = str(e.value)
    assert "MPT" in msg and "`transformer.blocks`" in msg and "hidden size 48" in msg
    assert "cross-attention every 1 layer(s)" in msg and "LlamaForCausalLM" in msg
    assert "decoder layers at `transformer.blocks`, 4 of them" in msg
    assert "unexpected" in msg
    assert "lang_encoder.transformer.blocks.0.gated_cross_attn_layer.{attn_gate, ff_gate}" in msg
    assert "missing" in msg and "lang_encoder.model.layers.0.gated_cross_attn_layer.{attn_gate, ff_gate}" in msg
    assert "lang_encoder.model.layers.0.gated_cross_attn_layer.attn.norm.{weight, bias}" in msg


def test_checkpoint_with_other_shapes_lists_them(mpt_checkpoint):
    live, _, path = mpt_checkpoint
    from transformers import AutoModelForCausalLM
    wide = tiny_lm_config("mpt")
    wide.d_model = 64
    with pytest.raises(CheckpointMismatchError) as e:
        _load(path, AutoModelForCausalLM.from_config(wide), live)
    msg = str(e.value)
    assert "shape mismatch" in msg and "gated_cross_attn_layer.attn.to_q.weight: (512, 48) vs (512, 64)" in msg
    assert "hidden size 48" in msg and "hidden size 64" in msg
    assert e.value.mismatched and not e.value.missing


def test_truncated_checkpoint_lists_missing_keys(mpt_checkpoint, tmp_path):
    live, state, path = mpt_checkpoint
    lost = ("perceiver.layers.2.", "lang_encoder.transformer.blocks.1.gated_cross_attn_layer.", "perceiver.norm.")
    partial = {k: v for k, v in state.items() if not k.startswith(lost)}
    with pytest.raises(CheckpointMismatchError) as e:
        _load(partial, base_lm(live, "mpt"), live)
    assert e.value.missing and all(k.startswith(lost) for k in e.value.missing)
    assert all(any(k.startswith(p) for k in e.value.missing) for p in lost)
    assert not e.value.unexpected and not e.value.mismatched
    msg = str(e.value)
    assert f"{len(e.value.missing)} missing" in msg and "perceiver.layers.2.0.to_q.weight" in msg
    assert "perceiver.layers.2.0.norm_media.{weight, bias}" in msg and "perceiver.norm.{weight, bias}" in msg
    cut = tmp_path / "cut.pt"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match="is the file complete"):
        _load(cut, base_lm(live, "mpt"), live)


def _release_state(attr, n_layers, every_n, d, vocab, embed):
    """The keys and shapes of a released checkpoint (meta tensors: no memory): ViT-L/14 features
    (1024), open_flamingo's 6-deep 8 x 64 resampler and cross-attention, 4x feed-forwards."""
    def t(*shape):
        return torch.empty(shape, device="meta")

    state = {"perceiver.latents": t(64, 1024), f"lang_encoder.{embed}": t(vocab, d)}
    for i in range(6):
        p = f"perceiver.layers.{i}."
        state |= {p + "0.to_q.weight": t(512, 1024), p + "1.1.weight": t(4096, 1024)}
    for i in range(every_n - 1, n_layers, every_n):
        x = f"lang_encoder.{attr}.{i}.gated_cross_attn_layer."
        state |= {x + "attn.to_q.weight": t(512, d), x + "attn.to_kv.weight": t(1024, 1024),
                  x + "ff.1.weight": t(4 * d, d)}
    return state


@pytest.mark.parametrize("release,args,expect", [
    ("OpenFlamingo-3B", ("transformer.blocks", 24, 1, 2048, 50280, "transformer.wte.weight"),
     "MPT (OpenFlamingo-3B, -9B): decoder layers at `transformer.blocks`, 24 of them, hidden size 2048, "
     "a vocabulary of 50280 tokens; cross-attention every 1 layer(s); vision features of width 1024"),
    ("OpenFlamingo-4B", ("gpt_neox.layers", 32, 2, 2560, 50280, "gpt_neox.embed_in.weight"),
     "GPT-NeoX / Pythia / RedPajama (OpenFlamingo-4B): decoder layers at `gpt_neox.layers`, 32 to 33 of them, "
     "hidden size 2560, a vocabulary of 50280 tokens; cross-attention every 2 layer(s)"),
    ("OpenFlamingo-9B", ("transformer.blocks", 32, 4, 4096, 50280, "transformer.wte.weight"),
     "`transformer.blocks`, 32 to 35 of them, hidden size 4096, a vocabulary of 50280 tokens; "
     "cross-attention every 4 layer(s)"),
    ("Med-Flamingo", ("model.layers", 32, 4, 4096, 32003, "model.embed_tokens.weight"),
     "LLaMA or another LLaMA-like LM (Med-Flamingo): decoder layers at `model.layers`, 32 to 35 of them, "
     "hidden size 4096, a vocabulary of 32003 tokens; cross-attention every 4 layer(s)"),
])
def test_released_checkpoint_layouts_are_recognised(release, args, expect):
    from fastflamingo.convert.open_flamingo_ckpt import read_open_flamingo_layout
    layout = read_open_flamingo_layout(_release_state(*args))
    assert expect in layout.describe(), release
    assert (layout.depth, layout.num_latents, layout.perceiver_inner, layout.xattn_inner) == (6, 64, 512, 512)
    assert layout.perceiver_ff_mult == 4 and layout.xattn_ff_mult == 4


def test_full_checkpoint_with_duplicate_keys_overrides_the_given_models(mpt_checkpoint):
    live = mpt_checkpoint[0]
    _, ids, _ = layouts()[1]
    vx = _vision(ids)
    ours = _load(live.state_dict(), tiny_lm("mpt"), live)  # a fresh LM: the checkpoint brings the perturbed norms
    with torch.no_grad():
        assert (live(vx, ids).logits - ours(vx, ids).logits).abs().max().item() <= TOL
        ours.vision_encoder.conv1.weight.zero_()
        ours.load_state_dict(live.state_dict(), strict=True)  # the pre-hook drops open_flamingo's duplicates
        assert (live(vx, ids).logits - ours(vx, ids).logits).abs().max().item() <= TOL


def test_buffers_saved_by_older_transformers_are_ignored(mpt_checkpoint):
    live, state, _ = mpt_checkpoint
    old = dict(state, **{"lang_encoder.transformer.blocks.0.decoder_layer.attn.rotary_emb.inv_freq": torch.ones(4)})
    ours = _load(old, base_lm(live, "mpt"), live)
    _, ids, _ = layouts()[0]
    with torch.no_grad():
        assert (live(_vision(ids), ids).logits - ours(_vision(ids), ids).logits).abs().max().item() <= TOL


def test_checkpoint_needs_its_lm_and_never_unpickles_code(mpt_checkpoint, tmp_path):
    live, _, path = mpt_checkpoint
    with pytest.raises(ValueError, match=r"pass lang_encoder=.*MPT.*hidden size 48"):
        from_open_flamingo(path, vision_encoder=live.vision_encoder, ln_post_on_tokens=True)
    with pytest.raises(ValueError, match="media_token_id"):
        from_open_flamingo(path, lang_encoder=base_lm(live, "mpt"), vision_encoder=live.vision_encoder,
                           ln_post_on_tokens=True)
    evil = tmp_path / "evil.pt"
    torch.save({"model_state_dict": {"x": argparse.Namespace(a=1)}}, evil)
    with pytest.raises(ValueError, match="weights_only"):
        _load(evil, base_lm(live, "mpt"), live)
    with pytest.raises(ValueError, match="explicit vision.ln_post_on_tokens"):
        _load(path, base_lm(live, "mpt"), live, ln_post_on_tokens=None)


def test_live_conversion_round_trips_given_its_vision_encoder(mpt_checkpoint, tmp_path):
    live = mpt_checkpoint[0]
    ours = from_open_flamingo(live)
    ours.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="names no open_clip model.*pass vision_encoder="):
        Flamingo.from_pretrained(tmp_path)
    back = Flamingo.from_pretrained(tmp_path, vision_encoder=copy.deepcopy(live.vision_encoder))
    a, b = ours.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------ create_model_and_transforms
def _local_models(d, tied: bool):
    """A tiny LLaMA + tokenizer directory (vocabulary without the Flamingo tokens) and a local
    open_clip checkpoint, as a user would have them on disk."""
    from transformers import AutoModelForCausalLM
    cfg = tiny_lm_config("llama")
    cfg.vocab_size, cfg.pad_token_id, cfg.tie_word_embeddings = 100, None, tied
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(d / "lm")
    tiny_tokenizer(100, {"<unk>": 0, "<s>": 1, "</s>": 2}).save_pretrained(d / "lm")
    clip_ckpt = d / "clip.pt"
    torch.save(tiny_open_clip(seed=5).state_dict(), clip_ckpt)
    return str(d / "lm"), str(clip_ckpt)


@pytest.fixture(scope="module")
def local_models(tmp_path_factory):
    return _local_models(tmp_path_factory.mktemp("local"), tied=True)


def _open_flamingo_reference(lm_dir, clip_ckpt):
    from open_flamingo import create_model_and_transforms as of_create
    torch.manual_seed(1)
    model, _, tok = of_create(TINY_VIT, clip_ckpt, lm_dir, lm_dir, cross_attn_every_n_layers=2, use_local_files=True)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("attn_gate", "ff_gate")):
                p.fill_(0.6)
    return model.eval(), tok


def test_create_model_and_transforms_loads_open_flamingo_state_dicts(local_models, tmp_path):
    from PIL import Image
    lm_dir, clip_ckpt = local_models
    model, processor, tok = create_model_and_transforms(TINY_VIT, clip_ckpt, lm_dir, lm_dir,
                                                        cross_attn_every_n_layers=2, use_local_files=True,
                                                        ln_post_on_tokens=True)
    assert len(tok) == 103 and model.config.media_token_id == tok.convert_tokens_to_ids("<image>")
    assert model.lang_encoder.get_input_embeddings().weight.shape[0] == 103
    assert processor(Image.new("RGB", (50, 40))).shape == (3, 32, 32)
    clip_state = torch.load(clip_ckpt, weights_only=True)
    assert torch.equal(model.vision_encoder.conv1.weight, clip_state["visual.conv1.weight"])
    assert model.lang_encoder.get_input_embeddings().weight.requires_grad  # open_flamingo trains every row

    ref, ref_tok = _open_flamingo_reference(lm_dir, clip_ckpt)
    assert ref_tok.convert_tokens_to_ids("<image>") == model.config.media_token_id
    result = model.load_state_dict(ref.state_dict(), strict=False)  # open_flamingo's README, unchanged
    assert result.missing_keys == [] and result.unexpected_keys == []
    ids = torch.tensor([[1, model.config.media_token_id, 5, 6, 7, model.config.eoc_token_id,
                         model.config.media_token_id, 8, 9]])
    vx = torch.randn(1, 2, 1, 3, 32, 32)
    with torch.no_grad():
        diff = (ref(vx, ids).logits - model(vx, ids).logits).abs().max().item()
    assert diff <= TOL

    fresh, _, _ = create_model_and_transforms(TINY_VIT, clip_ckpt, lm_dir, lm_dir, cross_attn_every_n_layers=2,
                                              use_local_files=True, ln_post_on_tokens=True, gradient_checkpointing=True)
    assert fresh.is_gradient_checkpointing and not model.is_gradient_checkpointing  # open_flamingo's flag, honoured
    result = fresh.load_state_dict(trainable_only_state(ref), strict=False)
    assert result.unexpected_keys == []
    assert result.missing_keys and all(".gated_cross_attn_layer." not in k and not k.startswith("perceiver.")
                                       for k in result.missing_keys)
    with torch.no_grad():
        assert (ref(vx, ids).logits - fresh(vx, ids).logits).abs().max().item() <= TOL

    # fastflamingo's own format, trainable-only: the base LM and vision sources were recorded
    model.save_pretrained(tmp_path / "ff", trainable_only=True)
    back = Flamingo.from_pretrained(tmp_path / "ff")
    a, b = model.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("freeze_lm_embeddings", [False, True])
def test_create_model_and_transforms_trains_what_open_flamingo_trains_with_untied_embeddings(
        tmp_path, freeze_lm_embeddings):
    """An LM whose output embedding (lm_head) is its own matrix (LLaMA, GPT-NeoX: Med-Flamingo,
    OpenFlamingo-4B): open_flamingo's factory trains the input embedding only, and so does this one
    (it had trained lm_head too: another optimisation, and a V x D matrix more of optimizer state)."""
    from open_flamingo import create_model_and_transforms as of_create
    lm_dir, clip_ckpt = _local_models(tmp_path, tied=False)
    kw = dict(cross_attn_every_n_layers=2, use_local_files=True, freeze_lm_embeddings=freeze_lm_embeddings)
    ours, _, _ = create_model_and_transforms(TINY_VIT, clip_ckpt, lm_dir, lm_dir, ln_post_on_tokens=True, **kw)
    ref, _, _ = of_create(TINY_VIT, clip_ckpt, lm_dir, lm_dir, **kw)
    lm = ours.lang_encoder
    assert lm.get_output_embeddings().weight is not lm.get_input_embeddings().weight
    trained = {n for n, p in ours.named_parameters() if p.requires_grad}
    # open_flamingo's blocks appear twice: in the decoder layers and in lang_encoder.gated_cross_attn_layers
    want = {n for n, p in ref.named_parameters(remove_duplicate=False)
            if p.requires_grad and not n.startswith("lang_encoder.gated_cross_attn_layers.")}
    assert trained == want, sorted(trained ^ want)
    assert ("lang_encoder.model.embed_tokens.weight" in trained) != freeze_lm_embeddings
    assert not lm.get_output_embeddings().weight.requires_grad
    count = sum(p.numel() for p in ours.parameters() if p.requires_grad)
    assert count == sum(p.numel() for p in ref.parameters() if p.requires_grad)
    ours.train()
    ids = torch.tensor([[1, ours.config.media_token_id, 5, 6, 7]])
    ours(torch.randn(1, 1, 1, 3, 32, 32), ids, labels=ids).loss.backward()
    assert lm.get_output_embeddings().weight.grad is None
    assert (lm.get_input_embeddings().weight.grad is None) == freeze_lm_embeddings


def test_an_untied_output_embedding_resized_by_the_tokenizer_set_up_is_said(tmp_path):
    """A Med-Flamingo-like checkpoint (LLaMA, its own lm_head) imported with tokenizer=: the
    set-up adds <|endofchunk|>, <image> and <PAD>, whose lm_head rows no open_flamingo checkpoint
    holds, so they keep transformers' random initialisation (another at each import, as in
    open_flamingo). The path without a tokenizer said so; this one was silent."""
    lm_dir, clip_ckpt = _local_models(tmp_path, tied=False)
    ref, _ = _open_flamingo_reference(lm_dir, clip_ckpt)
    state = trainable_only_state(ref)
    assert not [k for k in state if "lm_head" in k]
    with pytest.warns(UserWarning, match=r"the tokenizer set-up resized the LM's output embeddings from \d+ to \d+ rows "
                                         r"but the checkpoint does not hold them \(lang_encoder\.lm_head\.weight"):
        from_open_flamingo(state, lang_encoder=lm_dir, vision_encoder=(TINY_VIT, clip_ckpt), ln_post_on_tokens=True,
                           tokenizer=lm_dir)


def test_a_bfloat16_trainable_only_conversion_loads_back_in_bfloat16(local_models, tmp_path):
    """`fastflamingo convert --dtype bfloat16 --trainable-only` (a bfloat16 import, saved
    trainable-only): the loader rebuilt the frozen parts from their sources in their files'
    float32 and cast the blocks up, a float32 model, twice the memory, other logits. The save
    records its dtype: the reload is the converted model, bit for bit."""
    lm_dir, clip_ckpt = local_models
    ref, _ = _open_flamingo_reference(lm_dir, clip_ckpt)
    model = from_open_flamingo(trainable_only_state(ref), lang_encoder=lm_dir, vision_encoder=(TINY_VIT, clip_ckpt),
                               ln_post_on_tokens=True, tokenizer=lm_dir, dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "adapter", trainable_only=True)
    back = Flamingo.from_pretrained(tmp_path / "adapter")
    assert {p.dtype for p in back.parameters()} == {torch.bfloat16}
    ids = torch.tensor([[1, model.config.media_token_id, 5, 6, 7]])
    vx = torch.randn(1, 1, 1, 3, 32, 32, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(back(vx, ids).logits, model(vx, ids).logits)
    assert {p.dtype for p in Flamingo.from_pretrained(tmp_path / "adapter", dtype=torch.float32).parameters()} == \
        {torch.float32}  # (dtype= given: that one)


def test_create_model_and_transforms_requires_explicit_choices(local_models):
    lm_dir, clip_ckpt = local_models
    with pytest.raises(ValueError, match="ln_post_on_tokens"):
        create_model_and_transforms(TINY_VIT, clip_ckpt, lm_dir, lm_dir, use_local_files=True)
    with pytest.raises(TypeError, match="unexpected keyword"):
        create_model_and_transforms(TINY_VIT, clip_ckpt, lm_dir, lm_dir, use_local_files=True,
                                    ln_post_on_tokens=False, cross_attn_every_n=2)


def test_convert_command(local_models, tmp_path):
    lm_dir, clip_ckpt = local_models
    ref, _ = _open_flamingo_reference(lm_dir, clip_ckpt)
    ckpt = _save(trainable_only_state(ref), tmp_path / "checkpoint.pt")
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(["convert", "open_flamingo", str(ckpt), str(tmp_path / "out"), "--lm", lm_dir,
                              "--vision", TINY_VIT, "--vision-pretrained", clip_ckpt, "--ln-post-on-tokens", "yes",
                              "--trainable-only"])
    assert args.func(args) == 0
    model = Flamingo.from_pretrained(tmp_path / "out")
    assert model.config.cross_attention.every_n_layers == 2
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")  # written beside the model, Flamingo tokens added
    assert tok.convert_tokens_to_ids("<image>") == model.config.media_token_id
    ids = torch.tensor([[1, model.config.media_token_id, 5, 6, 7, 8]])
    vx = torch.randn(1, 1, 1, 3, 32, 32)
    with torch.no_grad():
        assert (ref(vx, ids).logits - model(vx, ids).logits).abs().max().item() <= TOL
    with pytest.raises(ValueError, match="--ln-post-on-tokens"):
        args = parser.parse_args(["convert", "open_flamingo", str(ckpt), str(tmp_path / "o2"), "--lm", lm_dir,
                                  "--vision", TINY_VIT])
        args.func(args)


def test_a_relative_vision_checkpoint_path_is_recorded_whole(local_models, tmp_path, monkeypatch):
    """create_model_and_transforms(..., "clip.pt") from the file's folder: a trainable-only save
    records the file's absolute path, so it reloads from any working directory."""
    from pathlib import Path
    lm_dir, clip_ckpt = local_models
    monkeypatch.chdir(Path(clip_ckpt).parent)
    model, _, _ = create_model_and_transforms(TINY_VIT, Path(clip_ckpt).name, lm_dir, lm_dir, ln_post_on_tokens=True,
                                              cross_attn_every_n_layers=2, use_local_files=True)
    model.save_pretrained(tmp_path / "saved", trainable_only=True)
    monkeypatch.chdir(tmp_path)
    back = Flamingo.from_pretrained(tmp_path / "saved")
    a, b = model.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _state_equal(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)


def test_a_vision_encoder_by_name_only_is_refused_and_random_weights_save_exactly(local_models, tmp_path):
    """A bare open_clip name built a random tower silently (and the convert command's
    --vision-pretrained was optional): refused, saying to give (name, pretrained). (name, None) is
    random weights on purpose; a trainable-only save of such a model stores the tower, so that it
    reloads exactly (it reloaded as another random tower on every load)."""
    lm_dir, clip_ckpt = local_models
    ref, _ = _open_flamingo_reference(lm_dir, clip_ckpt)
    ckpt = _save(trainable_only_state(ref), tmp_path / "checkpoint.pt")
    kw = dict(lang_encoder=lm_dir, tokenizer=lm_dir, ln_post_on_tokens=True)
    with pytest.raises(ValueError, match=r"vision_encoder='fastflamingo-tiny-vit' names an open_clip model but not "
                                         r"its weights.*give \(name, pretrained\), e.g. \('ViT-L-14', 'openai'\).*"
                                         r"None\) builds it with random weights, on purpose"):
        from_open_flamingo(ckpt, vision_encoder=TINY_VIT, **kw)
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    argv = ["convert", "open_flamingo", str(ckpt), str(tmp_path / "out"), "--lm", lm_dir, "--vision", TINY_VIT,
            "--ln-post-on-tokens", "yes", "--trainable-only"]
    args = parser.parse_args(argv)
    with pytest.raises(ValueError, match=r"needs --vision-pretrained .*--vision-pretrained openai, or none"):
        args.func(args)
    args = parser.parse_args(argv + ["--vision-pretrained", "none"])
    assert args.func(args) == 0
    a, b = Flamingo.from_pretrained(tmp_path / "out"), Flamingo.from_pretrained(tmp_path / "out")
    assert _state_equal(a, b)

    model = from_open_flamingo(ckpt, vision_encoder=(TINY_VIT, None), **kw)
    model.save_pretrained(tmp_path / "api", trainable_only=True)
    a, b = Flamingo.from_pretrained(tmp_path / "api"), Flamingo.from_pretrained(tmp_path / "api")
    assert _state_equal(a, model) and _state_equal(b, model)
    ids = torch.tensor([[1, model.config.media_token_id, 5, 6, 7, 8]])
    vx = torch.randn(1, 1, 1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(a(vx, ids).logits, model.eval()(vx, ids).logits)

    made, _, _ = create_model_and_transforms(TINY_VIT, None, lm_dir, lm_dir, ln_post_on_tokens=True,
                                             cross_attn_every_n_layers=2, use_local_files=True)
    made.save_pretrained(tmp_path / "made", trainable_only=True)
    assert _state_equal(Flamingo.from_pretrained(tmp_path / "made"), made)
    # a directory saved before the tower was stored: an error, not another random tower
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(str(tmp_path / "made" / "model.safetensors"), framework="pt") as f:
        meta = f.metadata()
        kept = {k: f.get_tensor(k) for k in f.keys() if not k.startswith("vision_encoder.")}
    save_file(kept, str(tmp_path / "made" / "model.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match=r"records its vision encoder as \('fastflamingo-tiny-vit', None\), random "
                                         r"weights that were not stored.*pass vision_encoder="):
        Flamingo.from_pretrained(tmp_path / "made")


def test_a_tokenizer_that_holds_the_flamingo_tokens_keeps_their_rows_trainable(local_models, tmp_path):
    """open_flamingo's tokenizer (or one fastflamingo saved) already holds <image> / <|endofchunk|>:
    the set-up took the whole vocabulary as the base one, so no Flamingo-token row trained. The base
    size is where those tokens start; the ids are the same."""
    import warnings
    from transformers import AutoTokenizer
    from fastflamingo.tokens import setup_tokenizer
    lm_dir, clip_ckpt = local_models
    ref, ref_tok = _open_flamingo_reference(lm_dir, clip_ckpt)
    ckpt = _save(trainable_only_state(ref), tmp_path / "checkpoint.pt")
    kw = dict(lang_encoder=lm_dir, vision_encoder=(TINY_VIT, clip_ckpt), ln_post_on_tokens=True)
    fresh = from_open_flamingo(ckpt, tokenizer=lm_dir, **kw)
    held = from_open_flamingo(ckpt, tokenizer=ref_tok, **kw)
    assert fresh.config.num_base_tokens == held.config.num_base_tokens == 100
    assert (held.config.media_token_id, held.config.eoc_token_id) == (fresh.config.media_token_id,
                                                                        fresh.config.eoc_token_id)
    assert _state_equal(fresh, held)
    held.train()
    ids = torch.tensor([[1, held.config.media_token_id, 5, 6, held.config.eoc_token_id, 7]])
    held(torch.randn(1, 1, 1, 3, 32, 32), ids, labels=ids).loss.backward()
    grad = held.lang_encoder.get_input_embeddings().weight.grad
    assert grad is not None and grad[held.config.media_token_id].abs().sum() > 0 and grad[:100].abs().sum() == 0

    ref_tok.save_pretrained(tmp_path / "tok")  # as `fastflamingo convert` writes it
    again = AutoTokenizer.from_pretrained(tmp_path / "tok")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert setup_tokenizer(again)["num_base_tokens"] == 100 and len(again) == 103
    # held, but not as the last ids: it cannot be told, and it is said
    again.add_tokens(["<extra>"])
    with pytest.warns(UserWarning, match=r"not as its last ids \(it has 104\).*Pass num_base_tokens="):
        assert setup_tokenizer(again)["num_base_tokens"] == 100
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert setup_tokenizer(again, num_base_tokens=101)["num_base_tokens"] == 101


def test_a_trainable_only_save_finds_its_lm_in_the_cache_dir_it_was_made_with(local_models, tmp_path):
    """create_model_and_transforms(..., cache_dir=C) with a hub name: the trainable-only save
    recorded the name but not C, so its reload looked in Hugging Face's default cache and failed."""
    import shutil
    lm_dir, clip_ckpt = local_models
    cache = tmp_path / "hub"
    snapshot = cache / "models--someone--tiny-lm" / "snapshots" / "0123abcd"
    shutil.copytree(lm_dir, snapshot)
    (cache / "models--someone--tiny-lm" / "refs").mkdir()
    (cache / "models--someone--tiny-lm" / "refs" / "main").write_text("0123abcd")
    model, _, _ = create_model_and_transforms(TINY_VIT, clip_ckpt, "someone/tiny-lm", "someone/tiny-lm",
                                              ln_post_on_tokens=True, cross_attn_every_n_layers=2,
                                              use_local_files=True, cache_dir=str(cache))
    model.save_pretrained(tmp_path / "saved", trainable_only=True)
    assert _state_equal(model, Flamingo.from_pretrained(tmp_path / "saved"))


def test_the_factory_warns_that_all_previous_mode_differs_before_the_first_image(local_models):
    from fastflamingo.warn import InputWarning
    lm_dir, clip_ckpt = local_models
    with pytest.warns(InputWarning, match=r"all-previous mode\): open_flamingo gives a token before its row's first"):
        model, _, _ = create_model_and_transforms(TINY_VIT, clip_ckpt, lm_dir, lm_dir, ln_post_on_tokens=True,
                                                  use_local_files=True, only_attend_immediate_media=False)
    assert model.config.only_attend_immediate_media is False
