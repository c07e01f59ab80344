"""Test-wide set-up. Without a GPU, Triton kernels run in the interpreter: the variable must be set
before any kernel is defined, hence here, before test modules import fastflamingo.kernels."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The models in the tests are tiny: one thread is faster than two fighting over a busy 2-core
# machine (a tiny linear measured 0.05 ms on 1 thread vs ~27 ms on 2 under load).
torch.set_num_threads(1)

# The native CPU extension (CMakeLists.txt, csrc/) is built once per machine and torch (CMake
# rebuilds only what changed: ~1 s when nothing did, ~30 s from scratch on 2 cores) and loaded
# before any test runs, so that every test sees the same backends whatever their order: with
# it loaded, backend="auto" runs it for CPU tensors, as it does for a user who built it. A
# failed build fails the native tests (tests/test_native.py), with the build's error; the rest
# run on the PyTorch path.
NATIVE_BUILD_ERROR = None


def pytest_sessionstart(session):
    global NATIVE_BUILD_ERROR
    if os.environ.get("FASTFLAMINGO_NATIVE", "1") == "0":
        NATIVE_BUILD_ERROR = "FASTFLAMINGO_NATIVE=0 is set: the native extension was not built"
        return
    from fastflamingo import native
    try:
        native.load(native.build())
    except Exception as e:  # noqa: BLE001 - reported by the native tests
        NATIVE_BUILD_ERROR = f"{type(e).__name__}: {e}"


@pytest.fixture(scope="session")
def world():
    """The tiny preset trained 400 steps (~15 s) on the synthetic few-shot world, its tokenizer,
    7 queries named by shape and 12 support examples named by colour, all with a question: what
    the evaluation tests run the harness on."""
    import fastflamingo
    from fastflamingo.evaluation import synthetic
    model = fastflamingo.Flamingo.from_preset("tiny", seed=3)
    tok = synthetic.tokenizer()
    losses = synthetic.train(model, tok, steps=400, batch_size=16, seed=3, progress=False)
    assert sum(losses[-20:]) < 0.7 * sum(losses[:20])
    support = synthetic.examples(12, "color", seed=1)
    queries = synthetic.examples(7, "shape", seed=2)
    for ex in support + queries:
        ex.question = "what is it ?"
    return model, tok, queries, support
