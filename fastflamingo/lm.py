"""The frozen language model, by composition.

Any decoder-only Hugging Face causal LM whose decoder layers sit in one ``nn.ModuleList`` works:
each decoder layer of the user's LM *instance* is wrapped in a :class:`FlamingoLayer` that runs
the gated cross-attention block (if this layer has one) and then the original layer, untouched.
The LM's class is never modified, so other instances of it are unaffected.
"""
from __future__ import annotations

import functools

import torch
from torch import nn

from . import mpt
from .blocks import MediaState, checkpoint_call

# Hugging Face ``config.model_type`` -> dotted path of the decoder-layer list.
DECODER_LAYERS_ATTR = {
    "llama": "model.layers",
    "mistral": "model.layers",
    "qwen2": "model.layers",
    "gemma": "model.layers",
    "gemma2": "model.layers",
    "gemma3_text": "model.layers",
    "qwen3": "model.layers",
    "phi": "model.layers",
    "phi3": "model.layers",
    "falcon": "transformer.h",
    "mpt": "transformer.blocks",
    "gpt_neox": "gpt_neox.layers",
    "opt": "model.decoder.layers",
    "gptj": "transformer.h",
    "gpt2": "transformer.h",
    "idefics": "model.layers",
}


# ``FlamingoConfig.lm``'s key for the attention implementation the LM ran when saved (transformers'
# ``config.to_dict`` leaves ``_attn_implementation`` out: an "eager" LM was rebuilt "sdpa")
ATTN_IMPLEMENTATION = "attn_implementation"


def with_attn_implementation(make, impl: str | None, where: str):
    """``make(attn_implementation=impl)``, the LM as it was saved; where ``impl`` cannot run here
    (``"flash_attention_2"`` without flash-attn, saved on a GPU machine), a warning naming it and
    ``make()`` (transformers' default). ``impl`` None: ``make()``."""
    if impl is None:
        return make()
    try:
        return make(attn_implementation=impl)
    except (ImportError, ValueError) as e:
        if "attention" not in str(e).lower():
            raise  # (another failure, not this implementation's)
        from .warn import warn_caller
        warn_caller(f"{where} was saved running attention {impl!r}, which cannot run here ({e}): it runs "
                    "transformers' default instead (the same outputs, to rounding)")
        return make()


def decoder_layers_attr_for(lm: nn.Module, override: str | None = None) -> str:
    """The dotted path of ``lm``'s decoder-layer ``ModuleList``, or a clear error."""
    if override:
        return override
    model_type = getattr(getattr(lm, "config", None), "model_type", None)
    if model_type in DECODER_LAYERS_ATTR:
        return DECODER_LAYERS_ATTR[model_type]
    raise ValueError(
        f"fastflamingo does not know where the decoder layers of a {type(lm).__name__} "
        f"(model_type={model_type!r}) are. Supported LM families: {sorted(DECODER_LAYERS_ATTR)}. "
        "For another decoder-only LM pass decoder_layers_attr='path.to.layers' (the nn.ModuleList "
        "of its decoder blocks).")


# families whose position ids index a table of fixed size (learned embeddings; GPT-J's sinusoid
# table): past its end the LM fails, with an IndexError (on a GPU, a device-side assert)
_POSITION_TABLES = {"gpt2": "n_positions", "gptj": "n_positions", "opt": "max_position_embeddings",
                    "gpt_neo": "max_position_embeddings", "gpt_bigcode": "n_positions",
                    "biogpt": "max_position_embeddings"}


def position_limit(lm: nn.Module) -> tuple[str, int, bool] | None:
    """How many positions ``lm`` was built for: (its config field, the number, whether the LM fails
    past it), or None where its config names no such number.

    GPT-2, OPT and GPT-J fail past their position tables. Rotary positions (LLaMA, GPT-NeoX, ...)
    and the ALiBi of an MPT run by :mod:`fastflamingo.mpt` extrapolate: the LM runs, on positions it
    was not trained on. Hugging Face's own eager MPT fails past ``max_seq_len`` (its ALiBi table's
    width).
    """
    cfg = getattr(lm, "config", None)
    model_type = getattr(cfg, "model_type", None)
    if model_type in _POSITION_TABLES:
        field = _POSITION_TABLES[model_type]
        return field, int(getattr(cfg, field)), True
    for field in ("max_position_embeddings", "max_seq_len", "n_positions"):
        n = getattr(cfg, field, None)
        if isinstance(n, int) and n > 0:
            if model_type == "mpt":
                return field, n, not mpt.is_prepared(lm)
            return field, n, False
    return None


