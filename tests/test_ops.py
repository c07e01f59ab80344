"""The ops' references against brute force, and the fast PyTorch path against the references."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from fastflamingo import native, ops
from fastflamingo.ops import cpu, reference
from fastflamingo.testing import assert_close_by_rule


def brute_force(q, k, v, text_time, L, only_immediate, scale):
    """One token at a time: softmax over exactly the keys it may see, in float64."""
    B, H, T, D = q.shape
    out = torch.zeros(B, H, T, D, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            m = int(text_time[b, t])
            if m == 0:
                continue
            lo = (m - 1) * L if only_immediate else 0
            keys = slice(lo, m * L)
            s = (q[b, :, t].double()[:, None, :] * k[b, :, keys].double()).sum(-1) * scale
            out[b, :, t] = torch.einsum("hl,hld->hd", s.softmax(-1), v[b, :, keys].double())
    return out


@st.composite
def layouts(draw):
    B = draw(st.integers(1, 3))
    T = draw(st.integers(1, 40))
    L = draw(st.sampled_from([1, 3, 8]))
    N = draw(st.integers(1, 5))
    H = draw(st.integers(1, 3))
    D = draw(st.sampled_from([4, 7, 16]))
    rows = []
    for _ in range(B):
        positions = draw(st.lists(st.integers(0, T - 1), max_size=N, unique=True))
        rows.append(sorted(positions))
    seed = draw(st.integers(0, 2 ** 16))
    return B, T, L, N, H, D, rows, seed


def make(B, T, L, N, H, D, rows, seed, dtype=torch.float32, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, D, generator=g, dtype=dtype)
    k = torch.randn(B, H, N * L, D, generator=g, dtype=dtype)
    v = torch.randn(B, H, N * L, D, generator=g, dtype=dtype)
    media = torch.zeros(B, T, dtype=torch.bool)
    for b, pos in enumerate(rows):
        media[b, pos] = True
    if requires_grad:
        for t in (q, k, v):
            t.requires_grad_(True)
    return q, k, v, media


@settings(max_examples=60, deadline=None)
@given(layouts(), st.booleans())
def test_reference_matches_brute_force(layout, only_immediate):
    B, T, L, N, H, D, rows, seed = layout
    q, k, v, media = make(*layout)
    tt = ops.text_time_from_media_locations(media)
    want = brute_force(q, k, v, tt, L, only_immediate, D ** -0.5)
    got = ops.image_causal_attention(q, k, v, media, latents_per_media=L, only_immediate=only_immediate,
                                     backend="reference")
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    # tokens with no image: exactly zero
    assert (got[(tt == 0)[:, None, :].expand(-1, H, -1)] == 0).all()


@pytest.mark.parametrize("only_immediate", [True, False], ids=["immediate", "all_previous"])
def test_reference_supports_double_backward(only_immediate):
    """backend="reference" is the remedy the Triton and native backends name for a double backward
    (a gradient penalty): its second derivatives are right (finite differences, fp64), tokens
    without an image included."""
    q, k, v, media = make(1, 6, 2, 2, 1, 4, [[1, 4]], 0, dtype=torch.float64, requires_grad=True)
    scale = 0.7

    def attention(q, k, v):
        return ops.image_causal_attention(q, k, v, media, latents_per_media=2, only_immediate=only_immediate,
                                          scale=scale, backend="reference")

    torch.autograd.gradgradcheck(attention, (q, k, v))
    x = [torch.randn(1, 1, S, 4, dtype=torch.float64, requires_grad=True) for S in (3, 5, 5, 3, 3)]
    torch.autograd.gradgradcheck(lambda *x: ops.perceiver_attention(*x, scale=scale, backend="reference"), x)


@settings(max_examples=60, deadline=None)
@given(layouts(), st.booleans())
def test_torch_path_matches_reference_forward_and_grads(layout, only_immediate):
    B, T, L, N, H, D, rows, seed = layout
    q, k, v, media = make(*layout, requires_grad=True)
    kw = dict(latents_per_media=L, only_immediate=only_immediate)
    ref = ops.image_causal_attention(q, k, v, media, backend="reference", **kw)
    fast = ops.image_causal_attention(q, k, v, media, backend="torch", **kw)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(ref)
    grads_ref = torch.autograd.grad(ref, (q, k, v), g)
    grads_fast = torch.autograd.grad(fast, (q, k, v), g)
    for a, b in zip(grads_fast, grads_ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_torch_path_plan_is_shared_until_text_time_changes():
    """The layers of one forward share the plan of their text_time tensor; an in-place change of
    that tensor, or another tensor, gets a plan of its own."""
    q, k, v, media = make(2, 300, 64, 6, 2, 8, [[3, 40, 41, 200], [0, 150]], 0)
    tt = ops.text_time_from_media_locations(media)

    def check(text_time):
        want = reference.image_causal_attention_reference(q, k, v, text_time, latents_per_media=64)
        got = cpu.image_causal_attention_torch(q, k, v, text_time, latents_per_media=64)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)

    check(tt)
    shared = cpu._PLAN.value
    check(tt)
    assert cpu._PLAN.value is shared
    tt[0, 100:] = 5  # in place: a new version
    check(tt)
    assert cpu._PLAN.value is not shared
    clone = tt.clone()
    check(clone)
    old = cpu._PLAN.value
    del tt
    assert cpu._PLAN.value is old  # the clone's plan stays when the first tensor dies
    del clone
    assert cpu._PLAN.value is None  # and goes with the clone


def test_torch_path_under_inference_mode():
    """Inference tensors have no version counter: their plan is made per call, not shared."""
    with torch.inference_mode():
        q, k, v, media = make(2, 300, 64, 6, 2, 8, [[3, 40, 41, 200], [0, 150]], 0)
        tt = ops.text_time_from_media_locations(media)
        got = cpu.image_causal_attention_torch(q, k, v, tt, latents_per_media=64)
        want = reference.image_causal_attention_reference(q, k, v, tt, latents_per_media=64)
        assert not cpu._PLAN.holds(tt)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# the eager path's plans: its cost model; one call per run (calls free); runs merged up to the span
# limit and never one masked call for the batch (calls dear)
PLANS = pytest.mark.parametrize("plan", [{}, {"_CALL_NS": 0.0}, {"_CALL_NS": 1e12, "_SPAN_KEYS": 0}],
                                ids=["cost-model", "per-run", "merged"])


@PLANS
@settings(max_examples=40, deadline=None)
@given(st.data())
def test_torch_path_plans_match_reference_on_any_text_time(plan, data):
    """Hand-made text_time too: IDEFICS's zero runs after an EOS, and arbitrary (non-monotonic)
    image indices, whose chunks' key ranges overlap."""
    B, T, L, N = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 48)), data.draw(st.sampled_from([1, 4, 8])), \
        data.draw(st.integers(1, 6))
    kind = data.draw(st.sampled_from(["resets", "arbitrary"]))
    rows = []
    for _ in range(B):
        if kind == "arbitrary":
            rows.append(data.draw(st.lists(st.integers(0, N), min_size=T, max_size=T)))
            continue
        row, m = [], 0
        for _ in range(T):
            step = data.draw(st.sampled_from(["same", "same", "next", "zero"]))
            m = min(N, m + 1) if step == "next" else m
            row.append(0 if step == "zero" else m)
        rows.append(row)
    tt = torch.tensor(rows, dtype=torch.int32)
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2 ** 16)))
    q, k, v = (torch.randn(B, 2, S, 8, generator=g, requires_grad=True) for S in (T, N * L, N * L))
    with pytest.MonkeyPatch.context() as mp:
        for name, value in plan.items():
            mp.setattr(cpu, name, value)
        fast = cpu.image_causal_attention_torch(q, k, v, tt, latents_per_media=L)
    ref = reference.image_causal_attention_reference(q, k, v, tt, latents_per_media=L)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)
    assert (fast[(tt == 0)[:, None, :].expand(-1, 2, -1)] == 0).all()
    dout = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(fast, (q, k, v), dout), torch.autograd.grad(ref, (q, k, v), dout)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@PLANS
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_torch_path_low_precision_by_tolerance_rule(dtype, plan, monkeypatch):
    for name, value in plan.items():
        monkeypatch.setattr(cpu, name, value)
    # images at the first and last tokens, consecutive images, a row with one image late
    layout = (2, 33, 8, 4, 2, 16, [[0, 7, 8, 32], [5]], 3)
    q, k, v, media = make(*layout)
    kw = dict(latents_per_media=8)
    tt = ops.text_time_from_media_locations(media)
    ref32 = reference.image_causal_attention_reference(q, k, v, tt, **kw)
    lowp = [t.to(dtype) for t in (q, k, v)]
    ref_lowp = reference.image_causal_attention_reference(*lowp, tt, **kw)
    fast = ops.image_causal_attention(*lowp, media, backend="torch", **kw)
    assert fast.dtype == dtype
    assert_close_by_rule(fast, ref32, ref_lowp)


