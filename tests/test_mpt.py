"""MPT (OpenFlamingo-3B/9B's LM) with fastflamingo's SDPA attention (fastflamingo.mpt): Hugging
Face's logits in every forward, the static LM cache and the compiled decode step giving the tokens
of the plain no-cache loop and of the dynamic cache, one compilation of the decode step."""
import contextlib
import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastflamingo.bench.stages import reference_greedy
from fastflamingo import mpt
from fastflamingo.generation import generate, session as session_module
from fastflamingo.generation.session import Session

import peers
from prompts import MPT, batch, tiny

_MODEL = tiny(lm=MPT)  # cross-attention before layers 0 and 2
# left padding, several images per row, rows with different image counts, a row without images;
# the first three share one compiled shape (B = 3, cache 64 slots, images padded to 4)
LAYOUTS = [([2, 1, 0], [14, 9, 11]), ([1, 3, 2], [9, 12, 16]), ([0, 2, 1], [7, 15, 10]), ([3, 1], [13, 6])]


@pytest.mark.parametrize("layout", range(len(LAYOUTS)))
def test_static_greedy_equals_plain_loop_and_dynamic(layout):
    vx, ids, mask = batch(_MODEL, *LAYOUTS[layout], seed=layout)
    with torch.no_grad():
        want = reference_greedy(_MODEL, vx, ids, mask, 8, banned=())
    from transformers import StaticCache
    session = Session(_MODEL, ids, mask, None, max_new_tokens=8)  # "auto" picks the static cache for MPT
    assert session.static and isinstance(session.cache, StaticCache)
    del session
    for cache in ("static", "dynamic", "auto"):
        got = generate(_MODEL, vx, ids, mask, max_new_tokens=8, eos_token_id=[], cache=cache)
        assert torch.equal(got, want), (cache, got[:, ids.shape[1]:], want[:, ids.shape[1]:])


@settings(max_examples=8, deadline=None, derandomize=True)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(4, 14)), min_size=1, max_size=4), st.integers(0, 2 ** 16))
def test_random_layouts_static_equals_plain_loop(rows, seed):
    images, lengths = zip(*[(min(n, t), t) for n, t in rows])
    vx, ids, mask = batch(_MODEL, list(images), list(lengths), seed=seed)
    with torch.no_grad():
        want = reference_greedy(_MODEL, vx, ids, mask, 5, banned=())
    assert torch.equal(generate(_MODEL, vx, ids, mask, max_new_tokens=5, eos_token_id=[], cache="static"), want)


def _visual(vx):
    with torch.no_grad():  # as generate encodes them (visual tokens that need grad are another graph input)
        return _MODEL.encode_vision(vx)


def _teacher_forced(model, vx, ids, mask, forced, session):
    """Max |logits of the session's prefill and steps (fed ``forced``) - model.forward on the whole sequence|."""
    # contiguous (B,) tokens, as generate's: a strided column would be another input layout to dynamo
    got = [session.prefill()] + [session.step(forced[:, i].contiguous()) for i in range(forced.shape[1] - 1)]
    err = 0.0
    for i, logits in enumerate(got):
        m = torch.cat([mask, mask.new_ones(mask.shape[0], i)], 1)
        with torch.no_grad():
            want = model(vx, torch.cat([ids, forced[:, :i]], 1), attention_mask=m).logits[:, -1]
        err = max(err, (logits - want).abs().max().item())
    return err


@pytest.mark.parametrize("layout", [0, 3])
def test_static_steps_equal_forward_teacher_forced(layout):
    """Logits, not only tokens: every static-cache step equals model.forward on the whole sequence."""
    vx, ids, mask = batch(_MODEL, *LAYOUTS[layout], seed=20 + layout)
    forced = torch.randint(3, 500, (ids.shape[0], 6), generator=torch.Generator().manual_seed(layout))
    session = Session(_MODEL, ids, mask, _visual(vx), max_new_tokens=6, cache="static")
    assert _teacher_forced(_MODEL, vx, ids, mask, forced, session) < 1e-4


def test_static_beam_search_equals_dynamic():
    for layout in (0, 3):
        vx, ids, mask = batch(_MODEL, *LAYOUTS[layout], seed=10 + layout)
        got = {cache: generate(_MODEL, vx, ids, mask, max_new_tokens=7, num_beams=3, eos_token_id=[7, 9, 11],
                               cache=cache) for cache in ("static", "dynamic")}
        assert torch.equal(got["static"], got["dynamic"]), (layout, got)


