"""YAML and params under hostile and careless input (issue 22), one row each.

Every row ends in ONE ``error:`` line naming the file (or option), the line and the key to fix,
exit status 2 for CLI rows or the specific exception for library rows, and no traceback. The
alias-bomb rows also prove the refusal is cheap: well under a second and a few MB, whatever the
aliases would expand to. ``docs/reliability.md`` ("YAML and params (issue 22)") lists these rows
with the messages they give.
"""

from __future__ import annotations

import shutil
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from mergeflow.config import ConfigError
from mergeflow.tensors import MergeError

ROOT = Path(__file__).resolve().parents[2]

PARAMS = "tasks: [rotten_tomatoes]\nfinetune:\n  steps: 3\n  lr: 1.0e-4\n"


def _bomb(indent: str) -> str:
    """A "billion laughs" block: 10**9 values once every alias is expanded, 10 lines of text."""
    lines = [f"{indent}l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for i in range(1, 10):
        refs = ", ".join([f"*l{i - 1}"] * 10)
        lines.append(f"{indent}l{i}: &l{i} [{refs}]")
    return "\n".join(lines) + "\n"


BOMB_PARAMS = PARAMS + "evaluate:\n  methods:\n    ties:\n" + _bomb("      ")
RECIPE = "method: ties\nbase: ./base\nexperts: {a: ./a}\nout: ./merged\n"
BOMB_RECIPE_PARAMS = RECIPE + "params:\n" + _bomb("  ")
BOMB_RECIPE_STORAGE = RECIPE + "storage_options:\n" + _bomb("  ")


@dataclass
class Row:
    id: str
    kind: str  # "cli": setup returns CLI args; "call": setup returns a callable raising `exc`
    setup: Callable[[Path], Any]
    expect: str
    exc: type[BaseException] | None = None
    cheap: bool = False  # also assert: < 0.5 s and < 8 MB allocated
    marks: list[Any] = field(default_factory=list)


def _write(tmp: Path, name: str, text: str | bytes) -> Path:
    p = tmp / name
    if isinstance(text, bytes):
        p.write_bytes(text)
    else:
        p.write_text(text)
    return p


def _check(tmp: Path, text: str | bytes) -> list[str]:
    return ["check-params", str(_write(tmp, "params.yaml", text))]


def _finetune(tmp: Path, line: str) -> list[str]:
    return _check(tmp, f"tasks: [rotten_tomatoes]\nfinetune:\n  {line}\n")


def _load_params(tmp: Path, text: str) -> Callable[[], Any]:
    from mergeflow.config import load_params

    p = _write(tmp, "params.yaml", text)
    return lambda: load_params(p)


def _load_recipe(tmp: Path, text: str) -> Callable[[], Any]:
    from mergeflow.engine.recipe import load_recipe

    p = _write(tmp, "recipe.yaml", text)
    return lambda: load_recipe(p)


def _merge(tmp: Path, text: str) -> list[str]:
    return ["merge", "--recipe", str(_write(tmp, "recipe.yaml", text))]


def _profile(tmp: Path, text: str) -> list[str]:
    params = _write(tmp, "params.yaml", PARAMS)
    return ["use-profile", str(_write(tmp, "profile.yaml", text)), "--params", str(params)]


def _set(tmp: Path, value: str) -> list[str]:
    return [
        "merge",
        "--method",
        "ties",
        "--base",
        str(tmp / "base"),
        "--out",
        str(tmp / "merged"),
        "--set",
        value,
    ]


def _load_value(text: str) -> Callable[[], Any]:
    from mergeflow.yamlio import load_yaml

    return lambda: load_yaml(text, "--set density")


def _yaml_error() -> type[BaseException]:
    from mergeflow.yamlio import YAMLInputError

    return YAMLInputError


ROWS = [
    # alias bombs ("billion laughs"): refused on the node graph before anything is built
    Row(
        "params-alias-bomb",
        "call",
        lambda t: _load_params(t, BOMB_PARAMS),
        "params.yaml:12: aliases expand to more than 100000 values",
        ConfigError,
        cheap=True,
    ),
    Row(
        "params-alias-bomb-cli",
        "cli",
        lambda t: _check(t, BOMB_PARAMS),
        "params.yaml:12: aliases expand to more than 100000 values",
    ),
    Row(
        "recipe-params-alias-bomb",
        "call",
        lambda t: _load_recipe(t, BOMB_RECIPE_PARAMS),
        "recipe.yaml:10: aliases expand to more than 100000 values",
        MergeError,
        cheap=True,
    ),
    Row(
        "recipe-storage-options-alias-bomb",
        "call",
        lambda t: _load_recipe(t, BOMB_RECIPE_STORAGE),
        "recipe.yaml:10: aliases expand to more than 100000 values",
        MergeError,
        cheap=True,
    ),
    Row(
        "recipe-alias-bomb-cli",
        "cli",
        lambda t: _merge(t, BOMB_RECIPE_PARAMS),
        "recipe.yaml:10: aliases expand to more than 100000 values",
    ),
    Row(
        "params-recursive-alias",
        "cli",
        lambda t: _check(t, "tasks: &t [rotten_tomatoes, *t]\n"),
        "params.yaml:1: an alias refers to its own anchor",
    ),
    Row(
        "params-deep-nesting",
        "cli",
        lambda t: _check(t, "tasks: " + "[" * 5000 + "]" * 5000),
        "params.yaml:1: nested more than 100 levels deep",
    ),
    # duplicate keys: YAML forbids them; PyYAML silently kept the last
    Row(
        "params-duplicate-section",
        "cli",
        lambda t: _check(t, PARAMS + "data:\n  n_train: 8\nfinetune:\n  steps: 5\n"),
        "params.yaml:7: duplicate key 'finetune' (first at line 2)",
    ),
    Row(
        "params-duplicate-nested-key",
        "cli",
        lambda t: _finetune(t, "steps: 3\n  steps: 4"),
        "params.yaml:4: duplicate key 'steps' (first at line 3)",
    ),
    Row(
        "recipe-duplicate-key",
        "cli",
        lambda t: _merge(t, RECIPE + "method: dare\n"),
        "recipe.yaml:5: duplicate key 'method' (first at line 1)",
    ),
    Row(
        "profile-duplicate-key",
        "cli",
        lambda t: _profile(t, "finetune:\n  steps: 5\nfinetune:\n  steps: 6\n"),
        "profile.yaml:3: duplicate key 'finetune' (first at line 1)",
    ),
    # tags that build objects
    Row(
        "params-python-tag",
        "cli",
        lambda t: _check(t, PARAMS + "seed: !!python/object/apply:os.system ['echo pwned']\n"),
        "params.yaml:5: tag !!python/object/apply:os.system is not allowed",
    ),
    Row(
        "recipe-python-tag",
        "cli",
        lambda t: _merge(t, RECIPE + "params: {density: !!python/name:os.getcwd ''}\n"),
        "recipe.yaml:5: tag !!python/name:os.getcwd is not allowed",
    ),
    Row(
        "params-not-utf8",
        "cli",
        lambda t: _check(t, b"tasks: [rotten_tomatoes]\nseed: \xff\n"),
        "params.yaml:2: not UTF-8 text (byte 0xff); save it as UTF-8",
    ),
    # use-profile
    Row(
        "profile-is-a-list",
        "cli",
        lambda t: _profile(t, "- finetune\n- data\n"),
        "profile.yaml: expected a mapping of params.yaml sections at the top level, got a list",
    ),
    Row(
        "profile-python-tag",
        "cli",
        lambda t: _profile(t, "finetune: !!python/object:os.system {}\n"),
        "profile.yaml:1: tag !!python/object:os.system is not allowed",
    ),
    # values accepted though wrong
    Row(
        "params-steps-true",
        "cli",
        lambda t: _finetune(t, "steps: true"),
        "finetune.steps: Input should be a valid integer (got True)",
    ),
    Row(
        "params-grid-inf",
        "cli",
        lambda t: _check(t, PARAMS + "coefficients:\n  grid: [0.3, .inf]\n"),
        "coefficients.grid.1: Input should be a finite number (got inf)",
    ),
    Row(
        "params-weight-decay-inf",
        "cli",
        lambda t: _finetune(t, "weight_decay: .inf"),
        "finetune.weight_decay: Input should be a finite number (got inf)",
    ),
    Row(
        "params-lr-nan",
        "cli",
        lambda t: _finetune(t, "lr: .nan"),
        "finetune.lr: Input should be a finite number (got nan)",
    ),
    Row(
        "params-device-banana",
        "cli",
        lambda t: _check(t, PARAMS + "device: banana\n"),
        "device: Value error, unknown device 'banana'; use cpu, cuda, cuda:N or mps",
    ),
    Row(
        "params-seed-negative",
        "cli",
        lambda t: _check(t, PARAMS + "seed: -1\n"),
        "seed: Input should be greater than or equal to 0 (got -1)",
    ),
    Row(
        "params-lr-quoted",
        "cli",
        lambda t: _finetune(t, "lr: '1e-4'"),
        "finetune.lr: Input should be a valid number (got '1e-4')",
    ),
    # --set values (the loader; the CLI rows wait for engine/cli.py to call it)
    Row(
        "set-unclosed-list",
        "call",
        lambda t: _load_value("[1,"),
        "--set density:1:4: not valid YAML",
        exc=None,
    ),
    Row(
        "set-python-tag",
        "call",
        lambda t: _load_value("!!python/object/apply:os.system ['echo pwned']"),
        "--set density:1: tag !!python/object/apply:os.system is not allowed",
        exc=None,
    ),
    Row(
        "set-unclosed-list-cli",
        "cli",
        lambda t: _set(t, "density=[1,"),
        "--set density:1:4: not valid YAML",
    ),
    Row(
        "set-python-tag-cli",
        "cli",
        lambda t: _set(t, "density=!!python/object/apply:os.system ['echo pwned']"),
        "--set density:1: tag !!python/object/apply:os.system is not allowed",
    ),
]


def _one_message(text: str, expect: str) -> None:
    flat = " ".join(text.split())
    assert expect in flat, f"expected {expect!r} in:\n{text}"
    assert flat.count("error:") == 1, f"expected one error line:\n{text}"
    assert "Traceback" not in text, text


def test_row_ids_are_unique():
    assert len({r.id for r in ROWS}) == len(ROWS)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("row", [pytest.param(r, id=r.id, marks=r.marks) for r in ROWS])
def test_yaml_and_params(row: Row, tmp_path, monkeypatch):
    monkeypatch.setenv("MERGEFLOW_TRACKING", "off")
    monkeypatch.setenv("COLUMNS", "400")
    monkeypatch.chdir(tmp_path)
    made = row.setup(tmp_path)
    if row.kind == "cli":
        from mergeflow.cli import app

        res = CliRunner().invoke(app, made)
        assert res.exit_code == 2, (res.exit_code, res.output, res.exception)
        _one_message(res.output, row.expect)
        return
    exc = row.exc or _yaml_error()
    cpu = time.process_time()  # CPU seconds: wall time says little on a busy 2-core machine
    with pytest.raises(exc) as err:
        made()
    cpu = time.process_time() - cpu
    _one_message(f"error: {err.value}", row.expect)
    if row.cheap:
        tracemalloc.start()
        try:
            with pytest.raises(exc):
                made()
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert cpu < 0.5, f"took {cpu:.2f} s of CPU"
        assert peak < 8e6, f"allocated {peak / 1e6:.1f} MB"


# ------------------------------------------------------------------------------ use-profile


def _use_profile(tmp_path: Path, profile: Path) -> tuple[Any, Path, str]:
    from mergeflow.cli import app

    params = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params)
    res = CliRunner().invoke(app, ["use-profile", str(profile), "--params", str(params)])
    return res, params, (ROOT / "params.yaml").read_text()


