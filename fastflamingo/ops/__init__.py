"""fastflamingo's attention ops: one public function per op, one signature for every backend.

* :func:`image_causal_attention` — masked text-to-visual cross-attention (Flamingo's XATTN).
* :func:`perceiver_attention` — the Perceiver resampler's latent attention.

Backends (``backend=``): ``"auto"`` (Triton on CUDA tensors; on the CPU the native kernel where
it is built, else the fast PyTorch path), ``"triton"``, ``"native"`` (the C++ CPU kernel of
``csrc/``, :mod:`fastflamingo.native`), ``"torch"`` (the fast
PyTorch path, :mod:`fastflamingo.ops.cpu`) and ``"reference"`` (the readable math,
:mod:`fastflamingo.ops.reference`).
"""
from __future__ import annotations

import math
import operator

import torch

from ..checks import is_int
from . import cpu, reference
from .reference import (image_causal_attention_reference, image_causal_mask,
                        perceiver_attention_reference, text_time_from_media_locations)

BACKENDS = ("auto", "triton", "native", "torch", "reference")

__all__ = ["image_causal_attention", "perceiver_attention", "text_time_from_media_locations",
           "image_causal_attention_reference", "perceiver_attention_reference",
           "image_causal_mask", "BACKENDS", "check_image_causal_inputs", "check_text_time", "check_text_time_dtype",
           "text_time_decreases", "assert_text_time_async", "perceiver_backend"]


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")


def _check_scale(name: str, scale: float | None) -> None:
    if scale is not None and not math.isfinite(scale):
        raise ValueError(f"{name}: scale={scale!r} must be a finite number (None: head_dim ** -0.5)")


