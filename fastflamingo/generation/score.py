"""Scoring: the log-likelihood of candidate continuations after each prompt (rank classification,
multiple choice, few-shot evaluation), on the caches generation uses.

Each prompt (and a shared few-shot :class:`~fastflamingo.generation.Prefix`, if given) runs once,
as :func:`~fastflamingo.generation.generate`'s prefill does: its LM KV and every cross-attention
layer's visual K/V are computed once. The candidates then run after it, teacher-forced, many
(prompt, candidate) pairs per LM call, each pair reading its prompt's cached K/V. The first token
of every candidate is scored from the prompt's last logits, so one-token candidates (class labels
of one token, "yes"/"no") cost no LM call beyond the prompt.

Candidate tokens see what a text token after the prompt sees: their row's last image (none after an
EOS under ``eos_resets_media``). A candidate cannot hold an ``<image>`` token (it has no pixels).
"""
from __future__ import annotations

import numbers

import torch
from tqdm.auto import tqdm

from ..checks import check_count
from . import lm_cache, media_cache
from .prefix import Prefix

REDUCTIONS = ("sum", "mean", "none")
CHUNK_BYTES = 2 << 30  # copies of prompt K/V one LM call may hold, when chunk_size is None
MAX_CHUNK = 64


def check_distinct(names: list[str], ids: list[list[int]], what: str, tokenizer=None) -> None:
    """Candidates with the same token ids score the same: a ranking cannot tell them apart (the
    first of them would always win). An error naming them (and, where they hold the tokenizer's
    unknown token, saying so: words it does not know)."""
    same: dict[tuple[int, ...], list[str]] = {}
    for name, t in zip(names, ids):
        same.setdefault(tuple(t), []).append(name)
    ties = [(group, list(t)) for t, group in same.items() if len(group) > 1]
    if ties:
        shown = "; ".join(f"{group} all tokenize to {t}" for group, t in ties[:5])
        unk = getattr(tokenizer, "unk_token_id", None)
        hint = (" (the tokenizer's unknown token: words it does not know)"
                if unk is not None and any(unk in t for _, t in ties) else "")
        raise ValueError(f"{what} must tokenize differently (a ranking cannot tell them apart, the first of them "
                         f"would always win): {shown}{hint}; use the tokenizer the model was trained with, or "
                         "other ones")


