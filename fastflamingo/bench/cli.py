"""``fastflamingo bench``: the side-by-side benchmark suite.

With no arguments it picks the default that fits the machine (the ``tiny`` preset in fp32 on a
CPU, the ``openflamingo-9b`` shape with random weights in bf16 on a GPU) and runs the kernel and
end-to-end suites (and, on a CPU, scoring; on a GPU, the NF4 kernel), printing the table and
the open issues' acceptance goals that its rows decide (:mod:`.goals`), and writing rows.csv,
rows.json, goals.txt (where its rows decide a goal) and PNG plots to ``--out``.
"""
from __future__ import annotations

import argparse
import datetime
import difflib
import os
import sys
import time

import torch

from ..cli import count_arg, device_arg
from ..presets import preset_config

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
    if suite not in SUITES:
        raise ValueError(f"suite {suite!r}: choose one of {', '.join(SUITES)}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    preset = preset or default_preset(device)
    preset_config(preset)  # an unknown name is an error before anything runs
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
    path = os.path.join(out, "rows.json")

    def save(done):  # every suite saves its rows as they come: kept if the run is cut off
        write_json(rows + done, path, meta)
    if suite in ("kernels", "all"):
        cfg = kernel_config or kernels.default_config(preset, device, quick)
        rows += kernels.run(cfg, device, quick=quick, progress=progress, on_rows=save)
    if suite in ("e2e", "all"):
        cfg = e2e_config or e2e.default_config(preset, device, quick)
        rows += e2e.run(cfg, device, progress=progress, groups=groups, on_rows=save)
    if suite == "nf4" or (suite == "all" and torch.device(device).type == "cuda"):  # a CUDA kernel
        from . import nf4
        rows += nf4.run(device, quick=quick, progress=progress, on_rows=save)
    if suite == "score" or (suite == "all" and torch.device(device).type != "cuda"):
        # (on a GPU only when asked: the 9B-shape open_flamingo model is built again for it)
        from . import score
        rows += score.run(score_config or score.default_config(preset, device, quick), device, progress=progress,
                          on_rows=save)
    meta["wall_s"] = round(time.perf_counter() - start, 1)
    meta["torch_threads"] = torch.get_num_threads()
    for r in rows:  # every row carries the run's date, code and threads (rows.csv has no meta)
        r.date, r.code, r.threads = r.date or meta["date"], r.code or meta["code"], r.threads or meta["torch_threads"]
    return write_outputs(rows, meta, out, plots=plots, echo=echo)


def write_outputs(rows, meta: dict, out: str, *, plots: bool = True, echo=print, source: str | None = None) -> dict:
    """Print the table and the goals it decides; write rows.csv, rows.json, table.txt, goals.txt
    (where some goal is decided) and the plots to ``out``. ``source``: the rows.json the rows were
    read from (a re-render: the last line says so, and gives that run's time as its own)."""
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
    elif os.path.exists(os.path.join(out, "goals.txt")):  # an earlier run's, beside these rows: not theirs
        os.remove(os.path.join(out, "goals.txt"))
    if plots:
        files += all_plots(rows, out)
    else:  # (an earlier run's plots are not these rows')
        from .plots import PLOTS
        for name in PLOTS:
            if os.path.exists(os.path.join(out, name)):
                os.remove(os.path.join(out, name))
    if source is None:
        echo(f"\nwrote {', '.join(files)}  ({meta.get('wall_s')} s)")
    else:
        took = f"; that run took {meta['wall_s']} s" if meta.get("wall_s") is not None else ""
        echo(f"\nwrote {', '.join(files)}  (re-rendered from {source}, written {meta.get('date', '?')}{took})")
    return {"rows": rows, "table": table, "files": files, "meta": meta}


# the options each suite reads (beyond --out, --device, --threads, --no-progress, --no-plots)
APPLIES = {"preset": ("kernels", "e2e", "score", "all"), "groups": ("e2e", "all")}
# what --from-json reads: the rows' own suite, preset and device were the run's
RUN_OPTIONS = {"suite": None, "preset": None, "quick": False, "device": None, "threads": 0, "groups": None,
               "no_progress": False}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def run(args) -> int:
    if args.from_json:  # re-render the table and plots of an earlier (possibly interrupted) run
        given = [_flag(k) for k, default in RUN_OPTIONS.items() if getattr(args, k) != default]
        if given:
            raise ValueError(f"--from-json only re-renders {args.from_json}'s rows (their suite, preset and device "
                             f"are that run's): {', '.join(given)} would do nothing; leave them out")
        meta, rows = read_json(args.from_json)
        os.makedirs(args.out, exist_ok=True)
        write_outputs(rows, meta, args.out, plots=not args.no_plots, source=args.from_json)
        return 0
    suite = args.suite or "all"
    for k, suites in APPLIES.items():
        if getattr(args, k) is not None and suite not in suites:
            why = " (it runs its fixed 7B weight shapes)" if suite == "nf4" else ""
            raise ValueError(f"{_flag(k)} {getattr(args, k)}: the {suite} suite does not read it{why}; it is for "
                             f"--suite {' / '.join(suites)}")
    if args.preset is not None:
        preset_config(args.preset)  # before the header is printed or --out is made
    run_bench(suite=suite, preset=args.preset, quick=args.quick, out=args.out, device=args.device,
              progress=not args.no_progress, plots=not args.no_plots, threads=args.threads or None,
              groups=_groups(args.groups))
    return 0


def bench_device(name: str) -> str:
    """argparse ``type`` of ``--device``: a CPU or a CUDA device this machine has (the suites
    run nowhere else)."""
    name = device_arg(name)
    if torch.device(name).type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{name!r}: fastflamingo bench runs on cpu or cuda (cuda:N)")
    return name


def _groups(text: str | None) -> list[str] | None:
    if not text:
        return None
    names = [g.strip() for g in text.split(",") if g.strip()]
    unknown = [g for g in names if g not in e2e.GROUPS]
    if unknown:  # a usage error: fastflamingo.cli.main prints "fastflamingo bench: error: ..." and exits 2
        close = {g: difflib.get_close_matches(g, e2e.GROUPS, n=1, cutoff=0.5) for g in unknown}
        hint = "".join(f"; did you mean {m[0]!r} for {g!r}?" for g, m in close.items() if m)
        raise ValueError(f"--groups {text!r}: unknown group(s) {', '.join(map(repr, unknown))}{hint} "
                         f"(choose from {', '.join(e2e.GROUPS)})")
    return names


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("bench", help="side-by-side benchmarks against the peers", description=__doc__)
    configure(p)


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--suite", choices=SUITES, default=None, help="what to run (default: all)")
    p.add_argument("--preset", default=None,
                   help="model shape (default: tiny on a CPU, openflamingo-9b on a GPU); see fastflamingo.presets. "
                        "The nf4 suite has fixed 7B shapes; the e2e suite's idefics group runs the IDEFICS shape")
    p.add_argument("--quick", action="store_true", help="fewer points and repetitions")
    p.add_argument("--out", default="bench-results",
                   help="directory for rows.csv, rows.json, table.txt, goals.txt (where the rows decide a goal), "
                        "PNGs (default: %(default)s, under the current directory)")
    p.add_argument("--device", type=bench_device, default=None, help="cpu or cuda (default: cuda when available)")
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
    """``fastflamingo bench ARGS`` (``python -m fastflamingo.bench``): the same program, with the
    command line's one-line errors (:func:`fastflamingo.cli.main`)."""
    from ..cli import main as cli_main
    return cli_main(["bench", *(sys.argv[1:] if argv is None else argv)])
