"""Fast pure-PyTorch paths for the attention ops (the CPU backend).

Immediate mode is block-diagonal: every token sees exactly the L keys of one image, and the
tokens of one image are contiguous. Scoring each token against all N·L keys and masking (what
open_flamingo does) costs O(T·N·L·D); here the work is O(T·L·D), independent of the number of
images, in one of these ways:

* eager (the default): a row's tokens are cut into chunks spanning a few images
  (:func:`row_chunks`, :func:`max_span`); each chunk scores only the keys of its images with one
  fused SDPA call (no mask where the chunk is one image), the way the Triton kernel skips key
  blocks. The chunks are planned on the host from the runs of equal image index
  (:func:`row_runs`: O(images) Python work per row, not O(T)), which is free on the CPU. Where the
  keys of all images fit one chunk (N·L <= 128), one masked SDPA may serve the whole batch,
  where the cost model says so. The layers of one forward share the plan (or the mask).
* a decode step (T = 1), or rows whose tokens all see one image (scoring candidates after a
  prompt): each row's queries gather the L keys of its image, one SDPA for the batch.
* under torch.compile (no host reads allowed in a graph): each token gathers the L keys of its
  image, chunk by chunk, with static shapes.
"""
from __future__ import annotations

import functools

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..tensor_cache import SharedByTensors
from .dispatch import under_func_transform
from .reference import image_causal_mask

# tokens per chunk of the compiled gather path: bounds its gathered-key tensors
_CHUNK = 128
# The eager path's cost model (measured with torch 2.14 on a 2-core EPYC): one SDPA call of a chunk
# costs ~_CALL_NS of fixed overhead (dispatch, slicing, the mask), plus ~score_ns(H, D) per
# (token, key) pair it scores, plus per token as much as _TOKEN_KEYS more keys would (the fused
# kernel's per-query work); each row with chunks costs ~_ROW_NS more (its views, zeros and
# concatenation). It decides which runs of tokens share a call, and whether one masked call for
# the whole batch would cost less.
_CALL_NS = 20_000.0
_TOKEN_KEYS = 24
_ROW_NS = 35_000.0
# (tokens x keys) one masked chunk may score: bounds its mask and temporaries
_SCORES = 256 * 256
# keys one chunk of the eager path may score: at least two images' worth (L = 64), more for small
# images. Either way a token's work is bounded by max(2·L, _SPAN_KEYS)·D, whatever the number of
# images.
_SPAN_KEYS = 128


