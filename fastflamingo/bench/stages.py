"""The end-to-end stages for a group of models sharing weights: check, then time.

:class:`Group` runs prefill, decode (generate) and one training step for each :class:`Entrant`
and refuses (``FAILED`` row, no time) one whose output disagrees with the reference outputs;
see :mod:`fastflamingo.bench.e2e` for the tolerances.
"""
from __future__ import annotations

import functools
import importlib
import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

from . import breakdown
from .env import device_name, versions
from .memory import peak_memory_call
from .rows import Row
from .timing import measure_calls, time_once

if TYPE_CHECKING:
    from .e2e import E2EConfig

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass
class Entrant:
    """One model in a group. ``generate(n)`` returns (B, T + n) ids, or None when unavailable."""
    name: str
    prefill: Callable[[], torch.Tensor]
    loss: Callable[[], torch.Tensor]
    params: Callable[[], list]
    generate: Callable[[int], torch.Tensor] | None = None
    why_no_generate: str = ""
    stages: tuple = ("prefill", "decode", "train")
    module: torch.nn.Module | None = None  # for the weights_MB row
    compiles: bool = False  # its first generate compiles: run it once before the measured calls


def generate_fn(model) -> Callable | None:
    """``model.generate`` where the model has one, else ``fastflamingo.generation.generate`` bound
    to the model, else None."""
    if callable(getattr(model, "generate", None)):
        return model.generate
    try:
        module = importlib.import_module("fastflamingo.generation")
    except ImportError:
        return None
    fn = getattr(module, "generate", None)
    return functools.partial(fn, model) if callable(fn) else None


def fastflamingo_entrant(name, model, inputs, train_inputs, banned, **generate_options) -> Entrant:
    """``inputs`` = (vision_x, lang_x, attention_mask) of the prompt; ``train_inputs`` adds labels."""
    gen = generate_fn(model)
    vx, ids, mask = inputs
    tvx, tids, tmask, labels = train_inputs

    def generate(n):
        return call_generate(gen, vx, ids, mask, n, banned, **generate_options)
    return Entrant(name, prefill=lambda: model(vx, ids, attention_mask=mask).logits,
                   loss=lambda: model(tvx, tids, attention_mask=tmask, labels=labels).loss,
                   params=lambda: [p for p in model.parameters() if p.requires_grad],
                   generate=generate if gen is not None else None,
                   why_no_generate="" if gen is not None else "fastflamingo's generate is not in this build",
                   module=model, compiles=vx.is_cuda)  # compile="auto": the first CUDA call compiles


def fastflamingo_entrants(model, inputs, train_inputs, banned, compiled: bool) -> list[Entrant]:
    """fastflamingo's default generate, plus (``compiled``) its compiled static-cache decode, whose
    compilation happens in the checked first call, outside the timed ones."""
    out = [fastflamingo_entrant("fastflamingo", model, inputs, train_inputs, banned)]
    gen = generate_fn(model)
    if compiled and gen is not None and "compile" in _accepted(gen, {"compile": 1}):
        e = fastflamingo_entrant("fastflamingo compiled", model, inputs, train_inputs, banned, cache="static",
                                  compile=True)
        out.append(Entrant(e.name, prefill=e.prefill, loss=e.loss, params=e.params, generate=e.generate,
                           stages=("decode",), compiles=True))
    return out


def call_generate(fn, vx, ids, mask, n, banned, **extra):
    """Greedy, exactly ``n`` new tokens. ``banned`` (<image>, <|endofchunk|>, EOS) are suppressed
    for every provider alike: peers differ in their stop tokens, and a generated <image> token
    would mean an image that does not exist."""
    kwargs = dict(attention_mask=mask, max_new_tokens=n, min_new_tokens=n, num_beams=1, do_sample=False,
                  suppress_tokens=list(banned), **extra)
    return fn(vx, ids, **_accepted(fn, kwargs))


def _accepted(fn, kwargs: dict) -> dict:
    """The keyword arguments ``fn`` takes (all of them where it has ``**kwargs``)."""
    params = inspect.signature(fn).parameters
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return kwargs
    return {k: v for k, v in kwargs.items() if k in params}


def reference_greedy(model, vx, ids, mask, n, banned) -> torch.Tensor:
    """A plain greedy loop with no cache of any kind: the tokens every generate must reproduce."""
    visual = model.encode_vision(vx)
    for _ in range(n):
        logits = model(lang_x=ids, visual_tokens=visual, attention_mask=mask).logits[:, -1]
        logits[:, list(banned)] = float("-inf")
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return ids


