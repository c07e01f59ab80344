"""fastflamingo's own format: a directory with ``config.json`` (:class:`FlamingoConfig`) and
``model.safetensors``, holding the full model or only what training changes.

* full: every tensor; the model rebuilds from the directory alone (for vision sources that
  can be built from the config: hf_clip, timm, open_clip with a model name).
* trainable-only: the resampler, the cross-attention blocks and the LM's input and output
  embeddings (resized for the Flamingo tokens); the frozen LM and vision encoder come from where
  the model got them (recorded in the file's metadata when known) or from the caller. A vision
  encoder that nothing recorded would rebuild (open_clip ``(name, None)``: random weights) is
  stored too (:func:`stores_vision`), so the save reloads exactly.

Tensors that share storage (tied embeddings) are stored once; the aliases are in the metadata.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from torch import nn

from ..config import FlamingoConfig
from ..lm import ATTN_IMPLEMENTATION, with_attn_implementation
from .io import load_hf_causal_lm, load_state_file
from .load import build_and_load, check_placement

CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"
SOURCES_ATTR = "base_model_sources"  # model attribute: {"lm": path, "vision": [open_clip name, pretrained],
#   "base": the full fastflamingo directory the model was loaded from}
BASE = "base"
VISION_PREFIX = "vision_encoder."


def record_sources(model: nn.Module, lm=None, vision=None, cache_dir: str | None = None) -> None:
    """Remember where the frozen parts came from (a local LM directory or hub name; an open_clip
    ``[name, pretrained]``; the download cache they were found in), for trainable-only saves.
    Modules given instead of names are not recorded."""
    sources = {} if cache_dir is None else {"cache_dir": str(Path(cache_dir).resolve())}
    if isinstance(lm, (str, Path)):
        sources["lm"] = str(Path(lm).resolve()) if Path(lm).is_dir() else str(lm)
    if vision is not None:
        name, *pretrained = vision  # a local checkpoint file by its absolute path: found from any directory
        sources["vision"] = [name, *(str(Path(p).resolve()) if isinstance(p, (str, Path)) and Path(p).is_file()
                                     else p for p in pretrained)]
    setattr(model, SOURCES_ATTR, sources)


def trainable_keys(model: nn.Module) -> list[str]:
    """State-dict keys a trainable-only save holds: the trainable parameters, the LM's input and
    output embeddings, and the vision encoder's weights where :func:`stores_vision`."""
    lm = model.lang_encoder
    embeddings = {id(lm.get_input_embeddings().weight)}
    if lm.get_output_embeddings() is not None:
        embeddings.add(id(lm.get_output_embeddings().weight))
    keys = [name for name, p in model.named_parameters(remove_duplicate=False)
            if p.requires_grad or id(p) in embeddings]
    if stores_vision(model):
        keys += [k for k in model.state_dict() if k.startswith(VISION_PREFIX) and k not in keys]
    return keys


def stores_vision(model: nn.Module) -> bool:
    """Whether a trainable-only save of ``model`` must hold its vision encoder's weights: nothing
    the loader would rebuild it from gives them. A recorded open_clip ``[name, None]`` is random
    weights, another on every load; a model that records its LM but not its vision encoder (nor a
    base directory) would be rebuilt with one made from the config, random too."""
    sources = getattr(model, SOURCES_ATTR, {})
    if sources.get(BASE):
        return False  # loaded from a full directory: the frozen parts come from there
    if sources.get("vision"):
        return sources["vision"][1] is None
    v = model.config.vision
    buildable = {"hf_clip": True, "timm": bool(v.timm_name), "open_clip": bool(v.open_clip_name)}.get(v.source, False)
    return bool(sources.get("lm")) and buildable


