"""Import open_flamingo checkpoint files (OpenFlamingo-3B/4B/9B, Med-Flamingo, your own runs).

A checkpoint holds the trainable parameters (resampler, cross-attention blocks) and the LM's
embeddings; the frozen LM and vision encoder come from the models it was trained with. The
architecture is read from the key names and shapes (:class:`OpenFlamingoLayout`), so a checkpoint
that does not fit the LM it is given fails with a message that says which LM it expects
(open_flamingo #209).
"""
from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..config import CrossAttentionConfig, FlamingoConfig, ResamplerConfig, VisionConfig
from ..lm import decoder_layers_attr_for, get_attr, lm_hidden_size
from ..warn import warn_caller
from .io import load_hf_causal_lm, load_state_file
from .load import build_and_load, check_placement
from .pretrained import record_sources
from .open_flamingo import map_open_flamingo_state_dict, open_clip_image_size

# what open_flamingo builds, whatever the checkpoint: ``Flamingo.__init__`` makes
# ``PerceiverResampler(dim=vis_dim)`` and ``init_flamingo`` ``GatedCrossAttentionBlock(dim=, dim_visual=)``,
# so their defaults (open_flamingo/src/helpers.py) are fixed: depth 6, 8 heads of 64, 4x feed-forwards
OPEN_FLAMINGO_RESAMPLER_DEPTH = 6
OPEN_FLAMINGO_HEADS = 8
OPEN_FLAMINGO_DIM_HEAD = 64  # resampler and cross-attention alike
OPEN_FLAMINGO_FF_MULT = 4
LM_FAMILIES = {
    "transformer.blocks": "MPT (OpenFlamingo-3B, -9B)",
    "gpt_neox.layers": "GPT-NeoX / Pythia / RedPajama (OpenFlamingo-4B)",
    "model.layers": "LLaMA or another LLaMA-like LM (Med-Flamingo)",
    "model.decoder.layers": "OPT",
    "transformer.h": "GPT-J / GPT-2",
}
_XATTN = re.compile(r"^lang_encoder\.(?P<attr>.+)\.(?P<idx>\d+)\.gated_cross_attn_layer\.(?P<rest>.+)$")
_EMBED_NAMES = ("transformer.wte.weight", "model.embed_tokens.weight", "gpt_neox.embed_in.weight",
                "model.decoder.embed_tokens.weight")


@dataclass
class OpenFlamingoLayout:
    """What an open_flamingo checkpoint's keys and shapes say about the model it belongs to."""
    decoder_layers_attr: str
    cross_attn_layers: list[int]
    lm_dim: int | None  # None: no cross-attention key in the checkpoint shows it
    vis_dim: int
    xattn_inner: int
    xattn_ff_mult: int
    depth: int
    num_latents: int
    perceiver_inner: int
    perceiver_ff_mult: int
    max_num_media: int | None
    max_num_frames: int | None
    vocab: int | None

    @property
    def every_n(self) -> int:
        """The interval n of open_flamingo's placement (blocks at layers n-1, 2n-1, ...): the
        greatest n the blocks held fit, so that a missing first block is reported missing."""
        return math.gcd(*(i + 1 for i in self.cross_attn_layers))

    @property
    def family(self) -> str:
        return LM_FAMILIES.get(self.decoder_layers_attr, f"an LM with decoder layers at {self.decoder_layers_attr}")

    def describe(self) -> str:
        n, last = self.every_n, self.cross_attn_layers[-1]
        vocab = f", a vocabulary of {self.vocab} tokens" if self.vocab else ""
        count = f"{last + 1}" if n == 1 else f"{last + 1} to {last + n}"
        dim = "?" if self.lm_dim is None else self.lm_dim
        return (f"{self.family}: decoder layers at `{self.decoder_layers_attr}`, {count} of them, "
                f"hidden size {dim}{vocab}; cross-attention every {n} layer(s); "
                f"vision features of width {self.vis_dim}")


