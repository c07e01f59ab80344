"""pytest-benchmark suites for what runs on a CPU: ``pytest benchmarks --benchmark-only``.

Same providers, inputs and correctness gate as ``fastflamingo bench`` (fastflamingo.bench):
each benchmark first checks its provider against the reference and refuses (fails) a wrong one.
"""
import pytest
import torch

from fastflamingo.bench import image_causal, perceiver
from fastflamingo.bench.harness import prepare_checked, reference_results, timed_call
from fastflamingo.bench.timing import PerCall

XATTN = dict(B=2, H=8, T=512, L=64, D=64)
XATTN_PROVIDERS = ["fastflamingo", "eager einsum+mask", "sdpa dense mask", "flex (eager)"]


ROUNDS = 50  # timed calls of a provider given fresh inputs per call (pytest-benchmark's pedantic mode)


def _checked(case, provider, mode):
    """Prepare ``provider`` on ``case``, refuse it if wrong, return the call to time: with its
    fresh per-call inputs where it has them (:attr:`Prepared.fresh`, as ``fastflamingo bench``
    times it: a text_time reused on every call let the PyTorch path keep its chunk plan)."""
    dout = torch.randn_like(case.reference(*case.inputs)) if mode == "fwd+bwd" else None
    ref_hi, ref_lo = reference_results(case, mode, dout)
    prep, d, failure = prepare_checked(provider, case, mode, dout, ref_hi, ref_lo)
    assert failure is None, f"{provider.name} is wrong, not timed: {failure}"
    return timed_call(prep.call, prep.leaves, d, prep.fresh)


def _time(benchmark, call) -> None:
    """``benchmark`` ``call``: a PerCall's setup before each timed call, outside the timing."""
    if isinstance(call, PerCall):
        benchmark.pedantic(call.fn, setup=call.setup, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    else:
        benchmark(call)


def _provider(providers, name):
    return next(p for p in providers if p.name == name)


@pytest.mark.parametrize("N", [4, 16])
@pytest.mark.parametrize("name", XATTN_PROVIDERS)
def test_image_causal_fwd(benchmark, name, N):
    benchmark.group = f"image-causal fwd N={N}"
    case = image_causal.make_case(XATTN["B"], XATTN["H"], XATTN["T"], N, XATTN["L"], XATTN["D"], torch.float32, "cpu")
    _time(benchmark, _checked(case, _provider(image_causal.providers("cpu", XATTN["L"]), name), "fwd"))


@pytest.mark.parametrize("name", XATTN_PROVIDERS[:3])
def test_image_causal_fwd_bwd(benchmark, name):
    benchmark.group = "image-causal fwd+bwd N=8"
    case = image_causal.make_case(XATTN["B"], XATTN["H"], XATTN["T"], 8, XATTN["L"], XATTN["D"], torch.float32, "cpu")
    _time(benchmark, _checked(case, _provider(image_causal.providers("cpu", XATTN["L"]), name), "fwd+bwd"))


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("name", ["fastflamingo", "cat+sdpa", "eager"])
def test_perceiver_attention(benchmark, name, mode):
    benchmark.group = f"perceiver attention {mode} 16 images x 257"
    case = perceiver.attention_case(16, 257, 64, 8, 64, torch.float32, "cpu")
    _time(benchmark, _checked(case, _provider(perceiver.attention_providers(), name), mode))


@pytest.mark.parametrize("name", ["fastflamingo", "sdpa module", "open_flamingo"])
def test_resampler_layer_fwd_bwd(benchmark, name):
    benchmark.group = "resampler layer fwd+bwd 8 images x 257, dim 512"
    case, layer = perceiver.layer_case(8, 257, 64, 512, 8, 64, torch.float32, "cpu")
    provider = _provider(perceiver.layer_providers(layer, 8, 257, 64), name)
    if provider.prepare is None:
        pytest.skip(provider.unavailable("fwd+bwd"))
    _time(benchmark, _checked(case, provider, "fwd+bwd"))
