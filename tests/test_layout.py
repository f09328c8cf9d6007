"""The package stays readable: no class over 250 lines of code and no function over 60 (docstrings, comments and
signatures not counted: a callback's typed arguments, one a line, are its interface), and every logged name comes from
one module."""

import ast
import re
from pathlib import Path

import pytest

from lightning_stiffness import names

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_stiffness"
SOURCES = sorted(PACKAGE.rglob("*.py"))


def _docstring_lines(node: ast.AST) -> set[int]:
    lines: set[int] = set()
    for inner in ast.walk(node):
        body = getattr(inner, "body", None)
        if isinstance(inner, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and body:
            first = body[0]
            if (
                isinstance(first, ast.Expr)
                and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str)
            ):
                lines |= set(range(first.lineno, first.end_lineno + 1))
    return lines


def _signature_lines(node: ast.AST) -> set[int]:
    """The lines of every function's decorators and signature inside ``node`` (its own included)."""
    lines: set[int] = set()
    for inner in ast.walk(node):
        if isinstance(inner, (ast.FunctionDef, ast.AsyncFunctionDef)):
            first = min([inner.lineno, *(d.lineno for d in inner.decorator_list)])
            lines |= set(range(first, inner.body[0].lineno))
    return lines


def _code_lines(node: ast.AST, source: list[str]) -> int:
    # A function's or a class's code: its signatures (a callback's typed arguments, one a line) are its interface.
    span = set(range(node.lineno, node.end_lineno + 1)) - _docstring_lines(node) - _signature_lines(node)
    return sum(1 for n in span if source[n - 1].strip() and not source[n - 1].strip().startswith("#"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_classes_and_functions_stay_small(path):
    source = path.read_text().splitlines()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ClassDef):
            assert _code_lines(node, source) <= 250, f"class {node.name} has over 250 lines of code"
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            assert _code_lines(node, source) <= 60, f"{node.name} has over 60 lines of code"


TAG_LITERAL = re.compile(r"""f?["']stiffness/\{""")


@pytest.mark.parametrize("path", [p for p in SOURCES if p.name != "names.py"], ids=lambda p: p.name)
def test_tags_are_built_only_in_the_names_module(path):
    assert not TAG_LITERAL.search(path.read_text()), "build tags with lightning_stiffness.names"


def test_names_are_the_documented_ones():
    # The contract users' dashboards and monitors depend on (see the README's table of logged names).
    assert names.class_tag("train-val", "sign", "between") == "stiffness/train-val/sign/between_class"
    assert names.critical_distance_tag("val-val") == "stiffness/val-val/critical_distance/input"
    assert names.critical_distance_tag("val-val", "net.2") == "stiffness/val-val/critical_distance/net.2"
    assert names.layer_class_tag("train-train", "cosine", "net.0", "within") == (
        "stiffness/train-train/cosine/by_layer/net.0/within_class"
    )
    assert names.probe_seconds_tag() == "stiffness/probe_seconds"
    assert names.class_matrix_tag("train-train", "cosine") == "stiffness/train-train/cosine/class_matrix"
    assert names.distance_curve_tag("train-val") == "stiffness/train-val/distance_curve"
    assert names.distance_curve_tag("train-val", "net.2") == "stiffness/train-val/distance_curve/net.2"
    assert names.by_layer_tag("val-val") == "stiffness/val-val/by_layer"
    assert names.critical_distance_by_layer_tag("val-val") == "stiffness/val-val/critical_distance_by_layer"
    assert names.raw_file_name(3, 120) == "epoch=3-step=120.pt"
    assert (
        names.class_tag("train-train", "cosine", "within", prefix="sign50") == "sign50/train-train/cosine/within_class"
    )
    assert (names.KINDS, list(names.PAIRS), names.DISTANCE_METRICS) == (
        ("cosine", "sign"),
        ["train-train", "train-val", "val-val"],
        ("cosine", "euclidean"),
    )