@pytest.mark.parametrize("L", [5, 48])  # keys of all images in one masked call (15), or gathered (144)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_torch_path_decode_step(dtype, L):
    """T = 1 (one decode step per row) has its own path: rows before any image, at image 1, at
    the last image, and a batch of one, forward and gradients, by the dtype's tolerance rule."""
    N, H, D = 3, 2, 7
    for text_time in ([[0], [1], [3], [2]], [[3]], [[0]]):
        tt = torch.tensor(text_time, dtype=torch.int32)
        B = tt.shape[0]
        g = torch.Generator().manual_seed(B)
        q, k, v = (torch.randn(B, H, s, D, generator=g) for s in (1, N * L, N * L))
        ref32 = reference.image_causal_attention_reference(q, k, v, tt, latents_per_media=L)
        lowp = [t.to(dtype).requires_grad_(True) for t in (q, k, v)]
        ref_lowp = reference.image_causal_attention_reference(*lowp, tt, latents_per_media=L)
        fast = ops.image_causal_attention(*lowp, text_time=tt, latents_per_media=L, backend="torch")
        assert fast.dtype == dtype and fast.shape == (B, H, 1, D)
        assert (fast[tt[:, 0] == 0] == 0).all()
        if dtype == torch.float32:
            torch.testing.assert_close(fast, ref32, atol=1e-6, rtol=1e-5)
        else:
            assert_close_by_rule(fast, ref32, ref_lowp)
        grad = torch.randn(B, H, 1, D, generator=g).to(dtype)
        for a, b in zip(torch.autograd.grad(fast, lowp, grad), torch.autograd.grad(ref_lowp, lowp, grad)):
            torch.testing.assert_close(a.float(), b.float(), atol=2e-2 if dtype != torch.float32 else 1e-6,
                                       rtol=2e-2 if dtype != torch.float32 else 1e-5)


