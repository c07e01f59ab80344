"""FSDP2 (``torch.distributed.fsdp.fully_shard``) over a Flamingo model, two CPU processes (gloo):
one training step gives the loss and the gradients of the unsharded model, with the fused ops'
custom autograd inside, and only the added tokens' embedding rows get gradient (the mask used to
be a hook on the parameter, which FSDP2's sharded parameters lost: the whole vocabulary trained).
The LM families: LLaMA (IDEFICS-9B's, untied embeddings) and MPT (OpenFlamingo-9B's, tied); each
also with activation checkpointing (recomputed in the backward inside FSDP2's units)."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastflamingo import Flamingo
from fastflamingo.distribute import shard

from prompts import MPT, batch, tiny, training_labels

FAMILIES = {"llama": {}, "mpt": {"lm": MPT}}
pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


def _model(family: str) -> Flamingo:
    return tiny(**FAMILIES[family]).train()


def _step(model: Flamingo):
    c = model.config
    vx, ids, mask = batch(model, [2, 1], [12, 9], seed=0)
    ids[0, -2:] = c.eoc_token_id  # an added token besides <image>
    loss = model(vx, ids, attention_mask=mask, labels=training_labels(ids, mask, c.media_token_id)).loss
    loss.backward()
    return loss.item()


def _worker(rank: int, world: int, store: str, out: str) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    results = {}
    for family, checkpointed in [(f, c) for f in FAMILIES for c in (False, True)]:
        model = _model(family)
        if checkpointed:
            model.activation_checkpointing_enable()
        shard(model)  # the cross-attention blocks, decoder layers and resampler, then the root
        loss = _step(model)
        grads = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None}
        results[family, checkpointed] = (loss, grads)
    if rank == 0:
        torch.save(results, out)
    dist.barrier()
    dist.destroy_process_group()
    # leave without C++ static destructors: once (1 run in many, under load) a gloo thread still
    # joinable at interpreter exit aborted the process ("terminate called without an active
    # exception") after the work was done and saved
    os._exit(0)


def test_fsdp2_training_step_equals_the_unsharded_model(tmp_path):
    out = str(tmp_path / "results.pt")
    mp.spawn(_worker, args=(2, str(tmp_path / "store"), out), nprocs=2)
    results = torch.load(out, weights_only=True)
    for family, checkpointed in results:
        ref = _model(family)
        loss, grads = results[family, checkpointed]
        assert abs(loss - _step(ref)) < 1e-6, family
        want = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
        assert grads.keys() == want.keys(), (family, sorted(grads.keys() ^ want.keys()))
        for n, g in want.items():
            assert torch.allclose(grads[n], g, rtol=1e-5, atol=1e-6 * g.abs().max()), (family, n)
        base = ref.config.num_base_tokens
        for emb in (ref.lang_encoder.get_input_embeddings(), ref.lang_encoder.get_output_embeddings()):
            name = next(n for n, p in ref.named_parameters() if p is emb.weight)
            assert grads[name][:base].abs().sum() == 0 and grads[name][base:].abs().sum() > 0, (family, name)


def test_shard_wraps_the_decoder_layers_the_config_names(tmp_path, monkeypatch):
    """An LM family outside fastflamingo's table (Qwen3), its layers named by
    ``config.decoder_layers_attr``: shard() wraps the layers the model wrapped (it had asked the
    table, and refused the model). World size 1, in this process."""
    from torch.distributed.fsdp import FSDPModule
    qwen3 = dict(model_type="qwen3", hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, head_dim=16, vocab_size=512, max_position_embeddings=256)
    model = tiny(lm=qwen3, decoder_layers_attr="model.layers").train()
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        shard(model)
        assert all(isinstance(layer, FSDPModule) for layer in model.lang_encoder.model.layers)
        assert _step(model) > 0
    finally:
        dist.destroy_process_group()
