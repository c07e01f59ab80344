"""The Flamingo model: frozen vision encoder -> Perceiver resampler -> frozen LM with gated
cross-attention blocks, image-causal (SEMANTICS.md)."""
from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import weakref

import torch
from torch import nn

from . import mpt, ops, quant
from .blocks import (ATTENTION_MODULES, Checkpointed, GatedCrossAttentionBlock,
                     IdeficsGatedCrossAttentionBlock, MediaState, PerceiverResampler)
from .checks import check_count
from .config import FlamingoConfig
from .distribute import to_execution_device
from .convert.open_flamingo import drop_duplicate_keys_hook
from .lm import (ATTN_IMPLEMENTATION, decoder_layers, decoder_layers_attr_for, get_attr, lm_hidden_size,
                 lm_intermediate_size, lm_num_heads, position_limit, thin_checkpointing, with_attn_implementation,
                 wrap_decoder_layers)
from .warn import warn_caller
from .vision import (build_vision_model, check_pixels, check_vision_config, check_vision_dim, encoder_width,
                     vision_features)


def build_lm(config: FlamingoConfig) -> nn.Module:
    """A random-weight Hugging Face causal LM from ``config.lm`` (no download)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    lm_cfg = dict(config.lm)
    if "model_type" not in lm_cfg:
        raise ValueError("config.lm must hold a Hugging Face config dict with a 'model_type'")
    impl = lm_cfg.pop(ATTN_IMPLEMENTATION, None)
    hf_config = AutoConfig.for_model(lm_cfg.pop("model_type"), **lm_cfg)
    return with_attn_implementation(  # (a copy each try: a failed one leaves its implementation set in the config)
        lambda **kw: AutoModelForCausalLM.from_config(copy.deepcopy(hf_config), **kw), impl, "the LM")


def text_time_for(input_ids: torch.Tensor, media_token_id: int, eos_token_id: int | None = None) -> torch.Tensor:
    """(B, T) token ids -> (B, T) int32 ``text_time``: the 1-based image each token sees, 0 = none.

    With ``eos_token_id`` (IDEFICS semantics) a token after an EOS sees no image until the next
    ``<image>`` token; the EOS token itself still sees the image before it.
    """
    is_media = input_ids == media_token_id
    text_time = ops.text_time_from_media_locations(is_media)
    if eos_token_id is None:
        return text_time
    pos = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    none = torch.full_like(pos, -1)
    last_media = torch.where(is_media, pos, none).cummax(-1).values
    last_eos = torch.where(input_ids == eos_token_id, pos, none).cummax(-1).values
    eos_before = torch.cat([none[:, :1], last_eos[:, :-1]], dim=1)
    return torch.where(eos_before > last_media, torch.zeros_like(text_time), text_time)


def check_vision_x(vision_x, *, batch: int | None = None) -> None:
    """vision_x is a (B, N, F, C, H, W) float tensor, with ``batch`` rows where given."""
    if not torch.is_tensor(vision_x) or vision_x.dim() != 6:
        raise ValueError("vision_x must be a (B, N_media, F_frames, C, H, W) tensor, got "
                         f"{tuple(vision_x.shape) if torch.is_tensor(vision_x) else type(vision_x).__name__}"
                         "; add singleton dims for one image (N=1) or one frame (F=1)")
    if not vision_x.is_floating_point():
        raise TypeError(f"vision_x must hold float pixels, got {vision_x.dtype}")
    if batch is not None and vision_x.shape[0] != batch:
        raise ValueError(f"vision_x has batch {vision_x.shape[0]} but lang_x has batch {batch}")
    if vision_x.shape[2] == 0:
        raise ValueError(f"vision_x {tuple(vision_x.shape)} has F=0 frames: each image (or video) needs at least "
                         "one frame (F=1 for an image)")


def check_visual_tokens(visual_tokens, config: FlamingoConfig, *, batch: int) -> None:
    """Already encoded images are (B, N, L, D_vis) float tokens, as :meth:`Flamingo.encode_vision`
    returns them: ``batch`` rows, D_vis = ``config.vision.dim`` and, with the resampler, L =
    ``config.latents_per_media`` (swapped N and L would otherwise run as L images of one token)."""
    if not torch.is_tensor(visual_tokens) or visual_tokens.dim() != 4:
        got = tuple(visual_tokens.shape) if torch.is_tensor(visual_tokens) else type(visual_tokens).__name__
        raise ValueError(f"visual_tokens must be (B, N_media, L_tokens, D_vis), as encode_vision returns them, got "
                         f"{got}; add a singleton dim for one image (N=1)")
    if not visual_tokens.is_floating_point():
        raise TypeError(f"visual_tokens must be float, got {visual_tokens.dtype}")
    B, N, L, D = visual_tokens.shape
    if B != batch:
        raise ValueError(f"visual_tokens {tuple(visual_tokens.shape)} has batch {B} but lang_x has batch {batch}")
    if D != config.vision.dim:
        raise ValueError(f"visual_tokens {tuple(visual_tokens.shape)} are {D} wide but config.vision.dim is "
                         f"{config.vision.dim}: give (B, N, L, D_vis) tokens as encode_vision returns them")
    L_want = config.latents_per_media
    if L_want is not None and L != L_want:
        raise ValueError(f"visual_tokens {tuple(visual_tokens.shape)} has L={L} tokens per image but the resampler "
                         f"makes {L_want} (config.resampler.num_latents): the order is (B, N_media, L_tokens, "
                         "D_vis), as encode_vision returns them")


def _values(t: torch.Tensor) -> torch.Tensor:
    """``t``'s values where a ``torch.func.vmap`` batches it (the whole batch, 2-D: rows of every
    vmapped example), so that the input checks, which read values on the host, run under vmap."""
    if not torch._C._functorch.is_functorch_wrapped_tensor(t):
        return t
    while torch._C._functorch.is_functorch_wrapped_tensor(t):
        t = torch._C._functorch.get_unwrapped(t)
    return t.reshape(-1, t.shape[-1])


def check_call(lang_x: torch.Tensor, text_time: torch.Tensor, num_media: int, vocab: int, *,
               derived: bool, labels: torch.Tensor | None = None,
               attention_mask: torch.Tensor | None = None) -> None:
    """Check one call's token ids and image references with one host sync: ids are integers in
    ``[0, vocab)`` (an id out of range fails deep in the embedding, on a GPU as a device assert),
    every token's image was given, and, where ``text_time`` was ``derived`` from the ids' own
    ``<image>`` tokens, every image given is seen by some token (a prompt missing an ``<image>``
    token otherwise ignores its image without a word; a warning, since padding every batch to a
    fixed image count is legitimate). With ``labels`` and ``attention_mask``, a warning where a
    label follows a padding position: the LM's loss predicts label t + 1 from the logits at t, and
    a padding position's logits mean nothing (they attend to no token; every implementation gives
    them something else): the first token of a left-padded row whose label is not -100."""
    if lang_x.is_floating_point() or lang_x.is_complex() or lang_x.dtype == torch.bool:
        raise TypeError(f"lang_x must hold integer token ids, got {lang_x.dtype}")
    lang_x, text_time, labels, attention_mask = (None if t is None else _values(t)
                                                 for t in (lang_x, text_time, labels, attention_mask))
    if lang_x.numel() == 0:
        raise ValueError(f"lang_x {tuple(lang_x.shape)} holds no tokens: give at least one token per row")
    ops.check_text_time_dtype(text_time)
    stats = [lang_x.max(), lang_x.min(), text_time.max().to(lang_x.device, lang_x.dtype),
             text_time.min().to(lang_x.device, lang_x.dtype)]
    if not derived:  # given: its order is checked too (derived from <image> tokens, it is in order)
        stats.append(ops.text_time_decreases(text_time).to(lang_x.device, lang_x.dtype))
    after_padding = None
    if labels is not None and attention_mask is not None and attention_mask.shape == labels.shape:
        after_padding = (attention_mask[:, :-1] == 0) & (labels[:, 1:] != -100)
        stats.append(after_padding.sum().to(lang_x.device, lang_x.dtype))
    hi, lo, worst, least, *rest = torch.stack(stats).tolist()
    decreasing, labelled_after_padding = (rest[:1], rest[1:]) if not derived else ([], rest)
    if hi >= vocab or lo < 0:
        bad = hi if hi >= vocab else lo
        row, col = (lang_x == bad).nonzero()[0].tolist()
        raise ValueError(f"lang_x holds token id {bad} (row {row}, position {col}) but the LM's input embedding "
                         f"has {vocab} rows (ids 0..{vocab - 1}): tokenize with the tokenizer this model was "
                         "built or loaded with (its added <image> / <|endofchunk|> tokens included)")
    ops.check_text_time(text_time, num_media, (worst, least, *decreasing))
    if derived and worst < num_media:
        warn_caller(f"{num_media} images were given per row but no row of lang_x has more than {worst} <image> "
                    f"tokens: image {worst + 1}{f'..{num_media}' if num_media > worst + 1 else ''} is seen by no "
                    "token. Put an <image> token in the text for each image (a missing one is the usual cause), "
                    "or drop the unused images.")
    if labelled_after_padding and labelled_after_padding[0]:
        row, col = after_padding.nonzero()[0].tolist()
        warn_caller(f"labels give row {row} a target at position {col + 1}, right after padding: it is predicted "
                    f"from the logits of padding position {col}, which mean nothing. Set labels to -100 there "
                    "(the first token of a left-padded row), or pad on the right for training.")


# LMs already warned about running past their trained positions (once per LM, as transformers does)
_WARNED_POSITIONS: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


def check_positions(lm: nn.Module, needed: int, what: str) -> None:
    """Refuse a call that would feed ``lm`` more positions than its position table holds (GPT-2,
    OPT, GPT-J: an IndexError deep in the LM, on a GPU a device-side assert that ends the process's
    CUDA context), before any work; warn, once per LM, where its positions extrapolate (rotary,
    ALiBi) past what it was trained with. ``needed``: the largest position id fed, plus one;
    ``what``: the call's lengths, in the user's terms."""
    limit = position_limit(lm)
    if limit is None or needed <= limit[1]:
        return
    field, n, fails = limit
    said = f"this call needs {needed} positions ({what}), but {type(lm).__name__} has {field}={n}"
    if fails:
        raise ValueError(f"{said}, the size of its position table. Shorten the prompt (fewer or shorter "
                         "few-shot demonstrations) or ask for fewer new tokens.")
    if lm not in _WARNED_POSITIONS:
        _WARNED_POSITIONS.add(lm)
        warn_caller(f"{said}: positions past {n} extrapolate beyond what it was trained on, and the output "
                    "may degrade (warned once per model).")


# what a Hugging Face causal LM's forward takes through its **kwargs (transformers' TransformersKwargs
# and the names older forwards spelled out): any other name is a misspelling it would drop silently
LM_KEYWORDS = {"past_key_values", "cache", "cache_position", "position_ids", "inputs_embeds", "use_cache",
               "output_attentions", "output_hidden_states", "return_dict", "logits_to_keep", "num_items_in_batch",
               "output_router_logits", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k",
               "is_causal", "seq_idx", "token_type_ids", "head_mask"}


def _check_lm_kwargs(lm: nn.Module, lm_kwargs: dict) -> None:
    """Keywords ``forward`` hands the LM: ones it takes by name, or :data:`LM_KEYWORDS` where it
    takes ``**kwargs`` (``attn_mask=`` ran unmasked, without a word)."""
    if not lm_kwargs:
        return
    named = _named_parameters(type(lm))
    if named is None:
        return  # (the LM's own forward refuses what it does not take)
    unknown = sorted(set(lm_kwargs) - named - LM_KEYWORDS)
    if unknown:
        import difflib
        ours = set(inspect.signature(Flamingo.forward).parameters) - {"self", "lm_kwargs"}
        close = {k: difflib.get_close_matches(k, sorted(named | LM_KEYWORDS | ours), n=1) for k in unknown}
        hint = "; ".join(f"{k!r}: did you mean {c[0]!r}?" for k, c in close.items() if c)
        raise TypeError(f"Flamingo.forward got unexpected keyword(s) {unknown}"
                        + (f" ({hint})" if hint else "") + f": the LM ({type(lm).__name__}) would ignore them")


@functools.lru_cache(maxsize=None)
def _named_parameters(lm_class) -> frozenset | None:
    """The names ``lm_class.forward`` takes, where it also takes ``**kwargs`` (else None)."""
    params = inspect.signature(lm_class.forward).parameters
    if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return None
    return frozenset(n for n, p in params.items() if p.kind != p.VAR_POSITIONAL)


def _check_attention_mask(mask: torch.Tensor | None, lang_x: torch.Tensor, lm_kwargs: dict) -> None:
    """(B, T), or (B, cached + T) after a cache: Hugging Face pads a shorter mask with zeros (the
    last tokens masked out, silently)."""
    if mask is None:
        return
    B, T = lang_x.shape
    cached = any(lm_kwargs.get(k) is not None for k in ("past_key_values", "cache"))
    if mask.dim() != 2 or mask.shape[0] != B or (mask.shape[1] != T if not cached else mask.shape[1] < T):
        want = f"(B, T) = {(B, T)}" if not cached else f"(B, cached + T) with B = {B}, T = {T}"
        raise ValueError(f"attention_mask has shape {tuple(mask.shape)}, lang_x {(B, T)}: it must be {want} "
                         "(1 = a token to attend to, 0 = padding)")


def _positions_fed(lang_x: torch.Tensor, lm_kwargs: dict) -> tuple[int, str]:
    """(largest position id an LM forward on ``lang_x`` feeds, plus one; the lengths that say so):
    the ``position_ids`` given, else the cached tokens plus T."""
    positions = lm_kwargs.get("position_ids")
    if positions is not None:
        last = int(positions.max())
        return last + 1, f"position_ids up to {last}"
    cache = lm_kwargs.get("past_key_values", lm_kwargs.get("cache"))
    if cache is None:
        past = 0
    elif hasattr(cache, "get_seq_length"):
        past = int(cache.get_seq_length())
    else:  # the legacy tuple of (k, v) per layer
        past = cache[0][0].shape[-2] if len(cache) else 0
    T = lang_x.shape[1]
    return past + T, f"lang_x of {T} tokens" + (f" after {past} cached" if past else "")


class Flamingo(nn.Module):
    """Flamingo over any supported Hugging Face causal LM.

    Args:
        config: the architecture (:class:`~fastflamingo.config.FlamingoConfig`).
        vision_encoder: the frozen encoder module, run as ``config.vision.source`` says
            (:func:`~fastflamingo.vision.vision_features`), or None to build the one
            ``config.vision`` describes (random weights).
        lang_encoder: a Hugging Face causal LM, or None to build ``config.lm`` (random weights).
            The LM instance is wrapped in place: its decoder layers get Flamingo layers around them.

    Attribute names follow open_flamingo's (``vision_encoder``, ``perceiver``, ``lang_encoder``,
    ``...gated_cross_attn_layer...``) so its checkpoints load with ``load_state_dict(strict=False)``.
    """

    def __init__(self, config: FlamingoConfig, vision_encoder: nn.Module | None = None,
                 lang_encoder: nn.Module | None = None):
        super().__init__()
        config.validate()  # again: its fields may have been set since it was made
        self.config = config
        vc = config.vision
        check_vision_config(vc)
        self.vision_encoder = build_vision_model(vc) if vision_encoder is None else vision_encoder
        check_vision_dim(vc, encoder_width(self.vision_encoder, vc))
        self.lang_encoder = build_lm(config) if lang_encoder is None else lang_encoder
        self.perceiver = PerceiverResampler(dim=vc.dim, config=config.resampler) if config.resampler.enabled else None

        self._check_token_ids()
        self._media = MediaState()
        self._checkpointing = False  # activation checkpointing (activation_checkpointing_enable)
        self.decoder_layers_attr = decoder_layers_attr_for(self.lang_encoder, config.decoder_layers_attr)
        n_layers = len(decoder_layers(self.lang_encoder, self.decoder_layers_attr))
        self._check_some_block(n_layers)
        blocks = [self._make_block(i) if config.has_cross_attention(i) else None for i in range(n_layers)]
        wrap_decoder_layers(self.lang_encoder, self.decoder_layers_attr, blocks, self._media)
        mpt.prepare(self.lang_encoder)  # an MPT LM's attention as one SDPA call (fastflamingo.mpt)
        self.gated_cross_attn_layers = [b for b in blocks if b is not None]  # plain list: no duplicate keys
        # open_flamingo checkpoints hold every block twice: load_state_dict drops the copies
        self.register_load_state_dict_pre_hook(drop_duplicate_keys_hook)
        self.set_trainable()
        # given encoders quantized elsewhere (transformers' BitsAndBytesConfig): bitsandbytes' CPU
        # NF4 kernel crashes at some shapes and has no backward (fastflamingo.quant)
        quant.guard_cpu_4bit(self)

    # ---------------------------------------------------------------- construction
    def _check_token_ids(self) -> None:
        """``<image>`` (required) and ``<|endofchunk|>`` are rows of the LM's input embedding: an id
        past them would make every image unseen (no token could be ``<image>``), or fail later."""
        vocab, c = self.vocab_size, self.config
        for name, tid, required in (("media_token_id", c.media_token_id, True), ("eoc_token_id", c.eoc_token_id, False)):
            if tid is None or (tid < 0 and not required):
                continue
            if not 0 <= tid < vocab:
                raise ValueError(f"config.{name}={tid} is not a row of the LM's input embedding ({vocab} rows, ids "
                                 f"0..{vocab - 1}): add Flamingo's tokens to the tokenizer and resize the LM's "
                                 "embeddings first (fastflamingo.setup_tokenizer(tokenizer, lm) does both), and give "
                                 "their ids")

    def _check_some_block(self, n_layers: int) -> None:
        """A placement that puts no block in the LM would build a model on which images have no
        effect (and whose resampler gets no gradient)."""
        c = self.config
        if any(c.has_cross_attention(i) for i in range(n_layers)):
            return
        x = c.cross_attention
        rule = "(i + 1) % n == 0" if x.placement == "after_every_n" else "i % n == 0"
        raise ValueError(f"cross_attention.every_n_layers={x.every_n_layers} puts no cross-attention block in the "
                         f"LM's {n_layers} decoder layers (placement {x.placement!r}: a block before layer i when "
                         f"{rule}), so the images would change nothing: use every_n_layers <= {n_layers}")

    def _make_block(self, layer_idx: int) -> nn.Module:
        c, lm = self.config, self.lang_encoder
        dim, dim_visual = lm_hidden_size(lm), c.vision.dim
        if c.cross_attention.style == "open_flamingo":
            return GatedCrossAttentionBlock(dim=dim, dim_visual=dim_visual, config=c.cross_attention,
                                            only_attend_immediate_media=c.only_attend_immediate_media)
        return IdeficsGatedCrossAttentionBlock(dim=dim, dim_visual=dim_visual, config=c.cross_attention,
                                               lm_heads=lm_num_heads(lm), lm_intermediate=lm_intermediate_size(lm),
                                               only_attend_immediate_media=c.only_attend_immediate_media)

    @classmethod
    def from_preset(cls, name: str, *, device=None, dtype: torch.dtype | None = None, seed: int = 0,
                    quantization: str | None = None, device_map=None, max_memory=None, offload_folder=None,
                    **overrides) -> "Flamingo":
        """A model of a named shape with random weights (see :mod:`fastflamingo.presets`);
        ``quantization="nf4" | "int8"`` quantizes its frozen LM (:func:`fastflamingo.quant.quantize_model`);
        ``device_map`` (with ``max_memory``, ``offload_folder``) spreads it over devices
        (:func:`fastflamingo.distribute.dispatch`)."""
        from .convert.load import check_placement
        from .presets import preset_config
        check_placement(dtype=dtype, device=device, quantization=quantization, device_map=device_map,
                        max_memory=max_memory, offload_folder=offload_folder)
        config = preset_config(name, **overrides)
        torch.manual_seed(seed)
        with torch.device(device) if device is not None else contextlib.nullcontext():
            model = cls(config)
        from .convert.load import finish
        return finish(model, dtype=dtype, device=device, quantization=quantization, device_map=device_map,
                      max_memory=max_memory, offload_folder=offload_folder)

    def train(self, mode: bool = True) -> "Flamingo":
        """As ``nn.Module.train``, but the vision encoder stays in eval mode: it is frozen and runs
        under ``torch.no_grad`` (:meth:`encode_vision`), and in train mode a BatchNorm encoder's
        running statistics (a timm ResNet's) would move at every training forward, unsaved."""
        super().train(mode)
        self.vision_encoder.eval()
        return self

    def _apply(self, fn, recurse=True):
        # every cast (.to(dtype), .half(), .bfloat16()) passes here: NF4 layers follow it. The LM's
        # non-persistent floating buffers (rotary frequencies) keep their dtype, as Hugging Face's
        # from_pretrained(dtype=) leaves them (float32): they are never saved, so a cast model and
        # the same model loaded back (which rebuilds them) compute alike
        kept = [(m, name, b) for m in self.modules() for name, b in m._buffers.items()
                if b is not None and b.is_floating_point() and name in m._non_persistent_buffers_set]
        with quant.nf4_compute_follows_cast(self):
            out = super()._apply(fn, recurse)
        for m, name, before in kept:
            b = m._buffers.get(name)
            if b is not None and b.is_floating_point() and b.dtype != before.dtype:
                m._buffers[name] = before.to(b.device)  # (its own values: cast back, they would stay rounded)
        return out

    def set_trainable(self, train_embeddings: bool | None = None) -> None:
        """Freeze the vision encoder and the LM; train the resampler, the cross-attention blocks and,
        when ``config.num_base_tokens`` is set, the embedding rows of the added tokens only (of the
        output embedding too, when untied, unless ``config.train_output_embeddings`` is False).

        Args:
            train_embeddings: None: as ``config.num_base_tokens`` says; False: no embedding row
                trains, whatever it says; True: the added tokens' rows, which needs
                ``config.num_base_tokens`` (which rows are new; 0 for all of them).
        """
        c = self.config
        if train_embeddings is True and c.num_base_tokens is None:
            raise ValueError("set_trainable(train_embeddings=True) needs config.num_base_tokens, the LM's vocabulary "
                             "size before the Flamingo tokens were added: it says which embedding rows are new and "
                             "train (0: every row). Set it, or leave train_embeddings out")
        self._refuse_quantized_trainables()
        self.requires_grad_(False)
        if self.perceiver is not None:
            self.perceiver.requires_grad_(True)
        for block in self.gated_cross_attn_layers:
            block.requires_grad_(True)
        from .tokens import train_new_embedding_rows
        train_new_embedding_rows(self, c.num_base_tokens if train_embeddings is not False else None,
                                 output=c.train_output_embeddings)

    def _refuse_quantized_trainables(self) -> None:
        from .quant import quantized_modules
        parts = [*self.gated_cross_attn_layers, *([self.perceiver] if self.perceiver is not None else [])]
        held = [f"{type(part).__name__}.{name}" for part in parts for name in quantized_modules(part)]
        if held:
            raise ValueError(f"{len(held)} layers of the trainable parts are quantized (e.g. {held[0]}: "
                             "quantize_model(cross_attention=True) is for inference): they cannot train. Build or "
                             "load the model again, quantized without cross_attention=True, to fine-tune it")

    def image_processor(self):
        """PIL image -> (3, S, S) pixels (S = ``config.vision.image_size``) as this model's own
        project prepares them for inference: open_flamingo's (open_clip's evaluation transform) or
        IDEFICS's processor, by ``config.cross_attention.style``. What ``evaluate``,
        ``fine_tune``'s documents and the command line take as ``image_processor``."""
        from .inputs import image_transform
        return image_transform(self.config.cross_attention.style, self.config.vision.image_size)

    def set_attention_backend(self, backend: str) -> None:
        """Force one backend of :mod:`fastflamingo.ops` (``BACKENDS``) for every attention in the
        model: the cross-attention layers and the resampler's."""
        ops._check_backend(backend)
        for m in self.modules():
            if isinstance(m, ATTENTION_MODULES):
                m.backend = backend

    # ---------------------------------------------------------------- activation checkpointing
    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None,
                                        every_n_layers: int = 1, offload: bool = False) -> None:
        """Trade training time for memory: in training, every decoder layer of the LM (Hugging
        Face's own checkpointing), every gated cross-attention block and every resampler layer
        keeps only its inputs and recomputes the rest in the backward. Same loss and gradients.
        transformers' signature, so its ``Trainer`` (``gradient_checkpointing=True``) turns it on.

        Args:
            activation_checkpointing_kwargs: more arguments of ``torch.utils.checkpoint.checkpoint``
                (``preserve_rng_state``, ``context_fn``, ...). Always non-reentrant: the blocks
                read the visual tokens through the model's media state, not their arguments, which
                reentrant checkpointing would not differentiate (``use_reentrant=True`` is refused).
            every_n_layers: only decoder layers 0, n, 2n, ... (and the cross-attention blocks in
                front of them); the resampler's layers all.
            offload: the inputs each checkpoint keeps go to CPU memory (pinned). Nothing to do
                on a machine without a GPU, where they are in CPU memory already.
        """
        kwargs = dict(activation_checkpointing_kwargs or {})
        if kwargs.pop("use_reentrant", False):
            raise ValueError("use_reentrant=True: fastflamingo's blocks read the visual tokens through the model's "
                             "media state, which reentrant checkpointing would not differentiate (no gradient "
                             "would reach the resampler); leave use_reentrant out, or False")
        check_count("every_n_layers", every_n_layers, 1)
        lm = self.lang_encoder
        hf_kwargs = {**kwargs, "use_reentrant": False}
        offload = bool(offload) and torch.cuda.is_available()  # (transformers 5.1x pins memory even without one)
        if hasattr(lm, "activation_checkpointing_enable"):  # transformers >= 5.2x's name
            lm.activation_checkpointing_enable(activation_checkpointing_kwargs=hf_kwargs, every_n_layers=every_n_layers,
                                               offload=offload)
        elif hasattr(lm, "gradient_checkpointing_enable"):
            if "every_n_layers" in inspect.signature(lm.gradient_checkpointing_enable).parameters:
                lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=hf_kwargs,
                                                 every_n_layers=every_n_layers, offload=offload)
            else:  # transformers before 5.17: every layer, kept on the device; the rest done here
                lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=hf_kwargs)
                thin_checkpointing(lm, hf_kwargs, every_n_layers, offload)
        else:
            raise ValueError(f"{type(lm).__name__} has no activation checkpointing (not a Hugging Face model)")
        if getattr(lm, "_require_grads_hook", None) is not None:
            # transformers makes the embeddings' output require grad, for reentrant checkpointing of a
            # frozen LM; not needed here, and it would make every output require grad
            lm.disable_input_require_grads()
        self._set_block_checkpointing(True, kwargs, every_n_layers, offload)

    def activation_checkpointing_disable(self) -> None:
        """Keep every activation again (the default)."""
        lm = self.lang_encoder
        if hasattr(lm, "activation_checkpointing_disable"):
            lm.activation_checkpointing_disable()
        elif hasattr(lm, "gradient_checkpointing_disable"):
            lm.gradient_checkpointing_disable()
        self._set_block_checkpointing(False, {})

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **kwargs) -> None:
        """:meth:`activation_checkpointing_enable` under transformers' earlier name (what
        open_flamingo's ``gradient_checkpointing`` and older Trainers call)."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    def gradient_checkpointing_disable(self) -> None:
        """:meth:`activation_checkpointing_disable` under transformers' earlier name."""
        self.activation_checkpointing_disable()

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self._checkpointing

    def _set_block_checkpointing(self, enable: bool, kwargs: dict, every_n_layers: int = 1,
                                 offload: bool = False) -> None:
        self._checkpointing = enable
        layers = get_attr(self.lang_encoder, self.decoder_layers_attr)
        # a block checkpoints where the decoder layer it runs in front of does (transformers counts those)
        skipped = {id(layer.gated_cross_attn_layer) for i, layer in enumerate(layers)
                   if i % every_n_layers and getattr(layer, "gated_cross_attn_layer", None) is not None}
        for m in self.modules():
            if isinstance(m, Checkpointed):
                m.gradient_checkpointing = enable and id(m) not in skipped
                m.checkpoint_kwargs, m.checkpoint_offload = dict(kwargs), offload

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(p for p in self.parameters() if p.is_floating_point()).dtype

    # ---------------------------------------------------------------- the model
    def encode_vision(self, vision_x: torch.Tensor) -> torch.Tensor:
        """(B, N, F, C, H, W) pixels -> (B, N, L, D_vis) visual tokens (frozen encoder, then the
        resampler)."""
        check_vision_x(vision_x)
        B, N, F = vision_x.shape[:3]
        mx = self.config.resampler.max_num_media
        if mx is not None and N > mx:
            raise ValueError(f"vision_x has N={N} media per row but the model supports max_num_media={mx}")
        if N == 0:
            return None
        check_pixels(self.vision_encoder, self.config.vision, vision_x.shape[3:])
        pixels = to_execution_device(vision_x.flatten(0, 2).to(self.vision_encoder_dtype), self.vision_encoder)
        with torch.no_grad():
            feats = vision_features(self.vision_encoder, pixels, self.config.vision)
        check_vision_dim(self.config.vision, feats.shape[-1], when="the vision encoder's features are")
        feats = feats.reshape(B, N, F, *feats.shape[1:])
        if self.perceiver is None:
            if F != 1:
                raise ValueError(f"vision_x has F={F} frames but this model has no resampler to merge frames")
            return feats[:, :, 0]
        return self.perceiver(feats.to(self.perceiver.latents.dtype))

    @property
    def vocab_size(self) -> int:
        """Rows of the LM's input embedding: token ids must be below it."""
        embedding = self.lang_encoder.get_input_embeddings()
        rows = getattr(embedding, "num_embeddings", None)
        return rows if rows is not None else embedding.weight.shape[0]

    @property
    def blocks_dtype(self) -> torch.dtype:
        """The dtype of the cross-attention blocks' weights, which project the visual tokens."""
        return next(p for p in self.gated_cross_attn_layers[0].parameters() if p.is_floating_point()).dtype

    @property
    def vision_encoder_dtype(self) -> torch.dtype:
        p = next((p for p in self.vision_encoder.parameters() if p.is_floating_point()), None)
        return p.dtype if p is not None else torch.float32

    def text_time(self, lang_x: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids -> (B, T) ``text_time`` under this model's semantics."""
        c = self.config
        return text_time_for(lang_x, c.media_token_id, c.eos_token_id if c.eos_resets_media else None)

    def forward(self, vision_x: torch.Tensor | None = None, lang_x: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None, *,
                visual_tokens: torch.Tensor | None = None, text_time: torch.Tensor | None = None,
                media_kv_cache: dict | None = None, input_ids: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None, image_attention_mask: torch.Tensor | None = None,
                **lm_kwargs):
        """Run the model.

        Args:
            vision_x: (B, N, F, C, H, W) pixels, one image (or video) per ``<image>`` token.
            lang_x: (B, T) token ids.
            attention_mask: (B, T) text padding mask (1 = keep), passed to the LM only.
            labels: (B, T) targets for the LM loss (-100 = ignore).
            visual_tokens: (B, N, L, D_vis) instead of ``vision_x``, when already encoded.
            text_time: (B, T) instead of deriving it from ``<image>`` tokens (continuing after a
                cached prompt; IDEFICS image masks).
            media_kv_cache: a dict in which each cross-attention layer keeps its visual K/V.
            input_ids, pixel_values, image_attention_mask: IDEFICS's names for ``lang_x``,
                ``vision_x`` without the frame axis (B, N, C, H, W), and the one-hot (B, T, N)
                image mask (each token's image; an all-zero row = no image).
            **lm_kwargs: passed to the LM (``past_key_values``, ``use_cache``, ...).

        Returns:
            The LM's output (``logits`` (B, T, V), ``loss`` when labels are given, ...).
        """
        lang_x, vision_x, text_time = self._idefics_inputs(lang_x, vision_x, text_time, input_ids,
                                                           pixel_values, image_attention_mask)
        if lang_x is None:
            raise ValueError("lang_x (B, T) token ids are required")
        if lang_x.dim() != 2:
            raise ValueError(f"lang_x must be (B, T) token ids, got shape {tuple(lang_x.shape)}")
        _check_lm_kwargs(self.lang_encoder, lm_kwargs)
        _check_attention_mask(attention_mask, lang_x, lm_kwargs)
        if labels is not None and labels.shape != lang_x.shape:
            raise ValueError(f"labels {tuple(labels.shape)} must have lang_x's shape {tuple(lang_x.shape)} "
                             "(the LM shifts them itself; -100 marks positions without a target)")
        if vision_x is not None and visual_tokens is not None:
            raise ValueError("pass vision_x or visual_tokens, not both")
        if getattr(self, "_offloaded", None) and torch.is_grad_enabled() and not getattr(self, "_offload_warned", False):
            from .distribute import offload_message, offloaded_trainable
            if offloaded := offloaded_trainable(self):
                self._offload_warned = True  # (once: an inference call without torch.no_grad is fine)
                warn_caller(offload_message(offloaded))
        if vision_x is not None:
            check_vision_x(vision_x, batch=lang_x.shape[0])
            if vision_x.device != lang_x.device:
                raise ValueError(f"vision_x is on {vision_x.device} but lang_x is on {lang_x.device}")
            visual_tokens = self.encode_vision(vision_x)
            if visual_tokens is not None:  # (the resampler's dtype; the blocks, in the LM, may be cast apart)
                visual_tokens = visual_tokens.to(self.blocks_dtype)
        elif visual_tokens is not None:
            check_visual_tokens(visual_tokens, self.config, batch=lang_x.shape[0])
            visual_tokens = visual_tokens.to(self.blocks_dtype)  # as vision_x goes to the encoder's dtype
        derived = text_time is None
        if derived:
            text_time = self.text_time(lang_x)
        num_media = 0 if visual_tokens is None else visual_tokens.shape[1]
        check_call(lang_x, text_time, num_media, self.vocab_size, derived=derived, labels=labels,
                   attention_mask=attention_mask)
        check_positions(self.lang_encoder, *_positions_fed(lang_x, lm_kwargs))
        if self._checkpointing and self.training:  # (the LM's layers would turn a cache off, with a warning)
            lm_kwargs.setdefault("use_cache", False)
        with self.conditioned(visual_tokens, text_time, media_kv_cache):
            return self.lang_encoder(input_ids=lang_x, attention_mask=attention_mask, labels=labels, **lm_kwargs)

    @staticmethod
    def _idefics_inputs(lang_x, vision_x, text_time, input_ids, pixel_values, image_attention_mask):
        """Map IDEFICS-style keyword inputs onto the open_flamingo-style ones."""
        if input_ids is not None:
            if lang_x is not None:
                raise ValueError("pass lang_x or input_ids, not both")
            lang_x = input_ids
        if pixel_values is not None:
            if vision_x is not None:
                raise ValueError("pass vision_x or pixel_values, not both")
            if pixel_values.dim() != 5:
                raise ValueError(f"pixel_values must be (B, N, C, H, W), got shape {tuple(pixel_values.shape)}")
            vision_x = pixel_values[:, :, None]
        if image_attention_mask is not None:
            if text_time is not None:
                raise ValueError("pass text_time or image_attention_mask, not both")
            m = image_attention_mask.bool()
            if (m.sum(-1) > 1).any():
                raise ValueError("image_attention_mask gives a token more than one image; fastflamingo follows "
                                 "IDEFICS's processor, which gives each token at most one (its last image)")
            text_time = torch.where(m.any(-1), m.to(torch.int32).argmax(-1) + 1, 0).to(torch.int32)
        return lang_x, vision_x, text_time

    @contextlib.contextmanager
    def conditioned(self, visual_tokens: torch.Tensor | None, text_time: torch.Tensor, kv_cache: dict | None = None):
        """Within the block, the LM's cross-attention layers see these visual tokens and text_time."""
        m = self._media
        previous = (m.visual, m.text_time, m.kv_cache)
        m.visual, m.text_time, m.kv_cache = visual_tokens, text_time.to(torch.int32), kv_cache
        try:
            yield
        finally:
            m.visual, m.text_time, m.kv_cache = previous

    def save_pretrained(self, directory, *, trainable_only: bool = False, state: dict | None = None):
        """Write ``config.json`` + ``model.safetensors`` (see :mod:`fastflamingo.convert.pretrained`)."""
        from .convert.pretrained import save_pretrained
        return save_pretrained(self, directory, trainable_only=trainable_only, state=state)

    @classmethod
    def from_pretrained(cls, directory, *, quantization=None, device=None, dtype: torch.dtype | None = None,
                        lang_encoder=None, vision_encoder=None, device_map=None, max_memory=None,
                        offload_folder=None, trust_remote_code: bool = False) -> "Flamingo":
        """Rebuild a model written by :meth:`save_pretrained` (see :mod:`fastflamingo.convert.pretrained`).
        ``trust_remote_code``: a trainable-only directory's recorded base LM may be built with its
        repository's own code (off by default: no remote code runs unless asked)."""
        from .convert.pretrained import load_pretrained
        return load_pretrained(directory, quantization=quantization, device=device, dtype=dtype,
                               lang_encoder=lang_encoder, vision_encoder=vision_encoder, device_map=device_map,
                               max_memory=max_memory, offload_folder=offload_folder,
                               trust_remote_code=trust_remote_code)

    def generate(self, vision_x: torch.Tensor | None = None, lang_x: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, *, input_ids: torch.Tensor | None = None,
                 pixel_values: torch.Tensor | None = None, image_attention_mask: torch.Tensor | None = None,
                 generation_config=None, **kwargs):
        """Generate after images and a prompt: (B, T) -> (B, T + new tokens). Hugging Face-style
        arguments; see :func:`fastflamingo.generation.generate`. A transformers
        ``GenerationConfig`` given as ``generation_config`` adds the settings it changes from the
        defaults (arguments passed by name win), as in Hugging Face's ``generate``.

        IDEFICS's processor output works as it is: ``model.generate(**inputs, max_new_tokens=...)``
        with ``input_ids``, ``pixel_values`` (B, N, C, H, W), ``attention_mask`` and
        ``image_attention_mask``. New tokens see each row's last image (IDEFICS's ``generate``
        does the same), so the image mask must be the one the ``<image>`` tokens give; another is
        an error, not silently replaced.
        """
        from .generation import generate, hugging_face_arguments
        kwargs = hugging_face_arguments(generation_config, kwargs)
        lang_x, vision_x, text_time = self._idefics_inputs(lang_x, vision_x, None, input_ids, pixel_values,
                                                           image_attention_mask)
        if lang_x is None:
            raise ValueError("lang_x (or input_ids), the (B, T) prompt token ids, is required")
        if text_time is not None:
            self._check_image_mask(lang_x, attention_mask, text_time)
        return generate(self, vision_x, lang_x, attention_mask, **kwargs)

    def _check_image_mask(self, lang_x: torch.Tensor, attention_mask: torch.Tensor | None,
                          text_time: torch.Tensor) -> None:
        """An IDEFICS image mask given to :meth:`generate` must say what the ids say (padding aside)."""
        if text_time.shape != lang_x.shape:
            raise ValueError(f"image_attention_mask covers {tuple(text_time.shape)} tokens but input_ids is "
                             f"{tuple(lang_x.shape)}")
        real = torch.ones_like(lang_x, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        derived = self.text_time(lang_x.masked_fill(~real, -1)).to(text_time.device)
        bad = (derived != text_time) & real.to(text_time.device)
        if bool(bad.any()):
            row, col = bad.nonzero()[0].tolist()
            raise ValueError(f"image_attention_mask gives token {col} of row {row} image {int(text_time[row, col])} "
                             f"(0 = none) but its <image> tokens give image {int(derived[row, col])}: generation "
                             "follows the <image> tokens (IDEFICS's processor builds the mask from them); for "
                             "another mask, call the model's forward with it")

    def compute_transition_scores(self, sequences: torch.Tensor, scores, beam_indices: torch.Tensor | None = None,
                                  normalize_logits: bool = False) -> torch.Tensor:
        """(rows, new tokens): the score each step gave its token, from
        ``generate(..., return_dict_in_generate=True, output_scores=True)``, as Hugging Face's method
        of this name; see :func:`fastflamingo.generation.transition_scores`."""
        from .generation import transition_scores
        return transition_scores(sequences, scores, beam_indices, normalize_logits)

    def score(self, vision_x: torch.Tensor | None, lang_x: torch.Tensor, continuations,
              attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """Log-likelihood (B, C) of each of C candidate continuations after each prompt, each prompt
        encoded once; see :func:`fastflamingo.generation.score`."""
        from .generation import score
        return score(self, vision_x, lang_x, continuations, attention_mask, **kwargs)

    def cache_media(self, input_ids: torch.Tensor, vision_x: torch.Tensor) -> None:
        """Encode ``vision_x`` once for repeated scoring (open_flamingo's name): until
        :meth:`uncache_media`, calls without images attend to these, text after the last one
        attending to it. See :mod:`fastflamingo.generation.media_cache`."""
        from .generation.media_cache import cache_media
        cache_media(self, input_ids, vision_x)

    def uncache_media(self) -> None:
        """Forget the images of :meth:`cache_media`."""
        from .generation.media_cache import uncache_media
        uncache_media(self)

    def parameter_groups(self, weight_decay: float = 0.1) -> list[dict]:
        """Optimizer groups over the trainable parameters: weight decay on the matrices of the
        resampler and cross-attention blocks; none on norms, gates, latents and embeddings (so
        the frozen rows of a partly trainable embedding never move)."""
        decay, no_decay = [], []
        from .tokens import embedding_matrices
        embeddings = {id(w) for w in embedding_matrices(self)}
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            (decay if p.dim() >= 2 and id(p) not in embeddings and "latents" not in name else no_decay).append(p)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
