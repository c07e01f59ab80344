"""Imports that must not go wrong silently: a checkpoint in another dtype than the base LM it goes
into, open_flamingo checkpoints without their embeddings or their last resampler layer or with keys
the layout reader looks at, a plan that puts the whole model on disk, and the ``convert`` command's
refusals (IDEFICS with --trainable-only, a directory that is not IDEFICS, missing options)."""
import argparse
import copy
import json

import pytest
import torch

from fastflamingo import Flamingo, from_open_flamingo, preset_config
from fastflamingo.convert.cli import add_parser
from fastflamingo.convert.load import CheckpointMismatchError
from fastflamingo.model import build_lm
from fastflamingo.vision import build_vision_model

from peers import EOC_ID, MEDIA_ID, TINY_VIT, open_flamingo_model, tiny_lm, tiny_lm_config, tiny_open_clip
from peers_idefics import tiny_tokenizer


def _needs_open_flamingo():
    pytest.importorskip("open_flamingo", reason="install the test extras: see README")


def _blocks(live) -> dict:
    """The resampler and cross-attention blocks of a live open_flamingo model."""
    return {k: v for k, v in live.state_dict().items()
            if k.startswith("perceiver.") or ".gated_cross_attn_layer." in k}


def _base_lm(live, family="mpt"):
    lm = tiny_lm(family)
    lm.load_state_dict({k.replace(".decoder_layer.", "."): v for k, v in live.lang_encoder.state_dict().items()
                        if "gated_cross_attn" not in k and "old_decoder_blocks" not in k})
    return lm


def _load(state, live, lm=None, **kw):
    kw = dict(media_token_id=MEDIA_ID, eoc_token_id=EOC_ID, ln_post_on_tokens=True) | kw
    return from_open_flamingo(state, lang_encoder=tiny_lm("mpt") if lm is None else lm,
                              vision_encoder=copy.deepcopy(live.vision_encoder), **kw)


@pytest.fixture(scope="module")
def live():
    _needs_open_flamingo()
    return open_flamingo_model("mpt", every_n=1)


def _float_dtypes(module) -> set:
    return {p.dtype for p in module.parameters() if p.is_floating_point()}


# ------------------------------------------------------------------ item 1: dtypes
def test_checkpoint_tensors_take_the_dtype_of_the_lm_they_go_into(live, tmp_path):
    """A bf16 checkpoint (open_flamingo's --precision bf16) on an fp32 LM gives an fp32 model that
    runs, the same as the fp32 checkpoint up to bf16 rounding; and an fp32 one on a bf16 LM a bf16
    model. dtype= given: that dtype throughout."""
    state = _blocks(live)
    path = tmp_path / "bf16.pt"
    torch.save({"model_state_dict": {k: v.to(torch.bfloat16) for k, v in state.items()}}, path)
    ids = torch.tensor([[MEDIA_ID, 5, 6, 7, 8]])
    vx = torch.randn(1, 1, 1, 3, 32, 32)
    ref = _load(state, live, _base_lm(live))
    ours = _load(path, live, _base_lm(live))
    assert _float_dtypes(ours) == {torch.float32}
    with torch.no_grad():
        diff = (ref(vx, ids).logits - ours(vx, ids).logits).abs().max().item()
    assert diff < 0.05

    wide = _load(state, live, _base_lm(live).to(torch.bfloat16))  # fp32 blocks on a bf16 LM
    assert _float_dtypes(wide.lang_encoder) == {torch.bfloat16} and _float_dtypes(wide.perceiver) == {torch.bfloat16}
    with torch.no_grad():
        wide(vx, ids)

    asked = _load(path, live, _base_lm(live), dtype=torch.bfloat16)
    assert _float_dtypes(asked) == {torch.bfloat16}


