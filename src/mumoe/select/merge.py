"""Grouping rules of the merge grain: expert features -> groups of experts merged into one. Pure functions.

    average_linkage   HC-SMoE: agglomerative clustering, Euclidean distance, average linkage, to M clusters
"""

from __future__ import annotations

import torch

from ..errors import MumoeError


def merged_count(num_experts: int, ratio: float, top_k: int) -> int:
    """M = round((1 − ratio)·E) merged experts per layer; at least top_k (a token's k slots need k experts)."""
    M = num_experts - round(ratio * num_experts)
    if M < top_k:
        raise MumoeError(f"ratio {ratio} merges {num_experts} experts into {M}, fewer than top_k={top_k}")
    return M


def average_linkage(features: torch.Tensor, M: int) -> list[list[int]]:
    """Agglomerative clustering of the rows of features [E, D] into M clusters: start from singletons, merge the
    two clusters with the smallest average pairwise Euclidean distance between their members until M remain
    (ties: the pair whose smaller members come first). -> clusters, each its sorted member ids, ordered by their
    smallest member."""
    E = features.shape[0]
    if not 1 <= M <= E:
        raise MumoeError(f"cannot group {E} experts into {M}")
    x = features.double()
    sums = torch.cdist(x, x)  # [E, E] sums of member distances between clusters (singletons: the distances)
    sizes = torch.ones(E, dtype=torch.float64)
    alive = torch.ones(E, dtype=torch.bool)
    clusters: list[list[int]] = [[i] for i in range(E)]
    upper = torch.ones(E, E, dtype=torch.bool).triu(1)
    for _ in range(E - M):
        avg = sums / torch.outer(sizes, sizes)  # average linkage
        valid = upper & alive[:, None] & alive[None, :]
        avg = torch.where(valid, avg, torch.full_like(avg, float("inf")))
        flat = int(torch.argmin(avg))  # first minimum in row-major order: ties go to the smallest (a, b)
        a, b = divmod(flat, E)  # a < b: b joins a (a keeps the cluster's smallest member)
        sums[a, :] += sums[b, :]
        sums[:, a] += sums[:, b]
        sizes[a] += sizes[b]
        alive[b] = False
        clusters[a] = sorted(clusters[a] + clusters[b])
    return [clusters[a] for a in range(E) if alive[a]]
