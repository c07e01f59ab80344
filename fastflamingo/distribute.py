"""Spreading one model over several devices with accelerate's ``device_map`` (and offloading).

:func:`dispatch` places a built :class:`~fastflamingo.Flamingo` as Hugging Face models are placed
by ``from_pretrained(device_map=...)``: accelerate plans which device holds which module and
attaches hooks that move each module's inputs to its device. The units it never splits are the
decoder layers with their cross-attention block (:class:`~fastflamingo.lm.FlamingoLayer`: a
block and the layer after it share a device), the vision encoder, and the resampler.

What no hook can see is moved where it is read: the visual tokens and ``text_time`` shared by
all cross-attention blocks go to each block's device, and the visual K/V of a block is projected
on the device of its weights (:func:`execution_device`), so the visual KV cache of every block
stays on that block's device. ``"cpu"`` / ``"disk"`` entries offload those weights: they stay in
CPU memory (or on disk) and visit the execution device for each forward.
"""
from __future__ import annotations

import functools
import types

import torch
from torch import nn

DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def execution_device(module: nn.Module) -> torch.device | None:
    """The device ``module`` computes on: its accelerate hook's execution device when it has one,
    else the device of its first parameter that is not on ``meta``; None when neither is known
    (offloaded weights whose hooks sit on submodules: those hooks move the inputs)."""
    hook = getattr(module, "_hf_hook", None)
    device = getattr(hook, "execution_device", None)
    if device is not None:
        return torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
    for p in module.parameters():
        if p.device.type != "meta":
            return p.device
    return None


