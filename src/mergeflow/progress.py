"""Live progress of a flow run's stage items: one small JSON file per item, read by the flow.

The channel (no daemon, no socket): the flow sets ``MERGEFLOW_PROGRESS_DIR`` for the stage
processes it starts (through DVC or directly). A stage with steps (``finetune@*``,
``coefficients``) reports through :class:`StageProgress`, which rewrites
``<dir>/<item>.json`` atomically — at most every ``min_interval_s``, and always at the end of a
phase. The flow's task records the item's own state (running, ran, skipped, failed; start and
end times) in ``<dir>/<item>.task.json`` with :func:`mark`. The flow reads both with
:func:`read_board` and shows them with :class:`Monitor`: a live table in an interactive terminal
(rich), plain lines at a cadence elsewhere (:class:`Cadence`: every 10 % of an item's work or
every 30 s). Without the variable — a bare ``dvc repro`` — a stage writes nothing and its own
tqdm bar is all there is.

This module imports nothing heavy at import time: stage processes load it.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENV = "MERGEFLOW_PROGRESS_DIR"
FINAL_STATES = ("ran", "skipped", "failed")
_UNSAFE = re.compile(r"[^A-Za-z0-9@._-]+")


def item_file(directory: str | Path, item: str, kind: str = "") -> Path:
    """The file of stage item ``item`` in the progress directory (``kind``: ``""`` or ``task``)."""
    name = _UNSAFE.sub("_", item).lstrip(".") or "_"
    return Path(directory) / (f"{name}.{kind}.json" if kind else f"{name}.json")


def _write(path: Path, obj: dict) -> None:
    """Replace ``path`` atomically (readers see the old or the new file); no fsync: it is a hint."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def _read(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