@pytest.mark.parametrize("L", [5, 48])
def test_decode_step_layers_share_a_plan_until_text_time_changes(L):
    """The layers of a decode step share what they derive from its text_time; an in-place change of
    text_time (IDEFICS's EOS reset, a beam reorder) is seen by the next call, not the old plan."""
    from fastflamingo.ops import cpu
    N, H, D = 3, 2, 8
    tt = torch.tensor([[2], [3], [1]], dtype=torch.int32)
    g = torch.Generator().manual_seed(L)
    for step in range(3):
        q, k, v = (torch.randn(3, H, s, D, generator=g) for s in (1, N * L, N * L))
        for _layer in range(2):
            fast = ops.image_causal_attention(q, k, v, text_time=tt, latents_per_media=L, backend="torch")
            ref = reference.image_causal_attention_reference(q, k, v, tt, latents_per_media=L)
            torch.testing.assert_close(fast, ref, atol=1e-6, rtol=1e-5)
            assert cpu._DECODE_PLAN.holds(tt)
        tt.masked_fill_(tt == 3 - step, 0) if step < 2 else tt.copy_(tt.flip(0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_path_rows_that_each_see_one_image(dtype):
    """Every token of a row sees one image (candidates scored after a prompt, rows that each start
    with their one image): one gathered SDPA for the batch, not one per row; a row that sees no
    image gives exact zeros. Forward and gradients against the reference."""
    L, N, H, D, T = 5, 3, 2, 7, 6
    tt = torch.tensor([[2] * T, [0] * T, [3] * T, [1] * T], dtype=torch.int32)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(4, H, s, D, generator=g) for s in (T, N * L, N * L))
    assert isinstance(cpu._make_plan(tt, L, N, H, D), cpu._OneImagePerRow)
    ref32 = reference.image_causal_attention_reference(q, k, v, tt, latents_per_media=L)
    lowp = [t.to(dtype).requires_grad_(True) for t in (q, k, v)]
    ref_lowp = reference.image_causal_attention_reference(*lowp, tt, latents_per_media=L)
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.nn.functional, "scaled_dot_product_attention", lambda *a, **kw: calls.append(1) or sdpa(*a, **kw))
        fast = ops.image_causal_attention(*lowp, text_time=tt, latents_per_media=L, backend="torch")
    assert len(calls) == 1 and fast.dtype == dtype
    assert (fast[1] == 0).all()
    assert_close_by_rule(fast, ref32, ref_lowp)
    grad = torch.randn(4, H, T, D, generator=g).to(dtype)
    for a, b in zip(torch.autograd.grad(fast, lowp, grad), torch.autograd.grad(ref_lowp, lowp, grad)):
        torch.testing.assert_close(a.float(), b.float(), atol=2e-2 if dtype != torch.float32 else 1e-6,
                                   rtol=2e-2 if dtype != torch.float32 else 1e-5)


