"""The decoding state of one batch: LM KV cache, visual K/V, attention mask, positions, text_time.

A :class:`Session` runs the prompt once (:meth:`Session.prefill`, logits of the last position
only) and then one token per row per :meth:`Session.step`. What never changes while decoding is
computed once: the visual tokens and every cross-attention layer's K/V of them (the visual KV
cache, SEMANTICS.md "Generation"). The mask and the position ids live in preallocated buffers.
With a static LM cache the step has fixed shapes and is compiled once per model and batch shape
(gpt-fast's design: one compiled decode step, its own loop, CUDA graphs on GPU).

New tokens see their row's last image: each row's decode ``text_time`` is that of the prompt's
last token, carried forward to every new token, as both peers' ``generate`` do (open_flamingo:
the row's image count; Hugging Face IDEFICS: the last row of the image mask, repeated). So under
``eos_resets_media`` (IDEFICS) a generated EOS does not reset what later tokens see, and a
prompt ending in EOS leaves its image seen, as in IDEFICS's ``generate``; scoring's teacher-forced
continuations follow the model's own rule instead (:attr:`Session.after_tt`, reset after an
EOS, as a forward over the whole text). A generated ``<image>`` token has no pixels: it is
decoded as text and adds no image.
"""
from __future__ import annotations

import contextlib
import types

import torch

from ..distribute import uses_several_devices
from ..model import text_time_for
from . import llama_decode, lm_cache, media_cache
from .prefix import Prefix

CACHE_MODES = ("auto", "static", "dynamic")
_STATIC_ROUND = 64  # static cache lengths are rounded up so that prompts of similar length share a graph
_MEDIA_ROUND = 4  # so are image counts of compiled steps (padding images no token refers to)


def _lm_logits(lm, input_ids, kwargs):
    """The LM's own forward: the last position's logits (B, V) in fp32 (prefill or decode step)."""
    return lm(input_ids=input_ids, **kwargs).logits[:, -1].float()


def _without_guards():
    """Skip dynamo's guard checks (~1 ms a step on a CPU) where nothing but tensor values changed
    since a guarded call of the same session; a no-op on torch versions without the stance."""
    try:
        return torch.compiler.set_stance("default", skip_guard_eval_unsafe=True)
    except (AttributeError, TypeError):
        return contextlib.nullcontext()


def _compiled_decode(steps: dict, media: int, device: torch.device):
    """The compiled decode step of one static cache (one model, batch and length) and image count,
    kept in ``steps`` (the pooled cache's). Each gets a copy of the step's code object of its own:
    dynamo keeps compiled graphs per code object and, past ``torch._dynamo.config.recompile_limit``
    (8) of them, runs every further shape eagerly with only a log warning; one shared function lost
    its compilation (and, on CUDA, its CUDA graphs) at the ninth model or batch shape of a process."""
    mode = "reduce-overhead" if device.type == "cuda" else None
    key = (media, mode)
    if key not in steps:
        code = _lm_logits.__code__
        code = code.replace(co_name=f"{code.co_name}_{len(steps)}")  # a distinct object
        fn = types.FunctionType(code, _lm_logits.__globals__, code.co_name)
        steps[key] = torch.compile(fn, mode=mode, dynamic=False)
    return steps[key]


def cross_attention_modules(model) -> list[torch.nn.Module]:
    """The modules that project visual tokens to K/V (one per gated cross-attention block)."""
    return [m for block in model.gated_cross_attn_layers for m in block.modules() if hasattr(m, "project_kv")]


def project_visual_kv(model, visual: torch.Tensor | None) -> dict:
    """(B, N, L, D_vis) visual tokens -> the visual KV cache: {id(module): (k, v) (B, H, N·L, D)}."""
    if visual is None:
        return {}
    return {id(m): tuple(t.contiguous() for t in m.project_kv(visual)) for m in cross_attention_modules(model)}


