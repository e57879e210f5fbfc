"""The one way mergeflow reads YAML that a user wrote: recipes, params, profiles, ``--set`` values.

Plain YAML 1.2 (ruamel.yaml, the parser DVC reads ``params.yaml`` with), checked on the node graph
before anything is built from it:

- aliases may not expand to more than :data:`MAX_NODES` values (a "billion laughs" document is
  refused in milliseconds instead of eating memory when a caller copies it), nor refer to themselves;
- a key given twice in one mapping is refused, naming the key and both lines (YAML's own rule;
  PyYAML silently kept the last one, so a second ``finetune:`` section replaced the first);
- only the standard tags are allowed: ``!!python/...`` and other tags that build objects are refused.

Every problem is one :class:`YAMLInputError` whose message is one line, ``SOURCE:LINE: what``.
:func:`load_yaml_roundtrip` / :func:`dump_yaml_roundtrip` keep comments and layout for the one
command that edits a user's file (``mergeflow use-profile``).
"""

from __future__ import annotations

import difflib
import io
import re
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.error import MarkedYAMLError, YAMLError
from ruamel.yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

MAX_NODES = 100_000
"""Most values a document may hold with every alias expanded (params.yaml holds about 200)."""

MAX_DEPTH = 100
"""Most ``[``/``{`` nesting levels (the pure-Python scanner is quadratic in them; params use 3)."""

_BRACKETS = re.compile(r"[\[\]{}]")

_CORE = "tag:yaml.org,2002:"
_ALLOWED_TAGS = frozenset(
    _CORE + t for t in ("null", "bool", "int", "float", "str", "seq", "map", "merge", "timestamp")
)


class YAMLInputError(ValueError):
    """YAML that mergeflow will not read; the one-line message names the source, line and key."""


def _line(node: Node) -> int:
    return node.start_mark.line + 1


def _short(tag: str) -> str:
    return "!!" + tag[len(_CORE) :] if tag.startswith(_CORE) else tag


