"""Scoring candidates after prompts (rank classification, as in few-shot ImageNet or Hateful
Memes evaluation): fastflamingo's :func:`~fastflamingo.generation.score` beside open_flamingo's
own model, same weights.

open_flamingo's evaluation (``get_rank_classifications``) scores class names one at a time. With
KV caching the prompt runs once and each candidate is one LM call of the batch over the prompt's
cached K/V; with ``--no_kv_caching`` each candidate re-runs the prompt, images included. Both are
timed here on open_flamingo's model, as its evaluation code calls it (``cache_media``, the prompt
with ``use_cache``, then each candidate; one change: transformers 5's caches grow in place, so the
cache is cropped back to the prompt after each candidate, where the eval code reused it). Beside them,
fastflamingo's ``score``: the prompt once, (prompt, candidate) pairs batched (up to 64) to an LM call,
every candidate's first token scored from the prompt's last logits.

Each provider's (B, C) log-likelihoods are checked before they are timed, against
:func:`~fastflamingo.generation.score.score_reference` (each pair alone through fastflamingo's
forward) in higher precision, by the flash-attention rule: an error at most twice that of the
same plain run in the working precision, plus one epsilon of it per unit of the scores' size.
"""
from __future__ import annotations

import copy
import dataclasses
import gc
from dataclasses import dataclass

import torch

from ..presets import preset_config
from .env import device_name, versions
from .harness import reference_dtype
from .rows import Row
from .rows import DTYPE_NAMES
from .timing import measure_together

KERNEL = "score"
PROVIDERS = ("fastflamingo", "open_flamingo cached prompt", "open_flamingo no cache")


@dataclass
class ScoreConfig:
    preset: str
    dtype: torch.dtype
    batch: int
    images: int
    prompt: int
    candidates: int
    reps: int


def default_config(preset: str, device: str, quick: bool) -> ScoreConfig:
    if torch.device(device).type == "cuda":
        return ScoreConfig(preset, torch.bfloat16, batch=4, images=4, prompt=256, candidates=64, reps=3)
    return ScoreConfig(preset, torch.float32, batch=2 if quick else 4, images=2 if quick else 4,
                       prompt=32 if quick else 128, candidates=16 if quick else 64, reps=3 if quick else 5)


def candidates(n: int, vocab: int, banned: set, seed: int = 2) -> list[list[int]]:
    """``n`` class names of 1-4 tokens (random ids, none of ``banned``)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, vocab, (int(torch.randint(1, 5, (1,), generator=g)),), generator=g)
        out.append([3 if int(t) in banned else int(t) for t in ids])
    return out


def open_flamingo_cached(live, vx, ids, mask, conts) -> torch.Tensor:
    """open_flamingo's evaluation with KV caching: the prompt once, then one LM call per candidate."""
    live.cache_media(input_ids=ids, vision_x=vx)
    try:
        # the prompt's <image> tokens condition its own tokens; the candidates (none) see the last image
        out = live(None, ids, attention_mask=mask, clear_conditioned_layers=False, use_cache=True)
        cache, first = out.past_key_values, out.logits[:, -1].float().log_softmax(-1)
        scores = []
        for cont in conts:
            toks = torch.tensor(cont, device=ids.device).expand(ids.shape[0], -1)
            o = live(None, toks, attention_mask=torch.cat([mask, torch.ones_like(toks)], 1),
                     clear_conditioned_layers=False, past_key_values=cache, use_cache=True)
            cache.crop(-toks.shape[1])  # back to the prompt (a negative count: transformers 5.2x)
            lp = torch.cat([first[:, None], o.logits[:, :-1].float().log_softmax(-1)], 1)
            scores.append(lp.gather(-1, toks[..., None])[..., 0].sum(-1))
        return torch.stack(scores, 1)
    finally:
        live.uncache_media()


def open_flamingo_no_cache(live, vx, ids, mask, conts) -> torch.Tensor:
    """open_flamingo's evaluation without KV caching: the prompt, images included, per candidate."""
    T, scores = ids.shape[1], []
    for cont in conts:
        toks = torch.tensor(cont, device=ids.device).expand(ids.shape[0], -1)
        logits = live(vx, torch.cat([ids, toks], 1), attention_mask=torch.cat([mask, torch.ones_like(toks)], 1)).logits
        lp = logits[:, T - 1:-1].float().log_softmax(-1)
        scores.append(lp.gather(-1, toks[..., None])[..., 0].sum(-1))
    return torch.stack(scores, 1)