def _autocast(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Under ``torch.autocast`` the attention runs as SDPA does there: its floating inputs in the
    autocast dtype (IDEFICS's q / k RMSNorms give float32 beside a bfloat16 v: Hugging Face's
    SDPA call takes them all in bfloat16)."""
    device = tensors[0].device.type
    if not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) if t.is_floating_point() else t for t in tensors)


def _check_attention_inputs(name: str, q: torch.Tensor, keys: dict[str, torch.Tensor]) -> None:
    qs, dtype, device = q.shape, q.dtype, q.device
    if len(qs) != 4:
        raise ValueError(f"{name}: q must be (B, H, T, D), got shape {tuple(qs)}")
    if qs[3] == 0:
        raise ValueError(f"{name}: q {tuple(qs)} has head_dim 0: each head needs at least one feature")
    if not dtype.is_floating_point:
        raise TypeError(f"{name}: q must be a floating-point tensor, got {dtype}")
    for kname, t in keys.items():  # one cheap test per tensor (a call's host time), then the error's
        ts = t.shape
        if (len(ts) == 4 and t.dtype == dtype and ts[0] == qs[0] and ts[1] == qs[1] and ts[3] == qs[3]
                and t.device == device):
            continue
        if t.dim() != 4:
            raise ValueError(f"{name}: {kname} must be (B, H, S, D), got shape {tuple(t.shape)}")
        if t.dtype != q.dtype:
            raise TypeError(f"{name}: {kname} has dtype {t.dtype} but q has {q.dtype}; cast them to one dtype")
        if t.device != q.device:
            raise ValueError(f"{name}: {kname} is on {t.device} but q is on {q.device}; move them to one device")
        if t.shape[0] != q.shape[0] or t.shape[1] != q.shape[1] or t.shape[3] != q.shape[3]:
            raise ValueError(f"{name}: {kname} shape {tuple(t.shape)} does not match q {tuple(q.shape)} "
                             "in batch, heads or head_dim")


def check_image_causal_inputs(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              latents_per_media: int) -> None:
    """Raise, naming ``name`` and the tensor, unless q (B, H, T, D) and k, v (B, H, N·L, D) agree
    in dtype, device, batch, heads and head size, k and v in shape, and the keys are whole images
    of L = ``latents_per_media`` tokens: the public function's checks, which the Triton kernels
    repeat for callers of the registered op (they would read past a short k or v)."""
    _check_attention_inputs(name, q, {"k": k, "v": v})
    if k.shape != v.shape:
        raise ValueError(f"{name}: k {tuple(k.shape)} and v {tuple(v.shape)} differ")
    if not is_int(latents_per_media):
        raise TypeError(f"{name}: latents_per_media={latents_per_media!r} must be an int (visual tokens per image), "
                        f"got {type(latents_per_media).__name__}")
    if latents_per_media <= 0 or k.shape[2] % latents_per_media:
        raise ValueError(f"{name}: the {k.shape[2]} keys are not a whole number of "
                         f"images of latents_per_media={latents_per_media} tokens")


def check_text_time_dtype(text_time: torch.Tensor, name: str = "") -> None:
    """``text_time`` holds integers (a float or bool one would be truncated to image indices)."""
    if text_time.is_floating_point() or text_time.is_complex() or text_time.dtype == torch.bool:
        raise TypeError(f"{name + ': ' if name else ''}text_time must hold integer image indices, got {text_time.dtype}")


def _goes_back(text_time: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: the tokens whose image comes before an image an earlier token saw (nonzero
    values only: 0, no image, may follow anything, as after IDEFICS's EOS reset)."""
    return (text_time != 0) & (text_time < text_time.cummax(-1).values)


def text_time_decreases(text_time: torch.Tensor) -> torch.Tensor:
    """(B, T) -> a 0-d count of the tokens of :func:`_goes_back` (0 for a ``text_time`` in order)."""
    return _goes_back(text_time).sum()


def check_text_time(text_time: torch.Tensor, num_media: int, bounds: tuple[int, ...] | None = None) -> None:
    """Raise if any token refers to an image beyond the ``num_media`` given, or if ``text_time``'s
    nonzero values decrease along T (a token sees the last image before it: no sequence of tokens
    gives a later token an earlier image). One host sync; none when the caller already read
    ``bounds`` = (text_time.max(), text_time.min()[, text_time_decreases(text_time)]); without the
    third, the order is not checked (``text_time`` derived from ``<image>`` tokens is in order)."""
    check_text_time_dtype(text_time)
    if text_time.numel() == 0:
        return
    if bounds is None:  # one sync for all three
        bounds = torch.stack((text_time.max(), text_time.min(), text_time_decreases(text_time))).tolist()
    worst, least, *decreasing = bounds
    if least < 0:  # first: a negative value also counts as going back
        row, col = (text_time < 0).nonzero()[0].tolist()
        raise ValueError(f"text_time must be >= 0 (0 = no image yet): row {row} has {int(text_time[row, col])} "
                         f"at token {col}")
    if decreasing and decreasing[0]:
        row, col = _goes_back(text_time).nonzero()[0].tolist()
        raise ValueError(f"text_time row {row} goes back to image {int(text_time[row, col])} at token {col}, after "
                         f"image {int(text_time[row, :col].max())}: a token sees the last image before it, so nonzero "
                         "text_time never decreases along a row (0, no image, may come anywhere)")
    if worst > num_media:
        row = int((text_time.max(dim=-1).values > num_media).nonzero()[0, 0])
        raise ValueError(
            f"row {row} of the batch has {int(text_time[row].max())} <image> tokens but only "
            f"{num_media} images were given (vision_x has N={num_media} media per row): pass one image "
            "per <image> token, padding rows with fewer images with zero images at the end")


def assert_text_time_async(text_time: torch.Tensor, num_media: int) -> None:
    """The checks of :func:`check_text_time` as device-side asserts (``torch._assert_async``), for
    torch.compile: no host sync, so a compiled graph holds them without a graph break (the
    Triton backward would otherwise silently give wrong dK/dV for a text_time going back). Their
    messages cannot name the row and token: the eager call does. On a GPU a failed device-side
    assert is fatal to the process's CUDA context, as an out-of-bounds index is."""
    torch._assert_async(text_time_decreases(text_time) == 0,
                        "image_causal_attention: text_time's nonzero values decrease along a row (a token goes back "
                        "to an earlier image); checked on the device under torch.compile: call eagerly for the row")
    torch._assert_async(~((text_time < 0) | (text_time > num_media)).any(),
                        "image_causal_attention: text_time refers to an image beyond the N images of k and v, or is "
                        "< 0; checked on the device under torch.compile: call eagerly for the row")


def image_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           media_locations: torch.Tensor | None = None, *,
                           latents_per_media: int, only_immediate: bool = True,
                           scale: float | None = None, text_time: torch.Tensor | None = None,
                           backend: str = "auto", validate: bool = True) -> torch.Tensor:
    """Image-causal cross-attention of text queries over the visual tokens of their images.

    Args:
        q: (B, H, T, D) text queries (any strides with a contiguous last dim).
        k, v: (B, H, N·L, D) keys / values of N images x L visual tokens, image-major.
        media_locations: (B, T) bool, True at ``<image>`` tokens. Token t sees image
            ``text_time[t] = cumsum(media_locations)[t]`` (immediate mode) or images
            ``1 .. text_time[t]`` (all-previous mode).
        latents_per_media: L, visual tokens per image.
        only_immediate: immediate (True, every released checkpoint) or all-previous mode.
        scale: softmax scale, default ``D ** -0.5``.
        text_time: (B, T) int, given instead of ``media_locations`` where the image index is not
            a plain cumsum (decoding after a prompt, IDEFICS's EOS reset). 0 = no image; the
            nonzero values never decrease along T.
        backend: one of :data:`BACKENDS`.
        validate: check that no token refers to an image beyond N and that ``text_time`` is in
            order: eagerly a host sync (:func:`check_text_time`), while torch.compile traces
            device-side asserts with no sync (:func:`assert_text_time_async`); the model
            validates once per forward and passes False.

    Returns:
        (B, H, T, D); tokens with ``text_time == 0`` get exactly 0 (and zero gradients). Under
        ``torch.autocast``, in its dtype (:func:`_autocast`).
    """
    _check_backend(backend)
    q, k, v = _autocast(q, k, v)
    check_image_causal_inputs("image_causal_attention", q, k, v, latents_per_media)
    if not isinstance(latents_per_media, int):  # a numpy int: every backend takes a Python int
        latents_per_media = operator.index(latents_per_media)
    if not isinstance(only_immediate, bool):  # (a string "False" would be truthy)
        raise TypeError(f"image_causal_attention: only_immediate={only_immediate!r} must be a bool")
    if (media_locations is None) == (text_time is None):
        raise ValueError("image_causal_attention: pass exactly one of media_locations and text_time")
    if text_time is None:
        if media_locations.dtype != torch.bool:
            raise TypeError(f"media_locations must be a bool tensor, got {media_locations.dtype}")
        text_time = text_time_from_media_locations(media_locations)
    if tuple(text_time.shape) != (q.shape[0], q.shape[2]):
        raise ValueError(f"media_locations/text_time shape {tuple(text_time.shape)} is not (B, T) = "
                         f"{(q.shape[0], q.shape[2])}")
    if text_time.device != q.device:
        raise ValueError(f"media_locations/text_time is on {text_time.device} but q is on {q.device}")
    check_text_time_dtype(text_time, "image_causal_attention")
    _check_scale("image_causal_attention", scale)
    if validate and torch.compiler.is_compiling():  # a graph cannot hold a host sync
        assert_text_time_async(text_time, k.shape[2] // latents_per_media)
    elif validate:
        check_text_time(text_time, k.shape[2] // latents_per_media)
    if backend == "reference":
        return image_causal_attention_reference(q, k, v, text_time, latents_per_media=latents_per_media,
                                                only_immediate=only_immediate, scale=scale)
    from .image_causal_op import image_causal_attention_op
    if text_time.dtype != torch.int32:  # past the last image, not wrapped: 2**32 + 2 read as image 2 (validate=False)
        text_time = text_time.clamp(max=k.shape[2] // latents_per_media + 1).to(torch.int32)
    return image_causal_attention_op(q, k, v, text_time, latents_per_media=latents_per_media,
                                     only_immediate=only_immediate, scale=scale, backend=backend)


def perceiver_attention(q: torch.Tensor, k_media: torch.Tensor, v_media: torch.Tensor,
                        k_latents: torch.Tensor, v_latents: torch.Tensor, *,
                        scale: float | None = None, backend: str = "auto") -> torch.Tensor:
    """Perceiver latent attention over [media tokens ; latents] with one softmax.

    Args:
        q: (B, H, L, D) latent queries (B = images x frames-batches).
        k_media, v_media: (B, H, V, D) media keys / values.
        k_latents, v_latents: (B, H, L, D) the latents' own keys / values.
        scale: default ``D ** -0.5``.
        backend: one of :data:`BACKENDS`.

    Returns:
        (B, H, L, D).
    """
    _check_backend(backend)
    q, k_media, v_media, k_latents, v_latents = _autocast(q, k_media, v_media, k_latents, v_latents)
    _check_attention_inputs("perceiver_attention", q, {"k_media": k_media, "v_media": v_media,
                                                       "k_latents": k_latents, "v_latents": v_latents})
    if k_media.shape != v_media.shape or k_latents.shape != v_latents.shape:
        raise ValueError(f"perceiver_attention: keys and values must have the same shapes, got k_media "
                         f"{tuple(k_media.shape)}, v_media {tuple(v_media.shape)}, k_latents "
                         f"{tuple(k_latents.shape)}, v_latents {tuple(v_latents.shape)}")
    _check_scale("perceiver_attention", scale)
    if k_latents.shape[2] != q.shape[2]:
        raise ValueError(f"perceiver_attention: k_latents has {k_latents.shape[2]} tokens, q has {q.shape[2]} latents")
    if backend == "reference":
        return perceiver_attention_reference(q, k_media, v_media, k_latents, v_latents, scale=scale)
    from .perceiver_op import perceiver_attention_op
    return perceiver_attention_op(q, k_media, v_media, k_latents, v_latents, scale=scale, backend=backend)


def perceiver_backend(q: torch.Tensor, backend: str = "auto", media_tokens: int | None = None) -> str:
    """The backend :func:`perceiver_attention` runs for latent queries ``q`` (B, H, L, D) over
    ``media_tokens`` media keys given ``backend``: "triton", "native", "torch" or "reference"
    ("auto" resolved; a forced "triton" or "native" the inputs cannot take raises here as it
    would there). "auto" on the CPU takes the native kernel in inference (no gradient flows to
    ``q``) for calls large enough to gain from it (``perceiver_op.NATIVE_MIN_WORK``);
    ``media_tokens`` None: the backend for large calls."""
    _check_backend(backend)
    if backend == "reference":
        return "reference"
    from .perceiver_op import runs_native, runs_triton
    if runs_native(q, media_tokens, backend):
        return "native"
    return "triton" if runs_triton(q, backend) else "torch"
