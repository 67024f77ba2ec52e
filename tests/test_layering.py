"""The package's imports go one way (README → Architecture): no two modules of src/mumoe import each other,
directly or around a loop — function-level imports included, since a lazy import only hides a cycle."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = SRC / "mumoe"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    base = SRC.joinpath(*name.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def imports(path: Path) -> set[str]:
    """Every mumoe module `path` imports, anywhere in the file."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text("utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("mumoe"):
                continue
            subs = [f"{target}.{a.name}" for a in node.names if is_module(f"{target}.{a.name}")]
            out.update(subs)
            if len(subs) < len(node.names):
                out.add(target)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("mumoe"))
    return {m for m in out if m != me and is_module(m)}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Depth-first search: every back edge closes a cycle, reported as the path around it."""
    cycles, state, stack = [], {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == "open":
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)
    return cycles


def test_no_import_cycles():
    graph = {module_name(p): imports(p) for p in PKG.rglob("*.py")}
    graph.pop("mumoe")  # the top package re-exports the API: importing it is importing everything, by design
    for deps in graph.values():
        deps.discard("mumoe")
    assert len(graph) > 60 and sum(map(len, graph.values())) > 150  # the graph was really read
    cycles = find_cycles(graph)
    assert cycles == [], "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_checks_can_fail():
    """A loop is found (also a long one, also beside acyclic parts), and lazy imports are read."""
    assert find_cycles({"a": {"b"}, "b": {"a"}}) == [["a", "b", "a"]]
    assert find_cycles({"a": {"b", "x"}, "b": {"c"}, "c": {"a"}, "x": set()}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    # function-level imports count: export.save_pruned imports `source` inside the function
    assert "mumoe.source" in imports(PKG / "apply" / "export.py")
    assert "mumoe.testtime.experts" in imports(PKG / "serve" / "engine.py")
