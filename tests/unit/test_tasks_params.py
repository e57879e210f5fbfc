"""``tasks:`` and ``local_tasks:`` in params.yaml (issue 20, item 1): what is accepted, and the one
line that names the entry and the field of what is not."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from mergeflow.config import ConfigError, load_params, parse_params
from mergeflow.stage import main as stage_main

NLI = {"path": "data/nli.csv", "text": "premise", "text_pair": "hypothesis", "label": "label"}


def test_catalogue_names_and_local_tasks_give_one_ordered_name_list():
    p = parse_params({"tasks": ["fever", "vitaminc_pair"], "local_tasks": {"my_nli": NLI}})
    assert p.tasks == ("fever", "vitaminc_pair", "my_nli")  # every stage after prepare: names
    assert p.local_tasks["my_nli"].text_pair == "hypothesis"
    assert p.local_tasks["my_nli"].label_names is None
    only_local = parse_params({"tasks": [], "local_tasks": {"a": {"path": "a.jsonl"}}})
    assert only_local.tasks == ("a",)
    assert (
        only_local.local_tasks["a"].text == "text" and only_local.local_tasks["a"].label == "label"
    )
    assert parse_params({"tasks": ["fever"]}).local_tasks == {}


def test_the_repo_params_file_keeps_local_tasks_for_dvc():
    """dvc.yaml's prepare_local iterates ``${local_tasks}``: the key must exist (empty is fine)."""
    raw = yaml.safe_load(Path("params.yaml").read_text())
    assert raw["local_tasks"] == {}
    assert load_params("params.yaml").tasks == tuple(raw["tasks"])


@pytest.mark.parametrize(
    ("data", "names"),
    [
        ({"tasks": ["fever", {"name": "x", "path": "a.csv"}]}, ["tasks[1]", "local_tasks"]),
        ({"tasks": "fever"}, ["tasks:", "list"]),
        ({"tasks": ["fever"], "local_tasks": ["x"]}, ["local_tasks:", "mapping"]),
        ({"tasks": ["fever"], "local_tasks": {"x": "a.csv"}}, ["local_tasks.x"]),
        ({"tasks": ["fever"], "local_tasks": {"x": {"text": "t"}}}, ["local_tasks.x.path"]),
        ({"tasks": ["fever"], "local_tasks": {"x": {"path": ""}}}, ["local_tasks.x.path"]),
        ({"tasks": ["fever"], "local_tasks": {"x": NLI | {"txt": "t"}}}, ["local_tasks.x.txt"]),
        ({"tasks": ["fever"], "local_tasks": {"x": NLI | {"label": "premise"}}}, ["local_tasks.x"]),
        (
            {"tasks": ["fever"], "local_tasks": {"x": NLI | {"label_names": ["a"]}}},
            ["local_tasks.x", "label_names"],
        ),
        (
            {"tasks": ["fever"], "local_tasks": {"x": NLI | {"label_names": ["a", "a"]}}},
            ["local_tasks.x", "label_names"],
        ),
        ({"tasks": ["fever"], "local_tasks": {"x": NLI | {"text_pair": 3}}}, ["text_pair"]),
        ({"tasks": ["fever"], "local_tasks": {"x/y": NLI}}, ["local_tasks.x/y", "name"]),
        ({"tasks": ["fever"], "local_tasks": {"fever": NLI}}, ["local_tasks.fever", "tasks"]),
        ({"tasks": ["fever"], "local_tasks": {"vitaminc": NLI}}, ["local_tasks.vitaminc"]),
        ({"tasks": ["nope"], "local_tasks": {"x": NLI}}, ["tasks", "'nope'", "local_tasks"]),
        ({"tasks": [], "local_tasks": {}}, ["tasks", "empty"]),
    ],
)
def test_a_bad_entry_is_one_line_naming_entry_and_field(data: dict, names: list[str]):
    with pytest.raises(ConfigError) as err:
        parse_params(data)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("params.yaml: "), msg
    assert "(root)" not in msg and "Value error" not in msg.split(": ", 2)[1], msg
    for name in names:
        assert name in msg, (name, msg)


