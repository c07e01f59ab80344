"""fastflamingo computes what Hugging Face IDEFICS computes: same weights, same logits (fp32) and the
same greedy tokens (Hugging Face's ``generate`` vs fastflamingo's), from IDEFICS's own inputs and from
open_flamingo-style (vision_x, lang_x)."""
import argparse

import pytest
import torch

from fastflamingo import Flamingo, from_idefics
from fastflamingo.convert.cli import add_parser
from fastflamingo.warn import InputWarning

from peers_idefics import (EOS_ID, IMAGE_ID, PAD_ID, VOCAB, idefics_config, idefics_inputs, idefics_model,
                           idefics_tokenizer, text_time_from_image_mask)

# every option on and off at least once, in different combinations
CONFIGS = [
    dict(use_resampler=True, qk_layer_norms=True, alpha_type="vector", cross_layer_interval=1),
    dict(use_resampler=False, qk_layer_norms=False, alpha_type="float", cross_layer_interval=2),
    dict(use_resampler=True, qk_layer_norms=False, alpha_type="float", cross_layer_interval=2),
    dict(use_resampler=False, qk_layer_norms=True, alpha_type="vector", cross_layer_interval=1),
]
TOL = 1e-4


def _max_diff(ref, got, mask):
    return (ref - got).abs()[mask.bool()].max().item()


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_logits_and_greedy_tokens_match_idefics(cfg):
    hf = idefics_model(**cfg)
    ours = from_idefics(hf)
    assert ours.config.resampler.enabled == cfg["use_resampler"]
    assert ours.config.cross_attention.alpha_type == cfg["alpha_type"]
    x = idefics_inputs()
    assert (x["input_ids"] == EOS_ID).any() and x["image_attention_mask"].shape[-1] == 2
    with torch.no_grad():
        ref = hf(**x).logits
        got = ours(**x).logits
        got_of = ours(x["pixel_values"][:, :, None], x["input_ids"], attention_mask=x["attention_mask"]).logits
    assert _max_diff(ref, got, x["attention_mask"]) <= TOL
    # open_flamingo-style inputs: the image index comes from <image> tokens and EOS, as IDEFICS's processor does
    assert _max_diff(ref, got_of, x["attention_mask"]) <= TOL

    ref_ids = hf.generate(**x, max_new_tokens=6, do_sample=False)
    got_ids = ours.generate(x["pixel_values"][:, :, None], x["input_ids"], x["attention_mask"], max_new_tokens=6,
                            eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    assert torch.equal(ref_ids, got_ids[:, :ref_ids.shape[1]]), (ref_ids, got_ids)


def test_text_after_eos_sees_no_image():
    """The EOS reset is live in the test inputs: without it the logits after the EOS change."""
    hf = idefics_model()
    ours = from_idefics(hf)
    x = idefics_inputs()
    tt = text_time_from_image_mask(x["image_attention_mask"])
    after_eos = (x["input_ids"] == EOS_ID).cumsum(-1).bool() & (tt == 0)
    assert after_eos.any()
    assert torch.equal(ours.text_time(x["input_ids"]), tt.to(torch.int32))
    no_reset = x["image_attention_mask"].clone()
    no_reset[0, after_eos[0], 0] = 1  # the text after EOS would see image 1
    with torch.no_grad():
        base = ours(**x).logits
        changed = ours(**{**x, "image_attention_mask": no_reset}).logits
    assert (base - changed).abs()[0][after_eos[0]].max() > 1e-3


def test_from_directory_and_additional_rows_train(tmp_path):
    hf = idefics_model(**CONFIGS[1])
    hf.save_pretrained(tmp_path / "hf")
    idefics_tokenizer().save_pretrained(tmp_path / "hf")
    ours = from_idefics(tmp_path / "hf")
    assert ours.config.media_token_id == IMAGE_ID and ours.config.eos_resets_media
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(["convert", "idefics", str(tmp_path / "hf"), str(tmp_path / "ff")])
    assert args.func(args) == 0
    assert (tmp_path / "ff" / "tokenizer.json").is_file()
    x = idefics_inputs(seed=1)
    with torch.no_grad():
        ref = hf(**x).logits
        assert _max_diff(ref, ours(**x).logits, x["attention_mask"]) <= TOL
        assert _max_diff(ref, Flamingo.from_pretrained(tmp_path / "ff")(**x).logits, x["attention_mask"]) <= TOL
    # only the additional vocabulary rows of the input embeddings are trainable
    emb = ours.lang_encoder.get_input_embeddings().weight
    ours(**x).logits.sum().backward()
    assert emb.grad[:VOCAB].abs().max() == 0 and emb.grad[VOCAB:].abs().max() > 0
    assert not any(p.requires_grad for p in ours.vision_encoder.parameters())


def test_round_trip_through_fastflamingo_format(tmp_path):
    ours = from_idefics(idefics_model(**CONFIGS[0]))
    ours.save_pretrained(tmp_path)
    back = Flamingo.from_pretrained(tmp_path)
    a, b = ours.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x = idefics_inputs()
    with torch.no_grad():
        assert torch.equal(ours(**x).logits, back(**x).logits)


def test_not_an_idefics_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        from_idefics(tmp_path)


def test_import_keeps_every_tensor_on_the_weights_device():
    """Tensors a state dict does not hold (non-persistent buffers: the vision embeddings'
    position ids, the LM's rotary frequencies) follow the imported weights' device: an IDEFICS
    model on a GPU gave a CPU ``position_ids`` buffer and an embedding lookup across devices.
    Checked with the meta device, which this CPU machine has."""
    from transformers import IdeficsForVisionText2Text
    with torch.device("meta"):
        live = IdeficsForVisionText2Text(idefics_config())
    ours = from_idefics(live, media_token_id=live.config.vocab_size)
    wrong = [n for n, t in [*ours.named_parameters(), *ours.named_buffers()] if t.device.type != "meta"]
    assert not wrong, wrong[:5]


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_logits_match_idefics_on_other_attention_backends(backend):
    """The IDEFICS-style attentions (q/k norms, EOS resets) forced to the Triton kernels (the
    interpreter on the CPU) or the reference: the same logits as Hugging Face's IDEFICS."""
    from fastflamingo.ops import dispatch
    if backend == "triton" and not dispatch.HAS_TRITON:
        pytest.skip("triton is not installed")
    if backend == "triton" and torch.cuda.is_available():
        pytest.skip("the Triton kernels take these CPU tensors only in the interpreter, which conftest "
                    "sets where there is no GPU; on a GPU machine the cuda tests run them")
    hf = idefics_model(**CONFIGS[0])
    ours = from_idefics(hf)
    ours.set_attention_backend(backend)
    x = idefics_inputs()
    with torch.no_grad():
        ref = hf(**x).logits
        got = ours(**x).logits
    assert _max_diff(ref, got, x["attention_mask"]) <= TOL


@pytest.mark.parametrize("cfg", [CONFIGS[0], CONFIGS[3]], ids=["resampler", "no-resampler"])
def test_logits_under_bfloat16_autocast_match_idefics(cfg):
    """q / k layer norms give float32 (their weights are float32) beside a bfloat16 v under
    autocast: the attention refused them ("v has dtype torch.bfloat16 but q has torch.float32");
    Hugging Face's SDPA runs them all in bfloat16. Compared as the flash-attention rule says: the
    error against float32 at most twice IDEFICS's own under autocast."""
    hf = idefics_model(**cfg)
    ours = from_idefics(hf)
    x = idefics_inputs()
    with torch.no_grad():
        exact = hf(**x).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ref = hf(**x).logits.float()
            got = ours(**x).logits.float()
    labels = x["input_ids"].masked_fill(x["attention_mask"] == 0, -100)
    labels[torch.arange(labels.shape[0]), x["attention_mask"].argmax(-1)] = -100  # (each row's first token)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours.train()
        ours(**x, labels=labels).loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in ours.parameters() if p.requires_grad)
    assert _max_diff(exact, got, x["attention_mask"]) <= 2 * _max_diff(exact, ref, x["attention_mask"]) + 1e-5


