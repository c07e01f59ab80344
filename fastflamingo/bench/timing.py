"""Timing: medians and p20/p80 spreads, warm-up outside the measured region.

GPU, by default (method ``cuda-graph``): the GPU time of one call. ``fn`` (already run once:
compiled, autotuned) is warmed up on a side stream and captured into a ``torch.cuda.CUDAGraph``;
each sample is then ``flush; start event; graph replay; end event`` on the caller's stream, where
the flush zeroes a buffer larger than L2 (256 MiB, or 4x L2) so every call starts with a cold L2,
as ``triton.testing.do_bench`` does. The host's launch and dispatch time is not in the samples:
the flush (at least 80 µs of GPU work: the buffer grows on faster memory) is queued before the
start event, so the replay (one launch for all of the call's kernels, tens of microseconds of host
time at most) is queued before the GPU reaches the start event. What remains in a sample is the
kernels' own time plus the GPU's graph-launch latency (a few microseconds;
``benchmarks/gpu_overhead.py`` measures that floor on a one-element add). Per-call samples, so
the median and p20/p80 mean the same as on the other paths.

GPU, eager (method ``events``): ``triton.testing.do_bench`` (CUDA events around each eager call,
L2 flushed between calls), CUDA events without Triton: the GPU time plus whatever host time of
the call (Triton launch, dispatch) the flush before it does not hide. It times any callable
that cannot be captured, and such a Timing says why in ``fallback``: one that syncs with the host
(``.item()``, ``int(tensor)``: a varlen cu_seqlens build), found before capturing by one call under
torch's sync debug mode "error", or one whose capture raises or records no GPU work. A failed
capture is cleaned up (capture ended, caller's stream current again, a fresh side stream for the
next one). ``measure(..., method="events")`` or ``FASTFLAMINGO_BENCH_TIMING=events`` forces it.

CPU (method ``wall-clock``): ``time.perf_counter`` around each call, repeated until a time
budget is spent; the providers of one kernel case side by side, in rotating rounds
(:func:`measure_side_by_side`), the end-to-end stages likewise (:func:`measure_together`).
A callable with a ``setup`` attribute (:class:`PerCall`) has it run before each of its calls,
outside the timed region: the kernel cases give every provider fresh index tensors there, so that
nothing derived from a tensor's identity (fastflamingo's chunk plan) carries over between calls.
"""
from __future__ import annotations

import contextlib
import os
import statistics
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

GRAPH = "cuda-graph"
EVENTS = "events"
WALL = "wall-clock"
ENV = "FASTFLAMINGO_BENCH_TIMING"
_ALIASES = {"cuda-graph": GRAPH, "graph": GRAPH, "cudagraph": GRAPH,
            "events": EVENTS, "eager": EVENTS, "do_bench": EVENTS}

FLUSH_BYTES = 256 << 20
FLUSH_MIN_US = 80.0
FLUSH_MAX_BYTES = 1 << 30


@dataclass
class Timing:
    median: float  # milliseconds
    p20: float
    p80: float
    reps: int            # the number of samples
    method: str = WALL   # GRAPH, EVENTS or WALL: how the samples were taken
    fallback: str = ""   # why the CUDA-graph capture failed (method EVENTS instead of GRAPH)


class PerCall:
    """``fn`` with ``setup()`` run before each call of it, outside the timed region (fresh inputs
    per call: see the module docstring). On CUDA ``setup`` runs once, before the timing (a graph
    replays the same tensors; the Triton path derives nothing from a tensor's identity)."""

    def __init__(self, fn: Callable[[], object], setup: Callable[[], object]):
        self.fn, self.setup = fn, setup

    def __call__(self):
        return self.fn()


def _setup(fn) -> None:
    """Run ``fn``'s per-call setup (a :class:`PerCall`'s), if any."""
    setup = getattr(fn, "setup", None)
    if setup is not None:
        setup()


def _quantiles(samples: list[float], method: str = WALL) -> Timing:
    samples = sorted(samples)
    if len(samples) == 1:
        return Timing(samples[0], samples[0], samples[0], 1, method)
    q = statistics.quantiles(samples, n=10, method="inclusive")
    return Timing(statistics.median(samples), q[1], q[7], len(samples), method)