def to_execution_device(x: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """``x`` on ``module``'s execution device (unchanged when unknown or already there)."""
    device = execution_device(module)
    return x if device is None or x.device == device else x.to(device)


def no_split_module_classes(model: nn.Module) -> list[str]:
    """Class names accelerate must keep whole: decoder layers with their block, the vision
    encoder, the resampler."""
    from .lm import FlamingoLayer
    names = [FlamingoLayer.__name__, type(model.vision_encoder).__name__]
    if getattr(model, "perceiver", None) is not None:
        names.append(type(model.perceiver).__name__)
    return names


def infer_device_map(model: nn.Module, device_map: str = "auto", max_memory: dict | None = None) -> dict:
    """accelerate's plan for ``model``: ``"auto"`` / ``"balanced"`` (spread evenly over the GPUs),
    ``"balanced_low_0"`` (leave room on GPU 0 for generation), ``"sequential"`` (fill GPU 0 first).
    ``max_memory`` as accelerate's ({0: "20GiB", "cpu": "64GiB"}); beyond it modules go to the CPU."""
    if device_map not in DEVICE_MAP_STRATEGIES:
        raise ValueError(f"device_map={device_map!r}: use a dict {{module name: device}} or one of "
                         f"{DEVICE_MAP_STRATEGIES}")
    from accelerate import infer_auto_device_map
    from accelerate.utils import get_balanced_memory, get_max_memory
    max_memory = None if max_memory is None else dict(max_memory)  # (accelerate converts it in place)
    no_split = no_split_module_classes(model)
    if device_map == "sequential":
        budget = get_max_memory(max_memory)
    else:
        budget = get_balanced_memory(model, max_memory, no_split_module_classes=no_split,
                                     low_zero=device_map == "balanced_low_0")
    return infer_auto_device_map(model, max_memory=budget, no_split_module_classes=no_split)


def dispatch(model: nn.Module, device_map: str | dict = "auto", *, max_memory: dict | None = None,
             offload_folder: str | None = None) -> nn.Module:
    """Place ``model`` over devices (in place; returns it). ``device_map``: a strategy name (see
    :func:`infer_device_map`) or a dict {module name: device} (``0``, ``"cuda:1"``, ``"cpu"``,
    ``"disk"``), ``""`` naming the whole model. ``"disk"`` entries need ``offload_folder``; a plan
    with every module on ``"disk"`` (a ``max_memory`` too small for any of them) is refused.
    The plan is kept in ``model.hf_device_map``."""
    try:
        from accelerate import dispatch_model
    except ImportError as e:
        raise ImportError("device_map needs accelerate: pip install accelerate") from e
    from .quant import quantized_modules
    planned = isinstance(device_map, str)
    if planned:
        device_map = infer_device_map(model, device_map, max_memory)
    elif not isinstance(device_map, dict):
        raise TypeError(f"device_map must be a strategy name or a dict, got {type(device_map).__name__}")
    _check_device_map(model, device_map)
    if device_map and all(str(d) == "disk" for d in device_map.values()):
        raise ValueError(_all_on_disk(model, device_map, max_memory, planned=planned))
    held = quantized_modules(model)
    if held:  # quantized before placement (a planned map is made for the quantized sizes)
        refuse_quantized_on_disk(device_map, f"this model's bitsandbytes layers ({len(held)}, e.g. {held[0]})")
    if "disk" in device_map.values() and offload_folder is None:
        raise ValueError("device_map puts modules on 'disk': pass offload_folder=<a directory> for their weights")
    dispatch_model(model, device_map=device_map, offload_dir=offload_folder)
    model.hf_device_map = dict(device_map)
    # weights offloaded to "cpu" / "disk" are meta tensors between calls, loaded by accelerate's
    # hooks for each forward: a backward gives them no gradient (offloaded_trainable)
    model._offloaded = [n for n, p in model.named_parameters() if p.is_meta]  # (names: the hooks swap the tensors)
    return model


def refuse_quantized_on_disk(device_map: dict, what: str) -> None:
    """bitsandbytes' packed weights (and their statistics, on the parameter) cannot be offloaded
    to disk: accelerate fails placing NF4 layers there, int8 ones at their first forward. A
    ValueError naming the "disk" entries of ``device_map``, with ``what`` (the quantization)."""
    disk = [name or "''" for name, d in device_map.items() if str(d) == "disk"]
    if disk:
        more = f", ... {len(disk)} in all" if len(disk) > 5 else ""
        raise ValueError(f"{what} with device_map entries on 'disk' ({', '.join(disk[:5])}{more}) is not supported: "
                         "bitsandbytes weights cannot be offloaded to disk; offload to 'cpu' or drop quantization")


def placed_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with the weights :func:`dispatch` offloaded ("cpu" / "disk", meta
    placeholders in the model between calls) read back from accelerate's hooks, on the CPU; tied
    parameters stay one tensor. A weight none of the hooks holds is an error naming it."""
    state = model.state_dict()
    offloaded = {k for k, t in state.items() if t.is_meta}
    if not offloaded:
        return state
    from accelerate.utils import align_module_device, has_offloaded_params
    for name, module in model.named_modules():
        if has_offloaded_params(module):
            with align_module_device(module, "cpu"):  # the hook's weights_map, loaded for the call
                for k, t in module.state_dict(prefix=f"{name}." if name else "").items():
                    if k in offloaded and not t.is_meta:
                        state[k] = t.detach().clone()
    tied: dict[int, torch.Tensor] = {}  # one tensor per parameter, as state_dict gives tied weights
    for k, p in model.named_parameters(remove_duplicate=False):
        if k in offloaded:
            state[k] = tied.setdefault(id(p), state[k])
    missing = [k for k in offloaded if state[k].is_meta]
    if missing:
        raise ValueError(f"{len(missing)} offloaded tensor(s) of this model cannot be read back from accelerate's hooks "
                         f"(e.g. {missing[0]}, still on 'meta'): place the model with fastflamingo's device_map= "
                         "(fastflamingo.distribute.dispatch), or save it before offloading")
    return state


def offloaded_trainable(model: nn.Module) -> list[str]:
    """The trainable parameters (``requires_grad``) that :func:`dispatch` offloaded to "cpu" or
    "disk": a backward leaves them without a gradient (silently, in accelerate), so training them
    is refused (:func:`fastflamingo.training.fine_tune`) or warned about (a forward with grad)."""
    return [n for n in getattr(model, "_offloaded", ()) if model.get_parameter(n).requires_grad]


def offload_message(names: list[str]) -> str:
    return (f"{len(names)} trainable parameter(s) are offloaded by device_map (e.g. {names[0]}): accelerate loads "
            "them for each forward, and a backward gives them no gradient. Keep the resampler, the cross-attention "
            "blocks and the trained embeddings on a device (a device_map that maps them to a GPU), or freeze them")


def _all_on_disk(model: nn.Module, device_map: dict, max_memory: dict | None, *, planned: bool) -> str:
    """The message for a plan that puts every module on disk, which accelerate cannot run (nothing
    would hold the weights a forward reads from disk): say why the plan came out so."""
    size = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    what = f"the whole model ({size / 2**20:.1f} MiB) would go to 'disk'"
    if not planned:
        return (f"device_map={device_map!r}: {what}, which accelerate cannot run: name a GPU or 'cpu' for "
                "the model or some of its modules")
    return (f"max_memory={max_memory!r} leaves no room for any module on a GPU or the CPU, so {what}, which "
            "accelerate cannot run: raise max_memory (each budget must exceed the largest part accelerate keeps "
            "whole, which it holds in reserve: the vision encoder, the resampler or a decoder layer with its "
            "block), or pass max_memory=None to use what the machine has")


def _check_device_map(model: nn.Module, device_map: dict) -> None:
    """Every parameter covered by exactly the names given; no unknown module names."""
    names = {n for n, _ in model.named_modules()}
    unknown = [k for k in device_map if k and k not in names]
    if unknown:
        raise ValueError(f"device_map names modules the model does not have: {unknown[:5]}; "
                         "see [n for n, _ in model.named_modules()]")

    def covered(param_name: str) -> bool:
        return any(k == "" or param_name == k or param_name.startswith(k + ".") for k in device_map)
    missing = [n for n, _ in model.named_parameters() if not covered(n)]
    if missing:
        raise ValueError(f"device_map leaves {len(missing)} parameters without a device, e.g. {missing[:3]}; "
                         "name their modules (or a parent) in device_map")


def uses_several_devices(model: nn.Module) -> bool:
    """Whether ``model`` was dispatched over more than one device (or offloaded)."""
    plan = getattr(model, "hf_device_map", None)
    return bool(plan) and len({str(d) for d in plan.values()}) > 1


# ------------------------------------------------------------------ FSDP2 (data parallel, sharded)
def shard(model: nn.Module) -> nn.Module:
    """FSDP2 over a Flamingo (``torch.distributed`` initialized): each gated cross-attention block,
    each decoder layer and the resampler is a unit of ``fully_shard`` (innermost first: the blocks
    sit inside the decoder layers), the rest the root's. Parameters become DTensor shards; their
    names are unchanged. The decoder layers are those the model wrapped
    (``model.decoder_layers_attr``: ``config.decoder_layers_attr`` where given).

    What runs outside a forward of its unit also gathers the weights it reads: ``encode_vision``
    and the LM's own forward (generation and scoring call them, not the model's forward) run as
    a forward of the root (FSDP's lazy initialization, the root's weights gathered and kept, as
    after its forward), and each block's visual K/V projection (``project_kv``, run once per
    batch by generation) gathers its block's weights for the call.

    int8 layers (``quantization="int8"``: bitsandbytes keeps the int8 weight and its scales on
    attributes of the parameter, ``CB`` / ``SCB``, which a shard does not carry) are left out of
    sharding: their frozen weights stay whole on every rank (``fully_shard``'s ``ignored_params``).
    NF4 layers are sharded like the rest."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    from .lm import get_attr
    from .quant import int8_modules
    layers = get_attr(model.lang_encoder, model.decoder_layers_attr)
    units = [*model.gated_cross_attn_layers, *layers] + ([model.perceiver] if model.perceiver is not None else [])
    whole = {p for name in int8_modules(model) for p in model.get_submodule(name).parameters()}
    for m in [*units, model]:
        fully_shard(m, ignored_params=whole or None)
    if not any(p.is_meta for p in model.parameters()):
        # FSDP2 allocates each unit's gathered weights at its first gather, for good: one under
        # inference_mode (generation's) would make them inference tensors, which no later gather
        # outside it may write ("Inplace update to inference tensor"): allocate them here
        with torch.inference_mode(False):
            for m in [*units, model]:
                m.unshard()
                m.reshard()
    for block in model.gated_cross_attn_layers:
        for m in block.modules():
            if hasattr(m, "project_kv"):
                m.project_kv = _gathering(block, m, m.project_kv)
    # a call through the root's FSDP forward hooks: ``fn`` then runs as the root's forward would
    model._fsdp_root_call = types.MethodType(lambda self, fn, *args, **kwargs: fn(*args, **kwargs), model)
    register_fsdp_forward_method(model, "_fsdp_root_call")
    model.encode_vision = _as_root_call(model, model.encode_vision)
    model.lang_encoder.forward = _as_root_call(model, model.lang_encoder.forward)
    return model


def _sharded(module: nn.Module) -> bool:
    """Whether ``module``'s weights (of one FSDP2 unit) are DTensor shards now (FSDP2 registers
    the gathered, plain tensors during its unit's forward)."""
    from torch.distributed.tensor import DTensor
    return any(isinstance(p, DTensor) for p in module.parameters())


def _as_root_call(model: nn.Module, fn):
    """``fn`` through the root's FSDP forward hooks where the root's weights are sharded (outside
    its forward: before the first, or after a backward), else as it is (inside the forward)."""
    embedding = model.lang_encoder.get_input_embeddings  # a weight of the root's unit

    @functools.wraps(fn)
    def call(*args, **kwargs):
        if _sharded(embedding()):
            return model._fsdp_root_call(fn, *args, **kwargs)
        return fn(*args, **kwargs)
    return call


def _gathering(unit: nn.Module, module: nn.Module, fn):
    """``fn`` with ``unit``'s weights gathered (then freed again) where ``module``'s are sharded:
    called outside ``unit``'s forward; as it is inside."""
    @functools.wraps(fn)
    def call(*args, **kwargs):
        if not _sharded(module):
            return fn(*args, **kwargs)
        unit.unshard()
        try:
            return fn(*args, **kwargs)
        finally:
            unit.reshard()
    return call


def gather_state(model: nn.Module, keys) -> dict[str, torch.Tensor]:
    """``{key: the whole tensor on the CPU}`` for these state-dict keys of a model sharded by
    :func:`shard` (a collective: every rank calls it) or not sharded at all."""
    from torch.distributed.tensor import DTensor
    state = model.state_dict()
    if any(state[k].is_meta for k in keys):  # weights a device_map offloaded: read back from accelerate's hooks
        state = placed_state(model)
    return {k: (state[k].full_tensor() if isinstance(state[k], DTensor) else state[k]).detach().cpu() for k in keys}
