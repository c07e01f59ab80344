"""NF4 linear layers at decode time: the fused Triton kernel vs bitsandbytes vs bf16.

One case per (N, K) weight of a 7B LM (LLaMA-7B / IDEFICS-9B: 4096x4096 attention projections,
11008x4096 gate/up, 4096x11008 down; MPT-7B's attention is the 4096x4096 one) and per decode
batch M (rows of x). Providers, all on the same x (bf16) and the same NF4 weight (nested
statistics, blocksize 64: ``Linear4bit``'s defaults):

* ``fastflamingo nf4``: :func:`fastflamingo.ops.nf4.nf4_linear`, backend ``"triton"``: the GEMV kernel
  (:mod:`fastflamingo.kernels.nf4`), autotuned on its first (checking) call of each case unless
  ``FASTFLAMINGO_AUTOTUNE=0``, so the timed calls run the chosen config.
* ``bitsandbytes Linear4bit``: the layer's own forward, ``bitsandbytes.matmul_4bit`` (its gemv kernel
  for one row; dequantize + cuBLAS for more).
* ``bf16 F.linear``: cuBLAS on the dequantized weight in bf16 (the same math, 4x the bytes).

Every provider's output is checked against the fp32 reference (the dequantized weight) by the
flash-attention rule before it is timed (:mod:`fastflamingo.bench.harness`). Two roofline rows
per case: the NF4 bytes (packed weight + statistics + x + y) and the bf16 bytes, each over the
measured device copy bandwidth. CUDA only: on the CPU every row says ``n/a``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .env import copy_bandwidth, device_name, has_module, versions
from .harness import Case, Prepared, Provider, run_case
from .rows import Row

KERNEL = "nf4 linear"
SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008))   # (N, K) = (out_features, in_features)
ROWS = (1, 4, 16)
PROVIDERS = ("fastflamingo nf4", "bitsandbytes Linear4bit", "bf16 F.linear")


def _label(N: int, K: int, M: int) -> str:
    return f"N={N} K={K} M={M}"


def _unavailable_rows(device: str, why: str, rows_per_shape) -> list[Row]:
    base = dict(kernel=KERNEL, mode="fwd", metric="time_ms", device=device_name(device), versions=versions(),
                dtype="bf16")
    return [Row(provider=p, x=_label(N, K, M), sweep=f"{N}x{K}", x_value=M, status=f"n/a: {why}", **base)
            for N, K in SHAPES for M in rows_per_shape for p in PROVIDERS]


def _quantized_layer(N: int, K: int, device: str, seed: int = 0):
    """A bitsandbytes Linear4bit (NF4, nested statistics) of a random weight scaled like a
    trained one, and its dequantized fp32 weight."""
    from ..quant import import_bitsandbytes
    bnb = import_bitsandbytes()

    from ..ops.nf4 import dequantize_4bit_reference
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(N, K, generator=g) * 0.02).to(torch.bfloat16)
    layer = bnb.nn.Linear4bit(K, N, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4",
                              compress_statistics=True, device="meta")
    layer.weight = bnb.nn.Params4bit(w.to(device), requires_grad=False, quant_type="nf4",
                                     compress_statistics=True, module=layer)
    layer.weight._quantize(torch.device(device))
    layer.support_avx512bf16_for_cpu = False  # (CPU smoke runs) keep the standard layout the kernel reads
    layer.eval()
    return layer, dequantize_4bit_reference(layer.weight, layer.weight.quant_state)


def nf4_bytes(layer) -> int:
    """Bytes of the packed weight and its statistics (what the fused kernel must read)."""
    state = layer.weight.quant_state
    tensors = [layer.weight, state.absmax, state.code]
    if state.nested:
        tensors += [state.state2.absmax, state.state2.code, state.offset]
    return sum(t.numel() * t.element_size() for t in tensors)


def _providers(layer, w_bf16: torch.Tensor) -> list[Provider]:
    from ..ops.nf4 import nf4_linear
    state = layer.weight.quant_state

    def plain(fn):
        return lambda leaves: Prepared(call=lambda: fn(leaves[0]), leaves=leaves)

    return [
        Provider(PROVIDERS[0], plain(lambda x: nf4_linear(x, layer.weight, state, backend="triton")),
                 unavailable=lambda mode: None if has_module("triton") else "needs triton"),
        Provider(PROVIDERS[1], plain(layer)),
        Provider(PROVIDERS[2], plain(lambda x: F.linear(x, w_bf16))),
    ]


def run(device: str, quick: bool = False, progress: bool = True, on_rows=None) -> list[Row]:
    """Every (shape, M) case on ``device``: checked, then timed. Returns the rows (``n/a`` rows
    at once on the CPU or without bitsandbytes); ``on_rows(rows)`` after each shape (to save
    partial results)."""
    rows_per_shape = (1, 16) if quick else ROWS
    if torch.device(device).type != "cuda":
        return _unavailable_rows(device, "needs a CUDA GPU (the fused kernel's timings, bitsandbytes' CUDA kernels)",
                                 rows_per_shape)
    if not has_module("bitsandbytes"):
        return _unavailable_rows(device, "needs bitsandbytes (pip install bitsandbytes)", rows_per_shape)
    return run_cases(device, SHAPES, rows_per_shape, quick=quick, progress=progress, on_rows=on_rows)


def run_cases(device: str, shapes, rows_per_shape, *, quick: bool = False, progress: bool = True,
              on_rows=None) -> list[Row]:
    """The cases of ``shapes`` x ``rows_per_shape`` on any device (tests run tiny ones on the
    CPU, the kernel in Triton's interpreter); ``on_rows(rows)`` after each shape."""
    rows: list[Row] = []
    bandwidth = copy_bandwidth(device)
    cuda = torch.device(device).type == "cuda"
    for N, K in tqdm(shapes, desc="nf4", disable=not progress, unit="shape"):
        layer, w = _quantized_layer(N, K, device)
        w_bf16 = w.to(torch.bfloat16)
        weight_bytes = nf4_bytes(layer)
        g = torch.Generator().manual_seed(1)
        for M in rows_per_shape:
            x = torch.randn(M, K, generator=g).to(device, torch.bfloat16)
            io = (M * K + M * N) * 2
            case = Case(kernel=KERNEL, x=_label(N, K, M), inputs=(x,), grad_inputs=(),
                        reference=lambda x, w=w: F.linear(x, w.to(x.dtype)),
                        sweep=f"{N}x{K}", x_value=M, bytes_moved={"fwd": weight_bytes + io})
            case_rows = run_case(case, _providers(layer, w_bf16), ("fwd",), device, quick=quick)
            for r in case_rows:
                if r.provider == "roofline":
                    r.provider, r.note = "roofline nf4", f"NF4 weight + statistics + x + y; {r.note}"
            ms = (2 * N * K + io) / bandwidth * 1e3
            case_rows.append(Row(kernel=KERNEL, provider="roofline bf16", mode="fwd", metric="time_ms",
                                 x=case.x, median=ms, p20=ms, p80=ms, device=device_name(device),
                                 versions=versions(), sweep=case.sweep, x_value=M, dtype="bf16",
                                 note=f"bf16 weight + x + y / measured copy bandwidth {bandwidth / 1e9:.0f} GB/s"))
            rows += case_rows
        del layer, w, w_bf16
        if cuda:
            torch.cuda.empty_cache()
        if on_rows is not None:
            on_rows(rows)
    return rows
