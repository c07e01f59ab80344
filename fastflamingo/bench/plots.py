"""PNG plots from the rows: kernel time vs images per sequence and text length, fastflamingo's
speedup per kernel and stage, and end-to-end peak memory. Every axis says its unit, every figure
its device."""
from __future__ import annotations

import os
from collections import OrderedDict

from .report import OURS, ours_for, speedup
from .rows import Row

STYLE = {"roofline": dict(linestyle="--", color="black"), OURS: dict(linewidth=2.5, color="tab:red")}
# every other provider keeps one colour across panels; red is fastflamingo's alone
PALETTE = ["tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:olive",
           "tab:cyan", "tab:gray", "gold"]


def _style(name: str, colors: dict) -> dict:
    if name in STYLE:
        return STYLE[name]
    if name not in colors:
        colors[name] = PALETTE[len(colors) % len(PALETTE)]
    return dict(color=colors[name])


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _series(rows, kernel, sweep, mode):
    out: OrderedDict = OrderedDict()
    for r in rows:
        if r.kernel == kernel and r.sweep == sweep and r.mode == mode and r.metric == "time_ms" and r.ok:
            out.setdefault(r.provider, []).append((r.x_value, r.median, r.p20, r.p80))
    return out


def _line_panel(ax, rows, colors, kernel, sweep, mode, xlabel, title):
    series = _series(rows, kernel, sweep, mode)
    if not series:
        ax.set_visible(False)
        return False
    for name, pts in series.items():
        pts.sort()
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        err = [[p[1] - p[2] for p in pts], [p[3] - p[1] for p in pts]]
        ax.errorbar(xs, ys, yerr=err, marker="o", markersize=4, capsize=2, label=name, **_style(name, colors))
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    _plain_numbers(ax)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("time per call [ms] (median, p20-p80)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    return True


def _plain_numbers(ax):
    """Tick labels as plain numbers (256, 0.5), not powers (2^8, 5x10^-1)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.xaxis.set_major_formatter(plain)
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(NullFormatter())


def kernel_plot(rows: list[Row], path: str) -> str | None:
    plt = _plt()
    xr = [r for r in rows if r.kernel == "image-causal xattn"]
    fixed_t = next((r.x.split()[-1] for r in xr if r.sweep == "N"), "")
    fixed_n = next((r.x.split()[1] for r in xr if r.sweep == "T"), "")
    panels = [("image-causal xattn", "N", "fwd", "images per sequence N", f"cross-attention fwd, {fixed_t}"),
              ("image-causal xattn", "N", "fwd+bwd", "images per sequence N", f"cross-attention fwd+bwd, {fixed_t}"),
              ("image-causal xattn", "T", "fwd", "text length T [tokens]", f"cross-attention fwd, {fixed_n}"),
              ("resampler layer", "images", "fwd+bwd", "images per batch", "resampler layer fwd+bwd")]
    fig, axes = plt.subplots(2, 2, figsize=(13, 10.5))
    colors: dict = {}
    drawn = [_line_panel(ax, rows, colors, *p) for ax, p in zip(axes.flat, panels)]
    if not any(drawn):
        plt.close(fig)
        return None
    legend = {}
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(lab, h)
    fig.legend(legend.values(), legend.keys(), loc="lower center", ncol=min(5, len(legend)), fontsize=9)
    fig.suptitle(f"Kernel time — {_device(rows)}", fontsize=11)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _device(rows):
    return rows[0].device if rows else ""


def speedup_plot(rows: list[Row], path: str) -> str | None:
    """One bar per (kernel or stage, mode, peer): at the largest point of each kernel's sweep (the
    title says so). Floors (a lower bound, not a peer) and the CPU's uncompiled FlexAttention (an
    unfused fallback no user would run) are left out; the table has them."""
    plt = _plt()
    bars = []
    groups: OrderedDict = OrderedDict()
    for r in rows:
        if r.metric in ("time_ms", "tokens_per_s") and r.sweep in ("N", "images", "stage"):
            groups.setdefault((r.kernel, r.mode, r.metric, r.x if r.sweep == "stage" else ""), []).append(r)
    for (kernel, mode, _, _), rs in groups.items():
        last_x = max((r.x_value or 0 for r in rs), default=0)
        pts = [r for r in rs if (r.x_value or 0) == last_x]
        at_point = {r.provider: r for r in pts}
        for r in pts:
            s = speedup(ours_for(at_point, r), r)
            if s is not None and not r.provider.startswith(OURS) and "build" not in r.provider \
                    and r.provider != "roofline" and "(floor)" not in r.provider and "(eager)" not in r.provider:
                bars.append((f"{kernel} {mode} [{r.x}]\nvs {r.provider}", s))
    if not bars:
        return None
    fig, ax = plt.subplots(figsize=(10, 0.42 * len(bars) + 1.8))
    labels, values = zip(*bars)
    colors = ["tab:green" if v >= 1 else "tab:gray" for v in values]
    ax.barh(range(len(bars)), values, color=colors)
    ax.set_yticks(range(len(bars)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.axvline(1.0, color="black", linewidth=1)
    for i, v in enumerate(values):
        ax.text(v, i, f" {v:.2f}x", va="center", fontsize=7)
    ax.set_xlabel("fastflamingo speedup over the peer [x] (>1: fastflamingo faster; log scale)")
    ax.set_title(f"Speedup per kernel and stage, at each sweep's largest point — {_device(rows)}", fontsize=10)
    ax.grid(True, axis="x", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def memory_plot(rows: list[Row], path: str) -> str | None:
    plt = _plt()
    mem = [r for r in rows if r.metric == "peak_mem_MB" and r.ok]
    if not mem:
        return None
    stages = list(OrderedDict.fromkeys(f"{r.kernel}\n{r.x.split(' B=')[0]} ({r.mode})" for r in mem))
    providers = list(OrderedDict.fromkeys(r.provider for r in mem))
    fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(stages)), 5.5))
    width = 0.8 / len(providers)
    for i, p in enumerate(providers):
        vals = {f"{r.kernel}\n{r.x.split(' B=')[0]} ({r.mode})": r.median for r in mem if r.provider == p}
        xs = [j + i * width for j, s in enumerate(stages) if s in vals]
        ax.bar(xs, [vals[s] for s in stages if s in vals], width, label=p, **({"color": "tab:red"} if p == OURS else {}))
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(stages))], stages, fontsize=7)
    ax.set_ylabel("peak memory [MiB]")
    ax.set_title(f"End-to-end peak memory — {_device(rows)}", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    # each stage's own basis (weights; plus the static KV cache; plus the optimizer state): the first
    # row's alone was printed under every bar
    notes: OrderedDict = OrderedDict()
    for r in mem:
        stage = f"{r.kernel} ({r.mode})"
        if stage not in notes.setdefault(r.note, []):
            notes[r.note].append(stage)
    lines = [f"{', '.join(st)}: measured as {note}" if len(notes) > 1 else f"measured as {note}"
             for note, st in notes.items()]
    fig.text(0.01, 0.01, "\n".join(lines), fontsize=7, va="bottom")
    fig.tight_layout(rect=(0, 0.03 * (len(lines) + 1), 1, 1))
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


PLOTS = ("kernels.png", "speedup.png", "memory.png")


def all_plots(rows: list[Row], out_dir: str) -> list[str]:
    """The plots these rows make, in ``out_dir``; an earlier run's plot these rows do not make
    (a kernels.png beside e2e rows alone) is removed, not left beside rows it was not drawn from."""
    made = [kernel_plot(rows, os.path.join(out_dir, PLOTS[0])),
            speedup_plot(rows, os.path.join(out_dir, PLOTS[1])),
            memory_plot(rows, os.path.join(out_dir, PLOTS[2]))]
    for name, path in zip(PLOTS, made):
        if not path and os.path.exists(os.path.join(out_dir, name)):
            os.remove(os.path.join(out_dir, name))
    return [p for p in made if p]