def test_loss_and_gradients_match_idefics():
    """Fine-tuning an imported IDEFICS: the loss equals the causal-LM cross-entropy over Hugging
    Face IDEFICS's own logits, and the gradient of every parameter fastflamingo trains (resampler,
    cross-attention blocks, the added tokens' embedding and output rows) equals IDEFICS's for the
    same loss. (transformers' own IDEFICS loss cannot be the reference: with added tokens it
    reshapes the 101-column logits by the config's vocab_size, 99, and fails.)"""
    from fastflamingo.convert.idefics import map_idefics_state_dict
    live = idefics_model(cross_layer_interval=2).train()
    ours = from_idefics(live).train()
    inp = idefics_inputs()
    labels = inp["input_ids"].masked_fill(inp["attention_mask"] == 0, -100)
    logits = live(**inp).logits
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten())
    # the left-padded row's first token is labelled: predicted from a padding position (whose logits
    # here equal IDEFICS's too), which fastflamingo points out
    with pytest.warns(InputWarning, match="labels give row 1 a target at position 9, right after padding"):
        got = ours(**inp, labels=labels).loss
    torch.testing.assert_close(got, ref)
    ref.backward()
    got.backward()
    # IDEFICS's gradients under fastflamingo's names (NaN where IDEFICS has none, so a parameter
    # fastflamingo trains but IDEFICS does not would fail the comparison)
    theirs = map_idefics_state_dict({n: torch.full_like(p, float("nan")) if p.grad is None else p.grad
                                     for n, p in live.named_parameters()}, live.config)
    trained = [(n, p) for n, p in ours.named_parameters() if p.requires_grad]
    assert len(trained) > 40
    for name, p in trained:
        mine, want = p.grad, theirs[name]
        if name.endswith(("embed_tokens.weight", "lm_head.weight")):  # only the added rows train
            assert mine[:VOCAB].abs().max() == 0, name
            mine, want = mine[VOCAB:], want[VOCAB:]
        assert mine.abs().max() > 0, name
        torch.testing.assert_close(mine, want, msg=name)


