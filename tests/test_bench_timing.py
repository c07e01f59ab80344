"""The benchmark's timing methods: wall clock on the CPU; on a GPU the kernels' own time by
CUDA-graph replay, eager calls by CUDA events where a callable cannot be captured, and every row
saying which method timed it.

CPU tests drive the GPU path's decision with fake timers; the tests named ``*cuda*`` need a GPU
(``pytest -k "cuda or gpu"``)."""
import csv
import inspect
import os
import pathlib
import subprocess
import sys
import warnings

import pytest
import torch

from fastflamingo.bench import harness, image_causal, timing
from fastflamingo.bench.harness import EAGER, run_case, timed_call
from fastflamingo.bench.report import format_table, timing_lines
from fastflamingo.bench.rows import Row, write_csv
from fastflamingo.bench.timing import EVENTS, GRAPH, WALL, Timing

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


# ------------------------------------------------------------------------- CPU path
def test_cpu_timing_is_the_wall_clock_as_before():
    x = torch.randn(64, 64)
    t = timing.measure(lambda: x @ x, "cpu", quick=True)
    assert t.method == WALL and t.fallback == ""
    assert t.reps >= 5 and 0 < t.p20 <= t.median <= t.p80
    # a method asked for changes nothing on the CPU
    assert timing.measure(lambda: x @ x, "cpu", quick=True, method="events").method == WALL


def test_side_by_side_timing_treats_a_drifting_machine_alike(monkeypatch):
    """On the CPU a kernel case's providers are timed side by side (measure_side_by_side): two
    identical calls on a machine that slows down during the run (each call a little longer than
    the one before, on a fake clock) get the same median. Timed one after the other, the later
    one reads slower: the bias this removes."""
    clock, count = [0.0], [0]

    class FakeTime:
        @staticmethod
        def perf_counter():
            return clock[0]

    def drifting():  # 1 ms, and 10 us more at every call
        clock[0] += 1e-3 + 1e-5 * count[0]
        count[0] += 1

    monkeypatch.setattr(timing, "time", FakeTime)
    a, b = timing.measure_side_by_side([drifting, drifting], quick=True)
    assert a.method == b.method == WALL and a.reps >= 5 and b.reps >= 5
    assert abs(a.median - b.median) < 0.02 * a.median, (a.median, b.median)
    count[0] = 0
    first, second = timing.measure(drifting, "cpu", quick=True), timing.measure(drifting, "cpu", quick=True)
    assert second.median > 1.3 * first.median, (first.median, second.median)
    assert timing.measure_side_by_side([]) == []


def test_cpu_kernel_cases_are_timed_side_by_side(monkeypatch):
    """run_case on the CPU times every provider's row of a mode in one measure_side_by_side call."""
    batches = []
    real = harness.measure_side_by_side

    def spy(fns, *, quick=False):
        batches.append(len(fns))
        return real(fns, quick=quick)

    monkeypatch.setattr(harness, "measure_side_by_side", spy)
    ps = image_causal.providers("cpu", 8)[:3]
    rows = run_case(_small_case(), ps, ("fwd", "fwd+bwd"), "cpu", quick=True, roofline=False)
    assert batches == [3, 3] and all(r.ok for r in rows) and EAGER not in {r.provider for r in rows}


def test_method_from_argument_environment_and_default(monkeypatch):
    monkeypatch.delenv(timing.ENV, raising=False)
    assert timing.resolve_method() == GRAPH
    assert timing.resolve_method("eager") == EVENTS and timing.resolve_method("do_bench") == EVENTS
    monkeypatch.setenv(timing.ENV, "events")
    assert timing.resolve_method() == EVENTS
    assert timing.resolve_method("graph") == GRAPH  # the argument wins
    with pytest.raises(ValueError):
        timing.resolve_method("stopwatch")


# ------------------------------------------------------------------------- the GPU path's decision
class _Timers:
    def __init__(self, graph_error=None):
        self.graph_error, self.calls = graph_error, []

    def graph(self, fn, quick):
        self.calls.append("graph")
        if self.graph_error is not None:
            raise self.graph_error
        return Timing(0.010, 0.009, 0.011, 100, GRAPH)

    def events(self, fn, quick):
        self.calls.append("events")
        return Timing(0.060, 0.055, 0.070, -1, EVENTS)

    def time(self, method=None):
        return timing.time_cuda(lambda: None, True, method, graph_timer=self.graph, event_timer=self.events)