def save_pretrained(model: nn.Module, directory: str | Path, *, trainable_only: bool = False,
                    progress: bool = False, state: dict | None = None) -> Path:
    """Write ``config.json`` and ``model.safetensors`` (full, or trainable-only) into ``directory``.
    ``state``: the tensors to write, when ``model.state_dict()`` does not hold them whole (a model
    sharded by FSDP2: :func:`fastflamingo.distribute.gather_state`); weights a ``device_map``
    offloaded to "cpu" / "disk" are read back from accelerate (:func:`fastflamingo.distribute.placed_state`)."""
    from safetensors.torch import save_file
    d = Path(directory)
    base = getattr(model, SOURCES_ATTR, {}).get(BASE)
    if trainable_only and base and Path(base).resolve() == d.resolve():
        raise ValueError(f"{str(d)!r} holds the model this one was loaded from, whose frozen weights a trainable-only "
                         "save over it would go onto: it would overwrite them with the trained ones alone. Save to "
                         "another directory (it records this one as its base), or save the whole model "
                         "(trainable_only=False)")
    d.mkdir(parents=True, exist_ok=True)
    if state is None:
        from ..distribute import placed_state
        state = placed_state(model)  # weights offloaded by device_map read back
    if trainable_only:
        state = {k: state[k] for k in trainable_keys(model)}
    _refuse_quantized(model, state, trainable_only)
    tensors, aliases = {}, {}
    seen: dict[tuple, str] = {}
    for key, t in _progress(state.items(), progress, "saving"):
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if ident in seen:
            aliases[key] = seen[ident]
            continue
        seen[ident] = key
        tensors[key] = t.detach().to("cpu").contiguous().clone()  # clone: no storage shared with another
    metadata = {"format": "pt", "fastflamingo.contents": "trainable" if trainable_only else "full",
                "fastflamingo.aliases": json.dumps(aliases),
                "fastflamingo.sources": json.dumps(getattr(model, SOURCES_ATTR, {}))}
    lm_dtype = next((p.dtype for p in model.lang_encoder.parameters() if p.is_floating_point()), None)
    if trainable_only and lm_dtype is not None:  # (the frozen parts are rebuilt from their source, in its dtype)
        metadata["fastflamingo.dtype"] = str(lm_dtype).removeprefix("torch.")
    (d / CONFIG_NAME).write_text(_config_to_save(model).to_json())
    save_file(tensors, str(d / WEIGHTS_NAME), metadata=metadata)
    return d


def _config_to_save(model: nn.Module) -> FlamingoConfig:
    """The model's config, its LM's attention implementation recorded (:data:`fastflamingo.lm.ATTN_IMPLEMENTATION`):
    the LM rebuilt on load runs it too, not transformers' default."""
    impl = getattr(model.lang_encoder.config, "_attn_implementation", None)
    if not isinstance(impl, str):
        return model.config
    return dataclasses.replace(model.config, lm={**model.config.lm, ATTN_IMPLEMENTATION: impl})


def _refuse_quantized(model: nn.Module, state: dict, trainable_only: bool) -> None:
    """4- and 8-bit layers would be written as bitsandbytes' packed tensors and statistics, which
    :func:`load_pretrained` (it quantizes 16-bit weights at load) cannot read back: refuse them."""
    from ..quant import quantized_modules
    names = quantized_modules(model)
    # trainable-only: a quantized cross-attention layer is not trainable, so not in ``state``, but
    # the rebuilt model trains it and needs its weights
    hit = [n for n in names if any(k.startswith(n + ".") for k in state)
           or (trainable_only and ".gated_cross_attn_layer." in f".{n}.")]
    if hit:
        raise ValueError(f"{len(names)} layer(s) of this model hold quantized weights (e.g. {hit[0]}), which "
                         "fastflamingo's format does not store (they would not load back). Save the 16-bit model and "
                         "quantize when loading (Flamingo.from_pretrained(directory, quantization='nf4')), or save "
                         "only what training changes: save_pretrained(directory, trainable_only=True)"
                         + ("" if not trainable_only else " of a model whose cross-attention blocks are not quantized"))


