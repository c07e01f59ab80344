"""End to end: prefill latency, decode tokens/s, beam search tokens/s, one training step, peak memory.

Each group of providers runs the same weights: fastflamingo converted from the peer's own live
model (``from_open_flamingo``, ``from_idefics``), beside that peer. Before any time is reported,
each provider's output is checked (:mod:`fastflamingo.bench.stages`) against fastflamingo on its
readable ``reference`` attention backend, same weights:

* prefill logits by the flash-attention rule at model level: relative error vs a copy of the
  reference model in higher precision (fp64 for fp32 runs, fp32 for 16-bit runs) at most twice
  that of the reference in the working precision, plus one epsilon of that precision;
* the training loss within 1e-4 (fp32) / 2e-2 (16-bit) relative error, and the trainable
  parameters' gradients (``Group.train_check``), before any optimizer step
  (training steps run in training mode with dropout off, the modes put back after: activation
  checkpointing acts only in training, and the loss is then the reference's);
* generated tokens equal to a plain greedy loop without any cache (fp32: every token; 16-bit: the
  first new token of every row, since a near-tie may flip a later one, and every later one checked
  too: at least ``stages.GREEDY_16BIT_FLOOR`` of all the new tokens must be the entrant's own
  argmax when it scores its output in one forward, teacher-forced, no cache; the agreement is in
  the note);
* the best beams of beam search (``E2EConfig.beams``, 3 on a CPU as open_flamingo's evaluation;
  not run on a GPU) equal to fastflamingo's beam search on the reference attention backend with a
  dynamic cache (fp32: every token; 16-bit: the first new token of every row only, said in the
  row's note: a beam's later tokens depend on near-ties of sums of log-probabilities);

Quantized weights (NF4, int8) are an approximation by design: their prefill logits must be finite,
within a relative error of the high-precision reference and agree on its top-1 token at a share of
the positions, both per quantization (``stages.QUANT_BOUNDS``: int8 5e-2 / 50%, NF4 0.4 / 10%), and
their generated tokens must be their own model's greedy choices (``stages.OWN_GREEDY_FLOOR``); the
rows report the figures.
"""
from __future__ import annotations

import copy
import gc
import importlib
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..presets import preset_config
from .env import device_name, has_module, versions
from .harness import reference_dtype
from .rows import Row
from .stages import (Entrant, Group, call_generate, fastflamingo_entrant, fastflamingo_entrants, generate_fn,
                     reference_greedy)

__all__ = ["E2EConfig", "default_config", "make_inputs", "run", "Entrant", "Group"]


@dataclass
class E2EConfig:
    preset: str
    dtype: torch.dtype
    batch: int
    images: int
    prompt: int          # prompt tokens per row
    new_tokens: int
    train_tokens: int
    train_images: int
    reps: int
    quant: tuple[str, ...] = ()  # also fastflamingo with these weights: "nf4", "int8"
    compiled: bool = False  # also fastflamingo's compiled static-cache decode (compiled in the check call)
    beams: int = 0  # also beam search with this many beams (open_flamingo's evaluation: 3); 0: not run


def default_config(preset: str, device: str, quick: bool) -> E2EConfig:
    if torch.device(device).type == "cuda":
        # compiled=False: on CUDA fastflamingo's default generate already compiles its decode step
        # (compile="auto"), so a "fastflamingo compiled" entrant would time the same thing twice
        # beams=0: the device time of a GPU run goes to issue 7's stages (beam search would compile
        # another decode step per entrant and run each peer's 3-beam loop)
        return E2EConfig(preset, torch.bfloat16, batch=4, images=8, prompt=512, new_tokens=32,
                         train_tokens=256, train_images=5, reps=2 if quick else 3, quant=("nf4",), compiled=False)
    if quick:
        return E2EConfig(preset, torch.float32, batch=2, images=2, prompt=32, new_tokens=8, train_tokens=32,
                         train_images=2, reps=3, beams=3)
    # the compiled decode costs ~5-50 s of compilation on a CPU: not in --quick's 2-minute budget
    return E2EConfig(preset, torch.float32, batch=4, images=4, prompt=128, new_tokens=16, train_tokens=128,
                     train_images=4, reps=5, quant=("nf4", "int8"), compiled=True, beams=3)