def test_text_time_input_equals_media_locations_input():
    q, k, v, media = make(2, 20, 4, 3, 2, 8, [[1, 2, 19], [10]], 0)
    tt = ops.text_time_from_media_locations(media)
    a = ops.image_causal_attention(q, k, v, media, latents_per_media=4)
    b = ops.image_causal_attention(q, k, v, text_time=tt, latents_per_media=4)
    assert torch.equal(a, b)


@pytest.mark.parametrize("eager", [True, False], ids=["eager-chunks", "compiled-gather"])
def test_cost_of_torch_path_does_not_grow_with_images(eager, monkeypatch):
    """Immediate mode is block-diagonal: the fast path's work stays within a constant factor
    (max_span) of the O(T·L·D) a token needs, whatever N is (counted in FLOPs, not seconds), where
    the dense reference grows with N."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count
    if not eager:
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    T, L, H, D = 256, 8, 2, 16
    minimum = 2 * 2 * T * L * D * H  # q·k and p·v, 2 flops per multiply-add

    # the CPU's fused SDPA op has no FLOP formula of its own: count it like the other SDPA kernels
    sdpa_cpu = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
                lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v)}

    def flops(fn, N, positions):
        q, k, v, media = make(1, T, L, N, H, D, [positions], 0)
        with FlopCounterMode(display=False, custom_mapping=sdpa_cpu) as counter:
            fn(q, k, v, ops.text_time_from_media_locations(media), latents_per_media=L)
        assert counter.get_total_flops() >= minimum  # every op of the path was counted
        return counter.get_total_flops()

    for N, positions in [(1, [0]), (2, [0, 100]), (64, list(range(0, 256, 4))), (64, list(range(64))),
                         (200, list(range(200)))]:
        bound = (cpu.max_span(L) if eager else 1) * minimum
        assert flops(cpu.image_causal_attention_torch, N, positions) <= bound, N
    dense = [flops(reference.image_causal_attention_reference, N, list(range(N))) for N in (2, 64)]
    assert dense[1] == 32 * dense[0]


def test_row_runs_and_chunks_cover_every_token_that_sees_an_image():
    row = [0, 0, 1, 1, 1, 2, 3, 3, 0, 0, 4] + [5] * 300
    runs = cpu.row_runs(torch.tensor([row, [0] * len(row)]))
    assert runs[0] == [(0, 2, 0), (2, 5, 1), (5, 6, 2), (6, 8, 3), (8, 10, 0), (10, 11, 4), (11, 311, 5)]
    assert runs[1] == [(0, 311, 0)]
    for L, pair_ns in [(64, 1.0), (8, 1.0), (8, 1e-3), (64, 1e9)]:
        chunks = cpu.row_chunks(runs[0], L, 2, pair_ns)
        covered = [t for t0, t1, *_ in chunks for t in range(t0, t1)]
        assert covered == sorted(set(covered))
        assert {t for t, m in enumerate(row) if m > 0} <= set(covered)
        for t0, t1, first, last, masked in chunks:
            images = {m for m in row[t0:t1] if m > 0}
            assert min(images) == first and max(images) == last and last - first < 2
            assert masked == (last > first or 0 in row[t0:t1])
            assert not masked or (t1 - t0) * (last - first + 1) * L <= cpu._SCORES
        if pair_ns > cpu._CALL_NS:  # scoring costs more than a call: one chunk per image
            assert [(t0, t1, m, m, False) for t0, t1, m in runs[0] if m > 0] == chunks
    assert cpu.row_chunks(runs[1], 8, 2) == []


def test_torch_path_backward_does_not_write_a_whole_input_per_chunk():
    """The eager path's backward writes O(inputs) elements, not a zero tensor of a whole input per
    chunk (what slicing each chunk out of q, k, v would cost: quadratic in the images)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountWrites(TorchDispatchMode):
        written = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if not func.is_view:  # views write nothing
                for t in (out if isinstance(out, (tuple, list)) else (out,)):
                    if isinstance(t, torch.Tensor):
                        CountWrites.written += t.numel()
            return out

    T, L, H, D, N = 512, 64, 2, 16, 32
    q, k, v, media = make(2, T, L, N, H, D, [list(range(0, T, T // N)), list(range(0, T, 2 * T // N))], 0)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    tt = ops.text_time_from_media_locations(media)
    plan = [cpu.row_chunks(r, L, cpu.max_span(L), cpu.score_ns(H, D)) for r in cpu.row_runs(tt)]
    assert sum(map(len, plan)) >= 16  # many chunks
    out = cpu.image_causal_attention_torch(q, k, v, tt, latents_per_media=L)
    dout = torch.randn_like(out)
    with CountWrites():
        grads = torch.autograd.grad(out, (q, k, v), dout)
    assert CountWrites.written <= 8 * (q.numel() + k.numel() + v.numel()), CountWrites.written
    ref = reference.image_causal_attention_reference(q, k, v, tt, latents_per_media=L)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads, torch.autograd.grad(ref, (q, k, v), dout)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 3), st.sampled_from([1, 5, 63, 64]), st.sampled_from([2, 8]), st.sampled_from([4, 16]),
       st.integers(0, 1000))
def test_perceiver_torch_path_matches_reference(B, V, L, D, seed):
    g = torch.Generator().manual_seed(seed)
    shapes = [(B, 2, L, D), (B, 2, V, D), (B, 2, V, D), (B, 2, L, D), (B, 2, L, D)]
    args = [torch.randn(s, generator=g, requires_grad=True) for s in shapes]
    ref = ops.perceiver_attention(*args, backend="reference")
    fast = ops.perceiver_attention(*args, backend="torch")
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)
    gout = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(fast, args, gout), torch.autograd.grad(ref, args, gout)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # and the brute-force definition: one softmax over the concatenated keys
    q, km, vm, kl, vl = (a.double() for a in args)
    s = torch.cat([q @ km.transpose(-1, -2), q @ kl.transpose(-1, -2)], -1) * D ** -0.5
    want = s.softmax(-1) @ torch.cat([vm, vl], -2)
    torch.testing.assert_close(ref.double(), want, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ input validation
def test_more_image_tokens_than_images_is_an_error():
    q, k, v, media = make(2, 10, 4, 2, 1, 8, [[0, 3, 6], [1]], 0)
    with pytest.raises(ValueError, match=r"row 0 .* 3 <image> tokens but only 2 images"):
        ops.image_causal_attention(q, k, v, media, latents_per_media=4)


@pytest.mark.parametrize("bad, match", [
    (dict(latents_per_media=3), "not a whole number of images"),
    (dict(latents_per_media=4, backend="cuda"), "backend='cuda'"),
])
def test_bad_arguments_are_named(bad, match):
    q, k, v, media = make(1, 10, 4, 2, 1, 8, [[0]], 0)
    with pytest.raises(ValueError, match=match):
        ops.image_causal_attention(q, k, v, media, **bad)


def test_bad_tensors_are_named():
    q, k, v, media = make(1, 10, 4, 2, 1, 8, [[0]], 0)
    with pytest.raises(TypeError, match="k has dtype torch.float16"):
        ops.image_causal_attention(q, k.half(), v, media, latents_per_media=4)
    with pytest.raises(ValueError, match=r"shape \(1, 9\) is not \(B, T\)"):
        ops.image_causal_attention(q, k, v, media[:, :9], latents_per_media=4)
    with pytest.raises(TypeError, match="media_locations must be a bool"):
        ops.image_causal_attention(q, k, v, media.long(), latents_per_media=4)
    with pytest.raises(ValueError, match="exactly one of media_locations and text_time"):
        ops.image_causal_attention(q, k, v, latents_per_media=4)
    with pytest.raises(ValueError, match=r"q must be \(B, H, T, D\)"):
        ops.image_causal_attention(q[0], k, v, media, latents_per_media=4)


def test_bad_text_time_scale_and_head_dim_are_named():
    """A float or bool text_time (once truncated silently), text_time going back to an earlier image
    (the Triton backward assumed it never does, and gave wrong dK/dV), a non-finite scale (backends
    disagreed: NaN or 0) and head_dim 0 (a bare ZeroDivisionError) are errors naming the value; so
    are Perceiver keys and values of different shapes (named)."""
    q, k, v, media = make(1, 10, 4, 2, 1, 8, [[0]], 0)
    tt = torch.ones(1, 10, dtype=torch.int32)
    for bad in (tt.float() * 1.9, tt.bool()):
        with pytest.raises(TypeError, match=f"text_time must hold integer image indices, got {bad.dtype}"):
            ops.image_causal_attention(q, k, v, text_time=bad, latents_per_media=4, validate=False)
    q2, k2, v2, _ = make(1, 10, 4, 2, 1, 8, [[0, 5]], 0)
    back = torch.tensor([[0, 2, 2, 2, 0, 1, 1, 2, 2, 2]], dtype=torch.int32)
    for backend in ("reference", "torch", "auto"):
        with pytest.raises(ValueError, match="text_time row 0 goes back to image 1 at token 5, after image 2"):
            ops.image_causal_attention(q2, k2, v2, text_time=back, latents_per_media=4, backend=backend)
    reset = torch.tensor([[0, 1, 1, 0, 0, 2, 2, 0, 2, 2]], dtype=torch.int32)  # IDEFICS's EOS reset: fine
    ops.image_causal_attention(q2, k2, v2, text_time=reset, latents_per_media=4)
    for scale in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match=f"scale={scale} must be a finite number"):
            ops.image_causal_attention(q, k, v, media, latents_per_media=4, scale=scale)
        with pytest.raises(ValueError, match=f"scale={scale} must be a finite number"):
            ops.perceiver_attention(q, k, v, q, q, scale=scale)
    with pytest.raises(ValueError, match=r"q \(1, 1, 10, 0\) has head_dim 0"):
        ops.image_causal_attention(q[..., :0], k[..., :0], v[..., :0], media, latents_per_media=4)
    with pytest.raises(ValueError, match=r"k_media \(1, 1, 8, 8\), v_media \(1, 1, 3, 8\)"):
        ops.perceiver_attention(q, k, v[:, :, :3], q, q)


def test_model_refuses_a_text_time_going_back():
    """The model's own check (one host sync per forward) refuses a given text_time out of order,
    and a float one, as the op does."""
    from fastflamingo import Flamingo
    model = Flamingo.from_preset("tiny")
    vx = torch.randn(1, 2, 1, 3, 32, 32)
    ids = torch.randint(3, 500, (1, 6))
    with pytest.raises(ValueError, match="text_time row 0 goes back to image 1 at token 3"):
        model(vx, ids, text_time=torch.tensor([[1, 2, 2, 1, 1, 1]], dtype=torch.int32))
    with pytest.raises(TypeError, match="text_time must hold integer image indices"):
        model(vx, ids, text_time=torch.ones(1, 6))


def test_text_time_made_in_inference_mode_can_be_saved_for_the_backward():
    q, k, v, _ = make(1, 10, 4, 2, 1, 8, [[0]], 0)
    with torch.inference_mode():
        tt = torch.ones(1, 10, dtype=torch.int32)
    q.requires_grad_(True)
    grads = {}
    for backend in ("reference", "torch", "native", "auto"):
        if backend == "native" and not native.available():
            continue
        q.grad = None
        ops.image_causal_attention(q, k, v, text_time=tt, latents_per_media=4, backend=backend).sum().backward()
        grads[backend] = q.grad.clone()
    for backend, g in grads.items():
        torch.testing.assert_close(g, grads["reference"], atol=1e-5, rtol=1e-5)


def test_torch_path_weighs_the_batch_call_by_intra_op_threads(monkeypatch):
    """One masked call over the whole batch parallelizes over torch's threads, a chunk's small call
    does not (measured): at the tiny geometry (H=4, D=16, L=8), B=2, N=8, T=512, one thread plans
    chunks and two threads plan the batch call; both equal the reference."""
    from fastflamingo.bench.image_causal import make_case
    case = make_case(2, 4, 512, 8, 8, 16, torch.float32, "cpu")
    q, k, v, tt = case.inputs
    ref = reference.image_causal_attention_reference(q, k, v, tt, latents_per_media=8)
    kinds = []
    for threads in (1, 2):
        monkeypatch.setattr(torch, "get_num_threads", lambda threads=threads: threads)
        plan = cpu._make_plan(tt, 8, 8, 4, 16)
        kinds.append("batch" if isinstance(plan, tuple) else "chunks")
        cpu._PLAN = cpu.SharedByTensors()  # plans are shared per text_time: plan afresh
        out = ops.image_causal_attention(q, k, v, text_time=tt, latents_per_media=8, backend="torch")
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert kinds == ["chunks", "batch"]
