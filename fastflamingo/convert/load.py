"""Loading a state dict into a freshly built Flamingo, with errors that say what does not fit."""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..config import FlamingoConfig
from .io import skip_init

_SHOW = 20  # lines listed per category in an error message
# buffers that older transformers versions saved in state dicts and current ones recompute
STALE_BUFFER_SUFFIXES = (".position_ids", ".rotary_emb.inv_freq", ".attention.bias", ".attention.masked_bias",
                         ".attn.bias", ".attn.masked_bias")


def _grouped(keys: list[str]) -> list[str]:
    """``a.b.weight, a.b.bias`` -> ``a.b.{weight, bias}``: one line per module, in order."""
    groups: dict[str, list[str]] = {}
    for key in keys:
        owner, _, leaf = key.rpartition(".")
        groups.setdefault(owner, []).append(leaf)
    lines = []
    for owner, leaves in groups.items():
        leaf = leaves[0] if len(leaves) == 1 else "{" + ", ".join(leaves) + "}"
        lines.append(f"{owner}.{leaf}" if owner else leaf)
    return lines


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the model built for it.

    Attributes:
        missing: keys the model needs that the checkpoint lacks.
        unexpected: checkpoint keys the model has no place for.
        mismatched: (key, checkpoint shape, model shape) triples.
    """

    def __init__(self, missing: list[str], unexpected: list[str], mismatched: list[tuple], hint: str = ""):
        self.missing, self.unexpected, self.mismatched = missing, unexpected, mismatched
        lines = [f"the checkpoint does not fit the model: {len(missing)} missing, {len(unexpected)} unexpected, "
                 f"{len(mismatched)} shape-mismatched key(s)"]
        for title, items in (("missing", _grouped(missing)), ("unexpected", _grouped(unexpected)),
                             ("shape mismatch (checkpoint vs model)",
                              [f"{k}: {tuple(a)} vs {tuple(b)}" for k, a, b in mismatched])):
            if items:
                more = f" (first {_SHOW} of {len(items)} lines)" if len(items) > _SHOW else ""
                lines.append(f"  {title}{more}:")
                lines.extend(f"    {item}" for item in items[:_SHOW])
        if hint:
            lines.append(hint)
        super().__init__("\n".join(lines))


def is_block_key(key: str) -> bool:
    """Whether a state-dict key belongs to the resampler or a gated cross-attention block."""
    return key.startswith("perceiver.") or ".gated_cross_attn_layer." in key


def check_state_fits(model: nn.Module, state: dict[str, torch.Tensor], *, required: Iterable[str],
                     hint: str = "") -> None:
    """Raise :class:`CheckpointMismatchError` unless every ``required`` key is in ``state`` and
    every key of ``state`` is one of ``model``'s, with the model's shape."""
    own = model.state_dict()
    missing = [k for k in required if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in state.items()
                  if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if missing or unexpected or mismatched:
        raise CheckpointMismatchError(missing, unexpected, mismatched, hint)


def build_and_load(config: FlamingoConfig, state: dict[str, torch.Tensor], *, trainable_only: bool = False,
                   vision_encoder: nn.Module | None = None, lang_encoder: nn.Module | None = None,
                   dtype: torch.dtype | None = None, device=None, quantization=None, hint: str = "",
                   extra_required: Iterable[str] = (), device_map=None, max_memory=None, offload_folder=None):
    """Build a Flamingo of ``config`` (parts not passed are built without random initialisation)
    and load ``state`` into it, taking its tensors rather than copying them (a model built from
    the config holds the checkpoint's own tensors, in its dtype: nothing is copied or cast).

    Where ``state`` completes modules passed in (trainable-only: the blocks go into the LM given),
    its floating-point tensors take the dtype of those modules' own parameters
    (:func:`_load_dtypes`), so a bf16 checkpoint on an fp32 LM gives an fp32 model, as
    ``load_state_dict`` copying into the modules would; ``dtype`` given: everything ends in it.

    Args:
        trainable_only: ``state`` must hold the resampler and cross-attention blocks only (the
            rest of the model comes from the encoders passed); otherwise every key of the model.
        extra_required: keys ``state`` must hold besides those (listed missing otherwise).
        dtype, device, quantization, device_map, max_memory, offload_folder: see :func:`finish`.
        hint: appended to a :class:`CheckpointMismatchError`.
    """
    from ..model import Flamingo
    flags = None if lang_encoder is None else [(p, p.requires_grad) for p in lang_encoder.parameters()]
    with skip_init():
        model = Flamingo(config, vision_encoder=vision_encoder, lang_encoder=lang_encoder)
    keys = model.state_dict().keys()
    state = {k: v for k, v in state.items() if k in keys or not k.endswith(STALE_BUFFER_SUFFIXES)}
    required = [k for k in keys if is_block_key(k)] if trainable_only else list(keys)
    required += [k for k in extra_required if k not in required]
    try:
        check_state_fits(model, state, required=required, hint=hint)
    except CheckpointMismatchError:
        if flags is not None:  # the caller's LM as it was: a retry with the right arguments may take it again
            release_lm(model, flags)
        raise
    if as_dtype(dtype) is None:
        targets = _load_dtypes(model, state)
        state = {k: v.to(targets[k]) if k in targets and v.is_floating_point() and v.dtype != targets[k] else v
                 for k, v in state.items()}
    kept = _kept_devices(model, state)
    model.load_state_dict(state, strict=False, assign=True)
    if getattr(model.lang_encoder.config, "tie_word_embeddings", False):
        model.lang_encoder.tie_weights()
    if device is None and device_map is None:
        for part, modules in _parts(model).items():
            if part in kept:
                # a part the state completes (blocks into an LM passed in): the state's tensors, read
                # on the CPU, and the new blocks and resampler follow its modules' device, as
                # load_state_dict copying into them would; a part spread over devices is left as is
                if len(kept[part]) == 1:
                    for m in modules:
                        m.to(next(iter(kept[part])))
                continue
            # a part the state replaces whole: tensors it does not hold (non-persistent buffers:
            # position ids, rotary frequencies) were built on the CPU: put them where its weights are
            devices = {t.device for k, t in state.items() if torch.is_tensor(t) and _part(k) == part}
            if len(devices) == 1 and next(iter(devices)).type != "cpu":
                for m in modules:
                    m.to(next(iter(devices)))
    return finish(model, dtype=dtype, device=device, quantization=quantization, device_map=device_map,
                  max_memory=max_memory, offload_folder=offload_folder)


def release_lm(model: nn.Module, flags: list[tuple[torch.Tensor, bool]]) -> None:
    """Give back the LM a Flamingo ``model`` wrapped, as it was before: its own decoder layers,
    no hooks of the model's, Hugging Face's MPT attention, its parameters' ``requires_grad``
    (``flags``, taken before the model was built)."""
    from .. import mpt
    from ..lm import unwrap_decoder_layers
    from ..tokens import train_new_embedding_rows
    train_new_embedding_rows(model, None)  # (removes the embedding-row hooks)
    unwrap_decoder_layers(model.lang_encoder, model.decoder_layers_attr)
    mpt.restore(model.lang_encoder)
    for p, flag in flags:
        p.requires_grad_(flag)


def _part(key: str) -> str:
    """The part of the model a state key goes into: the vision encoder, or the rest (LM, blocks,
    resampler: they compute together)."""
    return "vision" if key.startswith("vision_encoder.") else "rest"


def _parts(model: nn.Module) -> dict[str, list[nn.Module]]:
    """The modules of each :func:`_part`."""
    rest = [model.lang_encoder] + ([model.perceiver] if model.perceiver is not None else [])
    return {"vision": [model.vision_encoder], "rest": rest}


def _kept_devices(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, set[torch.device]]:
    """{part: the devices of its parameters that ``state`` does not replace}, for the parts that
    keep some (modules passed in: the LM under trainable-only blocks)."""
    kept: dict[str, set[torch.device]] = {}
    for name, p in model.named_parameters():
        if name not in state:
            kept.setdefault(_part(name), set()).add(p.device)
    return kept


def _load_dtypes(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.dtype]:
    """{state key: the dtype its tensor is loaded in} for keys that go into a part of the model
    that ``state`` does not replace whole: the dtype most of that part's remaining floating-point
    parameters have (its modules' dtype, e.g. the base LM's under trainable-only blocks). The
    parts: the vision encoder, and the rest (LM, blocks, resampler: they compute together). Parts
    ``state`` replaces whole keep the checkpoint's dtypes."""
    kept: dict[str, dict[torch.dtype, int]] = {}
    for name, p in model.named_parameters():
        if name not in state and p.is_floating_point() and not p.is_meta:
            counts = kept.setdefault(_part(name), {})
            counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    dtypes = {k: max(counts, key=counts.get) for k, counts in kept.items()}
    return {k: dtypes[_part(k)] for k in state if _part(k) in dtypes}


def as_dtype(dtype) -> torch.dtype | None:
    """A floating torch dtype from itself or its name (``"bfloat16"``, ``"torch.float16"``, as
    transformers takes), else an error naming it."""
    if dtype is None or (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        return dtype
    named = getattr(torch, dtype.removeprefix("torch."), None) if isinstance(dtype, str) else None
    if isinstance(named, torch.dtype) and named.is_floating_point:
        return named
    raise ValueError(f"dtype={dtype!r} is not a floating-point torch dtype: pass torch.bfloat16, torch.float16, "
                     "torch.float32, or one of their names ('bfloat16', ...)")


def check_placement(*, dtype=None, device=None, quantization=None, device_map=None, max_memory=None,
                    offload_folder=None) -> None:
    """Refuse, before anything is read or built, the :func:`finish` options that cannot go
    together or are not values it takes, naming them (every loader calls it first: a typo must
    not cost the minutes a large checkpoint takes to load)."""
    as_dtype(dtype)
    if quantization is not None:
        from ..quant import check_quantization
        check_quantization(quantization)
    if device_map is not None and device is not None:
        raise ValueError(f"pass device= or device_map=, not both (got device={device!r}, device_map={device_map!r})")
    if device_map is None and (max_memory is not None or offload_folder is not None):
        raise ValueError("max_memory and offload_folder apply with device_map= only")
    if quantization is not None and device is not None and torch.device(device).type == "meta":
        raise ValueError(f"quantization={quantization!r} with device={device!r}: a meta-device model has no weight "
                         "values to quantize; load it on the device it will run on (device='cuda' or 'cpu')")
    if quantization is not None and isinstance(device_map, dict):  # before quantizing (a planned map: dispatch)
        from ..distribute import refuse_quantized_on_disk
        refuse_quantized_on_disk(device_map, f"quantization={quantization!r}")


def finish(model, *, dtype: torch.dtype | None = None, device=None, quantization=None, device_map=None,
           max_memory=None, offload_folder=None):
    """The last steps of every import: trainable set, dtype/device, optional quantization (on the
    device, as bitsandbytes needs; :func:`fastflamingo.quant.quantize_model`), placement over
    several devices (``device_map``: :func:`fastflamingo.distribute.dispatch`), eval."""
    check_placement(dtype=dtype, device=device, quantization=quantization, device_map=device_map,
                    max_memory=max_memory, offload_folder=offload_folder)
    model.set_trainable()
    dtype = as_dtype(dtype)
    if dtype is not None or device is not None:
        model.to(device=device, dtype=dtype)
    if quantization is not None:
        from ..quant import quantize_model
        quantized = quantize_model(model, quantization)
        model = model if quantized is None else quantized
    if device_map is not None:
        from ..distribute import dispatch
        dispatch(model, device_map, max_memory=max_memory, offload_folder=offload_folder)
    return model.eval()
