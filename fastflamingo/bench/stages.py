"""The end-to-end stages for a group of models sharing weights: check, then time.

:class:`Group` runs prefill, decode (generate), beam search (``cfg.beams``) and one training step
for each :class:`Entrant` and refuses (``FAILED`` row, no time) one whose output disagrees with the
reference outputs; see :mod:`fastflamingo.bench.e2e` for the tolerances. The entrants that pass a stage's check are
then timed together, in rounds (:func:`fastflamingo.bench.timing.measure_together`): their
ratios do not depend on which one ran while the machine was busier.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

from ..generation.measure import relative_error, top1_agreement
from . import breakdown
from .env import device_name, versions
from .memory import peak_memory_call
from .rows import DTYPE_NAMES, Row
from .timing import Timing, measure_together, time_once

if TYPE_CHECKING:
    from .e2e import E2EConfig

# Quantized weights approximate the 16-bit model by design; their prefill logits are held, against
# the high-precision reference, to (relative error at most, teacher-forced top-1 agreement at
# least). At random weights (a trained checkpoint's error is not this one) the runs measured
# int8 1.7e-2 / 97% and NF4 0.20 / 58% (tiny preset, CPU), NF4 0.32 relative error at the
# openflamingo-9b shape (H100); a model that is broken, not approximate, is off by ~1 and agrees
# by chance (1 / vocabulary).
QUANT_BOUNDS = {"int8": (0.05, 0.5), "nf4": (0.4, 0.1)}
# Their generated tokens cannot be held to the 16-bit reference's (NF4 changes near-ties: 3% of
# the tokens equal at the 9B shape, where the 16-bit decode's first tokens all are): they must be
# the quantized model's own greedy choices. Scored again by the same model in one forward over
# the generated sequence (teacher-forced, no cache), at least this share of the new tokens must
# be its argmax (a near-tie may flip between the decode path and that forward; a wrong decode
# path, e.g. a fused kernel, agrees by chance).
OWN_GREEDY_FLOOR = 0.5
# 16-bit (unquantized) decode: the first new token of every row must be the greedy reference's, and
# every later one is checked as above, teacher-forced by the entrant itself, at this floor (a
# near-tie may flip; a KV-cache or decode-step bug after the first step makes most tokens wrong)
GREEDY_16BIT_FLOOR = 0.9
# the decode and beam-search calls are the longest of a run (up to seconds at the 9B shape): one call
# fewer than the other stages get, but at least this many (a median of 2 is their mean)
MIN_DECODE_REPS = 3


@dataclass
class Entrant:
    """One model in a group. ``generate(n, num_beams=1)`` returns (B, T + n) ids (greedy, or the
    best of beam search), or None when unavailable."""
    name: str
    prefill: Callable[[], torch.Tensor]
    loss: Callable[[], torch.Tensor]
    params: Callable[[], list]
    generate: Callable[..., torch.Tensor] | None = None
    why_no_generate: str = ""
    stages: tuple = ("prefill", "decode", "beams", "train")
    module: torch.nn.Module | None = None  # the model: its weights_MB row, its training steps' train mode
    compiles: bool = False  # its first generate compiles: run it once before the measured calls
    quant: str | None = None  # its weights are quantized ("nf4", "int8"): checked by QUANT_BOUNDS
    # logits of the prompt followed by the given (B, T + n) ids, one forward (the quantized decode check)
    teacher_forced: Callable[[torch.Tensor], torch.Tensor] | None = None


@dataclass
class Timed:
    """A stage that passed its check: the calls to time (name -> (fn, reps)), the rows their
    timings give, and what to do once they are timed (the training stage restores the weights;
    prefill and decode profile one more call for :mod:`.breakdown`, outside the timed ones)."""
    calls: dict[str, tuple[Callable[[], object], int]]
    rows: Callable[[dict[str, Timing]], list[Row]]
    done: Callable[[], None] = lambda: None


def time_stages(stages: list[list[Row] | Timed], device: str) -> list[Row]:
    """The rows of ``stages`` (rows already final, or :class:`Timed`), every call timed together."""
    timed = [s for s in stages if isinstance(s, Timed)]
    keys = [(t, name) for t in timed for name in t.calls]
    timings = measure_together([t.calls[name] for t, name in keys], device)
    by_stage: dict[int, dict[str, Timing]] = {}
    for (t, name), timing in zip(keys, timings):
        by_stage.setdefault(id(t), {})[name] = timing
    for t in reversed(timed):  # last checked first: the first one's saved state is the oldest
        t.done()
    return [row for s in stages for row in (s.rows(by_stage[id(s)]) if isinstance(s, Timed) else s)]


def _unavailable(ex: Exception) -> str:
    """The status of a stage that could not run here (the error, shortened)."""
    return f"n/a: {type(ex).__name__}: {str(ex)[:150]}"


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


def fastflamingo_entrant(name, model, inputs, train_inputs, banned, quant: str | None = None,
                         **generate_options) -> Entrant:
    """``inputs`` = (vision_x, lang_x, attention_mask) of the prompt; ``train_inputs`` adds labels."""
    gen = generate_fn(model)
    vx, ids, mask = inputs
    tvx, tids, tmask, labels = train_inputs

    def generate(n, num_beams=1):
        return call_generate(gen, vx, ids, mask, n, banned, num_beams=num_beams, **generate_options)

    def teacher_forced(seq):
        more = mask.new_ones(mask.shape[0], seq.shape[1] - mask.shape[1])
        return model(vx, seq, attention_mask=torch.cat([mask, more], dim=1)).logits
    return Entrant(name, prefill=lambda: model(vx, ids, attention_mask=mask).logits,
                   loss=lambda: model(tvx, tids, attention_mask=tmask, labels=labels).loss,
                   params=lambda: [p for p in model.parameters() if p.requires_grad],
                   generate=generate if gen is not None else None,
                   why_no_generate="" if gen is not None else "fastflamingo's generate is not in this build",
                   module=model, compiles=vx.is_cuda,  # compile="auto": the first CUDA call compiles
                   quant=quant, teacher_forced=teacher_forced)


def fastflamingo_entrants(model, inputs, train_inputs, banned, compiled: bool) -> list[Entrant]:
    """fastflamingo's default generate, plus (``compiled``) its compiled static-cache decode, whose
    compilation happens in the checked first call, outside the timed ones, and its training step
    with activation checkpointing (time and peak memory beside the plain step)."""
    out = [fastflamingo_entrant("fastflamingo", model, inputs, train_inputs, banned)]
    if hasattr(model, "activation_checkpointing_enable"):
        plain = out[0].loss

        def checkpointed_loss():
            model.activation_checkpointing_enable()  # on for this forward: the backward replays it
            try:
                return plain()
            finally:
                model.activation_checkpointing_disable()
        out.append(Entrant("fastflamingo checkpointed", prefill=out[0].prefill, loss=checkpointed_loss,
                           params=out[0].params, stages=("train",), module=model))
    gen = generate_fn(model)
    if compiled and gen is not None and "compile" in _accepted(gen, {"compile": 1}):
        e = fastflamingo_entrant("fastflamingo compiled", model, inputs, train_inputs, banned, cache="static",
                                  compile=True)
        out.append(Entrant(e.name, prefill=e.prefill, loss=e.loss, params=e.params, generate=e.generate,
                           stages=("decode",), compiles=True, teacher_forced=e.teacher_forced))
    return out


def call_generate(fn, vx, ids, mask, n, banned, num_beams: int = 1, **extra):
    """Greedy (or beam search with ``num_beams``), exactly ``n`` new tokens. ``banned`` (<image>,
    <|endofchunk|>, EOS) are suppressed for every provider alike: peers differ in their stop
    tokens, and a generated <image> token would mean an image that does not exist."""
    kwargs = dict(attention_mask=mask, max_new_tokens=n, min_new_tokens=n, num_beams=num_beams, do_sample=False,
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
    visual = None if vx is None else model.encode_vision(vx)
    for _ in range(n):
        logits = model(lang_x=ids, visual_tokens=visual, attention_mask=mask).logits[:, -1]
        logits[:, list(banned)] = float("-inf")
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return ids


def pooled_cache_bytes(module: torch.nn.Module) -> int:
    """Bytes of the static KV cache that ``module``'s next compiled generate of the last shape
    reuses: the most recently used entry of its LM's pool (:mod:`fastflamingo.generation.lm_cache`),
    each tensor once; 0 where there is none (an eager or a peer's generate). The decode step's
    CUDA-graph pool is not in it (one step's activations: small beside the cache)."""
    try:
        from ..generation import lm_cache
    except ImportError:
        return 0
    lm = getattr(module, "lang_encoder", module)
    pool = lm_cache._STATIC_POOL.get(lm) if isinstance(lm, torch.nn.Module) else None
    if not pool:
        return 0
    cache = next(reversed(pool.values())).cache
    seen, total = set(), 0
    for layer in getattr(cache, "layers", ()):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor) and t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total


def weights_mb(module: torch.nn.Module) -> float:
    """Weight bytes in MiB: :func:`fastflamingo.quant.model_bytes` (parameters, buffers and
    quantization statistics, each tensor once)."""
    from ..quant import model_bytes
    return model_bytes(module) / 2**20


@contextlib.contextmanager
def train_mode(module: torch.nn.Module | None):
    """A training step as a user runs it, in training mode (activation checkpointing, for one,
    acts only there), with every dropout at p=0 so that its loss is the checked one (the
    reference's, computed in eval mode); the modes and rates are put back after."""
    if module is None:
        yield
        return
    modes = {m: m.training for m in module.modules()}
    dropouts = {m: m.p for m in module.modules() if isinstance(m, torch.nn.modules.dropout._DropoutNd)}
    module.train()
    for m in dropouts:
        m.p = 0.0
    try:
        yield
    finally:
        for m, p in dropouts.items():
            m.p = p
        for m, training in modes.items():
            m.training = training


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

    def prefill(self, e: Entrant) -> list[Row]:
        """The prefill rows of ``e`` alone: :meth:`check_prefill`, then its timing."""
        return time_stages([self.check_prefill(e)], self.device)

    def held_bytes(self, e: Entrant, decode: bool = False) -> dict:
        """``peak_memory_call``'s arguments for ``e``: on a GPU its weights count, not what the
        benchmark holds beside them (none known: everything allocated). ``decode`` (an entrant
        whose first, compiling call ran before the measured one): also the static KV cache that
        call left in the pool and the measured call reuses (:func:`pooled_cache_bytes`): allocated before the call, it would not be counted,
        where a peer's cache, allocated in its call, is."""
        if e.module is None:
            return {}
        held = {"held_bytes": int(weights_mb(e.module) * 2**20)}
        cache = pooled_cache_bytes(e.module) if decode else 0
        if cache:
            held["held_bytes"] += cache
            held["held"] = f"the model's weights and its pooled static KV cache ({cache / 2**20:.1f} MiB)"
        return held

    def check_prefill(self, e: Entrant) -> list[Row] | Timed:
        kw = {"mode": e.quant} if e.quant else {}
        hi = self.ref["logits_hi"]
        with torch.no_grad():
            logits, peak, how = peak_memory_call(e.prefill, self.device, **self.held_bytes(e))
            err, bound = self.logits_error(logits, e.quant)
            why = None
            if not torch.isfinite(logits).all() or not err <= bound:
                why = f"logits relative error {err:.2e} > {bound:.2e} vs the high-precision reference"
            elif e.quant:
                top1, least = top1_agreement(logits, hi), QUANT_BOUNDS[e.quant][1]
                if not top1 >= least:
                    why = (f"top-1 agreement {top1:.0%} < {least:.0%} with the high-precision reference "
                           f"(relative error {err:.1e})")
            if why:
                return [self.row("e2e prefill", e.name, "time_ms", status=f"FAILED: {why}", **kw)]
        note = f"logits rel. error vs {str(hi.dtype)[6:]} reference {err:.1e} (bound {bound:.1e})"
        if e.quant:
            note += f", top-1 agreement {top1:.0%} (at least {least:.0%})"
        rest = [self.row("e2e prefill", e.name, "peak_mem_MB", median=peak, note=how, **kw)]
        if e.module is not None:
            rest.append(self.row("e2e weights", e.name, "weights_MB", median=weights_mb(e.module),
                                 note="parameters, buffers and quantization statistics", **kw))

        def rows(t):
            return [self.row("e2e prefill", e.name, "time_ms", note=note, **kw).with_timing(t["prefill"])] + rest
        return Timed({"prefill": (_no_grad(e.prefill), self.cfg.reps)}, rows,
                     lambda: breakdown.record(self.label, e.name, "prefill", e.prefill, self.device))

    def logits_error(self, logits: torch.Tensor, quant: str | None = None) -> tuple[float, float]:
        """(relative error of ``logits`` vs the high-precision reference, the bound it must meet).

        The flash-attention rule at model level: at most 2x the error of the same reference run in
        the working precision, plus one unit of that precision's epsilon; quantized weights
        (``quant``): their :data:`QUANT_BOUNDS`.
        """
        hi = self.ref["logits_hi"]
        err = relative_error(logits, hi)
        if quant:
            return err, QUANT_BOUNDS[quant][0]
        base = relative_error(self.ref["logits"], hi)
        return err, 2 * base + torch.finfo(self.ref["logits"].dtype).eps

    def decode(self, e: Entrant) -> list[Row]:
        """The decode rows of ``e`` alone: :meth:`check_decode`, then its timing."""
        return time_stages([self.check_decode(e)], self.device)

    def own_greedy_share(self, e: Entrant, out: torch.Tensor, T: int) -> float:
        """The share of the new tokens of ``out`` that are ``e``'s argmax (banned tokens excluded)
        when ``e`` scores ``out`` in one forward: teacher-forced, no cache."""
        logits = e.teacher_forced(out)[:, T - 1:-1].float()
        logits[..., list(self.banned)] = float("-inf")
        return (logits.argmax(-1) == out[:, T:]).float().mean().item()

    def check_decode(self, e: Entrant) -> list[Row] | Timed:
        kw = {"mode": e.quant} if e.quant else {}
        if e.generate is None:
            return [self.row("e2e decode", e.name, "tokens_per_s", status=f"n/a: {e.why_no_generate}", **kw)]
        n, T = self.cfg.new_tokens, self.ref["tokens"].shape[1] - self.cfg.new_tokens
        first_call = ""
        with torch.no_grad():
            try:
                if e.compiles:  # compile outside the memory profiler (it would record the compiler)
                    before = compile_counts()
                    _, first_ms = time_once(lambda: e.generate(n), self.device)
                    first_call = (f"; its first call (compiling) took {first_ms / 1e3:.1f} s, outside the timed "
                                  f"calls: {describe_counts(compile_counts(), before)}")
                out, peak, how = peak_memory_call(lambda: e.generate(n), self.device,
                                                  **self.held_bytes(e, decode=e.compiles))
            except Exception as ex:  # noqa: BLE001 - a generate that cannot run here is reported
                return [self.row("e2e decode", e.name, "tokens_per_s",
                                 status=_unavailable(ex), **kw)]
            new, ref_new = out[:, T:], self.ref["tokens"][:, T:]
            agree = (new[:, :ref_new.shape[1]] == ref_new[:, :new.shape[1]]).float().mean().item()
            own = ""
            if new.shape != ref_new.shape:
                ok = False
            elif e.quant:  # its own greedy choices (see OWN_GREEDY_FLOOR)
                share = self.own_greedy_share(e, out, T)
                ok, own = share >= OWN_GREEDY_FLOOR, (f"; {share:.0%} its own model's argmax, teacher-forced "
                                                      f"(at least {OWN_GREEDY_FLOOR:.0%})")
            elif self.cfg.dtype == torch.float32:
                ok = bool((new == ref_new).all())
            else:
                ok = bool((new[:, 0] == ref_new[:, 0]).all())
                if e.teacher_forced is None:
                    own = "; 16-bit: the first new token of every row compared, the later ones not (no teacher-forced scoring)"
                else:
                    share = self.own_greedy_share(e, out, T)
                    ok = ok and share >= GREEDY_16BIT_FLOOR
                    own = (f"; 16-bit: first new tokens equal, {share:.0%} of all new tokens its own argmax, "
                           f"teacher-forced (at least {GREEDY_16BIT_FLOOR:.0%})")
            if not ok:
                return [self.row("e2e decode", e.name, "tokens_per_s", status=f"FAILED: generated tokens "
                                 f"{tuple(new.shape)} agree {agree:.0%} with the greedy reference{own}", **kw)]
        tokens, batch = new.numel(), new.shape[0]
        note = (f"{tokens} new tokens (batch {batch}) per call, prefill included; {agree:.0%} equal to greedy "
                f"reference{own}{first_call}")
        reps = max(MIN_DECODE_REPS, self.cfg.reps - 1)
        calls = {"n": (_no_grad(lambda: e.generate(n)), reps)}
        if n >= 2:
            calls["1"] = (_no_grad(lambda: e.generate(1)), reps)
            calls["1"][0]()  # (measure_together times calls already run once: only generate(n) ran, in the check)
        checked = compile_counts()

        def rows(t):
            warning = ""
            if e.compiles and compile_counts()[0] != checked[0]:  # the timed (or profiled) calls compiled again
                again = describe_counts(compile_counts(), checked).removeprefix("WARNING: ")
                warning = f"; WARNING: later calls compiled again: {again}"
            rate = {k: tokens / (getattr(t["n"], k) * 1e-3) for k in ("median", "p20", "p80")}
            return [self.row("e2e decode", e.name, "tokens_per_s", median=rate["median"], p20=rate["p80"],
                             p80=rate["p20"], reps=t["n"].reps, note=note + warning, **kw),
                    self.row("e2e decode", e.name, "peak_mem_MB", median=peak, note=how, **kw),
                    *self.decode_steps(e, t["n"], t.get("1"), batch, **kw)]

        def profile():  # a peer's eager loop: ~10^5 events to profile, no question
            if e.name.startswith("fastflamingo"):
                breakdown.record(self.label, e.name, f"generate {n} tokens", lambda: e.generate(n), self.device)
        return Timed(calls, rows, profile)

    def check_beams(self, e: Entrant) -> list[Row] | Timed:
        """Beam search as open_flamingo's evaluation runs it (``cfg.beams`` beams, ``n`` new tokens
        per row, every stop token banned so every provider decodes the same number of steps):
        the best beams must equal the reference's (fp32; 16-bit: the first new token of every row),
        then new tokens of the returned rows per second, prefill included."""
        K, n = self.cfg.beams, self.cfg.new_tokens
        kernel = f"e2e beam search x{K}"
        if e.generate is None:
            return [self.row(kernel, e.name, "tokens_per_s", status=f"n/a: {e.why_no_generate}")]
        if "beams" not in self.ref:
            return [self.row(kernel, e.name, "tokens_per_s",
                             status="n/a: no reference beams (fastflamingo's generate is not in this build)")]
        want = self.ref["beams"]
        T = want.shape[1] - n
        with torch.no_grad():
            try:
                out = e.generate(n, K)
            except Exception as ex:  # noqa: BLE001 - a provider that cannot run beam search here is reported
                return [self.row(kernel, e.name, "tokens_per_s", status=_unavailable(ex))]
        new, ref_new = out[:, T:], want[:, T:]
        agree = (new[:, :ref_new.shape[1]] == ref_new[:, :new.shape[1]]).float().mean().item()
        exact = self.cfg.dtype == torch.float32
        ok = new.shape == ref_new.shape and (bool((new == ref_new).all()) if exact
                                             else bool((new[:, 0] == ref_new[:, 0]).all()))
        if not ok:
            return [self.row(kernel, e.name, "tokens_per_s", status=f"FAILED: best beams {tuple(new.shape)} "
                             f"agree {agree:.0%} with the reference's")]
        tokens = new.numel()
        note = (f"{K} beams, {n} new tokens per row (batch {new.shape[0]}, the best beam's) per call, prefill "
                f"included; {agree:.0%} equal to the reference's"
                + ("" if exact else "; 16-bit: only the first new token of every row checked"))
        calls = {"beams": (_no_grad(lambda: e.generate(n, K)), max(MIN_DECODE_REPS, self.cfg.reps - 1))}

        def rows(t):
            rate = {k: tokens / (getattr(t["beams"], k) * 1e-3) for k in ("median", "p20", "p80")}
            return [self.row(kernel, e.name, "tokens_per_s", median=rate["median"], p20=rate["p80"],
                             p80=rate["p20"], reps=t["beams"].reps, note=note)]
        return Timed(calls, rows)

    def decode_steps(self, e: Entrant, t_n: Timing, t_1: Timing | None, batch: int, **kw) -> list[Row]:
        """The decode steps alone: (time of generate(n) - time of generate(1)) / (n - 1) per step,
        as new tokens/s of the batch (what the weight-bandwidth limit bounds; the prefill-included
        rate above is what a user of one call sees)."""
        n = self.cfg.new_tokens
        if t_1 is None:
            return []
        step_ms = (t_n.median - t_1.median) / (n - 1)
        if step_ms <= 0:
            return [self.row("e2e decode step", e.name, "tokens_per_s", status=f"n/a: generate({n}) "
                             f"{t_n.median:.1f} ms was not slower than generate(1) {t_1.median:.1f} ms", **kw)]
        note = (f"({t_n.median:.1f} - {t_1.median:.1f} ms) / {n - 1} steps = {step_ms:.2f} ms per step of "
                f"batch {batch}: generate({n}) minus generate(1), medians")
        return [self.row("e2e decode step", e.name, "tokens_per_s", median=batch / (step_ms * 1e-3),
                         reps=min(t_n.reps, t_1.reps), note=note, **kw)]

    def train_check(self, e: Entrant) -> str | None:
        """None where ``e``'s loss matches the reference and its trainable parameters' gradients
        do, else the status of its rows. Every trainable parameter must get a gradient; where
        the reference's gradients are known by name (``ref["grads"]``, ``ref["grads_hi"]``: the
        reference model in the working and in higher precision) and ``e``'s trainable
        parameters have those names (fastflamingo's entrants, a peer with the same names), all
        of them as one vector must be within 3x the working-precision reference's relative
        error of the high-precision one, plus one epsilon (the flash-attention rule for gradients)."""
        params = e.params()
        try:
            with train_mode(e.module):
                for p in params:
                    p.grad = None
                loss_t = e.loss()
                loss = loss_t.item()
                loss_t.backward()
        except Exception as ex:  # noqa: BLE001 - a loss that cannot run here is reported, the group goes on
            return _unavailable(ex)
        try:
            err = abs(loss - self.ref["loss"]) / abs(self.ref["loss"])
            if not err <= self.loss_tol:
                return f"FAILED: loss {loss:.5f} vs reference {self.ref['loss']:.5f} (rel. {err:.1e})"
            missing = sum(p.grad is None for p in params)
            if missing:
                return f"FAILED: {missing} of {len(params)} trainable parameters got no gradient"
            return self.grads_failure(e, params)
        finally:
            for p in params:
                p.grad = None

    def grads_failure(self, e: Entrant, params: list) -> str | None:
        """:meth:`train_check`'s comparison of the gradients by name, or None."""
        lo, hi = self.ref.get("grads"), self.ref.get("grads_hi")
        if not lo or not hi or e.module is None:
            return None
        names = {id(p): n for n, p in e.module.named_parameters()}
        mine = {names.get(id(p)): p.grad for p in params}
        if set(mine) != set(lo) or any(mine[n].shape != lo[n].shape for n in lo):
            return None  # other names: the loss and the gradients' presence are what is compared
        order = sorted(lo)

        def flat(g):
            return torch.cat([g[n].detach().double().flatten() for n in order])
        ref_hi = flat(hi)
        err, base = relative_error(flat(mine), ref_hi), relative_error(flat(lo), ref_hi)
        bound = 3 * base + torch.finfo(lo[order[0]].dtype).eps
        return None if err <= bound else \
            f"FAILED: trainable parameters' gradients rel. error {err:.2e} > {bound:.2e} vs the high-precision reference"

    def train(self, e: Entrant, failure: str | None) -> list[Row]:
        """The training rows of ``e`` alone: :meth:`check_train`, then its timing."""
        return self.train_rows([(e, failure)])

    def train_rows(self, trained: list[tuple[Entrant, str | None]]) -> list[Row]:
        """The training rows of the entrants ``trained`` ((entrant, failure) pairs), checked and
        timed together, every entrant's module in :func:`train_mode` once around it all (not
        inside each timed step, where walking the modules would be timed too)."""
        with contextlib.ExitStack() as modes:
            for e, _ in trained:
                modes.enter_context(train_mode(e.module))
            return time_stages([self.check_train(e, failure) for e, failure in trained], self.device)

    def check_train(self, e: Entrant, failure: str | None) -> list[Row] | Timed:
        """A step with AdamW, in training mode with dropout off (:func:`train_mode`, which the
        caller holds: :meth:`train_rows`), measured for
        peak memory once a first step has allocated the optimizer's state: a training step's peak
        is in its backward, with the activations, the gradients and that state all held (the first
        step's backward has no optimizer state yet). The steps change the weights (shared with the
        other entrants, and used by the later quantized stages): they are put back once the steps
        are timed."""
        if failure:
            return [self.row("e2e train step", e.name, "time_ms", status=failure)]
        params = e.params()
        saved = [p.detach().clone() for p in params]
        opt = torch.optim.AdamW(params, lr=1e-5)

        def step():
            e.loss().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        def held() -> dict:  # the weights and the optimizer's state (allocated by the first step)
            if e.module is None:
                return {}
            state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                        if isinstance(t, torch.Tensor))
            return {"held_bytes": self.held_bytes(e)["held_bytes"] + state,
                    "held": "the model's weights and the optimizer's state"}

        def restore():
            opt.state.clear()
            with torch.no_grad():
                for p, w in zip(params, saved):
                    p.grad = None
                    p.copy_(w)
            saved.clear()
        try:
            step()
            _, peak, how = peak_memory_call(step, self.device, **held())
        except Exception as ex:  # noqa: BLE001 - e.g. out of memory: reported, the group goes on
            restore()
            if torch.device(self.device).type == "cuda":
                torch.cuda.empty_cache()
            return [self.row("e2e train step", e.name, "time_ms", status=_unavailable(ex))]
        n = sum(p.numel() for p in params)
        note = f"AdamW over {n / 1e6:.1f}M trainable parameters" + (
            ", training mode, dropout off" if e.module is not None else "")

        def rows(t):
            return [self.row("e2e train step", e.name, "time_ms", note=note).with_timing(t["step"]),
                    self.row("e2e train step", e.name, "peak_mem_MB", median=peak, note=how)]
        return Timed({"step": (step, self.cfg.reps)}, rows, restore)

    def run(self) -> list[Row]:
        stages = []
        for e in self.entrants:
            stages += ([self.check_prefill(e)] if "prefill" in e.stages else []) + \
                      ([self.check_decode(e)] if "decode" in e.stages else []) + \
                      ([self.check_beams(e)] if "beams" in e.stages and self.cfg.beams > 1 else [])
        rows = time_stages(stages, self.device)
        # the entrants share weights: check every loss before any optimizer step moves them
        trained = [e for e in self.entrants if "train" in e.stages]
        failures = [self.train_check(e) for e in trained]
        if torch.device(self.device).type == "cuda":
            # one at a time: every entrant's optimizer state at once may not fit next to the models
            for e, f in zip(trained, failures):
                rows += self.train(e, f)
        else:
            rows += self.train_rows(list(zip(trained, failures)))
        return rows


def compile_counts() -> tuple[int, int, int]:
    """(frames dynamo compiled, graph breaks, CUDA graphs inductor skipped) so far in this process."""
    c = torch._dynamo.utils.counters
    return c["frames"]["ok"], sum(c["graph_break"].values()), c["inductor"]["cudagraph_skips"]


def describe_counts(after: tuple[int, int, int], before: tuple[int, int, int]) -> str:
    """What was compiled between two :func:`compile_counts`. A fallback (no frame compiled, a graph
    break, a skipped CUDA graph) is marked WARNING, which the table prints under its block."""
    frames, breaks, skips = (a - b for a, b in zip(after, before))
    text = f"{frames} frame(s) compiled, {breaks} graph break(s), {skips} CUDA graph(s) skipped"
    return f"WARNING: {text}" if frames == 0 or breaks or skips else text


def _no_grad(fn: Callable[[], object]) -> Callable[[], object]:
    def call():
        with torch.no_grad():
            return fn()
    return call
