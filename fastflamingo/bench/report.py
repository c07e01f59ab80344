"""The readable table: one block per (kernel or stage, mode, metric), one line per point, one
column per provider, with fastflamingo's speedup over each baseline beside the baseline's number.
On a GPU, a line under each block says how its cells were timed (:mod:`.timing`): CUDA-graph
replay (GPU time) unless listed as eager calls timed by CUDA events, with the reason where the
graph capture failed."""
from __future__ import annotations

from collections import OrderedDict

from .rows import Row
from .timing import EVENTS, GRAPH

OURS = "fastflamingo"
HIGHER_IS_BETTER = {"tokens_per_s"}
UNITS = {"time_ms": "ms", "tokens_per_s": "tokens/s", "peak_mem_MB": "MiB", "weights_MB": "MiB"}
NOT_A_SPEED = {"peak_mem_MB", "weights_MB"}


def _fmt(v: float) -> str:
    if v >= 100:
        return f"{v:.0f}"
    if v >= 1:
        return f"{v:.2f}"
    return f"{v:.3g}"


def ours_for(at_point: dict[str, Row], other: Row) -> Row | None:
    """fastflamingo's row to set ``other`` beside, timed as ``other`` was (``at_point``: the
    point's rows by provider): GPU time by graph replay beside graph replay; beside a peer timed
    by CUDA events (a mask build's, or one whose capture failed: host launch time included), the
    same events timing of fastflamingo's call (its EAGER row). None where there is no such row:
    no speedup, rather than one of two timings."""
    ours = at_point.get(OURS)
    if ours is None or not other.timing or ours.timing in ("", other.timing):
        return ours
    eager = at_point.get(f"{OURS} eager")
    return eager if eager is not None and eager.timing == other.timing else None


def speedup(ours: Row | None, other: Row) -> float | None:
    """How many times better fastflamingo is than ``other`` (>1: fastflamingo wins)."""
    if ours is None or not ours.ok or not other.ok or not ours.median or not other.median:
        return None
    if other.metric in NOT_A_SPEED or ours.metric in NOT_A_SPEED:
        return None
    if ours.metric in HIGHER_IS_BETTER:
        return ours.median / other.median
    return other.median / ours.median


def _cell(r: Row | None, ours: Row | None) -> str:
    if r is None:
        return "-"
    if r.status.startswith("FAILED"):
        return "FAILED"
    if not r.ok:
        return "n/a"
    s = _fmt(r.median)
    ratio = None if r.provider.startswith(OURS) or r.provider == "roofline" else speedup(ours, r)
    return s + (f" ({ratio:.2f}x)" if ratio is not None else "")


def blocks(rows: list[Row]) -> "OrderedDict":
    out: OrderedDict = OrderedDict()
    for r in rows:
        out.setdefault((r.kernel, r.mode, r.metric), []).append(r)
    return out


def format_table(rows: list[Row]) -> str:
    """The whole report as text. FAILED and n/a cells carry no number; reasons follow the block."""
    lines = []
    for (kernel, mode, metric), rs in blocks(rows).items():
        providers = list(OrderedDict.fromkeys(r.provider for r in rs))
        points = list(OrderedDict.fromkeys(r.x for r in rs))
        grid = {(r.x, r.provider): r for r in rs}
        header = ["x"] + providers
        body = []
        for x in points:
            at_point = {p: grid[x, p] for p in providers if (x, p) in grid}
            body.append([x] + [_cell(r, None if r is None else ours_for(at_point, r))
                               for r in (grid.get((x, p)) for p in providers)])
        widths = [max(len(row[i]) for row in [header] + body) for i in range(len(header))]
        unit = UNITS.get(metric, metric)
        ran = ", ".join(dict.fromkeys(f"{r.dtype} {r.geometry}".strip() for r in rs if r.dtype or r.geometry))
        lines.append(f"\n== {kernel} | {mode} | {metric} [{unit}], median; (Nx) = fastflamingo's speedup | "
                     + (f"{ran} | " if ran else "") + rs[0].device)
        for row in [header] + body:
            lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
        reasons = OrderedDict()
        for r in rs:
            if not r.ok:
                reasons.setdefault(f"{r.provider}: {r.status}", None)
            elif "WARNING" in (r.note or ""):  # e.g. a compiled decode that fell back in part
                reasons.setdefault(f"{r.provider}: {r.note[r.note.index('WARNING'):]}", None)
        lines += [f"  - {why}" for why in reasons]
        lines += timing_lines(rs)
    return "\n".join(lines)


def timing_lines(rs: list[Row]) -> list[str]:
    """How a block's GPU cells were timed (nothing for the CPU's wall clock): GPU time by graph
    replay, then the cells timed as eager calls by CUDA events, grouped by why (asked for, or the
    graph capture failed)."""
    timed = [r for r in rs if r.ok and r.timing in (GRAPH, EVENTS)]
    if not timed:
        return []
    eager: OrderedDict = OrderedDict()  # why the capture failed ("": asked for) -> providers
    for r in timed:
        if r.timing == EVENTS:
            names = eager.setdefault(r.extra.get("timing_fallback", ""), [])
            if r.provider not in names:
                names.append(r.provider)
    if not any(r.timing == GRAPH for r in timed) and list(eager) == [""]:
        return ["  timing: eager calls by CUDA events, L2 flushed (host launch time included)"]
    head = "  timing: GPU time by CUDA-graph replay, L2 flushed"
    if "" in eager:
        head += f"; eager calls by CUDA events (host launch time included): {', '.join(eager.pop(''))}"
    return [head] + [f"    by CUDA events, graph capture failed ({why[:110]}): {', '.join(names)}"
                     for why, names in eager.items()]
