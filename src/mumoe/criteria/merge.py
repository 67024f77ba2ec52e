"""Merge-grain methods (pure functions): statistics -> features, and features -> groups of experts merged into one.

    hc_smoe           HC-SMoE's features: each expert's mean output over ALL calibration tokens, [E, H]
    average_linkage   HC-SMoE's grouping: agglomerative clustering, Euclidean distance, average linkage, to M
"""

from __future__ import annotations

import torch

from ..errors import MumoeError
from ..observe.collectors import MeanOutputs


def hc_smoe(st: MeanOutputs) -> torch.Tensor:
    """o_i = (1/T) Σ_t E_i(x_t) over every calibration token (every expert run on every token). -> [E, H]"""
    return st.mean()


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
