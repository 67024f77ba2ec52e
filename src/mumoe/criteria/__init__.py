"""Pure scoring functions: statistics + weights -> one score tensor per MoE layer.

Each method is registered with how it is read (higher = keep, or prune the highest), its grain and whether
it needs calibration data. Methods arrive family by family; `random` is the seeded baseline.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import MumoeError


@dataclass(frozen=True)
class Method:
    name: str
    grain: str  # "expert" | "atom" | "weight"
    needs_calib: bool
    prune_highest: bool
    score: Callable  # (model, layers, calib windows [N, L] | None, seed) -> list[Tensor [E]]
    description: str


def random_scores(model, layers, calib=None, seed: int = 0) -> list[torch.Tensor]:
    """Seeded uniform scores, one generator per call so results do not depend on global RNG state."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.rand(layer.num_experts, generator=gen, dtype=torch.float64) for layer in layers]


METHODS: dict[str, Method] = {
    "random": Method("random", "expert", False, False, random_scores, "seeded random expert scores (baseline)"),
}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise MumoeError(f"unknown method {name!r}; known: {', '.join(sorted(METHODS))}")
    return METHODS[name]
