"""The shape of the source tree: small modules, small classes, and imports that run downwards."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import ciss

SRC = Path(ciss.__file__).resolve().parent
MAX_FILE_LINES = 400
MAX_CLASS_LINES = 250


def _sources() -> list[Path]:
    return sorted(SRC.rglob("*.py"))


def test_no_source_file_is_over_the_line_limit():
    long = {p.relative_to(SRC).as_posix(): n for p in _sources()
            if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES}
    assert not long, f"files over {MAX_FILE_LINES} lines (split them by concept): {long}"


def test_no_class_is_over_the_line_limit():
    long = {}
    for p in _sources():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ClassDef):
                start = min([node.lineno] + [d.lineno for d in node.decorator_list])
                if (n := node.end_lineno - start + 1) > MAX_CLASS_LINES:
                    long[f"{p.relative_to(SRC).as_posix()}:{node.name}"] = n
    assert not long, f"classes over {MAX_CLASS_LINES} lines (compose smaller parts): {long}"


def test_the_scenario_imports_no_concrete_dataset():
    code = ("import sys, ciss.scenario; "
            "print(sorted(m for m in sys.modules if m.startswith('ciss.data.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert ast.literal_eval(out.stdout) == ["ciss.data.base", "ciss.data.errors"]
