"""Read what a workspace produced, tolerating anything missing or broken.

Every loader returns plain data plus a list of :class:`Missing` notices instead of raising, so a run
with a failed stage still gets a report that says what is absent and how to produce it.
"""

from __future__ import annotations

import csv
import json
import math
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REFERENCE_ROWS = ("expert", "base")  # rows that are references, not merges or compressions
# per-task archives, not one merged model
COMPRESSED_ROWS = ("tall_masks", "tall_consensus", "twin_merging")


@dataclass(frozen=True)
class Missing:
    """A notice for one missing or unusable input: what, why, and how to get it."""

    what: str
    why: str
    fix: str = ""


def _rel(root: Path, p: Path) -> str:
    try:
        return str(p.relative_to(root))
    except ValueError:
        return str(p)


def read_json(root: Path, rel: str, produced_by: str) -> tuple[Any, list[Missing]]:
    """(parsed JSON or None, notices) for ``root/rel``."""
    p = root / rel
    if not p.is_file():
        return None, [Missing(rel, "not found", f"produced by the `{produced_by}` stage: "
                              f"`dvc repro {produced_by}`")]
    try:
        return json.loads(p.read_text()), []
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return None, [Missing(rel, f"unreadable ({err})", f"re-run `dvc repro {produced_by}`")]


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    return float(v)


@dataclass
class Evaluation:
    """``metrics/eval.json``: per row (model/method), accuracy and normalized accuracy per task."""

    tasks: list[str]
    # row -> {accuracy: {t: a}, normalized: {t: n}, mean_*: x, accuracy_ci: {t: (lo, hi)},
    #         n_test: {t: n}, mean_*_ci: (lo, hi) | None, paired: {other: {diff, ci, within_noise}}}
    rows: dict[str, dict[str, Any]]

    def kind(self, row: str) -> str:
        """``reference``, ``compressed`` or ``merge``."""
        if row in REFERENCE_ROWS:
            return "reference"
        return "compressed" if row in COMPRESSED_ROWS else "merge"

    def merges(self) -> list[str]:
        """Rows that are one merged model (the candidates for best merge / champion)."""
        return [r for r in self.rows if self.kind(r) == "merge"]

    def n_test(self, task: str) -> int | None:
        """Number of test texts of ``task`` (every row is scored on the same texts)."""
        for s in self.rows.values():
            if task in s["n_test"]:
                return s["n_test"][task]
        return None

    @property
    def has_intervals(self) -> bool:
        """Whether any row carries an interval (files from before issue 17 have none)."""
        return any(s["accuracy_ci"] or s["mean_normalized_ci"] for s in self.rows.values())

    def best_merge(self) -> str | None:
        """The merge with the highest mean normalized accuracy (ties: alphabetically first)."""
        scored = [(self.rows[r].get("mean_normalized"), r) for r in self.merges()]
        scored = [(-s, r) for s, r in scored if s is not None and math.isfinite(s)]
        return min(scored)[1] if scored else None


def _interval(v: Any) -> tuple[float, float] | None:
    """``[lo, hi]`` as a tuple of two finite numbers with lo <= hi, else None."""
    if not isinstance(v, list | tuple) or len(v) != 2:
        return None
    lo, hi = _number(v[0]), _number(v[1])
    if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
        return None
    return lo, hi


def _paired(v: Any) -> dict[str, Any] | None:
    """One ``paired`` entry: ``diff``, ``ci`` and ``within_noise`` (from the interval if absent)."""
    if not isinstance(v, dict):
        return None
    diff, ci = _number(v.get("diff")), _interval(v.get("ci"))
    if diff is None or ci is None:
        return None
    noise = v.get("within_noise")
    return {"diff": diff, "ci": ci,
            "within_noise": noise if isinstance(noise, bool) else ci[0] <= 0.0 <= ci[1]}


