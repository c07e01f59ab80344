"""Flamingo's trainable blocks: the Perceiver resampler and the gated cross-attention blocks.

Parameter names follow the checkpoints they load: open_flamingo's (``to_q``, ``to_kv``,
``attn_gate``, ...) for the ``open_flamingo`` style, IDEFICS's (``q_proj``, ``alpha_cross_attn``,
...) for the ``idefics`` style. The attention itself is :mod:`fastflamingo.ops`, so every block
runs on the fused kernels on CUDA and on the fast PyTorch path on the CPU.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import ops
from .config import CrossAttentionConfig, ResamplerConfig
from .distribute import to_execution_device


def checkpoint_call(fn, *args, offload: bool = False, **kwargs):
    """``torch.utils.checkpoint.checkpoint(fn, *args, **kwargs)``; with ``offload`` the inputs it
    keeps go to pinned CPU memory (transformers' ``offload``)."""
    if not offload:
        return checkpoint(fn, *args, **kwargs)
    with torch.autograd.graph.save_on_cpu(pin_memory=True):
        return checkpoint(fn, *args, **kwargs)


class Checkpointed(nn.Module):
    """A trainable block that can run under activation checkpointing: in training, with gradients
    on, its forward keeps only its inputs and recomputes the rest in the backward (memory for
    time). Non-reentrant (``torch.utils.checkpoint``): the recompute differentiates what the
    block reads beyond its arguments too (the visual tokens in the media state). Turned on by
    :meth:`fastflamingo.Flamingo.activation_checkpointing_enable`."""
    gradient_checkpointing = False
    checkpoint_kwargs: dict = {}  # more arguments of torch.utils.checkpoint.checkpoint
    checkpoint_offload = False  # the kept inputs in CPU memory (transformers' ``offload``)

    def _checkpoint(self) -> bool:
        return self.gradient_checkpointing and self.training and torch.is_grad_enabled()

    def _checkpointed(self, fn, *args):
        """``fn(*args)``, recomputed in the backward instead of kept."""
        return checkpoint_call(fn, *args, offload=self.checkpoint_offload, use_reentrant=False,
                               **self.checkpoint_kwargs)


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, S, H·D) -> (B, H, S, D), a view (no copy)."""
    return x.unflatten(-1, (heads, -1)).transpose(-3, -2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, S, D) -> (B, S, H·D)."""
    return x.transpose(-3, -2).flatten(-2)


# the Perceiver attention's backends under which the layers project [media ; latents] at once
CONCATENATING = ("torch", "native")


def _attend_concatenated(backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, media: int,
                         scale: float) -> torch.Tensor:
    """The Perceiver attention over keys already concatenated ([media ; latents], the first
    ``media`` of them the media's): one SDPA call ("torch"), or the native kernel given the two
    parts as views ("native"); equal to :func:`fastflamingo.ops.perceiver_attention` of the parts."""
    if backend == "torch":
        return nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)
    return ops.perceiver_attention(q, k[..., :media, :], v[..., :media, :], k[..., media:, :], v[..., media:, :],
                                   scale=scale, backend=backend)


def FeedForward(dim: int, mult: int = 4) -> nn.Sequential:
    """open_flamingo's feed-forward: LayerNorm -> Linear(mult·dim) -> GELU -> Linear."""
    inner = int(dim * mult)
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, inner, bias=False), nn.GELU(),
                         nn.Linear(inner, dim, bias=False))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """IDEFICS's RMSNorm: variance in fp32, the normalized x cast to a 16-bit weight's dtype."""
    variance = (x if x.dtype == torch.float32 else x.to(torch.float32)).pow(2).mean(-1, keepdim=True)
    x = x * torch.rsqrt(variance + eps)
    if weight.dtype in (torch.float16, torch.bfloat16):
        x = x.to(weight.dtype)
    return weight * x


