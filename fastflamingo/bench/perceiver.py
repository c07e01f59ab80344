"""The Perceiver resampler: its attention and its whole layer, with every provider.

Attention providers (same q and media / latent K, V):
* ``fastflamingo``: :func:`fastflamingo.ops.perceiver_attention`, backend ``auto`` (Triton on
  CUDA; on the CPU the native C++ kernel where it is built, ``fastflamingo build-native``, else
  the PyTorch path).
* ``fastflamingo torch path`` (CPU, where the native kernel is built): the PyTorch path it
  replaces, ``backend="torch"`` (cat + SDPA).
* ``cat+sdpa``: concatenate the media and latent K/V, then SDPA (what an SDPA-based module does).
* ``eager``: open_flamingo's einsum attention over the concatenation.

Layer providers (attention + feed-forward with residuals, same weights):
* ``fastflamingo``: :class:`fastflamingo.blocks.PerceiverAttention` and ``FeedForward``.
* ``fastflamingo torch path`` (CPU, where the native kernel is built): the same layer on the
  PyTorch path (``backend="torch"``: the concatenated input projected once, one SDPA).
* ``open_flamingo``: ``open_flamingo.src.helpers.PerceiverAttention`` / ``FeedForward`` (installed).
* ``sdpa module``: open_flamingo's module with its attention replaced by cat + SDPA.
* ``matmuls only``: the layer's matrix products alone (projections, QK^T, PV, feed-forward),
  with autograd's matching products for fwd+bwd: the floor the layer is measured against.
"""
from __future__ import annotations

import copy
import functools

import torch
import torch.nn.functional as F
from torch import nn

from .. import native, ops
from ..blocks import FeedForward, PerceiverAttention
from .env import has_module
from .harness import Case, Prepared, Provider


def _rand(g, dtype, device, *shape):
    return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)


# ------------------------------------------------------------------------- attention
def attention_case(images, V, L, H, D, dtype, device, *, seed=0) -> Case:
    g = torch.Generator().manual_seed(seed)
    q = _rand(g, dtype, device, images, H, L, D)
    km, vm = _rand(g, dtype, device, images, H, V, D), _rand(g, dtype, device, images, H, V, D)
    kl, vl = _rand(g, dtype, device, images, H, L, D), _rand(g, dtype, device, images, H, L, D)
    el = q.element_size()
    fwd = (2 * q.numel() + 2 * km.numel() + 2 * kl.numel()) * el
    bwd = 2 * fwd + q.numel() * el  # read inputs, out, dout; write the five gradients
    return Case(kernel="perceiver attention", x=f"images={images} V={V}", inputs=(q, km, vm, kl, vl),
                reference=ops.perceiver_attention_reference, grad_inputs=(0, 1, 2, 3, 4), sweep="images",
                x_value=images, bytes_moved={"fwd": fwd, "fwd+bwd": fwd + bwd})


def eager_perceiver(q, km, vm, kl, vl):
    """open_flamingo's PerceiverAttention math after the projections."""
    k, v = torch.cat((km, kl), dim=-2), torch.cat((vm, vl), dim=-2)
    sim = torch.einsum("...id,...jd->...ij", q * q.shape[-1] ** -0.5, k)
    sim = sim - sim.amax(dim=-1, keepdim=True).detach()
    return torch.einsum("...ij,...jd->...id", sim.softmax(dim=-1), v)


def cat_sdpa(q, km, vm, kl, vl):
    return F.scaled_dot_product_attention(q, torch.cat((km, kl), dim=-2), torch.cat((vm, vl), dim=-2))


def _beside_native(device) -> bool:
    """Whether the PyTorch path gets its own column: on the CPU, where the native kernel replaces it."""
    return torch.device(device).type == "cpu" and native.available()


def attention_providers(device="cpu") -> list[Provider]:
    def plain(fn):
        return lambda a: Prepared(call=lambda: fn(*a), leaves=a)
    ps = [Provider("fastflamingo", plain(ops.perceiver_attention))]
    if _beside_native(device):
        ps.append(Provider("fastflamingo torch path", plain(functools.partial(ops.perceiver_attention, backend="torch"))))
    return ps + [Provider("cat+sdpa", plain(cat_sdpa)), Provider("eager", plain(eager_perceiver))]


# ------------------------------------------------------------------------- whole layer
class ResamplerLayer(nn.Module):
    """One resampler layer: ``latents = attn(x, latents) + latents; latents = ff(latents) + latents``."""

    def __init__(self, attn: nn.Module, ff: nn.Module, four_d: bool = False):
        super().__init__()
        self.attn, self.ff, self.four_d = attn, ff, four_d

    def forward(self, x, latents):
        if self.four_d:  # open_flamingo's modules take (b, T, n, D)
            lat = self.attn(x[:, None], latents[:, None])[:, 0] + latents
        else:
            lat = self.attn(x, latents) + latents
        return self.ff(lat) + lat


