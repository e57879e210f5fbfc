"""Every DVC stage depends on every mergeflow source file its command can import.

The import graph is read statically (``ast``) at test time, from the stage's entry point
``stages/<x>.py``: ``import`` and ``from ... import`` anywhere in a module (inside functions too; not
under ``if TYPE_CHECKING:``), the packages an import executes (``a/__init__.py`` for ``a.b``), and
modules imported by name: ``importlib.import_module("m")`` and ``mergeflow.stage.main("m")``, with
``import_module(f"pkg.{...}")`` counting as every module of ``pkg``.

A dep covers a file if it is that file or a directory containing it. A failure prints the stage's
code deps as they should read in dvc.yaml: a package's directory where the stage can import all of
it, single files otherwise. ``python tests/unit/test_dvc_deps.py`` prints them for every stage.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "mergeflow"
# calls that import the module their first argument names
IMPORTERS = {"importlib.import_module", "mergeflow.stage.main"}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


class _Imports(ast.NodeVisitor):
    """The dotted names one source file imports (some are attributes, not modules)."""

    def __init__(self, package: str | None) -> None:
        self.package = package  # where relative imports start (None: a script)
        self.aliases: dict[str, str] = {}  # local name -> dotted name, to recognise IMPORTERS
        self.names: set[str] = set()
        self.prefixes: set[str] = set()  # import_module(f"<prefix>.{...}")

    def visit_If(self, node: ast.If) -> None:
        if not _is_type_checking(node.test):
            self.visit(node.test)
            for stmt in node.body:
                self.visit(stmt)
        for stmt in node.orelse:
            self.visit(stmt)

    def visit_Import(self, node: ast.Import) -> None:
        for a in node.names:
            self.names.add(a.name)
            local = a.asname or a.name.split(".")[0]
            self.aliases[local] = a.name if a.asname else local

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:
            assert self.package is not None, "relative import outside a package"
            parts = self.package.split(".")[: len(self.package.split(".")) - node.level + 1]
            base = ".".join([*parts, base] if base else parts)
        self.names.add(base)
        for a in node.names:
            if a.name != "*":
                self.names.add(f"{base}.{a.name}")  # kept only if a submodule
                self.aliases[a.asname or a.name] = f"{base}.{a.name}"

    def _dotted(self, node: ast.expr) -> str | None:
        if isinstance(node, ast.Name):
            return self.aliases.get(node.id)
        if isinstance(node, ast.Attribute):
            head = self._dotted(node.value)
            return f"{head}.{node.attr}" if head else None
        return None

    def visit_Call(self, node: ast.Call) -> None:
        self.generic_visit(node)
        if not node.args or self._dotted(node.func) not in IMPORTERS:
            return
        arg = node.args[0]
        if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
            self.names.add(arg.value)
        elif isinstance(arg, ast.JoinedStr) and isinstance(arg.values[0], ast.Constant):
            head = str(arg.values[0].value)
            if head.endswith("."):
                self.prefixes.add(head[:-1])


class ImportGraph:
    """The static import graph of ``<root>/src/mergeflow`` seen from scripts under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.src = root / "src"

    def module_file(self, name: str) -> Path | None:
        """The source of mergeflow module ``name`` (a package's ``__init__.py``), if it exists."""
        if name.split(".")[0] != PACKAGE:
            return None
        base = self.src.joinpath(*name.split("."))
        for path in (base / "__init__.py", base.with_suffix(".py")):
            if path.is_file():
                return path
        return None

    def _submodules(self, package: str) -> set[str]:
        init = self.module_file(package)
        if init is None or init.name != "__init__.py":
            return {package}
        return {
            ".".join(p.relative_to(self.src).with_suffix("").parts).removesuffix(".__init__")
            for p in init.parent.rglob("*.py")
        }

    @functools.cache  # noqa: B019  (a graph lives as long as the test session)
    def imports(self, path: Path, module: str | None) -> frozenset[str]:
        """The mergeflow modules ``path`` (module ``module``, None: a script) imports directly."""
        package = module if path.name == "__init__.py" else (module or "").rpartition(".")[0]
        visitor = _Imports(package or None)
        visitor.visit(ast.parse(path.read_text(), filename=str(path)))
        names = set(visitor.names)
        for prefix in visitor.prefixes:
            names |= self._submodules(prefix)
        found = set()
        for name in names:  # a.b.c executes a and a.b first
            parts = name.split(".")
            found |= {
                ".".join(parts[:i])
                for i in range(1, len(parts) + 1)
                if self.module_file(".".join(parts[:i]))
            }
        return frozenset(found)

    def reachable(self, script: Path) -> set[str]:
        """Root-relative paths of ``script`` and every mergeflow source file it can import."""
        seen: set[str] = set()
        todo = list(self.imports(script, None))
        while todo:
            name = todo.pop()
            if name not in seen:
                seen.add(name)
                todo.extend(self.imports(self.module_file(name), name) - seen)
        paths = {self.module_file(n) for n in seen} | {script}
        return {p.relative_to(self.root).as_posix() for p in paths}

    def deps_block(self, files: set[str]) -> str:
        """``files`` as dvc.yaml code deps: entry point first, then a directory for each package
        all of whose modules are in ``files``, single files for the rest; sorted.
        """
        deps = set(files)
        package_dirs = {p.parent for p in (self.src / PACKAGE).rglob("__init__.py")}
        for d in sorted(package_dirs - {self.src / PACKAGE}, key=lambda d: len(d.parts)):
            modules = {p.relative_to(self.root).as_posix() for p in d.rglob("*.py")}
            rel = d.relative_to(self.root).as_posix()
            if modules <= files and not covered(rel, sorted(deps)):
                deps = (deps - modules) | {rel}
        first = sorted(d for d in deps if not d.startswith("src/"))
        return "\n".join(f"- {d}" for d in first + sorted(deps - set(first)))


