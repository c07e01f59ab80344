"""A decode session's bound cross-attention blocks (fastflamingo/generation/lean_blocks.py) equal the
blocks' own forward bit for bit, and blocks that are not exactly fastflamingo's are called as modules."""
import pytest
import torch

from fastflamingo.blocks import GatedCrossAttentionBlock, IdeficsGatedCrossAttentionBlock, MediaState
from fastflamingo.config import CrossAttentionConfig
from fastflamingo.generation.lean_blocks import bound_block

D, D_VIS, L = 48, 40, 5


def _block(style, qk_layer_norms=False, alpha_type="float", seed=0, dim_head=12):
    torch.manual_seed(seed)
    c = CrossAttentionConfig(style=style, heads=4, dim_head=dim_head, qk_layer_norms=qk_layer_norms,
                             alpha_type=alpha_type, intermediate_size=80)
    if style == "idefics":
        block = IdeficsGatedCrossAttentionBlock(dim=D, dim_visual=D_VIS, config=c, lm_heads=4, lm_intermediate=80)
    else:
        block = GatedCrossAttentionBlock(dim=D, dim_visual=D_VIS, config=c)
    with torch.no_grad():
        for p in block.parameters():  # non-zero gates and norms that are not the identity
            p.copy_(torch.randn_like(p) * (0.5 if p.dim() < 2 else p.shape[-1] ** -0.5))
    return block.eval()


def _media(B, N, T, dtype, none_rows=()):
    g = torch.Generator().manual_seed(B * 10 + T)
    visual = torch.randn(B, N, L, D_VIS, generator=g).to(dtype)
    text_time = torch.randint(1, N + 1, (B, T), generator=g, dtype=torch.int32)
    for r in none_rows:
        text_time[r] = 0
    return MediaState(visual=visual, text_time=text_time, kv_cache={})


CASES = [("open_flamingo", False, "float"), ("idefics", False, "float"), ("idefics", True, "vector")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("style, qk_layer_norms, alpha_type", CASES)
@pytest.mark.parametrize("T, dim_head", [(1, 12), (7, 12), (1, 7)])
@torch.inference_mode()
def test_bound_block_equals_forward(style, qk_layer_norms, alpha_type, dtype, T, dim_head):
    """Decode steps (T = 1) and prompts, an odd head size, rows that see no image, and calls with
    no images at all."""
    block = _block(style, qk_layer_norms, alpha_type, dim_head=dim_head).to(dtype)
    fn = bound_block(block)
    assert fn is not block, "a block of fastflamingo's own modules is bound"
    x = torch.randn(3, T, D).to(dtype)
    no_images = MediaState(None, torch.zeros(3, T, dtype=torch.int32))
    for media in (_media(3, 2, T, dtype, none_rows=(1,)), _media(3, 3, T, dtype), no_images):
        want, got = block(x, media), fn(x, media)
        assert got.dtype == want.dtype and torch.equal(got, want), (got - want).abs().max()


def test_bound_block_reads_the_gates_once_per_session():
    """The gates' tanh is taken when the session binds the block: a later change of the gate is the
    next session's (generation runs with the weights it started with)."""
    block = _block("idefics")
    fn = bound_block(block)
    media = _media(2, 1, 1, torch.float32)
    x = torch.randn(2, 1, D)
    with torch.no_grad():
        before = block(x, media)
        block.alpha_dense.add_(1.0)
        assert torch.equal(fn(x, media), before)
        assert torch.equal(bound_block(block)(x, media), block(x, media))


@pytest.mark.parametrize("change, why", [
    (lambda b: b.register_forward_hook(lambda m, a, o: None), "a hook on the block"),
    (lambda b: next(m for m in b.modules() if isinstance(m, torch.nn.Linear)).register_forward_pre_hook(
        lambda m, a: None), "a hook on a linear layer inside"),
    (lambda b: b.train(), "training mode"),
    (lambda b: setattr(b.ff, "2", torch.nn.GELU(approximate="tanh")) if hasattr(b, "ff") else
     setattr(b.mlp, "up_proj", torch.nn.Sequential(b.mlp.up_proj)), "a replaced submodule"),
])
@pytest.mark.parametrize("style", ["open_flamingo", "idefics"])
def test_blocks_not_exactly_fastflamingos_are_called_as_modules(style, change, why):
    block = _block(style)
    change(block)
    assert bound_block(block) is block, why
    assert bound_block(None) is None


def test_quantized_linear_layers_are_called_as_modules():
    """NF4 linear layers (bitsandbytes, CPU): the bound block calls them, equal to the forward."""
    pytest.importorskip("bitsandbytes")
    from fastflamingo.quant import _replace_linears
    for style in ("open_flamingo", "idefics"):
        block = _block(style)
        assert _replace_linears(block, "nf4", skip=set(), frozen_only=False) >= 5
        fn = bound_block(block)
        assert fn is not block
        media = _media(2, 2, 1, torch.float32)
        x = torch.randn(2, 1, D)
        with torch.inference_mode():
            assert torch.equal(fn(x, media), block(x, media))
