"""fastflamingo's own format: save_pretrained / from_pretrained round-trips bit-exactly (full and
trainable-only), and a directory that does not fit says what is wrong."""
import copy
import json

import pytest
import torch

from fastflamingo import Flamingo, preset_config
from fastflamingo.convert.load import CheckpointMismatchError
from fastflamingo.model import build_lm
from fastflamingo.vision import build_vision_model


def _perturb(model, seed=0):
    """Non-trivial trainable weights (gates are 0 at initialisation)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return model


def _inputs(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = model.config
    ids = torch.randint(3, c.num_base_tokens, (2, 12), generator=g)
    ids[:, [1, 7]] = c.media_token_id
    return torch.randn(2, 2, 1, 3, c.vision.image_size, c.vision.image_size, generator=g), ids


def _assert_same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    vx, ids = _inputs(a)
    with torch.no_grad():
        assert torch.equal(a(vx, ids).logits, b(vx, ids).logits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_full_round_trip_is_bit_exact(tmp_path, dtype):
    model = _perturb(Flamingo.from_preset("tiny")).to(dtype)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["resampler"]["depth"] == 2
    back = Flamingo.from_pretrained(tmp_path, dtype=dtype)
    _assert_same(model, back)
    assert [n for n, p in back.named_parameters() if p.requires_grad] == \
        [n for n, p in model.named_parameters() if p.requires_grad]
    # with no dtype= too (the file's): the LM's rotary frequencies, never saved, are rebuilt in
    # float32, and a cast leaves them so (they were rounded to bfloat16: logits 0.09 apart at 200
    # tokens), as Hugging Face's from_pretrained(dtype=bfloat16) makes them
    _assert_same(model, Flamingo.from_pretrained(tmp_path))
    rotary = model.lang_encoder.model.rotary_emb
    assert rotary.inv_freq.dtype == torch.float32
    assert torch.equal(rotary.inv_freq, build_lm(model.config).model.rotary_emb.inv_freq)
    vx, _ = _inputs(model)
    ids = torch.randint(3, model.config.num_base_tokens, (2, 200), generator=torch.Generator().manual_seed(1))
    ids[:, [1, 7]] = model.config.media_token_id  # (200 tokens: long enough for rounded frequencies to show)
    with torch.no_grad():
        assert torch.equal(model(vx.to(dtype), ids).logits, Flamingo.from_pretrained(tmp_path)(vx.to(dtype), ids).logits)


def test_trainable_only_round_trip_with_the_base_models(tmp_path):
    config = preset_config("tiny")
    torch.manual_seed(0)
    lm, vision = build_lm(config), build_vision_model(config.vision)
    model = _perturb(Flamingo(config, vision_encoder=copy.deepcopy(vision), lang_encoder=copy.deepcopy(lm)))
    model.save_pretrained(tmp_path, trainable_only=True)
    from safetensors import safe_open
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert keys and all(k.startswith("perceiver.") or ".gated_cross_attn_layer." in k
                        or k in ("lang_encoder.model.embed_tokens.weight", "lang_encoder.lm_head.weight") for k in keys)
    with pytest.raises(ValueError, match="only the trainable parameters and records no base LM: pass lang_encoder="):
        Flamingo.from_pretrained(tmp_path)
    back = Flamingo.from_pretrained(tmp_path, lang_encoder=copy.deepcopy(lm), vision_encoder=copy.deepcopy(vision))
    _assert_same(model, back)


def test_quantized_models_save_what_loads_back(tmp_path):
    """QLoRA-style: the frozen LM in NF4, trained; its trainable-only save loads back onto the
    16-bit base LM quantized again, the same as the trained model. A full save of 4-bit weights
    (which would not load back) and a trainable-only save missing quantized cross-attention
    layers are refused, naming a layer and what to do."""
    from fastflamingo.quant import quantize_model
    config = preset_config("tiny")
    torch.manual_seed(0)
    lm, vision = build_lm(config), build_vision_model(config.vision)
    model = Flamingo(config, vision_encoder=copy.deepcopy(vision), lang_encoder=copy.deepcopy(lm))
    quantize_model(model, "nf4")
    _perturb(model)
    with pytest.raises(ValueError, match=r"layer\(s\) of this model hold quantized weights \(e.g. lang_encoder\..*"
                                         r"Save the 16-bit model and quantize when loading"):
        model.save_pretrained(tmp_path / "full")
    model.save_pretrained(tmp_path / "adapter", trainable_only=True)
    back = Flamingo.from_pretrained(tmp_path / "adapter", lang_encoder=copy.deepcopy(lm),
                                    vision_encoder=copy.deepcopy(vision), quantization="nf4")
    vx, ids = _inputs(model)
    with torch.no_grad():
        assert torch.equal(model.eval()(vx, ids).logits, back(vx, ids).logits)
    inference = Flamingo.from_preset("tiny").eval()
    quantize_model(inference, "int8", cross_attention=True)
    with pytest.raises(ValueError, match=r"hold quantized weights \(e.g. .*gated_cross_attn_layer.*not quantized"):
        inference.save_pretrained(tmp_path / "x", trainable_only=True)


def test_directory_that_does_not_fit_lists_keys(tmp_path):
    model = Flamingo.from_preset("tiny")
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["resampler"]["depth"] = 3
    config["cross_attention"]["dim_head"] = 8
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointMismatchError) as e:
        Flamingo.from_pretrained(tmp_path)
    assert e.value.missing and all(k.startswith("perceiver.layers.2.") for k in e.value.missing)
    assert any(k.endswith("attn.to_q.weight") and a == (64, 64) and b == (32, 64) for k, a, b in e.value.mismatched)
    assert "perceiver.layers.2.0.to_q.weight" in str(e.value) and "(64, 64) vs (32, 64)" in str(e.value)


def test_truncated_or_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        Flamingo.from_pretrained(tmp_path)
    Flamingo.from_preset("tiny").save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(ValueError, match="is the file complete"):
        Flamingo.from_pretrained(tmp_path)
    config = tmp_path / "config.json"
    config.write_text(config.read_text()[:-40])  # (a bare "Expecting ..." naming no file)
    with pytest.raises(ValueError, match=r"'.*config\.json' is not valid JSON \(.*\): is the file complete\?"):
        Flamingo.from_pretrained(tmp_path)


def test_quantization_is_applied_on_load(tmp_path):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb
    Flamingo.from_preset("tiny").save_pretrained(tmp_path)
    model = Flamingo.from_pretrained(tmp_path, quantization="int8")
    assert any(isinstance(m, bnb.nn.Linear8bitLt) for m in model.lang_encoder.modules())
    with pytest.raises(ValueError, match="quantization='int3'"):
        Flamingo.from_pretrained(tmp_path, quantization="int3")


def test_trust_remote_code_reaches_the_recorded_base_lm(tmp_path):
    """A trainable-only directory whose recorded base LM has its own code (an ``auto_map``, as
    OpenFlamingo-3B's MPT repository): ``Flamingo.from_pretrained`` builds the library's class by
    default (no remote code runs unless asked) and the repository's with ``trust_remote_code=True``."""
    from fastflamingo.convert.pretrained import record_sources
    cfg = preset_config("tiny")
    lm = build_lm(cfg)
    lm.save_pretrained(tmp_path / "lm")
    (tmp_path / "lm" / "modeling_custom.py").write_text(
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "class CustomConfig(LlamaConfig):\n    model_type = 'llama'\n"
        "class CustomForCausalLM(LlamaForCausalLM):\n    config_class = CustomConfig\n")
    c = json.loads((tmp_path / "lm" / "config.json").read_text())
    c.update(auto_map={"AutoConfig": "modeling_custom.CustomConfig",
                       "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}, architectures=["CustomForCausalLM"])
    (tmp_path / "lm" / "config.json").write_text(json.dumps(c))
    model = Flamingo(cfg, lang_encoder=lm)
    record_sources(model, lm=str(tmp_path / "lm"))
    model.save_pretrained(tmp_path / "adapter", trainable_only=True)
    plain = Flamingo.from_pretrained(tmp_path / "adapter", vision_encoder=model.vision_encoder)
    assert type(plain.lang_encoder).__name__ == "LlamaForCausalLM"
    trusted = Flamingo.from_pretrained(tmp_path / "adapter", vision_encoder=model.vision_encoder, trust_remote_code=True)
    assert type(trusted.lang_encoder).__name__ == "CustomForCausalLM"


def test_trainable_only_save_of_a_loaded_model_reloads_onto_its_base_directory(tmp_path):
    """A model loaded from a full directory, trained, then saved trainable-only (fine-tuning's
    ``model/``) loads back with no argument: the frozen parts from the directory it was loaded from
    (recorded), the saved weights over them; the same logits. A base that moved is a clear error."""
    Flamingo.from_preset("tiny").save_pretrained(tmp_path / "base")
    model = Flamingo.from_pretrained(tmp_path / "base")
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(tmp_path / "trained", trainable_only=True)
    vx, ids = torch.randn(1, 1, 1, 3, 32, 32), torch.tensor([[510, 5, 6, 7]])
    back = Flamingo.from_pretrained(tmp_path / "trained")
    with torch.no_grad():
        assert torch.equal(back(vx, ids).logits, model(vx, ids).logits)
    (tmp_path / "base").rename(tmp_path / "moved")
    with pytest.raises(FileNotFoundError, match="not a fastflamingo directory any more: pass lang_encoder="):
        Flamingo.from_pretrained(tmp_path / "trained")


def test_a_trainable_only_save_onto_its_base_keeps_its_own_trainable_set(tmp_path):
    """The config saved beside the trainable weights is read, not only the base's: a change of
    which embedding rows train (num_base_tokens, train_output_embeddings) made after loading the
    base comes back; a change of anything else is an error naming the field."""
    Flamingo.from_preset("tiny").save_pretrained(tmp_path / "base")
    model = Flamingo.from_pretrained(tmp_path / "base")
    base_rows = model.config.num_base_tokens
    model.config.num_base_tokens, model.config.train_output_embeddings = 0, False
    model.set_trainable()
    model.save_pretrained(tmp_path / "trained", trainable_only=True)
    back = Flamingo.from_pretrained(tmp_path / "trained")
    assert (back.config.num_base_tokens, back.config.train_output_embeddings) == (0, False) != (base_rows, True)
    assert {n for n, p in back.named_parameters() if p.requires_grad} == \
        {n for n, p in model.named_parameters() if p.requires_grad}
    config = json.loads((tmp_path / "trained" / "config.json").read_text())
    config["only_attend_immediate_media"] = False
    (tmp_path / "trained" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"another config than its base.*\['only_attend_immediate_media'\]"):
        Flamingo.from_pretrained(tmp_path / "trained")


def test_a_trainable_only_save_recording_its_lm_but_not_its_vision_encoder_stores_the_encoder(tmp_path):
    """The loader would rebuild such a model from its recorded LM and a vision encoder made from
    the config (random): the save stores the encoder's weights, and loading takes them, exactly."""
    from fastflamingo.convert.pretrained import record_sources
    cfg = preset_config("tiny")
    lm = build_lm(cfg)
    lm.save_pretrained(tmp_path / "lm")
    model = _perturb(Flamingo(cfg, lang_encoder=lm))
    record_sources(model, lm=str(tmp_path / "lm"))
    model.save_pretrained(tmp_path / "adapter", trainable_only=True)
    _assert_same(model, Flamingo.from_pretrained(tmp_path / "adapter"))
    given = Flamingo.from_pretrained(tmp_path / "adapter", vision_encoder=build_vision_model(cfg.vision))
    _assert_same(model, given)  # the stored weights, into the module given


def test_a_trainable_only_save_into_its_own_base_directory_is_refused(tmp_path):
    """A model loaded from a full directory and saved trainable-only into that same directory
    overwrote its frozen weights with the trained ones alone, and recorded itself as its base:
    loading it then recursed without end. Now refused, the directory untouched; a trainable-only
    base (such a directory, written before) is an error naming it, not a RecursionError."""
    Flamingo.from_preset("tiny").save_pretrained(tmp_path / "m")
    before = (tmp_path / "m" / "model.safetensors").read_bytes()
    model = _perturb(Flamingo.from_pretrained(tmp_path / "m"))
    with pytest.raises(ValueError, match=r"holds the model this one was loaded from, whose frozen weights"):
        model.save_pretrained(tmp_path / "m", trainable_only=True)
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == before
    model.save_pretrained(tmp_path / "m")  # a whole save in place is fine
    _assert_same(model, Flamingo.from_pretrained(tmp_path / "m"))
    # such a directory as an earlier version wrote it: trainable-only, its own base
    from fastflamingo.convert.pretrained import BASE, SOURCES_ATTR
    setattr(model, SOURCES_ATTR, {})
    model.save_pretrained(tmp_path / "m", trainable_only=True)
    from safetensors.torch import load_file, save_file
    state = load_file(tmp_path / "m" / "model.safetensors")
    meta = {"format": "pt", "fastflamingo.contents": "trainable", "fastflamingo.aliases": "{}",
            "fastflamingo.sources": json.dumps({BASE: str((tmp_path / "m").resolve())})}
    save_file(state, tmp_path / "m" / "model.safetensors", metadata=meta)
    with pytest.raises(ValueError, match=r"holds only trainable parameters too \(it is this directory: its frozen "
                                         r"weights were overwritten\)"):
        Flamingo.from_pretrained(tmp_path / "m")


def test_a_failed_load_gives_the_lm_back_and_one_lm_serves_one_model(tmp_path):
    """build_and_load wraps the LM passed before it checks the checkpoint: a failed load left
    it wrapped (its decoder layers in FlamingoLayers, the model's hooks on its embedding), so a
    retry with the right arguments listed every block key twice over. Now the LM comes back as
    it was, and the retry loads; an LM already inside a model is refused by name (the second
    model would have wrapped it again and broken the first)."""
    config = preset_config("tiny")
    torch.manual_seed(0)
    lm, vision = build_lm(config), build_vision_model(config.vision)
    model = _perturb(Flamingo(config, vision_encoder=copy.deepcopy(vision), lang_encoder=copy.deepcopy(lm)))
    model.save_pretrained(tmp_path, trainable_only=True)
    given = copy.deepcopy(lm)
    layers = list(given.model.layers)
    flags = [p.requires_grad for p in given.parameters()]
    wrong = json.loads((tmp_path / "config.json").read_text())
    wrong["cross_attention"]["every_n_layers"] = 1
    (tmp_path / "wrong").mkdir()
    (tmp_path / "wrong" / "config.json").write_text(json.dumps(wrong))
    (tmp_path / "wrong" / "model.safetensors").write_bytes((tmp_path / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointMismatchError):
        Flamingo.from_pretrained(tmp_path / "wrong", lang_encoder=given, vision_encoder=copy.deepcopy(vision))
    assert list(given.model.layers) == layers and [p.requires_grad for p in given.parameters()] == flags
    assert not given.model.embed_tokens._forward_hooks
    back = Flamingo.from_pretrained(tmp_path, lang_encoder=given, vision_encoder=copy.deepcopy(vision))
    _assert_same(model, back)
    with pytest.raises(ValueError, match=r"this LlamaForCausalLM is already the LM of a Flamingo model"):
        Flamingo.from_pretrained(tmp_path, lang_encoder=given, vision_encoder=copy.deepcopy(vision))
    _assert_same(model, back)  # the first model still works


def test_a_base_lm_directory_missing_weights_is_named(tmp_path):
    """A trainable-only save loads its frozen LM from the directory it records: one missing a
    weight (a partial download) was filled with random values by transformers, which only logs
    it, and the load succeeded. Now a CheckpointMismatchError naming the weight."""
    from safetensors.torch import load_file, save_file

    from fastflamingo.convert.pretrained import record_sources
    config = preset_config("tiny")
    torch.manual_seed(0)
    lm = build_lm(config)
    lm.save_pretrained(tmp_path / "lm")
    model = _perturb(Flamingo(config, vision_encoder=build_vision_model(config.vision), lang_encoder=copy.deepcopy(lm)))
    record_sources(model, lm=str(tmp_path / "lm"))
    model.save_pretrained(tmp_path / "adapter", trainable_only=True)
    back = Flamingo.from_pretrained(tmp_path / "adapter", vision_encoder=copy.deepcopy(model.vision_encoder))
    vx, ids = _inputs(model)
    with torch.no_grad():
        assert torch.equal(back(vx, ids).logits, model(vx, ids).logits)
    weights = tmp_path / "lm" / "model.safetensors"
    state = load_file(weights)
    del state["model.layers.2.mlp.down_proj.weight"]
    save_file(state, weights, metadata={"format": "pt"})
    with pytest.raises(CheckpointMismatchError, match=r"1 missing(.|\n)*model\.layers\.2\.mlp\.down_proj\.weight(.|\n)*"
                                                      r"lacks weights its config needs"):
        Flamingo.from_pretrained(tmp_path / "adapter", vision_encoder=copy.deepcopy(model.vision_encoder))


def test_the_lm_comes_back_running_the_attention_it_was_saved_with(tmp_path):
    """transformers' config.to_dict leaves the attention implementation out: an "eager" LM was
    rebuilt "sdpa" (logits 3e-7 apart, and output_attentions lost), full and trainable-only alike;
    one this machine cannot run (flash-attn not installed) is a warning naming it, and the default."""
    from fastflamingo.convert.pretrained import record_sources
    from fastflamingo.warn import InputWarning
    from transformers import AutoModelForCausalLM
    config = preset_config("tiny")
    torch.manual_seed(0)
    lm = build_lm(config)
    lm.save_pretrained(tmp_path / "lm")
    eager = AutoModelForCausalLM.from_pretrained(tmp_path / "lm", attn_implementation="eager")
    model = _perturb(Flamingo(config, lang_encoder=eager))
    record_sources(model, lm=str(tmp_path / "lm"))
    model.save_pretrained(tmp_path / "full")
    model.save_pretrained(tmp_path / "adapter", trainable_only=True)
    for d, kw in (("full", {}), ("adapter", {"vision_encoder": model.vision_encoder})):
        back = Flamingo.from_pretrained(tmp_path / d, **kw)
        assert back.lang_encoder.config._attn_implementation == "eager", d
        _assert_same(model, back)
    assert model.config.lm.get("attn_implementation") is None  # (recorded in the file, the model's config unchanged)
    saved = json.loads((tmp_path / "full" / "config.json").read_text())
    saved["lm"]["attn_implementation"] = "flash_attention_2"
    (tmp_path / "full" / "config.json").write_text(json.dumps(saved))
    with pytest.warns(InputWarning, match=r"the LM was saved running attention 'flash_attention_2', which cannot run "
                                          r"here .*: it runs transformers' default"):
        back = Flamingo.from_pretrained(tmp_path / "full")
    assert back.lang_encoder.config._attn_implementation == "sdpa"
