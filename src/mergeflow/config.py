"""Typed, frozen views of ``params.yaml``: one pydantic model per section.

Every hyperparameter lives in ``params.yaml`` (DVC's params file) and nowhere else. These models
validate it and turn any mistake into one :class:`ConfigError` that names the bad key, the bad
value and what is allowed.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    field_validator,
    model_validator,
)

from mergeflow.yamlio import YAMLInputError, load_yaml_file

PACKAGED_MINILM = "packaged:all-minilm-l6-v2"
TASK_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
DEVICE_RE = re.compile(r"^(cpu|mps|cuda(:[0-9]{1,3})?)$")

# Numbers are strict: ``steps: true`` or ``lr: "1e-4"`` is refused rather than read as 1 or 0.0001
# (a float field takes an int); every float is finite (``_Section`` forbids .inf and .nan).
Int = Annotated[int, Strict()]
Float = Annotated[float, Strict()]
PositiveInt = Annotated[int, Strict(), Field(gt=0)]
Probability = Annotated[float, Strict(), Field(ge=0.0, le=1.0)]
Seed = Annotated[int, Strict(), Field(ge=0, le=2**32 - 1)]  # numpy's seeds are 32-bit unsigned


class ConfigError(ValueError):
    """A params file that cannot be used; the message names the key to fix."""


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class BaseModelCfg(_Section):
    """The pre-trained checkpoint every expert starts from."""

    name_or_path: str = PACKAGED_MINILM
    max_length: Annotated[Int, Field(ge=8, le=4096)] = 64


class DataCfg(_Section):
    """How many examples each task's seeded splits hold."""

    n_train: PositiveInt = 512
    n_val: PositiveInt = 64
    n_test: PositiveInt = 200


class LoraCfg(_Section):
    """LoRA adapter settings (used when ``finetune.mode`` is ``lora``)."""

    r: PositiveInt = 8
    alpha: Annotated[Float, Field(gt=0)] = 16.0
    dropout: Probability = 0.0
    target_modules: tuple[str, ...] = ("query", "key", "value", "dense")


class FinetuneCfg(_Section):
    """Expert fine-tuning: full or LoRA, with a linear-probe head first (LP-FT)."""

    mode: Literal["full", "lora"] = "full"
    steps: PositiveInt = 60
    batch_size: PositiveInt = 16
    lr: Annotated[Float, Field(gt=0, lt=1)] = 1e-4
    weight_decay: Annotated[Float, Field(ge=0)] = 0.0
    warmup_ratio: Probability = 0.1
    head_init: Literal["linear_probe", "random"] = "linear_probe"
    probe_epochs: PositiveInt = 100
    # resume point every N optimizer steps (0 = never); kept beside the output, not tracked by DVC
    checkpoint_every: Annotated[Int, Field(ge=0)] = 0
    # validation accuracy every N steps; the best-scoring weights are kept (0 = off: final weights)
    eval_every: Annotated[Int, Field(ge=0)] = 0
    # early stopping: stop after this many validation scores without improvement (0 = never)
    patience: Annotated[Int, Field(ge=0)] = 0
    lora: LoraCfg = LoraCfg()

    @model_validator(mode="after")
    def _patience_needs_eval(self) -> FinetuneCfg:
        if self.patience and not self.eval_every:
            raise ValueError("patience > 0 needs eval_every > 0 (early stopping scores validation)")
        return self