def resolve_method(method: str | None = None) -> str:
    """GRAPH or EVENTS: ``method`` if given, else ``$FASTFLAMINGO_BENCH_TIMING``, else GRAPH."""
    name = method if method is not None else (os.environ.get(ENV) or GRAPH)
    try:
        return _ALIASES[name.strip().lower()]
    except KeyError:
        raise ValueError(f"timing method {name!r}: expected one of {sorted(_ALIASES)}") from None


def describe(t: Timing) -> str:
    """One phrase for a row's note: how ``t`` was measured (empty for wall-clock CPU timing)."""
    if t.method == GRAPH:
        return "GPU time by CUDA-graph replay, L2 flushed"
    if t.method == EVENTS:
        s = "eager call timed by CUDA events, L2 flushed (host launch time included)"
        return s + (f"; CUDA-graph capture failed: {t.fallback}" if t.fallback else "")
    return ""


def measure(fn: Callable[[], object], device: str, *, quick: bool = False,
            budget_s: float | None = None, min_reps: int | None = None, method: str | None = None) -> Timing:
    """Time ``fn()`` in milliseconds. ``fn`` must already have run once (compiled, warmed).

    On CUDA, ``method`` (default: ``$FASTFLAMINGO_BENCH_TIMING`` or ``"cuda-graph"``) picks the
    GPU time by graph replay or the eager call by events (see the module docstring); the result's
    ``method`` and ``fallback`` say which one timed it. The CPU ignores ``method``.
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        ctx = torch.cuda.device(dev) if dev.index is not None else contextlib.nullcontext()
        with ctx:
            return time_cuda(fn, quick, method)
    budget = budget_s if budget_s is not None else (0.2 if quick else 0.6)
    min_reps = min_reps if min_reps is not None else (5 if quick else 9)
    _setup(fn)
    fn()  # warm-up: allocator and caches
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < min_reps or (time.perf_counter() - start < budget and len(samples) < 200):
        _setup(fn)
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return _quantiles(samples, WALL)


def measure_side_by_side(fns: list[Callable[[], object]], *, quick: bool = False) -> list[Timing]:
    """CPU: time the providers of one kernel case side by side, each with the budget and minimum
    number of samples :func:`measure` gives one (0.6 s / 9 samples; quick 0.2 s / 5), but in
    :func:`measure_together`'s rotating rounds: a shared machine's drift (another process, the
    clock) then moves every provider's samples alike instead of favouring the one timed first or
    last (timed one after the other, the first provider of a case ran up to ~1.5x slower than the
    same code timed later). Each timed call follows an untimed one of the same fn, so caches are
    warm as in back-to-back calls. The number of samples of each fn comes from one timed warm-up
    call: its budget over that time, between the minimum and 200."""
    if not fns:
        return []
    budget = 0.2 if quick else 0.6
    min_reps = 5 if quick else 9
    calls = []
    for fn in fns:
        _setup(fn)
        fn()  # warm-up: allocator and caches
        _setup(fn)
        t0 = time.perf_counter()
        fn()
        took = max(time.perf_counter() - t0, 1e-6)
        calls.append((fn, int(min(200, max(min_reps, budget / took)))))
    return measure_together(calls, "cpu")


# ------------------------------------------------------------------------- the choice
def time_cuda(fn, quick: bool, method: str | None = None, *, graph_timer=None, event_timer=None) -> Timing:
    """The GPU path's decision: the graph timer unless EVENTS is asked for; the event timer, with
    the reason in ``fallback``, when the graph timer raises (capture failed). The timers are
    parameters so that tests can drive this without a GPU."""
    graph_timer = graph_timer or _graph_timing
    event_timer = event_timer or _event_timing
    _setup(fn)
    if resolve_method(method) == EVENTS:
        return event_timer(fn, quick)
    try:
        return graph_timer(fn, quick)
    except Exception as e:  # noqa: BLE001 - any capture or replay failure: time it eagerly instead
        reason = _reason(e)
    t = event_timer(fn, quick)
    t.fallback = reason
    return t


def _reason(e: BaseException) -> str:
    """The first line of the error, and of the error it was raised during (capture_end's
    "operation failed due to a previous error during capture" hides the real one)."""
    def line(x):
        s = str(x).strip().splitlines()
        return f"{type(x).__name__}: {s[0] if s else ''}"[:160]
    parts = [line(e)]
    inner = e.__context__ or e.__cause__
    if inner is not None and not isinstance(inner, (KeyboardInterrupt, SystemExit)):
        parts.insert(0, line(inner))
    return "; then ".join(dict.fromkeys(parts))


# ------------------------------------------------------------------------- events (eager)
def _event_timing(fn, quick: bool) -> Timing:
    warmup, rep = (10, 40) if quick else (25, 100)
    try:
        from triton.testing import do_bench
    except ImportError:
        return _measure_events(fn, rep)
    # every sample (not do_bench's quantiles): the median and deciles as on the other paths, and their count
    return _quantiles([float(t) for t in do_bench(fn, warmup=warmup, rep=rep, return_mode="all")], EVENTS)


def _measure_events(fn, rep_ms: int) -> Timing:
    """CUDA events around each eager call, without Triton: L2 flushed before each (outside the
    events), as ``do_bench`` does, so that :func:`describe`'s "L2 flushed" holds here too."""
    fn()
    flush = flush_buffer()
    torch.cuda.synchronize()
    samples = []
    budget = time.perf_counter() + rep_ms * 1e-3
    while len(samples) < 5 or time.perf_counter() < budget:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        flush.zero_()
        start.record()
        fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end))
    return _quantiles(samples, EVENTS)


