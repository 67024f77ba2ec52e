"""Atom keep rules: each expert's best atoms at one width (uniform form) or one ranking over all layers /
experts / neurons (HEAPr's global form; scope "layer": per layer). Pure functions over [E, I] score tensors."""

from __future__ import annotations

import torch

from ..errors import MumoeError
from .experts import check_ratio


def uniform_width(I: int, ratio: float, multiple: int = 8) -> int:
    """Kept width for the uniform form: (1 − ratio)·I rounded to a multiple of `multiple` (at least one)."""
    check_ratio(ratio)
    step = multiple if I >= multiple else 1
    return max(step, int(round((1 - ratio) * I / step)) * step)


def _rank(scores: torch.Tensor) -> torch.Tensor:
    """Row-wise order, best first; a stable sort keeps the lower index first among ties. [E, I] -> [E, I]"""
    return torch.argsort(-scores.double(), dim=-1, stable=True)


def keep_uniform_atoms(scores: torch.Tensor, ratio: float, multiple: int = 8) -> torch.Tensor:
    """Each expert's best I' atoms, sorted. scores [E, I] -> LongTensor [E, I']"""
    width = uniform_width(scores.shape[-1], ratio, multiple)
    return torch.sort(_rank(scores)[:, :width], dim=-1).values


def keep_global_atoms(scores: list[torch.Tensor], ratio: float, scope: str = "global") -> list[torch.Tensor]:
    """Keep masks [E, I] per layer after removing the lowest `ratio` of atoms, ranked over all layers
    (scope="global", HEAPr) or within each layer (scope="layer"). Ties: lower layer/expert/neuron kept."""
    check_ratio(ratio)
    if scope == "layer":
        return [keep_global_atoms([s], ratio)[0] for s in scores]
    if scope != "global":
        raise MumoeError(f"unknown atom ranking scope {scope!r}; use global or layer")
    flat = torch.cat([s.double().flatten() for s in scores])
    n_drop = int(round(ratio * flat.numel()))
    # lowest score first; among ties the higher position goes first, so lower indices are kept
    order = torch.arange(flat.numel() - 1, -1, -1)
    order = order[torch.argsort(flat[order], stable=True)]
    keep = torch.ones(flat.numel(), dtype=torch.bool)
    keep[order[:n_drop]] = False
    out, start = [], 0
    for s in scores:
        out.append(keep[start : start + s.numel()].view(s.shape))
        start += s.numel()
    return out
