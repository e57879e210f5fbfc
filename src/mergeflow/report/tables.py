"""The accuracy tables of the dashboard and which of their differences are within noise.

Each value comes with its 95 % interval when ``metrics/eval.json`` has one. The best value of a
column is only called the winner when it is ahead of every other by more than noise; otherwise
every value within noise of the top is marked a tie. The best merge is compared with every other
row by the paired bootstrap interval of the difference the evaluate stage computed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mergeflow.report import charts, inputs
from mergeflow.report.inputs import Evaluation

KIND_ORDER = {"reference": 0, "merge": 1, "compressed": 2}

Interval = tuple[float, float]


@dataclass(frozen=True)
class Cell:
    """One table cell: a value, its 95 % interval, and ``best`` / ``tie`` for the column's top."""

    value: float | None
    ci: Interval | None = None
    mark: str = ""


@dataclass(frozen=True)
class TableRow:
    """One model's row."""

    name: str
    kind: str
    color: str
    cells: list[Cell]


@dataclass(frozen=True)
class Table:
    """A method × task table; ``columns`` are (name, number of test texts or None)."""

    id: str
    caption: str
    columns: list[tuple[str, int | None]]
    rows: list[TableRow]


@dataclass(frozen=True)
class Comparison:
    """The best merge against one other row: paired difference of mean normalized accuracy."""

    other: str
    kind: str
    color: str
    mean_normalized: float | None
    mean_ci: Interval | None
    diff: float | None
    ci: Interval | None
    within_noise: bool | None  # None: no paired interval in metrics/eval.json


def ordered_rows(ev: Evaluation) -> list[str]:
    """Rows grouped: references (expert, base), merges, compressed forms; stable within a group."""
    ref = inputs.REFERENCE_ROWS
    return sorted(
        ev.rows,
        key=lambda r: (KIND_ORDER[ev.kind(r)], ref.index(r) if r in ref else 0, list(ev.rows).index(r)),
    )


def mover_within_noise(top: float, top_ci: Interval, other: float, other_ci: Interval) -> bool:
    """Whether ``top − other`` is within noise, from the two values' own 95 % intervals.

    The lower end of the interval of the difference is built from the two intervals by MOVER
    (G. Y. Zou, A. Donner, "Construction of confidence limits about effect measures",
    Stat. Methods Med. Res. 2008; for two Wilson intervals this is Newcombe's 1998 method 10):
    ``(top − other) − sqrt((top − top_lo)² + (other_hi − other)²)``. It treats the two as
    independent, so for two methods scored on the same texts it calls a tie more readily than
    a paired interval would — it never claims a winner the data does not support.
    """
    lo = (top - other) - math.hypot(top - top_ci[0], other_ci[1] - other)
    return lo <= 0.0


def column_marks(
    values: Mapping[str, float | None],
    cis: Mapping[str, Interval | None],
    paired: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, str]:
    """``best`` for a column's clear winner, or ``tie`` for every row within noise of the top.

    Args:
        values: Row → value of the column (the expert reference row already left out).
        cis: Row → 95 % interval of that value (None: unknown).
        paired: Row → other row → ``{"within_noise": bool, ...}``, the paired comparison when
            the evaluation has one (used before the interval-based :func:`mover_within_noise`).

    Returns:
        Row → mark for the rows that get one. Without any interval the top value is ``best``
        (rows equal to it too), as far as the data can say.
    """
    finite = {r: v for r, v in values.items() if v is not None and math.isfinite(v)}
    if not finite:
        return {}
    top = max(finite, key=lambda r: finite[r])  # first of equal values (dict order)

    def tied(r: str) -> bool:
        if finite[r] == finite[top]:
            return True
        p = (paired or {}).get(top, {}).get(r)
        if p is not None:
            return bool(p["within_noise"])
        a, b = cis.get(top), cis.get(r)
        return a is not None and b is not None and mover_within_noise(finite[top], a, finite[r], b)

    ties = [r for r in finite if r != top and tied(r)]
    if not ties:
        return {top: "best"}
    return {r: "tie" for r in (top, *ties)}


def metric_tables(ev: Evaluation, pal: charts.Palette) -> list[Table]:
    """The accuracy and the normalized table: rows in :func:`ordered_rows` order, tasks + mean.

    Per-task ties are decided on accuracy (normalized is the same order: accuracy ÷ one number)
    and apply to both tables; the mean columns use their own intervals, and the mean normalized
    column the paired comparison where the file has one.
    """
    rows = ordered_rows(ev)
    rivals = [r for r in rows if r != "expert"]  # the expert row is the reference
    marks: dict[str, dict[str, str]] = {}
    for t in ev.tasks:
        marks[t] = column_marks(
            {r: ev.rows[r]["accuracy"].get(t) for r in rivals},
            {r: ev.rows[r]["accuracy_ci"].get(t) for r in rivals},
        )
    mean_marks = {
        key: column_marks(
            {r: ev.rows[r][key] for r in rivals},
            {r: ev.rows[r][f"{key}_ci"] for r in rivals},
            {r: ev.rows[r]["paired"] for r in rivals} if key == "mean_normalized" else None,
        )
        for key in ("mean_accuracy", "mean_normalized")
    }
    columns = [(t, ev.n_test(t)) for t in ev.tasks] + [("mean", None)]
    out = []
    for key, table_id, caption in (
        ("accuracy", "accuracy-table", "Test accuracy (fraction correct) [95 % interval]"),
        ("normalized", "normalized-table", "Normalized accuracy (merged ÷ expert)"),
    ):
        mean_key = f"mean_{key}"
        body = []
        for r in rows:
            s = ev.rows[r]
            cells = [
                Cell(s[key].get(t), s["accuracy_ci"].get(t) if key == "accuracy" else None,
                     marks[t].get(r, ""))
                for t in ev.tasks
            ]
            cells.append(Cell(s[mean_key], s[f"{mean_key}_ci"], mean_marks[mean_key].get(r, "")))
            body.append(TableRow(r, ev.kind(r), pal(r), cells))
        out.append(Table(table_id, caption, columns, body))
    return out


def comparisons(ev: Evaluation, pal: charts.Palette) -> tuple[str | None, list[Comparison]]:
    """(best merge, its paired comparison with every other row, by mean normalized descending)."""
    best = ev.best_merge()
    if best is None:
        return None, []
    paired = ev.rows[best]["paired"]

    def rank(r: str) -> float:
        v = ev.rows[r]["mean_normalized"]
        return -v if v is not None and math.isfinite(v) else math.inf

    others = sorted((r for r in ordered_rows(ev) if r != best), key=rank)
    out = []
    for r in others:
        p = paired.get(r)
        out.append(Comparison(
            r, ev.kind(r), pal(r), ev.rows[r]["mean_normalized"], ev.rows[r]["mean_normalized_ci"],
            p["diff"] if p else None, p["ci"] if p else None, p["within_noise"] if p else None,
        ))
    return best, out
