"""device_map placement (fastflamingo.distribute) through accelerate's hooks.

This machine has one device, so the placements here offload: modules on ``"disk"`` keep their
weights on the meta device and receive them, through accelerate's hooks, for each forward. That
is the machinery a multi-GPU map uses (hooks that move a module's inputs and weights to its
execution device), and the path where fastflamingo's own reads outside a module's forward (the
visual K/V projection, the media state shared by the cross-attention blocks) would break first.
"""
import copy

import pytest
import torch

import fastflamingo
from fastflamingo.distribute import dispatch, execution_device, infer_device_map, uses_several_devices

from prompts import training_labels

pytest.importorskip("accelerate")


def _model():
    model = fastflamingo.Flamingo.from_preset("tiny", seed=3)
    with torch.no_grad():  # open gates: the cross-attention output reaches the logits
        for block in model.gated_cross_attn_layers:
            block.attn_gate.fill_(0.7)
            block.ff_gate.fill_(0.4)
    return model


def _batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 500, (3, 24), generator=g)
    ids[:, 0] = 510
    ids[0, 11] = 510  # row 0: two images; row 2: left padding before its image
    ids[2, :4] = 0
    ids[2, 4] = 510
    mask = torch.ones_like(ids)
    mask[2, :4] = 0
    return torch.randn(3, 2, 1, 3, 32, 32, generator=g), ids, mask


def _offload_map(model, disk_layers=(1, 3)):
    """Every top unit on the CPU, the decoder layers ``disk_layers`` (those with a cross-attention
    block in the tiny preset: 1 and 3) offloaded to disk."""
    layers = len(model.lang_encoder.model.layers)
    plan = {"vision_encoder": "cpu", "perceiver": "cpu", "lang_encoder.model.embed_tokens": "cpu",
            "lang_encoder.model.norm": "cpu", "lang_encoder.model.rotary_emb": "cpu", "lang_encoder.lm_head": "cpu"}
    plan |= {f"lang_encoder.model.layers.{i}": "disk" if i in disk_layers else "cpu" for i in range(layers)}
    return plan


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    ref = _model()
    placed = dispatch(copy.deepcopy(ref), _offload_map(ref), offload_folder=str(tmp_path_factory.mktemp("offload")))
    return ref, placed


def test_offloaded_blocks_really_are_offloaded(pair):
    _, placed = pair
    block = placed.lang_encoder.model.layers[1].gated_cross_attn_layer
    assert block.attn.to_kv.weight.device.type == "meta"  # weights arrive only inside forward
    assert execution_device(block.attn.to_kv) == torch.device("cpu")
    assert uses_several_devices(placed) and placed.hf_device_map["lang_encoder.model.layers.1"] == "disk"


def test_offloaded_model_gives_the_same_logits_and_loss(pair):
    ref, placed = pair
    vx, ids, mask = _batch()
    labels = training_labels(ids, mask, 510)
    with torch.no_grad():
        want = ref(vx, ids, attention_mask=mask, labels=labels)
        got = placed(vx, ids, attention_mask=mask, labels=labels)
    assert torch.equal(got.logits, want.logits)
    assert got.loss.item() == want.loss.item()


@pytest.mark.parametrize("cache", ["static", "dynamic"])
def test_offloaded_model_generates_the_same_tokens(pair, cache):
    """The visual KV cache of an offloaded block is projected inside its hooks."""
    ref, placed = pair
    vx, ids, mask = _batch()
    kw = dict(max_new_tokens=6, eos_token_id=[], cache=cache)
    assert torch.equal(placed.generate(vx, ids, mask, **kw), ref.generate(vx, ids, mask, **kw))
    beams = dict(kw, num_beams=3)
    assert torch.equal(placed.generate(vx, ids, mask, **beams), ref.generate(vx, ids, mask, **beams))


def test_offloaded_model_reuses_a_prefix(pair):
    from fastflamingo.generation import encode_prefix
    ref, placed = pair
    vx, ids, mask = _batch()
    demo_vx, demo_ids = vx[1:2, :1], ids[1:2, :12]  # one image, then text
    query = ids[:, 12:].clone()
    query[:, 0] = 510  # each query row: its own image, then text
    outs = []
    for model in (ref, placed):
        prefix = encode_prefix(model, demo_vx, demo_ids)
        outs.append(model.generate(vx[:, 1:], query, max_new_tokens=5, eos_token_id=[], prefix=prefix))
    assert torch.equal(outs[0], outs[1])


def test_device_map_through_the_builders(tmp_path):
    ref = _model()
    ref.save_pretrained(tmp_path / "m")
    vx, ids, mask = _batch()
    plan = _offload_map(ref, disk_layers=(3,))
    loaded = fastflamingo.Flamingo.from_pretrained(tmp_path / "m", device_map=plan, offload_folder=str(tmp_path / "o"))
    auto = fastflamingo.Flamingo.from_preset("tiny", seed=3, device_map="auto")  # one device here: all on it
    assert set(map(str, auto.hf_device_map.values())) == {"cpu"}
    with torch.no_grad():
        assert torch.equal(loaded(vx, ids, attention_mask=mask).logits, ref(vx, ids, attention_mask=mask).logits)
        fresh = fastflamingo.Flamingo.from_preset("tiny", seed=3)
        assert torch.equal(auto(vx, ids, attention_mask=mask).logits, fresh(vx, ids, attention_mask=mask).logits)


