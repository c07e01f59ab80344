"""The dependency floor (fastflamingo/versions.py) and the code paths kept for the oldest versions
above it. CI runs the newest versions; the older ones were checked by running the whole suite in a
venv whose own site-packages hold the older package ahead of the usual ones, e.g.
``python -m venv v && echo $SITE > v/lib/python3.11/site-packages/zz.pth && v/bin/pip install
transformers==5.10.4`` (with fastflamingo's editable-install files copied in too), then
``v/bin/python -m pytest``."""
import copy
import subprocess
import sys
import types

import pytest
import torch

from fastflamingo import versions
from fastflamingo.lm import thin_checkpointing


@pytest.mark.parametrize("installed, minimum, old", [
    ("4.57.6", "5.10", True), ("5.0.0", "5.10", True), ("5.9.9", "5.10", True), ("5.10.0", "5.10", False),
    ("5.10.4", "5.10", False), ("5.24.0", "5.10", False), ("5.10.0rc1", "5.10", False), ("5.9.0rc1", "5.10", True),
    ("2.14.1+cu130", "2.11", False), ("2.6.0+cpu", "2.11", True), ("2.11.0a0+git1234", "2.11", False),
    ("10.0", "5.10", False),
])
def test_versions_compare_as_releases(installed, minimum, old):
    assert versions.too_old(installed, minimum) is old


def test_an_old_transformers_is_refused_by_name(monkeypatch):
    real = versions.metadata.version
    monkeypatch.setattr(versions.metadata, "version",
                        lambda name: "4.57.6" if name == "transformers" else real(name))
    with pytest.raises(ImportError, match=r"needs transformers >= 5\.10, but transformers 4\.57\.6 is installed .*"
                                          r"pip install -U 'transformers>=5\.10'"):
        versions.check()


def test_the_installed_versions_pass_and_a_fresh_import_checks_them():
    versions.check()
    code = ("import importlib.metadata as m\n"
            "real = m.version\n"
            "m.version = lambda n: '2.6.0' if n == 'torch' else real(n)\n"
            "import fastflamingo\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 1 and "fastflamingo needs torch >= 2.11, but torch 2.6.0 is installed" in out.stderr, \
        out.stderr[-600:]


def test_idefics_rotary_parameters_without_rope_parameters_are_the_default():
    """transformers before 5.1x: IdeficsConfig had no rope_parameters and its rotary embedding used
    base 10000; the fallback is what the newer IdeficsConfig gives by default."""
    from transformers import IdeficsConfig

    from fastflamingo.convert.idefics import _rope_parameters
    if hasattr(IdeficsConfig(), "rope_parameters"):
        default = dict(IdeficsConfig().rope_parameters)
        assert _rope_parameters(IdeficsConfig()) == default
    else:  # this transformers' rotary embedding takes its base as an argument, default 10000
        import inspect

        from transformers.models.idefics.modeling_idefics import IdeficsEmbedding
        default = {"rope_type": "default",
                   "rope_theta": float(inspect.signature(IdeficsEmbedding).parameters["base"].default)}
    assert _rope_parameters(types.SimpleNamespace()) == default == {"rope_type": "default", "rope_theta": 10000.0}


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")
@pytest.mark.parametrize("every_n_layers", [1, 2, 3])
def test_thin_checkpointing_sets_what_transformers_every_n_layers_sets(every_n_layers):
    """transformers before 5.17 checkpoint every layer: thin_checkpointing then leaves the layers
    transformers 5.17+ leaves (its ``every_n_layers``), the same per-layer flags, and the training
    step keeps the loss and gradients of the model without checkpointing."""
    import inspect

    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.modeling_layers import GradientCheckpointingLayer
    plain = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=5,
                                         num_attention_heads=4, vocab_size=64))
    older = copy.deepcopy(plain)
    older.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def flags(model):
        return [m.gradient_checkpointing for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    assert flags(older) == [True] * 5
    thin_checkpointing(older, {"use_reentrant": False}, every_n_layers, offload=False)
    assert flags(older) == [i % every_n_layers == 0 for i in range(5)]
    models = [plain, older]
    if "every_n_layers" in inspect.signature(plain.gradient_checkpointing_enable).parameters:
        newer = copy.deepcopy(plain)
        newer.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False},
                                            every_n_layers=every_n_layers)
        assert flags(newer) == flags(older)
        models.append(newer)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    losses = []
    for model in models:
        model.train()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.detach())
    assert all(torch.equal(loss, losses[0]) for loss in losses)
    for other in models[1:]:
        for (name, a), b in zip(plain.named_parameters(), other.parameters()):
            assert torch.equal(a.grad, b.grad), name


def test_thin_checkpointing_refuses_layers_it_cannot_count():
    lm = torch.nn.Sequential(torch.nn.Linear(2, 2))
    thin_checkpointing(lm, {}, 1, offload=False)  # nothing asked beyond every layer: nothing to do
    with pytest.raises(ValueError, match=r"every_n_layers=2, offload=False: Sequential's layers are no "
                                         r"transformers GradientCheckpointingLayer"):
        thin_checkpointing(lm, {}, 2, offload=False)


def test_an_old_bitsandbytes_is_refused_where_quantization_starts(monkeypatch):
    """bitsandbytes before 0.46 quantizes on CUDA only: refused by name when a model is quantized."""
    from fastflamingo import quant
    bnb = pytest.importorskip("bitsandbytes")
    monkeypatch.setattr(bnb, "__version__", "0.45.5")
    with pytest.raises(ImportError, match=r"needs bitsandbytes >= 0\.46, but bitsandbytes 0\.45\.5 is installed"):
        quant._bnb()
    monkeypatch.setattr(bnb, "__version__", "0.46.0")
    assert quant._bnb() is bnb


def test_info_says_when_bitsandbytes_is_too_old(monkeypatch):
    from fastflamingo import info
    bnb = pytest.importorskip("bitsandbytes")
    assert info.collect()["bitsandbytes"] == bnb.__version__
    monkeypatch.setattr(bnb, "__version__", "0.45.5")
    assert info.collect()["bitsandbytes"] == "0.45.5 (too old: fastflamingo needs >= 0.46)"


def test_info_says_varlen_attention_needs_cuda(monkeypatch):
    """torch's varlen attention is flash-attention's kernel: info must not call it available on a
    machine without CUDA (the CPU raises NotImplementedError)."""
    from fastflamingo import info
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    got = info.collect()
    assert not got["cuda_available"]
    assert got["backends"]["baseline varlen_attn"] in ("CUDA only (no GPU here)", "no")