def test_graph_replay_times_what_it_can_capture(monkeypatch):
    monkeypatch.delenv(timing.ENV, raising=False)
    timers = _Timers()
    t = timers.time()
    assert timers.calls == ["graph"] and t.method == GRAPH and t.fallback == ""


def _capture_failure():
    """What a host sync inside torch.cuda.graph raises: capture_end's error, raised while handling
    the sync's own."""
    try:
        try:
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nmore")
        except RuntimeError:
            raise RuntimeError("CUDA error: operation failed due to a previous error during capture")
    except RuntimeError as e:
        return e


def test_a_failed_capture_falls_back_to_events_and_says_why(monkeypatch):
    monkeypatch.delenv(timing.ENV, raising=False)
    timers = _Timers(_capture_failure())
    t = timers.time()
    assert timers.calls == ["graph", "events"]
    assert t.method == EVENTS and t.median == 0.060
    assert "not permitted when stream is capturing" in t.fallback and "previous error" in t.fallback
    assert "more" not in t.fallback  # first lines only
    timers = _Timers(timing.CaptureError("host sync check: RuntimeError: called a synchronizing CUDA operation"))
    assert "synchronizing" in timers.time().fallback


def test_events_asked_for_skip_the_capture(monkeypatch):
    timers = _Timers()
    assert timers.time("events").method == EVENTS and timers.calls == ["events"]
    monkeypatch.setenv(timing.ENV, "events")
    timers = _Timers()
    t = timers.time()
    assert timers.calls == ["events"] and t.method == EVENTS and t.fallback == ""


def test_interrupts_are_not_swallowed(monkeypatch):
    monkeypatch.delenv(timing.ENV, raising=False)
    with pytest.raises(KeyboardInterrupt):
        _Timers(KeyboardInterrupt()).time()


# ------------------------------------------------------------------------- rows and table
def _row(provider, t: Timing, **kw) -> Row:
    return Row(kernel="image-causal xattn", provider=provider, mode="fwd", metric="time_ms", x="B=8 N=4 T=256",
               device="H100", **kw).with_timing(t)


def test_rows_say_how_they_were_timed(tmp_path):
    graph = _row("fastflamingo", Timing(0.01, 0.009, 0.011, 100, GRAPH))
    assert graph.timing == GRAPH and "CUDA-graph replay" in graph.note and "timing_fallback" not in graph.extra
    floor = _row("matmuls + attention roofline (floor)", Timing(0.01, 0.009, 0.011, 100, GRAPH),
                 note="floor: part of the op")
    assert floor.note.startswith("floor: part of the op; ") and "CUDA-graph" in floor.note
    fell = _row("varlen mask build", Timing(0.3, 0.2, 0.4, -1, EVENTS, "RuntimeError: capturing"))
    assert fell.timing == EVENTS and "CUDA events" in fell.note
    assert "capture failed: RuntimeError: capturing" in fell.note
    assert fell.extra["timing_fallback"] == "RuntimeError: capturing"
    cpu = _row("fastflamingo", Timing(1.0, 0.9, 1.1, 9))
    assert cpu.timing == WALL and cpu.note == ""  # CPU rows as before
    write_csv([graph, fell, cpu], str(tmp_path / "rows.csv"))
    with open(tmp_path / "rows.csv") as f:
        got = {r["provider"] + r["timing"]: r for r in csv.DictReader(f)}
    assert {"fastflamingo" + GRAPH, "varlen mask build" + EVENTS, "fastflamingo" + WALL} == set(got)


def test_rows_record_how_many_samples_their_numbers_come_from(tmp_path, monkeypatch):
    """A median of 1 call and one of 300 are not the same figure: the row keeps the count, in
    rows.csv and rows.json; the eager GPU path (triton's do_bench) counts its own samples."""
    row = _row("fastflamingo", Timing(1.0, 0.9, 1.1, 7))
    assert row.reps == 7
    write_csv([row], str(tmp_path / "rows.csv"))
    with open(tmp_path / "rows.csv") as f:
        assert next(csv.DictReader(f))["reps"] == "7"
    testing = pytest.importorskip("triton.testing")
    seen = {}

    def fake_do_bench(fn, warmup=25, rep=100, quantiles=None, return_mode="mean"):
        seen.update(quantiles=quantiles, return_mode=return_mode)
        return [3.0, 1.0, 2.0, 4.0, 5.0]
    monkeypatch.setattr(testing, "do_bench", fake_do_bench)
    t = timing._event_timing(lambda: None, quick=True)
    assert seen == {"quantiles": None, "return_mode": "all"}
    assert (t.reps, t.median, t.method) == (5, 3.0, EVENTS) and t.p20 < t.median < t.p80


