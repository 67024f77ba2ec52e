"""Budgets -> keep sets. Pure functions over score tensors; no model access.

Per-layer uniform budget (the only form HF/vLLM configs express): drop round(ratio * E) experts in every
layer. Group-limited routers (DeepSeek-V3 n_group/topk_group) drop equally in every group.
"""

from __future__ import annotations

import math

import torch

from ..errors import MumoeError


def check_ratio(ratio) -> float:
    """ratio: the fraction removed, a number in [0, 1)."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio):
        raise MumoeError(f"ratio must be a number in [0, 1), got {ratio!r}")
    if not (0.0 <= ratio < 1.0):
        raise MumoeError(f"ratio must be in [0, 1), got {ratio}")
    return float(ratio)


def rank(scores: torch.Tensor, prune_highest: bool = False) -> torch.Tensor:
    """Indices from most to least worth keeping; ties broken by index (deterministic). [E] -> [E]"""
    s = scores.double()
    key = s if prune_highest else -s  # ascending key = keep first
    order = torch.argsort(torch.arange(len(s), dtype=torch.float64), stable=True)
    return order[torch.argsort(key[order], stable=True)]


def keep_uniform(
    scores: torch.Tensor,
    ratio: float,
    top_k: int,
    n_group: int | None = None,
    topk_group: int | None = None,
    prune_highest: bool = False,
) -> list[int]:
    """Sorted expert indices to keep in one layer. scores [E] (higher = keep unless prune_highest)."""
    E = scores.numel()
    drop = round(check_ratio(ratio) * E)
    keep = E - drop
    if keep < top_k:
        raise MumoeError(f"ratio {ratio} keeps {keep} of {E} experts, fewer than top_k={top_k}")
    if not n_group or n_group <= 1:
        return sorted(rank(scores, prune_highest)[:keep].tolist())
    if drop % n_group:
        raise MumoeError(f"group-limited router: dropping {drop} experts is not divisible by n_group={n_group}; "
                         f"choose a ratio that drops a multiple of {n_group} experts")
    per_group = E // n_group
    keep_per_group = per_group - drop // n_group
    if keep_per_group < 2 or keep_per_group * (topk_group or n_group) < top_k:
        raise MumoeError(f"group-limited router: {keep_per_group} experts per group leave fewer than top_k={top_k} "
                         f"reachable (topk_group={topk_group}) or < 2 per group")
    kept: list[int] = []
    for g in range(n_group):
        local = rank(scores[g * per_group : (g + 1) * per_group], prune_highest)[:keep_per_group]
        kept += (local + g * per_group).tolist()
    return sorted(kept)


def keep_global(
    scores: list[torch.Tensor],
    ratio: float,
    top_k: list[int],
    prune_highest: bool = False,
) -> list[list[int]]:
    """One ranking over every layer's experts: drop round(ratio * ΣE) with the lowest normalized scores.

    Scores are made comparable across layers by dividing each layer's by the sum of its absolute values;
    no layer goes below its top_k floor. Returns the sorted keep set of each layer."""
    check_ratio(ratio)
    total = sum(s.numel() for s in scores)
    drop = round(ratio * total)
    floor_room = sum(s.numel() - k for s, k in zip(scores, top_k))
    if drop > floor_room:
        raise MumoeError(f"ratio {ratio} drops {drop} experts but only {floor_room} can go with a floor of top_k per layer")
    cand = []  # (key, layer, expert): ascending key = dropped first
    for layer, s in enumerate(scores):
        norm = s.double() / s.double().abs().sum().clamp(min=1e-300)
        order = rank(s, prune_highest).tolist()[::-1]  # least worth keeping first
        for pos, e in enumerate(order):
            key = -float(norm[e]) if prune_highest else float(norm[e])
            cand.append((key, layer, pos, e))
    cand.sort()
    kept = [set(range(s.numel())) for s in scores]
    dropped = 0
    for _, layer, _, e in cand:
        if dropped == drop:
            break
        if len(kept[layer]) > top_k[layer]:
            kept[layer].discard(e)
            dropped += 1
    return [sorted(k) for k in kept]
