"""The shape of the package (issue "The house"): small modules and functions, no test hooks in production."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "oprd_cli"


def _sources():
    return sorted(PKG.rglob("*.py"))


def test_no_module_over_600_lines():
    big = {str(p.relative_to(PKG)): n for p in _sources() if (n := len(p.read_text().splitlines())) > 600}
    assert not big, big


def test_no_function_over_100_lines():
    long = []
    for p in _sources():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                span = node.end_lineno - node.lineno + 1 + len(node.decorator_list)
                if span > 100:
                    long.append(f"{p.relative_to(PKG)}:{node.lineno} {node.name} ({span} lines)")
    assert not long, long


def test_no_test_hook_is_read_by_the_package():
    """Faults are injected by the tests (monkeypatch, wrapper processes, signals), never by variables the
    product reads."""
    hooks = [f"{p.relative_to(PKG)}: {m.group(0)}" for p in _sources()
             for m in re.finditer(r"OPRD_(TEST|LOOP_STOP)\w*", p.read_text())]
    assert not hooks, hooks
    env_reads = {m.group(1) for p in _sources()
                 for m in re.finditer(r"environ(?:\.get)?\(?\[?[\"'](OPRD_\w+)", p.read_text())}
    assert env_reads <= {"OPRD_DEBUG", "OPRD_DEMO_DIR"}, env_reads  # user-facing settings only
