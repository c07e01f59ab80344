"""Compile every Triton kernel of fastflamingo for an H100 (sm_90) offline, without a GPU.

    python benchmarks/compile_check.py --out DIR [--jobs 2] [--quick] [--only image_causal,perceiver,nf4]

For each kernel and each launch configuration the host launchers choose at the benchmark and
user shapes, this builds the kernel for ``GPUTarget("cuda", 90, 32)`` (an H100: compute
capability 9.0, warps of 32) with the installed Triton, and reports, from Triton's own ptxas run
(``ptxas -v --gpu-name=sm_90a``, the log Triton normally discards), the registers per thread and
the spill bytes, and, from the compiled metadata, the dynamic shared memory per program.

How the configurations are found (no heuristic is repeated here): the real launchers
(``image_causal_fwd`` / ``image_causal_bwd``, ``perceiver_fwd`` / ``perceiver_bwd``,
``nf4_matmul``) are called on ``meta`` tensors of the benchmark shapes with Triton's launch
(``JITFunction.run``, ``Autotuner.run``) replaced by a recorder. Each recorded launch is then
specialised exactly as Triton's launcher would specialise it on the GPU (the same binder:
pointer and integer divisibility by 16, integers equal to 1 folded to constants) and compiled
with ``triton.compile``. Autotuned kernels (the Perceiver's) are compiled in every config the
autotuner would time (its list after its own early pruning), since it may pick any of them on
the GPU. The launchers ask the device for its multiprocessor count; the recorder answers 132
(an H100 SXM, also an H200). Operands have the benchmarks' layouts (contiguous (B, H, S, D)),
whose strides decide Triton's divisibility specialisation.

Flags: a compile error, any spill, dynamic shared memory above 227 KiB (232448 bytes, the
H100's per-block opt-in maximum: Triton would raise OutOfResources at the first launch), more
than 255 registers.

Writes ``DIR/triton-<version>.json`` (one row per kernel x distinct compiled config, with every
launch point that uses it) and ``DIR/triton-<version>.txt`` (the table printed). Nothing here
runs a kernel: run-time correctness and speed need the GPU.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import multiprocessing
import os
import platform
import re
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

H100_SMS = 132
SMEM_LIMIT = 227 * 1024          # bytes of shared memory one block may opt in to on sm_90
MAX_REGS = 255
ARCH = 90
WARP_SIZE = 32                   # GPUTarget's third field is the warp size (32 on NVIDIA)


# ----------------------------------------------------------------------------- recording launches

class _Recorder:
    """Within the block, kernel launches record (jit function, args, kwargs, configs, grid)
    instead of running."""

    def __init__(self):
        self.launches = []

    def __enter__(self):
        from triton.runtime.autotuner import Autotuner
        from triton.runtime.jit import JITFunction
        self._saved = (JITFunction.run, Autotuner.run)
        rec = self

        def jit_run(fn, *args, grid=None, warmup=False, **kwargs):
            rec.launches.append((fn, args, kwargs, [None], grid))

        def tuner_run(tuner, *args, grid=None, warmup=False, **kwargs):
            # the configs the autotuner would time: its list after its own early pruning
            configs = list(tuner.configs)
            if len(configs) > 1 and getattr(tuner, "early_config_prune", None):
                configs = tuner.early_config_prune(configs, dict(zip(tuner.arg_names, args)), **kwargs)
            rec.launches.append((tuner.fn, args, kwargs, configs, grid))

        JITFunction.run, Autotuner.run = jit_run, tuner_run
        return self

    def __exit__(self, *exc):
        from triton.runtime.autotuner import Autotuner
        from triton.runtime.jit import JITFunction
        JITFunction.run, Autotuner.run = self._saved
        return False


@contextlib.contextmanager
def _as_h100():
    """The launchers' device queries answer as an H100 (132 SMs) while they run on meta tensors;
    the Perceiver launcher's check that tensors are on CUDA passes them (the kernels never run;
    its other checks stay, and its INTERPRET flag stays False for the autotune pruning)."""
    from fastflamingo.kernels import image_causal, nf4, perceiver
    saved = [(m, "num_sms", m.num_sms) for m in (image_causal, perceiver, nf4)]
    saved.append((perceiver, "_check_inputs", perceiver._check_inputs))
    for m in (image_causal, perceiver, nf4):
        m.num_sms = lambda device: H100_SMS
    check_inputs, interpret = perceiver._check_inputs, perceiver.INTERPRET

    def check_meta_inputs(*args):
        perceiver.INTERPRET = True
        try:
            check_inputs(*args)
        finally:
            perceiver.INTERPRET = interpret

    perceiver._check_inputs = check_meta_inputs
    try:
        yield
    finally:
        for m, name, v in saved:
            setattr(m, name, v)


def _meta(*shape, dtype):
    import torch
    return torch.empty(*shape, device="meta", dtype=dtype)


DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def _dt(name):
    import torch
    return getattr(torch, DTYPE_NAMES[name])


def image_causal_points(quick: bool):
    """(label, callable running the launcher) for the image-causal cross-attention. Its forward
    and backward kernels are autotuned: the recorder builds every config their autotuners are
    offered at each point (:func:`image_causal._launch_configs`, with autotuning on whatever
    ``FASTFLAMINGO_AUTOTUNE`` says here), so the check covers whatever they may pick on the GPU.
    T = 1 (decoding) launches take the heuristic config alone; T = 300 is a length that is not
    a multiple of 16 (Triton specialises on that)."""
    import torch

    from fastflamingo.kernels import image_causal as ic
    from fastflamingo.kernels.common import MAX_HEAD_DIM
    B, H = 8, 8
    Ts = (1, 2048) if quick else (1, 256, 2048)
    Ds = (64,) if quick else (64, 96, 128)
    Ls = (64,) if quick else (64, 16)
    Ns = (32,) if quick else (4, 32, 64)
    dts = ("bf16",) if quick else ("bf16", "fp16", "fp32")
    grid = [(T, D, L, N, "") for T in Ts for D in Ds for L in Ls for N in Ns]
    if not quick:
        grid += [(300, D, 64, 4, "") for D in Ds]
        # the largest head the kernels take (MAX_HEAD_DIM), beyond the benchmark grid
        grid += [(T, MAX_HEAD_DIM, 64, 32, " (extra)") for T in (1, 2048)]

    def autotuned(launch):
        saved, ic.autotune_enabled = ic.autotune_enabled, lambda: True
        try:
            launch()
        finally:
            ic.autotune_enabled = saved
    for T, D, L, N, tag in grid:
        for immediate in (True, False):
            for dt in dts:
                dtype = _dt(dt)
                mode = "immediate" if immediate else "all-previous"
                shape = f"B={B} H={H} T={T} D={D} L={L} N={N} {mode} {dt}{tag}"

                def fwd(T=T, D=D, L=L, N=N, immediate=immediate, dtype=dtype):
                    q = _meta(B, H, T, D, dtype=dtype)
                    k, v = _meta(B, H, N * L, D, dtype=dtype), _meta(B, H, N * L, D, dtype=dtype)
                    tt = torch.zeros(B, T, dtype=torch.int32)
                    ic.image_causal_fwd(q, k, v, tt, L, immediate, D ** -0.5)

                def bwd(T=T, D=D, L=L, N=N, immediate=immediate, dtype=dtype):
                    q, do, o = (_meta(B, H, T, D, dtype=dtype) for _ in range(3))
                    k, v = _meta(B, H, N * L, D, dtype=dtype), _meta(B, H, N * L, D, dtype=dtype)
                    lse = _meta(B, H, T, dtype=torch.float32)
                    tt = torch.zeros(B, T, dtype=torch.int32)
                    ic.image_causal_bwd(do, q, k, v, o, lse, tt, L, immediate, D ** -0.5)

                yield "image_causal", f"fwd {shape}", lambda fwd=fwd: autotuned(fwd)
                yield "image_causal", f"bwd {shape}", lambda bwd=bwd: autotuned(bwd)


def perceiver_points(quick: bool):
    """The Perceiver latent attention: images x V tokens, 64 latents, 8 heads (the OpenFlamingo
    resampler, head 64) and 16 heads (IDEFICS / Flamingo, head 96); 1 image (a user's single
    image: the backward splits each head's keys over programs)."""
    import torch

    from fastflamingo.kernels import perceiver as pc
    from fastflamingo.kernels.common import MAX_HEAD_DIM
    L = 64
    cases = [(64, 257), (256, 257), (64, 577), (256, 577), (1, 257)]
    if quick:
        cases = [(64, 257)]
    heads = ((8, 64),) if quick else ((8, 64), (16, 96))
    dts = ("bf16",) if quick else ("bf16", "fp16", "fp32")
    grid = [(images, V, H, D, "") for images, V in cases for H, D in heads]
    if not quick:  # the largest head the kernels take (MAX_HEAD_DIM), beyond the benchmark grid
        grid += [(64, 257, 8, MAX_HEAD_DIM, " (extra)")]
    for images, V, H, D, tag in grid:
        for dt in dts:
            dtype = _dt(dt)
            shape = f"images={images} V={V} L={L} H={H} D={D} {dt}{tag}"

            def inputs(images=images, V=V, H=H, D=D, dtype=dtype):
                # the bench's contiguous (B, H, S, D) tensors
                return (_meta(images, H, L, D, dtype=dtype), _meta(images, H, V, D, dtype=dtype),
                        _meta(images, H, V, D, dtype=dtype), _meta(images, H, L, D, dtype=dtype),
                        _meta(images, H, L, D, dtype=dtype))

            def fwd(inputs=inputs, D=D):
                pc.perceiver_fwd(*inputs(), D ** -0.5)

            def bwd(inputs=inputs, images=images, V=V, H=H, D=D, dtype=dtype):
                q, km, vm, kl, vl = inputs()
                out = pc.empty_bshd(images, H, L, D, like=q)
                lse = _meta(images, H, L, dtype=torch.float32)
                # the launcher's own split heuristic, asked for a CUDA device (meta tensors
                # would take its "not CUDA: 1 split" branch)
                splits = pc._num_splits(images * H, V + L, torch.device("cuda"))
                pc.perceiver_bwd(torch.empty_like(out), q, km, vm, kl, vl, out, lse, D ** -0.5,
                                 num_splits=splits)

            yield "perceiver", f"fwd {shape}", fwd
            yield "perceiver", f"bwd {shape}", bwd


def nf4_points(quick: bool):
    """The NF4 linear: the bench's (N, K) weights x M rows (bf16, nested statistics, blocksize
    64, no bias), plus the other paths users reach: every row count class (BLOCK_M is M up to 4,
    then 8 and 16; 32 rows take two M tiles), fp16 / fp32 x, a bias with plain statistics,
    blocksize 128, a small N that splits K (fp32 atomics), and K not a multiple of 32 (the
    general path). The aligned launches are autotuned: every candidate config the autotuner may
    time (``nf4.TUNE_CONFIGS`` after its pruning) is built."""
    import torch

    from fastflamingo.bench import nf4 as bench_nf4
    from fastflamingo.kernels import nf4 as k4
    shapes = bench_nf4.SHAPES[:1] if quick else bench_nf4.SHAPES
    rows = (1, 16) if quick else bench_nf4.ROWS
    points = [(N, K, M, "bf16", True, False, 64, "bench") for N, K in shapes for M in rows]
    if not quick:
        points += [(4096, 4096, M, "bf16", True, False, 64, "extra") for M in (2, 3, 8, 32)]
        points += [(4096, 4096, 4, "fp16", True, False, 64, "extra"),
                   (4096, 4096, 4, "fp32", True, False, 64, "extra"),
                   (4096, 4096, 16, "fp32", True, False, 64, "extra"),
                   (4096, 4096, 4, "bf16", False, True, 64, "extra"),
                   (4096, 4096, 4, "bf16", True, False, 128, "extra"),
                   (1024, 4096, 4, "bf16", True, True, 64, "extra"),
                   (4096, 4100, 4, "bf16", True, False, 64, "extra"),
                   (4096, 4100, 16, "fp32", True, False, 64, "extra")]
    for N, K, M, dt, nested, bias, blocksize, tag in points:
        dtype = _dt(dt)
        label = (f"N={N} K={K} M={M} {dt} {'nested' if nested else 'plain'}{' bias' if bias else ''}"
                 f"{'' if blocksize == 64 else f' bs={blocksize}'} ({tag})")

        def run(N=N, K=K, M=M, dtype=dtype, nested=nested, bias=bias, blocksize=blocksize):
            x = _meta(M, K, dtype=dtype)
            w = _meta((N * K + 1) // 2, 1, dtype=torch.uint8)
            nblocks = -(-N * K // blocksize)
            absmax = _meta(nblocks, dtype=torch.uint8 if nested else torch.float32)
            code = _meta(16, dtype=torch.float32)
            a2 = _meta(-(-nblocks // 256), dtype=torch.float32) if nested else None
            c2 = _meta(256, dtype=torch.float32) if nested else None
            off = _meta((), dtype=torch.float32) if nested else None
            b = _meta(N, dtype=dtype) if bias else None
            k4.nf4_matmul(x, w, absmax, code, a2, c2, off, b, N, blocksize, 256)

        yield "nf4", f"fwd {label}", run


# ----------------------------------------------------------------------------- specialising

def _target():
    from triton.backends.compiler import GPUTarget
    return GPUTarget("cuda", ARCH, WARP_SIZE)


def _jsonable(v):
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    if hasattr(v, "value"):          # tl.constexpr
        return _jsonable(v.value)
    return str(v)


def specialise(fn, args, kwargs, config):
    """What Triton's launcher would compile for this launch on an sm_90 device: (signature,
    constexprs, attrs, options) for ``triton.compile``, plus a readable summary."""
    from triton import knobs
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature
    backend = make_backend(_target())
    kw = dict(kwargs)
    if config is not None:
        kw.update(config.all_kwargs())
    kw["debug"] = kw.get("debug", fn.debug) or knobs.runtime.debug
    if hasattr(knobs.compilation, "instrumentation_mode"):
        kw["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*args, **kw)
    options, signature, constexprs, attrs = fn._pack_args(backend, kw, bound_args, specialization, options)
    names = fn.arg_names
    declared = {names[p[0]]: _jsonable(v) for p, v in constexprs.items()
                if len(p) == 1 and fn.params[p[0]].is_constexpr}
    folded = {names[p[0]]: _jsonable(v) for p, v in constexprs.items()
              if len(p) == 1 and not fn.params[p[0]].is_constexpr}
    return dict(signature=signature, constexprs=constexprs, attrs=attrs, options=options.__dict__,
                declared=declared, folded=folded)


# ----------------------------------------------------------------------------- compiling

_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def _unwrap(obj):
    from triton.runtime.jit import JITFunction
    while not isinstance(obj, JITFunction):
        obj = obj.fn
    return obj


def compile_job(job: dict) -> dict:
    """Compile one specialised kernel for sm_90; registers and spills from Triton's own ptxas
    -v log, shared memory from the metadata."""
    import importlib

    import triton
    from triton import knobs
    from triton.compiler.compiler import ASTSource
    fn = _unwrap(getattr(importlib.import_module(job["module"]), job["name"]))
    src = ASTSource(fn, job["signature"], job["constexprs"], job["attrs"])
    knobs.nvidia.dump_ptxas_log = True
    log = io.StringIO()
    t0 = time.perf_counter()
    res = dict(ok=False, registers=None, spill_store_bytes=None, spill_load_bytes=None, stack_bytes=None,
               shared_bytes=None, error=None)
    try:
        with contextlib.redirect_stdout(log):
            k = triton.compile(src, target=_target(), options=job["options"])
    except Exception as e:  # a compile error is a result
        res["compile_s"] = round(time.perf_counter() - t0, 2)
        res["error"] = f"{type(e).__name__}: {e}"[:4000]
        return res
    res["compile_s"] = round(time.perf_counter() - t0, 2)
    text = log.getvalue()
    regs = _PTXAS_REGS.findall(text)
    spill = _PTXAS_SPILL.findall(text)
    md = k.metadata
    ptx = k.asm.get("ptx", "")
    res["mma"] = ("wgmma" if "wgmma.mma_async" in ptx else "mma.sync" if re.search(r"\bmma\.sync", ptx)
                  else "fma" if "tt.dot" in k.asm.get("ttir", "") else "none")
    res.update(ok=True, shared_bytes=int(md.shared), num_warps=int(md.num_warps), num_stages=int(md.num_stages),
               registers=int(regs[-1]) if regs else None,
               stack_bytes=int(spill[-1][0]) if spill else None,
               spill_store_bytes=int(spill[-1][1]) if spill else None,
               spill_load_bytes=int(spill[-1][2]) if spill else None,
               ptxas_log=[ln.strip() for ln in text.splitlines() if ln.strip()][-4:])
    if not regs:
        res["error"] = "no ptxas -v log captured (registers unknown)"
    return res


def flags(row: dict) -> list[str]:
    if not row["ok"]:
        return ["COMPILE ERROR"]
    out = []
    if (row["spill_store_bytes"] or 0) or (row["spill_load_bytes"] or 0):
        out.append(f"SPILL {row['spill_store_bytes']}B st/{row['spill_load_bytes']}B ld")
    if row["shared_bytes"] is not None and row["shared_bytes"] > SMEM_LIMIT:
        out.append(f"SMEM {row['shared_bytes']} > {SMEM_LIMIT}")
    if row["registers"] is not None and row["registers"] > MAX_REGS:
        out.append(f"REGS {row['registers']} > {MAX_REGS}")
    if row["stack_bytes"]:
        out.append(f"STACK {row['stack_bytes']}B")
    if row.get("error"):
        out.append(row["error"])
    return out


# ----------------------------------------------------------------------------- main

def collect(quick: bool, only: set[str] | None):
    """Every distinct (kernel function, specialisation, options) the launchers ask for."""
    jobs: dict[str, dict] = {}
    failures = []
    sources = [image_causal_points, perceiver_points, nf4_points]
    with _as_h100():
        for source in sources:
            for family, label, call in source(quick):
                if only and family not in only:
                    continue
                with _Recorder() as rec:
                    try:
                        call()
                    except Exception as e:
                        failures.append(dict(family=family, point=label, error=f"{type(e).__name__}: {e}"))
                        continue
                for fn, args, kwargs, configs, grid in rec.launches:
                    for config in configs:
                        spec = specialise(fn, args, kwargs, config)
                        opts = spec["options"]
                        key = repr((fn.__module__, fn.__name__, sorted(spec["signature"].items()),
                                    sorted(spec["constexprs"].items(), key=repr), sorted(spec["attrs"].items(), key=repr),
                                    opts["num_warps"], opts["num_stages"], opts.get("num_ctas")))
                        if key not in jobs:
                            jobs[key] = dict(family=family, kernel=fn.__name__, module=fn.__module__, name=fn.__name__,
                                             signature=spec["signature"], constexprs=spec["constexprs"],
                                             attrs=spec["attrs"], options=opts, declared=spec["declared"],
                                             folded=spec["folded"], num_warps=opts["num_warps"],
                                             num_stages=opts["num_stages"],
                                             autotune_config=None if config is None else str(config),
                                             points=[], grids=[])
                        jobs[key]["points"].append(label)
                        jobs[key]["grids"].append(str(grid))
    return list(jobs.values()), failures


def _short(d: dict) -> str:
    keep = ("IMMEDIATE", "HEAD_DIM", "BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_D", "SINGLE_M", "EVEN_D", "ALIGNED",
            "ATOMIC", "NESTED", "HAS_BIAS", "DOT_PRECISION")
    names = {"IMMEDIATE": "IMM", "HEAD_DIM": "HD", "BLOCK_M": "BM", "BLOCK_N": "BN", "BLOCK_K": "BK", "BLOCK_D": "BD",
             "SINGLE_M": "1M", "EVEN_D": "EVD", "ALIGNED": "AL", "ATOMIC": "AT", "NESTED": "NS", "HAS_BIAS": "BI",
             "DOT_PRECISION": "PREC"}
    parts = []
    for k in keep:
        if k in d:
            v = d[k]
            v = {True: "1", False: "0", None: "-"}.get(v, v) if not isinstance(v, int) or isinstance(v, bool) else v
            parts.append(f"{names[k]}={v}")
    return " ".join(parts)


def _dtype_of(signature: dict) -> str:
    for v in signature.values():
        if isinstance(v, str) and v.startswith("*") and v[1:] in ("bf16", "fp16", "fp32"):
            return v[1:]
    return "?"


# the benchmark's headline points: their builds get their own table
KEY_POINTS = (
    "fwd B=8 H=8 T=2048 D=64 L=64 N=32 immediate bf16",
    "bwd B=8 H=8 T=2048 D=64 L=64 N=32 immediate bf16",
    "fwd B=8 H=8 T=2048 D=64 L=64 N=32 all-previous bf16",
    "bwd B=8 H=8 T=2048 D=64 L=64 N=32 all-previous bf16",
    "fwd images=64 V=257 L=64 H=8 D=64 bf16",
    "bwd images=64 V=257 L=64 H=8 D=64 bf16",
    "fwd N=4096 K=4096 M=1 bf16 nested (bench)",
    "fwd N=4096 K=4096 M=16 bf16 nested (bench)",
)


def key_table(rows: list[dict]) -> str:
    lines = [f"{'launch point':<52} {'kernel':<22} {'constexprs, warps, stages':<60} {'regs':>4} {'spill':>7} {'smem':>7}"]
    for point in KEY_POINTS:
        for r in rows:
            if point in r["points"]:
                what = f"{_short(r['constexprs_by_name'])} w={r['num_warps']} st={r['num_stages']}"
                spill = "-" if r["spill_store_bytes"] is None else f"{r['spill_store_bytes']}/{r['spill_load_bytes']}"
                lines.append(f"{point:<52} {r['kernel']:<22} {what[:60]:<60} {str(r['registers']):>4} {spill:>7} "
                             f"{str(r['shared_bytes']):>7}  {'; '.join(r['flags']) or 'ok'}")
    return "\n".join(lines)


def table(rows: list[dict]) -> str:
    head = (f"{'kernel':<22} {'dt':<5} {'constexprs':<52} {'=1 args':<10} {'w':>2} {'st':>2} {'mma':<8} {'regs':>4} "
            f"{'spill':>7} {'smem':>7} {'s':>5}  points  flags")
    lines = [head, "-" * len(head)]
    for r in rows:
        spill = "-" if r["spill_store_bytes"] is None else f"{r['spill_store_bytes']}/{r['spill_load_bytes']}"
        folded = ",".join(r["folded_int_args"]) or "-"
        lines.append(f"{r['kernel']:<22} {r['dtype']:<5} {_short(r['constexprs_by_name']):<52} {folded:<10} {r['num_warps']:>2} "
                     f"{r['num_stages']:>2} {str(r.get('mma')):<8} {str(r['registers']):>4} {spill:>7} {str(r['shared_bytes']):>7} "
                     f"{str(r['compile_s']):>5}  {len(r['points']):>6}  {'; '.join(r['flags']) or 'ok'}"
                     f"{'  (extra)' if r.get('extra_only') else ''}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder for triton-<version>.json / .txt")
    ap.add_argument("--jobs", type=int, default=max(1, os.cpu_count() or 1), help="parallel compiles")
    ap.add_argument("--quick", action="store_true", help="the key benchmark configs only")
    ap.add_argument("--only", default="", help="comma-separated families: image_causal,perceiver,nf4")
    a = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("compile_check: unset TRITON_INTERPRET (the kernels must be defined for the GPU)", file=sys.stderr)
        return 2
    # a fresh cache: every kernel really compiles (times, ptxas logs), nothing stale is reused;
    # removed at the end (one --quick run leaves ~200 MB of cubins, a full one over 1 GB)
    cache = tempfile.mkdtemp(prefix="ff-compile-check-")
    os.environ["TRITON_CACHE_DIR"] = cache
    try:
        return _run(a)
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def _run(a) -> int:
    import torch
    import triton
    only = {s for s in a.only.split(",") if s} or None
    t0 = time.perf_counter()
    jobs, failures = collect(a.quick, only)
    print(f"{len(jobs)} distinct kernel builds from the launchers ({len(failures)} launch points failed to "
          f"launch); compiling for sm_{ARCH} with triton {triton.__version__}, {a.jobs} jobs", flush=True)
    payloads = [{k: j[k] for k in ("module", "name", "signature", "constexprs", "attrs", "options")} for j in jobs]
    if a.jobs > 1:
        # one process per compile slot (spawned: no forked torch state); a crashed compiler
        # (a segfault in MLIR or ptxas) becomes that row's error, not the end of the run
        with ProcessPoolExecutor(a.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(compile_job, p) for p in payloads]
            results = []
            for f in futures:
                try:
                    results.append(f.result())
                except Exception as e:
                    results.append(dict(ok=False, registers=None, spill_store_bytes=None, spill_load_bytes=None,
                                        stack_bytes=None, shared_bytes=None, compile_s=None,
                                        error=f"compile process failed: {type(e).__name__}: {e}"))
    else:
        results = [compile_job(p) for p in payloads]

    rows = []
    for j, res in zip(jobs, results):
        names = j["declared"]
        res = dict(res)
        built = (res.pop("num_warps", None), res.pop("num_stages", None))
        if res["ok"] and built != (j["num_warps"], j["num_stages"]):
            res["error"] = f"compiled with (num_warps, num_stages) = {built}, asked {(j['num_warps'], j['num_stages'])}"
        row = dict(family=j["family"], kernel=j["kernel"], dtype=_dtype_of(j["signature"]),
                   constexprs_by_name=names, folded_int_args=j["folded"], num_warps=j["num_warps"],
                   num_stages=j["num_stages"], autotune_config=j["autotune_config"], **res,
                   points=j["points"], grids=sorted(set(j["grids"])))
        row["flags"] = flags(row)
        # built only for launch points beyond the benchmark grid (the largest head, 256)
        row["extra_only"] = all(p.endswith("(extra)") for p in row["points"])
        rows.append(row)
    rows.sort(key=lambda r: (r["family"], r["kernel"], r["dtype"], json.dumps(r["constexprs_by_name"], sort_keys=True,
                                                                              default=str), r["num_warps"], r["num_stages"]))
    txt = table(rows) + "\n\nKey benchmark points:\n" + key_table(rows)
    flagged = [r for r in rows if r["flags"]]
    summary = (f"{len(rows)} builds, {sum(r['ok'] for r in rows)} compiled, {len(flagged)} flagged "
               f"({sum(not r['extra_only'] for r in flagged)} at benchmark-grid points, "
               f"{sum(r['extra_only'] for r in flagged)} only at the extra head_dim-256 points); "
               f"max registers {max((r['registers'] or 0) for r in rows) if rows else 0}, max shared "
               f"{max((r['shared_bytes'] or 0) for r in rows) if rows else 0} B; {time.perf_counter() - t0:.0f} s")
    print(txt)
    print(summary)
    for f in failures:
        print(f"LAUNCHER FAILED: {f['point']}: {f['error']}")
    os.makedirs(a.out, exist_ok=True)
    stem = os.path.join(a.out, f"triton-{triton.__version__}")
    meta = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                command=" ".join([os.path.basename(sys.executable)] + sys.argv), triton=triton.__version__,
                torch=torch.__version__, python=platform.python_version(),
                target=dict(backend="cuda", arch=ARCH, warp_size=WARP_SIZE, ptxas_arch=f"sm_{ARCH}a"),
                assumed_sms=H100_SMS, smem_limit_bytes=SMEM_LIMIT, max_registers=MAX_REGS, quick=a.quick,
                summary=summary, launcher_failures=failures)
    with open(stem + ".json", "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1, default=str)
    with open(stem + ".txt", "w") as f:
        f.write(f"# triton {triton.__version__}, torch {torch.__version__}, sm_{ARCH}, {meta['date']}\n")
        f.write(txt + "\n" + summary + "\n")
    return 1 if any(not r["extra_only"] for r in flagged) or failures else 0


if __name__ == "__main__":
    sys.exit(main())