def _candidates(model, continuations) -> tuple[torch.Tensor, torch.Tensor]:
    """A list of token-id sequences -> right-padded ids (C, T_max) and lengths (C,), checked."""
    if isinstance(continuations, torch.Tensor) or not continuations:
        raise ValueError("continuations must be a non-empty list of token-id sequences (lists or 1-D tensors), "
                         f"got {type(continuations).__name__}"
                         f"{'' if isinstance(continuations, torch.Tensor) else ' of length 0'}")
    rows = []
    for i, c in enumerate(continuations):
        if isinstance(c, (str, bytes)) or isinstance(c, numbers.Number):
            raise ValueError(f"continuation {i} is {c!r}: continuations are a list of token-id sequences, e.g. "
                             "[[5, 6], [7]] (one continuation: [[5, 6, 7]]); tokenize texts first, "
                             "tokenizer(text, add_special_tokens=False)['input_ids']")
        t = c if isinstance(c, torch.Tensor) else torch.tensor(list(c))
        if t.dim() != 1 or t.numel() == 0:
            raise ValueError(f"continuation {i} must be a non-empty 1-D sequence of token ids, got shape {tuple(t.shape)}")
        if t.is_floating_point() or t.dtype == torch.bool:
            raise TypeError(f"continuation {i} must hold integer token ids, got {t.dtype}")
        rows.append(t.long().cpu())
    lengths = torch.tensor([len(r) for r in rows])
    ids = torch.zeros(len(rows), int(lengths.max()), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = r
    vocab, media = model.vocab_size, model.config.media_token_id
    for i, r in enumerate(rows):
        bad = r[(r < 0) | (r >= vocab)]
        if bad.numel():
            raise ValueError(f"continuation {i} holds token id {int(bad[0])} but the LM's input embedding has "
                             f"{vocab} rows (ids 0..{vocab - 1})")
        if bool((r == media).any()):
            raise ValueError(f"continuation {i} holds an <image> token (id {media}): a continuation is text only; "
                             "put images in the prompt")
    return ids, lengths


@torch.no_grad()
def score(model, vision_x: torch.Tensor | None, lang_x: torch.Tensor, continuations,
          attention_mask: torch.Tensor | None = None, *, visual_tokens: torch.Tensor | None = None,
          prefix: Prefix | None = None, reduction: str = "sum", chunk_size: int | None = None,
          progress: bool | None = None) -> torch.Tensor:
    """Log-probabilities of every continuation after every prompt.

    Args:
        model: a :class:`~fastflamingo.Flamingo`.
        vision_x: (B, N, F, C, H, W) the prompts' images (one per ``<image>`` token), or None.
        lang_x: (B, T) prompt token ids, left-padded (as for :func:`generate`).
        continuations: C token-id sequences (lists or 1-D tensors), scored after every prompt.
        attention_mask: (B, T) 1 = token, 0 = padding.
        visual_tokens: (B, N, L, D_vis) instead of ``vision_x``, when already encoded.
        prefix: shared few-shot demonstrations (:func:`encode_prefix`) before every prompt.
        reduction: ``"sum"`` (B, C) the log-likelihood of each continuation; ``"mean"`` (B, C)
            per token; ``"none"`` (B, C, T_max) per token, 0 past a continuation's end.
        chunk_size: (prompt, continuation) pairs per LM call. Each pair holds a copy of its
            prompt's LM K/V (and, where a chunk mixes prompts, of its visual K/V) while its chunk
            runs. None: as many as fit :data:`CHUNK_BYTES` of copies, at most 64 (a 7B LM's K/V
            of a 512-token prompt is 256 MiB a pair in 16 bits: 8 pairs a call).
        progress: a progress bar over the LM calls (tqdm); None: where there are more than 8 and
            stderr is a terminal.

    Returns:
        fp32 log-probabilities on ``lang_x``'s device.
    """
    from . import _start
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r} is not one of {REDUCTIONS}")
    check_count("chunk_size", chunk_size, 1, optional=True, note=" (or None: by memory)")
    cand, lengths = _candidates(model, continuations)
    session, last = _start(model, vision_x, lang_x, attention_mask, visual_tokens=visual_tokens, prefix=prefix,
                           max_new_tokens=1, cache="dynamic", compile=False, continuation=cand.shape[1])
    device = lang_x.device
    cand, lengths = cand.to(device), lengths.to(device)
    B, (C, T) = lang_x.shape[0], cand.shape
    out = torch.zeros(B, C, T, device=device)
    out[:, :, 0] = last.log_softmax(-1)[:, cand[:, 0]]  # the first token: from the prompt's last logits
    if T > 1:
        _score_rest(session, cand, out, chunk_size, progress)
    out = out * (torch.arange(T, device=device) < lengths[:, None])  # nothing past a continuation's end
    if reduction == "none":
        return out
    total = out.sum(-1)
    return total if reduction == "sum" else total / lengths


@torch.no_grad()
def score_reference(model, vision_x: torch.Tensor | None, lang_x: torch.Tensor, continuations,
                    attention_mask: torch.Tensor | None = None, *, visual_tokens: torch.Tensor | None = None,
                    prefix: Prefix | None = None, reduction: str = "sum") -> torch.Tensor:
    """:func:`score` the plain way: every (prompt, continuation) pair alone, the whole sequence
    (prefix, the prompt's tokens without its padding, continuation) through ``model.forward``, no
    cache of any kind and no padding."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r} is not one of {REDUCTIONS}")
    cand, lengths = _candidates(model, continuations)
    if prefix is not None:
        prefix.check(model)
    if media_cache.cached(model) is not None:
        raise ValueError("score_reference runs each (prompt, continuation) pair alone through forward, which cached "
                         "media (model.cache_media) would give the whole batch's images: call model.uncache_media() "
                         "and pass the images as vision_x (or visual_tokens)")
    mask = torch.ones_like(lang_x) if attention_mask is None else attention_mask
    visual = model.encode_vision(vision_x) if vision_x is not None else visual_tokens
    media = model.config.media_token_id
    B, (C, T) = lang_x.shape[0], cand.shape
    out = torch.zeros(B, C, T)
    for b in range(B):
        ids = lang_x[b:b + 1, mask[b] != 0]  # the row's tokens, its padding dropped
        n = int((ids == media).sum())  # this row's images (the batch pads to the most)
        row_visual = [v for v in (None if prefix is None else prefix.visual,
                                  visual[b:b + 1, :n] if visual is not None and n else None) if v is not None]
        row_visual = torch.cat(row_visual, dim=1) if row_visual else None
        if prefix is not None:
            ids = torch.cat([prefix.ids, ids], 1)
        if ids.shape[1] == 0:
            raise ValueError(f"row {b} of attention_mask is all padding: the row has no token to continue from")
        for c in range(C):
            cont = cand[c:c + 1, :int(lengths[c])].to(ids.device)
            full = torch.cat([ids, cont], 1)
            logits = model(lang_x=full, visual_tokens=row_visual).logits[0]
            at = ids.shape[1] - 1 + torch.arange(cont.shape[1], device=full.device)  # predicts cont[t]
            out[b, c, :cont.shape[1]] = logits[at].float().log_softmax(-1).gather(-1, cont[0, :, None])[:, 0].cpu()
    out = out.to(lang_x.device)
    if reduction == "none":
        return out
    return out.sum(-1) if reduction == "sum" else out.sum(-1) / lengths.to(out.device)


def _rows(t: torch.Tensor, segments: list[tuple[int, int]]) -> torch.Tensor:
    """Rows ``[b] * count`` for each (b, count) of ``segments``: a broadcast view (no copy) where
    they are one prompt's, else one copy."""
    parts = [t[b:b + 1].expand(n, *t.shape[1:]) for b, n in segments]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _chunks(B: int, C: int, size: int) -> list[tuple[int, int]]:
    """[start, stop) ranges of the B·C pairs (b-major), at most ``size`` each, that never split a
    prompt's candidates across chunks needlessly: whole prompts per chunk where C <= size (their
    K/V copied once per pair), else each prompt's candidates cut into chunks of its own (its K/V
    read through broadcast views)."""
    if C <= size:
        per = size // C
        return [(b * C, min(b + per, B) * C) for b in range(0, B, per)]
    return [(b * C + c, b * C + min(c + size, C)) for b in range(B) for c in range(0, C, size)]


