"""Generation on a CUDA GPU as users run it there: ``generate``'s default (``compile="auto"``)
compiles the decode step with CUDA graphs (``mode="reduce-overhead"``).

Every test makes a skipped CUDA graph an error (inductor's ``triton.cudagraph_or_error``, and its
skip counter), so a decode step that silently fell back to launching its kernels one at a time, or
to eager dynamo, fails here with the reason, instead of showing up as a slow row in the end-to-end
suite (the first H100 run's decode measured that fallback). Tokens are checked against the plain
no-cache loop (fp32), against the uncompiled step (NF4, bf16), and against Hugging Face IDEFICS's
own ``generate`` on the same device (which also catches buffers left on the CPU by the import).
The benchmark script runs these in their own step (``benchmarks/gpu_suite.sh``: ``cuda_generate``).
"""
import contextlib

import pytest
import torch

from fastflamingo import Flamingo
from fastflamingo.generation import generate

from prompts import MPT, batch, plain_greedy, tiny

CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
LMS = {"llama": {}, "mpt": {"lm": MPT}}  # IDEFICS-9B's LM family, OpenFlamingo-9B's
# left padding, rows with different image counts, a row without images; the same compiled shape
LAYOUTS = [([2, 1, 0], [14, 9, 11]), ([1, 3, 2], [9, 12, 16])]


def _tiny(family: str, dtype=torch.float32) -> Flamingo:
    return tiny(**LMS[family]).to("cuda", dtype).eval()


def _cuda(*tensors, dtype=None):
    return [t.to("cuda", dtype if t.is_floating_point() and dtype else t.dtype) for t in tensors]


@contextlib.contextmanager
def _cuda_graphs_required():
    """Dynamo's and inductor's counters, cleared; a CUDA graph inductor skips raises (with why)."""
    counters = torch._dynamo.utils.counters
    counters.clear()
    flag = {"triton.cudagraph_or_error": True} if hasattr(torch._inductor.config.triton, "cudagraph_or_error") else {}
    with torch._inductor.config.patch(flag):
        yield counters
    assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])
    assert not counters["graph_break"], dict(counters["graph_break"])


@pytest.mark.parametrize("family", list(LMS))
def test_cuda_generate_default_is_compiled_cuda_graphed_and_exact(family):
    """fp32: the default generate's tokens equal the plain loop's; two prompts of one compiled
    shape compile one frame, with CUDA graphs, no graph break, no recompilation."""
    model = _tiny(family)
    with _cuda_graphs_required() as counters:
        for seed, layout in enumerate(LAYOUTS):
            vx, ids, mask = _cuda(*batch(model, *layout, seed=seed))
            got = generate(model, vx, ids, mask, max_new_tokens=8, eos_token_id=[])
            want = plain_greedy(model, vx, ids, mask, 8)
            assert torch.equal(got, want), (family, seed, got[:, ids.shape[1]:], want[:, ids.shape[1]:])
        assert dict(counters["frames"]) == {"total": 1, "ok": 1}, dict(counters["frames"])


def test_cuda_generate_bf16_compiled_equals_uncompiled():
    """bf16, as the benchmarks run: the compiled, CUDA-graphed step against the same step
    uncompiled; the first new token of every row equal (later ones may flip on a near-tie)."""
    model = _tiny("llama", torch.bfloat16)
    vx, ids, mask = _cuda(*batch(model, *LAYOUTS[0], seed=3), dtype=torch.bfloat16)
    with _cuda_graphs_required() as counters:
        got = generate(model, vx, ids, mask, max_new_tokens=6, eos_token_id=[])
    want = generate(model, vx, ids, mask, max_new_tokens=6, eos_token_id=[], compile=False)
    assert counters["frames"]["ok"] == 1, dict(counters["frames"])
    T = ids.shape[1]
    assert torch.equal(got[:, T], want[:, T]), (got[:, T:], want[:, T:])