def test_poisoning_a_local_task_is_allowed_and_an_unknown_one_is_not():
    ok = {"tasks": ["fever"], "local_tasks": {"x": NLI}}
    parse_params(ok | {"safety": {"enabled": True, "poison": {"task": "x"}}})
    with pytest.raises(ConfigError, match=r"safety\.poison\.task: 'y' is not one of tasks"):
        parse_params(ok | {"safety": {"enabled": True, "poison": {"task": "y"}}})


def _stage_error(tmp_path: Path, monkeypatch, capsys, rows: list[list], **entry) -> str:
    """Run the prepare stage's entry point on a local task; return its one error line."""
    monkeypatch.chdir(tmp_path)
    with open(tmp_path / "nli.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([["premise", "hypothesis", "label"], *rows])
    local = {"path": "nli.csv", "text": "premise", "text_pair": "hypothesis"} | entry
    (tmp_path / "params.yaml").write_text(
        json.dumps({"tasks": [], "local_tasks": {"my_nli": local}})  # JSON is YAML
    )
    with pytest.raises(SystemExit) as exit_:
        stage_main("mergeflow.pipeline.prepare", ["--task", "my_nli", "--out", "out"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: "), err
    assert not (tmp_path / "out").exists()
    return err


@pytest.mark.parametrize(
    ("rows", "entry", "expect"),
    [
        ([["a", "b", "yes"], ["c", "d", ""]], {}, ["local_tasks.my_nli", "row 2", "'label'"]),
        (
            [["a", "b", "yes"], ["c", "d", "maybe"]],
            {"label_names": ["yes", "no"]},
            ["local_tasks.my_nli", "row 2", "'label'", "'maybe'", "label_names"],
        ),
        ([["a", "b", "0"], ["c", "d", "5"]], {"label_names": ["x", "y"]}, ["row 2", "5"]),
        ([["a", "b", "yes"]], {"text_pair": "hyp"}, ["text_pair", "'hyp'", "columns are"]),
        ([["a", "b", "yes"]], {"label": "gold"}, ["local_tasks.my_nli", "label", "'gold'"]),
    ],
)
def test_a_bad_local_file_fails_the_stage_with_entry_column_and_row(
    tmp_path, monkeypatch, capsys, rows, entry, expect
):
    err = _stage_error(tmp_path, monkeypatch, capsys, rows, **entry)
    for part in expect:
        assert part in err, (part, err)


def test_a_missing_local_file_names_the_entry(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(json.dumps({"tasks": [], "local_tasks": {"x": NLI}}))
    with pytest.raises(SystemExit):
        stage_main("mergeflow.pipeline.prepare", ["--task", "x", "--out", "out"])
    err = capsys.readouterr().err.strip()
    assert err == "error: local_tasks.x: data/nli.csv does not exist", err


def test_a_workspace_copy_carries_the_local_task_files(tmp_path: Path):
    """make_workspace (e2e tests, benchmarks) copies a local task's file: it is a stage dep."""
    import subprocess
    import sys

    from mergeflow.workspace import make_workspace

    src, dest = tmp_path / "repo", tmp_path / "ws"
    src.mkdir()
    dest.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=src, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=src, check=True)
    (src / "params.yaml").write_text("tasks: []\nlocal_tasks: {}\n")
    (src / "data" / "nli").mkdir(parents=True)
    (src / "data" / "nli" / "part.jsonl").write_text('{"text": "a", "label": 0}\n')
    (src / "data" / "x.csv").write_text("text,label\na,0\n")
    make_workspace(
        src,
        dest,
        overrides={"local_tasks": {"x": {"path": "data/x.csv"}, "d": {"path": "data/nli"}}},
    )
    assert (dest / "data" / "x.csv").read_text() == "text,label\na,0\n"
    assert (dest / "data" / "nli" / "part.jsonl").is_file()
    assert load_params(dest / "params.yaml").tasks == ("x", "d")
