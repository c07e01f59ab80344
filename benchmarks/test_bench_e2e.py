"""End-to-end CPU benchmarks of the ``tiny`` preset shape: fastflamingo vs open_flamingo's own
model on the same weights (``pytest benchmarks --benchmark-only``). Outputs are checked first."""
import pytest
import torch

from fastflamingo.bench import e2e
from fastflamingo.bench.stages import call_generate, generate_fn
from fastflamingo.presets import preset_config

pytest.importorskip("open_flamingo")

CFG = e2e.E2EConfig("tiny", torch.float32, batch=2, images=2, prompt=64, new_tokens=16, train_tokens=64,
                    train_images=2, reps=1)


@pytest.fixture(scope="module")
def models():
    from fastflamingo.bench.peers import open_flamingo_model
    from fastflamingo.convert.open_flamingo import from_open_flamingo
    config = preset_config("tiny")
    live = open_flamingo_model(config, "cpu", torch.float32)
    ours = from_open_flamingo(live)
    inputs = e2e.make_inputs(CFG.batch, CFG.images, CFG.prompt, vocab=config.num_base_tokens,
                             media_token_id=config.media_token_id, image_size=config.vision.image_size,
                             device="cpu", dtype=torch.float32, specials=(config.eoc_token_id, 0, 2))
    banned = {config.media_token_id, config.eoc_token_id, 0, 2}
    with torch.no_grad():
        ref = ours(*inputs[:2], attention_mask=inputs[2]).logits
    return {"fastflamingo": ours, "open_flamingo": live}, inputs, ref, banned


@pytest.mark.parametrize("name", ["fastflamingo", "open_flamingo"])
def test_prefill(benchmark, models, name):
    benchmark.group = "tiny prefill B=2 N=2 T=64"
    m, (vx, ids, mask), ref, _ = models
    with torch.no_grad():
        got = m[name](vx, ids, attention_mask=mask).logits
        assert ((got - ref).norm() / ref.norm()).item() < 1e-4, f"{name} logits disagree: not timed"
        benchmark(lambda: m[name](vx, ids, attention_mask=mask))


@pytest.mark.parametrize("name", ["fastflamingo", "open_flamingo"])
def test_generate_16_tokens(benchmark, models, name):
    benchmark.group = "tiny generate 16 new tokens, B=2"
    m, (vx, ids, mask), _, banned = models
    fn = generate_fn(m[name])
    if fn is None:
        pytest.skip("fastflamingo's generate is not in this build")
    with torch.no_grad():
        want = call_generate(generate_fn(m["open_flamingo"]), vx, ids, mask, 16, banned)
        got = call_generate(fn, vx, ids, mask, 16, banned)
        assert torch.equal(got, want), f"{name} generates other tokens than open_flamingo: not timed"
        benchmark(lambda: call_generate(fn, vx, ids, mask, 16, banned))