NOT_TIMED = "n/a: passed its check; the run stopped before it was timed"


def run(cfg: ScoreConfig, device: str, progress: bool = True, on_rows=None) -> list[Row]:
    """The check, then the providers timed together; ``n/a`` rows for open_flamingo's providers
    where it is missing (fastflamingo then scores its own model in that shape,
    :func:`.peers.open_flamingo_shaped`), for all of them where the preset is not
    open_flamingo-style. ``on_rows(rows)`` after the check (the checked providers' rows
    ``NOT_TIMED``) and after the timing, to save partial results."""
    from ..convert.open_flamingo import from_open_flamingo
    from ..generation.score import score, score_reference
    from .e2e import make_inputs
    from .peers import open_flamingo_missing, open_flamingo_model, open_flamingo_shaped
    config = preset_config(cfg.preset)
    label = f"{cfg.preset} B={cfg.batch} N={cfg.images} T={cfg.prompt} C={cfg.candidates}"
    base = dict(kernel=KERNEL, mode=DTYPE_NAMES[cfg.dtype], metric="time_ms", x=label,
                device=device_name(device), versions=versions(), sweep="stage", x_value=cfg.candidates)
    if config.cross_attention.style != "open_flamingo":
        return [Row(provider=p, status=f"n/a: preset {cfg.preset} is not open_flamingo-style", **base)
                for p in PROVIDERS]
    missing = open_flamingo_missing()
    if missing:  # fastflamingo alone, in the shape it would have had; the peer's rows read n/a
        live, ours = None, open_flamingo_shaped(config, device, cfg.dtype)
    else:
        live = open_flamingo_model(config, device, cfg.dtype)
        ours = from_open_flamingo(live)
    specials = {config.media_token_id, config.eoc_token_id, config.pad_token_id or 0, config.eos_token_id or 0}
    vocab = config.num_base_tokens or ours.lang_encoder.get_input_embeddings().num_embeddings
    vx, ids, mask = make_inputs(cfg.batch, cfg.images, cfg.prompt, vocab=vocab, media_token_id=config.media_token_id,
                                image_size=config.vision.image_size, device=device, dtype=cfg.dtype,
                                specials=tuple(specials))
    conts = candidates(cfg.candidates, vocab, specials)
    calls = {PROVIDERS[0]: lambda: score(ours, vx, ids, conts, mask, progress=False)}
    if live is not None:
        calls |= {PROVIDERS[1]: lambda: open_flamingo_cached(live, vx, ids, mask, conts),
                  PROVIDERS[2]: lambda: open_flamingo_no_cache(live, vx, ids, mask, conts)}
    with torch.no_grad():
        ours.set_attention_backend("reference")
        try:
            plain = score_reference(ours, vx, ids, conts, mask).float()
            hi = reference_dtype(cfg.dtype)
            upcast = copy.deepcopy(ours).to(hi)
            exact = score_reference(upcast, vx.to(hi), ids, conts, mask).double()
            del upcast
        finally:
            ours.set_attention_backend("auto")
        gc.collect()
        eps = torch.finfo(cfg.dtype).eps
        bound = 2 * (plain.double() - exact).abs().max().item() + eps * exact.abs().max().item()
        rows, timed = [Row(provider=p, status=f"n/a: {missing}", **base) for p in PROVIDERS if p not in calls], {}
        for name, fn in calls.items():
            err = (fn().double() - exact).abs().max().item()
            note = f"max |error| {err:.2e} vs the plain {DTYPE_NAMES.get(hi, 'fp64')} run (bound {bound:.2e})"
            if err > bound:
                rows.append(Row(provider=name, status=f"FAILED: {note}", **base))
            else:
                timed[name] = Row(provider=name, note=note, **base)
        if on_rows is not None:
            on_rows(_in_order(rows + [dataclasses.replace(r, status=NOT_TIMED) for r in timed.values()]))
        timings = measure_together([(calls[name], cfg.reps) for name in timed], device)
    for (name, row), t in zip(timed.items(), timings):
        rows.append(row.with_timing(t))
    if on_rows is not None:
        on_rows(_in_order(rows))
    return _in_order(rows)


def _in_order(rows: list[Row]) -> list[Row]:
    return sorted(rows, key=lambda r: PROVIDERS.index(r.provider))
