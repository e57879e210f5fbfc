from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from mergeflow.config import ConfigError, deep_merge, load_params, parse_params

ROOT = Path(__file__).resolve().parents[2]


def base() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_shipped_params_and_ci_overrides_validate():
    p = load_params(ROOT / "params.yaml")
    assert len(p.tasks) >= 8
    ci = parse_params(deep_merge(base(), yaml.safe_load((ROOT / "configs/ci.yaml").read_text())))
    assert ci.data.n_train < p.data.n_train and len(ci.tasks) < len(p.tasks)


def test_params_are_frozen():
    p = load_params(ROOT / "params.yaml")
    with pytest.raises(ValidationError):
        p.seed = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ({"finetune": {"steps": -1}}, "finetune.steps"),
        ({"finetune": {"steps": "many"}}, "finetune.steps"),
        ({"finetune": {"mode": "qlora"}}, "finetune.mode"),
        ({"finetune": {"lerning_rate": 0.1}}, "finetune.lerning_rate: unknown key"),
        ({"data": {"n_val": 0}}, "data.n_val"),
        ({"masks": {"lambdas": []}}, "masks.lambdas"),
        ({"masks": {"select": "best"}}, "masks.select"),
        ({"coefficients": {"grid": [-0.5]}}, "coefficients.grid"),
        ({"tasks": []}, "tasks"),
        ({"tasks": ["rotten_tomatoes", "rotten_tomatoes"]}, "duplicate"),
        ({"tasks": ["../etc"]}, "'../etc' is not allowed"),
        ({"tasks": ["no_such_task"]}, "unknown task 'no_such_task'"),
        ({"evaluate": {"methods": {"magic": {}}}}, "unknown method 'magic'"),
        ({"evaluate": {"methods": {"ties": {"density": 3}}}}, "evaluate.methods.ties"),
        ({"evaluate": {"methods": {"ties": {"dnsity": 0.2}}}}, "dnsity"),
        ({"evaluate": {"methods": {"ties": {"scaling": 0.2}}}}, "coefficients.grid"),
        ({"base_model": {"max_length": 2}}, "base_model.max_length"),
    ],
)
def test_bad_values_name_the_key(override, needle):
    from mergeflow.methods.params import check_config

    with pytest.raises(ConfigError, match=None) as exc:
        check_config(parse_params(deep_merge(base(), override)))
    assert needle in str(exc.value)


def test_params_alone_do_not_import_the_merge_methods():
    """Stages that never merge must not depend on the methods' code (dvc.yaml deps, issue 18):
    parsing params checks method entries only structurally; the registry check is separate."""
    import subprocess
    import sys

    code = (
        "import sys, yaml; from mergeflow.config import parse_params; "
        "parse_params(yaml.safe_load(open('params.yaml'))); "
        "print('mergeflow.methods' in sys.modules)"
    )
    root = __import__("pathlib").Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr


def test_missing_and_non_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "params.yaml"
    bad.write_text("tasks: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)
    bad.write_text("- just a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_params(bad)