def test_table_says_which_cells_were_timed_eagerly():
    rows = [_row("fastflamingo", Timing(0.01, 0.009, 0.011, 100, GRAPH)),
            _row(EAGER, Timing(0.06, 0.05, 0.07, -1, EVENTS)),
            _row("sdpa dense mask", Timing(0.02, 0.019, 0.021, 100, GRAPH)),
            _row("varlen+build", Timing(0.3, 0.2, 0.4, -1, EVENTS, "RuntimeError: not permitted when capturing"))]
    table = format_table(rows)
    assert ("  timing: GPU time by CUDA-graph replay, L2 flushed; eager calls by CUDA events (host launch time "
            f"included): {EAGER}\n") in table
    assert "    by CUDA events, graph capture failed (RuntimeError: not permitted when capturing): varlen+build" in table
    assert "0.06" in table and "(2.00x)" in table  # sdpa's ratio; none for fastflamingo's eager column
    assert timing_lines([_row("fastflamingo", Timing(1.0, 0.9, 1.1, 9))]) == []
    assert timing_lines([_row("a", Timing(1.0, 0.9, 1.1, -1, EVENTS))]) == [
        "  timing: eager calls by CUDA events, L2 flushed (host launch time included)"]


def _small_case():
    return image_causal.make_case(1, 2, 32, 2, 8, 16, torch.float32, "cpu")


def test_cpu_rows_carry_the_method_and_get_no_eager_column():
    case = _small_case()
    ps = image_causal.providers("cpu", 8)[:2]
    rows = run_case(case, ps, ("fwd",), "cpu", quick=True, roofline=False)
    assert rows and all(r.ok and r.timing == WALL for r in rows)
    assert EAGER not in {r.provider for r in rows}


def test_eager_row_times_the_same_call_as_fastflamingos_row(monkeypatch):
    """Where fastflamingo's row was timed by graph replay, the next row times the same prepared call
    (same mode, same inputs) by CUDA events; no other provider gets one. The timer is faked: the
    CPU has no graph replay."""
    calls = []

    def fake_measure(fn, device, *, quick=False, method=None):
        calls.append((fn, method))
        return Timing(0.06, 0.05, 0.07, -1, EVENTS) if method == EVENTS else Timing(0.01, 0.009, 0.011, 100, GRAPH)

    monkeypatch.setattr(harness, "measure", fake_measure)
    monkeypatch.setattr(harness, "side_by_side", lambda device: False)  # time providers one by one, as on CUDA
    case = _small_case()
    ps = image_causal.providers("cpu", 8)[:2]
    assert ps[0].name == "fastflamingo" and ps[1].name != "fastflamingo"
    rows = run_case(case, ps, ("fwd", "fwd+bwd"), "cpu", quick=True, roofline=False)
    for mode in ("fwd", "fwd+bwd"):
        names = [r.provider for r in rows if r.mode == mode]
        assert names == ["fastflamingo", EAGER, ps[1].name], names
        eager = next(r for r in rows if r.mode == mode and r.provider == EAGER)
        assert eager.ok and eager.timing == EVENTS and eager.median == 0.06 and eager.x == case.x
    graph_calls = [fn for fn, m in calls if m is None]
    eager_calls = [fn for fn, m in calls if m == EVENTS]
    assert len(eager_calls) == 2 and all(fn in graph_calls for fn in eager_calls)  # the very same callables


