"""Live progress (issue 26): the stage's throttled progress file, the flow's cadence and formatting,
and MLflow metrics that are visible while a loop still runs."""

from __future__ import annotations

import json
import re

import pytest

from mergeflow import progress as pg


class Clock:
    """A hand-driven monotonic clock."""

    def __init__(self, t: float = 100.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_stage_progress_writes_at_most_once_per_interval_and_always_the_last_step(tmp_path):
    """Catches: a write per step (1,000 file replacements per 1,000 steps) and a final step that
    the throttle swallows (the view would stop at 99 %)."""
    clock = Clock()
    p = pg.StageProgress(tmp_path / "x.json", "finetune@t", min_interval_s=1.0, clock=clock)
    p.phase("fine-tune", 1000)
    for step in range(1, 1001):
        clock.t += 0.01  # 100 steps/s for 10 s
        p.update(step, loss=1.0 / step)
    assert 10 <= p.writes <= 13, p.writes  # the phase start, ~one per second, the last step
    state = json.loads((tmp_path / "x.json").read_text())
    assert state["done"] == 1000 and state["fraction"] == 1.0
    assert state["values"]["loss"] == pytest.approx(0.001)
    p = pg.StageProgress(tmp_path / "y.json", "finetune@t", min_interval_s=100.0, clock=clock)
    p.phase("fine-tune", 10)
    for step in range(1, 11):  # all ten steps inside one interval: only the last is written
        clock.t += 0.1
        p.update(step)
    assert p.writes == 2 and json.loads((tmp_path / "y.json").read_text())["done"] == 10


def test_rate_counts_from_the_first_step_and_time_left_follows_it(tmp_path):
    """Catches: set-up time (linear probe, loading) counted into the rate, and a time left that
    does not use the remaining steps."""
    clock = Clock()
    p = pg.StageProgress(tmp_path / "x.json", "finetune@t", min_interval_s=0.0, clock=clock)
    p.phase("fine-tune", 20)
    clock.t += 60.0  # a minute of set-up before step 1
    p.update(1)
    clock.t += 2.0
    p.update(5)
    s = p.state()
    assert s["rate"] == pytest.approx(2.0)  # 4 steps in 2 s, not 5 steps in 62 s
    assert s["eta_s"] == pytest.approx(7.5)  # 15 steps left at 2 steps/s


def test_fraction_gives_each_phase_an_equal_share(tmp_path):
    p = pg.StageProgress(tmp_path / "x.json", "coefficients", phases=3, clock=Clock())
    p.phase("scaling grid", 8, "merge")
    p.update(8)
    p.phase("learn atlas", 10)
    p.update(5)
    assert p.state()["fraction"] == pytest.approx(0.5)  # (1 + 5/10) / 3
    assert p.state()["phase_index"] == 2


def test_without_the_env_var_a_stage_writes_nothing(tmp_path, monkeypatch):
    """A bare `dvc repro`: no progress directory, no file anywhere; with it, the item's file."""
    monkeypatch.delenv(pg.ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    p = pg.stage_progress("finetune@t")
    p.phase("fine-tune", 3)
    p.update(3)
    assert p.path is None and p.writes == 0 and not list(tmp_path.iterdir())
    monkeypatch.setenv(pg.ENV, str(tmp_path))
    p = pg.stage_progress("finetune@t")
    p.phase("fine-tune", 3)
    p.update(3)
    assert json.loads(pg.item_file(tmp_path, "finetune@t").read_text())["done"] == 3


def test_board_reads_states_and_progress_and_ignores_broken_files(tmp_path):
    pg.mark(tmp_path, "prepare@a", "ran", started=10.0, ended=15.0)
    pg.mark(tmp_path, "finetune@a", "running", started=20.0)
    p = pg.StageProgress(pg.item_file(tmp_path, "finetune@a"), "finetune@a", min_interval_s=0,
                         clock=Clock())
    p.phase("fine-tune", 10)
    p.update(4, loss=0.5)
    pg.item_file(tmp_path, "finetune@b", "task").write_text("{not json")  # a torn/odd file
    board = pg.read_board(tmp_path, ["prepare@a", "finetune@a", "finetune@b", "evaluate"])
    assert [v.state for v in board] == ["ran", "running", "waiting", "waiting"]
    assert board[1].fraction == pytest.approx(0.4) and board[0].fraction == 1.0
    assert pg.fmt_counts(board) == "1 done · 1 running · 2 waiting"


def test_describe_a_running_item_says_step_loss_rate_and_time_left():
    view = pg.ItemView(
        "finetune@rotten_tomatoes", "running", started=1000.0,
        progress={"phase": "fine-tune", "phases": 1, "phase_index": 1, "unit": "step", "done": 12,
                  "total": 20, "rate": 0.4, "eta_s": 20.0,
                  "values": {"loss": 0.51234, "val_accuracy": 0.8125}, "fraction": 0.6},
    )
    line = pg.describe(view, now=1095.0)
    assert line == ("fine-tune: step 12/20 (60 %) · loss 0.512 · val acc 0.812 · 2.5 s/step · "
                    "~20 s left · running 1 min 35 s")
    assert pg.describe(pg.ItemView("base", "skipped")) == "up to date, skipped"
    assert pg.describe(pg.ItemView("base", "ran", 10.0, 3730.0)) == "ran in 1 h 02 min"


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(None, "-"), (0.4, "0 s"), (59.4, "59 s"), (61, "1 min 01 s"), (7322, "2 h 02 min")],
)
def test_fmt_duration(seconds, text):
    assert pg.fmt_duration(seconds) == text


