"""torch.compile(fullgraph=True) of the model's own blocks: no graph break, eager's results.
On a GPU the same test compiles the Triton custom ops; on the CPU the fast PyTorch path."""
import pytest
import torch

from fastflamingo.blocks import GatedCrossAttentionBlock, IdeficsGatedCrossAttentionBlock, MediaState, PerceiverResampler
from fastflamingo.config import CrossAttentionConfig, ResamplerConfig
from fastflamingo.model import text_time_for

from prompts import MPT

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _blocks():
    torch.manual_seed(0)
    of = GatedCrossAttentionBlock(dim=32, dim_visual=24, config=CrossAttentionConfig(heads=2, dim_head=8))
    idefics = IdeficsGatedCrossAttentionBlock(dim=32, dim_visual=24, lm_heads=4, lm_intermediate=64,
                                              config=CrossAttentionConfig(style="idefics", heads=None, dim_head=None,
                                                                          qk_layer_norms=True, alpha_type="vector"))
    for block in (of, idefics):
        for name, p in block.named_parameters():
            if "gate" in name or "alpha" in name:
                p.data.fill_(0.6)
    return {"open_flamingo": of, "idefics": idefics}


@pytest.mark.parametrize("style", ["open_flamingo", "idefics"])
def test_compiled_cross_attention_block_matches_eager(style):
    block = _blocks()[style].to(DEVICE)
    ids = torch.randint(3, 50, (2, 14))
    ids[0, [0, 6, 7]] = 99
    ids[1, [13]] = 99
    media = MediaState(visual=torch.randn(2, 3, 4, 24, device=DEVICE),
                       text_time=text_time_for(ids, 99).to(DEVICE))
    x = torch.randn(2, 14, 32, device=DEVICE, requires_grad=True)

    def run(fn):
        block.zero_grad()
        x.grad = None
        out = fn(x, media)
        out.square().sum().backward()
        return out.detach(), x.grad.clone(), [p.grad.clone() for p in block.parameters()]

    eager = run(block)
    torch._dynamo.reset()
    compiled = run(torch.compile(block, fullgraph=True))  # fullgraph: a graph break is an error
    torch.testing.assert_close(compiled[0], eager[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(compiled[1], eager[1], atol=1e-5, rtol=1e-5)
    for a, b in zip(compiled[2], eager[2]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_compiled_resampler_matches_eager():
    torch.manual_seed(0)
    resampler = PerceiverResampler(dim=24, config=ResamplerConfig(depth=2, heads=2, dim_head=8, num_latents=4,
                                                                   max_num_frames=2)).to(DEVICE)
    x = torch.randn(2, 3, 2, 5, 24, device=DEVICE)
    eager = resampler(x)
    torch._dynamo.reset()
    compiled = torch.compile(resampler, fullgraph=True)(x)
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("lm", ["llama", "mpt"])
def test_compiled_decode_through_the_triton_kernel_is_one_graph(lm, monkeypatch):
    """What `generate` does on CUDA by default: the decode step compiled, with the cross-attention
    on the Triton custom op (here in the interpreter, forced): one graph, no break, the kernel
    called from it, the tokens of the eager decode. LLaMA (IDEFICS's LM) and MPT
    (OpenFlamingo-9B's, its attention adapted by fastflamingo.mpt)."""
    from torch._dynamo.utils import counters

    import fastflamingo
    from fastflamingo.generation import generate
    from fastflamingo.kernels import image_causal
    from fastflamingo.ops import dispatch
    if not dispatch.HAS_TRITON or not image_causal.INTERPRET:
        pytest.skip("needs Triton's interpreter (conftest sets it where there is no GPU)")
    torch.manual_seed(0)
    model = fastflamingo.Flamingo.from_preset("tiny", **({"lm": MPT} if lm == "mpt" else {})).eval()
    with torch.no_grad():  # gates open: the cross-attention decides the tokens
        for block in model.gated_cross_attn_layers:
            block.attn_gate.fill_(1.0)
    model.set_attention_backend("triton")
    c = model.config
    vx = torch.randn(2, 2, 1, 3, c.vision.image_size, c.vision.image_size)
    ids = torch.randint(0, 100, (2, 24))
    ids[:, [0, 10]] = c.media_token_id
    calls, real = [], image_causal.image_causal_fwd
    monkeypatch.setattr(image_causal, "image_causal_fwd", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch._dynamo.reset()
    counters.clear()
    compiled = generate(model, vx, ids, max_new_tokens=3, cache="static", compile=True)
    assert not counters["graph_break"] and counters["stats"]["unique_graphs"] == 1, dict(counters["graph_break"])
    assert calls
    assert torch.equal(compiled, generate(model, vx, ids, max_new_tokens=3, cache="static", compile=False))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_compiled_op_checks_text_time_on_the_device(backend):
    """Under torch.compile the op's text_time checks (a host sync eagerly) are device-side asserts:
    still one graph (fullgraph), eager's results for a good text_time, an error for one going
    back to an earlier image (the Triton backward would give wrong dK/dV) or beyond the images
    given. On CPU tensors: on a GPU a failed device-side assert ends the process's CUDA context."""
    import fastflamingo.ops as ops
    from fastflamingo.kernels import image_causal
    if backend == "triton" and not image_causal.INTERPRET:
        pytest.skip("the Triton kernels take CPU tensors only in the interpreter")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, n, 16, generator=g).requires_grad_() for n in (6, 32, 32))

    def attention(q, k, v, text_time):
        return ops.image_causal_attention(q, k, v, text_time=text_time, latents_per_media=16, backend=backend)

    def run(fn, text_time):
        out = fn(q, k, v, text_time)
        return out.detach(), torch.autograd.grad(out.square().sum(), (q, k, v))

    good = torch.tensor([[0, 1, 1, 2, 0, 2]], dtype=torch.int32)
    torch._dynamo.reset()
    compiled = torch.compile(attention, fullgraph=True)  # fullgraph: a graph break is an error
    for c, e in zip(*(run(fn, good) for fn in (compiled, attention))):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-5)
    for bad, match in [([[1, 1, 2, 2, 1, 1]], "nonzero values decrease along a row"),
                       ([[1, 1, 2, 2, 3, 3]], "beyond the N images"), ([[-1, 1, 1, 1, 1, 1]], "or is < 0")]:
        bad = torch.tensor(bad, dtype=torch.int32)
        with pytest.raises(RuntimeError, match=f"image_causal_attention: text_time.*{match}"):
            compiled(q, k, v, bad)
        with pytest.raises(RuntimeError, match=match):  # the asserts by themselves, eagerly
            ops.assert_text_time_async(bad, 2)
        with pytest.raises(ValueError):  # eagerly the op's check, naming the row
            attention(q, k, v, bad)
