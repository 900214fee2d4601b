"""One value, one place: the shared constants are assigned only in their home module, and scft_fast/constants.py
is a leaf (it imports nothing), so every layer, the op layer included, can import it."""
import ast
import pathlib

import pytest

from scft_fast.constants import IGNORE_INDEX

REPO = pathlib.Path(__file__).resolve().parents[1]
HOMES = {"IGNORE_INDEX": "scft_fast/constants.py", "POOLS": "scft_fast/constants.py",
         "BACKENDS": "scft_fast/ops/backends.py", "MIN_CLASSES": "scft_fast/ops/cls_head.py",
         "MAX_CLASSES": "scft_fast/ops/cls_head.py"}
SOURCES = sorted(p for folder in ("scft_fast", "kernels", "tests", "benchmarks") for p in (REPO / folder).rglob("*.py"))


def assigned_names(tree: ast.AST):
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, (ast.AnnAssign, ast.AugAssign)) else []
        for target in targets:
            for name in ast.walk(target):
                if isinstance(name, ast.Name) and isinstance(name.ctx, ast.Store):
                    yield name.id, node.lineno


def ignore_literals(tree: ast.AST):
    for node in ast.walk(tree):
        if (isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) and isinstance(node.operand, ast.Constant)
                and node.operand.value == -IGNORE_INDEX):
            yield node.lineno


def test_constants_is_a_leaf():
    tree = ast.parse((REPO / "scft_fast/constants.py").read_text())
    assert not [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(REPO)))
def test_shared_values_are_assigned_only_at_home(path):
    relative = str(path.relative_to(REPO))
    tree = ast.parse(path.read_text(), filename=relative)
    again = [f"{relative}:{line}: {name}" for name, line in assigned_names(tree)
             if name in HOMES and HOMES[name] != relative]
    assert not again, f"assigned outside their home module (import them instead): {again}"
    if relative != HOMES["IGNORE_INDEX"]:
        literals = [f"{relative}:{line}" for line in ignore_literals(tree)]
        assert not literals, f"{IGNORE_INDEX} written out instead of IGNORE_INDEX: {literals}"
