"""Grains of pruning, one strategy each (`grains.base.Grain`): the registry the recipe and the drivers read.

    expert   whole routed experts (`grains.expert`)
    atom     single expert neurons, HEAPr's atomic experts (`grains.atom`)
    weight   single weights of every linear (`grains.weight`)
    merge    groups of experts merged into one (`grains.merge`)

A new grain is one module beside these and one line below; nothing else names a grain.
"""

from __future__ import annotations

from ..errors import MumoeError
from .atom import AtomGrain, AtomPart, AtomPlan
from .base import Grain, LayerwiseHooks, Plan
from .expert import ExpertGrain, ExpertPart, ExpertPlan
from .merge import MergeGrain, MergePart, MergePlan
from .weight import WeightGrain, WeightPart, WeightPlan

GRAINS: dict[str, Grain] = {g.name: g for g in (ExpertGrain(), AtomGrain(), WeightGrain(), MergeGrain())}


def get_grain(name: str) -> Grain:
    if name not in GRAINS:
        raise MumoeError(f"unknown grain {name!r}; known: {', '.join(GRAINS)}")
    return GRAINS[name]


__all__ = ["GRAINS", "get_grain", "Grain", "Plan", "LayerwiseHooks", "ExpertGrain", "ExpertPart", "ExpertPlan",
           "AtomGrain", "AtomPart", "AtomPlan", "WeightGrain", "WeightPart", "WeightPlan", "MergeGrain", "MergePart",
           "MergePlan"]