def test_use_profile_keeps_comments_and_layout(tmp_path, monkeypatch):
    from mergeflow.config import deep_merge, load_params, parse_params
    from mergeflow.yamlio import load_yaml_file

    monkeypatch.setenv("COLUMNS", "400")
    res, params, before = _use_profile(tmp_path, ROOT / "configs" / "ci.yaml")
    assert res.exit_code == 0, res.output
    after = params.read_text()
    comments = [line.split("#", 1)[1] for line in before.splitlines() if "#" in line]
    assert comments and all(c in after for c in comments), "a comment was dropped"
    # what the profile does not change stays byte for byte, hand-wrapped flow mappings included
    for kept in (
        "base_model:\n  name_or_path: packaged:all-minilm-l6-v2   # or a local HF dir",
        "    ties: {density: 0.2}\n    consensus: {k: 2}",
        "  - bbc_news\nlocal_tasks: {}        # your own data",
    ):
        assert kept in after, kept
    assert "  n_train: 256\n" in after and "  grid: [0.3, 1.0]" in after
    want = deep_merge(
        load_yaml_file(ROOT / "params.yaml"), load_yaml_file(ROOT / "configs/ci.yaml")
    )
    assert load_params(params) == parse_params(want)
    assert (tmp_path / "params.yaml.bak").read_text() == before
    assert "data.n_train" in " ".join(res.output.split())


def test_use_profile_without_changes_leaves_the_file_alone(tmp_path):
    profile = _write(tmp_path, "same.yaml", "finetune:\n  steps: 60\n")
    res, params, before = _use_profile(tmp_path, profile)
    assert res.exit_code == 0, res.output
    assert params.read_text() == before
    assert not (tmp_path / "params.yaml.bak").exists()