def covered(path: str, deps: list[str]) -> bool:
    """Whether a dep is ``path`` or a directory containing it."""
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in deps)


def dvc_stages(root: Path) -> dict[str, dict]:
    """dvc.yaml's stages by name (a ``foreach`` stage: its ``do`` body)."""
    doc = yaml.safe_load((root / "dvc.yaml").read_text())
    return {name: s.get("do", s) for name, s in doc["stages"].items()}


def entry_point(root: Path, stage: dict) -> Path:
    """The ``stages/<x>.py`` a stage's command runs."""
    words = [w for w in stage["cmd"].split() if w.startswith("stages/") and w.endswith(".py")]
    assert len(words) == 1, f"not one stages/*.py in {stage['cmd']!r}"
    return root / words[0]


GRAPH = ImportGraph(ROOT)
STAGES = dvc_stages(ROOT)


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_depends_on_all_code_it_can_import(name: str):
    stage = STAGES[name]
    files = GRAPH.reachable(entry_point(ROOT, stage))
    missing = sorted(f for f in files if not covered(f, stage["deps"]))
    assert not missing, (
        f"dvc.yaml stage {name!r} can import files none of its deps cover: {missing}\n"
        f"its code deps should read:\n{GRAPH.deps_block(files)}"
    )


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_code_deps_exist_and_are_imported(name: str):
    """A code dep that is gone fails `dvc repro`; one the stage cannot import reruns it for nothing."""
    stage = STAGES[name]
    files = GRAPH.reachable(entry_point(ROOT, stage))
    code = [d for d in stage["deps"] if d.startswith(("src/", "stages/"))]
    unused = [d for d in code if not any(covered(f, [d]) for f in files)]
    assert not unused, (
        f"dvc.yaml stage {name!r} lists code it cannot import (or that does not exist): {unused}\n"
        f"its code deps should read:\n{GRAPH.deps_block(files)}"
    )


def test_directory_code_deps_leave_out_bytecode():
    """DVC hashes everything in a directory dep; __pycache__ there would rerun stages for nothing."""
    dirs = {d for s in STAGES.values() for d in s["deps"] if d.startswith("src/")}
    dirs = {d for d in dirs if (ROOT / d).is_dir()}
    ignored = (ROOT / ".dvcignore").read_text().splitlines()
    assert not dirs or "__pycache__/" in ignored, sorted(dirs)


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def test_graph_follows_every_kind_of_import(tmp_path: Path):
    p = "src/mergeflow/"
    _write(
        tmp_path,
        {
            "stages/x.py": 'from mergeflow.stage import main\nmain("mergeflow.pipeline.x")\n',
            p + "__init__.py": "",
            p + "stage.py": "import importlib\ndef main(m):\n    importlib.import_module(m)\n",
            p + "pipeline/__init__.py": "",
            p + "pipeline/x.py": (
                "from typing import TYPE_CHECKING\n"
                "from . import helper\n"
                "from mergeflow.tools import sub as s\n"
                "if TYPE_CHECKING:\n    import mergeflow.typing_only\n"
                "else:\n    import mergeflow.at_runtime\n"
                "def run():\n    from mergeflow.lazy import deep\n"
                "    from importlib import import_module\n"
                '    import_module("mergeflow.by_name")\n'
            ),
            p + "pipeline/helper.py": "from ..io import thing\n",
            p + "pipeline/unused.py": "",
            p + "tools/__init__.py": "",
            p + "tools/sub.py": "",
            p + "tools/other.py": "",
            p + "typing_only.py": "",
            p + "at_runtime.py": "",
            p + "lazy/__init__.py": "import mergeflow.lazy.deep\n",
            p + "lazy/deep.py": "",
            p + "by_name.py": "",
            p + "io/__init__.py": (
                "import importlib\n"
                'def __getattr__(n):\n    return importlib.import_module(f"mergeflow.io.{n}")\n'
            ),
            p + "io/a.py": "",
            p + "io/b.py": "",
        },
    )
    graph = ImportGraph(tmp_path)
    files = graph.reachable(tmp_path / "stages/x.py")
    expected = {
        "stages/x.py",
        *(
            p + f
            for f in (
                "__init__.py stage.py pipeline/__init__.py pipeline/x.py pipeline/helper.py "
                "tools/__init__.py tools/sub.py at_runtime.py lazy/__init__.py lazy/deep.py "
                "by_name.py io/__init__.py io/a.py io/b.py"
            ).split()
        ),
    }
    assert files == expected
    # whole packages become their directory; partly used ones stay files
    assert graph.deps_block(files).splitlines() == [
        "- stages/x.py",
        *(
            f"- {p}{f}"
            for f in (
                "__init__.py at_runtime.py by_name.py io lazy pipeline/__init__.py "
                "pipeline/helper.py pipeline/x.py stage.py tools/__init__.py tools/sub.py"
            ).split()
        ),
    ]


def test_covered_means_same_file_or_inside_directory():
    assert covered("src/mergeflow/methods/ties.py", ["src/mergeflow/methods"])
    assert covered("src/mergeflow/methods/ties.py", ["src/mergeflow/methods/"])
    assert covered("src/mergeflow/tensors.py", ["src/mergeflow/tensors.py"])
    assert not covered("src/mergeflow/methods_extra.py", ["src/mergeflow/methods"])
    assert not covered("src/mergeflow/methods/ties.py", ["src/mergeflow/methods/tie"])


if __name__ == "__main__":  # print every stage's code deps
    for stage_name, stage_def in STAGES.items():
        print(f"{stage_name}:\n{GRAPH.deps_block(GRAPH.reachable(entry_point(ROOT, stage_def)))}\n")
