"""The lean LLaMA prefill and decode step (fastflamingo/generation/llama_decode.py) give the logits
of Hugging Face's forward bit for bit, and the session uses them only where they compute that
forward."""
import pytest
import torch

from fastflamingo.generation import llama_decode
from fastflamingo.generation.session import Session, _lm_logits

from prompts import batch, tiny

GQA = dict(model_type="llama", hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
           intermediate_size=128, vocab_size=512, max_position_embeddings=1024)


def _idefics():
    from fastflamingo.convert.idefics import from_idefics
    from peers_idefics import idefics_model
    return from_idefics(idefics_model(cross_layer_interval=2))


class LowRank(torch.nn.Module):
    """A LoRA adapter around a frozen linear layer, as peft's ``lora.Linear`` computes it: not an
    ``nn.Linear``, so the lean path must call it as a module (binding its base weight would drop
    the adapter)."""

    def __init__(self, base: torch.nn.Linear, rank: int = 4, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.base = base
        self.a = torch.nn.Parameter(0.3 * torch.randn(rank, base.in_features, generator=g))
        self.b = torch.nn.Parameter(0.3 * torch.randn(base.out_features, rank, generator=g))

    def forward(self, x):
        return self.base(x) + (x @ self.a.t()) @ self.b.t()


def _lora():
    """The tiny model with LoRA adapters on its LM's q, v and down projections (QLoRA-style fine-tuning)."""
    model = tiny()
    lm = model.lang_encoder
    for i, (name, m) in enumerate([(n, m) for n, m in lm.named_modules()
                                   if n.endswith(("q_proj", "v_proj", "down_proj")) and type(m) is torch.nn.Linear]):
        parent, _, attr = name.rpartition(".")
        setattr(lm.get_submodule(parent), attr, LowRank(m, seed=i))
    return model


MODELS = {"tiny": lambda: tiny(), "gqa": lambda: tiny(lm=GQA), "idefics": _idefics,
          "eos_resets_media": lambda: tiny(eos_resets_media=True), "lora": _lora}


LAYOUTS = {"padded": ([2, 0, 1], [9, 14, 6]),  # rows with 2, 0 and 1 images, left padding
           "one_token": ([1, 0, 1], [1, 1, 1]),  # T = 1 prompts: an <image> alone, a word alone
           "last_token_image": ([1, 1, 2], [1, 5, 2])}  # T = 1 and images at the last token


def _sessions(model, cache, seed, device, layout="padded"):
    """Two sessions of one left-padded prompt batch: Hugging Face's forward and the lean step."""
    images, lengths = LAYOUTS[layout]
    vx, ids, mask = (None if t is None else t.to(device, model.dtype if t.is_floating_point() else t.dtype)
                     for t in batch(model, images, lengths, seed=seed))
    if layout == "last_token_image":  # every row's last token an <image>, the 2-image row's first too
        ids[:, -1] = ids[2, 0] = model.config.media_token_id
    visual = model.encode_vision(vx) if vx is not None else None
    out = []
    for lean in (False, True):
        s = Session(model, ids, mask, visual, max_new_tokens=8, cache=cache, compile=False)
        assert isinstance(s._decode.__self__, llama_decode.LeanLlama), "the session does not take the lean step"
        assert s._prefill.__self__ is s._decode.__self__, "the session does not take the lean prefill"
        if not lean:
            s._decode = s._prefill = _lm_logits
        out.append((s, s.prefill()))
    return out


def _check_steps(model, cache, seed, device="cpu", layout="padded", steps=7):
    """Every decode step's logits, teacher-forced with tokens that include EOS and <image> (an
    image token without pixels: text), equal between the two sessions."""
    (hf, logits_hf), (lean, logits_lean) = _sessions(model, cache, seed, device, layout)
    assert torch.equal(logits_hf, logits_lean)
    c = model.config
    g = torch.Generator().manual_seed(3)
    for step in range(steps):
        tokens = torch.randint(3, min(500, model.vocab_size), (3,), generator=g)
        tokens[step % 3] = (c.eos_token_id, c.media_token_id, tokens[step % 3])[step % 3]
        tokens = tokens.to(device)
        want, got = hf.step(tokens), lean.step(tokens)
        assert torch.equal(got, want), (step, (got - want).abs().max())
        assert torch.isfinite(got).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cache", ["static", "dynamic"])
@pytest.mark.parametrize("name", list(MODELS))
@torch.no_grad()
def test_lean_step_equals_hugging_face_forward(name, cache, dtype):
    """Multi-head and grouped-query attention, IDEFICS's import and its EOS reset, rows with 2, 0
    and 1 images and left padding, both LM caches, fp32 and bf16."""
    _check_steps(MODELS[name]().to(dtype), cache, seed=len(name))


@pytest.mark.parametrize("layout", ["one_token", "last_token_image"])
@pytest.mark.parametrize("cache", ["static", "dynamic"])
@pytest.mark.parametrize("name", ["gqa", "idefics"])
@torch.no_grad()
def test_lean_prefill_of_one_token_prompts_and_images_at_the_last_token(name, cache, layout):
    """Prompts of one token (an <image> alone, a word alone: the prefill takes the one-query mask)
    and images at the last prompt token, the steps after them."""
    _check_steps(MODELS[name](), cache, seed=2, layout=layout)


@pytest.mark.parametrize("name", ["gqa", "idefics"])
@torch.no_grad()
def test_lean_step_that_fills_the_static_cache(name):
    """No padding, and the last step a session has room for: every slot of the static cache holds a
    token (Hugging Face still builds a mask for a static cache's step: so does the lean one)."""
    _check_steps(MODELS[name](), "static", seed=4, layout="one_token", steps=8)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["gqa", "idefics"])