class SdpaPerceiverAttention(PerceiverAttention):
    """open_flamingo's layout with its attention done by SDPA over the concatenated inputs."""

    def forward(self, x, latents):
        x, latents = self.norm_media(x), self.norm_latents(latents)
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat((x, latents), dim=-2)).chunk(2, dim=-1)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.to_out(out.transpose(1, 2).flatten(2))


class MatmulsOnly(nn.Module):
    """The layer's matrix products and nothing else (no norms, softmax, activation): the same
    GEMM shapes as :class:`ResamplerLayer`, so its time is the floor the layer is held to."""

    def __init__(self, layer: ResamplerLayer):
        super().__init__()
        self.attn, self.ff = layer.attn, layer.ff

    def forward(self, x, latents):
        a, h = self.attn, self.attn.heads
        q = a.to_q(latents).unflatten(-1, (h, -1)).transpose(1, 2)
        km, vm = (t.unflatten(-1, (h, -1)).transpose(1, 2) for t in a.to_kv(x).chunk(2, dim=-1))
        kl, vl = (t.unflatten(-1, (h, -1)).transpose(1, 2) for t in a.to_kv(latents).chunk(2, dim=-1))
        out = (q @ km.transpose(-1, -2)) @ vm + (q @ kl.transpose(-1, -2)) @ vl
        lat = a.to_out(out.transpose(1, 2).flatten(2))
        return self.ff[3](self.ff[1](lat))


def layer_case(images, V, L, dim, H, D, dtype, device, *, seed=0):
    """(Case, the fastflamingo layer in the working dtype). The case's reference is the same
    layer on the readable ``reference`` attention backend."""
    torch.manual_seed(seed)
    layer = ResamplerLayer(PerceiverAttention(dim=dim, dim_head=D, heads=H), FeedForward(dim, 4))
    with torch.no_grad():  # LayerNorms away from the identity so nothing is trivial
        for m in layer.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.add_(0.1 * torch.randn_like(m.weight))
                m.bias.add_(0.1 * torch.randn_like(m.bias))
    layer = layer.to(device=device, dtype=dtype)
    reference = copy.deepcopy(layer)
    reference.attn.backend = "reference"
    g = torch.Generator().manual_seed(seed + 1)
    x = _rand(g, dtype, device, images, V, dim)
    lat = _rand(g, dtype, device, images, L, dim)
    case = Case(kernel="resampler layer", x=f"images={images} V={V}", inputs=(x, lat),
                reference=_ReferenceLayer(reference), grad_inputs=(1,), sweep="images", x_value=images)
    return case, layer


class _ReferenceLayer:
    """Calls the reference layer in the dtype of its inputs (a converted copy per dtype)."""

    def __init__(self, layer):
        self.layers = {next(layer.parameters()).dtype: layer}

    def __call__(self, x, latents):
        if x.dtype not in self.layers:
            self.layers[x.dtype] = copy.deepcopy(next(iter(self.layers.values()))).to(x.dtype)
        return self.layers[x.dtype](x, latents)


def layer_providers(layer: ResamplerLayer) -> list[Provider]:
    """Providers sharing ``layer``'s weights (copied into each peer's own module)."""
    dim = layer.attn.to_q.in_features
    H, D = layer.attn.heads, layer.attn.to_q.out_features // layer.attn.heads

    def module_provider(name, module):
        return Provider(name, lambda a: Prepared(call=lambda: module(*a), leaves=a))
    sdpa = ResamplerLayer(SdpaPerceiverAttention(dim=dim, dim_head=D, heads=H), FeedForward(dim, 4))
    ps = [module_provider("fastflamingo", layer)]
    if _beside_native(next(layer.parameters()).device):
        torch_path = copy.deepcopy(layer)
        torch_path.attn.backend = "torch"
        ps.append(module_provider("fastflamingo torch path", torch_path))
    ps.append(module_provider("sdpa module", _same_weights(sdpa, layer)))
    if has_module("open_flamingo.src.helpers"):
        from open_flamingo.src import helpers
        peer = ResamplerLayer(helpers.PerceiverAttention(dim=dim, dim_head=D, heads=H),
                              helpers.FeedForward(dim, 4), four_d=True)
        ps.append(module_provider("open_flamingo", _same_weights(peer, layer)))
    else:
        ps.append(Provider("open_flamingo", None, unavailable=lambda mode: "open_flamingo is not installed"))
    ps.append(Provider("matmuls only (floor)", functools.partial(_matmuls_only, layer), floor=True))
    return ps


def _same_weights(module: nn.Module, source: nn.Module) -> nn.Module:
    p = next(source.parameters())
    module.load_state_dict(source.state_dict(), strict=False)
    return module.to(device=p.device, dtype=p.dtype)


def _matmuls_only(layer, args) -> Prepared:
    module = MatmulsOnly(layer)
    return Prepared(call=lambda: module(*args), leaves=args)
