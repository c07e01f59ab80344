"""The result rows: one per (kernel or stage, provider, mode, metric, x), Liger-Kernel style."""
from __future__ import annotations

import csv
import json
from dataclasses import MISSING, asdict, dataclass, field, fields

import torch

from .timing import Timing, describe

OK = "ok"
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass
class Row:
    """One measured (or refused) number.

    ``status`` is ``ok``, ``FAILED: <why>`` (the provider's output disagreed with the reference:
    no time is reported), or ``n/a: <why>`` (the provider cannot run here). ``x`` labels the
    point (``B=8 N=4 T=256``); ``sweep``/``x_value`` place it on a plot axis. ``timing`` says how
    the number was measured (:mod:`.timing`: ``cuda-graph``, ``events``, ``wall-clock``); on a GPU
    the note says it too, and why the graph capture failed where it did
    (``extra["timing_fallback"]``). ``reps``: how many timed calls the median, p20 and p80 come
    from (None for a number that was not timed: a roofline). ``dtype`` and ``geometry``
    (``H=8 D=64 L=64``: heads, head size, latents per image) say what a kernel row ran: its
    ``x`` names only the sweep's sizes, and a goal holds for one geometry (:mod:`.goals`).
    ``date``, ``code`` and ``threads`` are the run's (its meta), on every row so that rows.csv keeps them.
    Rows written before these fields existed read back with them empty: unknown.
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
    reps: int | None = None
    dtype: str = ""
    geometry: str = ""
    date: str = ""          # the run's (UTC), its code (git describe or the package version) and torch threads
    code: str = ""
    threads: int | None = None

    @property
    def ok(self) -> bool:
        return self.status == OK and self.median is not None

    def with_timing(self, t: Timing) -> "Row":
        self.median, self.p20, self.p80 = t.median, t.p20, t.p80
        self.timing, self.reps = t.method, t.reps
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


REQUIRED = [f.name for f in fields(Row) if f.default is MISSING and f.default_factory is MISSING]


def read_json(path: str) -> tuple[dict, list[Row]]:
    """(meta, rows) of a ``rows.json``; a ValueError naming the file and what is missing or unknown
    when it is not one (fields added since it was written are left empty: unknown)."""
    with open(path) as f:
        try:
            d = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not JSON ({e}); expected a rows.json written by fastflamingo bench") from None
    missing = [k for k in ("meta", "rows") if not isinstance(d, dict) or k not in d]
    if missing:
        raise ValueError(f"{path}: no {' or '.join(repr(k) for k in missing)} key; expected a rows.json written by "
                         f"fastflamingo bench ({{\"meta\": ..., \"rows\": [...]}})")
    known = {f.name for f in fields(Row)}
    rows = []
    for i, r in enumerate(d["rows"]):
        lacking = [k for k in REQUIRED if k not in r]
        unknown = sorted(set(r) - known)
        if lacking or unknown:
            raise ValueError(f"{path}: row {i} " + "; ".join(
                ([f"lacks {lacking}"] if lacking else []) +
                ([f"has fields this version does not know: {unknown} (written by a newer fastflamingo?)"]
                 if unknown else [])))
        rows.append(Row(**r))
    return d["meta"], rows