# ------------------------------------------------------------------------- inputs
def make_inputs(B: int, N: int, T: int, *, vocab: int, media_token_id: int, image_size: int,
                device: str, dtype: torch.dtype, seed: int = 0, specials: tuple = ()):
    """(vision_x (B, N, 1, 3, H, W), lang_x (B, T), attention_mask (B, T)): N ``<image>`` tokens
    per row at random positions, the first at position 0."""
    g = torch.Generator().manual_seed(seed)
    lang_x = torch.randint(3, vocab, (B, T), generator=g)
    for s in (*specials, media_token_id):  # no accidental <image>, <|endofchunk|>, eos in the text
        lang_x[lang_x == s] = 3
    for b in range(B):
        pos = torch.cat([torch.zeros(1, dtype=torch.long), 1 + torch.randperm(T - 1, generator=g)[:N - 1]])
        lang_x[b, pos] = media_token_id
    vision_x = torch.randn(B, N, 1, 3, image_size, image_size, generator=g)
    return vision_x.to(device=device, dtype=dtype), lang_x.to(device), torch.ones_like(lang_x).to(device)


def _reference_outputs(model, inputs, train_inputs, n, banned, beams: int = 0) -> dict:
    """Prefill logits, greedy tokens, the best beams of ``beams``-beam search (when > 1) and the
    training loss of ``model`` on the readable ``reference`` attention backend, and the prefill
    logits of a copy of it in higher precision (fp64 for fp32 models, fp32 for 16-bit ones: the
    flash-attention rule, see Group.prefill); on a CPU also the trainable parameters' gradients
    of the training loss, in both precisions (on a GPU a high-precision copy of a 9B model's
    backward would not fit beside the entrants: there the loss and the gradients' presence are checked)."""
    vx, ids, mask = inputs
    tvx, tids, tmask, labels = train_inputs
    hi = reference_dtype(vx.dtype)
    model.set_attention_backend("reference")
    try:
        with torch.no_grad():
            ref = {"logits": model(vx, ids, attention_mask=mask).logits,
                   "tokens": reference_greedy(model, vx, ids, mask, n, banned),
                   "loss": model(tvx, tids, attention_mask=tmask, labels=labels).loss.item()}
            gen = generate_fn(model)
            if beams > 1 and gen is not None:  # beam search over the reference attention, a dynamic cache
                ref["beams"] = call_generate(gen, vx, ids, mask, n, banned, num_beams=beams, cache="dynamic",
                                             compile=False)
            upcast = copy.deepcopy(model).to(hi)
            ref["logits_hi"] = upcast(vx.to(hi), ids, attention_mask=mask).logits
        if not vx.is_cuda:  # the trainable parameters' gradients (Group.train_check); a CPU's sizes only
            ref["grads"] = _trainable_grads(model, lambda: model(tvx, tids, attention_mask=tmask, labels=labels).loss)
            ref["grads_hi"] = _trainable_grads(upcast, lambda: upcast(tvx.to(hi), tids, attention_mask=tmask,
                                                                        labels=labels).loss)
        del upcast
    finally:
        model.set_attention_backend("auto")
    gc.collect()
    if vx.is_cuda:
        torch.cuda.empty_cache()
    return ref