def thin_checkpointing(lm: nn.Module, checkpoint_kwargs: dict, every_n_layers: int, offload: bool) -> None:
    """``every_n_layers`` and ``offload`` of transformers 5.17's ``gradient_checkpointing_enable``,
    for the versions before it, which checkpoint every decoder layer and keep the inputs on the
    device: after their ``gradient_checkpointing_enable``, decoder layers 0, n, 2n, ... keep it (as
    5.17 counts them: its ``GradientCheckpointingLayer`` modules in order), and with ``offload``
    their checkpoint keeps its inputs in pinned CPU memory."""
    if every_n_layers == 1 and not offload:
        return
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in lm.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers:
        raise ValueError(f"every_n_layers={every_n_layers}, offload={offload}: {type(lm).__name__}'s layers are no "
                         "transformers GradientCheckpointingLayer, which this transformers version needs for them; "
                         "use every_n_layers=1 and offload=False, or transformers >= 5.17")
    offloaded = functools.partial(checkpoint_call, offload=True, **checkpoint_kwargs)
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = i % every_n_layers == 0
        if offload:
            layer._gradient_checkpointing_func = offloaded


def get_attr(obj, dotted: str):
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def set_attr(obj, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        obj = getattr(obj, part)
    setattr(obj, last, value)


def lm_hidden_size(lm: nn.Module) -> int:
    """The width of the hidden states between the decoder layers (where the blocks run): the
    config's, not the embedding's, which may differ (OPT-350m projects its 512-wide embeddings to
    1024); the embedding's width where the config names none."""
    cfg = getattr(lm, "config", None)
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    for name in ("hidden_size", "d_model", "n_embd"):
        width = getattr(cfg, name, None)
        if isinstance(width, int) and width > 0:
            return width
    return lm.get_input_embeddings().weight.shape[1]


def decoder_layers(lm: nn.Module, attr: str) -> nn.ModuleList:
    """``lm``'s decoder-layer list at the dotted path ``attr``, or an error naming the option."""
    obj = lm
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"decoder_layers_attr={attr!r}: {type(obj).__name__} has no attribute {part!r}; give "
                             f"the dotted path of {type(lm).__name__}'s nn.ModuleList of decoder blocks (e.g. "
                             "'model.layers')")
        obj = getattr(obj, part)
    if not isinstance(obj, nn.ModuleList):
        raise ValueError(f"decoder_layers_attr={attr!r} is a {type(obj).__name__}, not the nn.ModuleList of "
                         f"{type(lm).__name__}'s decoder blocks")
    return obj


def lm_num_heads(lm: nn.Module) -> int:
    c = lm.config
    for name in ("num_attention_heads", "n_heads", "n_head", "num_heads"):
        if getattr(c, name, None):
            return getattr(c, name)
    raise ValueError(f"cannot read the number of attention heads from {type(c).__name__}")


def lm_intermediate_size(lm: nn.Module) -> int:
    c = lm.config
    return getattr(c, "intermediate_size", None) or 4 * lm_hidden_size(lm)


class FlamingoLayer(nn.Module):
    """A decoder layer of the frozen LM, preceded by its gated cross-attention block (or None).

    Forwards every argument of the decoder layer untouched (positional ones too, which GPT-2
    blocks use), so it fits any LM whose layers take the hidden states first.
    """

    def __init__(self, gated_cross_attn_layer: nn.Module | None, decoder_layer: nn.Module, media: MediaState):
        super().__init__()
        self.gated_cross_attn_layer = gated_cross_attn_layer
        self.decoder_layer = decoder_layer
        # the media state is shared by all layers and owned by the model: not a submodule
        object.__setattr__(self, "_media", media)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        if self.gated_cross_attn_layer is not None:
            media = self._media
            if media.text_time is None:
                raise RuntimeError("the LM inside a Flamingo model was called directly; call the Flamingo "
                                   "model (or use model.lang_encoder only through it)")
            hidden_states = self.gated_cross_attn_layer(hidden_states, media)
        return self.decoder_layer(hidden_states, *args, **kwargs)

    def __getattr__(self, name):
        # LM code sometimes reads attributes of its layers (e.g. ``attention_type``)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["decoder_layer"], name)


def wrap_decoder_layers(lm: nn.Module, layers_attr: str, blocks: list[nn.Module | None],
                        media: MediaState) -> None:
    """Replace ``lm.<layers_attr>`` by FlamingoLayers around the same decoder layers."""
    layers = get_attr(lm, layers_attr)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{layers_attr} of {type(lm).__name__} is a {type(layers).__name__}, not an nn.ModuleList")
    if len(blocks) != len(layers):
        raise ValueError(f"{len(blocks)} cross-attention slots for {len(layers)} decoder layers")
    if any(isinstance(layer, FlamingoLayer) for layer in layers):
        raise ValueError(f"this {type(lm).__name__} is already the LM of a Flamingo model (its decoder layers are "
                         "wrapped): one LM module serves one model. Pass a fresh LM (load it again, or "
                         "copy.deepcopy it before the first model takes it)")
    set_attr(lm, layers_attr, nn.ModuleList(FlamingoLayer(b, layer, media) for b, layer in zip(blocks, layers)))


def unwrap_decoder_layers(lm: nn.Module, layers_attr: str) -> None:
    """Undo :func:`wrap_decoder_layers`: ``lm.<layers_attr>`` holds its own decoder layers again."""
    layers = get_attr(lm, layers_attr)
    set_attr(lm, layers_attr, nn.ModuleList(layer.decoder_layer if isinstance(layer, FlamingoLayer) else layer
                                            for layer in layers))
