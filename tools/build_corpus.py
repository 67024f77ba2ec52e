"""Build mumoe's offline multi-domain corpus: prose, docs, code, kernel.

Sources (all offline: Debian packages fetched with `apt-get download`, plus files on the machine):
  prose   Jane Austen's six novels       r-cran-janeaustenr (R data, read with tools/rdata.py), public domain
  docs    Python 3.11 documentation      python3.11-doc (`_sources/*.rst.txt`), PSF license
  code    CPython 3.11 standard library  the running interpreter's Lib/ (.py), PSF license
  kernel  Linux kernel documentation     linux-doc-6.1 (`Documentation/**/*.rst.gz`), GPL-2.0

A document is one file (docs, code, kernel) or one chapter (prose). Documents are shuffled with a fixed
seed and split per domain into eval / calib / train with no overlap. Writes OUT/<domain>/{train.jsonl,
calib.txt, eval.txt} and OUT/manifest.json.

    python tools/build_corpus.py --out /work/cache/corpus
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import random
import re
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from rdata import read_lazyload  # noqa: E402

PACKAGES = {"prose": "r-cran-janeaustenr", "docs": "python3.11-doc", "kernel": "linux-doc-6.1"}
LICENSES = {"prose": "public domain (Jane Austen, d. 1817)", "docs": "PSF-2.0", "code": "PSF-2.0",
            "kernel": "GPL-2.0 (Linux kernel documentation)"}
CODE_EXCLUDE = {"test", "tests", "encodings", "site-packages", "pydoc_data", "idlelib", "__pycache__",
                "lib2to3", "turtledemo"}
MAX_SPLIT_DOC = 40_000  # chars: larger documents always go to train so shipped splits stay small


def fetch_packages(cache: Path) -> Path:
    """apt-get download + dpkg -x the Debian packages into cache/root; returns that root."""
    debs, root = cache / "debs", cache / "root"
    debs.mkdir(parents=True, exist_ok=True)
    root.mkdir(parents=True, exist_ok=True)
    for pkg in PACKAGES.values():
        if not list(debs.glob(f"{pkg}_*.deb")):
            subprocess.run(["apt-get", "download", pkg], cwd=debs, check=True)
        deb = sorted(debs.glob(f"{pkg}_*.deb"))[-1]
        subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True)
    return root


def clean(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\t", "    ")
    text = re.sub(r"[ ]+\n", "\n", text)
    text = re.sub(r"\n{4,}", "\n\n\n", text)
    return text.strip() + "\n"


def prose_documents(root: Path) -> dict[str, str]:
    books = read_lazyload(root / "usr/lib/R/site-library/janeaustenr/data/Rdata")
    docs: dict[str, str] = {}
    for book, lines in sorted(books.items()):
        chapter, buf = 0, []
        for line in lines + ["CHAPTER END"]:
            line = line or ""
            if re.match(r"^\s*(CHAPTER|Chapter)\s+[0-9IVXLC]+", line) or line == "CHAPTER END":
                text = "\n".join(buf).strip()
                if len(text) > 500:
                    docs[f"{book}/ch{chapter:03d}"] = text
                chapter, buf = chapter + 1, []
            else:
                buf.append(line)
    return docs


def docs_documents(root: Path) -> dict[str, str]:
    base = root / "usr/share/doc/python3.11/html/_sources"
    return {str(p.relative_to(base)): p.read_text("utf-8") for p in sorted(base.rglob("*.rst.txt"))}


def code_documents() -> dict[str, str]:
    base = Path(sysconfig.get_paths()["stdlib"])
    docs = {}
    for p in sorted(base.rglob("*.py")):
        rel = p.relative_to(base)
        if CODE_EXCLUDE & set(rel.parts):
            continue
        try:
            docs[str(rel)] = p.read_text("utf-8")
        except UnicodeDecodeError:
            continue
    return docs


def kernel_documents(root: Path) -> dict[str, str]:
    base = root / "usr/share/doc/linux-doc-6.1/Documentation"
    docs = {}
    for p in sorted(base.rglob("*.rst.gz")):
        if "translations" in p.parts:  # non-English
            continue
        try:
            docs[str(p.relative_to(base))] = gzip.decompress(p.read_bytes()).decode("utf-8")
        except UnicodeDecodeError:
            continue
    return docs


def split(docs: dict[str, str], seed: int, eval_chars: int, calib_chars: int, train_cap: int):
    names = sorted(docs)
    random.Random(seed).shuffle(names)
    parts: dict[str, list[str]] = {"eval": [], "calib": [], "train": []}
    size = {"eval": 0, "calib": 0, "train": 0}
    for name in names:
        n = len(docs[name])
        if n < 200:
            continue
        if n <= MAX_SPLIT_DOC and size["eval"] < eval_chars:
            part = "eval"
        elif n <= MAX_SPLIT_DOC and size["calib"] < calib_chars:
            part = "calib"
        elif size["train"] < train_cap:
            part = "train"
        else:
            continue
        parts[part].append(name)
        size[part] += n
    return parts, size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "mumoe-corpus-cache")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-chars", type=int, default=150_000)
    ap.add_argument("--calib-chars", type=int, default=200_000)
    ap.add_argument("--train-cap", type=int, default=12_000_000, help="max train characters per domain")
    args = ap.parse_args()

    root = fetch_packages(args.cache)
    domains = {"prose": prose_documents(root), "docs": docs_documents(root), "code": code_documents(),
               "kernel": kernel_documents(root)}
    manifest = {"seed": args.seed, "domains": {}}
    for name, docs in domains.items():
        docs = {k: clean(v) for k, v in docs.items()}
        parts, size = split(docs, args.seed, args.eval_chars, args.calib_chars, args.train_cap)
        out = args.out / name
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "train.jsonl", "w", encoding="utf-8") as f:
            for d in parts["train"]:
                f.write(json.dumps({"id": d, "text": docs[d]}) + "\n")
        for part in ("calib", "eval"):
            (out / f"{part}.txt").write_text("\n\n".join(docs[d] for d in parts[part]), encoding="utf-8")
        manifest["domains"][name] = {
            "source": PACKAGES.get(name, "CPython stdlib on this machine"),
            "license": LICENSES[name],
            "documents": {p: len(v) for p, v in parts.items()},
            "chars": size,
            "eval_ids_sha256": hashlib.sha256("\n".join(parts["eval"]).encode()).hexdigest()[:16],
            "eval_documents": parts["eval"],
            "calib_documents": parts["calib"],
        }
        print(f"{name:7s} docs={len(docs):5d} " + " ".join(f"{p}={size[p]:,}ch/{len(v)}docs" for p, v in parts.items()))
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=1))


if __name__ == "__main__":
    main()