# ------------------------------------------------------------------------- the graph path, on a fake CUDA
class _FakeCuda:
    """Just enough of torch.cuda for timing's graph path to run on a CPU: a clock that the flush
    and the replays advance, streams, a capture that fails the way torch's does (a host sync
    inside it raises, and torch.cuda.graph's exit raises too without restoring the stream)."""
    FLUSH_MS, CALL_MS = 0.1, 0.01

    def __init__(self):
        self.now, self.mode, self.capturing, self.work = 0.0, 0, None, 0
        self.default = self.Stream(self)
        self.current = self.default
        fake = self

        class Event:
            def __init__(self, enable_timing=False):
                self.t = None

            def record(self, stream=None):
                self.t = fake.now

            def synchronize(self):
                pass

            def elapsed_time(self, end):
                return end.t - self.t

        class Graph:
            def __init__(self):
                self.work = 0

            def replay(self):
                assert fake.capturing is None and self.work
                fake.now += fake.CALL_MS * self.work

            def capture_end(self):
                fake.capturing = None

        class Flush:
            def zero_(self):
                fake.now += fake.FLUSH_MS
        self.Event, self.CUDAGraph, self.flush = Event, Graph, Flush()

    class Stream:
        def __init__(self, fake=None):
            pass

        def wait_stream(self, other):
            assert isinstance(other, _FakeCuda.Stream)

    def stream(self, s):
        fake = self

        class Ctx:
            def __enter__(self):
                self.prev, fake.current = fake.current, s

            def __exit__(self, *exc):
                fake.current = self.prev
        return Ctx()

    def graph(self, g, stream=None, **kw):
        fake = self

        class Ctx:
            def __enter__(self):
                self.prev, fake.current = fake.current, stream
                fake.capturing, fake.work, fake.invalid = g, 0, False

            def __exit__(self, *exc):
                fake.capturing = None
                if fake.invalid:
                    raise RuntimeError("CUDA error: operation failed due to a previous error during capture")
                g.work = fake.work
                if not g.work:
                    warnings.warn("The CUDA Graph is empty. This usually means that the graph was ...")
                fake.current = self.prev
        return Ctx()

    def launch(self, sync=False):
        """What the timed callables call: one kernel, and a host sync if ``sync``."""
        if sync and self.mode == 2:
            raise RuntimeError("called a synchronizing CUDA operation")
        if sync and self.capturing is not None:
            self.invalid = True
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing")
        if self.capturing is not None:
            self.work += 1

    def functions(self):
        return dict(Event=self.Event, CUDAGraph=self.CUDAGraph, Stream=self.Stream, stream=self.stream,
                    graph=self.graph, current_stream=lambda: self.current, set_stream=self._set,
                    synchronize=lambda: None, current_device=lambda: 0,
                    get_sync_debug_mode=lambda: self.mode, set_sync_debug_mode=self._set_mode,
                    is_current_stream_capturing=lambda: self.capturing is not None)

    def _set(self, s):
        self.current = s

    def _set_mode(self, m):
        self.mode = {"default": 0, "warn": 1, "error": 2}.get(m, m)


@pytest.fixture
def fake_cuda(monkeypatch):
    fake = _FakeCuda()
    # the real API has everything the graph path uses
    assert "stream" in inspect.signature(torch.cuda.graph).parameters
    assert all(hasattr(torch.cuda.CUDAGraph, m) for m in ("replay", "capture_end"))
    assert all(hasattr(torch.cuda.Stream, m) for m in ("wait_stream",))
    assert all(hasattr(torch.cuda.Event, m) for m in ("record", "elapsed_time", "synchronize"))
    for name, f in fake.functions().items():
        assert hasattr(torch.cuda, name), name
        monkeypatch.setattr(torch.cuda, name, f)
    monkeypatch.setitem(timing._flush_buffers, 0, fake.flush)
    monkeypatch.setattr(timing, "_capture_stream", {})
    monkeypatch.setattr(timing, "_event_timing", lambda fn, quick: Timing(9.0, 8.0, 10.0, -1, EVENTS))
    monkeypatch.delenv(timing.ENV, raising=False)
    return fake


def test_graph_path_times_replays_without_the_flush(fake_cuda):
    t = timing.measure(lambda: (fake_cuda.launch(), fake_cuda.launch()), "cuda", quick=True)
    assert t.method == GRAPH and t.fallback == "" and t.reps >= 10
    assert t.median == pytest.approx(2 * fake_cuda.CALL_MS) and t.p80 == pytest.approx(t.p20)
    assert fake_cuda.current is fake_cuda.default and fake_cuda.mode == 0


def test_graph_path_falls_back_on_a_host_sync_and_recovers(fake_cuda, monkeypatch):
    t = timing.measure(lambda: fake_cuda.launch(sync=True), "cuda")
    assert t.method == EVENTS and "host sync check" in t.fallback and "synchronizing" in t.fallback
    assert fake_cuda.mode == 0  # sync debug mode restored
    # the same failure inside the capture: torch.cuda.graph's exit raises and keeps the side stream
    monkeypatch.setattr(timing, "host_sync", lambda fn: "")
    side = timing._side_stream()
    t = timing.measure(lambda: fake_cuda.launch(sync=True), "cuda")
    assert t.method == EVENTS and "not permitted when stream is capturing" in t.fallback
    assert fake_cuda.current is fake_cuda.default and fake_cuda.capturing is None
    assert timing._side_stream() is not side  # a fresh stream for the next capture
    assert timing.measure(lambda: fake_cuda.launch(), "cuda").method == GRAPH
    t = timing.measure(lambda: None, "cuda")  # no GPU work: an empty graph
    assert t.method == EVENTS and "empty" in t.fallback


