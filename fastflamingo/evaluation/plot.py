"""The few-shot curve of ``fastflamingo evaluate``: score by number of shots, a line per task."""
from __future__ import annotations

import os


def few_shot_plot(report: dict, path: str) -> str | None:
    """Write the PNG to ``path`` and return it; None without matplotlib, or when no result has a
    score (predictions only: queries with no references)."""
    if all(r["score"] is None for rs in report["results"].values() for r in rs):
        if os.path.isfile(path):  # (an earlier run's plot beside these results would be read as theirs)
            os.remove(path)
        return None
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, rs in report["results"].items():
        points = sorted((r["shots"], r["score"]) for r in rs)  # (in order of shots, however they were given)
        ax.plot([x for x, _ in points], [y for _, y in points], marker="o", label=name)
    ax.set_xscale("symlog", linthresh=1)
    shots = sorted({r["shots"] for rs in report["results"].values() for r in rs})
    ax.set_xticks(shots, [str(s) for s in shots])
    top = max((r["score"] for rs in report["results"].values() for r in rs), default=0)
    ax.set_ylim(0, max(100, 1.05 * top))  # (a percentage, or CIDEr x 100, which passes 100)
    ax.set_xlabel("demonstrations (shots)")
    ax.set_ylabel(report["metric"].split(",")[0])
    ax.set_title(f"few-shot {report['kind']} ({report['device']})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
