"""The pipeline's layering: a package imports only packages below it, never one above.

    core (errors, config_files) -> models -> data -> methods -> eval -> embedded -> run -> analysis
    -> report -> cli

`embedded` (the trainer and model card of the shipped model) measures with `eval`; nothing below
it imports it. `api` is the notebook facade: no module of the library imports it. Function-local
imports count too, so a cycle cannot hide inside a function.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "editscale"
ORDER = ["core", "models", "data", "methods", "eval", "embedded", "run", "analysis", "report", "cli", "api"]
CORE = {"errors", "config_files", "__init__"}


def layer_of(module: str) -> str:
    """The layer of a dotted module name inside editscale ("editscale.run.store" -> "run")."""
    parts = module.split(".")
    assert parts[0] == "editscale", module
    top = parts[1] if len(parts) > 1 else "__init__"
    return "core" if top in CORE else top


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, imported editscale module) for every import statement in a file, at any depth."""
    rel = path.relative_to(SRC.parent).with_suffix("")
    package = list(rel.parts[:-1])
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "editscale"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this file's package
                base = package[: len(package) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if name.split(".")[0] == "editscale":
                out.append((node.lineno, name))
    return out


def violations() -> list[str]:
    found = []
    for path in sorted(SRC.rglob("*.py")):
        mine = layer_of(".".join(path.relative_to(SRC.parent).with_suffix("").parts))
        for line, module in imports_of(path):
            theirs = layer_of(module)
            if theirs == "api" and mine != "api":
                found.append(f"{path.relative_to(SRC)}:{line} imports the api facade ({module})")
            elif ORDER.index(theirs) > ORDER.index(mine):
                found.append(f"{path.relative_to(SRC)}:{line} ({mine}) imports {module} ({theirs}), a layer above")
    return found


def test_every_top_level_package_has_a_layer() -> None:
    tops = {p.stem if p.is_file() else p.name for p in SRC.iterdir()
            if (p.suffix == ".py" or (p / "__init__.py").exists())}
    unknown = {t for t in tops if t not in CORE and t not in ORDER}
    assert not unknown, f"give these a place in ORDER: {sorted(unknown)}"


def test_no_package_imports_a_package_above_it() -> None:
    assert violations() == []


def test_the_check_sees_an_upward_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = tmp_path / "editscale"
    (pkg / "models").mkdir(parents=True)
    (pkg / "run").mkdir()
    (pkg / "models" / "x.py").write_text("def f():\n    from editscale.run.store import RunStore\n")
    (pkg / "run" / "y.py").write_text("from ..models import x\nfrom editscale.api import load_records\n")
    monkeypatch.setitem(globals(), "SRC", pkg)
    found = violations()
    assert any("models/x.py:2" in v and "a layer above" in v for v in found), found
    assert any("run/y.py:2" in v and "api facade" in v for v in found), found
    assert len(found) == 2, found