@torch.no_grad()
def test_lean_step_equals_hugging_face_forward_on_cuda(name):
    """On the GPU in bf16: an uncompiled decode (compile=False, or a model over several devices)."""
    _check_steps(MODELS[name]().to("cuda", torch.bfloat16), "static", seed=1, device="cuda")


def _hooked(model, module=lambda lm: lm.model.layers[1].decoder_layer):
    module(model.lang_encoder).register_forward_pre_hook(lambda m, a: None)
    return model


@pytest.mark.parametrize("make, why", [
    (lambda: tiny(lm=GQA | {"attn_implementation": "eager"}), "eager attention"),
    (lambda: _hooked(tiny()), "a hook on a decoder layer the step does not call"),
    (lambda: _hooked(tiny(), lambda lm: lm.model.layers[2].decoder_layer.self_attn.k_proj),
     "a hook on a linear layer the step calls through F.linear"),
    (lambda: _hooked(tiny(), lambda lm: lm.model.norm), "a hook on the final norm"),
    (lambda: tiny(lm=dict(model_type="mpt", d_model=64, n_layers=4, n_heads=4, expansion_ratio=4,
                          max_seq_len=256, vocab_size=512)), "not a LLaMA"),
])
def test_session_falls_back_to_hugging_face_forward(make, why):
    model = make()
    vx, ids, mask = batch(model, [1], [6])
    s = Session(model, ids, mask, model.encode_vision(vx), max_new_tokens=2, cache="dynamic", compile=False)
    assert s._decode is _lm_logits and s._prefill is _lm_logits, why
    assert not llama_decode.supports(model.lang_encoder), why


def test_decode_takes_one_token_per_row():
    model = tiny()
    with pytest.raises(ValueError, match=r"one new token per row, got input_ids \(2, 3\)"):
        llama_decode.LeanLlama(model.lang_encoder).decode(model.lang_encoder, torch.zeros(2, 3, dtype=torch.long), {})


def test_prefill_keeps_hugging_face_forward_where_the_mask_builder_is_unknown(monkeypatch):
    """A transformers whose create_causal_mask takes arguments the lean prefill does not pass
    (older versions took cache_position): its prompt runs Hugging Face's forward, and so does the
    step on a dynamic cache; a static cache's step stays lean."""
    import transformers.masking_utils as masking

    def create_causal_mask(config, inputs_embeds, attention_mask, cache_position, past_key_values, position_ids=None):
        raise AssertionError("not to be called")

    monkeypatch.setattr(masking, "create_causal_mask", create_causal_mask)
    monkeypatch.setattr(llama_decode, "_BUILDER", [])
    assert not llama_decode.knows_prompt_mask()
    model = tiny()
    vx, ids, mask = batch(model, [1], [6])
    s = Session(model, ids, mask, model.encode_vision(vx), max_new_tokens=2, cache="static", compile=False)
    assert s._prefill is _lm_logits and isinstance(s._decode.__self__, llama_decode.LeanLlama)
    # a dynamic cache's step needs Hugging Face's mask builder too (it may give no mask at all)
    s = Session(model, ids, mask, model.encode_vision(vx), max_new_tokens=2, cache="dynamic", compile=False)
    assert s._prefill is _lm_logits and s._decode is _lm_logits
    monkeypatch.undo()
    llama_decode._BUILDER.clear()
    assert llama_decode.knows_prompt_mask()
