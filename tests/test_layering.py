"""The layering contract: lossympi stands alone, and its users touch only its public API.

Two checks, both run by ``python -m pytest`` (and so by CI):

- ``lint-imports`` with the contracts of ``pyproject.toml`` (``[tool.importlinter]``): lossympi never imports
  aggregathor, TensorFlow or Keras; aggregathor imports no private lossympi module.
- An ``ast`` scan of ``aggregathor/``, ``tools/`` and ``lossympi/bench/`` for what an import graph cannot see:
  the compiled ``lossympi._core``, private names (``from lossympi.endpoint import _x``), attribute chains
  (``lossympi._core.X``) and module names in strings (``importlib.import_module("lossympi._x")``).
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: Directories whose code may use only lossympi's public API.
SCANNED = ("aggregathor", "tools", "lossympi/bench")
#: Build tooling for the Cython core itself: it compiles and probes ``lossympi._core`` by name.
EXEMPT = {"tools/sanitize_build.py"}
#: The package whose own private modules a scanned directory may use (its private modules are its own).
OWN_PACKAGE = {"lossympi/bench": "lossympi.bench"}
#: A dotted lossympi module name, as written in a string.
_MODULE_STRING = re.compile(r"lossympi(?:\.[A-Za-z_]\w*)+")


def _private(part: str) -> bool:
    return part.startswith("_") and not (part.startswith("__") and part.endswith("__"))


def private_uses(source: str, module: str, own_package: str | None = None) -> list[tuple[int, str]]:
    """``(line, dotted name)`` for each private lossympi name that ``source`` uses.

    ``module`` is the dotted name of the file (for relative imports). A name is private when a component after
    ``lossympi`` starts with ``_`` (dunders excepted). Names inside ``own_package`` are allowed, except
    ``lossympi.bench._common`` (renamed ``lossympi.bench.common``), which is refused everywhere.
    """
    found: list[tuple[int, str]] = []

    def check(line: int, name: str) -> None:
        parts = name.split(".")
        if parts[0] != "lossympi" or not any(_private(p) for p in parts[1:]):
            return
        if name.startswith("lossympi.bench._common"):
            found.append((line, name))
        elif own_package is None or not name.startswith(own_package + "."):
            found.append((line, name))

    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                check(node.lineno, alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")[: -node.level]
                base = ".".join([*anchor, base] if base else anchor)
            check(node.lineno, base)
            for alias in node.names:
                check(node.lineno, f"{base}.{alias.name}")
        elif isinstance(node, ast.Attribute):
            chain = [node.attr]
            value = node.value
            while isinstance(value, ast.Attribute):
                chain.append(value.attr)
                value = value.value
            if isinstance(value, ast.Name):
                check(node.lineno, ".".join([value.id, *reversed(chain)]))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            if _MODULE_STRING.fullmatch(node.value):
                check(node.lineno, node.value)
    return sorted(set(found))


def _scanned_files() -> list[Path]:
    files: list[Path] = []
    for top in SCANNED:
        files += sorted((ROOT / top).rglob("*.py"))
    return [f for f in files if f.relative_to(ROOT).as_posix() not in EXEMPT]


def test_no_private_lossympi_use_outside_lossympi() -> None:
    bad: list[str] = []
    for path in _scanned_files():
        rel = path.relative_to(ROOT).as_posix()
        own = next((pkg for top, pkg in OWN_PACKAGE.items() if rel.startswith(top + "/")), None)
        module = rel[: -len(".py")].replace("/", ".")
        for line, name in private_uses(path.read_text(), module, own):
            bad.append(f"{rel}:{line}: {name}")
    assert not bad, "private lossympi names used outside lossympi (use its public API):\n" + "\n".join(bad)


@pytest.mark.parametrize(
    "source",
    [
        "from lossympi import _core",
        "import lossympi._core as core",
        "from lossympi._core import REJECT_REASONS",
        "from lossympi.endpoint import Endpoint, _helper",
        "import lossympi\nx = lossympi._core.REJECT_REASONS",
        "import importlib\nimportlib.import_module('lossympi._ethtool')",
        "from lossympi.bench._common import CpuMeter",
        "from lossympi.bench import _gather_worker",
    ],
)
def test_scan_flags_private_use(source: str) -> None:
    assert private_uses(source, "aggregathor.somewhere"), source


def test_scan_allows_public_use_and_own_privates() -> None:
    public = "import lossympi\nfrom lossympi.endpoint import Endpoint\nfrom lossympi.bench.common import table\n"
    public += "print(lossympi.__version__)\n"
    assert private_uses(public, "aggregathor.somewhere") == []
    own = "from lossympi.bench import _gather_worker\nfrom ._gather_worker import main\n"
    assert private_uses(own, "lossympi.bench.gather", "lossympi.bench") == []
    assert private_uses("from ._common import log", "lossympi.bench.gather", "lossympi.bench")


def test_import_linter_contracts_kept() -> None:
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    assert exe, 'lint-imports is missing: pip install -e ".[dev]" installs import-linter'
    done = subprocess.run([exe, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "3 kept, 0 broken" in done.stdout, done.stdout[-2000:]


def foreign_private_attributes(source: str, package: str = "aggregathor") -> list[str]:
    """``obj._name`` reads of another object's private state (``comm._incast``, ``ep._x`` ...): on anything but
    ``self``, ``cls``, the classes the module defines and the names it imports from its own ``package``."""
    tree = ast.parse(source)
    own = {n.name for n in ast.walk(tree) if isinstance(n, ast.ClassDef)} | {"self", "cls"}
    own |= {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
            and (n.level or (n.module or "").startswith(package)) for a in n.names}
    return [ast.unparse(n) for n in ast.walk(tree)
            if isinstance(n, ast.Attribute) and n.attr.startswith("_") and not n.attr.startswith("__")
            and not (isinstance(n.value, ast.Name) and n.value.id in own)]


def test_no_foreign_private_attributes_in_aggregathor_tools_and_benchmarks() -> None:
    files = [*(ROOT / "aggregathor").rglob("*.py"), *(ROOT / "tools").glob("*.py"),
             *(ROOT / "lossympi" / "bench").glob("*.py")]
    found = {str(p.relative_to(ROOT)): bad for p in files
             if (bad := foreign_private_attributes(p.read_text(), "lossympi.bench" if "bench" in p.parts
                                                   and "lossympi" in p.parts else "aggregathor"))}
    assert found == {}, found


def test_foreign_private_attribute_scan_flags_what_it_names() -> None:
    assert foreign_private_attributes("comm._incast(3)") == ["comm._incast"]
    assert foreign_private_attributes("class A:\n    _n = 1\nA._n\nself._x") == []
    assert foreign_private_attributes("from aggregathor.x import _K\n_K._d") == []
    assert foreign_private_attributes("from lossympi.comm import Comm\nComm._seq") == ["Comm._seq"]
