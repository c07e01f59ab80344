"""``fastflamingo bench``: the side-by-side benchmark suite.

With no arguments it picks the default that fits the machine (the ``tiny`` preset in fp32 on a
CPU, the ``openflamingo-9b`` shape with random weights in bf16 on a GPU) and runs the kernel and
end-to-end suites (and, on a CPU, scoring; on a GPU, the NF4 kernel), printing the table and
the open issues' acceptance goals that its rows decide (:mod:`.goals`), and writing rows.csv,
rows.json, goals.txt and PNG plots to ``--out``.
"""
from __future__ import annotations

import argparse
import datetime
import os
import time

import torch

from ..cli import count_arg, device_arg

from . import e2e, kernels
from .env import code_version, device_name, versions
from .goals import evaluate as evaluate_goals
from .goals import format_goals
from .plots import all_plots
from .report import format_table
from .rows import read_json, write_csv, write_json

SUITES = ("kernels", "e2e", "nf4", "score", "all")


def default_preset(device: str) -> str:
    return "openflamingo-9b" if torch.device(device).type == "cuda" else "tiny"


def run_bench(*, suite: str = "all", preset: str | None = None, quick: bool = False, out: str = "bench-results",
              device: str | None = None, progress: bool = True, plots: bool = True,
              kernel_config: kernels.KernelConfig | None = None, e2e_config: e2e.E2EConfig | None = None,
              score_config=None, threads: int | None = None, groups: list[str] | None = None, echo=print) -> dict:
    """Run the suite; returns ``{"rows", "table", "files", "meta"}``. The configs override the
    defaults (tests pass smaller ones). ``threads``: torch CPU threads; None = torch's own
    choice, or 1 when other work keeps the CPU busy (1-minute load average >= half the cores):
    there, threads waiting on each other's time slices made calls 5-10x slower and far noisier.
    ``groups``: the end-to-end groups to run (default: all of ``e2e.GROUPS``)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    preset = preset or default_preset(device)
    os.makedirs(out, exist_ok=True)
    if threads is None and torch.device(device).type == "cpu" and hasattr(os, "getloadavg") \
            and os.getloadavg()[0] >= 0.5 * (os.cpu_count() or 1):
        threads = 1
        echo(f"note: load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores: timing with 1 torch thread")
    if threads:
        torch.set_num_threads(threads)
    start = time.perf_counter()
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": device_name(device), "versions": versions(), "code": code_version(),
            "preset": preset, "suite": suite,
            "quick": quick, "torch_threads": torch.get_num_threads(),
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None}
    echo(f"fastflamingo bench: suite={suite} preset={preset} quick={quick} on {meta['device']}\n  {meta['versions']}")
    rows = []
    files = [os.path.join(out, "rows.csv"), os.path.join(out, "rows.json")]
    if suite in ("kernels", "all"):
        cfg = kernel_config or kernels.default_config(preset, device, quick)
        rows += kernels.run(cfg, device, quick=quick, progress=progress,
                            on_rows=lambda done: write_json(done, files[1], meta))  # kept if interrupted
    if suite in ("e2e", "all"):
        cfg = e2e_config or e2e.default_config(preset, device, quick)
        rows += e2e.run(cfg, device, progress=progress, groups=groups,
                        on_rows=lambda done: write_json(rows + done, files[1], meta))
    if suite == "nf4" or (suite == "all" and torch.device(device).type == "cuda"):  # a CUDA kernel
        from . import nf4
        rows += nf4.run(device, quick=quick, progress=progress)
    if suite == "score" or (suite == "all" and torch.device(device).type != "cuda"):
        # (on a GPU only when asked: the 9B-shape open_flamingo model is built again for it)
        from . import score
        rows += score.run(score_config or score.default_config(preset, device, quick), device, progress=progress)
    meta["wall_s"] = round(time.perf_counter() - start, 1)
    meta["torch_threads"] = torch.get_num_threads()
    return write_outputs(rows, meta, out, plots=plots, echo=echo)


def write_outputs(rows, meta: dict, out: str, *, plots: bool = True, echo=print) -> dict:
    """Print the table and the goals it decides; write rows.csv, rows.json, table.txt, goals.txt
    (where some goal is decided) and the plots to ``out``."""
    table = format_table(rows)
    echo(table)
    files = [os.path.join(out, name) for name in ("rows.csv", "rows.json", "table.txt")]
    write_csv(rows, files[0])
    write_json(rows, files[1], meta)
    with open(files[2], "w") as f:
        f.write(f"{meta}\n{table}\n")
    goals = format_goals(evaluate_goals(rows))
    if goals:  # the open issues' acceptance goals these rows decide
        echo(f"\n{goals}")
        files.append(os.path.join(out, "goals.txt"))
        with open(files[-1], "w") as f:
            f.write(f"{goals}\n")
    if plots:
        files += all_plots(rows, out)
    echo(f"\nwrote {', '.join(files)}  ({meta.get('wall_s')} s)")
    return {"rows": rows, "table": table, "files": files, "meta": meta}


def run(args) -> int:
    if args.from_json:  # re-render the table and plots of an earlier (possibly interrupted) run
        meta, rows = read_json(args.from_json)
        os.makedirs(args.out, exist_ok=True)
        write_outputs(rows, meta, args.out, plots=not args.no_plots)
        return 0
    run_bench(suite=args.suite, preset=args.preset, quick=args.quick, out=args.out, device=args.device,
              progress=not args.no_progress, plots=not args.no_plots, threads=args.threads or None,
              groups=_groups(args.groups))
    return 0


def _groups(text: str | None) -> list[str] | None:
    if not text:
        return None
    names = [g.strip() for g in text.split(",") if g.strip()]
    unknown = [g for g in names if g not in e2e.GROUPS]
    if unknown:
        raise SystemExit(f"fastflamingo bench: --groups {text!r}: unknown group(s) {unknown}; "
                         f"choose from {', '.join(e2e.GROUPS)}")
    return names


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("bench", help="side-by-side benchmarks against the peers", description=__doc__)
    configure(p)


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--suite", choices=SUITES, default="all", help="what to run (default: all)")
    p.add_argument("--preset", default=None,
                   help="model shape (default: tiny on a CPU, openflamingo-9b on a GPU); see fastflamingo.presets")
    p.add_argument("--quick", action="store_true", help="fewer points and repetitions")
    p.add_argument("--out", default="bench-results", help="directory for rows.csv, rows.json, table.txt, PNGs")
    p.add_argument("--device", type=device_arg, default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", type=count_arg("--threads"), default=0,
                   help="torch CPU threads (default, 0: torch's choice; 1 on a CPU kept busy by other work)")
    p.add_argument("--groups", default=None, metavar="NAMES",
                   help=f"end-to-end groups to run, comma-separated (default: all: {','.join(e2e.GROUPS)})")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--from-json", default=None, metavar="ROWS_JSON",
                   help="only render the table and plots of an earlier run's rows.json into --out")
    p.set_defaults(func=run)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastflamingo bench", description=__doc__)
    configure(parser)
    args = parser.parse_args(argv)
    return args.func(args)
