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
* ``matmuls + attention roofline (floor)``: the floor the layer is measured against, a lower
  bound of its time: the layer's projection and feed-forward GEMMs alone (with autograd's
  matching products for fwd+bwd; the attention's gradients to the K/V projections given, not
  computed), timed, plus its attention charged at the memory roofline (:func:`attention_bytes`
  over the measured copy bandwidth). Computing the attention instead (the unfused ``QK^T``,
  ``PV`` of earlier runs' ``matmuls only (floor)``) wrote and read its score matrices: a "floor"
  the fused layer beat.
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
def attention_bytes(images, V, L, H, D, element_size) -> dict:
    """The fewest bytes the attention moves: forward, read q, K/V of media and latents, write out;
    the backward, read those inputs, out and dout, write the five gradients: twice the forward."""
    q, media, lat = images * H * L * D, images * H * V * D, images * H * L * D
    fwd = (2 * q + 2 * media + 2 * lat) * element_size
    return {"fwd": fwd, "fwd+bwd": fwd + 2 * fwd}


def attention_case(images, V, L, H, D, dtype, device, *, seed=0) -> Case:
    g = torch.Generator().manual_seed(seed)
    q = _rand(g, dtype, device, images, H, L, D)
    km, vm = _rand(g, dtype, device, images, H, V, D), _rand(g, dtype, device, images, H, V, D)
    kl, vl = _rand(g, dtype, device, images, H, L, D), _rand(g, dtype, device, images, H, L, D)
    return Case(kernel="perceiver attention", x=f"images={images} V={V}", inputs=(q, km, vm, kl, vl),
                reference=ops.perceiver_attention_reference, grad_inputs=(0, 1, 2, 3, 4), sweep="images",
                x_value=images, bytes_moved=attention_bytes(images, V, L, H, D, q.element_size()),
                geometry=f"H={H} D={D} L={L}")


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


FLOOR = "matmuls + attention roofline (floor)"


class _GivenGrads(torch.autograd.Function):
    """``out`` as it is; its backward passes ``out``'s gradient on and gives ``kv_media`` and
    ``kv_latents`` the gradients ``grads`` (what an attention's backward would hand the K/V
    projections), so their GEMMs' backward runs without an attention being computed."""

    @staticmethod
    def forward(ctx, out, kv_media, kv_latents, grads):
        ctx.grads = grads
        return out.view_as(out)

    @staticmethod
    def backward(ctx, g):
        return g, ctx.grads[0], ctx.grads[1], None


class MatmulsOnly(nn.Module):
    """The layer's projection and feed-forward GEMMs and nothing else (no norms, attention,
    activation): the same GEMM shapes as :class:`ResamplerLayer` (the output projection reads a
    tensor of the attention output's shape). Its time, plus the attention at its roofline
    (:data:`FLOOR`), is the least the layer can take."""

    def __init__(self, layer: ResamplerLayer):
        super().__init__()
        self.attn, self.ff = layer.attn, layer.ff
        self.grads = None  # the K/V projections' given gradients, made by the first (checking) call

    def forward(self, x, latents):
        a = self.attn
        q = a.to_q(latents)  # (images, L, H·D): the attention output's shape
        kv_media, kv_latents = a.to_kv(x), a.to_kv(latents)
        if self.grads is None:
            self.grads = (torch.randn_like(kv_media), torch.randn_like(kv_latents))
        lat = _GivenGrads.apply(a.to_out(q), kv_media, kv_latents, self.grads)
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
    ref = _ReferenceLayer(reference)
    case = Case(kernel="resampler layer", x=f"images={images} V={V}", inputs=(x, lat),
                reference=ref, grad_inputs=(1,), sweep="images", x_value=images,
                geometry=f"dim={dim} H={H} D={D} L={L}", reference_params=ref.params)
    return case, layer


class _ReferenceLayer:
    """Calls the reference layer in the dtype of its inputs (a converted copy per dtype)."""

    def __init__(self, layer):
        self.layers = {next(layer.parameters()).dtype: layer}

    def _layer(self, dtype):
        if dtype not in self.layers:
            self.layers[dtype] = copy.deepcopy(next(iter(self.layers.values()))).to(dtype)
        return self.layers[dtype]

    def __call__(self, x, latents):
        return self._layer(x.dtype)(x, latents)

    def params(self, dtype) -> dict:
        """name -> parameter of the copy that runs in ``dtype`` (its gradients: the reference's)."""
        return dict(self._layer(dtype).named_parameters())


def layer_providers(layer: ResamplerLayer, images: int, V: int, L: int) -> list[Provider]:
    """Providers sharing ``layer``'s weights (copied into each peer's own module), for a case of
    ``images`` x ``V`` media tokens and ``L`` latents (the floor's attention bytes)."""
    dim = layer.attn.to_q.in_features
    H, D = layer.attn.heads, layer.attn.to_q.out_features // layer.attn.heads
    el = next(layer.parameters()).element_size()

    def module_provider(name, module):
        return Provider(name, lambda a: Prepared(call=lambda: module(*a), leaves=a,
                                                 params=lambda: dict(module.named_parameters())))
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
    ps.append(Provider(FLOOR, functools.partial(_matmuls_only, layer), floor=True,
                       charged_bytes=attention_bytes(images, V, L, H, D, el)))
    return ps


def _same_weights(module: nn.Module, source: nn.Module) -> nn.Module:
    p = next(source.parameters())
    module.load_state_dict(source.state_dict(), strict=False)
    return module.to(device=p.device, dtype=p.dtype)


def _matmuls_only(layer, args) -> Prepared:
    module = MatmulsOnly(layer)
    return Prepared(call=lambda: module(*args), leaves=args)
