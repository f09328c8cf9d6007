"""Imports run one way: ``callback`` and ``report`` use ``measures``, ``images`` and ``gram``; ``images`` uses
``measures``; ``measures`` uses ``gram``; ``gram`` uses nothing above it; the drawing side imports no torch.

Read from the code with ``ast`` (every ``import`` anywhere in a module, also inside functions and ``TYPE_CHECKING``
blocks), and checked once more in fresh interpreters for what an import really loads.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_stiffness"
LIGHTNING = ("lightning", "pytorch_lightning")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports (``from a.b import c`` counts as ``a.b``), relative imports resolved."""
    package = _module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            found.add(".".join([*base, *([node.module] if node.module else [])]))
    return found


def _within(name: str, *prefixes: str) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)


def _sources(folder: str) -> list[Path]:
    return sorted((PACKAGE / folder).rglob("*.py"))


def _ours(path: Path) -> set[str]:
    return {name for name in _imports(path) if _within(name, "lightning_stiffness")}


def _ids(paths: list[Path]) -> list[str]:
    return [str(p.relative_to(PACKAGE)) for p in paths]


@pytest.mark.parametrize("path", _sources("gram"), ids=_ids(_sources("gram")))
def test_gram_imports_nothing_of_the_package_outside_gram(path):
    assert {name for name in _ours(path) if not _within(name, "lightning_stiffness.gram")} == set()


MEASURES_MAY_USE = ("lightning_stiffness.measures", "lightning_stiffness.gram", "lightning_stiffness.names")
MEASURES_MAY_USE += ("lightning_stiffness.exceptions",)


@pytest.mark.parametrize("path", _sources("measures"), ids=_ids(_sources("measures")))
def test_measures_are_pure_torch_and_use_only_gram(path):
    imports = _imports(path)
    assert {name for name in imports if _within(name, *LIGHTNING)} == set(), "measures import no Lightning"
    assert {name for name in _ours(path) if not _within(name, *MEASURES_MAY_USE)} == set()


@pytest.mark.parametrize("path", _sources("images"), ids=_ids(_sources("images")))
def test_images_use_neither_the_callback_nor_the_report(path):
    banned = ("lightning_stiffness.callback", "lightning_stiffness.report")
    assert {name for name in _ours(path) if _within(name, *banned)} == set()


def test_the_drawing_side_imports_no_torch_and_nothing_of_the_package():
    # The render worker imports the drawing module alone (and the package's __init__ files on the way).
    for path in (PACKAGE / "images" / "drawing.py", PACKAGE / "images" / "__init__.py", PACKAGE / "__init__.py"):
        imports = _imports(path)
        assert {name for name in imports if _within(name, "torch", "torchmetrics", *LIGHTNING)} == set(), path
    assert _ours(PACKAGE / "images" / "drawing.py") == set()
    assert _ours(PACKAGE / "images" / "__init__.py") == set()


@pytest.mark.parametrize("path", _sources("report"), ids=_ids(_sources("report")))
def test_the_report_does_not_use_the_callback(path):
    assert {name for name in _ours(path) if _within(name, "lightning_stiffness.callback")} == set()
    assert {name for name in _imports(path) if _within(name, *LIGHTNING)} == set()


@pytest.mark.parametrize("name", ["names.py", "exceptions.py", "lightning_compat.py", "deprecation.py"])
def test_the_ground_floor_imports_nothing_of_the_package(name):
    assert _ours(PACKAGE / name) == set()


def _loaded_after(code: str) -> set[str]:
    """The top-level packages loaded in a fresh interpreter after running ``code``."""
    script = f"import sys\n{code}\nprint(' '.join(sorted({{m.split('.')[0] for m in sys.modules}})))"
    output = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    return set(output.split())


def test_what_imports_really_load():
    assert "torch" not in _loaded_after("import lightning_stiffness.images.drawing")  # the render worker
    measures = ", ".join(f"lightning_stiffness.measures.{p.stem}" for p in _sources("measures") if p.stem != "__init__")
    assert not _loaded_after(f"import lightning_stiffness.functional, {measures}") & set(LIGHTNING)
    # The report reads results as plain data: neither Lightning nor torchmetrics.
    assert not _loaded_after("import lightning_stiffness.report") & {*LIGHTNING, "torchmetrics"}