def test_events_without_triton_flush_l2_before_each_call_as_described(fake_cuda):
    """The no-Triton event timer's rows say "L2 flushed": it flushes, outside the events."""
    flushes = []
    real_zero = fake_cuda.flush.zero_
    fake_cuda.flush.zero_ = lambda: (flushes.append(1), real_zero())

    def call():
        fake_cuda.now += 0.01
    t = timing._measure_events(call, 1)
    assert t.method == EVENTS and len(flushes) >= t.reps >= 5
    assert t.median == pytest.approx(0.01) and "L2 flushed" in timing.describe(t)


# ------------------------------------------------------------------------- on a GPU
@needs_gpu
def test_cuda_graph_time_of_a_matmul_agrees_with_events(monkeypatch):
    monkeypatch.delenv(timing.ENV, raising=False)
    a, b = (torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16) for _ in range(2))

    def mm():
        return a @ b
    mm()
    g = timing.measure(mm, "cuda", quick=True)
    e = timing.measure(mm, "cuda", quick=True, method="events")
    assert g.method == GRAPH and g.fallback == "" and g.reps >= 10, g
    assert e.method == EVENTS
    # ~0.2 ms of GPU work on an H100: launch overhead is a small part of either number
    assert 0.5 < g.median / e.median < 1.3, (g, e)
    assert 0 < g.p20 <= g.median <= g.p80
    assert torch.cuda.current_stream() == torch.cuda.default_stream()


@needs_gpu
def test_cuda_host_sync_falls_back_and_the_next_capture_works(monkeypatch):
    monkeypatch.delenv(timing.ENV, raising=False)
    x = torch.randn(1 << 20, device="cuda")

    def syncs():
        return float((x * 2).sum())  # .item(): a host sync, not capturable
    syncs()
    t = timing.measure(syncs, "cuda", quick=True)
    assert t.method == EVENTS and "synchroniz" in t.fallback, t
    assert torch.cuda.current_stream() == torch.cuda.default_stream()
    t = timing.measure(lambda: x.mul_(1.0), "cuda", quick=True)
    assert t.method == GRAPH and t.median > 0, t
    t = timing.measure(lambda: None, "cuda", quick=True)  # nothing on the GPU: an empty graph
    assert t.method == EVENTS and "empty" in t.fallback, t


_FAILED_CAPTURE = """
import torch
from fastflamingo.bench import timing
x = torch.randn(1 << 20, device="cuda")
syncs = lambda: float((x * 2).sum())
syncs()
timing.host_sync = lambda fn: ""  # skip the check: the sync fails inside torch.cuda.graph
t = timing.measure(syncs, "cuda", quick=True)
assert t.method == "events" and t.fallback, t
assert torch.cuda.current_stream() == torch.cuda.default_stream()
assert not torch.cuda.is_current_stream_capturing()
t = timing.measure(lambda: x.mul_(1.0), "cuda", quick=True)
assert t.method == "cuda-graph", t
assert (x + 1).sum().item() != 0
print("recovered:", t.median, "after", timing.measure(syncs, "cuda", quick=True).fallback)
"""


@needs_gpu
def test_cuda_capture_that_fails_inside_the_graph_leaves_a_working_process():
    """In a child process: if the recovery were wrong, the CUDA tests after this one would fail."""
    root = pathlib.Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", _FAILED_CAPTURE], cwd=root, capture_output=True, text=True,
                          timeout=120, env={**os.environ, timing.ENV: "cuda-graph"})
    assert done.returncode == 0 and "recovered:" in done.stdout, done.stdout[-2000:] + done.stderr[-3000:]


@needs_gpu
def test_cuda_graph_times_forward_and_backward(monkeypatch):
    monkeypatch.delenv(timing.ENV, raising=False)
    lin = torch.nn.Linear(1024, 1024, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(4096, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dout = torch.randn(4096, 1024, device="cuda", dtype=torch.bfloat16)
    step = timed_call(lambda: lin(x), (x,), dout)
    step()
    t = timing.measure(step, "cuda", quick=True)
    assert t.method == GRAPH and t.median > 0, t
    step()  # still runs eagerly afterwards
    assert x.grad is not None and torch.isfinite(x.grad).all()
