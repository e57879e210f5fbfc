"""Typed, frozen views of ``params.yaml``: one pydantic model per section.

Every hyperparameter lives in ``params.yaml`` (DVC's params file) and nowhere else. These models
validate it and turn any mistake into one :class:`ConfigError` that names the bad key, the bad
value and what is allowed.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

PACKAGED_MINILM = "packaged:all-minilm-l6-v2"
TASK_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

PositiveInt = Annotated[int, Field(gt=0)]
Probability = Annotated[float, Field(ge=0.0, le=1.0)]


class ConfigError(ValueError):
    """A params file that cannot be used; the message names the key to fix."""


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class BaseModelCfg(_Section):
    """The pre-trained checkpoint every expert starts from."""

    name_or_path: str = PACKAGED_MINILM
    max_length: Annotated[int, Field(ge=8, le=4096)] = 64


class DataCfg(_Section):
    """How many examples each task's seeded splits hold."""

    n_train: PositiveInt = 512
    n_val: PositiveInt = 64
    n_test: PositiveInt = 200


class LoraCfg(_Section):
    """LoRA adapter settings (used when ``finetune.mode`` is ``lora``)."""

    r: PositiveInt = 8
    alpha: Annotated[float, Field(gt=0)] = 16.0
    dropout: Probability = 0.0
    target_modules: tuple[str, ...] = ("query", "key", "value", "dense")


class FinetuneCfg(_Section):
    """Expert fine-tuning: full or LoRA, with a linear-probe head first (LP-FT)."""

    mode: Literal["full", "lora"] = "full"
    steps: PositiveInt = 60
    batch_size: PositiveInt = 16
    lr: Annotated[float, Field(gt=0, lt=1)] = 1e-4
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    warmup_ratio: Probability = 0.1
    head_init: Literal["linear_probe", "random"] = "linear_probe"
    probe_epochs: PositiveInt = 100
    lora: LoraCfg = LoraCfg()


class MasksCfg(_Section):
    """TALL masks (λ_t picked per task on validation) and the consensus mask."""

    lambdas: tuple[Annotated[float, Field(ge=0)], ...] = (0.2, 0.3, 0.4, 0.5, 0.6)
    consensus_k: PositiveInt = 2

    @field_validator("lambdas")
    @classmethod
    def _non_empty(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if not v:
            raise ValueError("needs at least one candidate λ")
        return v


class CoefficientsCfg(_Section):
    """Validation grid search of the scaling coefficient for each merge method."""

    grid: tuple[Annotated[float, Field(ge=0)], ...] = (0.1, 0.2, 0.3, 0.5, 0.7, 1.0)

    @field_validator("grid")
    @classmethod
    def _non_empty(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if not v:
            raise ValueError("needs at least one candidate scaling")
        return v


class EvaluateCfg(_Section):
    """Which merge methods the pipeline compares, with their fixed hyperparameters."""

    methods: dict[str, dict[str, Any]] = Field(
        default_factory=lambda: {
            "task_arithmetic": {},
            "ties": {"density": 0.2},
            "consensus": {"k": 2},
        }
    )
    batch_size: PositiveInt = 64


class Params(_Section):
    """The whole ``params.yaml``."""

    seed: int = 0
    device: str = "cpu"
    tasks: tuple[str, ...]
    base_model: BaseModelCfg = BaseModelCfg()
    data: DataCfg = DataCfg()
    finetune: FinetuneCfg = FinetuneCfg()
    masks: MasksCfg = MasksCfg()
    coefficients: CoefficientsCfg = CoefficientsCfg()
    evaluate: EvaluateCfg = EvaluateCfg()

    @field_validator("tasks")
    @classmethod
    def _valid_tasks(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError("the task list is empty; name at least one task")
        dupes = sorted({t for t in v if v.count(t) > 1})
        if dupes:
            raise ValueError(f"duplicate task(s): {', '.join(dupes)}")
        for t in v:
            if not TASK_NAME_RE.match(t):
                raise ValueError(
                    f"task name {t!r} is not allowed: use letters, digits, '_', '-', '.'"
                )
        return v


def _format_error(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(root)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check spelling; see config.py for allowed keys)"
        value = e.get("input")
        shown = "" if e["type"] in ("missing", "extra_forbidden") else f" (got {value!r})"
        lines.append(f"{source}: {key}: {msg}{shown}")
    return "\n".join(lines)


def parse_params(data: dict[str, Any], source: str = "params.yaml") -> Params:
    """Validate a params mapping.

    Args:
        data: The parsed YAML mapping.
        source: Name used in error messages.

    Returns:
        The frozen :class:`Params`.

    Raises:
        ConfigError: Naming every bad key, its value and what is allowed.
    """
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source}: expected a mapping at the top level, got {type(data).__name__}"
        )
    try:
        params = Params.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_error(err, source)) from None
    _check_known_names(params, source)
    return params


def _check_known_names(params: Params, source: str) -> None:
    from mergeflow import data, methods

    known = set(data.available_tasks(include_optional=True))
    for t in params.tasks:
        if t not in known:
            raise ConfigError(
                f"{source}: tasks: unknown task {t!r}; available: {', '.join(sorted(known))}"
            )
    for name, hp in params.evaluate.methods.items():
        if name not in methods.available():
            raise ConfigError(
                f"{source}: evaluate.methods: unknown method {name!r}; "
                f"available: {', '.join(methods.available())}"
            )
        if not isinstance(hp, dict):
            raise ConfigError(f"{source}: evaluate.methods.{name}: expected a mapping")
        if "scaling" in hp:
            raise ConfigError(
                f"{source}: evaluate.methods.{name}.scaling: the scaling is searched on validation "
                "by the coefficients stage; set coefficients.grid instead"
            )
        try:
            methods.get(name).params_model.model_validate(hp)
        except ValidationError as err:
            raise ConfigError(_format_error(err, f"{source}: evaluate.methods.{name}")) from None


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate a params file.

    Args:
        path: Path to ``params.yaml``.

    Returns:
        The frozen :class:`Params`.

    Raises:
        ConfigError: The file is missing, is not YAML, or holds a bad value.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"params file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"{p}: not valid YAML: {err}") from None
    return parse_params(data, source=str(p))


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Return ``base`` with ``override`` merged in recursively (override wins)."""
    out = dict(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out