def _trainable_grads(model, loss) -> dict:
    """name -> gradient of ``model``'s trainable parameters after ``loss().backward()`` (cleared after)."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    for p in params.values():
        p.grad = None
    loss().backward()
    out = {n: p.grad.detach().clone() for n, p in params.items() if p.grad is not None}
    for p in params.values():
        p.grad = None
    return out


def _both_inputs(cfg: E2EConfig, media_token_id: int, **kw):
    """The prompt (B x prompt tokens, N images) and the training batch (B x train tokens)."""
    inputs = make_inputs(cfg.batch, cfg.images, cfg.prompt, media_token_id=media_token_id, **kw)
    tvx, tids, tmask = make_inputs(cfg.batch, cfg.train_images, cfg.train_tokens, media_token_id=media_token_id,
                                   seed=1, **kw)
    return inputs, (tvx, tids, tmask, _labels(tids, media_token_id))


def _longer(mask, seq):
    """``mask`` (B, T) extended with ones to ``seq``'s length (a prompt and its new tokens)."""
    return torch.cat([mask, mask.new_ones(mask.shape[0], seq.shape[1] - mask.shape[1])], dim=1)


def _labels(ids, *specials):
    labels = ids.clone()
    for s in specials:
        labels[ids == s] = -100
    return labels


def open_flamingo_group(cfg: E2EConfig, device: str, progress: bool) -> list[Row]:
    """fastflamingo vs open_flamingo's own model (same weights), then fastflamingo with NF4. Where
    open_flamingo cannot be built (not installed, or open_clip not), fastflamingo's own model in its
    shape (:func:`.peers.open_flamingo_shaped`) runs alone and open_flamingo's rows read n/a."""
    from ..convert.open_flamingo import from_open_flamingo
    from .peers import open_flamingo_missing, open_flamingo_model, open_flamingo_shaped
    config = preset_config(cfg.preset)
    if config.cross_attention.style != "open_flamingo":
        return [Row(kernel="e2e", provider="open_flamingo", mode="-", metric="time_ms", x=cfg.preset,
                    status=f"n/a: preset {cfg.preset} is not open_flamingo-style", device=device_name(device),
                    versions=versions(), sweep="stage")]
    missing = open_flamingo_missing()
    if missing:  # fastflamingo alone, in the shape it would have had (no peer to share weights with)
        live, ours = None, open_flamingo_shaped(config, device, cfg.dtype)
    else:
        live = open_flamingo_model(config, device, cfg.dtype)
        ours = from_open_flamingo(live)
    ours.lang_encoder.get_input_embeddings().requires_grad_(True)  # the same trainable set as live
    vocab = ours.lang_encoder.get_input_embeddings().num_embeddings
    specials = (config.eoc_token_id, config.pad_token_id or 0, config.eos_token_id or 0)
    label = f"{cfg.preset} shape B={cfg.batch} N={cfg.images} T={cfg.prompt}"
    inputs, train_inputs = _both_inputs(cfg, config.media_token_id, vocab=min(vocab, config.num_base_tokens or vocab),
                                        image_size=config.vision.image_size, device=device, dtype=cfg.dtype,
                                        specials=specials)
    banned = {config.media_token_id, *specials}
    ref = _reference_outputs(ours, inputs, train_inputs, cfg.new_tokens, banned, cfg.beams)
    vx, ids, mask = inputs
    tvx, tids, tmask, labels = train_inputs
    entrants = fastflamingo_entrants(ours, inputs, train_inputs, banned, cfg.compiled) + ([] if live is None else [
        Entrant("open_flamingo", prefill=lambda: live(vx, ids, attention_mask=mask).logits,
                loss=lambda: live(tvx, tids, attention_mask=tmask, labels=labels).loss,
                params=lambda: [p for p in live.parameters() if p.requires_grad],
                generate=lambda n, k=1: call_generate(live.generate, vx, ids, mask, n, banned, num_beams=k),
                module=live, teacher_forced=lambda seq: live(vx, seq, attention_mask=_longer(mask, seq)).logits)])
    group = Group(label, entrants, ref, cfg, device, progress, banned)
    rows = group.run()
    if missing:
        rows = _peer_unavailable(rows, "open_flamingo", f"n/a: {missing}")
    # free open_flamingo's copy of the 16-bit weights before measuring the quantized model
    del live, entrants
    group.entrants = []
    gc.collect()
    return rows + _quantized_rows(group, ours, inputs, train_inputs)


