"""Run one benchmark case: every provider on the same inputs, checked, then timed.

The order is the point: a provider's output (and, for ``fwd+bwd``, its input gradients) is
compared with the reference by the flash-attention tolerance rule (:mod:`fastflamingo.testing`)
first. A provider that disagrees gets a ``FAILED`` row and is never timed, so a wrong kernel
cannot put a number in the table. The checked providers of a mode are then timed: on the CPU side
by side (:func:`~.timing.measure_side_by_side`), on CUDA one by one (graph replay or events).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from ..testing import assert_close_by_rule
from .env import copy_bandwidth, device_name, versions
from .report import OURS
from .rows import DTYPE_NAMES, OK, Row
from .timing import EVENTS, GRAPH, PerCall, measure, measure_side_by_side

MODES = ("fwd", "fwd+bwd")
# on a GPU fastflamingo's call is also timed eagerly: its GPU time (graph replay) is one row, what
# an eager call costs with its host launch and dispatch time (CUDA events) the next
EAGER = f"{OURS} eager"


def _same(x):
    return x


@dataclass
class Prepared:
    """A provider ready to run on one case's inputs (layouts converted, metadata prebuilt).

    Attributes:
        call: runs the op on the prepared inputs; returns the output in the provider's layout.
        leaves: the tensors gradients flow to, in the provider's layout.
        build: rebuilds the provider's per-layout metadata (FlexAttention's BlockMask, varlen's
            cu_seqlens) from the case's image positions; timed on its own row.
        call_with_build: build + run, timed as ``<provider>+build``.
        to_common: provider layout -> the case's layout, for outputs and gradients (one per leaf).
        dout: the case's output gradient -> the provider's output layout.
        fresh: gives ``call`` (and ``build``) new copies of the per-call index tensors (text_time,
            a prebuilt mask or cu_seqlens), run before every timed call, outside the timed region
            (:class:`~.timing.PerCall`): what a provider derives from a tensor's identity (the
            chunk plan of fastflamingo's PyTorch path) is then rebuilt each call, as in a model,
            where each forward gets its own text_time.
        params: name -> parameter of the provider's module (the reference's names), for a case
            with ``reference_params``: every parameter's gradient is checked (factor 3).
    """
    call: Callable[[], torch.Tensor]
    leaves: tuple
    build: Callable[[], object] | None = None
    call_with_build: Callable[[], torch.Tensor] | None = None
    to_common: Callable[[torch.Tensor], torch.Tensor] = _same
    grads_to_common: Callable[[list], list] = _same
    dout: Callable[[torch.Tensor], torch.Tensor] = _same
    fresh: Callable[[], None] | None = None
    params: Callable[[], dict] | None = None


@dataclass
class Provider:
    """A named way to compute a case. ``prepare(inputs)`` -> :class:`Prepared`; ``unavailable``
    (a function of the mode) says why it cannot run here, or None.

    ``floor=True`` marks a lower bound that computes something else on purpose (the matrix
    products of a layer without the rest): it is timed without the output check, and its rows
    say so. Every other provider must pass the check to be timed. ``charged_bytes[mode]``: bytes
    of a part a floor does not compute, charged on top of its timed call at the measured copy
    bandwidth (that part's memory roofline, the least it can take).
    """
    name: str
    prepare: Callable[[tuple], Prepared] | None
    unavailable: Callable[[str], str | None] = lambda mode: None
    floor: bool = False
    charged_bytes: dict = field(default_factory=dict)


@dataclass
class Case:
    """One point of a sweep: inputs in the working dtype and the readable reference math.

    ``bytes_moved[mode]`` is the fewest bytes the op must move (each input read once, each
    output written once), for the roofline row. ``geometry`` names what ``x`` does not
    (``H=8 D=64 L=64``: heads, head size, latents per image); the rows carry it and the dtype.
    ``reference_params(dtype)``: name -> parameter of the reference module that runs in ``dtype``
    (a layer's case): their gradients are compared with each provider's (:attr:`Prepared.params`)
    by the input gradients' rule.
    """
    kernel: str
    x: str
    inputs: tuple
    reference: Callable[..., torch.Tensor]
    grad_inputs: Sequence[int] = (0, 1, 2)
    sweep: str = ""
    x_value: float | None = None
    bytes_moved: dict = field(default_factory=dict)
    geometry: str = ""
    reference_params: Callable[[torch.dtype], dict] | None = None


def reference_dtype(dtype: torch.dtype) -> torch.dtype:
    """The 'upcast' precision: fp32 for 16-bit inputs, fp64 for fp32 inputs."""
    return torch.float64 if dtype == torch.float32 else torch.float32


def _leaves(inputs: tuple, grad_inputs, dtype=None, grad=False) -> tuple:
    out = []
    for i, t in enumerate(inputs):
        t = t.detach().clone() if dtype is None or not t.is_floating_point() else t.detach().to(dtype)
        out.append(t.requires_grad_(grad and i in grad_inputs))
    return tuple(out)


def _run_once(call, leaves, dout, grad_inputs):
    out = call()
    if dout is None:
        return out, []
    out.backward(dout)
    return out, [leaves[i].grad for i in grad_inputs]


def _param_grads(params: dict | None, clear: bool = False) -> dict:
    """name -> gradient (None where there is none) of ``params``; ``clear``: set them to None."""
    out = {}
    for name, p in (params or {}).items():
        out[name] = None if p.grad is None else p.grad.detach().clone()
        if clear:
            p.grad = None
    return out


def reference_results(case: Case, mode: str, dout: torch.Tensor | None):
    """(out, input grads, parameter grads by name) of the reference at high and at working precision."""
    results = []
    for dtype in (reference_dtype(case.inputs[0].dtype), None):
        leaves = _leaves(case.inputs, case.grad_inputs, dtype, grad=mode == "fwd+bwd")
        params = None
        if case.reference_params is not None and dout is not None:
            params = case.reference_params(leaves[0].dtype)
            _param_grads(params, clear=True)
        d = None if dout is None else dout.to(leaves[0].dtype)
        out, grads = _run_once(lambda: case.reference(*leaves), leaves, d, case.grad_inputs)
        results.append((out.detach(), [g.detach() for g in grads], _param_grads(params, clear=True)))
    return results


def check(out, grads, ref_hi, ref_lo, param_grads: dict | None = None) -> str | None:
    """None when the output (factor 2), the input gradients and the parameter gradients (factor 3,
    every one the reference has, ``ref_hi[2]``) pass the tolerance rule, else why not."""
    want = ref_hi[2] if len(ref_hi) > 2 else {}
    try:
        if tuple(out.shape) != tuple(ref_hi[0].shape):
            return f"output shape {tuple(out.shape)} != {tuple(ref_hi[0].shape)}"
        if not torch.isfinite(out).all():
            return "non-finite output"
        assert_close_by_rule(out, ref_hi[0], ref_lo[0], factor=2.0, name="output")
        for i, (g, gh, gl) in enumerate(zip(grads, ref_hi[1], ref_lo[1])):
            if g is None:
                return f"no gradient for input {i}"
            assert_close_by_rule(g, gh, gl, factor=3.0, name=f"grad of input {i}")
        if want and param_grads is None:
            return "no parameter gradients to check (the provider names no parameters)"
        for name, gh in want.items():
            g = param_grads.get(name)
            if g is None:
                return f"no gradient for parameter {name}"
            assert_close_by_rule(g, gh, ref_lo[2][name], factor=3.0, name=f"grad of parameter {name}")
    except AssertionError as e:
        return str(e)
    return None


def run_case(case: Case, providers: Sequence[Provider], modes: Sequence[str], device: str, *,
             quick: bool = False, roofline: bool = True) -> list[Row]:
    """Check, then time, every provider on ``case`` for each mode. Returns the rows."""
    rows = []
    dev = device_name(device)
    base = dict(kernel=case.kernel, x=case.x, device=dev, versions=versions(), sweep=case.sweep,
                x_value=case.x_value, metric="time_ms", geometry=case.geometry,
                dtype=DTYPE_NAMES.get(case.inputs[0].dtype, str(case.inputs[0].dtype)))
    for mode in modes:
        dout = torch.randn_like(case.reference(*case.inputs).detach()) if mode == "fwd+bwd" else None
        ref_hi, ref_lo = reference_results(case, mode, dout)
        pending = []  # (row, the call to time or None for a finished row, its method): timed below
        for p in providers:
            _provider_rows(p, case, mode, dout, ref_hi, ref_lo, base, pending)
        rows += _charged(_timed(pending, device, quick), providers, mode, device)
        if roofline and mode in case.bytes_moved:
            bw = copy_bandwidth(device)
            ms = case.bytes_moved[mode] / bw * 1e3
            rows.append(Row(provider="roofline", mode=mode, median=ms, p20=ms, p80=ms,
                            note=f"bytes / measured copy bandwidth {bw / 1e9:.0f} GB/s", **base))
    return rows


def _charged(rows: list[Row], providers, mode: str, device: str) -> list[Row]:
    """``rows`` with each provider's ``charged_bytes[mode]`` added to its timed row, at the
    measured copy bandwidth, and said in its note."""
    charge = {p.name: p.charged_bytes[mode] for p in providers if mode in p.charged_bytes}
    for r in rows:
        if r.provider in charge and r.ok and r.mode == mode:
            bw = copy_bandwidth(device)
            ms = charge[r.provider] / bw * 1e3
            r.median, r.p20, r.p80 = r.median + ms, r.p20 + ms, r.p80 + ms
            r.note = (f"{r.note}; + {ms * 1e3:.1f} µs charged: {charge[r.provider] / 1e6:.3g} MB / measured copy "
                      f"bandwidth {bw / 1e9:.0f} GB/s")
    return rows


def prepare_checked(p: Provider, case: Case, mode: str, dout, ref_hi, ref_lo):
    """Prepare ``p`` on ``case``, run it once and check it. Returns (prepared, its output
    gradient, why it failed or None); raises if the provider cannot run these inputs."""
    leaves = _leaves(case.inputs, case.grad_inputs, grad=mode == "fwd+bwd")
    prep = p.prepare(leaves)
    d = None if dout is None else prep.dout(dout)
    params = prep.params() if prep.params is not None else None
    _param_grads(params, clear=True)  # what earlier calls (another mode, another provider) left
    out, grads = _run_once(prep.call, prep.leaves, d, case.grad_inputs)
    pgrads = None if params is None else _param_grads(params)
    failure = None if p.floor else check(prep.to_common(out.detach()), prep.grads_to_common(grads), ref_hi, ref_lo,
                                         pgrads)
    return prep, d, failure


def timed_call(call, leaves, dout, fresh=None):
    """What is timed: the forward, or forward + backward with the gradients cleared first;
    ``fresh`` (:attr:`Prepared.fresh`) runs before each call, outside the timed region."""
    if dout is None:
        step = call
    else:
        def step():
            for t in leaves:
                t.grad = None
            call().backward(dout)
    return step if fresh is None else PerCall(step, fresh)


def _provider_rows(p: Provider, case, mode, dout, ref_hi, ref_lo, base, pending) -> None:
    """A provider's rows, in ``pending`` as (row, call, method): the calls to time, or None for
    a row that cannot be timed (n/a, FAILED)."""
    why = p.unavailable(mode)
    if why:
        pending.append((Row(provider=p.name, mode=mode, status=f"n/a: {why}", **base), None, None))
        return
    try:
        prep, d, failure = prepare_checked(p, case, mode, dout, ref_hi, ref_lo)
    except Exception as e:  # noqa: BLE001 - a provider that cannot run these inputs is reported, not fatal
        status = f"n/a: {type(e).__name__}: {str(e)[:160]}"
        pending.append((Row(provider=p.name, mode=mode, status=status, **base), None, None))
        return
    if failure:
        pending.append((Row(provider=p.name, mode=mode, status=f"FAILED: {failure[:200]}", **base), None, None))
        return
    note = "floor: computes only part of the op, output not checked" if p.floor else ""
    call = timed_call(prep.call, prep.leaves, d, prep.fresh)
    pending.append((Row(provider=p.name, mode=mode, note=note, **base), call, None))
    if prep.build is not None:
        # a new batch layout costs its user the build's host time too: timed eagerly (CUDA events
        # around the call), never by graph replay, which would leave the host work out
        build = prep.build if prep.fresh is None else PerCall(prep.build, prep.fresh)
        if mode == "fwd":
            pending.append((Row(provider=f"{p.name} mask build", mode="build", **base), build, EVENTS))
        pending.append((Row(provider=f"{p.name}+build", mode=mode, **base),
                        timed_call(prep.call_with_build, prep.leaves, d, prep.fresh), EVENTS))


def side_by_side(device: str) -> bool:
    """Whether a case's providers are timed together (:func:`measure_side_by_side`): on the CPU.
    On CUDA each is timed alone, by graph replay or events (:func:`measure`)."""
    return torch.device(device).type == "cpu"


def _timed(pending: list, device: str, quick: bool) -> list[Row]:
    """The pending rows (row, call or None, method), with their timings, in order. Where
    fastflamingo's row was timed by graph replay, an EAGER row after it times the same call by
    CUDA events (the host time a user pays)."""
    if side_by_side(device):
        timings = iter(measure_side_by_side([call for _, call, _ in pending if call is not None], quick=quick))
        return [row if call is None else row.with_timing(next(timings)) for row, call, _ in pending]
    rows = []
    for row, call, method in pending:
        if call is None:
            rows.append(row)
            continue
        # (copied before the timing writes into row)
        eager = dataclasses.replace(row, provider=EAGER) if row.provider == OURS else None
        rows.append(row.with_timing(measure(call, device, quick=quick, method=method)))
        if eager is not None and row.timing == GRAPH:
            rows.append(eager.with_timing(measure(call, device, quick=quick, method=EVENTS)))
    return rows


__all__ = ["Case", "Provider", "Prepared", "run_case", "check", "prepare_checked", "timed_call", "MODES", "OK",
           "EAGER"]