# ------------------------------------------------------------------------- CUDA graph
class CaptureError(RuntimeError):
    """The callable cannot be timed by graph replay."""


_flush_buffers: dict = {}
_capture_stream: dict = {}


def flush_buffer() -> torch.Tensor:
    """The current device's L2 flush buffer, kept (allocating it per measurement costs): 256 MiB,
    at least 4x L2, and large enough that zeroing it takes FLUSH_MIN_US of GPU time, the head
    start the replay's launch gets on the GPU (see the module docstring)."""
    idx = torch.cuda.current_device()
    buf = _flush_buffers.get(idx)
    if buf is None:
        l2 = getattr(torch.cuda.get_device_properties(idx), "L2_cache_size", 0) or 0
        nbytes = max(FLUSH_BYTES, 4 * l2)
        buf = torch.empty(nbytes // 4, dtype=torch.int32, device=f"cuda:{idx}")
        us = flush_us(buf)
        if us < FLUSH_MIN_US:  # fast memory: a longer flush
            nbytes = min(int(nbytes * FLUSH_MIN_US / max(us, 1.0)) + (1 << 20), FLUSH_MAX_BYTES)
            del buf
            buf = torch.empty(nbytes // 4, dtype=torch.int32, device=f"cuda:{idx}")
        _flush_buffers[idx] = buf
    return buf


def flush_us(buf: torch.Tensor) -> float:
    """GPU microseconds of one flush (zeroing ``buf``), the median of 5."""
    buf.zero_()
    torch.cuda.synchronize()
    times = []
    for _ in range(5):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        buf.zero_()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) * 1e3)
    return statistics.median(times)


def _side_stream() -> torch.cuda.Stream:
    """The stream captures run on: one per device, replaced after a failed capture."""
    idx = torch.cuda.current_device()
    if idx not in _capture_stream:
        _capture_stream[idx] = torch.cuda.Stream()
    return _capture_stream[idx]


def host_sync(fn) -> str:
    """Why ``fn`` cannot be captured, found by one eager call with torch's sync debug mode set to
    "error" (``.item()``, ``int(tensor)``, ``nonzero``, a pageable copy...), or "". Checked before
    capturing: a capture that fails leaves its memory pool registered with the allocator."""
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - a sync, or anything else the capture would also fail on
        return f"host sync check: {_reason(e)}"
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    return ""