def test_cadence_prints_each_tenth_and_every_half_minute_never_each_step():
    """Catches: a line per poll (a flood in a CI log) or none until the end."""
    clock = Clock()
    c = pg.Cadence(every_fraction=0.1, every_s=30.0, clock=clock)
    due = []
    for step in range(1, 1001):  # 1,000 steps polled each second, 3 steps/s
        clock.t += 1 / 3
        if c.due("finetune@a", step / 1000):
            due.append(step)
    assert len(due) <= 10 + 333 // 30 + 1, due  # tenths plus half-minute heartbeats
    assert [d for d in due if d % 100 == 0] == [100 * k for k in range(1, 11)]
    assert c.due("evaluate", None)  # an item without steps: a first line ...
    clock.t += 29.0
    assert not c.due("evaluate", None)
    clock.t += 1.0
    assert c.due("evaluate", None)  # ... then one per 30 s


def test_monitor_prints_increasing_steps_of_a_running_item_in_a_log(tmp_path):
    clock = Clock()
    lines: list[str] = []
    names = ["prepare@a", "finetune@a"]
    pg.mark(tmp_path, "prepare@a", "skipped", started=1.0, ended=2.0)
    pg.mark(tmp_path, "finetune@a", "running", started=3.0)
    p = pg.StageProgress(pg.item_file(tmp_path, "finetune@a"), "finetune@a", min_interval_s=0,
                         clock=clock)
    p.phase("fine-tune", 40)
    mon = pg.Monitor(tmp_path, names, log=lines.append, live=False,
                     cadence=pg.Cadence(clock=clock))
    with mon:
        for step in range(1, 41):
            clock.t += 0.5
            p.update(step, loss=1 / step)
            mon.tick()
    steps = [int(m.group(1)) for m in (re.search(r"step (\d+)/40", x) for x in lines) if m]
    assert len(steps) >= 5 and steps == sorted(steps) and steps[-1] == 40, lines
    assert len(lines) <= 12, lines
    assert "1 done · 1 running · 0 waiting" in lines[-1]


def test_live_table_shows_running_items_with_their_progress():
    from rich.console import Console

    board = [
        pg.ItemView("prepare@a", "ran", 1.0, 2.0),
        pg.ItemView("finetune@a", "running", 3.0, progress={
            "phase": "fine-tune", "done": 3, "total": 6, "unit": "step", "fraction": 0.5,
            "values": {"loss": 0.7}, "rate": 2.0, "eta_s": 1.5}),
        pg.ItemView("evaluate"),
    ]
    console = Console(width=140, record=True, force_terminal=True)
    console.print(pg.board_table(board, now=10.0))
    text = console.export_text()
    assert "1 done · 1 running · 1 waiting" in text
    assert "finetune@a" in text and "step 3/6 (50 %)" in text and "loss 0.700" in text
    assert "prepare@a" not in text  # finished items are counted, not listed