def test_trainable_only_save_loads_in_the_base_lm_dtype(tmp_path):
    config = preset_config("tiny")
    torch.manual_seed(0)
    lm, vision = build_lm(config), build_vision_model(config.vision)
    model = Flamingo(config, vision_encoder=copy.deepcopy(vision), lang_encoder=copy.deepcopy(lm))
    model.to(torch.bfloat16).save_pretrained(tmp_path / "adapter", trainable_only=True)
    back = Flamingo.from_pretrained(tmp_path / "adapter", lang_encoder=copy.deepcopy(lm),
                                    vision_encoder=copy.deepcopy(vision))
    assert _float_dtypes(back) == {torch.float32}
    with torch.no_grad():
        back(torch.randn(1, 1, 1, 3, 32, 32), torch.tensor([[config.media_token_id, 5, 6, 7]]))
    # a full save keeps its dtype, its tensors taken as they are (nothing is cast or copied)
    model.save_pretrained(tmp_path / "full")
    full = Flamingo.from_pretrained(tmp_path / "full")
    assert _float_dtypes(full) == {torch.bfloat16}


# ------------------------------------------------------------------ item 2: embeddings
@pytest.fixture(scope="module")
def local_lm(tmp_path_factory):
    """A tiny LLaMA + tokenizer directory without the Flamingo tokens."""
    from transformers import AutoModelForCausalLM
    d = tmp_path_factory.mktemp("lm")
    cfg = tiny_lm_config("llama")
    cfg.vocab_size, cfg.pad_token_id, cfg.tie_word_embeddings = 100, None, True
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(d)
    tiny_tokenizer(100, {"<unk>": 0, "<s>": 1, "</s>": 2}).save_pretrained(d)
    return str(d)


def _blocks_without_embeddings(local_lm, tmp_path):
    """(an open_flamingo model over ``local_lm``, its resampler and blocks alone, its vision
    encoder's checkpoint path)."""
    _needs_open_flamingo()
    from open_flamingo import create_model_and_transforms as of_create
    clip = tmp_path / "clip.pt"
    torch.save(tiny_open_clip(seed=5).state_dict(), clip)
    torch.manual_seed(1)
    ref, _, _ = of_create(TINY_VIT, str(clip), local_lm, local_lm, cross_attn_every_n_layers=2,
                          use_local_files=True)
    state = {k: v for k, v in ref.state_dict().items()
             if k.startswith("perceiver.") or (".gated_cross_attn_layer." in k and "gated_cross_attn_layers" not in k)}
    return ref, state, clip


def test_checkpoint_without_the_input_embeddings_is_refused_when_tokens_are_added(local_lm, tmp_path):
    """open_flamingo's checkpoints hold the LM's input embeddings (the added tokens' trained rows):
    without them, the rows tokenizer= adds would stay random."""
    ref, state, clip = _blocks_without_embeddings(local_lm, tmp_path)
    kw = dict(lang_encoder=local_lm, tokenizer=local_lm, vision_encoder=(TINY_VIT, str(clip)), ln_post_on_tokens=True)
    with pytest.raises(CheckpointMismatchError) as e:
        from_open_flamingo(state, **kw)
    assert e.value.missing == ["lang_encoder.model.embed_tokens.weight"]
    msg = str(e.value)
    assert "added 3 token(s)" in msg and "from 100 to 103 rows" in msg and "would stay random" in msg
    # with them, as open_flamingo saves: loads, the added rows its own
    embed = "lang_encoder.model.embed_tokens.weight"
    ours = from_open_flamingo(state | {embed: ref.state_dict()[embed]}, **kw)
    assert torch.equal(ours.lang_encoder.get_input_embeddings().weight, ref.lang_encoder.get_input_embeddings().weight)
    # ids that contradict the tokenizer's were dropped without a word (they came back swapped)
    with pytest.raises(ValueError, match=r"media_token_id=5, but the tokenizer set up as open_flamingo does gives "
                                         rf"{ours.config.media_token_id}: pass tokenizer= alone"):
        from_open_flamingo(state | {embed: ref.state_dict()[embed]}, **kw, media_token_id=5)


