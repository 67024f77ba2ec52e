"""The user-facing docs hold together: every link and anchor resolves, no section is there twice, and every
`mumoe` command they show names a real subcommand and only flags that subcommand accepts."""

import argparse
import re
import shlex
from pathlib import Path

import pytest

from mumoe.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").glob("*.md")),
        ROOT / "src" / "mumoe" / "assets" / "model" / "CARD.md"]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (letters such as μ kept), spaces → '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def headings(text: str) -> list[str]:
    body = FENCE.sub("", text)
    return [m.group(2) for m in re.finditer(r"^(#{1,6}) (.+)$", body, re.M)]


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for h in headings(path.read_text()):
        s = slug(h)
        n = seen.get(s, 0)
        out.add(s if n == 0 else f"{s}-{n}")
        seen[s] = n + 1
    return out


def test_slug_matches_github():
    assert slug("Checkpoints larger than memory: `--layerwise`") == "checkpoints-larger-than-memory---layerwise"
    assert slug("Weight grain: Wanda, magnitude, μ-MoE") == "weight-grain-wanda-magnitude-μ-moe"
    assert slug("Serving: `mumoe serve`") == "serving-mumoe-serve"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve(doc):
    bad = []
    for target in LINK.findall(FENCE.sub("", doc.read_text())):
        if re.match(r"[a-z]+:", target):          # http(s):, mailto: — not checked offline
            continue
        path, _, anchor = target.partition("#")
        dest = (doc.parent / path).resolve() if path else doc
        if not dest.exists():
            bad.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{target}: no heading with that anchor in {dest.name}")
    assert not bad, f"{doc.name}: " + "; ".join(bad)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_section_twice(doc):
    hs = [slug(h) for h in headings(doc.read_text())]
    twice = sorted({h for h in hs if hs.count(h) > 1})
    assert not twice, f"{doc.name}: sections appear twice: {twice}"


def _options(parser) -> dict:
    """{subcommand path: set of option strings}, e.g. {('prune',): {...}, ('taer', 'build'): {...}}."""
    out = {}

    def walk(p, path):
        out[path] = {o for a in p._actions for o in a.option_strings}
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                for name, child in a.choices.items():
                    walk(child, path + (name,))
    walk(parser, ())
    return out


def commands(text: str):
    """Every `mumoe ...` invocation in the fenced blocks, as (line, argv after `mumoe`, the --flags it uses)."""
    for block in FENCE.findall(text):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if line.startswith("$ "):
                line = line[2:]
            m = re.search(r"(?:^|&&\s*|-m\s+)mumoe\s+(.*)$", line)
            if not m or line.startswith(("{", "[", "wrote", "loaded")):
                continue
            rest = m.group(1).split(" #")[0].split(" &&")[0].split(" |")[0].rstrip(" &")
            try:
                argv = shlex.split(rest)
            except ValueError:
                argv = rest.split()
            yield line, argv, re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", rest)


def test_shown_commands_use_real_flags():
    options = _options(build_parser())
    checked, bad = 0, []
    for doc in DOCS:
        for line, argv, flags in commands(doc.read_text()):
            words = [w for w in argv if not w.startswith("-")]
            path = ()
            for w in words:
                if path + (w,) in options:
                    path += (w,)
                else:
                    break
            if not path and argv and not argv[0].startswith("-"):
                bad.append(f"{doc.name}: unknown command in `{line}`")
                continue
            allowed = options[path] | options[()]
            for flag in flags:
                if flag not in allowed:
                    bad.append(f"{doc.name}: `mumoe {' '.join(path)}` has no {flag} (`{line}`)")
            checked += 1
    assert checked >= 30, checked       # the docs do show commands; the parser above found them
    assert not bad, "\n".join(bad)


def test_layout_names_every_module():
    """docs/architecture.md's layout block names every module of src/mumoe (and nothing that is not there)."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    block = re.search(r"^## Layout\n.*?^```\n(.*?)^```", text, re.S | re.M).group(1)
    pkg = ROOT / "src" / "mumoe"
    named, folder = set(), None
    for line in block.splitlines():
        indent = len(line) - len(line.lstrip())
        if indent == 2:
            folder = None
        first = line.split()[0] if line.strip() else ""
        if indent == 2 and first.endswith("/"):
            folder = first
        for word in re.findall(r"(?<![\w./-])([\w/]+\.py)\b", line):
            named.add(word if indent == 2 or folder is None else f"{folder}{word}")
    modules = {str(p.relative_to(pkg)) for p in pkg.rglob("*.py")
               if p.name != "__init__.py" or p.parent == pkg}
    assert modules - named == set(), f"modules the layout does not name: {sorted(modules - named)}"
    assert named - modules == set(), f"the layout names modules that do not exist: {sorted(named - modules)}"