class RMSNorm(nn.Module):
    """LLaMA / IDEFICS RMSNorm (:func:`rms_norm`)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.variance_epsilon)


class SwiGLU(nn.Module):
    """IDEFICS / LLaMA MLP: down(silu(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


# --------------------------------------------------------------------------------------------
# Perceiver resampler
# --------------------------------------------------------------------------------------------
class PerceiverAttention(nn.Module):
    """Latents attend to [media tokens ; latents] (open_flamingo layout).

    open_flamingo projects ``cat(media, latents)`` with ``to_kv``; the projection of a
    concatenation is the concatenation of projections, so where the Triton kernel runs (CUDA) the
    media and the latents are projected separately and it attends over both without building the
    concatenation. On the CPU paths one matrix product costs less than two (the CPU runs small
    products far from its peak): the concatenated input is projected once, then PyTorch's SDPA
    takes the keys as they are, and the native kernel their media and latent parts as views.
    """

    def __init__(self, *, dim: int, dim_head: int = 64, heads: int = 8):
        super().__init__()
        self.scale = dim_head ** -0.5
        self.heads = heads
        inner = dim_head * heads
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)
        self.backend = "auto"

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """x (B, V, D) media tokens, latents (B, L, D) -> (B, L, D)."""
        x = self.norm_media(x)
        latents = self.norm_latents(latents)
        h = self.heads
        q = _heads(self.to_q(latents), h)
        backend = ops.perceiver_backend(q, self.backend, x.shape[-2])
        if backend in CONCATENATING:  # project the concatenation once
            k, v = (_heads(t, h) for t in self.to_kv(torch.cat([x, latents], dim=-2)).chunk(2, dim=-1))
            return self.to_out(_merge_heads(_attend_concatenated(backend, q, k, v, x.shape[-2], self.scale)))
        k_media, v_media = (_heads(t, h) for t in self.to_kv(x).chunk(2, dim=-1))
        k_lat, v_lat = (_heads(t, h) for t in self.to_kv(latents).chunk(2, dim=-1))
        out = ops.perceiver_attention(q, k_media, v_media, k_lat, v_lat, scale=self.scale,
                                      backend=self.backend)
        return self.to_out(_merge_heads(out))


class IdeficsPerceiverAttention(nn.Module):
    """IDEFICS's Perceiver attention: separate q/k/v projections, optional q/k LayerNorms."""

    def __init__(self, *, dim: int, dim_head: int, heads: int, qk_layer_norms: bool):
        super().__init__()
        self.heads, self.scale = heads, dim_head ** -0.5
        self.context_layer_norm = nn.LayerNorm(dim)
        self.latents_layer_norm = nn.LayerNorm(dim)
        self.qk_layer_norms = qk_layer_norms
        if qk_layer_norms:
            self.q_layer_norm = nn.LayerNorm(dim_head)
            self.k_layer_norm = nn.LayerNorm(dim_head)
        self.q_proj = nn.Linear(dim, heads * dim_head, bias=False)
        self.k_proj = nn.Linear(dim, heads * dim_head, bias=False)
        self.v_proj = nn.Linear(dim, heads * dim_head, bias=False)
        self.output_proj = nn.Linear(heads * dim_head, dim, bias=False)
        self.backend = "auto"

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """x (B, V, D) media tokens, latents (B, L, D) -> (B, L, D)."""
        x = self.context_layer_norm(x)
        latents = self.latents_layer_norm(latents)
        h = self.heads
        q = _heads(self.q_proj(latents), h)
        backend = ops.perceiver_backend(q, self.backend, x.shape[-2])
        if backend in CONCATENATING:  # project the concatenation once
            both = torch.cat([x, latents], dim=-2)
            k, v = _heads(self.k_proj(both), h), _heads(self.v_proj(both), h)
            if self.qk_layer_norms:
                q, k = self.q_layer_norm(q), self.k_layer_norm(k)
            return self.output_proj(_merge_heads(_attend_concatenated(backend, q, k, v, x.shape[-2], self.scale)))
        k_media, k_lat = _heads(self.k_proj(x), h), _heads(self.k_proj(latents), h)
        v_media, v_lat = _heads(self.v_proj(x), h), _heads(self.v_proj(latents), h)
        if self.qk_layer_norms:
            q, k_media, k_lat = self.q_layer_norm(q), self.k_layer_norm(k_media), self.k_layer_norm(k_lat)
        out = ops.perceiver_attention(q, k_media, v_media, k_lat, v_lat, scale=self.scale,
                                      backend=self.backend)
        return self.output_proj(_merge_heads(out))


class IdeficsPerceiverMLP(nn.Module):
    """IDEFICS's resampler MLP: LayerNorm -> fc -> ReLU -> c_proj."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.ln = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, hidden, bias=False)
        self.act = nn.ReLU()
        self.c_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.c_proj(self.act(self.fc(self.ln(x))))


def _resampler_layer(attn: nn.Module, ff: nn.Module, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    """One resampler layer: the latents attend to the media and themselves, then the feed-forward."""
    latents = attn(x, latents) + latents
    return ff(latents) + latents


class PerceiverResampler(Checkpointed):
    """Compresses each image (or video) to ``num_latents`` visual tokens.

    Input (B, N, F, V, D) frame features; output (B, N, L, D). Frames of one media item are
    flattened into one token sequence after adding the learned frame embeddings (video).
    ``style="idefics"`` builds IDEFICS's variant (``blocks``/``layer_norm`` names, ReLU MLP).
    """

    def __init__(self, *, dim: int, config: ResamplerConfig):
        super().__init__()
        c = config
        self.style = c.style
        self.latents = nn.Parameter(torch.randn(c.num_latents, dim))
        self.frame_embs = nn.Parameter(torch.randn(c.max_num_frames, dim)) if c.max_num_frames else None
        self.media_time_embs = (nn.Parameter(torch.randn(c.max_num_media, 1, dim))
                                if c.max_num_media else None)
        layers = nn.ModuleList()
        for _ in range(c.depth):
            if c.style == "open_flamingo":
                layers.append(nn.ModuleList([PerceiverAttention(dim=dim, dim_head=c.dim_head, heads=c.heads),
                                             FeedForward(dim, c.ff_mult)]))
            else:
                layers.append(nn.ModuleList([
                    IdeficsPerceiverAttention(dim=dim, dim_head=c.dim_head, heads=c.heads,
                                              qk_layer_norms=c.qk_layer_norms),
                    IdeficsPerceiverMLP(dim, dim * c.ff_mult)]))
        if c.style == "open_flamingo":
            self.layers, self.norm = layers, nn.LayerNorm(dim)
        else:
            self.blocks, self.layer_norm = layers, nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, N, F, V, D) -> (B, N, L, D)."""
        B, N, F, V, D = x.shape
        if self.frame_embs is not None:
            if F > self.frame_embs.shape[0]:
                raise ValueError(f"vision_x has F={F} frames per media item but the resampler has "
                                 f"frame embeddings for max_num_frames={self.frame_embs.shape[0]}")
            x = x + self.frame_embs[:F, None, :]
        elif F > 1:
            raise ValueError(f"vision_x has F={F} frames per media item but this resampler has no frame "
                             "embeddings: build it with resampler.max_num_frames >= F for video")
        x = x.reshape(B, N, F * V, D)
        if self.media_time_embs is not None:
            if N > self.media_time_embs.shape[0]:
                raise ValueError(f"vision_x has N={N} media per row, more than max_num_media="
                                 f"{self.media_time_embs.shape[0]}")
            x = x + self.media_time_embs[:N]
        x = x.reshape(B * N, F * V, D)
        latents = self.latents.to(x.dtype).expand(B * N, -1, -1)
        layers, norm = (self.layers, self.norm) if self.style == "open_flamingo" else (self.blocks, self.layer_norm)
        for attn, ff in layers:
            if self._checkpoint():
                latents = self._checkpointed(_resampler_layer, attn, ff, x, latents)
            else:
                latents = _resampler_layer(attn, ff, x, latents)
        return norm(latents.reshape(B, N, -1, D))  # not a view of an inner tensor (FSDP2 warns of those)


# --------------------------------------------------------------------------------------------
# Gated cross-attention
# --------------------------------------------------------------------------------------------
@dataclass
class MediaState:
    """What the cross-attention blocks read during one LM call (set by the model, not a module).

    Attributes:
        visual: (B, N, L, D_vis) visual tokens, or None for text only (every token then has
            ``text_time == 0``: the attention contributes 0, the feed-forward still applies).
        text_time: (B, T) int32, the image each token of this call sees (0 = none).
        kv_cache: when not None, each block stores its projected visual K/V here on first use
            and reads it afterwards (generation and repeated scoring of the same images).
    """
    visual: torch.Tensor | None = None
    text_time: torch.Tensor | None = None
    kv_cache: dict | None = field(default=None)

    def copy(self) -> "MediaState":
        """This call's values, for a recompute in the backward (after the model's call has reset
        its own state)."""
        return MediaState(self.visual, self.text_time, self.kv_cache)

    def visual_kv(self, owner: nn.Module, project) -> tuple[torch.Tensor, torch.Tensor]:
        if self.kv_cache is None:
            return project(self.visual)
        kv = self.kv_cache.get(id(owner))
        if kv is None:
            kv = self.kv_cache[id(owner)] = project(self.visual)
        return kv


def _attend_to_media(attn: nn.Module, q: torch.Tensor, media: MediaState) -> torch.Tensor:
    """Image-causal attention of queries q (B, H, T, D) over the media's visual K/V (projected by
    ``attn.project_kv``, or read from the media's K/V cache) -> (B, T, H·D)."""
    k, v = media.visual_kv(attn, attn.project_kv)  # on the block's device (project_kv)
    out = ops.image_causal_attention(
        q, k, v, text_time=media.text_time.to(q.device), latents_per_media=media.visual.shape[2],
        only_immediate=attn.only_attend_immediate_media, scale=attn.scale,
        backend=attn.backend, validate=False)
    return _merge_heads(out)


class MaskedCrossAttention(nn.Module):
    """open_flamingo's image-causal cross-attention: LayerNorm, to_q, fused to_kv, to_out."""

    def __init__(self, *, dim: int, dim_visual: int, dim_head: int = 64, heads: int = 8,
                 only_attend_immediate_media: bool = True):
        super().__init__()
        self.scale = dim_head ** -0.5
        self.heads = heads
        inner = dim_head * heads
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim_visual, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)
        self.only_attend_immediate_media = only_attend_immediate_media
        self.backend = "auto"

    def project_kv(self, visual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, N, L, D_vis) -> k, v (B, H, N·L, dim_head), views of one projection, on the
        device of ``to_kv`` (the visual KV cache stays where its block computes)."""
        k, v = self.to_kv(to_execution_device(visual, self.to_kv).flatten(1, 2)).chunk(2, dim=-1)
        return _heads(k, self.heads), _heads(v, self.heads)

    def forward(self, x: torch.Tensor, media: MediaState) -> torch.Tensor:
        """x (B, T, D) -> (B, T, D); 0 for tokens that see no image."""
        q = _heads(self.to_q(self.norm(x)), self.heads)
        return self.to_out(_attend_to_media(self, q, media))


class GatedCrossAttentionBlock(Checkpointed):
    """open_flamingo's block: x + tanh(attn_gate)·XAttn(x) then x + tanh(ff_gate)·FF(x)."""

    def __init__(self, *, dim: int, dim_visual: int, config: CrossAttentionConfig,
                 only_attend_immediate_media: bool = True):
        super().__init__()
        c = config
        self.attn = MaskedCrossAttention(dim=dim, dim_visual=dim_visual, dim_head=c.dim_head, heads=c.heads,
                                         only_attend_immediate_media=only_attend_immediate_media)
        self.attn_gate = nn.Parameter(torch.tensor([0.0]))
        self.ff = FeedForward(dim, c.ff_mult)
        self.ff_gate = nn.Parameter(torch.tensor([0.0]))

    def forward(self, x: torch.Tensor, media: MediaState) -> torch.Tensor:
        if self._checkpoint():
            return self._checkpointed(self._forward, x, media.copy())
        return self._forward(x, media)

    def _forward(self, x: torch.Tensor, media: MediaState) -> torch.Tensor:
        if media.visual is not None:
            x = self.attn(x, media) * self.attn_gate.tanh() + x
        return self.ff(x) * self.ff_gate.tanh() + x