def resampler_layers_held(state: dict[str, torch.Tensor]) -> list[int]:
    """The indices of the resampler layers an open_flamingo state dict holds keys of, sorted."""
    return sorted({int(k.split(".")[2]) for k in state if re.match(r"perceiver\.layers\.\d+\.", k)})


def read_open_flamingo_layout(state: dict[str, torch.Tensor]) -> OpenFlamingoLayout:
    """Infer the architecture from an open_flamingo state dict (duplicates already dropped).

    Each width is read from the first layer that holds the key it shows in (a truncated checkpoint
    still gets its architecture read, and its missing keys listed when it is loaded); one no layer
    shows falls back to open_flamingo's fixed value. The resampler is as deep as open_flamingo
    builds it (:data:`OPEN_FLAMINGO_RESAMPLER_DEPTH`), or deeper where the checkpoint holds more
    layers: a checkpoint without its last layers is incomplete, not a shallower resampler."""
    layers: dict[str, set[int]] = {}
    for key in state:
        m = _XATTN.match(key)
        if m:
            layers.setdefault(m["attr"], set()).add(int(m["idx"]))
    if "perceiver.latents" not in state or not layers:
        raise ValueError("this is not an open_flamingo checkpoint: it has no 'perceiver.latents' and "
                         "'lang_encoder.<layers>.<i>.gated_cross_attn_layer.*' keys "
                         f"(first keys: {list(state)[:5]})")
    if len(layers) > 1:
        raise ValueError(f"the checkpoint has cross-attention layers under several paths: {sorted(layers)}")
    (attr, idx), = layers.items()
    idx = sorted(idx)
    x = [f"lang_encoder.{attr}.{i}.gated_cross_attn_layer." for i in idx]
    held = resampler_layers_held(state)
    p = [f"perceiver.layers.{i}." for i in held]
    latents = state["perceiver.latents"]
    dim = latents.shape[1]

    def size(prefixes, candidates, default=None):
        """The first size a layer shows: ``candidates`` are (key suffix, tensor -> size), tried in
        order over every layer; ``default`` where none is in the checkpoint."""
        for suffix, read in candidates:
            for prefix in prefixes:
                t = state.get(prefix + suffix)
                if t is not None and t.dim() >= 1:
                    return int(read(t))
        return default

    def rows(t):
        return t.shape[0]

    def cols(t):
        return t.shape[-1]

    def mult(t):  # a feed-forward's first Linear: (inner, dim)
        return t.shape[0] // t.shape[-1]

    def inv_mult(t):  # its second: (dim, inner)
        return t.shape[-1] // t.shape[0]
    inner = OPEN_FLAMINGO_HEADS * OPEN_FLAMINGO_DIM_HEAD
    vocab = next((state[f"lang_encoder.{e}"].shape[0] for e in _EMBED_NAMES if f"lang_encoder.{e}" in state), None)
    return OpenFlamingoLayout(
        decoder_layers_attr=attr, cross_attn_layers=idx,
        lm_dim=size(x, [("attn.to_q.weight", cols), ("attn.to_out.weight", rows), ("attn.norm.weight", rows),
                        ("ff.0.weight", rows), ("ff.1.weight", cols), ("ff.3.weight", rows)]),
        vis_dim=size(x, [("attn.to_kv.weight", cols)], default=dim),  # open_flamingo's resampler works at it
        xattn_inner=size(x, [("attn.to_q.weight", rows), ("attn.to_out.weight", cols),
                             ("attn.to_kv.weight", lambda t: t.shape[0] // 2)], default=inner),
        xattn_ff_mult=size(x, [("ff.1.weight", mult), ("ff.3.weight", inv_mult)], default=OPEN_FLAMINGO_FF_MULT),
        depth=max([OPEN_FLAMINGO_RESAMPLER_DEPTH] + [i + 1 for i in held]), num_latents=latents.shape[0],
        perceiver_inner=size(p, [("0.to_q.weight", rows), ("0.to_out.weight", cols),
                                 ("0.to_kv.weight", lambda t: t.shape[0] // 2)], default=inner),
        perceiver_ff_mult=size(p, [("1.1.weight", lambda t: t.shape[0] // dim),
                                   ("1.3.weight", lambda t: t.shape[-1] // dim)], default=OPEN_FLAMINGO_FF_MULT),
        max_num_media=state["perceiver.media_time_embs"].shape[0] if "perceiver.media_time_embs" in state else None,
        max_num_frames=state["perceiver.frame_embs"].shape[0] if "perceiver.frame_embs" in state else None,
        vocab=vocab)


def describe_lm(lm: nn.Module, layers_attr: str) -> str:
    """The same facts as :meth:`OpenFlamingoLayout.describe`, for an LM instance."""
    n_layers = len(get_attr(lm, layers_attr)) if _has_attr(lm, layers_attr) else "?"
    return (f"{type(lm).__name__} (model_type {getattr(lm.config, 'model_type', '?')!r}): decoder layers at "
            f"`{layers_attr}`, {n_layers} of them, hidden size {lm_hidden_size(lm)}, a vocabulary of "
            f"{lm.get_input_embeddings().weight.shape[0]} tokens")


def _has_attr(obj, dotted: str) -> bool:
    try:
        get_attr(obj, dotted)
        return True
    except AttributeError:
        return False


def from_open_flamingo_checkpoint(checkpoint, *, lang_encoder=None, vision_encoder=None,
                                  ln_post_on_tokens: bool | None = None, cross_attn_every_n_layers: int | None = None,
                                  tokenizer=None, media_token_id: int | None = None, eoc_token_id: int | None = None,
                                  num_base_tokens: int | None = None, decoder_layers_attr_name: str | None = None,
                                  trust_remote_code: bool = False, dtype=None, quantization=None,
                                  device_map=None, max_memory=None, offload_folder=None):
    """A fastflamingo model from an open_flamingo checkpoint and the models it was trained with.

    Args:
        checkpoint: a .pt / .pth / .bin (``torch.load(weights_only=True)``) or .safetensors path, or
            a state dict; full or trainable-only (open_flamingo's training script keeps trainable
            parameters and names containing "embed").
        lang_encoder: the LM it was trained with: a Hugging Face causal LM or a local directory.
        vision_encoder: the open_clip vision tower (or CLIP model), or an open_clip (name, pretrained)
            pair, pretrained a tag or a local checkpoint path; OpenFlamingo's releases use
            ("ViT-L-14", "openai"). (name, None) is random weights, on purpose; a bare name is refused.
        ln_post_on_tokens: required: False for OpenFlamingo's released weights (SEMANTICS.md).
        cross_attn_every_n_layers: inferred from the checkpoint's keys when None.
        tokenizer: a tokenizer (or local path) to set up as open_flamingo does (adds ``<image>``,
            ``<|endofchunk|>``, resizes the LM); or give ``media_token_id`` and ``eoc_token_id``.
            Where the set-up adds rows, the checkpoint must hold the LM's input embeddings (their
            trained values; open_flamingo saves them), else a ``CheckpointMismatchError``.
        num_base_tokens: vocabulary size before the Flamingo tokens (None: from the tokenizer set-up).
        dtype, quantization, device_map, max_memory, offload_folder: see
            :func:`fastflamingo.convert.load.finish`. Without ``dtype``, the checkpoint's tensors
            take the LM's dtype (a bf16 checkpoint on an fp32 LM: fp32).

    The resampler is open_flamingo's, 6 layers deep: a checkpoint holding fewer is reported
    incomplete (:class:`~fastflamingo.convert.load.CheckpointMismatchError`), as one missing any other key.
    """
    check_placement(dtype=dtype, quantization=quantization, device_map=device_map, max_memory=max_memory,
                    offload_folder=offload_folder)
    state = checkpoint if isinstance(checkpoint, dict) else load_state_file(checkpoint)
    state = map_open_flamingo_state_dict(state)
    layout = read_open_flamingo_layout(state)
    lm = _lang_encoder(lang_encoder, layout, trust_remote_code)
    visual, vision_name = _vision_encoder(vision_encoder, layout)
    # the caller's LM and tokenizer come back as they were from a failed import (resized, with tokens
    # added, a retry took the random rows as the LM's own); the tokenizer is set up once the model is built
    restore = None if isinstance(lang_encoder, (str, Path)) else _embeddings_restorer(lm)
    try:
        model = _build(state, layout, lm, visual, vision_name, ln_post_on_tokens=ln_post_on_tokens,
                       cross_attn_every_n_layers=cross_attn_every_n_layers,
                       tokenizer=tokenizer if isinstance(tokenizer, (str, Path)) else copy.deepcopy(tokenizer),
                       media_token_id=media_token_id, eoc_token_id=eoc_token_id, num_base_tokens=num_base_tokens,
                       decoder_layers_attr_name=decoder_layers_attr_name, trust_remote_code=trust_remote_code,
                       dtype=dtype, quantization=quantization, device_map=device_map, max_memory=max_memory,
                       offload_folder=offload_folder)
    except BaseException:
        if restore is not None:
            restore()
        raise
    if tokenizer is not None and not isinstance(tokenizer, (str, Path)):
        from ..tokens import setup_tokenizer
        setup_tokenizer(tokenizer, num_base_tokens=model.config.num_base_tokens)  # as its copy was: the same ids
    record_sources(model, lang_encoder, (vision_name, vision_encoder[1]) if isinstance(vision_encoder, tuple)
                   else None)
    return model


def _build(state, layout: OpenFlamingoLayout, lm: nn.Module, visual: nn.Module, vision_name, *, ln_post_on_tokens,
           cross_attn_every_n_layers, tokenizer, media_token_id, eoc_token_id, num_base_tokens,
           decoder_layers_attr_name, trust_remote_code, dtype, quantization, device_map, max_memory,
           offload_folder) -> nn.Module:
    """:func:`from_open_flamingo_checkpoint`'s model, ``tokenizer`` set up (a copy of the caller's)."""
    rows_before = lm.get_input_embeddings().weight.shape[0]
    media_token_id, eoc_token_id, num_base_tokens, vocab_before = _token_ids(
        tokenizer, lm, media_token_id, eoc_token_id, num_base_tokens, trust_remote_code)
    embedding_hint, required = _added_rows_need_embeddings(lm, state, rows_before, vocab_before)
    _resize_to_checkpoint(lm, state, layout, resized_by_tokenizer=tokenizer is not None, rows_before=rows_before)
    # the checkpoint names the LM's decoder-layer list: use it where the LM has it (any LM family)
    if decoder_layers_attr_name is None and _has_attr(lm, layout.decoder_layers_attr):
        decoder_layers_attr_name = layout.decoder_layers_attr
    layers_attr = decoder_layers_attr_for(lm, decoder_layers_attr_name)
    if cross_attn_every_n_layers is None and len(layout.cross_attn_layers) == 1:
        i = layout.cross_attn_layers[0]
        warn_caller(f"the checkpoint holds one cross-attention block (before layer {i}), so its interval is read as "
                    f"{i + 1} (open_flamingo's placement: blocks at layers n-1, 2n-1, ...); if blocks are missing "
                    "from it, pass cross_attn_every_n_layers= (the interval it was trained with) to have them "
                    "reported")
    config = FlamingoConfig(
        vision=VisionConfig(source="open_clip", dim=layout.vis_dim, open_clip_name=vision_name, keep_cls=False,
                            ln_post_on_tokens=ln_post_on_tokens, image_size=open_clip_image_size(visual)),
        resampler=ResamplerConfig(depth=layout.depth, heads=layout.perceiver_inner // OPEN_FLAMINGO_DIM_HEAD,
                                  dim_head=OPEN_FLAMINGO_DIM_HEAD, num_latents=layout.num_latents,
                                  ff_mult=layout.perceiver_ff_mult, max_num_media=layout.max_num_media,
                                  max_num_frames=layout.max_num_frames),
        cross_attention=CrossAttentionConfig(every_n_layers=cross_attn_every_n_layers or layout.every_n,
                                             heads=layout.xattn_inner // OPEN_FLAMINGO_DIM_HEAD,
                                             dim_head=OPEN_FLAMINGO_DIM_HEAD, ff_mult=layout.xattn_ff_mult),
        lm=lm.config.to_dict(), decoder_layers_attr=layers_attr, media_token_id=media_token_id,
        eoc_token_id=eoc_token_id, pad_token_id=getattr(lm.config, "pad_token_id", None),
        eos_token_id=getattr(lm.config, "eos_token_id", None), num_base_tokens=num_base_tokens,
        train_output_embeddings=False)  # open_flamingo trains no output embedding rows
    hint = (f"The checkpoint expects {layout.describe()}.\nThe model was built with {describe_lm(lm, layers_attr)}, "
            f"cross-attention every {config.cross_attention.every_n_layers} layer(s), vision width "
            f"{layout.vis_dim}.\nPass the LM and vision encoder the checkpoint was trained with "
            "(lang_encoder=, vision_encoder=), and leave cross_attn_every_n_layers=None to read it from the "
            "checkpoint.")
    held = resampler_layers_held(state)
    if len(held) < layout.depth:
        hint = (f"open_flamingo builds a resampler of {layout.depth} layers (perceiver.layers.0 to "
                f"{layout.depth - 1}); the checkpoint holds {len(held)} of them: is it complete?\n" + hint)
    if embedding_hint:
        hint = embedding_hint + "\n" + hint
    model = build_and_load(config, state, trainable_only=True, vision_encoder=visual, lang_encoder=lm,
                           extra_required=required, dtype=dtype, quantization=quantization, hint=hint,
                           device_map=device_map, max_memory=max_memory, offload_folder=offload_folder)
    return model


def _embeddings_restorer(lm: nn.Module):
    """A function putting ``lm``'s embeddings back as they are now: the modules, their weight (and
    bias) Parameters and those Parameters' tensors, their sizes, and the config's vocabulary size
    (undoing a resize, which replaces any of them, by transformers version)."""
    modules = [m for m in (lm.get_input_embeddings(), lm.get_output_embeddings()) if m is not None]
    sizes = [{k: getattr(m, k) for k in ("weight", "bias", "num_embeddings", "out_features")
              if getattr(m, k, None) is not None} for m in modules]
    data = [{k: v.data for k, v in attrs.items() if isinstance(v, torch.Tensor)} for attrs in sizes]
    vocab = lm.config.vocab_size

    def restore():
        lm.set_input_embeddings(modules[0])
        if len(modules) > 1:
            lm.set_output_embeddings(modules[1])
        for m, attrs, tensors in zip(modules, sizes, data):
            for k, v in attrs.items():
                setattr(m, k, v)
            for k, t in tensors.items():  # (transformers 5 resizes a Parameter in place: weight.data = ...)
                getattr(m, k).data = t
        lm.config.vocab_size = vocab
    return restore


def _lang_encoder(lang_encoder, layout: OpenFlamingoLayout, trust_remote_code: bool) -> nn.Module:
    if lang_encoder is None:
        raise ValueError(f"pass lang_encoder= (a Hugging Face causal LM or a local directory): the checkpoint holds "
                         f"only the Flamingo parameters and expects {layout.describe()}")
    if isinstance(lang_encoder, (str, Path)):
        return load_hf_causal_lm(str(lang_encoder), trust_remote_code=trust_remote_code)
    return lang_encoder


def _vision_encoder(vision_encoder, layout: OpenFlamingoLayout) -> tuple[nn.Module, str | None]:
    """-> (open_clip vision tower, its model name if known)."""
    if vision_encoder is None:
        raise ValueError(f"pass vision_encoder= (an open_clip vision tower, or a (name, pretrained) pair such as "
                         f"('ViT-L-14', 'openai')): the checkpoint expects vision features of width {layout.vis_dim}")
    if isinstance(vision_encoder, (str, Path)):
        name = str(vision_encoder)
        raise ValueError(f"vision_encoder={name!r} names an open_clip model but not its weights (it would be built "
                         f"with random ones): give (name, pretrained), e.g. ('ViT-L-14', 'openai') as OpenFlamingo's "
                         f"releases, or (name, a local checkpoint path); ({name!r}, None) builds it with random "
                         "weights, on purpose")
    if isinstance(vision_encoder, tuple):
        name, pretrained = vision_encoder
        return open_clip_tower(name, pretrained), name
    return getattr(vision_encoder, "visual", vision_encoder), None


def open_clip_tower(name: str, pretrained: str | None, cache_dir: str | None = None) -> nn.Module:
    """open_clip's vision tower ``name`` with weights ``pretrained`` (a tag, a local checkpoint
    file, or None: random), in eval mode; an unknown name, a missing file or weights open_clip
    cannot get (a tag not cached, offline) an error naming them."""
    import os

    import open_clip
    if name not in open_clip.list_models():
        close = [m for m in open_clip.list_models() if m.lower().startswith(str(name).lower()[:5])][:8]
        raise ValueError(f"{name!r} is not an open_clip model name (e.g. ViT-L-14, as OpenFlamingo's releases"
                         + (f"; close: {close}" if close else "") + "): open_clip.list_models() lists them")
    looks_like_path = isinstance(pretrained, (str, os.PathLike)) and (
        os.sep in str(pretrained) or str(pretrained).endswith((".bin", ".pt", ".pth", ".safetensors")))
    if looks_like_path and not os.path.isfile(pretrained):
        raise FileNotFoundError(f"the vision encoder's weights {str(pretrained)!r} are not a file (a local open_clip "
                                f"checkpoint, or a tag of {name}: {open_clip.list_pretrained_tags_by_model(name)[:6]})")
    try:
        return open_clip.create_model(name, pretrained=pretrained, cache_dir=cache_dir).visual.eval()
    except RuntimeError as e:  # an unknown tag, or a download that failed (offline, not in the cache)
        raise ValueError(f"open_clip could not give {name} its weights {pretrained!r}: {e}") from e


def _token_ids(tokenizer, lm, media_token_id, eoc_token_id, num_base_tokens, trust_remote_code):
    """-> (media id, eoc id, num_base_tokens, the tokenizer's size before the set-up), from a
    tokenizer set up as open_flamingo does; no tokenizer: (..., num_base_tokens as given, None)."""
    if tokenizer is None:
        if media_token_id is None or eoc_token_id is None:
            raise ValueError("pass tokenizer= (to add <image> and <|endofchunk|> as open_flamingo does), or both "
                             f"media_token_id= and eoc_token_id= (got {media_token_id}, {eoc_token_id})")
        return media_token_id, eoc_token_id, num_base_tokens, None
    from ..tokens import setup_tokenizer
    if isinstance(tokenizer, (str, Path)):
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer), local_files_only=True,
                                                  trust_remote_code=trust_remote_code)
    vocab_before = len(tokenizer)
    ids = setup_tokenizer(tokenizer, lm, num_base_tokens=num_base_tokens)
    for name, given in (("media_token_id", media_token_id), ("eoc_token_id", eoc_token_id)):
        if given is not None and given != ids[name]:
            raise ValueError(f"{name}={given}, but the tokenizer set up as open_flamingo does gives {ids[name]}: pass "
                             "tokenizer= alone (it decides the ids), or the ids alone for an LM that already has them")
    return ids["media_token_id"], ids["eoc_token_id"], ids["num_base_tokens"], vocab_before


def _added_rows_need_embeddings(lm: nn.Module, state, rows_before: int,
                                vocab_before: int | None) -> tuple[str, list[str]]:
    """-> (hint, keys the checkpoint must hold besides the blocks'). When the tokenizer set-up
    added tokens (``<|endofchunk|>``, ``<image>``...) or resized the LM's input embeddings, the rows of
    those tokens are untrained here; their trained values are in the checkpoint's input embeddings,
    which open_flamingo saves (its train script keeps every name with "embed" and the trainable
    parameters; it trains the embeddings unless ``--freeze_lm_embeddings``). So the checkpoint must
    hold them. ``vocab_before``: the tokenizer's size before the set-up (None: no tokenizer given)."""
    weight = lm.get_input_embeddings().weight
    rows = weight.shape[0]
    if vocab_before is None or (vocab_before >= rows and rows == rows_before):
        return "", []  # no tokenizer, or one that already held the Flamingo tokens the LM has rows for
    name = next(n for n, p in lm.named_parameters() if p is weight)
    key = f"lang_encoder.{name}"
    if key in state:
        return "", []
    added = f"added {rows - vocab_before} token(s) (<|endofchunk|>, <image>...)" if vocab_before < rows else "ran"
    resized = f" and resized the LM's input embeddings from {rows_before} to {rows} rows" if rows != rows_before else ""
    return (f"The tokenizer set-up {added}{resized}, but the checkpoint does not hold {key}: the rows of the "
            "added tokens would stay random (as resizing left them), not the values the checkpoint was trained "
            "with (open_flamingo's checkpoints hold the input embeddings). Pass the checkpoint that holds them; "
            "or, for an LM whose embeddings already hold the Flamingo tokens, pass media_token_id= and "
            "eoc_token_id= instead of tokenizer=."), [key]


def _resize_to_checkpoint(lm: nn.Module, state, layout: OpenFlamingoLayout, *, resized_by_tokenizer: bool,
                          rows_before: int) -> None:
    """Give the LM as many embedding rows as the checkpoint (open_flamingo resizes to its tokenizer);
    warn where an untied output embedding got rows the checkpoint does not hold."""
    rows = lm.get_input_embeddings().weight.shape[0]
    if resized_by_tokenizer:  # (a size other than the checkpoint's is a mismatch, reported with the other keys)
        if rows != rows_before:
            _warn_fresh_output_rows(lm, state, rows_before, rows, "the tokenizer set-up resized")
        return
    if layout.vocab is None or layout.vocab == rows:
        return
    lm.resize_token_embeddings(layout.vocab)
    _warn_fresh_output_rows(lm, state, rows, layout.vocab, "resized to the checkpoint")


def _warn_fresh_output_rows(lm: nn.Module, state, rows: int, new_rows: int, how: str) -> None:
    out = lm.get_output_embeddings()
    if out is None or getattr(out, "weight", None) is None or out.weight is lm.get_input_embeddings().weight:
        return
    name = next(n for n, p in lm.named_parameters() if p is out.weight)
    if f"lang_encoder.{name}" not in state:
        warn_caller(f"{how} the LM's output embeddings from {rows} to {new_rows} rows but the checkpoint does not hold "
                    f"them (lang_encoder.{name}; open_flamingo never saves them): the {new_rows - rows} new rows keep "
                    "transformers' random initialisation, as in open_flamingo, another at each import (the logits "
                    "of <|endofchunk|> and <image> with them; torch.manual_seed first makes an import repeatable)")
