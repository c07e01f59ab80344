"""Fast generation for Flamingo models: :func:`generate`, :func:`stream`, :func:`encode_prefix`,
and :func:`score` (log-likelihoods of candidate continuations, on the same caches).

Hugging Face-style arguments (``max_new_tokens`` or ``max_length``, ``do_sample``, ``temperature``,
``top_k``, ``top_p``, ``min_p``, ``num_beams``, ``length_penalty``, ``repetition_penalty``,
``no_repeat_ngram_size``, ``bad_words_ids``, ``eos_token_id``, ...) and outputs (the prompt
followed by the new tokens, finished rows filled with ``pad_token_id``; with
``return_dict_in_generate``, Hugging Face's output classes with scores, logits and beam indices,
:mod:`.outputs`; a transformers ``streamer``), with:

* a visual KV cache: each cross-attention layer projects the visual tokens to K/V once;
* a static, preallocated LM KV cache where the LM family supports it, and a compiled decode
  step (``compile="auto"``: CUDA graphs on GPU; ``compile=True`` on the CPU too), else a dynamic cache;
* few-shot prefix reuse (``prefix=encode_prefix(...)``): shared demonstrations encoded once;
* logits for the prompt's last position only.

See :mod:`fastflamingo.generation.session` for the caches, :mod:`.search` for the token rules.
"""
from __future__ import annotations

import functools
import inspect
import itertools
import numbers
from collections.abc import Iterator

import torch

from .. import mpt
from ..checks import check_count
from ..model import check_call, check_positions, check_vision_x, check_visual_tokens
from ..warn import warn_caller
from . import lm_cache, media_cache
from .lm_cache import release_static_caches
from .outputs import Record, transition_scores
from .prefix import Prefix, encode_prefix
from .score import score, score_reference
from .search import Sampling, beam_search
from .session import CACHE_MODES, Session

__all__ = ["generate", "stream", "score", "score_reference", "encode_prefix", "Prefix", "Sampling", "CACHE_MODES", "release_static_caches",
           "transition_scores"]




def _stop_ids(model, eos_token_id) -> list[int]:
    """The stop tokens; by default those of the generate of the project the model's blocks come
    from, so that the same call gives the same tokens: open_flamingo's stops at
    ``<|endofchunk|>`` only (it hands transformers ``eos_token_id=eoc``, so the LM's EOS does not
    stop it), IDEFICS's at the LM's EOS."""
    if eos_token_id is None:
        c = model.config
        order = ((c.eoc_token_id, c.eos_token_id) if c.cross_attention.style == "open_flamingo"
                 else (c.eos_token_id, c.eoc_token_id))
        return [t for t in order if t is not None and t >= 0][:1]
    return _id_argument("eos_token_id", eos_token_id)


def _id_argument(name: str, value, one: bool = False) -> list[int]:
    """An argument of token ids as a list of ints: an int, a list or tuple of ints, or an
    integer tensor or numpy array (Hugging Face's generate takes them); anything else (a float,
    a bool) is an error naming it, not truncated. ``one``: the argument is one id (the list holds
    it alone). (The command line's ``cli.token_ids`` parses ids from text.)"""
    if hasattr(value, "dtype") and hasattr(value, "tolist"):  # a tensor, a numpy array or scalar
        if "int" not in str(value.dtype):
            raise TypeError(f"{name} must be integer token ids, got a {value.dtype} {type(value).__name__}")
        value = value.tolist()
    ids = [value] if isinstance(value, int) else list(value) if isinstance(value, (list, tuple)) and not one else None
    if ids is None or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise TypeError(f"{name} must be {'a token id (an int)' if one else 'an int or a list of ints'}, got {value!r}")
    return ids


def default_pad(model, stops: list[int]) -> int:
    """What fills finished rows by default, as the source project's generate fills them: IDEFICS's
    config ``pad_token_id``; open_flamingo leaves it to transformers, which takes the LM's
    ``generation_config.pad_token_id``, else the first stop token."""
    c = model.config
    pad = c.pad_token_id
    if c.cross_attention.style == "open_flamingo":
        pad = getattr(getattr(model.lang_encoder, "generation_config", None), "pad_token_id", None)
    if pad is None:
        pad = stops[0] if stops else (c.pad_token_id if c.pad_token_id is not None else 0)
    return pad