def test_device_map_errors_name_the_problem(tmp_path):
    model = _model()
    with pytest.raises(ValueError, match="not both"):
        fastflamingo.Flamingo.from_preset("tiny", device="cpu", device_map="auto")
    with pytest.raises(ValueError, match="device_map= only"):
        fastflamingo.Flamingo.from_preset("tiny", max_memory={"cpu": "1GiB"})
    with pytest.raises(ValueError, match="'nowhere'"):
        infer_device_map(model, "nowhere")
    with pytest.raises(ValueError, match="lang_encoder.model.layers.99"):
        dispatch(model, {"": "cpu", "lang_encoder.model.layers.99": "cpu"})
    partial = {k: v for k, v in _offload_map(model).items() if k != "perceiver"}
    with pytest.raises(ValueError, match="perceiver"):
        dispatch(model, partial)
    with pytest.raises(ValueError, match="offload_folder"):
        dispatch(model, _offload_map(model))


def test_compile_auto_is_off_on_the_cpu_and_across_devices(pair):
    from fastflamingo.generation import llama_decode
    from fastflamingo.generation.session import Session, _lm_logits
    ref, placed = pair
    vx, ids, mask = _batch()
    for model, lean in ((ref, True), (placed, False)):
        visual = model.encode_vision(vx)
        session = Session(model, ids, mask, visual, max_new_tokens=2, cache="static")
        assert not session._compiled
        # the lean LLaMA step skips the decoder layers' calls, around which accelerate's hooks move
        # weights and tensors: a placed model decodes through Hugging Face's forward
        assert isinstance(getattr(session._decode, "__self__", None), llama_decode.LeanLlama) is lean
        assert lean or session._decode is _lm_logits
    with pytest.raises(ValueError, match="'sometimes'"):
        Session(ref, ids, mask, None, max_new_tokens=2, compile="sometimes")


def test_added_token_rows_train_alone_when_set_on_a_placed_model(tmp_path):
    """Embedding training switched on after placement (accelerate's hooks saved each layer's
    forward when they were attached): still only the added tokens' rows get gradient, and the
    gradients equal the unplaced model's."""
    ref = _model()
    ref.set_trainable(train_embeddings=False)
    placed = dispatch(copy.deepcopy(ref), _offload_map(ref, disk_layers=(0, 2)), offload_folder=str(tmp_path))
    assert "_old_forward" in placed.lang_encoder.lm_head.__dict__  # placed by accelerate's hooks
    ref.set_trainable()
    placed.set_trainable()
    vx, ids, _ = _batch()
    ids[:, -1] = ref.config.eoc_token_id  # an added token to train
    for model in (ref, placed):
        model(vx, ids, labels=ids).loss.backward()
    base = ref.config.num_base_tokens
    for name in ("lang_encoder.model.embed_tokens.weight", "lang_encoder.lm_head.weight"):
        got, want = placed.get_parameter(name).grad, ref.get_parameter(name).grad
        assert got[:base].abs().sum() == 0 and got[base:].abs().sum() > 0, name
        torch.testing.assert_close(got, want)


def test_training_offloaded_blocks_is_refused_or_warned(tmp_path):
    """Blocks offloaded to disk got no gradient from a backward (22 of the tiny model's 50 trainable
    parameters), silently: a forward with gradients warns once, fine_tune refuses; frozen offloaded
    LM layers (disk_layers 0, 2 hold no block) are fine."""
    import warnings

    from fastflamingo.distribute import offloaded_trainable
    from fastflamingo.training import fine_tune
    ref = _model()
    placed = dispatch(copy.deepcopy(ref), _offload_map(ref), offload_folder=str(tmp_path / "a"))
    names = offloaded_trainable(placed)
    assert names and all("gated_cross_attn_layer" in n for n in names), names
    vx, ids, _ = _batch()
    with pytest.warns(UserWarning, match=rf"{len(names)} trainable parameter\(s\) are offloaded by device_map"):
        placed(vx, ids, labels=ids).loss.backward()
    assert any(placed.get_parameter(n).grad is None for n in names)  # (what the warning is about)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        placed(vx, ids)  # once only
    with pytest.raises(ValueError, match=r"fine_tune: \d+ trainable parameter\(s\) are offloaded by device_map"):
        fine_tune(placed, lambda step: [(vx, ids, None, ids)], steps=1)
    frozen_only = dispatch(copy.deepcopy(ref), _offload_map(ref, disk_layers=(0, 2)), offload_folder=str(tmp_path / "b"))
    assert offloaded_trainable(frozen_only) == []


