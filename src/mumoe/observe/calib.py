"""Calibration (and perplexity) windows, as docs/cli.md states them (sources, windows, seeds).

The text is tokenized once with `add_special_tokens=False` and cut into consecutive non-overlapping
windows of `seqlen` tokens (the remainder is dropped); the first `nsamples` are used, or — when a seed is
given — `nsamples` random windows drawn Wanda-style (random start offsets, seeded).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from ..errors import MumoeError, MumoeFileError
from ..files import read_utf8
from ..paths import DATA, bundled_domains


def read_text(path: str | Path) -> str:
    """A .txt file, or every *.txt of a folder (sorted by name, joined by a blank line).

    "domain" names the bundled calibration splits of every domain (mixed), "domain:NAME" one domain's."""
    if str(path) == "domain" or str(path).startswith("domain:"):
        name = str(path).partition(":")[2]
        files = sorted(DATA.glob(f"{name or '*'}/calib.txt"))
        if not files:
            known = ", ".join(sorted(p.parent.name for p in DATA.glob("*/calib.txt")))
            raise MumoeError(f"no bundled calibration split {name!r}; known: {known}")
        return "\n\n".join(read_utf8(f) for f in files)
    p = Path(path)
    _regular(p)
    if p.is_dir():
        files = sorted(p.rglob("*.txt"))
        if not files:
            raise MumoeError(f"calibration folder {p} holds no .txt files")
        text = "\n\n".join(read_utf8(f) for f in files)
    elif p.is_file():
        text = read_utf8(p)
    else:
        raise MumoeFileError(f"text not found: {p}")
    if not text.strip():
        raise MumoeError(f"calibration text {p} is empty")
    return text


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """Tokenize the whole text once. -> LongTensor [n]"""
    if not text.strip():
        raise MumoeError("text is empty")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def windows(ids: torch.Tensor, seqlen: int, nsamples: int | None = None, seed: int | None = None) -> torch.Tensor:
    """Cut token ids [n] into windows. -> LongTensor [N, seqlen]

    seed=None: the first `nsamples` consecutive non-overlapping windows (all when nsamples is None).
    seed=int: `nsamples` windows at seeded random offsets (may overlap), as in Wanda's calibration.
    """
    if seqlen < 2:
        raise MumoeError(f"seqlen must be >= 2, got {seqlen}")
    ids = ids.reshape(-1)
    n_full = ids.numel() // seqlen
    if n_full == 0:
        raise MumoeError(f"text has {ids.numel()} tokens, fewer than one window of seqlen={seqlen}")
    if seed is None:
        n = n_full if nsamples is None else min(nsamples, n_full)
        return ids[: n * seqlen].view(n, seqlen).clone()
    if nsamples is None:
        raise MumoeError("random windows need nsamples")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen + 1, (nsamples,), generator=gen)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])


def calibration_windows(tokenizer, source: str | Path, nsamples: int, seqlen: int, seed: int | None = None) -> torch.Tensor:
    """Text file/folder -> LongTensor [N, seqlen] of calibration windows."""
    return windows(tokenize(tokenizer, read_text(source)), seqlen, nsamples, seed)


def expand_sources(sources) -> list[str]:
    """'domain' -> one 'domain:NAME' per bundled domain (sorted); everything else unchanged."""
    out = []
    for s in sources:
        out += [f"domain:{d}" for d in bundled_domains()] if str(s) == "domain" else [str(s)]
    return out


def check_sources(sources, read: bool = True) -> None:
    """Fail on a missing calibration text (read=True: also an empty or unreadable one) before any model is
    loaded; read=False only looks for the files."""
    for s in expand_sources(sources):
        if s in ("tensor", "text"):
            continue
        if read:
            read_text(s)
        elif s.startswith("domain:"):
            _check_domain(s)
        elif not Path(s).exists():
            raise MumoeError(f"calibration text not found: {s}")
        else:
            _regular(Path(s))


def _regular(p: Path) -> None:
    """A calibration path that exists but is neither a file nor a folder (a FIFO, /dev/null, a socket): one
    line saying so — never read (a FIFO would block), never reported as missing."""
    if p.exists() and not p.is_file() and not p.is_dir():
        raise MumoeFileError(f"calibration text {p} is not a regular file (a device, FIFO or socket); give a .txt "
                             "file or a folder of them")


def _check_domain(source: str) -> None:
    name = source.partition(":")[2]
    if not (DATA / name / "calib.txt").exists():
        raise MumoeError(f"no bundled calibration split {name!r}; known: {', '.join(bundled_domains())}")


def spec_windows(tokenizer, spec) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """A CalibSpec -> (windows [N, seqlen], source index of each window [N], info for pruning.json).
    nsamples is split evenly over the sources; each source is tokenized once on its own."""
    sources = expand_sources(spec.sources)
    counts = replace(spec, sources=tuple(sources)).per_source()
    texts = [read_text(src) for src in sources]  # missing / empty / unreadable texts first, each read once
    if tokenizer is None:
        raise MumoeError("calibration text needs a tokenizer, and this model has none (no tokenizer.json or "
                         "tokenizer_config.json in its folder): copy the tokenizer files of the model it came from "
                         "beside its config.json, or pass token ids [N, L]")
    wins, groups = [], []
    for i, (text, n) in enumerate(zip(texts, counts)):
        w = windows(tokenize(tokenizer, text), spec.seqlen, n, spec.seed)
        wins.append(w)
        groups.append(torch.full((w.shape[0],), i, dtype=torch.long))
    ids = torch.cat(wins)
    info = {"source": ",".join(spec.sources), "sources": sources, "nsamples": int(ids.shape[0]),
            "seqlen": spec.seqlen, "seed": spec.seed}
    return ids, torch.cat(groups), info