def check_model_directory(directory: str | Path) -> Path:
    """``directory`` as a Path, or an error saying what it is instead of a fastflamingo model
    directory (missing, a file, or without its config or weights)."""
    d = Path(directory)
    if d.is_file():
        raise NotADirectoryError(
            f"{str(d)!r} is a file: a fastflamingo model is a directory written by save_pretrained or `fastflamingo "
            f"convert` (for a `fastflamingo finetune` run, its model/ folder, not checkpoint.pt; an open_flamingo "
            f"checkpoint file loads with fastflamingo.from_open_flamingo or `fastflamingo convert open_flamingo`)")
    if not d.is_dir():
        raise FileNotFoundError(f"{str(d)!r} does not exist: a fastflamingo model is a local directory written by "
                                f"save_pretrained or `fastflamingo convert` (nothing is downloaded; for a Hugging "
                                f"Face IDEFICS model use fastflamingo.from_idefics)")
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (d / name).is_file():
            raise FileNotFoundError(f"{str(d)!r} is not a fastflamingo directory: {name} is missing")
    return d


def load_pretrained(directory: str | Path, *, lang_encoder=None, vision_encoder: nn.Module | None = None,
                    quantization=None, device=None, dtype: torch.dtype | None = None,
                    trust_remote_code: bool = False, device_map=None, max_memory=None, offload_folder=None):
    """Rebuild a model written by :func:`save_pretrained`.

    Args:
        lang_encoder: for a trainable-only directory, the base LM (module or local path); by default
            the path recorded when the model was made by :func:`fastflamingo.create_model_and_transforms`,
            or, for a model loaded from a full directory (what ``fastflamingo finetune --model`` takes),
            that whole directory, the saved weights over it.
        vision_encoder: the vision encoder module, where the config cannot build it (or, for
            trainable-only, where no open_clip name/pretrained pair was recorded and the directory
            does not store its weights; stored weights are loaded into it).
        quantization: passed to :func:`fastflamingo.quant.quantize_model`.
        device, dtype: where and in which dtype the model ends up (None: the file's; for a
            trainable-only save whose frozen parts are rebuilt from what it records, the dtype
            the model had when saved).
        device_map, max_memory, offload_folder: spread the model over devices with accelerate
            (:func:`fastflamingo.distribute.dispatch`; after quantization).
    """
    from safetensors import safe_open
    check_placement(dtype=dtype, device=device, quantization=quantization, device_map=device_map,
                    max_memory=max_memory, offload_folder=offload_folder)
    d = check_model_directory(directory)
    text = (d / CONFIG_NAME).read_text()
    _refuse_other_configs(d, text)
    try:
        config = FlamingoConfig.from_json(text)
    except json.JSONDecodeError as e:  # (named no file: "Expecting property name ...")
        raise ValueError(f"{str(d / CONFIG_NAME)!r} is not valid JSON ({e}): is the file complete? save_pretrained "
                         "or `fastflamingo convert` writes it") from e
    state = load_state_file(d / WEIGHTS_NAME)  # a truncated file fails here, with a clear message
    with safe_open(str(d / WEIGHTS_NAME), framework="pt") as f:
        meta = f.metadata() or {}
    for alias, target in json.loads(meta.get("fastflamingo.aliases", "{}")).items():
        state[alias] = state[target]
    sources = json.loads(meta.get("fastflamingo.sources", "{}"))
    trainable_only = meta.get("fastflamingo.contents") == "trainable"
    saved_dtype = getattr(torch, meta.get("fastflamingo.dtype", ""), None)
    if trainable_only and dtype is None and lang_encoder is None and vision_encoder is None \
            and isinstance(saved_dtype, torch.dtype):
        dtype = saved_dtype  # the model's dtype when saved (a bfloat16 conversion stays bfloat16)
    if not trainable_only:  # a trainable-only save of this model (fine-tuning's) reloads its frozen parts from here
        sources = {**sources, BASE: str(d.resolve())}
    elif lang_encoder is None and vision_encoder is None and sources.get(BASE):
        return _onto_base(d, state, sources, quantization=quantization, device=device, dtype=dtype,
                          trust_remote_code=trust_remote_code, device_map=device_map, max_memory=max_memory,
                          offload_folder=offload_folder)
    vision_keys = []
    if trainable_only:
        lang_encoder = _base_lm(lang_encoder, sources, config, d, trust_remote_code)
        vision_encoder, vision_keys = _base_vision(vision_encoder, sources, config, d, state)
        _resize(lang_encoder, state)
    elif vision_encoder is None and config.vision.source == "open_clip" and not config.vision.open_clip_name:
        raise ValueError(f"{str(d)!r}: the config names no open_clip model to rebuild the vision encoder from "
                         "(the model was converted from a live open_flamingo model): pass vision_encoder=")
    elif isinstance(lang_encoder, (str, Path)):
        raise ValueError(f"{str(d)!r} holds the full model: lang_encoder= takes a module to load its weights into, "
                         f"not a path ({str(lang_encoder)!r})")
    model = build_and_load(config, state, trainable_only=trainable_only, vision_encoder=vision_encoder,
                           lang_encoder=lang_encoder, extra_required=vision_keys, dtype=dtype, device=device,
                           quantization=quantization, device_map=device_map, max_memory=max_memory,
                           offload_folder=offload_folder)
    setattr(model, SOURCES_ATTR, sources)
    return model


