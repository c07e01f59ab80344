"""Image-causal cross-attention: the layouts benchmarked and every provider of the op.

Providers (each gets the same q, k, v and image positions; before every timed call each gets a new
copy of ``text_time`` and of whatever index tensors it prebuilt from it, outside the timed region,
:attr:`~.harness.Prepared.fresh`: the same values, but no cache keyed on a tensor's identity, such
as fastflamingo's per-call chunk plan, lasts from one call to the next):

* ``fastflamingo``: :func:`fastflamingo.ops.image_causal_attention`, backend ``auto`` (Triton on
  CUDA; on the CPU the native C++ kernel where it is built, ``fastflamingo build-native``, else
  the PyTorch path), given ``text_time`` as the model gives it.
* ``fastflamingo torch path`` (CPU, where the native kernel is built): the PyTorch path it
  replaces, ``backend="torch"``.
* ``eager einsum+mask``: open_flamingo's MaskedCrossAttention math (dense mask built per call).
* ``sdpa dense mask``: SDPA with a prebuilt dense bool mask (B, 1, T, N·L).
* ``flex``: FlexAttention with a prebuilt BlockMask (compiled on CUDA, eager on the CPU: forward
  only there); ``flex mask build`` and ``flex+build`` time create_block_mask alone and with it.
* ``varlen``: torch.nn.attention.varlen on packed (total, H, D) tensors, one segment per
  (row, image); ``varlen mask build`` times building cu_seqlens from the image positions.
* ``xformers`` (BlockDiagonalMask) and ``flash-attn varlen`` where installed.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .. import native, ops
from ..ops.reference import image_causal_attention_reference, image_causal_mask
from .env import has_module
from .harness import Case, Prepared, Provider


def random_text_time(B: int, T: int, N: int, generator: torch.Generator) -> torch.Tensor:
    """(B, T) int32: every row holds N ``<image>`` tokens at random positions (tokens before the
    first one see no image)."""
    rows = []
    for _ in range(B):
        loc = torch.zeros(T, dtype=torch.bool)
        loc[torch.randperm(T, generator=generator)[:N]] = True
        rows.append(loc)
    return ops.text_time_from_media_locations(torch.stack(rows))


def make_case(B, H, T, N, L, D, dtype, device, *, sweep="", x_value=None, seed=0) -> Case:
    g = torch.Generator().manual_seed(seed)
    tt = random_text_time(B, T, N, g).to(device)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)
    q, k, v = rnd(B, H, T, D), rnd(B, H, N * L, D), rnd(B, H, N * L, D)
    el = q.element_size()
    fwd = (2 * q.numel() + 2 * k.numel()) * el                    # read q, k, v; write out
    bwd = (4 * q.numel() + 4 * k.numel()) * el                    # read q, k, v, out, dout; write dq, dk, dv
    ref = functools.partial(_reference, L=L)
    return Case(kernel="image-causal xattn", x=f"B={B} N={N} T={T}", inputs=(q, k, v, tt), reference=ref,
                sweep=sweep, x_value=x_value, bytes_moved={"fwd": fwd, "fwd+bwd": fwd + bwd},
                geometry=f"H={H} D={D} L={L}")


def _reference(q, k, v, tt, *, L):
    return image_causal_attention_reference(q, k, v, tt, latents_per_media=L)


# ------------------------------------------------------------------------- providers
def providers(device: str, L: int, *, flex_compile: bool | None = None) -> list[Provider]:
    cuda = torch.device(device).type == "cuda"
    flex_compile = cuda if flex_compile is None else flex_compile
    ps = [
        Provider("fastflamingo", lambda a: _plain(a, lambda q, k, v, tt: ops.image_causal_attention(
            q, k, v, text_time=tt, latents_per_media=L, validate=False))),
    ]
    if not cuda and native.available():
        ps.append(Provider("fastflamingo torch path", lambda a: _plain(a, lambda q, k, v, tt: ops.image_causal_attention(
            q, k, v, text_time=tt, latents_per_media=L, validate=False, backend="torch"))))
    ps += [
        Provider("eager einsum+mask", lambda a: _plain(a, functools.partial(eager_open_flamingo, L=L))),
        Provider("sdpa dense mask", lambda a: _sdpa(a, L)),
        Provider("flex" if flex_compile else "flex (eager)", lambda a: _flex(a, L, flex_compile),
                 unavailable=lambda mode: _flex_unavailable(cuda, mode)),
        Provider("varlen", lambda a: _varlen(a, L, _torch_varlen),
                 unavailable=lambda mode: None if cuda and has_module("torch.nn.attention.varlen")
                 else "torch varlen_attn needs CUDA (torch.nn.attention.varlen)"),
    ]
    if has_module("xformers.ops"):
        ps.append(Provider("xformers", lambda a: _xformers(a, L),
                           unavailable=lambda mode: None if cuda else "xformers needs CUDA"))
    if has_module("flash_attn"):
        ps.append(Provider("flash-attn varlen", lambda a: _varlen(a, L, _flash_varlen),
                           unavailable=lambda mode: None if cuda else "flash-attn needs CUDA"))
    return ps


class _Fresh:
    """Per-call copies of a provider's index tensors: ``now[name]`` is read by its call;
    :meth:`renew` (the timed call's setup, outside the timed region) replaces every one by a clone."""

    def __init__(self, **tensors):
        self.kept, self.now = tensors, dict(tensors)

    def renew(self) -> None:
        self.now = {k: v.clone() for k, v in self.kept.items()}


def _plain(args, fn) -> Prepared:
    q, k, v, tt = args
    f = _Fresh(tt=tt)
    return Prepared(call=lambda: fn(q, k, v, f.now["tt"]), leaves=args, fresh=f.renew)


def eager_open_flamingo(q, k, v, text_time, *, L, only_immediate=True):
    """open_flamingo 2.0.1's MaskedCrossAttention (immediate mode) on (B, H, ., D) tensors."""
    q = q * q.shape[-1] ** -0.5
    sim = torch.einsum("bhid,bhjd->bhij", q, k)
    media_time = torch.arange(k.shape[2] // L, device=q.device) + 1
    op = torch.eq if only_immediate else torch.ge
    mask = op(text_time[:, None, :, None], media_time.repeat_interleave(L)[None, None, None, :])
    sim = sim.masked_fill(~mask, -torch.finfo(sim.dtype).max)
    sim = sim - sim.amax(dim=-1, keepdim=True).detach()
    attn = sim.softmax(dim=-1)
    attn = attn.masked_fill((text_time == 0)[:, None, :, None], 0.0)
    return torch.einsum("bhij,bhjd->bhid", attn, v)


def _sdpa(args, L) -> Prepared:
    q, k, v, tt = args
    no_media = (tt == 0)[:, None, :, None]
    # a query row that sees no key would be NaN: let it see all, then zero it (as the CPU path does)
    f = _Fresh(mask=image_causal_mask(tt, k.shape[2] // L, L)[:, None] | no_media, no_media=no_media)

    def call():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=f.now["mask"]).masked_fill(f.now["no_media"], 0.0)
    return Prepared(call=call, leaves=args, fresh=f.renew)


def _flex_unavailable(cuda: bool, mode: str) -> str | None:
    if not has_module("torch.nn.attention.flex_attention"):
        return "torch.nn.attention.flex_attention missing"
    if not cuda and mode == "fwd+bwd":
        return "FlexAttention has no backward on the CPU"
    return None


@functools.lru_cache(maxsize=None)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention
    import torch._dynamo
    # one compilation per shape: raise the recompile limit so no shape silently falls back to eager
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 256)
    return torch.compile(flex_attention, dynamic=False)


def _flex(args, L, compiled: bool) -> Prepared:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    q, k, v, tt = args
    B, _, T, _ = q.shape
    S = k.shape[2]
    f = _Fresh(ttl=tt.long())

    def build():
        ttl = f.now["ttl"]

        def mask_mod(b, h, qi, ki):
            return ttl[b, qi] == ki // L + 1
        return create_block_mask(mask_mod, B, None, T, S, device=q.device)
    fn = _compiled_flex() if compiled else flex_attention
    block_mask = build()  # prebuilt once (the row without +build): a BlockMask is not a tensor to copy
    return Prepared(call=lambda: fn(q, k, v, block_mask=block_mask), leaves=args, build=build,
                    call_with_build=lambda: fn(q, k, v, block_mask=build()), fresh=f.renew)


# ------------------------------------------------------------------------- varlen family
def varlen_segments(tt: torch.Tensor, N: int, L: int):
    """cu_seqlens for packed attention: one segment per (row, image m = 0..N); image 0 (tokens
    before any image) has no keys. Returns (cu_q, cu_k, max_q, max_k); one host sync (max_q)."""
    B, T = tt.shape
    seg = (torch.arange(B, device=tt.device)[:, None] * (N + 1) + tt.long()).flatten()
    count_q = torch.bincount(seg, minlength=B * (N + 1))
    count_k = torch.full((B, N + 1), L, device=tt.device, dtype=torch.long)
    count_k[:, 0] = 0
    cu_q = F.pad(count_q.cumsum(0), (1, 0)).to(torch.int32)
    cu_k = F.pad(count_k.flatten().cumsum(0), (1, 0)).to(torch.int32)
    return cu_q, cu_k, int(count_q.max()), L


def _torch_varlen(q, k, v, cu_q, cu_k, max_q, max_k):
    from torch.nn.attention.varlen import varlen_attn
    return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k)


def _flash_varlen(q, k, v, cu_q, cu_k, max_q, max_k):
    from flash_attn import flash_attn_varlen_func
    return flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k)