def capture(fn, warmup: int = 3) -> torch.cuda.CUDAGraph:
    """``fn`` captured into a CUDA graph on a side stream (after ``warmup`` calls on that stream:
    cuBLAS workspaces, lazy initialisation). Raises :class:`CaptureError` for a callable that
    syncs with the host (checked first), and whatever the capture raises otherwise, leaving no
    capture running, the caller's stream current and a fresh side stream for the next capture."""
    why = host_sync(fn)
    if why:
        raise CaptureError(why)
    caller = torch.cuda.current_stream()
    side = _side_stream()
    g = torch.cuda.CUDAGraph()
    try:
        side.wait_stream(caller)
        with torch.cuda.stream(side):
            for _ in range(warmup):
                fn()
        caller.wait_stream(side)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with torch.cuda.graph(g, stream=side):
                fn()
        torch.cuda.set_stream(caller)
        if any("graph is empty" in str(w.message).lower() for w in caught):
            raise CaptureError("the captured graph is empty (no GPU work on the capturing stream)")
        return g
    except BaseException:
        _recover(caller, side, g)
        raise


def _recover(caller, side, g) -> None:
    """After a failed capture: end a capture still running on ``side`` (torch.cuda.graph's exit
    does not restore the stream when capture_end raises), make ``caller`` current again, retire
    ``side``, and surface (clear) any error left for the next CUDA call to report."""
    with contextlib.suppress(Exception):
        with torch.cuda.stream(side):
            if torch.cuda.is_current_stream_capturing():
                g.capture_end()
    with contextlib.suppress(Exception):
        torch.cuda.set_stream(caller)
    _capture_stream.pop(torch.cuda.current_device(), None)
    for _ in range(2):
        try:
            torch.cuda.synchronize()
            break
        except Exception:  # noqa: BLE001 - a stale capture error is reported (and cleared) once
            continue


def replay_samples(g: torch.cuda.CUDAGraph, n: int, flush: torch.Tensor | None = None) -> list[float]:
    """``n`` per-replay times in ms, L2 flushed before each (outside the timed region)."""
    flush = flush_buffer() if flush is None else flush
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for s, e in zip(starts, ends):
        flush.zero_()
        s.record()
        g.replay()
        e.record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in zip(starts, ends)]


def _graph_timing(fn, quick: bool) -> Timing:
    rep_ms, max_n = (10.0, 100) if quick else (25.0, 300)  # of kernel time; the flushes come on top
    flush = flush_buffer()
    g = capture(fn)
    try:
        g.replay()  # the first replays upload the graph
        g.replay()
        torch.cuda.synchronize()
        est = statistics.median(replay_samples(g, 5, flush))
        n = max(10, min(max_n, int(rep_ms / max(est, 1e-4))))
        samples = replay_samples(g, n, flush)
    finally:
        with contextlib.suppress(Exception):  # no replay in flight when the graph's pool is freed
            torch.cuda.synchronize()
        del g  # frees the graph's private memory pool (its outputs are dead)
    return _quantiles(samples, GRAPH)


# ------------------------------------------------------------------------- long stages
def time_once(fn: Callable[[], object], device: str) -> tuple[object, float]:
    """(result, milliseconds) of one synchronised call: for long end-to-end stages."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return out, (time.perf_counter() - t0) * 1e3


def measure_together(calls: list[tuple[Callable[[], object], int]], device: str) -> list[Timing]:
    """Time several stages side by side: ``calls`` = [(fn, reps), ...], each fn already run once.

    In rounds, each fn timed once per round (while it has reps left), the order rotating from
    round to round, so that a machine that speeds up or slows down during the run (a shared CPU)
    moves every provider's samples alike instead of the ones timed last. On a CPU each timed call
    follows an untimed one of the same fn where other fns ran in the round: their calls evict its
    weights from the caches, which back-to-back calls of one model would find warm. On CUDA the
    weights never fit the caches anyway: no extra call.
    """
    cpu = torch.device(device).type != "cuda"
    samples: list[list[float]] = [[] for _ in calls]
    rounds = max((reps for _, reps in calls), default=0)
    for r in range(rounds):
        live = [i for i, (_, reps) in enumerate(calls) if reps > r]
        shift = r % len(live)
        rewarm = cpu and len(live) > 1
        for i in live[shift:] + live[:shift]:
            fn = calls[i][0]
            if rewarm:
                _setup(fn)
                fn()
            _setup(fn)  # outside the timed call
            samples[i].append(time_once(fn, device)[1])
    return [_quantiles(s) for s in samples]