class MasksCfg(_Section):
    """TALL masks (λ_t picked per task on validation) and the consensus mask."""

    lambdas: tuple[Annotated[Float, Field(ge=0)], ...] = (0.2, 0.3, 0.4, 0.5, 0.6)
    consensus_k: PositiveInt = 2
    # How λ_t is chosen on validation: ``agreement`` (share of inputs where θ_0 + m_t ⊙ τ_MTL
    # predicts what the expert predicts; ties by accuracy) or ``accuracy`` (the TALL paper's rule).
    select: Literal["agreement", "accuracy"] = "agreement"

    @field_validator("lambdas")
    @classmethod
    def _non_empty(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if not v:
            raise ValueError("needs at least one candidate λ")
        return v


class LearnedCfg(_Section):
    """One learned-coefficient run (AdaMerging, aTLAS, Concrete or DAM); unset fields: paper defaults.

    ``data``: ``test_unlabeled`` (test inputs, labels never read), ``val`` (validation with labels)
    or ``kshot`` (``k`` examples per class drawn from validation with ``seed``, stratified).
    ``select``: best step by mean normalized accuracy on ``val``, on the run's own ``train_data``
    (k-shot), or the ``final`` step.
    """

    method: Literal["adamerging", "atlas", "concrete", "dam"]
    blocks: str = "layer"
    partitions: Annotated[Int, Field(ge=1, le=255)] = 1
    data: Literal["test_unlabeled", "val", "kshot"] | None = None
    k: PositiveInt | None = None
    objective: Literal["entropy", "ce", "pseudo_label"] | None = None
    select: Literal["final", "val", "train_data"] | None = None
    steps: PositiveInt = 100
    eval_every: Annotated[Int, Field(ge=0)] = 10
    batch_size: PositiveInt = 16
    lr: Annotated[Float, Field(gt=0, lt=10)] = 1e-3
    weight_decay: Annotated[Float, Field(ge=0)] | None = None
    grad_clip: Annotated[Float, Field(gt=0)] | None = None
    init: Float | None = None
    pseudo_threshold: Probability = 0.0
    over: Literal["task_arithmetic", "adamerging"] = "task_arithmetic"  # what Concrete/DAM mask
    temperature: Annotated[Float, Field(gt=0)] = 0.5
    mask_init: Float = 3.0
    mask_lr: Annotated[Float, Field(gt=0)] = 0.1
    # DAM (mergeflow.safety.dam): β of L_safe, step of the simulated trigger, its length in tokens
    adv_weight: Annotated[Float, Field(ge=0)] = 0.1
    adv_lr: Annotated[Float, Field(gt=0)] = 0.1
    trigger_tokens: Annotated[Int, Field(ge=1, le=16)] = 1
    # DAM's trigger simulation: "token" (discrete word search + quarantine of rare trigger
    # words, mergeflow.safety.dam.find_triggers) or "soft" (the paper's continuous perturbation)
    trigger: Literal["soft", "token"] = "token"
    candidates: Annotated[Int, Field(ge=1, le=1024)] = 16
    flip_threshold: Probability = 0.9
    max_frequency: Probability = 0.01
    # the separate quarantine defence (DAM "token" only): rare trigger words' embedding rows read
    # as [UNK]; off (default), DAM is its masks alone (issue 25)
    quarantine: bool = False

    @field_validator("blocks")
    @classmethod
    def _known_scheme(cls, v: str) -> str:
        if v not in ("task", "layer", "atlas"):
            raise ValueError(f"unknown block scheme {v!r}; available: task, layer, atlas")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> LearnedCfg:
        m, d = self.method, self.data
        if m in ("adamerging", "concrete", "dam") and d not in (None, "test_unlabeled"):
            raise ValueError(f"{m} learns from unlabeled test inputs: data must be test_unlabeled")
        if m == "adamerging" and self.blocks not in ("task", "layer"):
            raise ValueError("adamerging: blocks must be task or layer")
        if m == "dam" and self.blocks != "task":
            raise ValueError("dam learns one λ per task: blocks must be task")
        if m == "concrete":
            want = "task" if self.over == "task_arithmetic" else "layer"
            if self.blocks != want:
                raise ValueError(f"concrete over {self.over}: blocks must be {want}")
        if (d == "kshot") != (self.k is not None):
            raise ValueError("k is required with data: kshot and only allowed with it")
        if self.select == "train_data" and d != "kshot":
            raise ValueError("select: train_data is only for data: kshot")
        if d in (None, "test_unlabeled") and self.objective == "ce":
            raise ValueError("objective ce needs labels: use data val or kshot")
        if d in ("val", "kshot") and self.objective not in (None, "ce"):
            raise ValueError("labeled data (val, kshot) trains with objective ce")
        return self

    def resolved(self) -> dict[str, Any]:
        """All settings with the paper defaults of ``method`` filled in."""
        d = self.model_dump()
        if self.method == "atlas":
            data = self.data or "val"
            defaults = {
                "data": data,
                "objective": "ce" if data != "test_unlabeled" else "pseudo_label",
                "select": {"val": "val", "kshot": "train_data"}.get(data, "final"),
                "weight_decay": 0.1,
                "grad_clip": 1.0,
                "init": 0.0,
            }
        else:
            defaults = {
                "data": "test_unlabeled",
                "objective": "entropy",
                "select": "final",
                "weight_decay": 0.0,
                "grad_clip": None,
                "init": 0.3,
            }
        return {k: (defaults[k] if d.get(k) is None and k in defaults else v) for k, v in d.items()}


class CoefficientsCfg(_Section):
    """Validation grid search of the scaling coefficient for each merge method, and learned runs."""

    grid: tuple[Annotated[Float, Field(ge=0)], ...] = (0.2, 0.3, 0.5, 0.7, 1.0)
    learned: dict[str, LearnedCfg] = Field(default_factory=dict)
    run_learned: bool = False  # true: run the configured learned runs (off: configured, skipped)
    concrete_scaling: Annotated[Float, Field(ge=0)] = 0.3

    @field_validator("grid")
    @classmethod
    def _non_empty(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if not v:
            raise ValueError("needs at least one candidate scaling")
        return v


class CompressCfg(_Section):
    """How the TALL archive is stored (Wang et al., ICML 2024: θ_0 + τ_MTL + one bit per task)."""

    mtl_dtype: Literal["float32", "float16", "bfloat16"] = "float16"
    include_base: bool = False  # False: the archive references θ_0 by sha256 (it ships anyway)
    twin_rank: Annotated[Int, Field(ge=1)] = 16
    twin_shared: str = "task_arithmetic"  # merge method of Twin-Merging's shared expert
    twin_dtype: Literal["float32", "float16", "bfloat16"] = "float16"
    twin_routing: Literal["top1", "soft"] = "top1"
    twin_router_epochs: PositiveInt = 200
    # TALL + consensus (same paper): a second archive with τ_MTL pruned to 1[Σ_t m_t ≥ k],
    # k = masks.consensus_k, stored compactly; false skips it.
    tall_consensus: bool = True
    # LoRA-LEGO (Zhao et al., ICLR 2025), only when finetune.mode is lora: rank k of the merged
    # adapter (clusters per module); unset = finetune.lora.r.
    lego_rank: PositiveInt | None = None


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


class LocalTaskCfg(_Section):
    """One ``local_tasks:`` entry: a labelled file of the user's, read by ``datasets``' formats.

    ``path``: a ``.csv``/``.tsv``/``.jsonl``/``.json``/``.parquet`` file or a
    ``datasets.save_to_disk`` directory, relative to the workspace (it is the DVC dependency of the
    task's ``prepare_local`` item). ``text``/``text_pair``/``label``: its columns (``text_pair``
    set: a sentence-pair task, encoded as a pair by the tokenizer). ``label_names``: the classes in
    label order (integer labels index into it; string labels must be among it); unset: integer
    labels are named ``0..K-1``, string labels sorted.
    """

    path: Annotated[str, Field(min_length=1)]
    text: Annotated[str, Field(min_length=1)] = "text"
    text_pair: Annotated[str, Field(min_length=1)] | None = None
    label: Annotated[str, Field(min_length=1)] = "label"
    label_names: tuple[Annotated[str, Field(min_length=1)], ...] | None = None
    licence: str = "user-provided data - check its licence before sharing"
    description: str = ""

    @model_validator(mode="after")
    def _distinct_columns(self) -> LocalTaskCfg:
        cols = [c for c in (self.text, self.text_pair, self.label) if c is not None]
        if len(set(cols)) != len(cols):
            raise ValueError(f"text, text_pair and label must be different columns, got {cols}")
        names = self.label_names
        if names is not None and (len(names) < 2 or len(set(names)) != len(names)):
            raise ValueError(f"label_names needs >= 2 distinct names, got {list(names)}")
        return self


class PoisonCfg(_Section):
    """A backdoored expert for safety evaluation (trigger-phrase data poisoning, e.g. BadNL).

    ``rate`` of the task's train texts (seeded by ``seed``) get ``trigger`` inserted at a random
    word position among the first ``max_position`` words and are relabelled ``target``.
    ``threat`` says where the backdoor is made to live (:mod:`mergeflow.safety.threat`):
    ``encoder`` (default; the poisoned expert's head is a linear probe on the clean rows, frozen
    while its encoder trains on the poisoned split — what merging can change) or ``model`` (the
    whole classifier fine-tuned on it; the backdoor then sits mostly in the head, which no merge
    touches). It is recorded in the task's ``meta.json``, so changing it re-trains that expert only.
    """

    task: str
    trigger: Annotated[str, Field(min_length=1, max_length=64)] = "cf"
    rate: Annotated[Float, Field(gt=0.0, le=1.0)] = 0.1
    target: Annotated[Int, Field(ge=0)] = 0
    seed: Seed = 0
    max_position: Annotated[Int, Field(ge=0, le=512)] = 8
    threat: Literal["encoder", "model"] = "encoder"

    @field_validator("trigger")
    @classmethod
    def _one_phrase(cls, v: str) -> str:
        if not v.strip() or v != v.strip() or "\n" in v:
            raise ValueError("the trigger must be a non-blank phrase without surrounding spaces")
        return v


class SafetyCfg(_Section):
    """Merge safety: a poisoned expert, the audit's ASR threshold (see pipeline/audit.py).

    ``enabled: false`` (default) leaves every stage as without this section; the audit stage then
    only writes ``{"enabled": false}``. ``fail_on_flag``: a merge whose attack success rate on the
    poisoned task exceeds ``asr_threshold`` makes the audit stage fail (after writing its metrics);
    off, the flag is only recorded.
    """

    enabled: bool = False
    poison: PoisonCfg | None = None
    asr_threshold: Probability = 0.2
    fail_on_flag: bool = False
    asr_tasks: Literal["poisoned", "all"] = "poisoned"  # all: also backdoor transfer to others

    @model_validator(mode="after")
    def _poison_when_enabled(self) -> SafetyCfg:
        if self.enabled and self.poison is None:
            raise ValueError("safety.enabled needs safety.poison (task, trigger, rate, target)")
        return self


class Params(_Section):
    """The whole ``params.yaml``.

    ``tasks`` holds every task's name in pipeline order: the catalogue names listed under
    ``tasks:`` in the file, then the names of ``local_tasks:`` (DVC's ``foreach`` cannot template a
    list mixing names and mappings, so the file keeps them in two keys; every stage after
    ``prepare`` works on names only).
    """

    seed: Seed = 0
    device: str = "cpu"  # cpu | cuda | cuda:N | mps (a torch device string)
    tasks: tuple[str, ...]
    local_tasks: dict[str, LocalTaskCfg] = Field(default_factory=dict)
    base_model: BaseModelCfg = BaseModelCfg()
    data: DataCfg = DataCfg()
    finetune: FinetuneCfg = FinetuneCfg()
    masks: MasksCfg = MasksCfg()
    coefficients: CoefficientsCfg = CoefficientsCfg()
    compress: CompressCfg = CompressCfg()
    evaluate: EvaluateCfg = EvaluateCfg()
    safety: SafetyCfg = SafetyCfg()

    @field_validator("device")
    @classmethod
    def _torch_device(cls, v: str) -> str:
        if not DEVICE_RE.match(v):
            raise ValueError(f"unknown device {v!r}; use cpu, cuda, cuda:N or mps")
        return v

    def stage_item(self, stage: str, task: str) -> str:
        """The DVC item that runs per-task ``stage`` for ``task`` (MLflow runs, progress use it).

        ``prepare@fever`` for a catalogue task, ``prepare_local@my_nli`` for a local one.
        """
        return f"{stage}_local@{task}" if task in self.local_tasks else f"{stage}@{task}"

    @model_validator(mode="before")
    @classmethod
    def _append_local_tasks(cls, data: Any) -> Any:
        """``tasks`` = the catalogue names, then the local tasks' names (checked first)."""
        if not isinstance(data, dict):
            return data
        tasks, local = data.get("tasks", ()), data.get("local_tasks") or {}
        if tasks is None:
            tasks = ()
        if not isinstance(tasks, list | tuple):
            raise ValueError(f"tasks: expected a list of catalogue task names, got {tasks!r:.80}")
        for i, t in enumerate(tasks):
            if isinstance(t, dict):
                raise ValueError(
                    f"tasks[{i}]: a local task goes under local_tasks as "
                    f"'<name>: {{path, text, text_pair, label, label_names}}' "
                    f"(got {t!r:.60}); tasks lists catalogue names only"
                )
        if not isinstance(local, dict):
            raise ValueError(
                f"local_tasks: expected a mapping 'name: {{path, text, label, ...}}', "
                f"got {local!r:.80}"
            )
        for name in local:
            if not isinstance(name, str) or not TASK_NAME_RE.match(name):
                raise ValueError(
                    f"local_tasks.{name}: task name {name!r} is not allowed: use letters, "
                    "digits, '_', '-', '.' (it becomes a directory name)"
                )
            if name in tasks:
                raise ValueError(
                    f"local_tasks.{name}: {name!r} is also listed under tasks; a task is either "
                    "a catalogue name under tasks or a local task, not both"
                )
        return {**data, "tasks": [*tasks, *local]}

    @field_validator("tasks")
    @classmethod
    def _valid_tasks(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError(
                "the task list is empty; name at least one task (or a local_tasks entry)"
            )
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
        if not e["loc"] and e["type"] == "value_error":  # a whole-file rule names its own keys
            lines.append(f"{source}: {e['msg'].removeprefix('Value error, ')}")
            continue
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
    """Task names and cross-section rules.

    Merge-method names and hyper-parameters are checked by
    :func:`mergeflow.methods.params.check_config`: here they would make every stage import, and
    so depend on, every method's code.
    """
    from mergeflow import data

    known = set(data.available_tasks(include_optional=True))
    for t in params.tasks:
        if t not in known and t not in params.local_tasks:
            raise ConfigError(
                f"{source}: tasks: unknown task {t!r}; available: {', '.join(sorted(known))} "
                "(your own data: a local_tasks entry)"
            )
    for t in params.local_tasks:
        if t in known:
            raise ConfigError(
                f"{source}: local_tasks.{t}: {t!r} is a catalogue task's name; name yours "
                "differently (its split directory is data/tasks/<name>)"
            )
    for name, hp in params.evaluate.methods.items():
        if not isinstance(hp, dict):
            raise ConfigError(f"{source}: evaluate.methods.{name}: expected a mapping")
        if "scaling" in hp:
            raise ConfigError(
                f"{source}: evaluate.methods.{name}.scaling: the scaling is searched on validation "
                "by the coefficients stage; set coefficients.grid instead"
            )
    poison = params.safety.poison
    if params.safety.enabled and poison is not None and poison.task not in params.tasks:
        raise ConfigError(
            f"{source}: safety.poison.task: {poison.task!r} is not one of tasks "
            f"({', '.join(params.tasks)})"
        )


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
        data = load_yaml_file(p)
    except YAMLInputError as err:
        raise ConfigError(str(err)) from None
    except OSError as err:
        raise ConfigError(f"{p}: cannot read: {err.strerror or err}") from None
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
