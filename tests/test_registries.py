"""Grains, methods and architectures are plug-ins: no code outside their registries asks which one it runs.

Read from the source (like tests/test_layering.py): a grain or method name compared with anything (`grain ==
"expert"`, `m.name in ("heapr", ...)`, `method.startswith("heapr")`), or a dict keyed by grain names, outside
the registries fails; so does an architecture's checkpoint key name (`block_sparse_moe`, Mixtral's w1/w2/w3)
outside `models/`.
"""

import ast
import re
from pathlib import Path

from mumoe.criteria import METHODS
from mumoe.grains import GRAINS

PKG = Path(__file__).resolve().parents[1] / "src" / "mumoe"
NAMES = set(GRAINS) | set(METHODS)
SUBJECT = re.compile(r"grain|method|(^|\.)name$")  # what a dispatch compares a name with

# Architecture key names outside the adapters: none (a file listed here would have to still need its entry).
KEYS_PENDING: set[str] = set()
ARCH_KEYS = re.compile(r"block_sparse_moe|\bw[123]\b")


def _strings(node) -> list[str]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return [s for e in node.elts for s in _strings(e)]
    return []


def name_dispatch(source: str) -> list[str]:
    """Every place in `source` that compares a grain or method name, or keys a dict by grain names."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            names = [s for side in sides for s in _strings(side) if s in NAMES]
            subjects = [ast.unparse(side) for side in sides if not _strings(side)]
            if names and any(SUBJECT.search(s) for s in subjects):
                found.append(ast.unparse(node))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr in ("startswith", "endswith") and SUBJECT.search(ast.unparse(node.func.value))
              and any(n.startswith(s) for a in node.args for s in _strings(a) for n in NAMES)):
            found.append(ast.unparse(node))
        elif isinstance(node, ast.Dict):
            keys = [k.value for k in node.keys if isinstance(k, ast.Constant) and k.value in GRAINS]
            if len(keys) >= 2:
                found.append(ast.unparse(node)[:80])
    return found


def test_no_grain_or_method_name_is_compared_outside_the_registries():
    offenders = {}
    for path in sorted(PKG.rglob("*.py")):
        hits = name_dispatch(path.read_text("utf-8"))
        if hits:
            offenders[str(path.relative_to(PKG))] = hits
    assert len(NAMES) > 15  # the registries were really read
    assert offenders == {}, "names dispatched outside the registries:\n" + "\n".join(
        f"{f}: {h}" for f, hs in offenders.items() for h in hs)


def test_architecture_key_names_stay_in_models():
    offenders = set()
    for path in sorted(PKG.rglob("*.py")):
        rel = str(path.relative_to(PKG))
        if rel.startswith("models/") or rel.startswith("apply/remote/"):
            continue
        if ARCH_KEYS.search(path.read_text("utf-8")):
            offenders.add(rel)
    assert offenders - KEYS_PENDING == set(), f"architecture key names outside models/: {offenders - KEYS_PENDING}"
    assert KEYS_PENDING - offenders == set(), f"no longer needed in KEYS_PENDING: {KEYS_PENDING - offenders}"


def test_the_checks_can_fail():
    """Each pattern the checks look for is found in a hand-written example, and an unrelated comparison is not."""
    assert name_dispatch('if recipe.grain == "expert":\n    pass') == ["recipe.grain == 'expert'"]
    assert name_dispatch('x = m.name in ("heapr", "heapr-token")')
    assert name_dispatch('x = recipe.method.startswith("heapr")')
    assert name_dispatch('x = {"expert": 1, "atom": 2}[g]')
    assert name_dispatch('x = self.method != "wanda"')
    assert name_dispatch('x = key == "weight"') == []  # a tensor's kind, not a grain
    assert name_dispatch('x = m["kind"] == "weight"') == []
    assert ARCH_KEYS.search("model.layers.0.block_sparse_moe.experts.0.w1.weight")
    assert not ARCH_KEYS.search("model.layers.0.mlp.experts.gate_up_proj")
