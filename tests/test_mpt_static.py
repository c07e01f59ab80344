"""MPT (OpenFlamingo-3B/9B's LM) with the static LM cache and the compiled decode step
(fastflamingo.generation.mpt): the tokens of the plain no-cache loop and of the dynamic cache, one
compilation of the decode step, and the LM's own forward unchanged."""
import contextlib
import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastflamingo import Flamingo
from fastflamingo.bench.stages import reference_greedy
from fastflamingo.generation import generate, mpt, session as session_module
from fastflamingo.generation.session import Session

import peers
from prompts import batch

MPT = dict(model_type="mpt", d_model=64, n_layers=4, n_heads=4, expansion_ratio=4, max_seq_len=256, vocab_size=512)


def tiny_mpt(**lm):
    """The tiny preset over a 4-layer MPT (cross-attention before layers 0 and 2), non-zero gates, fp32."""
    model = Flamingo.from_preset("tiny", lm=MPT | lm)
    with torch.no_grad():
        for block in model.gated_cross_attn_layers:
            block.attn_gate.fill_(1.0)
            block.ff_gate.fill_(-0.5)
    return model


_MODEL = tiny_mpt()
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
    got = [session.prefill(ids)] + [session.step(forced[:, i].contiguous()) for i in range(forced.shape[1] - 1)]
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
        assert dict(counters["frames"]) == {"total": 1, "ok": 1}, (layout, dict(counters["frames"]))
        assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
        assert not counters["graph_break"], dict(counters["graph_break"])
    vx, ids, mask = batch(_MODEL, *LAYOUTS[0], seed=30)  # the compiled step's logits, same shape again
    forced = torch.randint(3, 500, (ids.shape[0], 9), generator=torch.Generator().manual_seed(30))
    session = Session(_MODEL, ids, mask, _visual(vx), max_new_tokens=9, cache="static", compile=True)
    assert _teacher_forced(_MODEL, vx, ids, mask, forced, session) < 1e-4
    assert dict(counters["frames"]) == {"total": 1, "ok": 1} and counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()


def test_lm_forward_unchanged_and_class_untouched():
    """The LM alone (no fastflamingo): plain and DynamicCache forwards give bitwise the logits they
    gave before the patch; with a StaticCache the patched forward gives the plain forward's logits;
    the class and other instances are untouched; a deepcopy runs its own weights."""
    from transformers import DynamicCache, StaticCache
    from transformers.models.mpt.modeling_mpt import MptAttention

    from fastflamingo.generation.lm_cache import LMCall
    class_forward = MptAttention.forward
    lm = peers.tiny_lm("mpt")
    other = peers.tiny_lm("mpt", seed=1)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 120, (2, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0

    @torch.no_grad()
    def outputs(model, static=False):
        """(plain forward logits, logits of a 7-token prefill and 4 one-token steps with a cache)."""
        plain = model(input_ids=ids, attention_mask=mask).logits
        if static:  # the mask spans the whole buffer; causality hides the slots not yet written
            cache = StaticCache(config=model.config, max_cache_len=64)
            masks = [torch.cat([mask, mask.new_zeros(2, 53)], 1)] * 5
        else:
            cache, masks = DynamicCache(config=model.config), [mask[:, :n] for n in range(7, 12)]
        arg = {LMCall(model).cache_arg: cache}  # `cache`, or `past_key_values` before transformers 5.2x
        steps = [model(input_ids=ids[:, :7], use_cache=True, attention_mask=masks[0], **arg).logits]
        steps += [model(input_ids=ids[:, n:n + 1], use_cache=True, attention_mask=masks[n - 6], **arg).logits
                  for n in range(7, 11)]
        return plain, torch.cat(steps, 1)

    before = outputs(lm)
    unpatched = copy.deepcopy(lm)
    assert mpt.prepare_static(lm) and not mpt.prepare_static(torch.nn.Linear(2, 2))
    after = outputs(lm)
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    real = mask.bool()  # padding positions' logits are whatever a fully masked row gives
    torch.testing.assert_close(before[1][real], before[0][real], atol=1e-5, rtol=1e-5)  # the dynamic cache's own
    static = outputs(lm, static=True)[1]
    torch.testing.assert_close(static[real], before[0][real], atol=1e-5, rtol=1e-5)
    assert MptAttention.forward is class_forward
    patched = [m for m in lm.modules() if isinstance(m, MptAttention)]
    assert len(patched) == 4 and all("forward" in m.__dict__ for m in patched)
    assert not any("forward" in m.__dict__ for m in other.modules() if isinstance(m, MptAttention))
    hooked = next(m for m in other.modules() if isinstance(m, MptAttention))
    hooked.forward = hooked.forward  # someone else's instance forward (e.g. a hook): left alone
    assert not mpt.prepare_static(other) and hooked.forward.__func__ is not mpt.forward
    assert not any(getattr(m, "_fastflamingo_static", False) for m in other.modules())
    twin = copy.deepcopy(lm)  # its forwards are bound to its own attention layers, with their own weights
    assert all(m.forward.__self__ is m for m in twin.modules() if isinstance(m, MptAttention))
    with torch.no_grad():
        for p in (*twin.parameters(), *unpatched.parameters()):
            p.mul_(0.5)
    assert all(torch.equal(a, b) for a, b in zip(outputs(twin), outputs(unpatched)))
    assert not torch.equal(outputs(twin)[0], before[0])


def test_static_alibi_is_hugging_face_bias():
    """The static-cache bias of the keys held is bitwise Hugging Face's slice of its ALiBi table
    (4 heads, and 6: the non-power-of-two slope order), also in a buffer longer than max_seq_len."""
    from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor
    for heads in (4, 6):
        table = build_mpt_alibi_tensor(heads, 256)
        for length in (1, 2, 77, 256):
            bias = mpt.alibi_bias(table, 320, torch.tensor(length))
            assert bias.shape == (heads, 1, 320) and bias.dtype == table.dtype
            assert torch.equal(bias[..., :length], table[:, :, 256 - length:]), (heads, length)