def test_fine_tuning_with_frozen_embeddings_on_disk_saves_them(tmp_path):
    """A model whose frozen embeddings a device_map put on disk trains (its blocks stay on the
    CPU), and its checkpoint and model/ hold the embeddings' values: the save read the meta
    placeholders and failed ("Cannot copy out of meta tensor") after every step had trained."""
    from fastflamingo.evaluation import synthetic
    from fastflamingo.training import fine_tune
    ref = fastflamingo.Flamingo.from_preset("tiny", seed=3, num_base_tokens=None)  # (no embedding row trains)
    plan = _offload_map(ref, disk_layers=(0, 2))
    plan |= {"lang_encoder.model.embed_tokens": "disk", "lang_encoder.lm_head": "disk"}
    placed = dispatch(copy.deepcopy(ref), plan, offload_folder=str(tmp_path / "off"))
    data = synthetic.batches(synthetic.tokenizer(), 510, batch_size=2, seed=1)
    fine_tune(placed, data, steps=1, lr=1e-3, progress=False, out=str(tmp_path / "run"))
    from safetensors.torch import load_file
    saved = load_file(tmp_path / "run" / "model" / "model.safetensors")
    embedding = "lang_encoder.model.embed_tokens.weight"
    assert torch.equal(saved[embedding], ref.state_dict()[embedding])
    assert (tmp_path / "run" / "checkpoint.pt").is_file()


def test_dispatch_leaves_the_callers_max_memory_as_it_was(tmp_path):
    """accelerate converts max_memory in place: the caller's {"cpu": "400KiB"} came back as
    {"cpu": 409600}, and the error quoted that."""
    budget = {"cpu": "400KiB"}
    with pytest.raises(ValueError, match=r"max_memory=\{'cpu': '400KiB'\} leaves no room"):
        dispatch(_model(), "auto", max_memory=budget, offload_folder=str(tmp_path))
    assert budget == {"cpu": "400KiB"}


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_quantization_with_disk_offload_is_refused_early(tmp_path, quantization):
    """bitsandbytes weights cannot be offloaded to disk (nf4 failed inside accelerate's placement,
    int8 at the first forward, with errors that did not say so): a ValueError naming the disk
    entries, before anything is quantized; 'cpu' entries stay fine."""
    from fastflamingo.quant import quantize_model, quantized_modules
    ref = _model()
    ref.save_pretrained(tmp_path / "m")
    plan = _offload_map(ref)
    want = rf"quantization='{quantization}' with device_map entries on 'disk' \(lang_encoder.model.layers.1, " \
           r"lang_encoder.model.layers.3\) is not supported: .* offload to 'cpu' or drop quantization"
    with pytest.raises(ValueError, match=want):
        fastflamingo.Flamingo.from_pretrained(tmp_path / "m", device_map=plan, offload_folder=str(tmp_path / "o"),
                                              quantization=quantization)
    quantized = quantize_model(_model(), quantization)  # quantized first, then placed (as a planned map is)
    with pytest.raises(ValueError, match=r"with device_map entries on 'disk' \(lang_encoder.model.layers.1, "):
        dispatch(quantized, plan, offload_folder=str(tmp_path / "o"))
    on_cpu = {k: "cpu" for k in plan}
    placed = fastflamingo.Flamingo.from_pretrained(tmp_path / "m", device_map=on_cpu, quantization=quantization)
    assert quantized_modules(placed)
    vx, ids, mask = _batch()
    with torch.no_grad():
        assert placed(vx, ids, attention_mask=mask).logits.isfinite().all()


def test_save_pretrained_of_a_disk_offloaded_model_is_complete(tmp_path):
    """save_pretrained read the offloaded weights' meta placeholders ("Cannot copy out of meta
    tensor"): it writes the weights accelerate holds on disk, and the directory loads back to the
    model's logits; a trainable-only save holds the offloaded blocks' weights too."""
    ref = _model()
    placed = dispatch(copy.deepcopy(ref), _offload_map(ref), offload_folder=str(tmp_path / "o"))
    placed.save_pretrained(tmp_path / "full")
    placed.save_pretrained(tmp_path / "trainable", trainable_only=True)
    assert placed.lang_encoder.model.layers[1].gated_cross_attn_layer.attn.to_kv.weight.is_meta  # still offloaded
    loaded = fastflamingo.Flamingo.from_pretrained(tmp_path / "full")
    want = ref.state_dict()
    got = loaded.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    vx, ids, mask = _batch()
    with torch.no_grad():
        assert torch.equal(loaded(vx, ids, attention_mask=mask).logits, ref(vx, ids, attention_mask=mask).logits)
    from fastflamingo.convert.io import load_state_file
    from fastflamingo.convert.pretrained import trainable_keys
    saved = load_state_file(tmp_path / "trainable" / "model.safetensors")
    assert set(trainable_keys(ref)) >= saved.keys() >= {k for k in trainable_keys(ref) if ".layers.1." in k} != set()
    assert all(torch.equal(saved[k], want[k]) for k in saved)
