"""The merge grain's ratio rule: how many merged experts a layer keeps. (The grouping rules are the methods':
`criteria.merge`.)"""

from __future__ import annotations

from ..errors import MumoeError


def merged_count(num_experts: int, ratio: float, top_k: int) -> int:
    """M = round((1 − ratio)·E) merged experts per layer; at least top_k (a token's k slots need k experts)."""
    M = num_experts - round(ratio * num_experts)
    if M < top_k:
        raise MumoeError(f"ratio {ratio} merges {num_experts} experts into {M}, fewer than top_k={top_k}")
    return M