def _start(model, vision_x, lang_x, attention_mask, *, visual_tokens, prefix, max_new_tokens, cache,
           compile, repeat: int = 1, continuation: int | None = None) -> tuple[Session, torch.Tensor]:
    """Check the inputs, build the session, prefill; returns (session, last logits (B·repeat, V)).
    ``continuation``: scoring's longest continuation, fed after the prompt instead of new tokens."""
    _check_lang_x(lang_x)
    check_count("max_new_tokens", max_new_tokens, 1)
    if vision_x is not None and visual_tokens is not None:
        raise ValueError("pass vision_x or visual_tokens, not both")
    if prefix is not None:
        prefix.check(model)
    mask, most = _prompt_mask(lang_x, attention_mask, prefix is not None)
    _check_room(model, mask, most, prefix, max_new_tokens, continuation)
    sees_media = None
    with torch.no_grad():
        if vision_x is not None:
            check_vision_x(vision_x, batch=lang_x.shape[0])
            visual_tokens = model.encode_vision(vision_x)
        elif visual_tokens is not None:  # as forward takes them: checked, in the blocks' dtype
            check_visual_tokens(visual_tokens, model.config, batch=lang_x.shape[0])
            visual_tokens = visual_tokens.to(model.blocks_dtype)
        elif (cached := media_cache.cached(model)) is not None:
            visual_tokens, sees_media = _cached_media(model, cached, lang_x, mask, prefix)
    n_images = 0 if visual_tokens is None else visual_tokens.shape[1]
    # the prompt's own images, counted from 1 (the prefix's, if any, come before them)
    # (a prompt that sees cached media without <image> tokens refers to no image by its tokens)
    check_call(lang_x, model.text_time(lang_x.masked_fill(mask == 0, -1)), n_images, model.vocab_size,
               derived=sees_media is None)
    if repeat > 1:
        lang_x, mask = lang_x.repeat_interleave(repeat, 0), mask.repeat_interleave(repeat, 0)
        visual_tokens = None if visual_tokens is None else visual_tokens.repeat_interleave(repeat, 0)
        sees_media = None if sees_media is None else sees_media.repeat_interleave(repeat, 0)
    session = Session(model, lang_x, mask, visual_tokens, prefix=prefix, max_new_tokens=max_new_tokens,
                      cache=cache, compile=compile, sees_media=sees_media)
    return session, session.prefill()


