"""Dependencies point one way: every import in ``dtrain/`` (module level and inside functions) points
down the layer table of ARCHITECTURE.md, never up and never sideways to another package of its layer.

The table below is the one ARCHITECTURE.md shows; the test also checks that the two agree, so the
document cannot drift from what is enforced.
"""

from __future__ import annotations

import ast
import os
import re
from typing import Dict, Iterator, List, Mapping, Optional, Tuple

import pytest

from conftest import REPO

PACKAGE = os.path.join(REPO, "dtrain")

# layer -> the top-level modules and packages of dtrain/ in it (bottom first)
LAYERS: List[Tuple[str, ...]] = [
    ("errors", "atomic_io", "faults"),
    ("config", "checkpoint"),
    ("wire",),
    ("supernet", "data", "obs", "outer"),
    ("control", "comm"),
    ("peer",),
    ("train",),
    ("search",),
    ("sim",),
    ("cli",),
]
# the generated gRPC code belongs to the wire layer's unit: wire imports it freely and it imports only itself
SAME_UNIT = {"v1": "wire"}
# (importing unit, imported unit): why the import is allowed although it does not point down
EXCEPTIONS: Dict[Tuple[str, str], str] = {}

LAYER_OF = {name: i for i, names in enumerate(LAYERS) for name in names}


def _unit(top: str) -> str:
    return SAME_UNIT.get(top, top)


def _module_parts(path: str) -> List[str]:
    rel = os.path.relpath(path, REPO)[:-3].split(os.sep)
    return rel[:-1] if rel[-1] == "__init__" else rel


def _imports(path: str, source: str) -> Iterator[Tuple[int, str]]:
    """(line, absolute module) of every import in a file, including imports inside functions."""
    tree = ast.parse(source, path)
    parts = _module_parts(path)
    package = parts if path.endswith("__init__.py") else parts[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if _top(module) or not module.startswith("dtrain"):
                yield node.lineno, module
            else:  # "from .. import faults": the names are the modules
                for alias in node.names:
                    yield node.lineno, f"{module}.{alias.name}"


def _dtrain_files() -> Iterator[str]:
    for root, _, files in os.walk(PACKAGE):
        for name in sorted(files):
            if name.endswith(".py"):
                yield os.path.join(root, name)


def _top(module: str) -> str:
    """The top-level module or package of ``dtrain.<top>...``, or '' when it is not one of dtrain's."""
    parts = module.split(".")
    if parts[0] != "dtrain" or len(parts) < 2:
        return ""
    top = parts[1]
    if os.path.isdir(os.path.join(PACKAGE, top)) or os.path.exists(os.path.join(PACKAGE, top + ".py")):
        return top
    return ""


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def violations(extra: Optional[Mapping[str, str]] = None) -> List[str]:
    """Every import that breaks the table; ``extra`` adds files (path -> source) to check."""
    bad = []
    sources = {path: _read(path) for path in _dtrain_files()}
    for path, source in {**sources, **(extra or {})}.items():
        parts = _module_parts(path)
        if len(parts) < 2:  # dtrain/__init__.py
            continue
        src = _unit(parts[1])
        for line, module in _imports(path, source):
            top = _top(module)
            if not top:
                continue
            dst = _unit(top)
            if dst == src or (src, dst) in EXCEPTIONS:
                continue
            where = f"{os.path.relpath(path, REPO)}:{line} imports {module}"
            if src not in LAYER_OF or dst not in LAYER_OF:
                bad.append(f"{where}: {src if src not in LAYER_OF else dst!r} has no layer in ARCHITECTURE.md")
            elif LAYER_OF[dst] > LAYER_OF[src]:
                bad.append(f"{where}: points up (layer {LAYER_OF[src]} -> {LAYER_OF[dst]})")
            elif LAYER_OF[dst] == LAYER_OF[src]:
                bad.append(f"{where}: points sideways within layer {LAYER_OF[src]}")
    return sorted(set(bad))


def test_every_import_points_down():
    assert violations() == []


def test_every_package_has_a_layer():
    tops = {
        name[:-3] if name.endswith(".py") else name
        for name in os.listdir(PACKAGE)
        if name not in ("__init__.py", "__pycache__")
    }
    missing = {t for t in tops if _unit(t) not in LAYER_OF}
    assert not missing, f"no layer for {sorted(missing)}: add them to LAYERS and to ARCHITECTURE.md"
    assert len(EXCEPTIONS) <= 3, "at most three listed exceptions"


def test_architecture_md_shows_the_enforced_table():
    """ARCHITECTURE.md's layer table lists, layer by layer, exactly the names of LAYERS."""
    with open(os.path.join(REPO, "ARCHITECTURE.md"), encoding="utf-8") as f:
        text = f.read()
    rows = re.findall(r"^\|\s*(\d+)\s*\|([^|]*)\|", text, flags=re.M)
    assert rows, "ARCHITECTURE.md has no layer table (| n | `name`, ... | ...)"
    documented = {int(n): tuple(sorted(re.findall(r"`([a-z_0-9]+)/?`", names))) for n, names in rows}
    enforced = {i: tuple(sorted(names)) for i, names in enumerate(LAYERS)}
    assert documented == enforced


@pytest.mark.parametrize(
    "source, expected",
    [
        ("from ..train.loop import Trainer", "points up"),
        ("from ..comm.collective import Group", "points sideways"),
    ],
)
def test_the_check_catches_an_upward_and_a_sideways_import(source, expected):
    """The check can fail: a control module that imports training code or the data plane is caught,
    inside a function as well as at module level."""
    probe = os.path.join(PACKAGE, "control", "_layer_probe.py")
    for text in (source, "def late():\n    " + source):
        found = [v for v in violations({probe: text + "\n"}) if "_layer_probe" in v]
        assert len(found) == 1 and expected in found[0], found
