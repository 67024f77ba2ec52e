"""Shared by the benchmarks that run authors' code beside mumoe's (`merge_authors.py`, `owl_authors.py`): mumoe
computes here and saves what the authors' functions need; the same script re-runs itself under the authors' venv
with --theirs FILE and prints one JSON line back. Only the standard library here: it is imported in both venvs."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import tempfile
import types
from collections.abc import Callable
from pathlib import Path


def run_beside(python: str, script: str, args: list[str], ours: Callable[[Path], None]) -> dict:
    """ours(FILE) here, then `python script *args --theirs FILE` in the authors' venv -> its last stdout line, as
    JSON. Exits with its stderr if it fails."""
    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / "ours.pt"
        ours(file)
        p = subprocess.run([python, script, *args, "--theirs", str(file)], capture_output=True, text=True)
        if p.returncode:
            sys.exit(p.stderr[-4000:])
        return json.loads(p.stdout.strip().splitlines()[-1])


def top_level_functions(path: Path) -> dict[str, ast.FunctionDef]:
    """A source file's top-level functions by name (parsed, not imported: its module-level imports may not run)."""
    return {n.name: n for n in ast.parse(path.read_text()).body if isinstance(n, ast.FunctionDef)}


def function_from(path: Path, fn: str, env: dict) -> types.FunctionType:
    """One top-level function of a file whose module-level imports cannot run here (relative imports), its source
    executed unmodified with the names it uses."""
    exec(compile(ast.Module([top_level_functions(path)[fn]], []), str(path), "exec"), env)
    return env[fn]


def write_results(path: Path, report: dict) -> None:
    """The comparison's results as JSON at `path` (its folder made), and a line saying so."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1))
    print(f"wrote {path}")