def test_compiled_step_compiles_once(monkeypatch):
    """Greedy tokens of the compiled static step equal the plain loop's; over 8 decode steps and a
    second and a third generate call of the same shape (other prompts) dynamo compiles one frame into
    one graph, with no graph break; a recompilation would count a second frame. Guards are evaluated
    at every step (the session's unsafe guard skip is turned off), so none could go unnoticed."""
    monkeypatch.setattr(session_module, "_without_guards", contextlib.nullcontext)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    counters = torch._dynamo.utils.counters
    for layout in (0, 1, 2):
        vx, ids, mask = batch(_MODEL, *LAYOUTS[layout], seed=layout)
        with torch.no_grad():
            want = reference_greedy(_MODEL, vx, ids, mask, 9, banned=())
        got = generate(_MODEL, vx, ids, mask, max_new_tokens=9, eos_token_id=[], cache="static", compile=True)
        assert torch.equal(got, want), (layout, got[:, ids.shape[1]:], want[:, ids.shape[1]:])
        assert dict(counters["frames"]) == {"total": 1, "ok": 1}, (layout, dict(counters["frames"]), {
            code.co_name: reasons for code, reasons in torch._dynamo.utils.guard_failures.items()})
        assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
        assert not counters["graph_break"], dict(counters["graph_break"])
    vx, ids, mask = batch(_MODEL, *LAYOUTS[0], seed=30)  # the compiled step's logits, same shape again
    forced = torch.randint(3, 500, (ids.shape[0], 9), generator=torch.Generator().manual_seed(30))
    session = Session(_MODEL, ids, mask, _visual(vx), max_new_tokens=9, cache="static", compile=True)
    assert _teacher_forced(_MODEL, vx, ids, mask, forced, session) < 1e-4
    assert dict(counters["frames"]) == {"total": 1, "ok": 1} and counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()


def _lm_outputs(model, ids, mask, static=False):
    """(plain forward logits, logits of a 7-token prefill and 4 one-token steps with a cache)."""
    from transformers import DynamicCache, StaticCache

    from fastflamingo.generation.lm_cache import LMCall
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask).logits
        B = ids.shape[0]
        if static:  # the mask spans the whole buffer; causality hides the slots not yet written
            cache = StaticCache(config=model.config, max_cache_len=64)
            masks = [torch.cat([mask, mask.new_zeros(B, 64 - ids.shape[1])], 1)] * 5
        else:
            cache, masks = DynamicCache(config=model.config), [mask[:, :n] for n in range(7, 12)]
        arg = {LMCall(model).cache_arg: cache}  # `cache`, or `past_key_values` before transformers 5.2x
        steps = [model(input_ids=ids[:, :7], use_cache=True, attention_mask=masks[0], **arg).logits]
        steps += [model(input_ids=ids[:, n:n + 1], use_cache=True, attention_mask=masks[n - 6], **arg).logits
                  for n in range(7, 11)]
    return plain, torch.cat(steps, 1)