def _refuse_other_configs(d: Path, text: str) -> None:
    """A Hugging Face model's directory (its config has a ``model_type``, fastflamingo's has none)
    is named as such, not as a FlamingoConfig with unknown fields."""
    try:
        raw = json.loads(text)
    except ValueError:
        return  # (FlamingoConfig.from_json says what is wrong with it)
    if isinstance(raw, dict) and "model_type" in raw and "lm" not in raw:
        kind = raw["model_type"]
        hint = ("fastflamingo.from_idefics (or `fastflamingo convert idefics`) imports it" if kind == "idefics" else
                "as an LM it goes into a Flamingo as create_model_and_transforms(..., lang_encoder_path=...) or "
                "from_open_flamingo(..., lang_encoder=...) take it")
        raise ValueError(f"{str(d)!r} is a Hugging Face {kind!r} model directory, not a fastflamingo one (written by "
                         f"save_pretrained or `fastflamingo convert`): {hint}")


def _onto_base(d: Path, state: dict[str, torch.Tensor], sources: dict, *, quantization, device, dtype,
               trust_remote_code: bool, device_map, max_memory, offload_folder):
    """A trainable-only directory whose model was loaded from a full fastflamingo directory (the
    ``"base"`` it records, as fine-tuning's ``model/`` does): that model, the saved weights over it."""
    from .load import check_state_fits, finish
    from safetensors import safe_open
    base = Path(sources[BASE])
    if not (base / CONFIG_NAME).is_file() or not (base / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(f"{str(d)!r} holds only the trainable parameters, over the model in {str(base)!r}, "
                                "which is not a fastflamingo directory any more: pass lang_encoder= and vision_encoder= "
                                "(the frozen models it was trained with)")
    with safe_open(str(base / WEIGHTS_NAME), framework="pt") as f:
        contents = (f.metadata() or {}).get("fastflamingo.contents")
    if contents == "trainable":  # (a trainable-only save written over its own base: a loop, once)
        itself = " (it is this directory: its frozen weights were overwritten)" if base.resolve() == d.resolve() else ""
        raise ValueError(f"{str(d)!r} holds only the trainable parameters, over the model in {str(base)!r}, but that "
                         f"directory holds only trainable parameters too{itself}: pass lang_encoder= and "
                         "vision_encoder= (the frozen models it was trained with)")
    model = load_pretrained(base, dtype=dtype, trust_remote_code=trust_remote_code)
    _take_saved_config(model, FlamingoConfig.from_json((d / CONFIG_NAME).read_text()), d, base)
    check_state_fits(model, state, required=trainable_keys(model),
                     hint=f"the trainable parameters in {str(d)!r} do not fit the base model in {str(base)!r}")
    model.load_state_dict(state, strict=False)  # copied into the base's tensors, in their dtype
    model = finish(model, dtype=dtype, device=device, quantization=quantization, device_map=device_map,
                   max_memory=max_memory, offload_folder=offload_folder)
    setattr(model, SOURCES_ATTR, sources)
    return model


# the fields a trainable-only save may change over its base: which parameters train
TRAINING_FIELDS = ("num_base_tokens", "train_output_embeddings")


def _take_saved_config(model: nn.Module, saved: FlamingoConfig, d: Path, base: Path) -> None:
    """The config saved beside trainable-only weights, over the base model's: which parameters
    train (:data:`TRAINING_FIELDS`) is taken from it (the trainable set is made again); any other
    difference is an error naming the fields (the base is not the model those weights were saved from)."""
    have, want = model.config.to_dict(), saved.to_dict()
    for c in (have, want):  # (a base saved before the attention implementation was recorded has none)
        c["lm"] = {k: v for k, v in c["lm"].items() if k != ATTN_IMPLEMENTATION}
    other = sorted(k for k in want if k not in TRAINING_FIELDS and want[k] != have.get(k))
    if other:
        raise ValueError(f"{str(d)!r} was saved with another config than its base model in {str(base)!r} has "
                         f"(differing: {other}): pass lang_encoder= and vision_encoder= (the frozen models it was "
                         "trained with) to build it from its own config")
    if any(want[k] != have.get(k) for k in TRAINING_FIELDS):
        for k in TRAINING_FIELDS:
            setattr(model.config, k, getattr(saved, k))
        model.set_trainable()


def _base_lm(lang_encoder, sources: dict, config: FlamingoConfig, d: Path, trust_remote_code: bool) -> nn.Module:
    lang_encoder = lang_encoder if lang_encoder is not None else sources.get("lm")
    if lang_encoder is None:
        raise ValueError(f"{str(d)!r} holds only the trainable parameters and records no base LM: pass "
                         f"lang_encoder= (the {config.lm.get('model_type', '?')!r} LM it was trained with, "
                         "a module or a local directory)")
    if isinstance(lang_encoder, (str, Path)):
        return with_attn_implementation(
            lambda **kw: load_hf_causal_lm(str(lang_encoder), trust_remote_code=trust_remote_code,
                                           cache_dir=sources.get("cache_dir"), **kw),
            config.lm.get(ATTN_IMPLEMENTATION), f"the LM in {str(lang_encoder)!r}")
    return lang_encoder


def _base_vision(vision_encoder, sources: dict, config: FlamingoConfig, d: Path,
                 state: dict[str, torch.Tensor]) -> tuple[nn.Module, list[str]]:
    """-> (the vision encoder, the state keys it must take). Weights the directory stores
    (:func:`stores_vision`) go into the module given, or into one built from the config, in their dtype."""
    if any(k.startswith(VISION_PREFIX) for k in state):
        if vision_encoder is None:
            from ..vision import build_vision_model
            from .io import skip_init
            with skip_init():
                vision_encoder = build_vision_model(config.vision).eval()
            saved = next(t for k, t in state.items() if k.startswith(VISION_PREFIX) and t.is_floating_point())
            vision_encoder.to(saved.dtype)
        return vision_encoder, [VISION_PREFIX + k for k in vision_encoder.state_dict()]
    if vision_encoder is not None:
        return vision_encoder, []
    if sources.get("vision") and config.vision.source == "open_clip":
        from .open_flamingo_ckpt import open_clip_tower
        name, pretrained = sources["vision"]
        if pretrained is None:
            raise ValueError(f"{str(d)!r} holds only the trainable parameters and records its vision encoder as "
                             f"({name!r}, None), random weights that were not stored, so they cannot be rebuilt: "
                             "pass vision_encoder= (the encoder it was trained with)")
        return open_clip_tower(name, pretrained, sources.get("cache_dir")), []
    raise ValueError(f"{str(d)!r} holds only the trainable parameters and records no vision encoder: pass "
                     f"vision_encoder= (the frozen {config.vision.source} encoder it was trained with)")


def _resize(lm: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Resize the base LM's embeddings to the saved ones (the Flamingo tokens were added)."""
    name = next(n for n, p in lm.named_parameters() if p is lm.get_input_embeddings().weight)
    saved = state.get(f"lang_encoder.{name}")
    if saved is not None and saved.shape[0] != lm.get_input_embeddings().weight.shape[0]:
        lm.resize_token_embeddings(saved.shape[0])


def _progress(items, enabled: bool, desc: str):
    if not enabled:
        return items
    from tqdm.auto import tqdm
    items = list(items)
    return tqdm(items, desc=desc, unit="tensor")