class Session:
    """One batch being decoded.

    Args:
        model: a :class:`~fastflamingo.Flamingo`.
        ids: (B, T) prompt token ids, left-padded; after ``prefix`` when one is given.
        mask: (B, T) 1 = token, 0 = padding.
        visual: (B, N, L, D_vis) visual tokens of the prompt's images (rows with fewer images
            padded at the end), or None.
        prefix: a shared few-shot prefix (:func:`fastflamingo.generation.encode_prefix`).
        max_new_tokens: decode steps to leave room for.
        cache: ``"static"``, ``"dynamic"`` or ``"auto"`` (static where the LM family supports it).
        compile: compile the decode step (static cache only): True, False, or ``"auto"`` (on CUDA
            where the static cache is used: CUDA graphs remove the launch overhead that dominates a
            decode step there; not on the CPU, where compiling costs seconds per shape).
        sees_media: (B, 1) for a prompt (with no prefix) after ``cache_media`` some of whose
            rows have no ``<image>`` token: the image every token of such a row b sees (its last
            cached one; none after an EOS under ``eos_resets_media``), -1 for a row whose
            ``<image>`` tokens say. None: the ``<image>`` tokens say, in every row.
    """

    def __init__(self, model, ids: torch.Tensor, mask: torch.Tensor, visual: torch.Tensor | None, *,
                 prefix: Prefix | None = None, max_new_tokens: int, cache: str = "auto",
                 compile: bool | str = "auto", sees_media: torch.Tensor | None = None):
        if cache not in CACHE_MODES:
            raise ValueError(f"cache={cache!r} is not one of {CACHE_MODES}")
        lm = model.lang_encoder
        self.model, self.lm, self.call = model, lm, lm_cache.LMCall(lm)
        if cache == "static" and not self.call.static:
            raise ValueError(f"cache='static': {type(lm).__name__} does not support Hugging Face's StaticCache "
                             "(its modeling code is not compile-ready); use cache='dynamic' or 'auto'")
        self.static = cache == "static" or (cache == "auto" and self.call.static)
        if compile not in (True, False, "auto"):
            raise ValueError(f"compile={compile!r} is not one of True, False, 'auto'")
        if compile == "auto":  # not across devices: one CUDA graph lives on one device
            compile = self.static and ids.device.type == "cuda" and not uses_several_devices(model)
        if compile and not self.static:
            if cache == "dynamic" and self.call.static:
                raise ValueError("compile=True needs the static cache: pass cache='static' or 'auto' "
                                 "(or compile=False)")
            raise ValueError(f"compile=True needs the static cache, which {type(lm).__name__} does not support")
        B, T = ids.shape
        P = 0 if prefix is None else prefix.length
        self.length = P + T
        total = P + T + max_new_tokens
        device = ids.device
        if compile:  # prompts of one rounded length share a compiled step, pooled with its cache
            max_len = -(-total // _STATIC_ROUND) * _STATIC_ROUND
            pooled = lm_cache.static_cache(lm, B, max_len, model.dtype, device, owner=self)
            self.cache = pooled.cache
        else:  # an eager step attends over exactly the slots it needs
            max_len = total
            self.cache = lm_cache.new_static_cache(lm, max_len) if self.static else lm_cache.dynamic_cache(lm)
        self.mask = torch.zeros(B, max_len, dtype=torch.long, device=device)
        self._prepare_media(ids, mask, None if visual is None else visual.detach(), prefix, sees_media)
        if compile and self.visual is not None:  # image counts in one bucket share a compiled step
            self.visual, self.kv = _pad_media(self.visual, self.kv, _MEDIA_ROUND)
        media = 0 if self.visual is None else self.visual.shape[1]
        # a LLaMA's prompt, and its eager step, without Hugging Face's per-call overhead (same logits)
        lean = llama_decode.LeanLlama(lm) if llama_decode.supports(lm) else None
        masks = llama_decode.knows_prompt_mask()  # else only a static cache's step is lean
        if compile:
            self._decode = _compiled_decode(pooled.steps, media, device)
        else:
            self._decode = lean.decode if lean is not None and (self.static or masks) else _lm_logits
        self._prefill = lean.prefill if lean is not None and masks else _lm_logits
        self._compiled, self._guarded = bool(compile), False
        # an eager session's tensor work runs in inference mode (less dispatch per op than no_grad);
        # a compiled step keeps no_grad: its pooled cache outlives the session and graphs are traced once
        self._inference = torch.no_grad if compile else torch.inference_mode

    @torch.no_grad()
    def _prepare_media(self, ids, mask, visual, prefix: Prefix | None, sees_media: torch.Tensor | None) -> None:
        c, B = self.model.config, ids.shape[0]
        self.prefix_length = P = 0 if prefix is None else prefix.length
        if prefix is not None:
            if prefix.ids.device != ids.device:
                raise ValueError(f"the prefix is on {prefix.ids.device} but the prompt is on {ids.device}")
            ids, mask = _after_padding(prefix, ids, mask)
            lm_cache.fill(self.cache, _shifted_kv(prefix.lm_kv, mask[:, :P]), B)
        self.mask[:, :ids.shape[1]] = mask
        self.prompt_ids = ids[:, P:]  # what prefill runs (with a prefix: the prefix's tail where a row has padding)
        # padding is neither an image nor an EOS, even where pad_token_id == eos_token_id
        visible = torch.cat([ids.masked_fill(mask == 0, -1), ids.new_full((B, 1), -1)], dim=1)
        tt = text_time_for(visible, c.media_token_id, c.eos_token_id if c.eos_resets_media else None)
        if sees_media is not None:
            tt = torch.where(sees_media < 0, tt, media_cache.seeing_last_image(self.model, visible,
                                                                               sees_media.clamp(min=0)))
        self.prompt_text_time = tt[:, self.prefix_length:-1]
        # (B, 1) what generated tokens see: the prompt's last token's images (left padding: the
        # last column; the prefix's last token for a query of padding only)
        real = mask != 0
        last = (real * torch.arange(ids.shape[1], device=ids.device)).argmax(-1, keepdim=True)
        self.tt = tt.gather(1, last).contiguous()
        # (B, 1) what a text token after the prompt sees under the model's rule (scoring)
        self.after_tt = tt[:, -1:].contiguous()
        self.eos_reset = c.eos_token_id if c.eos_resets_media else None
        positions = (self.mask[:, :self.length].cumsum(-1) - 1).clamp(min=0)
        self.prompt_positions = positions[:, self.prefix_length:]
        self.pos = positions[:, -1:].clone()
        self.visual, self.kv = _join_media(self.model, visual, prefix, B)

    def _mask(self, length: int) -> torch.Tensor:
        return self.mask if self.static else self.mask[:, :length]

    def prefill(self) -> torch.Tensor:
        """Run the prompt (:attr:`prompt_ids`, B x T); returns the last position's logits (B, V) in fp32."""
        ids = self.prompt_ids
        kwargs = self.call.kwargs(self.cache, self._mask(self.length), self.prompt_positions, last_only=True)
        with self._inference(), self.model.conditioned(self.visual, self.prompt_text_time, self.kv):
            logits = self._prefill(self.lm, ids, kwargs)
        return logits.to(ids.device)  # the LM head may sit on another device (device_map)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row (B,); returns the next logits (B, V) in fp32."""
        if self.length >= self.mask.shape[1]:
            raise RuntimeError(f"the session has room for {self.mask.shape[1]} tokens and holds {self.length}: "
                               "build it with a larger max_new_tokens")
        self.mask[:, self.length] = 1
        self.length += 1
        self.pos += 1
        kwargs = self.call.kwargs(self.cache, self._mask(self.length), self.pos)
        with self._inference(), self.model.conditioned(self.visual, self.tt, self.kv):
            logits = self._run(tokens[:, None].contiguous(), kwargs)  # one layout: no recompilation
        if logits.device != tokens.device:  # the LM head on another device (device_map)
            return logits.to(tokens.device)
        return logits.clone() if logits.is_cuda else logits

    def _run(self, input_ids: torch.Tensor, kwargs: dict) -> torch.Tensor:
        if not self._guarded:
            logits = self._decode(self.lm, input_ids, kwargs)
            self._guarded = self._compiled
            return logits
        # a guarded compiled step ran: later ones differ only in tensor values, unless the LM's
        # code specialises on the step (then dynamo refuses to recompile unguarded: check again)
        try:
            with _without_guards():
                return self._decode(self.lm, input_ids, kwargs)
        except RuntimeError as e:
            if "skip_guard_eval_unsafe" not in str(e):
                raise
            self._guarded = False
            return self._run(input_ids, kwargs)

    def reorder(self, index: torch.Tensor) -> None:
        """Beam search: row r continues from row ``index[r]`` (always a beam of the same prompt row,
        so the visual tokens and their K/V, identical across those beams, stay as they are)."""
        with self._inference():
            lm_cache.reorder(self.cache, index)
            for t in (self.mask, self.pos):
                t.copy_(t.index_select(0, index))


def _after_padding(prefix: Prefix, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row (B, P + T) as [its padding][the prefix][its tokens], the prompt written out whole.
    No padding sits between the prefix and the tokens: a sliding-window LM (Mistral, Qwen2, Gemma2,
    GPT-Neo's local layers) counts cache slots, padding included, against its window, so padding
    there hid prefix tokens from the query that a written-out prompt lets it see."""
    B, P = ids.shape[0], prefix.length
    full_ids = torch.cat([prefix.ids.expand(B, -1), ids], dim=1)
    full_mask = torch.cat([mask.new_ones(B, P), mask], dim=1)
    order = torch.sort(full_mask, dim=1, stable=True).indices  # padding first, the rest in order
    return full_ids.gather(1, order), full_mask.gather(1, order)


def _shifted_kv(lm_kv: list, head_mask: torch.Tensor) -> list:
    """The prefix's per-layer K/V (1, H, P, D) for the first P slots of each row (B, H, P, D): a row
    with p padding slots there holds prefix tokens 0..P-p-1 after them (its prefill recomputes the
    rest); padding slots get a copy of token 0, which the mask hides."""
    B, P = head_mask.shape
    src = (torch.arange(P, device=head_mask.device) - (P - head_mask.sum(-1, keepdim=True))).clamp(min=0)  # (B, P)
    out = []
    for k, v in lm_kv:
        index = src.to(k.device)[:, None, :, None].expand(B, k.shape[1], P, k.shape[3])
        out.append(tuple(t.expand(B, *t.shape[1:]).gather(2, index) for t in (k, v)))
    return out


def _join_media(model, visual: torch.Tensor | None, prefix: Prefix | None, batch: int):
    """The visual tokens (B, N_prefix + N, L, D) and visual KV cache for prefix + prompt images."""
    kv = project_visual_kv(model, visual)
    if prefix is None or prefix.visual is None:
        return visual, kv
    pv = prefix.visual.expand(batch, *prefix.visual.shape[1:])
    if visual is None:
        return pv, {k: tuple(t.expand(batch, *t.shape[1:]) for t in v) for k, v in prefix.visual_kv.items()}
    if visual.shape[2:] != pv.shape[2:]:
        raise ValueError(f"the prompt's visual tokens {tuple(visual.shape[2:])} differ from the prefix's "
                         f"{tuple(pv.shape[2:])} (L, D_vis)")
    joined = {k: tuple(torch.cat([p.expand(batch, *p.shape[1:]), q], dim=2) for p, q in zip(prefix.visual_kv[k], kv[k]))
              for k in kv}
    return torch.cat([pv, visual], dim=1), joined


def _pad_media(visual: torch.Tensor, kv: dict, multiple: int):
    """Pad the image axis to a multiple of ``multiple`` with zero images: no ``text_time`` refers to
    them (image-causal attention reads images 1..text_time only), so outputs are unchanged."""
    B, N, L, D = visual.shape
    extra = -N % multiple
    if extra == 0:
        return visual, kv
    visual = torch.cat([visual, visual.new_zeros(B, extra, L, D)], dim=1)
    return visual, {key: tuple(torch.cat([t, t.new_zeros(*t.shape[:2], extra * L, t.shape[3])], dim=2) for t in pair)
                    for key, pair in kv.items()}