def max_span(latents_per_media: int) -> int:
    """How many images one chunk of the eager path may span."""
    return max(2, _SPAN_KEYS // latents_per_media)


def score_ns(heads: int, head_dim: int) -> float:
    """Estimated CPU time of scoring one (token, key) pair over all heads: q·k, exp, p·v."""
    return heads * (head_dim + 16) / 24


def row_runs(text_time: torch.Tensor) -> list[list[tuple[int, int, int]]]:
    """Per row of ``text_time`` (B, T), its maximal runs ``(t0, t1, image)`` of equal image index:
    O(number of runs) host work (at most 2·N + 1 per row), not O(T)."""
    B, T = text_time.shape
    change = torch.ones(B, T, dtype=torch.bool, device=text_time.device)
    change[:, 1:] = text_time[:, 1:] != text_time[:, :-1]
    rows, starts = change.nonzero(as_tuple=True)
    values = text_time[rows, starts]
    runs: list[list[tuple[int, int, int]]] = [[] for _ in range(B)]
    for b, t0, m in zip(rows.tolist(), starts.tolist(), values.tolist()):
        if runs[b]:
            p0, _, pm = runs[b][-1]
            runs[b][-1] = (p0, t0, pm)
        runs[b].append((t0, T, m))
    return runs


def row_chunks(runs: list[tuple[int, int, int]], latents_per_media: int, max_span: int,
               pair_ns: float = 1.0):
    """Cut one row's runs (:func:`row_runs`) into chunks ``(t0, t1, first_image, last_image,
    masked)``, one SDPA call each, for the eager path.

    A chunk covers consecutive tokens spanning at most ``max_span`` images (and, if masked, at
    most ``_SCORES`` token-key pairs), so scoring it against the keys of its images costs at most
    ``max_span`` x the O(len·L·D) a token needs: the total stays O(T·L·D) whatever the number of
    images. Within that, the next run joins the chunk where the extra pairs it adds to score
    (``pair_ns`` each) cost less than a call of its own (``_CALL_NS``). ``masked``: the chunk
    holds more than one image or tokens that see none (else every token sees every key: no
    mask). Tokens before any image (and IDEFICS's tokens after an EOS) get no chunk of their own.
    """
    L = latents_per_media
    chunks = []
    cur = None  # [t0, t1, first, last, has_zero]

    def close():
        t0, t1, first, last, zero = cur
        chunks.append((t0, t1, first, last, zero or last > first))

    for t0, t1, m in runs:
        if cur is not None:
            first, last = cur[2], max(cur[3], m)
            keys, n = (last - first + 1) * L, t1 - t0
            extra = (cur[1] - cur[0]) * (keys - (cur[3] - first + 1) * L) + n * keys  # pairs if merged
            alone = n * L if m > 0 else 0  # pairs if not (tokens with no image need no call)
            if (m == 0 or first <= m < first + max_span) and (cur[1] - cur[0] + n) * keys <= _SCORES \
                    and (extra - alone) * pair_ns <= (_CALL_NS if m > 0 else 0.0):
                cur[1], cur[3], cur[4] = t1, last, cur[4] or m == 0
                continue
            close()
            cur = None
        if m > 0:
            cur = [t0, t1, m, m, False]
    if cur is not None:
        close()
    return chunks


def _batch_mask(text_time, N, L, only_immediate):
    """(visible (B, 1, T, N·L) bool, has_media (B, 1, T, 1)) for one SDPA call over every key. A
    token with no visible key sees every key instead (a softmax over all -inf is nan); the caller
    zeroes its output with ``has_media``."""
    has_media = (text_time > 0)[:, None, :, None]
    return image_causal_mask(text_time, N, L, only_immediate=only_immediate)[:, None] | ~has_media, has_media


def _all_previous(q, k, v, text_time, latents_per_media, scale):
    """One SDPA over every key with the image-causal mask (all-previous mode)."""
    mask, has_media = _batch_mask(text_time, k.shape[-2] // latents_per_media, latents_per_media, False)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return out.masked_fill(~has_media, 0.0)


def _zeros(q, k, v):
    """Exact zeros like q, still connected to the inputs for autograd (zero gradients)."""
    return q.new_zeros(q.shape) + (q[..., :0].sum() + k[..., :0].sum() + v[..., :0].sum())


def _immediate_ranges(q, k, v, text_time, latents_per_media, scale):
    B, H, T, D = q.shape
    L = latents_per_media
    plan = _eager_plan(text_time, L, k.shape[2] // L, H, D)
    if plan is None:
        return _zeros(q, k, v)  # no token sees an image
    if isinstance(plan, _OneImagePerRow):  # each row's tokens all see one image (or none)
        return _one_image_per_row(q, k, v, plan.images, L, scale)
    if isinstance(plan, tuple):  # one masked call for the batch costs less
        mask, has_media = plan
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype), scale=scale)
        return out.masked_fill(~has_media, 0.0)
    key_image = torch.arange(k.shape[2], device=k.device) // L + 1
    rows = []
    # each chunk reads views of its row's q, k, v, and the row's output is the concatenation of
    # its pieces: backwards of one cat / split per row, where indexing or slicing per chunk (or
    # writing chunks into one zero tensor in place) would cost the backward a zero tensor or
    # copy of a whole input per chunk
    for b, (chunks, qb, kb, vb) in enumerate(zip(plan, q.unbind(0), k.unbind(0), v.unbind(0))):
        qs = _views(qb, [(t0, t1) for t0, t1, *_ in chunks])
        ks = _views(kb, [((first - 1) * L, last * L) for _, _, first, last, _ in chunks])
        vs = _views(vb, [((first - 1) * L, last * L) for _, _, first, last, _ in chunks])
        pieces, t = [], 0
        for (t0, t1, first, last, masked), qc, kc, vc in zip(chunks, qs, ks, vs):
            if t0 > t:  # tokens that see no image
                pieces.append(q.new_zeros(H, t0 - t, D))
            if masked:
                tt = text_time[b, t0:t1, None]
                none = tt == 0  # (chunk, 1): tokens with no image see every key, then get 0
                visible = (tt == key_image[None, (first - 1) * L:last * L]) | none
                o = torch.nn.functional.scaled_dot_product_attention(qc, kc, vc, attn_mask=visible, scale=scale)
                pieces.append(o.masked_fill(none, 0.0))
            else:  # one image, every token sees it
                pieces.append(torch.nn.functional.scaled_dot_product_attention(qc, kc, vc, scale=scale))
            t = t1
        if t < T:
            pieces.append(q.new_zeros(H, T - t, D))
        rows.append(torch.cat(pieces, dim=1) if len(pieces) > 1 else pieces[0])
    return torch.stack(rows)


# The layers of one model forward pass the same text_time: its plan is made once and shared
# (an in-place change of the tensor bumps its version, part of the key)
_PLAN = SharedByTensors()


def _eager_plan(text_time: torch.Tensor, L: int, N: int, H: int, D: int):
    """For the eager path: None where no token sees an image; :class:`_OneImagePerRow` where each
    row's tokens all see one image; (mask, has_media) where one masked call for the batch costs
    less than chunks; else each row's chunks (:func:`row_chunks`)."""
    if text_time.is_inference():  # no version counter: not shared
        return _make_plan(text_time, L, N, H, D)
    return _PLAN.get((L, N, H, D, text_time._version), (text_time,), lambda: _make_plan(text_time, L, N, H, D))


class _OneImagePerRow:
    """The plan where every row is one run (all its tokens see one image, or none: scoring
    candidates after a prompt, a batch whose rows each start with their one image): one gathered
    SDPA call for the batch, instead of one call per row."""

    def __init__(self, images: torch.Tensor):
        self.images = images


def _make_plan(text_time: torch.Tensor, L: int, N: int, H: int, D: int):
    runs = row_runs(text_time)
    if not any(m > 0 for row in runs for _, _, m in row):
        return None
    if all(len(row) == 1 for row in runs):
        return _OneImagePerRow(text_time[:, 0].clone())
    B, T = text_time.shape
    pair_ns = score_ns(H, D)
    plan = [row_chunks(row, L, max_span(L), pair_ns) for row in runs]
    chunked_ns = sum(_CALL_NS + (t1 - t0) * ((last - first + 1) * L + _TOKEN_KEYS) * pair_ns
                     for row in plan for t0, t1, first, last, _ in row) + _ROW_NS * sum(map(bool, plan))
    # one call over the whole batch parallelizes over torch's intra-op threads; a chunk's small
    # call measured no faster with 2 threads than with 1 (tiny geometry, 2-core EPYC)
    dense_pair_ns = pair_ns / max(1, torch.get_num_threads())
    if N * L <= _SPAN_KEYS and _CALL_NS + B * T * (N * L + _TOKEN_KEYS) * dense_pair_ns < chunked_ns:
        visible, has_media = _batch_mask(text_time, N, L, True)
        # additive: the CPU's SDPA takes it ~15% faster than a bool mask, which it converts
        return torch.zeros(visible.shape, device=visible.device).masked_fill_(~visible, float("-inf")), has_media
    return plan


def _views(x: torch.Tensor, ranges: list[tuple[int, int]]) -> list[torch.Tensor]:
    """``x[:, lo:hi]`` for each range, through one ``torch.split`` where the ranges are sorted and
    disjoint (always, for text_time from media_locations): its backward is one cat."""
    sizes, picks, pos = [], [], 0
    for lo, hi in ranges:
        if lo < pos:  # overlapping ranges (a hand-made text_time): plain slices
            return [x[:, lo:hi] for lo, hi in ranges]
        if lo > pos:
            sizes.append(lo - pos)
        picks.append(len(sizes))
        sizes.append(hi - lo)
        pos = hi
    if pos < x.shape[1]:
        sizes.append(x.shape[1] - pos)
    parts = torch.split(x, sizes, dim=1)
    return [parts[i] for i in picks]


def _one_image_per_row(q, k, v, image, latents_per_media, scale):
    """Every token of row b sees image ``image[b]`` (B,) (0: none): each row's queries read the L
    keys of that image, gathered, in one fused SDPA for the batch."""
    return _gathered(q, k, v, *_gather_index(image), latents_per_media, scale)


def _gather_index(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) image per row (0: none) -> (the image index each row gathers (B,), none (B, 1, 1, 1)):
    rows with no image read image 1 and are zeroed by ``none``."""
    return (image.long() - 1).clamp(min=0), (image == 0)[:, None, None, None]


def _gathered(q, k, v, idx, none, latents_per_media, scale):
    """Row b's queries over the L keys of image ``idx[b] + 1``, one SDPA; rows in ``none`` get 0."""
    B, H, _, D = q.shape
    L = latents_per_media
    N = k.shape[-2] // L
    rows = torch.arange(B, device=q.device)
    kg = k.reshape(B, H, N, L, D)[rows, :, idx]  # (B, H, L, D)
    vg = v.reshape(B, H, N, L, D)[rows, :, idx]
    out = torch.nn.functional.scaled_dot_product_attention(q, kg, vg, scale=scale)
    return out.masked_fill(none, 0.0)


# The cross-attention layers of one decode step share what they derive from its text_time
_DECODE_PLAN = SharedByTensors()


@functools.lru_cache(maxsize=16)
def _image_masks(N: int, L: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(N + 1, N·L) additive masks: row m keeps the keys of image m; row 0 (no image) keeps every
    key (a softmax over all -inf is nan; such rows are zeroed afterwards)."""
    key_image = torch.arange(N * L, device=device) // L + 1
    hidden = key_image[None, :] != torch.arange(N + 1, device=device)[:, None]
    hidden[0] = False
    return torch.zeros(hidden.shape, dtype=dtype, device=device).masked_fill_(hidden, float("-inf"))


def _decode_plan(text_time: torch.Tensor, L: int, N: int, dtype: torch.dtype):
    """For T = 1: (additive mask (B, 1, 1, N·L) over every key, none (B, 1, 1, 1)) where the keys
    of all images fit one call (N·L <= _SPAN_KEYS: a masked SDPA over them costs less than
    gathering the row's L keys), else :func:`_gather_index`. ``none``: the rows that see no image,
    whose output is 0."""
    image = text_time[:, 0]
    if N * L > _SPAN_KEYS:
        return _gather_index(image)
    mask = _image_masks(N, L, dtype, image.device).index_select(0, image)[:, None, None, :]
    return mask, (image == 0)[:, None, None, None]


def _immediate_one_token(q, k, v, text_time, latents_per_media, scale):
    """T = 1 (a decode step): no host read, one SDPA for the batch. Eagerly, the layers of a step
    share the mask (or gather index) derived from its text_time; traced, it is derived per layer."""
    if torch.compiler.is_compiling() or text_time.is_inference():  # (no version counter to key on)
        return _one_image_per_row(q, k, v, text_time[:, 0], latents_per_media, scale)
    L = latents_per_media
    N = k.shape[-2] // L
    select, none = _DECODE_PLAN.get((L, N, q.dtype, text_time._version), (text_time,),
                                    lambda: _decode_plan(text_time, L, N, q.dtype))
    if select.dim() == 1:
        return _gathered(q, k, v, select, none, L, scale)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=select, scale=scale)
    return out.masked_fill(none, 0.0)


def _immediate_gather(q, k, v, text_time, latents_per_media, scale):
    B, H, T, D = q.shape
    L = latents_per_media
    N = k.shape[-2] // L
    kb = k.reshape(B, H, N, L, D)
    vb = v.reshape(B, H, N, L, D)
    has_media = text_time > 0
    # tokens with no image read image 1's keys (any valid index) and are zeroed below
    idx = (text_time.long() - 1).clamp(min=0)
    outs = []
    for t0 in range(0, T, _CHUNK):
        t1 = min(t0 + _CHUNK, T)
        i = idx[:, None, t0:t1].expand(B, H, t1 - t0)
        kg = torch.gather(kb, 2, i[..., None, None].expand(B, H, t1 - t0, L, D))
        vg = torch.gather(vb, 2, i[..., None, None].expand(B, H, t1 - t0, L, D))
        s = torch.einsum("bhtd,bhtld->bhtl", q[:, :, t0:t1], kg) * scale
        p = torch.softmax(s, dim=-1)
        outs.append(torch.einsum("bhtl,bhtld->bhtd", p, vg))
    out = torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]
    return out.masked_fill(~has_media[:, None, :, None], 0.0)


def image_causal_attention_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 text_time: torch.Tensor, *, latents_per_media: int,
                                 only_immediate: bool = True,
                                 scale: float | None = None) -> torch.Tensor:
    """Same signature and result as :func:`~fastflamingo.ops.reference.image_causal_attention_reference`.

    Differentiable with autograd and torch.func (forward mode and higher orders too:
    :func:`_differentiable_sdpa`). fp16 / bf16 inputs are computed in fp32 and cast back.
    """
    dtype = q.dtype
    if dtype in (torch.float16, torch.bfloat16):
        q, k, v = q.float(), k.float(), v.float()
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if k.shape[-2] == 0:  # no images (the gather paths would index an empty image axis)
        fn = _no_images
    elif not only_immediate:
        fn = _all_previous
    elif q.shape[2] == 1:
        fn = _immediate_one_token  # decoding: no host read, one SDPA for the batch
    elif torch.compiler.is_compiling() or q.device.type != "cpu" or under_func_transform():
        fn = _immediate_gather  # no host reads: traceable, vmappable, and no device sync off the CPU
    else:
        fn = _immediate_ranges
    return _differentiable_sdpa(dtype, fn, q, k, v, text_time, latents_per_media, scale).to(dtype)


def _no_images(q, k, v, text_time, latents_per_media, scale):
    return _zeros(q, k, v)


def _differentiable_sdpa(dtype: torch.dtype, fn, *args):
    """``fn(*args)``, its SDPA calls on the math kernel under a torch.func transform or for fp64
    inputs (eager): the CPU flash kernel (and CUDA's fused ones) have no forward-mode derivative
    and a backward that cannot be differentiated again, so jacfwd, hessian, jacrev of jacrev and
    gradgradcheck need the math one; a double backward (create_graph=True) of other dtypes cannot
    be told apart at forward time, and keeps the fused kernel (see :mod:`.dispatch`)."""
    if not torch.compiler.is_compiling() and (dtype == torch.float64 or under_func_transform()):
        with sdpa_kernel(SDPBackend.MATH):
            return fn(*args)
    return fn(*args)


def perceiver_attention_torch(q, k_media, v_media, k_latents, v_latents, *, scale=None):
    """Same signature and result as :func:`~fastflamingo.ops.reference.perceiver_attention_reference`,
    through PyTorch's fused SDPA (its math kernel where :func:`_differentiable_sdpa` needs it)."""
    return _differentiable_sdpa(q.dtype, _perceiver_sdpa, q, k_media, v_media, k_latents, v_latents, scale)


def _perceiver_sdpa(q, k_media, v_media, k_latents, v_latents, scale):
    k = torch.cat([k_media, k_latents], dim=-2)
    v = torch.cat([v_media, v_latents], dim=-2)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)