@pytest.mark.parametrize("fused", [False, True])
def test_cuda_generate_nf4_compiled_equals_uncompiled(fused):
    """Every frozen linear layer in NF4 (LM, vision encoder, cross-attention), through bitsandbytes'
    matmul or fastflamingo's fused kernel: the compiled, CUDA-graphed step gives the uncompiled
    step's tokens."""
    pytest.importorskip("bitsandbytes")
    from fastflamingo.quant import quantize_model
    model = quantize_model(_tiny("llama"), "nf4", vision=True, cross_attention=True, fused=fused)
    vx, ids, mask = _cuda(*batch(model, *LAYOUTS[1], seed=4))
    want = generate(model, vx, ids, mask, max_new_tokens=6, eos_token_id=[], compile=False)
    with _cuda_graphs_required() as counters:
        got = generate(model, vx, ids, mask, max_new_tokens=6, eos_token_id=[])
    assert counters["frames"]["ok"] == 1, dict(counters["frames"])
    assert torch.equal(got, want), (fused, got[:, ids.shape[1]:], want[:, ids.shape[1]:])


def test_cuda_generate_equals_idefics_generate_on_the_gpu():
    """An IDEFICS import on the GPU (the first H100 run found its non-persistent buffers left on the
    CPU): greedy tokens equal Hugging Face's generate there, compiled step and all. (3-beam tokens
    are compared with Hugging Face's on the CPU: its 3-beam IDEFICS generate fails under
    transformers 5.17, the GPU machine's.)"""
    from fastflamingo.convert.idefics import from_idefics
    from peers_idefics import EOS_ID, PAD_ID, idefics_inputs, idefics_model
    live = idefics_model(cross_layer_interval=2).to("cuda")
    ours = from_idefics(live)
    inp = {k: v.to("cuda") for k, v in idefics_inputs().items()}
    with torch.no_grad():
        want = live.generate(**inp, max_new_tokens=8, num_beams=1, do_sample=False)
    with _cuda_graphs_required() as counters:
        got = generate(ours, inp["pixel_values"][:, :, None], inp["input_ids"], inp["attention_mask"],
                       max_new_tokens=8, eos_token_id=[EOS_ID], pad_token_id=PAD_ID)
    assert counters["frames"]["ok"] == 1, dict(counters["frames"])
    assert torch.equal(got, want), (got[:, -8:], want[:, -8:])


@pytest.mark.parametrize("family", list(LMS))
def test_cuda_generate_caches_score_candidates_exactly(family):
    """``score`` on CUDA (the Triton kernel reading each prompt's visual K/V through broadcast
    views, the LM's dynamic cache) equals each pair run alone through ``forward``, fp32."""
    from fastflamingo.generation.score import score, score_reference
    model = _tiny(family)
    vx, ids, mask = _cuda(*batch(model, [2, 0, 1], [9, 5, 12], seed=3))
    conts = [[5], [7, 8, 9], [100, 2, 3, 4, 5], [1, 2]]
    want = score_reference(model, vx, ids, conts, mask, reduction="none")
    for chunk_size in (2, 64):  # each prompt's candidates in chunks of their own; all prompts in one
        got = score(model, vx, ids, conts, mask, reduction="none", chunk_size=chunk_size)
        assert got.is_cuda
        torch.testing.assert_close(got, want, atol=5e-5, rtol=1e-5)


def test_cuda_generate_return_dict_keeps_each_compiled_steps_logits():
    """``return_dict_in_generate`` under CUDA graphs: every step's logits and scores are its own
    tensors (a graph replay rewrites the graph's output buffer), equal to the uncompiled step's."""
    model = _tiny("llama")
    vx, ids, mask = _cuda(*batch(model, *LAYOUTS[0]))
    kw = dict(max_new_tokens=6, eos_token_id=[], return_dict_in_generate=True, output_scores=True,
              output_logits=True, repetition_penalty=1.3)
    with _cuda_graphs_required():
        got = generate(model, vx, ids, mask, **kw)
    want = generate(model, vx, ids, mask, compile=False, **kw)
    assert torch.equal(got.sequences, want.sequences)
    assert len({t.data_ptr() for t in got.logits}) == len(got.logits) == 6
    for mine, eager in zip(got.logits + got.scores, want.logits + want.scores, strict=True):
        torch.testing.assert_close(mine, eager, rtol=1e-4, atol=1e-4)