def test_a_failed_import_gives_the_lm_and_tokenizer_back_as_they_were(local_lm, tmp_path):
    """The tokenizer set-up added <image> / <|endofchunk|> to the caller's tokenizer and resized the
    caller's LM before the checkpoint was found wanting: after the error both stayed so (a retry
    took the random rows as the LM's own, the embeddings check passed by). A success sets the
    tokenizer up, as before."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    ref, state, clip = _blocks_without_embeddings(local_lm, tmp_path)
    lm, tok = AutoModelForCausalLM.from_pretrained(local_lm), AutoTokenizer.from_pretrained(local_lm)
    embed, head, vocab = lm.get_input_embeddings(), lm.get_output_embeddings(), lm.config.vocab_size
    kw = dict(lang_encoder=lm, tokenizer=tok, vision_encoder=(TINY_VIT, str(clip)), ln_post_on_tokens=True)
    with pytest.raises(CheckpointMismatchError, match="would stay random"):
        from_open_flamingo(state, **kw)
    assert len(tok) == 100 and "<image>" not in tok.get_vocab()
    assert lm.get_input_embeddings() is embed and lm.get_output_embeddings() is head and lm.config.vocab_size == vocab
    assert embed.weight.shape[0] == 100 and lm.lm_head.weight is embed.weight  # (tied, as before)
    with pytest.raises(CheckpointMismatchError, match="would stay random"):  # the same error again, not a pass
        from_open_flamingo(state, **kw)
    key = "lang_encoder.model.embed_tokens.weight"
    ours = from_open_flamingo(state | {key: ref.state_dict()[key]}, **kw)
    assert len(tok) == 103 and tok.convert_tokens_to_ids("<image>") == ours.config.media_token_id
    assert torch.equal(ours.lang_encoder.get_input_embeddings().weight, ref.lang_encoder.get_input_embeddings().weight)


def test_inputs_of_another_kind_say_what_they_are(local_lm, tmp_path):
    """A Hugging Face LM directory given to from_pretrained (was "FlamingoConfig: unknown
    field(s)"), a directory given to from_open_flamingo (was "does not exist"), and a corrupt
    shard index (a bare JSONDecodeError naming no file)."""
    from fastflamingo.convert.io import load_state_dir
    with pytest.raises(ValueError, match=r"is a Hugging Face 'llama' model directory, not a fastflamingo one"):
        Flamingo.from_pretrained(local_lm)
    with pytest.raises(IsADirectoryError, match=r"is a directory, not a checkpoint file"):
        from_open_flamingo(str(tmp_path), lang_encoder=local_lm, tokenizer=local_lm)
    (tmp_path / "model.safetensors.index.json").write_text("{weight_map: oops")
    with pytest.raises(ValueError, match=r"the shard index '.*model\.safetensors\.index\.json' is not a Hugging Face "
                                         r"index .*JSONDecodeError"):
        load_state_dir(tmp_path)


# ------------------------------------------------------------------ items 3, 4: truncated checkpoints
def test_open_flamingo_builds_the_resampler_depth_assumed():
    _needs_open_flamingo()
    from fastflamingo.convert.open_flamingo_ckpt import OPEN_FLAMINGO_RESAMPLER_DEPTH
    assert len(open_flamingo_model("mpt").perceiver.layers) == OPEN_FLAMINGO_RESAMPLER_DEPTH == 6


def test_checkpoint_without_its_last_resampler_layer_is_incomplete(live):
    partial = {k: v for k, v in _blocks(live).items() if not k.startswith("perceiver.layers.5.")}
    with pytest.raises(CheckpointMismatchError) as e:
        _load(partial, live)
    assert e.value.missing and all(k.startswith("perceiver.layers.5.") for k in e.value.missing)
    assert "resampler of 6 layers" in str(e.value) and "holds 5 of them" in str(e.value)


@pytest.mark.parametrize("lost", ["perceiver.layers.0.", "lang_encoder.transformer.blocks.0.gated_cross_attn_layer.ff.",
                                  "lang_encoder.transformer.blocks.0.gated_cross_attn_layer.attn.to_"])
def test_checkpoint_missing_the_keys_the_layout_is_read_from_lists_them(live, lost):
    partial = {k: v for k, v in _blocks(live).items() if not k.startswith(lost)}
    with pytest.raises(CheckpointMismatchError) as e:
        _load(partial, live)
    assert e.value.missing and all(k.startswith(lost) for k in e.value.missing)
    assert not e.value.unexpected and not e.value.mismatched


def test_layout_of_a_checkpoint_with_one_block_missing_its_widths_is_open_flamingos():
    from fastflamingo.convert.open_flamingo_ckpt import read_open_flamingo_layout
    state = {"perceiver.latents": torch.empty(64, 1024, device="meta"),
             "lang_encoder.transformer.blocks.0.gated_cross_attn_layer.attn_gate": torch.empty(1, device="meta")}
    layout = read_open_flamingo_layout(state)
    assert (layout.depth, layout.vis_dim, layout.perceiver_inner, layout.xattn_inner) == (6, 1024, 512, 512)
    assert layout.perceiver_ff_mult == layout.xattn_ff_mult == 4 and "hidden size ?" in layout.describe()


# ------------------------------------------------------------------ item 5: all on disk
def test_plan_with_the_whole_model_on_disk_is_refused(tmp_path):
    pytest.importorskip("accelerate")
    Flamingo.from_preset("tiny", seed=3).save_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match=r"max_memory=\{'cpu': 0\} leaves no room.*whole model .* 'disk'"):
        Flamingo.from_pretrained(tmp_path / "m", device_map="sequential", max_memory={"cpu": 0},
                                 offload_folder=str(tmp_path / "off"))
    with pytest.raises(ValueError, match=r"device_map=\{'': 'disk'\}: the whole model .* name a GPU or 'cpu'"):
        Flamingo.from_pretrained(tmp_path / "m", device_map={"": "disk"}, offload_folder=str(tmp_path / "off"))


# ------------------------------------------------------------------ items 7, 9, 10: the convert command
def _parse(*argv):
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    return parser.parse_args(["convert", *map(str, argv)])


def test_convert_idefics_refuses_trainable_only(tmp_path):
    args = _parse("idefics", tmp_path / "missing", tmp_path / "out", "--trainable-only")
    with pytest.raises(ValueError, match="--trainable-only applies to open_flamingo checkpoints only"):
        args.func(args)
    assert not (tmp_path / "out").exists()


def test_convert_idefics_on_a_fastflamingo_directory_says_what_it_is(tmp_path, capsys):
    from fastflamingo.cli import main
    Flamingo.from_preset("tiny").save_pretrained(tmp_path / "ff")
    assert main(["convert", "idefics", str(tmp_path / "ff"), str(tmp_path / "out")]) == 2
    assert "is a fastflamingo directory (already converted), not IDEFICS" in capsys.readouterr().err
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "config.json").write_text(json.dumps({"hidden_size": 8}))
    assert main(["convert", "idefics", str(tmp_path / "bare"), str(tmp_path / "out")]) == 2
    assert "without a model_type, not IDEFICS" in capsys.readouterr().err


def test_convert_open_flamingo_without_its_options_is_a_usage_error(tmp_path, capsys):
    from fastflamingo.cli import main
    assert main(["convert", "open_flamingo", str(tmp_path / "c.pt"), str(tmp_path / "out"), "--lm", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fastflamingo convert: error: ") and "--vision, --vision-pretrained, --ln-post-on-tokens" in err
    assert len(err.splitlines()) == 1


def test_from_pretrained_of_a_missing_directory_says_it_loads_local_directories(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does not exist: a fastflamingo model is a local directory"):
        Flamingo.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "checkpoint.pt").write_bytes(b"")  # a file where a directory belongs (it said "does not exist")
    with pytest.raises(NotADirectoryError, match=r"checkpoint.pt' is a file: .*its model/ folder, not checkpoint.pt"):
        Flamingo.from_pretrained(tmp_path / "checkpoint.pt")
    with pytest.raises(FileNotFoundError, match=r"does not exist.*nothing is downloaded"):
        Flamingo.from_pretrained("HuggingFaceM4/idefics-9b")
    with pytest.raises(FileNotFoundError, match=r"is not a fastflamingo directory: config.json is missing"):
        Flamingo.from_pretrained(tmp_path)


@pytest.mark.parametrize("option, match", [(dict(quantization="fp8"), "quantization='fp8'"),
                                           (dict(dtype="float33"), "dtype='float33'"),
                                           (dict(quantization="nf4", device="meta"), "meta")])
def test_bad_load_options_are_refused_before_anything_is_read(tmp_path, option, match):
    # every source below is missing: the option's error must come first (not after a long load)
    missing = str(tmp_path / "nowhere")
    from fastflamingo import create_model_and_transforms, from_idefics
    loads = [lambda **o: Flamingo.from_preset("no-such-preset", **o),
             lambda **o: Flamingo.from_pretrained(missing, **o)]
    if "device" not in option:  # the converters take no device= (they keep the source's)
        loads += [lambda **o: from_open_flamingo(missing + ".pt", **o), lambda **o: from_idefics(missing, **o)]
    if set(option) == {"quantization"}:
        loads.append(lambda **o: create_model_and_transforms("no-such-vit", None, missing, missing, **o))
    for load in loads:
        with pytest.raises(ValueError, match=match):
            load(**option)


def test_convert_with_a_missing_lm_or_a_bad_vision_encoder_is_one_line_naming_it(local_lm, tmp_path, capsys,
                                                                                monkeypatch):
    """A missing --lm / --tokenizer directory was a traceback telling the user to check their
    internet connection (transformers took the path for a hub name); an unknown --vision name, a
    missing --vision-pretrained file, an unknown tag: open_clip's tracebacks."""
    from fastflamingo.cli import main
    monkeypatch.delenv("FASTFLAMINGO_TRACEBACK", raising=False)
    ref, state, clip = _blocks_without_embeddings(local_lm, tmp_path)
    key = "lang_encoder.model.embed_tokens.weight"
    torch.save(state | {key: ref.state_dict()[key]}, tmp_path / "ckpt.pt")
    base = ["convert", "open_flamingo", str(tmp_path / "ckpt.pt"), str(tmp_path / "out"), "--ln-post-on-tokens", "yes"]
    missing = str(tmp_path / "no-such-lm")
    cases = [
        (["--lm", missing, "--vision", TINY_VIT, "--vision-pretrained", str(clip)],
         f"--lm {missing!r} is not a directory: give the local directory of the LM"),
        (["--lm", local_lm, "--tokenizer", missing, "--vision", TINY_VIT, "--vision-pretrained", str(clip)],
         f"--tokenizer {missing!r} is not a directory"),
        (["--lm", local_lm, "--vision", "NotAModel", "--vision-pretrained", "none"],
         "'NotAModel' is not an open_clip model name"),
        (["--lm", local_lm, "--vision", TINY_VIT, "--vision-pretrained", str(tmp_path / "clip_missing.bin")],
         f"the vision encoder's weights {str(tmp_path / 'clip_missing.bin')!r} are not a file"),
        (["--lm", local_lm, "--vision", TINY_VIT, "--vision-pretrained", "nosuchtag"],
         f"open_clip could not give {TINY_VIT} its weights 'nosuchtag'"),
    ]
    for args, message in cases:
        capsys.readouterr()
        assert main(base + args) == 2, args
        err = capsys.readouterr().err
        assert f"fastflamingo convert: error: {message}" in err and "Traceback" not in err, err
    assert main(base + ["--lm", local_lm, "--vision", TINY_VIT, "--vision-pretrained", str(clip)]) == 0