def test_summary_block_has_stage_wall_times_skips_best_merge_and_where():
    board = [
        pg.ItemView("prepare@a", "skipped", 0.0, 1.0),
        pg.ItemView("finetune@a", "ran", 10.0, 70.0),
        pg.ItemView("finetune@b", "ran", 12.0, 130.0),
        pg.ItemView("evaluate", "ran", 131.0, 140.0),
    ]
    best = pg.BestMerge("ties", 0.91234, (0.874, 0.949), 0.8)
    text = pg.render_text(pg.summary_block(
        board, 141.0, best, {"dashboard": "/ws/reports/index.html", "MLflow run": "http://m/r/1"}
    ))
    assert "mergeflow run finished in 2 min 21 s: 3 stage item(s) ran, 1 up to date" in text
    assert re.search(r"finetune\s*│\s*2\s*│\s*0\s*│\s*│\s*2 min 00 s", text), text
    assert re.search(r"prepare\s*│\s*0\s*│\s*1\s*│\s*│\s*-", text), text
    assert "best merge: ties — mean normalized 0.912 [0.874, 0.949] (95 %)" in text
    assert "dashboard: /ws/reports/index.html" in text and "MLflow run: http://m/r/1" in text


def test_metric_stream_is_visible_in_mlflow_before_the_run_ends(tmp_path, monkeypatch):
    """Catches: per-step metrics sent only when training ends (the MLflow chart stays flat), and
    a request per step (the stream batches by interval)."""
    from mlflow import MlflowClient

    from mergeflow import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MERGEFLOW_TRACKING", "on")
    monkeypatch.delenv(tracking.PARENT_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    clock = Clock()
    with tracking.stage_run("finetune@t", {"seed": 0}) as tr:
        stream = tracking.MetricStream(
            tr._mlflow.MlflowClient(), tr.run_id, interval_s=5.0, clock=clock
        )
        reader = MlflowClient(tracking_uri=uri)
        for step in range(8):
            clock.t += 1.0
            stream.log({"train_loss": 1.0 / (step + 1)}, step=step)
        seen = [m.step for m in reader.get_metric_history(tr.run_id, "train_loss")]
        assert seen == list(range(5)), seen  # sent after 5 s, while the run is still open
        assert stream.batches == 1
        stream.log({"val_accuracy_during_training": 0.75}, step=10)
        stream.flush()
        assert len(reader.get_metric_history(tr.run_id, "train_loss")) == 8
        assert reader.get_run(tr.run_id).info.status == "RUNNING"


def test_live_view_renders_on_a_terminal_and_prefect_logs_print_above_it():
    """Catches: the live table drawn on Prefect's own console, whose theme lacks rich's table
    styles (the first live run died with MissingStyle 'table.header'), and Prefect log lines
    written past the live view instead of through its console."""
    import io
    import logging

    from prefect.logging.configuration import setup_logging

    from flows.pipeline import _console, _logs_above, _prefect_console_handler

    setup_logging()
    console = _console()
    buf = io.StringIO()
    console.file = buf
    console._force_terminal = True
    board = [pg.ItemView("finetune@a", "running", 1.0, progress={
        "phase": "fine-tune", "done": 2, "total": 4, "unit": "step", "fraction": 0.5,
        "values": {"loss": 0.3}})]
    console.print(pg.board_table(board, now=5.0))
    assert "finetune@a" in buf.getvalue() and "step 2/4 (50 %)" in buf.getvalue()
    handler = _prefect_console_handler()
    before = handler.console
    with _logs_above(console, live=True):
        assert handler.console is console
        logging.getLogger("prefect.test").warning("a log line while the view is up")
    assert handler.console is before
    assert "a log line while the view is up" in buf.getvalue()