class IdeficsCrossAttention(nn.Module):
    """IDEFICS's cross-attention: separate q/k/v/o, optional RMSNorm on q and k per head."""

    def __init__(self, *, dim: int, dim_visual: int, heads: int, dim_head: int, qk_layer_norms: bool,
                 eps: float, only_attend_immediate_media: bool = True):
        super().__init__()
        self.heads, self.scale = heads, dim_head ** -0.5
        self.q_proj = nn.Linear(dim, heads * dim_head, bias=False)
        self.k_proj = nn.Linear(dim_visual, heads * dim_head, bias=False)
        self.v_proj = nn.Linear(dim_visual, heads * dim_head, bias=False)
        self.o_proj = nn.Linear(heads * dim_head, dim, bias=False)
        self.qk_layer_norms = qk_layer_norms
        if qk_layer_norms:
            self.q_layer_norm = RMSNorm(dim_head, eps)
            self.k_layer_norm = RMSNorm(dim_head, eps)
        self.only_attend_immediate_media = only_attend_immediate_media
        self.backend = "auto"

    def project_kv(self, visual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        visual = to_execution_device(visual, self.k_proj).flatten(1, 2)
        k = _heads(self.k_proj(visual), self.heads)
        if self.qk_layer_norms:
            k = self.k_layer_norm(k)
        return k, _heads(self.v_proj(visual), self.heads)

    def forward(self, x: torch.Tensor, media: MediaState) -> torch.Tensor:
        q = _heads(self.q_proj(x), self.heads)
        if self.qk_layer_norms:
            q = self.q_layer_norm(q)
        return self.o_proj(_attend_to_media(self, q, media))


class IdeficsGatedCrossAttentionBlock(Checkpointed):
    """IDEFICS's block: RMSNorm -> XAttn (0 for tokens with no image) -> tanh(alpha) gate, then
    RMSNorm -> SwiGLU -> tanh(alpha) gate. Alphas are scalars or vectors (alpha_type)."""

    def __init__(self, *, dim: int, dim_visual: int, config: CrossAttentionConfig, lm_heads: int,
                 lm_intermediate: int, only_attend_immediate_media: bool = True):
        super().__init__()
        c = config
        heads = c.heads or lm_heads
        if c.dim_head is None and dim % heads:  # (IDEFICS raises too: "must be divisible")
            whose = " (the LM's)" if c.heads is None else ""
            raise ValueError(f"cross_attention.heads={heads}{whose} does not divide the LM's width {dim}, and "
                             "cross_attention.dim_head=None takes width / heads: give a dim_head, or heads that "
                             "divide the width")
        dim_head = c.dim_head or dim // heads
        self.cross_attn = IdeficsCrossAttention(dim=dim, dim_visual=dim_visual, heads=heads, dim_head=dim_head,
                                                qk_layer_norms=c.qk_layer_norms, eps=c.rms_norm_eps,
                                                only_attend_immediate_media=only_attend_immediate_media)
        self.mlp = SwiGLU(dim, c.intermediate_size or lm_intermediate)
        self.input_layernorm = RMSNorm(dim, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(dim, c.rms_norm_eps)
        shape = (1, 1, dim) if c.alpha_type == "vector" else (1,)
        self.alpha_cross_attn = nn.Parameter(torch.zeros(shape))
        self.alpha_dense = nn.Parameter(torch.zeros(shape))

    def forward(self, x: torch.Tensor, media: MediaState) -> torch.Tensor:
        if self._checkpoint():
            return self._checkpointed(self._forward, x, media.copy())
        return self._forward(x, media)

    def _forward(self, x: torch.Tensor, media: MediaState) -> torch.Tensor:
        if media.visual is not None:
            x = x + torch.tanh(self.alpha_cross_attn) * self.cross_attn(self.input_layernorm(x), media)
        return x + torch.tanh(self.alpha_dense) * self.mlp(self.post_attention_layernorm(x))


CROSS_ATTENTION_BLOCKS = (GatedCrossAttentionBlock, IdeficsGatedCrossAttentionBlock)
ATTENTION_MODULES = (PerceiverAttention, IdeficsPerceiverAttention, MaskedCrossAttention, IdeficsCrossAttention)