def _children(node: Node) -> list[Node]:
    if isinstance(node, SequenceNode):
        return list(node.value)
    if isinstance(node, MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def _check_mapping(node: MappingNode, source: str) -> None:
    seen: dict[tuple[str, str], int] = {}
    for key, _ in node.value:
        if not isinstance(key, ScalarNode):
            raise YAMLInputError(f"{source}:{_line(key)}: a mapping key must be a plain value")
        tag = str(getattr(key.tag, "value", key.tag))
        if tag == _CORE + "merge":
            continue
        ident = (tag, key.value)
        if ident in seen:
            raise YAMLInputError(
                f"{source}:{_line(key)}: duplicate key '{key.value}' (first at line "
                f"{seen[ident]}); give each key once"
            )
        seen[ident] = _line(key)


def check_nodes(root: Node | None, source: str, max_nodes: int = MAX_NODES) -> None:
    """Refuse alias bombs, recursive aliases, duplicate keys and non-standard tags.

    Walks the composed node graph once (iteratively, each shared node once), so the cost is linear
    in the size of the text whatever its aliases would expand to.

    Args:
        root: The composed document (None for an empty one).
        source: File name or option used in error messages.
        max_nodes: Most values allowed with every alias expanded.

    Raises:
        YAMLInputError: Naming the line of the first problem.
    """
    if root is None:
        return
    sizes: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[Node, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        nid = id(node)
        if finished:
            on_path.discard(nid)
            size = 1 + sum(sizes[id(c)] for c in _children(node))
            if size > max_nodes:
                raise YAMLInputError(
                    f"{source}:{_line(node)}: aliases expand to more than {max_nodes} values "
                    "(a YAML alias bomb?); write the values out"
                )
            sizes[nid] = size
            continue
        if nid in sizes:
            continue
        if nid in on_path:
            raise YAMLInputError(f"{source}:{_line(node)}: an alias refers to its own anchor")
        tag = str(getattr(node.tag, "value", node.tag))
        if tag not in _ALLOWED_TAGS:
            raise YAMLInputError(
                f"{source}:{_line(node)}: tag {_short(tag)} is not allowed "
                "(plain YAML only: no Python objects or custom types)"
            )
        if isinstance(node, MappingNode):
            _check_mapping(node, source)
        on_path.add(nid)
        stack.append((node, True))
        stack.extend((c, False) for c in _children(node) if id(c) not in sizes)


def _check_depth(text: str, source: str) -> None:
    """Refuse flow collections nested deeper than :data:`MAX_DEPTH` before the scanner sees them.

    Counts brackets only (a quoted ``[`` counts too: the limit is far above any real file's).
    """
    depth = 0
    for m in _BRACKETS.finditer(text):
        if m.group() in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                line = text.count("\n", 0, m.start()) + 1
                raise YAMLInputError(
                    f"{source}:{line}: nested more than {MAX_DEPTH} levels deep; refused"
                )
        elif depth:
            depth -= 1


def _one_line(err: YAMLError, source: str) -> str:
    if isinstance(err, MarkedYAMLError):
        mark = err.problem_mark or err.context_mark
        problem = " ".join(str(x) for x in (err.context, err.problem) if x)
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        return f"{where}: not valid YAML: {problem}"
    return f"{source}: not valid YAML: {' '.join(str(err).split())}"


def _safe_yaml() -> YAML:
    # pure=True: the C parser crashes the process on deeply nested input (ruamel.yaml 0.19).
    y = YAML(typ="safe", pure=True)
    y.allow_duplicate_keys = False
    return y


def _roundtrip_yaml() -> YAML:
    y = YAML()
    y.allow_duplicate_keys = False
    y.preserve_quotes = True
    y.width = 4096
    y.representer.add_representer(
        type(None), lambda r, _: r.represent_scalar(_CORE + "null", "null")
    )
    return y


def _load(y: YAML, text: str | bytes, source: str) -> Any:
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as err:
            line = text.count(b"\n", 0, err.start) + 1
            raise YAMLInputError(
                f"{source}:{line}: not UTF-8 text (byte 0x{text[err.start]:02x}); save it as UTF-8"
            ) from None
    _check_depth(text, source)
    try:
        check_nodes(y.compose(text), source)
        return y.load(text)
    except YAMLError as err:
        raise YAMLInputError(_one_line(err, source)) from None
    except RecursionError:
        raise YAMLInputError(f"{source}: nested too deeply to read") from None


def load_yaml(text: str | bytes, source: str) -> Any:
    """Parse one YAML document into plain dicts, lists and scalars, refusing unsafe input.

    Args:
        text: The document (bytes must be UTF-8).
        source: File name or option named in error messages, e.g. ``params.yaml``, ``--set density``.

    Returns:
        The value (None for an empty document).

    Raises:
        YAMLInputError: Not valid YAML, not UTF-8, an alias bomb, a duplicate key or a tag that
            is not plain YAML; one line naming ``source`` and the line.
    """
    return _load(_safe_yaml(), text, source)


def load_yaml_file(path: str | Path) -> Any:
    """:func:`load_yaml` of a file, named by its path in errors.

    Raises:
        OSError: The file cannot be read.
        YAMLInputError: As :func:`load_yaml`.
    """
    return load_yaml(Path(path).read_bytes(), str(path))


def load_yaml_roundtrip(path: str | Path) -> tuple[Any, str]:
    """Read a YAML file for editing: comments, key order and styles are kept.

    Returns:
        The document (ruamel.yaml's ``CommentedMap`` / ``CommentedSeq``, which behave as dict and
        list) and the file's text, to pass to :func:`dump_yaml_roundtrip`.

    Raises:
        OSError: The file cannot be read.
        YAMLInputError: As :func:`load_yaml`.
    """
    raw = Path(path).read_bytes()
    data = _load(_roundtrip_yaml(), raw, str(path))
    return data, raw.decode("utf-8")


_INDENTS = ((2, 4, 2), (2, 2, 0), (4, 4, 2), (4, 4, 0), (4, 6, 4))


def _dump(data: Any, indent: tuple[int, int, int]) -> str:
    y = _roundtrip_yaml()
    y.indent(mapping=indent[0], sequence=indent[1], offset=indent[2])
    buf = io.StringIO()
    y.dump(data, buf)
    return buf.getvalue()


def _keep_original(original: list[str], noop: list[str], edited: list[str]) -> list[str]:
    """Three-way merge: where ruamel re-wrapped lines that the edit did not touch, keep the user's.

    ``noop`` is ruamel's rendering of the unedited document, ``edited`` of the edited one. Each
    stretch where ``original`` differs from ``noop`` (ruamel's normalisation) is put back into
    ``edited`` if the edit left that stretch (and its neighbours) exactly as in ``noop``.
    """
    to_edited: dict[int, int] = {}  # noop line -> the same, unchanged line in edited
    for tag, i1, i2, j1, _ in difflib.SequenceMatcher(
        a=noop, b=edited, autojunk=False
    ).get_opcodes():
        if tag == "equal":
            to_edited.update({k: j1 + k - i1 for k in range(i1, i2)})
    out = list(edited)
    hunks = difflib.SequenceMatcher(a=noop, b=original, autojunk=False).get_opcodes()
    for tag, a1, a2, b1, b2 in reversed(hunks):
        if tag == "equal":
            continue
        # the hunk's lines plus one neighbour each side must be untouched by the edit
        span = [k for k in range(a1 - 1, a2 + 1) if 0 <= k < len(noop)]
        where = [to_edited.get(k) for k in span]
        if None in where or any(b - a != 1 for a, b in zip(where, where[1:], strict=False)):
            continue
        start = to_edited[a1] if a1 < len(noop) else len(edited)
        if a1 == len(noop) and noop:
            start = to_edited[a1 - 1] + 1
        out[start : start + (a2 - a1)] = original[b1:b2]
    return out


def dump_yaml_roundtrip(data: Any, original: str) -> str:
    """Render an edited :func:`load_yaml_roundtrip` document in the original file's layout.

    The indentation is the one that reproduces ``original`` best; lines the edit did not change
    are kept byte for byte (so hand-wrapped flow mappings stay wrapped), comments included.

    Args:
        data: The edited document.
        original: The text it was read from.

    Returns:
        The new text.
    """
    orig_lines = original.splitlines(keepends=True)
    unedited = _load(_roundtrip_yaml(), original, "(original)")
    best, best_noop = _INDENTS[0], None
    best_cost = None
    for indent in _INDENTS:
        noop = _dump(unedited, indent).splitlines(keepends=True)
        cost = sum(
            max(i2 - i1, j2 - j1)
            for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(
                a=noop, b=orig_lines, autojunk=False
            ).get_opcodes()
            if tag != "equal"
        )
        if best_cost is None or cost < best_cost:
            best, best_noop, best_cost = indent, noop, cost
        if cost == 0:
            break
    edited = _dump(data, best).splitlines(keepends=True)
    assert best_noop is not None
    return "".join(_keep_original(orig_lines, best_noop, edited))


def update_roundtrip(doc: Any, override: dict[str, Any], prefix: str = "") -> list[str]:
    """Merge ``override`` into a :func:`load_yaml_roundtrip` mapping in place, as ``deep_merge``.

    Mappings are merged key by key; any other value replaces the old one (a list keeps its
    flow or block style and the comment after its last item). Keys whose value is unchanged are
    not touched, so their formatting stays.

    Args:
        doc: The mapping to edit.
        override: Plain values (e.g. from :func:`load_yaml`).
        prefix: Dotted path of ``doc`` (for the returned names).

    Returns:
        Dotted names of the keys whose value changed.
    """
    from ruamel.yaml.comments import CommentedSeq

    changed: list[str] = []
    for key, new in override.items():
        name = f"{prefix}{key}"
        old = doc.get(key) if key in doc else None
        if key in doc and old == new:
            continue
        if isinstance(new, dict) and isinstance(old, dict):
            changed += update_roundtrip(old, new, prefix=f"{name}.")
            continue
        if isinstance(new, list) and isinstance(old, CommentedSeq) and old and new:
            tail = old.ca.items.pop(len(old) - 1, None)  # e.g. the blank line after the list
            for i in list(old.ca.items):
                if i >= len(new):
                    del old.ca.items[i]
            old[:] = new
            if tail is not None:
                old.ca.items[len(new) - 1] = tail
        else:
            doc[key] = new
        changed.append(name)
    return changed