@pytest.mark.parametrize("cross_layer_interval", [1, 2])
def test_random_layouts_match_idefics(cross_layer_interval):
    """40 random batches as IDEFICS's processor builds them (images anywhere, bare ``<image>``
    tokens, EOS before, between and after images, rows without images, text-only batches, left
    padding): logits at every real position equal Hugging Face IDEFICS's, and greedy tokens of
    every fourth batch (the LM's EOS left free to be generated) equal its generate."""
    from peers_idefics import random_idefics_inputs
    live = idefics_model(cross_layer_interval=cross_layer_interval)
    ours = from_idefics(live)
    images = eos_inside = 0
    for seed in range(40):
        inp = random_idefics_inputs(seed)
        with torch.no_grad():
            want, got = live(**inp).logits, ours(**inp).logits
        real = inp["attention_mask"].bool()
        torch.testing.assert_close(got[real], want[real], rtol=1e-4, atol=1e-4, msg=f"seed {seed}")
        images += int((inp["input_ids"] == IMAGE_ID).any(-1).sum())
        eos_inside += int((inp["input_ids"][:, :-1] == EOS_ID).sum())
        if seed % 4 == 0:
            with torch.no_grad():
                want = live.generate(**inp, max_new_tokens=4, eos_token_id=[7])
            got = ours.generate(**inp, max_new_tokens=4, eos_token_id=[7], pad_token_id=PAD_ID)
            assert torch.equal(got, want), (seed, got[:, -4:], want[:, -4:])
    assert images > 30 and eos_inside > 20  # the layouts are varied


def test_settings_fastflamingo_does_not_apply_are_refused_or_said():
    """Another MLP activation would change the blocks' output: refused by name (it was computed as
    SiLU, 2e-2 off HF's logits for relu). freeze_* settings that train more than the released
    models (HF's IdeficsConfig default freeze_lm_head=False) are warned about, not silently dropped."""
    from transformers import IdeficsForVisionText2Text
    cfg = idefics_config()
    cfg.hidden_act = "relu"
    with torch.device("meta"):
        live = IdeficsForVisionText2Text(cfg)
    with pytest.raises(ValueError, match="hidden_act='relu'.*'silu'"):
        from_idefics(live)
    cfg = idefics_config()
    cfg.freeze_lm_head, cfg.freeze_vision_layers = False, False
    with torch.device("meta"):
        live = IdeficsForVisionText2Text(cfg)
    with pytest.warns(UserWarning, match="freeze_lm_head=False.*freeze_vision_layers=False.*does not apply these"):
        from_idefics(live)


def test_freeze_module_exceptions_are_said():
    """HF's freeze_model keeps the listed module types trainable inside what it freezes: a
    config listing some trained more than fastflamingo does, and nothing said so."""
    from transformers import IdeficsForVisionText2Text
    cfg = idefics_config()
    cfg.freeze_text_module_exceptions, cfg.freeze_vision_module_exceptions = ["Linear"], ["LayerNorm"]
    with torch.device("meta"):
        live = IdeficsForVisionText2Text(cfg)
    with pytest.warns(UserWarning, match=r"freeze_text_module_exceptions=\['Linear'\] \(Hugging Face keeps these "
                                         r"module types trainable in the decoder layers.*"
                                         r"freeze_vision_module_exceptions=\['LayerNorm'\].*vision tower.*"
                                         r"does not apply these"):
        from_idefics(live)


@pytest.mark.parametrize("tied", [False, True])
def test_a_checkpoint_missing_the_added_rows_is_a_mismatch(tmp_path, tied):
    """An untied checkpoint without lm_head.additional_fc.weight took the extra output rows from
    additional_embedding (the tied layout), silently: a CheckpointMismatchError naming the key; a
    missing additional_embedding was a bare KeyError."""
    from safetensors.torch import save_file
    from fastflamingo.convert.load import CheckpointMismatchError
    from transformers import IdeficsForVisionText2Text
    cfg = idefics_config()
    cfg.tie_word_embeddings = tied
    hf = IdeficsForVisionText2Text(cfg)
    hf.config.save_pretrained(tmp_path)
    state = {k: v.contiguous().clone() for k, v in hf.state_dict().items()}
    save_file({k: v for k, v in state.items() if k != "lm_head.additional_fc.weight"},
              str(tmp_path / "model.safetensors"))
    if tied:  # the tied layout: the extra output rows are the extra embedding rows
        ours = from_idefics(tmp_path)
        extra = hf.model.embed_tokens.additional_embedding.weight
        assert torch.equal(ours.lang_encoder.get_output_embeddings().weight[-extra.shape[0]:], extra)
    else:
        with pytest.raises(CheckpointMismatchError, match=r"missing:\s+lm_head\.additional_fc\.weight") as e:
            from_idefics(tmp_path)
        assert e.value.missing == ["lm_head.additional_fc.weight"]
    save_file({k: v for k, v in state.items() if k != "model.embed_tokens.additional_embedding.weight"},
              str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointMismatchError) as e:
        from_idefics(tmp_path)
    assert e.value.missing == ["model.embed_tokens.additional_embedding.weight"]