def _cached_media(model, cached: media_cache.CachedMedia, lang_x, mask,
                  prefix: Prefix | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A call given no images, after ``model.cache_media`` (``cached``): (the cached visual tokens,
    None) where every row's ``<image>`` tokens place them, as a forward does; else (the visual
    tokens, (B, 1): -1 for a row whose ``<image>`` tokens say, its image count for a row without
    any, whose tokens all see its last cached image: :func:`media_cache.rows_seeing_last_image`)."""
    if cached.visual.shape[0] != lang_x.shape[0]:
        raise ValueError(f"the media cached by cache_media has batch {cached.visual.shape[0]} but lang_x has batch "
                         f"{lang_x.shape[0]}: pass vision_x, or cache_media again for these rows")
    sees = media_cache.rows_seeing_last_image((lang_x == model.config.media_token_id) & (mask != 0),
                                              cached.num_media)
    if bool((sees < 0).all()):
        return cached.visual, None
    if prefix is not None:
        raise ValueError("a prompt without <image> tokens after a few-shot prefix, with media cached by cache_media: "
                         "which image its tokens see is ambiguous. Put the <image> tokens in the prompt, pass "
                         "vision_x, or call model.uncache_media()")
    return cached.visual, sees


def _prompt_mask(lang_x: torch.Tensor, attention_mask: torch.Tensor | None, prefixed: bool) -> tuple[torch.Tensor, int]:
    """((B, T) long, 1 = token, 0 = left padding; the most tokens a row holds): ``attention_mask``
    checked (positions are its running sum, so a value other than 0 / 1 would shift them) and
    converted, with one read of the device for every check."""
    if attention_mask is None:
        return torch.ones_like(lang_x), lang_x.shape[1]
    if tuple(attention_mask.shape) != tuple(lang_x.shape):
        raise ValueError(f"attention_mask {tuple(attention_mask.shape)} does not match lang_x {tuple(lang_x.shape)}")
    given = attention_mask.to(lang_x.device)
    mask = given.long()
    tokens = mask.sum(-1)
    bad = (given != 0) & (given != 1)  # (all False for a bool mask)
    odd, right_padded, empty, most = torch.stack([
        bad.sum(), (mask[:, 1:] < mask[:, :-1]).sum(), (tokens == 0).sum(), tokens.max()]).tolist()
    if odd:
        raise ValueError(f"attention_mask holds {given[bad][0].item()!r} (row {int(bad.nonzero()[0, 0])}): "
                         "it must hold 1 for tokens and 0 for padding")
    if right_padded:
        raise ValueError("attention_mask has padding after tokens: generation needs left padding "
                         "(tokenizer.padding_side = 'left')")
    if empty and not prefixed:
        raise ValueError(f"row {int((tokens == 0).nonzero()[0, 0])} of attention_mask is all padding: the row has "
                         "no token to continue from. Give every row at least one token (or drop the row)")
    return mask, most


def _check_room(model, mask: torch.Tensor, most: int, prefix: Prefix | None, max_new_tokens: int,
                continuation: int | None) -> None:
    """The prompt and what follows it fit the LM's positions (:func:`fastflamingo.model.check_positions`).
    Each row counts its own tokens, from 0 after the prefix's (left padding takes none: LMs given
    position ids count them from the mask, and fastflamingo's MPT attention counts tokens,
    :mod:`fastflamingo.mpt`); Hugging Face's own MPT attention counts the padded length. The last
    new token is never fed."""
    lm = model.lang_encoder
    P = 0 if prefix is None else prefix.length
    own = most if lm_cache.LMCall(lm).positions or mpt.is_prepared(lm) else mask.shape[1]
    room = max_new_tokens if continuation is None else continuation
    after = f"max_new_tokens={room}" if continuation is None else f"continuations of up to {room} tokens"
    check_positions(lm, P + own + room - 1, f"{own} prompt tokens{f' after a {P}-token prefix' if P else ''} and "
                    f"{after}, the last of which is not fed back")


def _sampling(model, *, beams: bool, eos_token_id, pad_token_id, do_sample, temperature, top_k, top_p, min_p,
              min_new_tokens, suppress_tokens, generator, repetition_penalty, no_repeat_ngram_size,
              bad_words_ids) -> tuple[Sampling, int]:
    stops = _stop_ids(model, eos_token_id)
    if pad_token_id is not None:
        [pad_token_id] = _id_argument("pad_token_id", pad_token_id, one=True)
    pad = default_pad(model, stops) if pad_token_id is None else pad_token_id
    # as Hugging Face: beam sampling's top-k / top-p keep a token more than there are stop tokens
    # (2 without any), so that a beam can go on past them
    keep = (len(stops) + 1 if stops else 2) if beams else 1
    sampling = Sampling(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                        min_tokens_to_keep=keep, min_new_tokens=min_new_tokens, eos_token_id=stops,
                        suppress_tokens=[] if suppress_tokens is None else _id_argument("suppress_tokens",
                                                                                        suppress_tokens),
                        generator=generator,
                        repetition_penalty=repetition_penalty, no_repeat_ngram_size=no_repeat_ngram_size,
                        bad_words_ids=[] if bad_words_ids is None else bad_words_ids)
    outside = [t for t in stops if not 0 <= t < model.vocab_size]
    if outside:
        raise ValueError(f"eos_token_id holds {outside[0]}, not a token id of this LM (0..{model.vocab_size - 1}): a "
                         "stop token it cannot generate would never stop it")
    if not 0 <= pad < model.vocab_size:
        raise ValueError(f"pad_token_id={pad} is not a token id of this LM (0..{model.vocab_size - 1}): finished "
                         "rows are fed it, as in Hugging Face's generate")
    if not do_sample:
        _unused_flags("do_sample", False, "sample-based", temperature=(temperature, 1.0), top_p=(top_p, 1.0),
                      min_p=(min_p, None), top_k=(top_k, 50))
    for name, ids in (("suppress_tokens", sampling.suppress_tokens),
                      ("bad_words_ids", [t for w in sampling.bad_words_ids for t in w])):
        outside = [t for t in ids if not 0 <= t < model.vocab_size]
        if outside:  # (a negative id would count from the end: -1 is the last token)
            raise ValueError(f"{name} holds token id {outside[0]} but the LM has {model.vocab_size} tokens "
                             f"(ids 0..{model.vocab_size - 1})")
    return sampling, pad


def _unused_flags(mode_flag: str, mode_value, modes: str, **flags) -> None:
    """Warn, in Hugging Face's words, about flags set away from their default (``name=(value,
    default)``) that the chosen mode ignores."""
    for name, (value, default) in flags.items():
        if value is not None and value != default:  # (None: unset, as in Hugging Face's GenerationConfig)
            warn_caller(f"`{mode_flag}` is set to `{mode_value}`. However, `{name}` is set to `{value}` -- this "
                        f"flag is only used in {modes} generation modes. You should set "
                        f"{'`do_sample=True`' if mode_flag == 'do_sample' else '`num_beams>1`'} or unset `{name}`.")


def _lengths(prompt_length: int, max_new_tokens, max_length, min_new_tokens, min_length) -> tuple[int, int]:
    """(max_new_tokens, min_new_tokens) from either those or Hugging Face's total lengths
    ``max_length`` / ``min_length`` (prefix and prompt, padding included, plus new tokens)."""
    if max_new_tokens is not None and max_length is not None:
        raise ValueError(f"pass max_new_tokens ({max_new_tokens}) or max_length ({max_length}), not both")
    check_count("min_new_tokens", min_new_tokens, 0)
    check_count("max_length", max_length, 1, optional=True)
    check_count("min_length", min_length, 0, optional=True)
    if min_new_tokens and min_length is not None:
        raise ValueError(f"pass min_new_tokens ({min_new_tokens}) or min_length ({min_length}), not both")
    if max_length is not None:
        max_new_tokens = max_length - prompt_length
        if max_new_tokens < 1:
            raise ValueError(f"max_length={max_length} leaves no room for a new token after the "
                             f"{prompt_length} tokens of the prompt (prefix and padding included)")
    if min_length is not None:
        min_new_tokens = max(0, min_length - prompt_length)
    max_new_tokens = 20 if max_new_tokens is None else max_new_tokens
    if min_new_tokens > max_new_tokens:  # as Hugging Face's "Unfeasible length constraints"
        warn_caller(f"min_new_tokens={min_new_tokens} is more than max_new_tokens={max_new_tokens}: generation stops "
                    "at max_new_tokens. Decrease the minimum length and/or increase the maximum length.")
    return max_new_tokens, min_new_tokens


def stream(model, vision_x: torch.Tensor | None, lang_x: torch.Tensor, attention_mask: torch.Tensor | None = None,
           *, max_new_tokens: int | None = None, min_new_tokens: int = 0, do_sample: bool = False,
           temperature: float = 1.0, top_k: int | None = 50, top_p: float = 1.0, min_p: float | None = None,
           eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
           suppress_tokens: list[int] | None = None, generator: torch.Generator | None = None,
           repetition_penalty: float = 1.0, no_repeat_ngram_size: int = 0,
           bad_words_ids: list[list[int]] | None = None, max_length: int | None = None,
           min_length: int | None = None, visual_tokens: torch.Tensor | None = None,
           prefix: Prefix | None = None, cache: str = "auto", compile: bool | str = "auto") -> Iterator[torch.Tensor]:
    """Greedy or sampled decoding, one (B,) tensor of new tokens per step (finished rows get
    ``pad_token_id``) until every row has stopped or ``max_new_tokens`` steps.

    Args:
        vision_x: (B, N, F, C, H, W) one image per ``<image>`` token (rows with fewer images padded
            at the end), or None (text only, or images given as ``visual_tokens`` or in ``prefix``).
        lang_x: (B, T) token ids, left-padded.
        attention_mask: (B, T) 1 = token, 0 = padding.
        eos_token_id: stop ids; by default those of the source project's ``generate``:
            ``<|endofchunk|>`` for open_flamingo-style models (not the LM's EOS, as open_flamingo),
            the LM's EOS for IDEFICS-style ones.
        pad_token_id: fills finished rows; by default as the source project's ``generate``
            (:func:`default_pad`).
        max_new_tokens: new tokens at most (default 20), or ``max_length``: the whole sequence's
            length at most (prefix and prompt, padding included, plus new tokens), not both.
        min_new_tokens / min_length: stop tokens are banned before that many new tokens / that
            total length.
        do_sample, temperature, top_k, top_p, min_p: sampling, with Hugging Face's defaults
            (top_k=50: the 50 most likely tokens; 0 or None: all) and order (temperature, then
            top-k, top-p, min-p: tokens less likely than min_p times the most likely one dropped).
        suppress_tokens: ids never generated.
        repetition_penalty: > 1 lowers the score of every token already in the sequence (prompt
            included), as Hugging Face: positive scores divided by it, negative ones multiplied.
        no_repeat_ngram_size: n > 0: no n-gram occurs twice in the sequence (prompt included).
        bad_words_ids: token sequences never generated (a one-token sequence: that token).
        visual_tokens: (B, N, L, D_vis) already encoded images instead of ``vision_x``.
        prefix: shared few-shot demonstrations from :func:`encode_prefix`, before every row.
        cache: ``"auto"`` | ``"static"`` | ``"dynamic"`` LM KV cache.
        compile: compile the decode step (static cache; the first call of a shape pays the
            compilation): True, False, or ``"auto"`` (on CUDA with the static cache, not on the CPU).
        Other arguments: as Hugging Face's ``generate``.
    """
    yield from _stream(model, vision_x, lang_x, attention_mask, repeat=1, max_new_tokens=max_new_tokens,
                       min_new_tokens=min_new_tokens, max_length=max_length, min_length=min_length,
                       visual_tokens=visual_tokens, prefix=prefix, cache=cache, compile=compile,
                       eos_token_id=eos_token_id, pad_token_id=pad_token_id, do_sample=do_sample,
                       temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                       suppress_tokens=suppress_tokens, generator=generator,
                       repetition_penalty=repetition_penalty, no_repeat_ngram_size=no_repeat_ngram_size,
                       bad_words_ids=bad_words_ids)


def _rules(model, lang_x, attention_mask, prefix, repeat: int, *, beams: bool, max_new_tokens, max_length,
           min_new_tokens, min_length, **choose) -> tuple[torch.Tensor, torch.Tensor | None, int, Sampling, int]:
    """What both decoders settle before the prompt runs: (the token ids before the new ones, each
    row repeated ``repeat`` times; where among them the padding is (None: nowhere); the number of
    new tokens; the token rules; the fill)."""
    prompt, padding = _prompt_as_written(lang_x, attention_mask, prefix)
    prompt = prompt.repeat_interleave(repeat, 0)
    padding = None if padding is None else padding.repeat_interleave(repeat, 0)
    max_new_tokens, min_new_tokens = _lengths(prompt.shape[1], max_new_tokens, max_length, min_new_tokens, min_length)
    return (prompt, padding, max_new_tokens) + _sampling(model, beams=beams, min_new_tokens=min_new_tokens, **choose)


def _stream(model, vision_x, lang_x, attention_mask, *, repeat: int, max_new_tokens, min_new_tokens, max_length,
            min_length, visual_tokens, prefix, cache, compile, record: Record | None = None,
            **choose) -> Iterator[torch.Tensor]:
    """:func:`stream` over each row repeated ``repeat`` times (adjacent), its images encoded once;
    ``record`` collects each step's logits and scores."""
    prompt, padding, max_new_tokens, sampling, pad = _rules(
        model, lang_x, attention_mask, prefix, repeat, beams=False, max_new_tokens=max_new_tokens,
        max_length=max_length, min_new_tokens=min_new_tokens, min_length=min_length, **choose)
    session, logits = _start(model, vision_x, lang_x, attention_mask, visual_tokens=visual_tokens, prefix=prefix,
                             max_new_tokens=max_new_tokens, cache=cache, compile=compile, repeat=repeat)
    stop_ids = torch.tensor(sampling.eos_token_id, device=lang_x.device, dtype=torch.long)
    running = torch.ones(prompt.shape[0], dtype=torch.bool, device=lang_x.device)
    # the sequence so far, as Hugging Face's input_ids (finished rows continue with padding)
    history = torch.cat([prompt, prompt.new_zeros(prompt.shape[0], max_new_tokens)], 1) if sampling.needs_history else None
    L = prompt.shape[1]
    for i in range(max_new_tokens):
        if i:
            logits = session.step(tokens)
        seen = None if history is None else history[:, :L + i]
        scores = sampling.process(logits, i, seen, padding)
        if record is not None:
            record.step(logits, scores)
        tokens = torch.where(running, sampling.pick(scores), pad)
        if history is not None:
            history[:, L + i] = tokens
        yield tokens
        # a row can stop only on a stop token, which min_new_tokens bans before step min_new_tokens:
        # until then no check, whose host sync would drain the GPU's queue at every step
        if stop_ids.numel() and i >= sampling.min_new_tokens:
            running &= ~torch.isin(tokens, stop_ids)
            if not bool(running.any()):
                return


def _check_lang_x(lang_x: torch.Tensor | None) -> None:
    if lang_x is None or lang_x.dim() != 2:
        raise ValueError(f"lang_x must be (B, T) token ids, got {None if lang_x is None else tuple(lang_x.shape)}")


def _prompt_as_written(lang_x: torch.Tensor | None, attention_mask: torch.Tensor | None,
                       prefix: Prefix | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The token ids before the new ones as the rules that read the sequence see them (Hugging
    Face's ``input_ids``), and where the padding is among them (None: nowhere): ``lang_x`` (B, T),
    after the prefix's ids when one is given, each row's left padding first, as in the same prompt
    written out whole (so an n-gram or bad word never spans the prefix and the padding)."""
    _check_lang_x(lang_x)
    padding = None if attention_mask is None else attention_mask.to(lang_x.device) == 0
    if prefix is None:
        return lang_x, padding
    (B, T), demo = lang_x.shape, prefix.ids.to(lang_x.device)
    P = demo.shape[1]
    if padding is None:
        return torch.cat([demo.expand(B, -1), lang_x], 1), None
    pads = padding.sum(-1, keepdim=True)  # each row's left padding (the mask is checked to be left-padded)
    j = torch.arange(P + T, device=lang_x.device)[None, :]
    query = lang_x.gather(1, torch.where(j < pads, j, j - P).clamp(0, T - 1).expand(B, -1))
    ids = torch.where((j >= pads) & (j < pads + P), demo[0][(j - pads).clamp(0, P - 1)], query)
    return ids, j < pads


@torch.no_grad()
def generate(model, vision_x: torch.Tensor | None, lang_x: torch.Tensor, attention_mask: torch.Tensor | None = None,
             *, max_new_tokens: int | None = None, num_beams: int = 1, length_penalty: float = 1.0,
             early_stopping: bool | str = False, min_new_tokens: int = 0, do_sample: bool = False,
             temperature: float = 1.0, top_k: int | None = 50, top_p: float = 1.0, min_p: float | None = None,
             eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
             suppress_tokens: list[int] | None = None, generator: torch.Generator | None = None,
             repetition_penalty: float = 1.0, no_repeat_ngram_size: int = 0,
             bad_words_ids: list[list[int]] | None = None, max_length: int | None = None,
             min_length: int | None = None, num_return_sequences: int = 1,
             visual_tokens: torch.Tensor | None = None, prefix: Prefix | None = None, cache: str = "auto",
             compile: bool | str = "auto", return_dict_in_generate: bool = False, output_scores: bool = False,
             output_logits: bool = False, streamer=None, use_cache: bool = True):
    """Generate text after images and a prompt; returns (B·R, T + G): ``lang_x`` then the new
    tokens, R = ``num_return_sequences`` rows per prompt (adjacent).

    Takes :func:`stream`'s arguments, plus beam search: ``num_beams`` > 1, ``length_penalty``,
    ``early_stopping`` (False, True or "never", as Hugging Face); with ``do_sample`` the beams
    are sampled, as Hugging Face does. ``num_return_sequences``: the R best finished beams of
    each prompt (R <= ``num_beams``), or R samples of each (``do_sample``, the images encoded
    once).

    As Hugging Face's ``generate`` also: ``return_dict_in_generate=True`` returns its output class
    instead, with ``output_scores`` / ``output_logits`` each step's processed scores / raw logits,
    and for beam search ``sequences_scores`` and ``beam_indices``
    (:mod:`fastflamingo.generation.outputs`; :func:`transition_scores` reads them); ``streamer``
    (a transformers ``TextStreamer``, ``TextIteratorStreamer``, ...) is given the prompt rows,
    then each step's new tokens, then ``end()``, as there. ``use_cache`` must stay True: the caches
    are always used (they give a plain no-cache loop's tokens: tests/test_generation.py).
    """
    if use_cache is not True:
        raise ValueError(f"use_cache={use_cache!r}: fastflamingo's generate always decodes with its visual and LM "
                         "K/V caches (it gives the tokens of a loop without a cache); leave use_cache out, or pass "
                         "cache='dynamic' for a cache that grows step by step")
    if (output_scores or output_logits) and not return_dict_in_generate:
        warn_caller("output_scores / output_logits are only returned with return_dict_in_generate=True: the "
                    "tokens alone are returned (as Hugging Face's generate)")
    record = Record(output_scores, output_logits) if return_dict_in_generate else None
    check_count("num_beams", num_beams, 1)
    if isinstance(length_penalty, bool) or not isinstance(length_penalty, numbers.Real):
        raise ValueError(f"length_penalty must be a number (1.0: none), got {length_penalty!r}")
    if early_stopping not in (True, False, "never"):  # (1 and 0 are True and False, as in Hugging Face's check)
        raise ValueError(f"early_stopping must be a boolean or 'never', but is {early_stopping!r}")
    R = num_return_sequences
    if isinstance(R, bool) or not isinstance(R, int) or R < 1:
        raise ValueError(f"num_return_sequences must be an int >= 1, got {R!r}")
    if num_beams == 1 and R > 1 and not do_sample:
        raise ValueError(f"num_return_sequences={R} with greedy decoding would return one sequence {R} times: "
                         "pass do_sample=True, or num_beams >= num_return_sequences")
    if R > num_beams > 1:
        raise ValueError(f"num_return_sequences={R} is more than num_beams={num_beams}: beam search keeps "
                         f"{num_beams} hypotheses per prompt")
    choose = dict(eos_token_id=eos_token_id, pad_token_id=pad_token_id, do_sample=do_sample, temperature=temperature,
                  top_k=top_k, top_p=top_p, min_p=min_p, suppress_tokens=suppress_tokens, generator=generator,
                  repetition_penalty=repetition_penalty, no_repeat_ngram_size=no_repeat_ngram_size,
                  bad_words_ids=bad_words_ids)
    inputs = dict(visual_tokens=visual_tokens, prefix=prefix, cache=cache, compile=compile)
    if num_beams == 1:
        _unused_flags("num_beams", 1, "beam-based", length_penalty=(length_penalty, 1.0),
                      early_stopping=(early_stopping, False))
        steps = _stream(model, vision_x, lang_x, attention_mask, repeat=R, max_new_tokens=max_new_tokens,
                        max_length=max_length, min_new_tokens=min_new_tokens, min_length=min_length, record=record,
                        **choose, **inputs)
        new = list(steps if streamer is None else _streamed(steps, streamer, lang_x.repeat_interleave(R, 0)))
        sequences = torch.cat([lang_x.repeat_interleave(R, 0), torch.stack(new, dim=1)], dim=1)
        return sequences if record is None else record.output(sequences, beams=False)
    if streamer is not None:
        raise ValueError("`streamer` cannot be used with beam search (as in Hugging Face's generate): pass num_beams=1")
    prompt, padding, max_new_tokens, sampling, pad = _rules(
        model, lang_x, attention_mask, prefix, num_beams, beams=True, max_new_tokens=max_new_tokens,
        max_length=max_length, min_new_tokens=min_new_tokens, min_length=min_length, **choose)
    session, logits = _start(model, vision_x, lang_x, attention_mask, max_new_tokens=max_new_tokens,
                             repeat=num_beams, **inputs)
    new = beam_search(session, logits, batch=lang_x.shape[0], num_beams=num_beams, max_new_tokens=max_new_tokens,
                      sampling=sampling, pad_token_id=pad, length_penalty=length_penalty,
                      early_stopping=early_stopping, prompt=prompt, padding=padding, num_return=R,
                      record=record)
    sequences = torch.cat([lang_x.repeat_interleave(R, 0), new], dim=1)
    return sequences if record is None else record.output(sequences, beams=True)


# GenerationConfig fields that change nothing for a decoder-only LM given its prompt (Hugging Face's
# generate starts from the prompt too), and the config's own bookkeeping
_NO_EFFECT = frozenset({"bos_token_id", "decoder_start_token_id", "transformers_version"})


@functools.cache
def _keyword_arguments() -> frozenset[str]:
    """The keyword arguments :func:`generate` takes (read once from its signature)."""
    return frozenset(inspect.signature(generate).parameters) - {"model", "vision_x", "lang_x", "attention_mask"}


def hugging_face_arguments(generation_config, kwargs: dict) -> dict:
    """:func:`generate`'s keyword arguments from a transformers ``GenerationConfig`` (the settings
    it changes from the defaults) and those passed by name (which win), as Hugging Face's
    ``generate`` merges them. One that :func:`generate` does not take is an error naming it, with
    its source, rather than dropped."""
    merged, from_config = dict(kwargs), set()
    if generation_config is not None:
        if not hasattr(generation_config, "to_diff_dict"):
            raise TypeError(f"generation_config must be a transformers GenerationConfig, got "
                            f"{type(generation_config).__name__}")
        changed = {k: v for k, v in generation_config.to_diff_dict().items()
                   if not k.startswith("_") and k not in _NO_EFFECT}
        from_config = set(changed) - set(kwargs)
        merged = {**changed, **kwargs}
        # a length passed by name replaces the config's other way of saying it (a checkpoint's
        # generation_config often sets max_length: max_new_tokens=5 then means 5 new tokens)
        for pair in (("max_new_tokens", "max_length"), ("min_new_tokens", "min_length")):
            for named, other in (pair, pair[::-1]):
                if named in kwargs and other in from_config:
                    del merged[other]
                    from_config.discard(other)
    taken = _keyword_arguments()
    unknown = sorted(set(merged) - taken)
    if unknown:
        named = ", ".join(f"{k}{' (set in generation_config)' if k in from_config else ''}" for k in unknown)
        raise TypeError(f"fastflamingo's generate does not take {named}. It takes {', '.join(sorted(taken))}, as "
                        "Hugging Face's generate does (fastflamingo.generation.generate documents each)")
    return merged


def _streamed(steps: Iterator[torch.Tensor], streamer, prompt: torch.Tensor) -> Iterator[torch.Tensor]:
    """``steps`` passed on, each also handed to a Hugging Face streamer (``put`` on the CPU, as
    Hugging Face's generate: the prompt rows first, then each step's (rows,) tokens; ``end()`` after
    the last, or after an error, so that a thread reading a ``TextIteratorStreamer`` is not left
    waiting). Bad inputs are refused (by the first step) before the streamer sees anything."""
    first = next(steps)
    streamer.put(prompt.cpu())
    try:
        for tokens in itertools.chain([first], steps):
            streamer.put(tokens.cpu())
            yield tokens
    finally:
        streamer.end()