def _uncertainty(s: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """The optional interval fields of one row, and whether any present one was malformed."""
    bad = False

    def per_task(key: str, parse) -> dict[str, Any]:
        nonlocal bad
        raw = s.get(key)
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            bad = True
            return {}
        out = {t: parse(v) for t, v in raw.items()}
        bad = bad or any(v is None for v in out.values())
        return {t: v for t, v in out.items() if v is not None}

    def count(v: Any) -> int | None:
        return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None

    out: dict[str, Any] = {
        "accuracy_ci": per_task("accuracy_ci", _interval),
        "n_test": per_task("n_test", count),
        "paired": per_task("paired", _paired),
    }
    for key in ("mean_accuracy_ci", "mean_normalized_ci"):
        out[key] = _interval(s.get(key))
        bad = bad or (s.get(key) is not None and out[key] is None)
    return out, bad


def load_evaluation(root: Path) -> tuple[Evaluation | None, list[Missing]]:
    """Parse and check ``metrics/eval.json`` (the shape written by ``evaluate.summarize``).

    The uncertainty fields (``accuracy_ci``, ``n_test``, ``mean_accuracy_ci``,
    ``mean_normalized_ci``, ``paired``) are optional: files written before them still load, with
    empty intervals. A present but malformed interval is dropped and noted.
    """
    rel = "metrics/eval.json"
    data, notes = read_json(root, rel, "evaluate")
    if data is None:
        return None, notes
    if not isinstance(data, dict) or not data:
        return None, [Missing(rel, "empty or not an object of rows", "re-run `dvc repro evaluate`")]
    tasks: list[str] = []
    rows: dict[str, dict[str, Any]] = {}
    bad, bad_ci = [], []
    for row, s in data.items():
        acc = s.get("accuracy") if isinstance(s, dict) else None
        if not isinstance(acc, dict):
            bad.append(row)
            continue
        for t in acc:
            if t not in tasks:
                tasks.append(t)
        norm = s.get("normalized") if isinstance(s.get("normalized"), dict) else {}
        rows[row] = {
            "accuracy": {t: _number(v) for t, v in acc.items()},
            "normalized": {t: _number(v) for t, v in norm.items()},
            "mean_accuracy": _number(s.get("mean_accuracy")),
            "mean_normalized": _number(s.get("mean_normalized")),
        }
        unc, malformed = _uncertainty(s)
        rows[row].update(unc)
        if malformed:
            bad_ci.append(row)
    if bad_ci:
        notes.append(Missing(f"{rel}: rows {', '.join(bad_ci)}", "have malformed intervals "
                             "(shown without them)", "re-run `dvc repro evaluate`"))
    if bad:
        notes.append(Missing(f"{rel}: rows {', '.join(bad)}", "have no per-task accuracy",
                             "re-run `dvc repro evaluate`"))
    if not rows:
        return None, notes
    return Evaluation(tasks, rows), notes


def read_csv(root: Path, rel: str) -> list[dict[str, str]] | None:
    """Rows of a CSV file, or None when it is absent or unreadable."""
    p = root / rel
    if not p.is_file():
        return None
    try:
        with p.open(newline="") as fh:
            return list(csv.DictReader(fh))
    except (OSError, UnicodeDecodeError, csv.Error):
        return None


@dataclass(frozen=True)
class ParetoPoint:
    """One stored form: its size and its mean accuracy over the tasks."""

    form: str
    setting: str
    bytes: float
    mean_accuracy: float | None
    mean_normalized: float | None


def pareto_points(
    root: Path, ev: Evaluation | None
) -> tuple[list[ParetoPoint], str, list[Missing]]:
    """Size vs accuracy of every stored form: ``plots/pareto.csv`` when present, else derived.

    Derived (from ``metrics/compress.json`` + ``metrics/eval.json``): experts = the sum of the
    expert files; ``tall_masks`` = the TALL archive plus θ_0 when it is referenced
    (``bytes_with_base``); ``twin_merging`` = the Twin archive; each merge and the base = one
    model, approximated as the experts' bytes / number of tasks.

    Returns:
        (points, a sentence naming the source, notices).
    """
    rows = read_csv(root, "plots/pareto.csv")
    if rows:
        pts, skipped = [], 0
        for r in rows:
            try:
                pts.append(
                    ParetoPoint(
                        r["form"],
                        r.get("setting", "") or "",
                        float(r["bytes"]),
                        float(r["mean_accuracy"]) if r.get("mean_accuracy") else None,
                        float(r["mean_normalized"]) if r.get("mean_normalized") else None,
                    )
                )
            except (KeyError, ValueError):
                skipped += 1
        notes = [Missing("plots/pareto.csv", f"{skipped} malformed row(s) skipped")] if skipped else []
        return pts, "plots/pareto.csv (written by the evaluate stage)", notes
    comp, notes = read_json(root, "metrics/compress.json", "compress")
    if comp is None or ev is None:
        if ev is None:
            notes.append(Missing("metrics/eval.json", "needed for the accuracy axis",
                                 "`dvc repro evaluate`"))
        return [], "", notes
    try:
        n = int(comp["n_tasks"])
        experts = float(comp["bytes_experts"])
        sizes = {
            "expert": (experts, f"{n} models"),
            "tall_masks": (float(comp["tall"]["bytes_with_base"]), "archive + θ₀"),
            "twin_merging": (float(comp["twin"]["bytes"]), "archive"),
        }
    except (KeyError, TypeError, ValueError) as err:
        return [], "", [Missing("metrics/compress.json", f"missing field {err}",
                                "re-run `dvc repro compress`")]
    one = experts / max(n, 1)
    pts = []
    for row, s in ev.rows.items():
        size, setting = sizes.get(row, (one, "1 model (≈ experts / tasks)"))
        pts.append(ParetoPoint(row, setting, size, s["mean_accuracy"], s["mean_normalized"]))
    return pts, "derived from metrics/compress.json and metrics/eval.json", notes


@dataclass
class Heatmap:
    """Learned coefficients of one run as tasks × layers (mean α over each layer's tensors)."""

    run: str
    method: str
    scheme: str
    tasks: list[str]
    layers: list[str]
    values: list[list[float]]
    note: str = ""


def layer_of(key: str) -> str:
    """The layer a tensor belongs to: ``encoder.layer.3.attention…`` → ``L3``; embeddings → ``emb``."""
    parts = key.split(".")
    for i, p in enumerate(parts[:-1]):
        if p in ("layer", "layers", "h", "block", "blocks") and parts[i + 1].isdigit():
            return f"L{parts[i + 1]}"
    if any("embed" in p for p in parts):
        return "emb"
    return parts[0] if parts[0] not in ("bert", "roberta", "model") else parts[1]


def learned_heatmaps(root: Path) -> tuple[list[Heatmap], list[Missing]]:
    """One :class:`Heatmap` per learned-coefficients run in ``artifacts/coefficients``."""
    d = root / "artifacts" / "coefficients"
    notes: list[Missing] = []
    maps = []
    for st in sorted(d.glob("*.safetensors")) if d.is_dir() else []:
        meta_p = st.with_suffix(".json")
        try:
            from mergeflow.coefficients import layer_matrix, load_learned

            scheme, tasks, keys, alpha, _ = load_learned(st)
            m = layer_matrix(alpha).tolist()
        except Exception as err:  # noqa: BLE001 - any unreadable file becomes a notice
            notes.append(Missing(_rel(root, st), f"unreadable learned coefficients ({err})"))
            continue
        meta = {}
        if meta_p.is_file():
            try:
                meta = json.loads(meta_p.read_text())
            except (OSError, json.JSONDecodeError):
                notes.append(Missing(_rel(root, meta_p), "unreadable run metadata"))
        method = str((meta.get("config") or {}).get("method", ""))
        if scheme.kind == "task" or len(m[0]) == 1:
            maps.append(Heatmap(st.stem, method, scheme.kind, tasks, ["all layers"], m))
            continue
        layers: list[str] = []
        groups: dict[str, list[int]] = {}
        for j, k in enumerate(keys[: len(m[0])]):
            g = layer_of(k)
            if g not in groups:
                layers.append(g)
                groups[g] = []
            groups[g].append(j)
        values = [[sum(row[j] for j in groups[g]) / len(groups[g]) for g in layers] for row in m]
        note = f"mean α over the tensors of each layer ({len(keys)} tensors in all)"
        if scheme.kind == "atlas":
            note += f" and the {scheme.partitions} random partitions"
        maps.append(Heatmap(st.stem, method, scheme.kind, tasks, layers, values, note))
    return maps, notes


def _git(root: Path, *args: str) -> str:
    try:
        return subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, check=True, timeout=20
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


@dataclass
class Lineage:
    """Where the numbers in the report came from."""

    git_commit: str = ""
    dvc_lock_rev: str = ""  # last commit that changed dvc.lock
    dvc_lock_dirty: bool = False
    dvc_lock_md5: str = ""
    stage_md5: dict[str, dict[str, str]] = field(default_factory=dict)  # stage -> path -> md5
    data: dict[str, dict[str, str]] = field(default_factory=dict)  # task -> split -> sha256
    metrics_md5: str = ""
    incomplete_stages: list[str] = field(default_factory=list)


def _expected_stages(root: Path) -> list[str]:
    import yaml

    from mergeflow.yamlio import YAMLInputError, load_yaml_file

    try:
        spec = yaml.safe_load((root / "dvc.yaml").read_text()) or {}
        params = load_yaml_file(root / "params.yaml") or {}  # the user's file: bounded loader
    except (OSError, yaml.YAMLError, YAMLInputError):
        return []
    names = []
    for name, st in (spec.get("stages") or {}).items():
        if isinstance(st, dict) and "foreach" in st:
            items = st["foreach"]
            if isinstance(items, str) and items.strip() == "${tasks}":
                items = params.get("tasks") or []
            names += [f"{name}@{i}" for i in items] if isinstance(items, list) else [name]
        else:
            names.append(name)
    return names


def lineage(root: Path) -> tuple[Lineage, list[Missing]]:
    """Git commit, DVC revision and md5s, data hashes; stages with no ``dvc.lock`` entry."""
    import hashlib

    import yaml

    from mergeflow.io import tree_md5

    lin, notes = Lineage(), []
    lin.git_commit = _git(root, "rev-parse", "HEAD")
    if lin.git_commit and _git(root, "status", "--porcelain", "--untracked-files=no"):
        lin.git_commit += "-dirty"
    lock = root / "dvc.lock"
    stages: dict[str, Any] = {}
    if lock.is_file():
        raw = lock.read_bytes()
        lin.dvc_lock_md5 = hashlib.md5(raw).hexdigest()
        lin.dvc_lock_rev = _git(root, "log", "-1", "--format=%H", "--", "dvc.lock")
        lin.dvc_lock_dirty = bool(_git(root, "status", "--porcelain", "--", "dvc.lock"))
        try:
            stages = (yaml.safe_load(raw) or {}).get("stages") or {}
        except yaml.YAMLError as err:
            notes.append(Missing("dvc.lock", f"unreadable ({err})"))
        for name, entry in stages.items():
            if not isinstance(entry, dict):
                continue
            md5s = {}
            for kind in ("deps", "outs"):
                for d in entry.get(kind) or []:
                    if isinstance(d, dict) and d.get("md5") and not d["path"].endswith(".py"):
                        md5s[d["path"]] = str(d["md5"])
            lin.stage_md5[name] = md5s
    else:
        notes.append(Missing("dvc.lock", "not found: no stage has completed", "`dvc repro`"))
    lin.incomplete_stages = [s for s in _expected_stages(root) if s not in stages]
    for meta in sorted((root / "data" / "tasks").glob("*/meta.json")):
        try:
            m = json.loads(meta.read_text())
            lin.data[meta.parent.name] = {k: str(v) for k, v in (m.get("sha256") or {}).items()}
        except (OSError, json.JSONDecodeError):
            notes.append(Missing(_rel(root, meta), "unreadable"))
    if (root / "metrics" / "eval.json").is_file():
        lin.metrics_md5 = tree_md5(root / "metrics" / "eval.json")
    return lin, notes