def _peer_unavailable(rows: list[Row], peer: str, status: str) -> list[Row]:
    """``rows`` with, after each of fastflamingo's own time or rate rows, ``peer``'s at the same
    stage reading ``status`` (a peer that could not be built: its cells, and the goals against it,
    say why)."""
    out = []
    for r in rows:
        out.append(r)
        if r.provider == "fastflamingo" and r.metric in ("time_ms", "tokens_per_s"):
            out.append(Row(kernel=r.kernel, provider=peer, mode=r.mode, metric=r.metric, x=r.x, status=status,
                           device=r.device, versions=r.versions, sweep=r.sweep))
    return out


def _quantized_rows(group: Group, ours, inputs, train_inputs) -> list[Row]:
    """fastflamingo with each of ``cfg.quant``'s weights (after the 16-bit stages; the last one
    quantizes ``ours`` in place, the others a copy): prefill and decode, checked against the
    16-bit reference within that quantization's bounds (``stages.QUANT_BOUNDS``)."""
    modes = group.cfg.quant
    rows = []
    for i, q in enumerate(modes):
        rows += _one_quantized(group, ours if i == len(modes) - 1 else copy.deepcopy(ours), q, inputs, train_inputs)
    return rows


def _one_quantized(group: Group, model, q: str, inputs, train_inputs) -> list[Row]:
    why = ("fastflamingo.quant (quantize_model) is not in this build" if not importlib.util.find_spec(
        "fastflamingo.quant") else "bitsandbytes is not installed" if not has_module("bitsandbytes") else None)
    if why:
        return [group.row("e2e prefill", f"fastflamingo {q}", "time_ms", mode=q, status=f"n/a: {why}")]
    from ..quant import quantize_model
    try:
        # inference: the cross-attention blocks and the vision encoder too (issue 7's memory goal
        # is for the whole model); the LM head, embeddings and resampler stay 16-bit
        model = quantize_model(model.eval(), q, vision=True, cross_attention=True)
    except Exception as ex:  # noqa: BLE001 - reported in the table
        return [group.row("e2e prefill", f"fastflamingo {q}", "time_ms", mode=q,
                          status=f"n/a: quantize_model failed: {type(ex).__name__}: {str(ex)[:120]}")]
    gc.collect()
    if torch.device(group.device).type == "cuda":
        torch.cuda.empty_cache()
    e = fastflamingo_entrant(f"fastflamingo {q}", model, inputs, train_inputs, group.banned, quant=q)
    rows = group.prefill(e) + group.decode(e)
    if q == "nf4" and torch.device(group.device).type == "cuda":
        # decode steps through fastflamingo's fused dequantize-matmul kernel (quantize_model(fused=True))
        from ..ops.nf4 import use_fused_nf4
        use_fused_nf4(model)
        try:
            fused = fastflamingo_entrant("fastflamingo nf4 fused", model, inputs, train_inputs, group.banned, quant=q)
            rows += group.decode(fused)
        finally:
            use_fused_nf4(model, 0)
    return rows