def weights_mb(module: torch.nn.Module) -> float:
    """Weight bytes in MiB: :func:`fastflamingo.quant.model_bytes` (parameters, buffers and
    quantization statistics, each tensor once)."""
    from ..quant import model_bytes
    return model_bytes(module) / 2**20


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


class Group:
    """Runs the stages for a list of entrants against the reference model's outputs."""

    def __init__(self, label, entrants, reference, cfg: E2EConfig, device, progress, banned=()):
        self.label, self.entrants, self.cfg, self.device = label, entrants, cfg, device
        self.ref = reference  # dict: logits, loss, tokens
        self.banned = banned  # token ids no provider may generate (see call_generate)
        self.loss_tol = 1e-4 if cfg.dtype == torch.float32 else 2e-2  # relative, on the scalar loss
        self.base = dict(device=device_name(device), versions=versions(), sweep="stage")
        self.progress = progress

    def row(self, stage, provider, metric, **kw) -> Row:
        mode = kw.pop("mode", DTYPE_NAMES.get(self.cfg.dtype, str(self.cfg.dtype)))
        return Row(kernel=stage, provider=provider, mode=mode, metric=metric, x=self.label, **self.base, **kw)

    def prefill(self, e: Entrant, approx: bool = False, mode: str | None = None) -> list[Row]:
        kw = {"mode": mode} if mode else {}
        with torch.no_grad():
            logits, peak, how = peak_memory_call(e.prefill, self.device)
            err, bound = self.logits_error(logits, approx)
            if not torch.isfinite(logits).all() or not err <= bound:
                return [self.row("e2e prefill", e.name, "time_ms", status=f"FAILED: logits relative error "
                                 f"{err:.2e} > {bound:.2e} vs the high-precision reference", **kw)]
            _, t = measure_calls(e.prefill, self.device, self.cfg.reps)
            breakdown.record(self.label, e.name, "prefill", e.prefill, self.device)
        note = f"logits rel. error vs {str(self.ref['logits_hi'].dtype)[6:]} reference {err:.1e} (bound {bound:.1e})"
        rows = [self.row("e2e prefill", e.name, "time_ms", note=note, **kw).with_timing(t),
                self.row("e2e prefill", e.name, "peak_mem_MB", median=peak, note=how, **kw)]
        if e.module is not None:
            rows.append(self.row("e2e weights", e.name, "weights_MB", median=weights_mb(e.module),
                                 note="parameters, buffers and quantization statistics", **kw))
        return rows

    def logits_error(self, logits: torch.Tensor, approx: bool = False) -> tuple[float, float]:
        """(relative error of ``logits`` vs the high-precision reference, the bound it must meet).

        The flash-attention rule at model level: at most 2x the error of the same reference run in
        the working precision, plus one unit of that precision's epsilon; NF4 (``approx``): 0.5.
        """
        hi = self.ref["logits_hi"]
        err = _rel_err(logits, hi)
        if approx:
            return err, 0.5
        base = _rel_err(self.ref["logits"], hi)
        return err, 2 * base + torch.finfo(self.ref["logits"].dtype).eps

    def decode(self, e: Entrant, approx: bool = False, mode: str | None = None) -> list[Row]:
        kw = {"mode": mode} if mode else {}
        if e.generate is None:
            return [self.row("e2e decode", e.name, "tokens_per_s", status=f"n/a: {e.why_no_generate}", **kw)]
        n, T = self.cfg.new_tokens, self.ref["tokens"].shape[1] - self.cfg.new_tokens
        first_call = ""
        with torch.no_grad():
            try:
                if e.compiles:  # compile outside the memory profiler (it would record the compiler)
                    _, first_ms = time_once(lambda: e.generate(n), self.device)
                    first_call = f"; its first call (compiling) took {first_ms / 1e3:.1f} s, outside the timed calls"
                out, peak, how = peak_memory_call(lambda: e.generate(n), self.device)
            except Exception as ex:  # noqa: BLE001 - a generate that cannot run here is reported
                return [self.row("e2e decode", e.name, "tokens_per_s",
                                 status=f"n/a: {type(ex).__name__}: {str(ex)[:150]}", **kw)]
            new, ref_new = out[:, T:], self.ref["tokens"][:, T:]
            agree = (new[:, :ref_new.shape[1]] == ref_new[:, :new.shape[1]]).float().mean().item()
            exact = self.cfg.dtype == torch.float32 and not approx
            ok = new.shape == ref_new.shape and (bool((new == ref_new).all()) if exact else
                                                 approx or bool((new[:, 0] == ref_new[:, 0]).all()))
            if not ok:
                return [self.row("e2e decode", e.name, "tokens_per_s", status=f"FAILED: generated tokens "
                                 f"{tuple(new.shape)} agree {agree:.0%} with the greedy reference", **kw)]
            _, t = measure_calls(lambda: e.generate(n), self.device, max(1, self.cfg.reps - 1))
            if e.name.startswith("fastflamingo"):  # a peer's eager loop: ~10^5 events to profile, no question
                breakdown.record(self.label, e.name, f"generate {n} tokens", lambda: e.generate(n), self.device)
        tokens = new.numel()
        rate = {k: tokens / (getattr(t, k) * 1e-3) for k in ("median", "p20", "p80")}
        note = (f"{tokens} new tokens (batch {new.shape[0]}) per call, prefill included; {agree:.0%} equal to greedy "
                f"reference{first_call}")
        return [self.row("e2e decode", e.name, "tokens_per_s", median=rate["median"], p20=rate["p80"],
                         p80=rate["p20"], note=note, **kw),
                self.row("e2e decode", e.name, "peak_mem_MB", median=peak, note=how, **kw),
                *self.decode_steps(e, t, new.shape[0], **kw)]

    def decode_steps(self, e: Entrant, t_n, batch: int, **kw) -> list[Row]:
        """The decode steps alone: (time of generate(n) - time of generate(1)) / (n - 1) per step,
        as new tokens/s of the batch (what the weight-bandwidth limit bounds; the prefill-included
        rate above is what a user of one call sees)."""
        n = self.cfg.new_tokens
        if n < 2:
            return []
        with torch.no_grad():
            _, t_1 = measure_calls(lambda: e.generate(1), self.device, max(1, self.cfg.reps - 1))
        step_ms = (t_n.median - t_1.median) / (n - 1)
        if step_ms <= 0:
            return [self.row("e2e decode step", e.name, "tokens_per_s", status=f"n/a: generate({n}) "
                             f"{t_n.median:.1f} ms was not slower than generate(1) {t_1.median:.1f} ms", **kw)]
        note = (f"({t_n.median:.1f} - {t_1.median:.1f} ms) / {n - 1} steps = {step_ms:.2f} ms per step of "
                f"batch {batch}: generate({n}) minus generate(1), medians")
        return [self.row("e2e decode step", e.name, "tokens_per_s", median=batch / (step_ms * 1e-3), note=note, **kw)]

    def train_check(self, e: Entrant) -> str | None:
        with torch.no_grad():
            loss = e.loss().item()
        err = abs(loss - self.ref["loss"]) / abs(self.ref["loss"])
        return None if err <= self.loss_tol else f"loss {loss:.5f} vs reference {self.ref['loss']:.5f} (rel. {err:.1e})"

    def train(self, e: Entrant, failure: str | None) -> list[Row]:
        if failure:
            return [self.row("e2e train step", e.name, "time_ms", status=f"FAILED: {failure}")]
        params = e.params()
        # the steps change the weights (shared with the other entrants, and used by the later
        # quantized stages): put them back afterwards, so every stage sees the checked weights
        saved = [p.detach().clone() for p in params]
        opt = torch.optim.AdamW(params, lr=1e-5)

        def step():
            loss = e.loss()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        _, peak, how = peak_memory_call(step, self.device)  # the first step also allocates AdamW's state
        _, t = measure_calls(step, self.device, self.cfg.reps)
        del opt
        with torch.no_grad():
            for p, w in zip(params, saved):
                p.copy_(w)
        del saved
        n = sum(p.numel() for p in params)
        note = f"AdamW over {n / 1e6:.1f}M trainable parameters"
        return [self.row("e2e train step", e.name, "time_ms", note=note).with_timing(t),
                self.row("e2e train step", e.name, "peak_mem_MB", median=peak, note=how)]

    def run(self) -> list[Row]:
        rows = []
        for e in self.entrants:
            rows += (self.prefill(e) if "prefill" in e.stages else []) + \
                    (self.decode(e) if "decode" in e.stages else [])
        # the entrants share weights: check every loss before any optimizer step moves them
        trained = [e for e in self.entrants if "train" in e.stages]
        failures = [self.train_check(e) for e in trained]
        for e, f in zip(trained, failures):
            rows += self.train(e, f)
        return rows