def _packed(args):
    """(B, H, S, D) leaves -> packed (B·S, H, D) leaves and the converters back."""
    q, k, v, tt = args
    B, H, T, D = q.shape
    S = k.shape[2]

    def pack(t):
        return t.detach().transpose(1, 2).reshape(-1, H, D).contiguous().requires_grad_(t.requires_grad)

    def unpack(t, n):
        return t.reshape(B, n, H, D).transpose(1, 2)
    leaves = (pack(q), pack(k), pack(v), tt)

    def grads_back(gs):
        return [unpack(g, n) if g is not None else None for g, n in zip(gs, (T, S, S))]
    return leaves, (lambda o: unpack(o, T)), grads_back, (lambda d: pack(d).detach()), (tt == 0).flatten()[:, None, None]


def _varlen(args, L, kernel) -> Prepared:
    tt = args[3]
    N = args[1].shape[2] // L
    (q, k, v, _), to_common, grads_back, dout, no_media = _packed(args)
    cu_q, cu_k, max_q, max_k = varlen_segments(tt, N, L)
    f = _Fresh(tt=tt, cu_q=cu_q, cu_k=cu_k, no_media=no_media)

    def call(m=None):
        m = m if m is not None else (f.now["cu_q"], f.now["cu_k"], max_q, max_k)
        return kernel(q, k, v, *m).masked_fill(f.now["no_media"], 0.0)
    return Prepared(call=call, leaves=(q, k, v, tt), build=lambda: varlen_segments(f.now["tt"], N, L),
                    call_with_build=lambda: call(varlen_segments(f.now["tt"], N, L)),
                    to_common=to_common, grads_to_common=grads_back, dout=dout, fresh=f.renew)


def _xformers(args, L) -> Prepared:
    from xformers.ops import fmha
    tt = args[3]
    N = args[1].shape[2] // L
    (q, k, v, _), to_common, grads_back, dout, no_media = _packed(args)

    def build():
        cu_q, cu_k, _, _ = varlen_segments(tt, N, L)
        return fmha.BlockDiagonalMask.from_seqlens(cu_q.diff().tolist(), cu_k.diff().tolist())

    def call(bias=None):
        bias = bias if bias is not None else mask
        out = fmha.memory_efficient_attention(q[None], k[None], v[None], attn_bias=bias)[0]
        return out.masked_fill(no_media, 0.0)
    mask = build()
    return Prepared(call=call, leaves=(q, k, v, tt), build=build, call_with_build=lambda: call(build()),
                    to_common=to_common, grads_to_common=grads_back, dout=dout)