def idefics_group(cfg: E2EConfig, device: str, progress: bool) -> list[Row]:
    """fastflamingo (``from_idefics``) vs Hugging Face IDEFICS, same weights."""
    label = "idefics shape"
    if importlib.util.find_spec("fastflamingo.convert.idefics") is None:
        why = "n/a: fastflamingo.convert.idefics.from_idefics is not in this build"
        return [Row(kernel=s, provider="IDEFICS", mode="-", metric="time_ms", x=label, status=why,
                    device=device_name(device), versions=versions(), sweep="stage")
                for s in ("e2e prefill", "e2e decode", "e2e train step")]
    from ..convert.idefics import from_idefics
    from .peers import idefics_model
    live = idefics_model(device, cfg.dtype)
    ours = from_idefics(live)
    c = live.config
    image_size = c.vision_config.image_size
    media_id = ours.config.media_token_id
    specials = tuple(t for t in (ours.config.eos_token_id, ours.config.eoc_token_id, ours.config.pad_token_id)
                     if t is not None and t >= 0)
    inputs, train_inputs = _both_inputs(cfg, media_id, vocab=c.vocab_size, image_size=image_size, device=device,
                                        dtype=cfg.dtype, specials=specials)
    label = f"idefics shape B={cfg.batch} N={cfg.images} T={cfg.prompt}"
    banned = {media_id, *specials}
    ref = _reference_outputs(ours, inputs, train_inputs, cfg.new_tokens, banned, cfg.beams)
    vx, ids, mask = inputs
    tvx, tids, tmask, labels = train_inputs

    def hf_inputs(vx, ids, mask, n_images):
        image_mask = torch.nn.functional.one_hot(ours.text_time(ids).long(), n_images + 1)[..., 1:].to(ids.dtype)
        return dict(input_ids=ids, pixel_values=vx[:, :, 0], image_attention_mask=image_mask, attention_mask=mask)
    hf, hf_train = hf_inputs(vx, ids, mask, cfg.images), hf_inputs(tvx, tids, tmask, cfg.train_images)
    for n, p in live.named_parameters():  # IDEFICS trains its resampler and cross-attention blocks
        p.requires_grad_(any(k in n for k in ("perceiver_resampler", "gated_cross_attn_layers")))

    def hf_generate(n, num_beams=1):
        return live.generate(**hf, max_new_tokens=n, min_new_tokens=n, num_beams=num_beams, do_sample=False,
                             suppress_tokens=list(banned))
    entrants = fastflamingo_entrants(ours, inputs, train_inputs, banned, cfg.compiled) + [
        # use_cache=False as fastflamingo's and open_flamingo's forwards: transformers' default
        # (the config's use_cache) builds a DynamicCache and holds every layer's K/V until it returns
        Entrant("IDEFICS", prefill=lambda: live(**hf, use_cache=False).logits,
                loss=lambda: live(**hf_train, labels=labels, use_cache=False).loss,
                params=lambda: [p for p in live.parameters() if p.requires_grad], generate=hf_generate,
                module=live, teacher_forced=lambda seq: live(**hf_inputs(vx, seq, _longer(mask, seq), cfg.images),
                                                             use_cache=False).logits)]
    return Group(label, entrants, ref, cfg, device, progress, banned).run()


GROUPS = {"open_flamingo": open_flamingo_group, "idefics": idefics_group}


def run(cfg: E2EConfig, device: str, *, progress: bool = True, on_rows=None, groups=None) -> list[Row]:
    """The groups named in ``groups`` (default: all of :data:`GROUPS`, in order); ``on_rows(rows)``
    is called after each (to save partial results)."""
    groups = list(GROUPS) if groups is None else list(groups)
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        raise ValueError(f"unknown e2e group(s) {unknown}: choose from {list(GROUPS)}")
    rows = []
    for name in tqdm(groups, desc="e2e", disable=not progress, unit="group"):
        try:
            rows += GROUPS[name](cfg, device, progress)
        except Exception as ex:  # noqa: BLE001 - one group failing must not lose the others' rows
            # (the idefics group runs its own shape, whatever the preset)
            rows.append(Row(kernel="e2e", provider=name, mode="-", metric="time_ms",
                            x="idefics shape" if name == "idefics" else cfg.preset,
                            status=f"n/a: {type(ex).__name__}: {str(ex)[:200]}", device=device_name(device),
                            versions=versions(), sweep="stage"))
        gc.collect()
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
        if on_rows is not None:
            on_rows(rows)
    return rows
