"""The result rows: one per (kernel or stage, provider, mode, metric, x), Liger-Kernel style."""
from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass, field, fields

from .timing import Timing, describe

OK = "ok"


@dataclass
class Row:
    """One measured (or refused) number.

    ``status`` is ``ok``, ``FAILED: <why>`` (the provider's output disagreed with the reference:
    no time is reported), or ``n/a: <why>`` (the provider cannot run here). ``x`` labels the
    point (``B=8 N=4 T=256``); ``sweep``/``x_value`` place it on a plot axis. ``timing`` says how
    the number was measured (:mod:`.timing`: ``cuda-graph``, ``events``, ``wall-clock``); on a GPU
    the note says it too, and why the graph capture failed where it did
    (``extra["timing_fallback"]``).
    """
    kernel: str
    provider: str
    mode: str
    metric: str
    x: str
    median: float | None = None
    p20: float | None = None
    p80: float | None = None
    device: str = ""
    versions: str = ""
    status: str = OK
    sweep: str = ""
    x_value: float | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)
    timing: str = ""

    @property
    def ok(self) -> bool:
        return self.status == OK and self.median is not None

    def with_timing(self, t: Timing) -> "Row":
        self.median, self.p20, self.p80 = t.median, t.p20, t.p80
        self.timing = t.method
        how = describe(t)
        if how:
            self.note = f"{self.note}; {how}" if self.note else how
        if t.fallback:
            self.extra = {**self.extra, "timing_fallback": t.fallback}
        return self


CSV_FIELDS = [f.name for f in fields(Row) if f.name != "extra"]


def write_csv(rows: list[Row], path: str) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in rows:
            d = asdict(r)
            d.pop("extra")
            w.writerow(d)


def write_json(rows: list[Row], path: str, meta: dict) -> None:
    with open(path, "w") as f:
        json.dump({"meta": meta, "rows": [asdict(r) for r in rows]}, f, indent=1)


def read_json(path: str) -> tuple[dict, list[Row]]:
    with open(path) as f:
        d = json.load(f)
    return d["meta"], [Row(**r) for r in d["rows"]]