class StageProgress:
    """What a stage process reports about its own work: phase, step, loss, rate, time left.

    A phase is one stretch of counted work (``finetune``: the training steps; ``coefficients``:
    the scaling grid, then each learned run). The rate is measured from the first update of the
    phase (set-up such as the linear probe before step 1 does not count), and the time left is
    the phase's remaining units at that rate. The fraction of the whole item gives each phase an
    equal share.

    Args:
        path: The item's progress file; ``None`` reports nothing (every call returns at once).
        item: The stage item, e.g. ``finetune@rotten_tomatoes``.
        phases: How many phases the item has.
        min_interval_s: At most one write per this many seconds (phase ends always write).
        clock: Monotonic clock (tests pass a fake one).
    """

    def __init__(
        self,
        path: str | Path | None,
        item: str,
        phases: int = 1,
        min_interval_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.path = Path(path) if path is not None else None
        self.item = item
        self.phases = max(1, phases)
        self.min_interval_s = min_interval_s
        self._clock = clock
        self._index = 0
        self._name, self._unit, self._total = "", "step", None
        self._done, self._first = 0, None
        self._values: dict[str, float] = {}
        self._last_write = -math.inf
        self.writes = 0

    def phase(self, name: str, total: int | None, unit: str = "step") -> None:
        """Begin the next phase: ``total`` units of ``unit`` (``None``: not counted)."""
        if self.path is None:
            return
        self._index = min(self._index + 1, self.phases)
        self._name, self._unit, self._total = name, unit, total
        self._done, self._first, self._values = 0, None, {}
        self._flush(self._clock())

    def update(self, done: int, **values: float | None) -> None:
        """``done`` units of the phase are finished; ``values`` (loss, accuracy ...) are the latest.

        Cheap when nothing is written: a clock read and a comparison.
        """
        if self.path is None:
            return
        now = self._clock()
        if self._first is None:
            self._first = (now, done)
        self._done = done
        self._values.update({k: float(v) for k, v in values.items() if v is not None})
        last = self._total is not None and done >= self._total
        if last or now - self._last_write >= self.min_interval_s:
            self._flush(now)

    def state(self, now: float | None = None) -> dict[str, Any]:
        """The record written to the file."""
        now = self._clock() if now is None else now
        rate = None
        if self._first is not None and now > self._first[0] and self._done > self._first[1]:
            rate = (self._done - self._first[1]) / (now - self._first[0])
        eta = None
        if rate and self._total is not None:
            eta = max(0.0, (self._total - self._done) / rate)
        part = min(1.0, self._done / self._total) if self._total else 0.0
        return {
            "item": self.item,
            "phase": self._name,
            "phase_index": self._index,
            "phases": self.phases,
            "unit": self._unit,
            "done": self._done,
            "total": self._total,
            "rate": rate,
            "eta_s": eta,
            "values": dict(self._values),
            "fraction": (max(0, self._index - 1) + part) / self.phases,
            "time": time.time(),
        }

    def _flush(self, now: float) -> None:
        self._last_write = now
        self.writes += 1
        try:
            _write(self.path, self.state(now))
        except OSError:  # a progress hint must never fail the stage (e.g. the flow removed it)
            pass


def stage_progress(item: str, phases: int = 1, min_interval_s: float = 1.0) -> StageProgress:
    """A :class:`StageProgress` writing into ``$MERGEFLOW_PROGRESS_DIR``; inactive without it."""
    directory = os.environ.get(ENV)
    path = item_file(directory, item) if directory and Path(directory).is_dir() else None
    return StageProgress(path, item, phases=phases, min_interval_s=min_interval_s)


def mark(
    directory: str | Path, item: str, state: str, started: float, ended: float | None = None,
    error: str = "",
) -> None:
    """Record a stage item's state for the flow's view.

    ``checking`` (asking DVC whether it is up to date), ``running`` (its command runs; ``started``
    is when the command started) or a final state (``started``: when the task started).
    """
    record = {"item": item, "state": state, "started": started, "ended": ended, "error": error}
    _write(item_file(directory, item, "task"), record)


@dataclass(frozen=True)
class ItemView:
    """One stage item as the flow sees it: its state, times, and the stage's last progress."""

    name: str
    state: str = "waiting"  # waiting | checking | running | ran | skipped | failed
    started: float | None = None
    ended: float | None = None
    error: str = ""
    progress: dict[str, Any] | None = None

    @property
    def stage(self) -> str:
        """The stage name without the ``@item`` suffix."""
        return self.name.split("@", 1)[0]

    @property
    def fraction(self) -> float | None:
        """The finished part of the item's work (1 when done, ``None`` if not counted)."""
        if self.state in ("ran", "skipped"):
            return 1.0
        p = self.progress
        if not p or p.get("fraction") is None or (not p.get("total") and p.get("phases", 1) < 2):
            return None
        return float(p["fraction"])


def read_board(directory: str | Path, names: Iterable[str]) -> list[ItemView]:
    """The state of every item in ``names`` (in that order) from the progress directory."""
    out = []
    for name in names:
        task = _read(item_file(directory, name, "task")) or {}
        state = task.get("state", "waiting")
        progress = _read(item_file(directory, name)) if state != "waiting" else None
        out.append(
            ItemView(name, state, task.get("started"), task.get("ended"), task.get("error", ""),
                     progress)
        )
    return out


def fmt_duration(seconds: float | None) -> str:
    """``45 s``, ``3 min 05 s``, ``2 h 07 min`` (``-`` when unknown)."""
    if seconds is None or not math.isfinite(seconds):
        return "-"
    s = int(round(max(0.0, seconds)))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def fmt_rate(rate: float | None, unit: str = "step") -> str:
    """``3.1 step/s`` or, below one per second, ``12.4 s/step``."""
    if not rate:
        return ""
    return f"{rate:.1f} {unit}/s" if rate >= 1 else f"{1 / rate:.1f} s/{unit}"


def describe(view: ItemView, now: float | None = None) -> str:
    """One line about an item: its step, loss, rate and time left while running, else its result."""
    now = time.time() if now is None else now
    elapsed = (view.ended or now) - view.started if view.started else None
    if view.state == "waiting":
        return "waiting"
    if view.state == "checking":
        return f"checking whether it is up to date ({fmt_duration(elapsed)})"
    if view.state == "skipped":
        return "up to date, skipped"
    if view.state == "ran":
        return f"ran in {fmt_duration(elapsed)}"
    if view.state == "failed":
        return f"failed after {fmt_duration(elapsed)}" + (f": {view.error}" if view.error else "")
    p = view.progress
    if not p:
        return f"running {fmt_duration(elapsed)}"
    unit = p.get("unit") or "step"
    head = p.get("phase") or ""
    if p.get("phases", 1) > 1:
        head += f" ({p.get('phase_index')}/{p['phases']})"
    parts = []
    if p.get("total"):
        parts.append(f"{unit} {p['done']}/{p['total']} ({100 * p['done'] / p['total']:.0f} %)")
    elif p.get("done"):
        parts.append(f"{unit} {p['done']}")
    vals = p.get("values") or {}
    for key, label in (("loss", "loss"), ("val_accuracy", "val acc"), ("val_normalized", "val norm")):
        if key in vals:
            parts.append(f"{label} {vals[key]:.3f}")
    if fmt_rate(p.get("rate"), unit):
        parts.append(fmt_rate(p.get("rate"), unit))
    if p.get("eta_s") is not None:
        parts.append(f"~{fmt_duration(p['eta_s'])} left")
    parts.append(f"running {fmt_duration(elapsed)}")
    return (f"{head}: " if head else "") + " · ".join(parts)


def counts(board: Iterable[ItemView]) -> dict[str, int]:
    """Items done (ran, skipped), running, failed and waiting."""
    c = {"done": 0, "running": 0, "failed": 0, "waiting": 0}
    for v in board:
        c["done" if v.state in ("ran", "skipped") else
          "running" if v.state == "checking" else v.state] += 1
    return c


def fmt_counts(board: Iterable[ItemView]) -> str:
    """``4 done · 3 running · 8 waiting`` (and ``· 1 failed`` when one did)."""
    c = counts(board)
    text = f"{c['done']} done · {c['running']} running · {c['waiting']} waiting"
    return text + (f" · {c['failed']} failed" if c["failed"] else "")


@dataclass
class Cadence:
    """When a plain progress line is due for an item.

    Due when a new ``every_fraction`` of its work is done, or ``every_s`` seconds passed since its
    last line: about ten lines per item plus one per half minute, never a line per step.
    """

    every_fraction: float = 0.1
    every_s: float = 30.0
    clock: Callable[[], float] = time.monotonic
    _last: dict[str, tuple[int, float]] = field(default_factory=dict)

    def due(self, key: str, fraction: float | None) -> bool:
        """Whether to print a line for ``key`` now (and if so, remember that it was printed)."""
        now = self.clock()
        bucket = -1 if fraction is None else int(math.floor(fraction / self.every_fraction + 1e-9))
        last = self._last.get(key)
        if last is None or bucket > last[0] or now - last[1] >= self.every_s:
            self._last[key] = (max(bucket, last[0] if last else -1), now)
            return True
        return False


def board_table(board: list[ItemView], now: float | None = None):
    """The live view: counts of items by state, then a row per running or failed item."""
    from rich.progress_bar import ProgressBar
    from rich.table import Table
    from rich.text import Text

    table = Table(title=Text(f"stage items: {fmt_counts(board)}"), title_justify="left")
    table.add_column("item", no_wrap=True)
    table.add_column("", width=22)
    table.add_column("progress")
    for v in board:
        if v.state not in ("checking", "running", "failed"):
            continue
        frac = v.fraction
        bar = ProgressBar(total=100, completed=100 * frac, width=20) if frac is not None else ""
        style = "red" if v.state == "failed" else None
        table.add_row(Text(v.name), bar, Text(describe(v, now)), style=style)
    return table


def render_text(renderable, width: int = 110) -> str:
    """A rich renderable as plain text (for logs): no colour, no control codes."""
    import io

    from rich.console import Console

    buf = io.StringIO()
    Console(file=buf, width=width, color_system=None, force_terminal=False).print(renderable)
    return buf.getvalue().rstrip()


class Monitor:
    """Shows a flow run's items while they run: a live table in a terminal, else plain lines.

    Call :meth:`tick` about once a second from the flow; use as a context manager.

    Args:
        directory: The progress directory.
        names: Every stage item of the run, in plan order.
        console: A rich console; live when it is a terminal (unless ``live`` says otherwise).
        log: Where plain lines go (the flow's logger ``info``).
        live: Force the live view on or off (default: ``console.is_terminal``).
        cadence: When plain lines are due.
    """

    def __init__(
        self,
        directory: str | Path,
        names: Iterable[str],
        console=None,
        log: Callable[[str], None] = print,
        live: bool | None = None,
        cadence: Cadence | None = None,
    ):
        from rich.console import Console

        self.directory = Path(directory)
        self.names = list(names)
        self.console = console or Console(stderr=True)
        self.log = log
        self.is_live = self.console.is_terminal if live is None else live
        self.cadence = cadence or Cadence()
        self.board: list[ItemView] = [ItemView(n) for n in self.names]
        self._live = None

    def __enter__(self) -> Monitor:
        if self.is_live:
            from rich.live import Live

            self._live = Live(
                board_table(self.board), console=self.console, auto_refresh=False, transient=True
            )
            self._live.start()
        return self

    def __exit__(self, *exc) -> None:
        self.tick()
        if self._live is not None:
            live, self._live = self._live, None
            live.stop()

    def tick(self) -> list[ItemView]:
        """Read the directory, refresh the view or print the lines that are due; the board."""
        self.board = read_board(self.directory, self.names)
        now = time.time()
        if self._live is not None:
            try:
                self._live.update(board_table(self.board, now), refresh=True)
                return self.board
            except Exception as err:  # noqa: BLE001 - a view must never stop the run
                self._live = None
                self.is_live = False
                self.log(f"live view off ({type(err).__name__}: {err}); plain lines follow")
        for v in self.board:
            if v.state in ("checking", "running") and self.cadence.due(v.name, v.fraction):
                self.log(f"{v.name}: {describe(v, now)}  [items: {fmt_counts(self.board)}]")
        return self.board

    def print(self, renderable) -> None:
        """Show a final block: on the console when live, else as one plain log message."""
        if self.is_live:
            self.console.print(renderable)
        else:
            self.log(render_text(renderable))


@dataclass(frozen=True)
class BestMerge:
    """The best merge of ``metrics/eval.json`` with its 95 % interval."""

    name: str
    mean_normalized: float
    interval: tuple[float, float] | None
    mean_accuracy: float | None


def stage_times(board: Iterable[ItemView]) -> list[tuple[str, int, int, int, float | None]]:
    """Per stage, in plan order: (stage, items ran, skipped, failed, wall seconds of its items)."""
    rows: dict[str, list] = {}
    for v in board:
        r = rows.setdefault(v.stage, [0, 0, 0, None, None])
        if v.state in ("ran", "skipped", "failed"):
            r[("ran", "skipped", "failed").index(v.state)] += 1
        if v.state in ("ran", "failed") and v.started and v.ended:
            r[3] = v.started if r[3] is None else min(r[3], v.started)
            r[4] = v.ended if r[4] is None else max(r[4], v.ended)
    return [
        (s, r[0], r[1], r[2], (r[4] - r[3]) if r[3] is not None else None) for s, r in rows.items()
    ]


def summary_block(
    board: list[ItemView],
    wall_s: float,
    best: BestMerge | None,
    where: dict[str, str],
    status: str = "finished",
):
    """The end-of-run block: wall time per stage, what was up to date, the best merge, and where.

    ``where`` maps a label (dashboard, MLflow run, Prefect flow run) to a path or URL.
    """
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    c = counts(board)
    ran = sum(1 for v in board if v.state == "ran")
    head = (f"mergeflow run {status} in {fmt_duration(wall_s)}: {ran} stage item(s) ran, "
            f"{sum(1 for v in board if v.state == 'skipped')} up to date"
            + (f", {c['failed']} failed" if c["failed"] else "")
            + (f", {c['waiting'] + c['running']} not run" if c["waiting"] + c["running"] else ""))
    t = Table("stage", "ran", "up to date", "failed", "wall time")
    for stage, n_ran, n_skip, n_fail, secs in stage_times(board):
        t.add_row(stage, str(n_ran), str(n_skip), str(n_fail) if n_fail else "",
                  fmt_duration(secs) if secs is not None else "-")
    lines = []
    if best is not None:
        ci = f" [{best.interval[0]:.3f}, {best.interval[1]:.3f}] (95 %)" if best.interval else ""
        acc = f", mean accuracy {best.mean_accuracy:.3f}" if best.mean_accuracy is not None else ""
        lines.append(f"best merge: {best.name} — mean normalized {best.mean_normalized:.3f}{ci}{acc}")
    else:
        lines.append("best merge: none (no metrics/eval.json)")
    lines += [f"{k}: {v}" for k, v in where.items() if v]
    return Group(Text(head), t, *(Text(x) for x in lines))