def _auto_chunk(prompt_kv: list, visual_kv: dict) -> int:
    """Pairs per LM call that keep the per-pair copies (a prompt's LM K/V and visual K/V) within
    :data:`CHUNK_BYTES`."""
    tensors = [t for pair in prompt_kv for t in pair] + [t for pair in visual_kv.values() for t in pair]
    per_pair = sum(t[0].numel() * t.element_size() for t in tensors)
    return max(1, min(MAX_CHUNK, CHUNK_BYTES // max(per_pair, 1)))


def _score_rest(session, cand: torch.Tensor, out: torch.Tensor, chunk_size: int | None,
                progress: bool | None) -> None:
    """Tokens 1.. of every continuation, teacher-forced after each prompt's cached K/V, into out."""
    B, (C, T) = out.shape[0], cand.shape
    prompt_kv = lm_cache.layer_kv(session.cache)
    chunk_size = chunk_size or _auto_chunk(prompt_kv, session.kv)
    context = session.mask[:, :session.length]
    fed = cand[:, :-1]  # token t is predicted from the logits after token t - 1
    after = torch.arange(1, T, device=cand.device)
    chunks = _chunks(B, C, chunk_size)  # of the pairs (b, c) in b-major order
    show = progress if progress is not None else (None if len(chunks) > 8 else False)  # None: if a terminal
    for start, stop in tqdm(chunks, desc="score", unit="call", disable=None if show is None else not show):
        segments = [(b, min(stop, (b + 1) * C) - max(start, b * C)) for b in range(start // C, (stop - 1) // C + 1)]
        rows = torch.cat([torch.full((n,), b) for b, n in segments]).to(cand.device)
        cols = torch.arange(start, stop, device=cand.device) % C
        n, ids = stop - start, fed[cols]
        cache = lm_cache.dynamic_cache(session.lm)
        lm_cache.fill(cache, [(_rows(k, segments), _rows(v, segments)) for k, v in prompt_kv], n)
        mask = torch.cat([_rows(context, segments), context.new_ones(n, T - 1)], dim=1)
        kwargs = session.call.kwargs(cache, mask, _rows(session.pos, segments) + after)
        tt = _rows(session.after_tt, segments).expand(n, T - 1)
        if session.eos_reset is not None:  # tokens after an EOS of the continuation see no image
            eos = ids == session.eos_reset
            tt = tt.masked_fill((eos.cumsum(-1) - eos.long()) > 0, 0)
        visual = None if session.visual is None else _rows(session.visual, segments)
        kv = {key: tuple(_rows(t, segments) for t in pair) for key, pair in session.kv.items()}
        with session.model.conditioned(visual, tt.contiguous(), kv):
            logits = session.lm(input_ids=ids, **kwargs).logits.to(out.device)
        out[rows, cols, 1:] = logits.float().log_softmax(-1).gather(-1, cand[cols, 1:, None])[..., 0]