def _ids_and_mask(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 120, (3, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0   # left padding
    mask[2, :1] = 0
    return ids, mask


def test_sdpa_attention_equals_hugging_face():
    """The LM alone: with the SDPA forward, plain, DynamicCache and StaticCache forwards give Hugging
    Face's eager logits (fp32, padding included: a fully masked pad query averages the values as
    Hugging Face's does); restore() gives back Hugging Face's forward, bitwise."""
    from transformers.models.mpt.modeling_mpt import MptAttention
    class_forward = MptAttention.forward
    lm = peers.tiny_lm("mpt")
    ids, mask = _ids_and_mask()
    hf = {static: _lm_outputs(lm, ids, mask, static) for static in (False, True)}
    real = mask.bool()  # a pad query's logits are whatever its fully masked row gives
    for static in (False, True):  # Hugging Face's own caches agree with its plain forward
        torch.testing.assert_close(hf[static][1][real], hf[False][0][real], atol=1e-5, rtol=1e-5)
    assert mpt.prepare(lm) and mpt.is_prepared(lm) and not mpt.prepare(torch.nn.Linear(2, 2))
    assert mpt.prepare(lm)  # idempotent
    for static in (False, True):  # every position, pads included: the same keys, the same average
        for got, want in zip(_lm_outputs(lm, ids, mask, static=static), hf[static]):
            torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    assert MptAttention.forward is class_forward
    mpt.restore(lm)
    assert not mpt.is_prepared(lm)
    assert all(torch.equal(a, b) for a, b in zip(_lm_outputs(lm, ids, mask), hf[False]))


def test_sdpa_attention_per_instance():
    """Other instances and the class untouched; someone else's instance forward is left alone; a
    deepcopy runs its own weights; output_attentions is refused with a clear error, until restore()."""
    from transformers.models.mpt.modeling_mpt import MptAttention
    lm, other = peers.tiny_lm("mpt"), peers.tiny_lm("mpt", seed=1)
    ids, mask = _ids_and_mask(1)
    assert mpt.prepare(lm)
    patched = [m for m in lm.modules() if isinstance(m, MptAttention)]
    assert len(patched) == 4 and all(m.forward.__func__ is mpt.forward for m in patched)
    assert not any("forward" in m.__dict__ for m in other.modules() if isinstance(m, MptAttention))
    hooked = next(m for m in other.modules() if isinstance(m, MptAttention))
    hooked.forward = hooked.forward  # someone else's instance forward (e.g. a hook): left alone
    assert not mpt.prepare(other) and hooked.forward.__func__ is not mpt.forward
    twin, unpatched = copy.deepcopy(lm), peers.tiny_lm("mpt")
    assert all(m.forward.__self__ is m for m in twin.modules() if isinstance(m, MptAttention))
    with torch.no_grad():
        for p in (*twin.parameters(), *unpatched.parameters()):
            p.mul_(0.5)
    for a, b in zip(_lm_outputs(twin, ids, mask), _lm_outputs(unpatched, ids, mask)):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="output_attentions.*fastflamingo.mpt.restore"):
        lm(input_ids=ids, attention_mask=mask, output_attentions=True)
    mpt.restore(lm)
    assert len(lm(input_ids=ids, attention_mask=mask, output_attentions=True).attentions) == 4


def test_attention_bias_is_hugging_face_alibi_per_row():
    """The relative ALiBi bias differs from Hugging Face's slice of its table by one constant per
    query row (the same softmax), over a whole static buffer too (4 heads, and 6: the non-power-of-two
    slope order); masked pairs get finfo.min."""
    from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor
    for heads in (4, 6):
        table = build_mpt_alibi_tensor(heads, 256)
        for q_len, length, k_len in ((1, 1, 1), (5, 77, 77), (1, 200, 256), (3, 40, 64)):
            for n in (length, torch.tensor(length)):
                bias = mpt.attention_bias(table, None, q_len, k_len, n, torch.float64)
                assert bias.shape == (1, heads, q_len, k_len)
                hf = table[:, :, 256 - length:].double()          # HF: keys 0..length-1, any query
                diff = bias[0, :, :, :length] - hf
                torch.testing.assert_close(diff, diff[..., :1].expand_as(diff), rtol=0, atol=1e-9)
                # the key at the query's own position gets 0
                pos = length - q_len + torch.arange(q_len)
                assert torch.all(bias[0, :, torch.arange(q_len), pos] == 0)
        mask = torch.zeros(2, 1, 3, 10, dtype=torch.bool)
        mask[1, 0, :, :4] = True
        bias = mpt.attention_bias(table, mask, 3, 10, 10, torch.bfloat16)
        assert bias.shape == (2, heads, 3, 10) and bias.dtype == torch.bfloat16
        assert torch.all(bias[1, :, :, :4] == torch.finfo(torch.bfloat16).min)


def test_sdpa_attention_bf16_accuracy():
    """bf16: the SDPA forward's logits are at least as close to the fp32 computation as Hugging
    Face's eager bf16 attention (the flash-attention rule, with its factor 2), on a 300-token
    sequence where Hugging Face's ALiBi values reach -150 (bf16 spacing 1 there)."""
    cfg = peers.tiny_lm_config("mpt")
    cfg.max_seq_len = 512
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    # fp32, not fp64: Hugging Face's fp64 MPT gives NaN at pad positions, which reach every row
    ref = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 120, (2, 300), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :20] = 0
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask).logits.float()
        hf = copy.deepcopy(ref).to(torch.bfloat16)
        eager_err = (hf(input_ids=ids, attention_mask=mask).logits.float() - want)[mask.bool()].abs().max()
        assert mpt.prepare(hf)
        sdpa_err = (hf(input_ids=ids, attention_mask=mask).logits.float() - want)[mask.bool()].abs().max()
    assert sdpa_err <= 2 * eager_err + 1e-3, (sdpa_err, eager_err)


def test_layers_of_one_forward_share_one_attention_bias(monkeypatch):
    """The ALiBi + mask bias is built once per LM forward, not once per layer, and not reused
    by the next forward (its mask is another tensor)."""
    lm = peers.tiny_lm("mpt")
    assert mpt.prepare(lm)
    ids, mask = _ids_and_mask()
    built, real = [], mpt.attention_bias
    monkeypatch.setattr(mpt, "attention_bias", lambda *a, **k: built.append(1) or real(*a, **k))
    with torch.no_grad():
        first = lm(input_ids=ids, attention_mask=mask).logits
        assert len(built) == 1  # 4 layers, one bias
        second = lm(input_ids=ids, attention_mask=mask).logits
    assert len(built) == 2
    torch.testing.assert_close(first, second)
