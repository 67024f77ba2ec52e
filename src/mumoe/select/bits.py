"""PMQ's bit allocation (MC-MoE / MC#): per MoE layer, one bit width per expert minimising

    Σ_i φ_i^α · w_i^β · L_{i, b_i}^α     subject to  Σ_i b_i ≤ B,  at least one expert at the highest width and
                                                    one at the second highest,

with φ_i the expert's routed count and w_i its summed router weight (each normalised to sum 1 over the layer's
experts), L_{i,b} the layer output's error with only expert i quantized to b bits. Solved exactly by a dynamic
programme over (experts seen, bits spent, highest width used, second highest used) — no ILP solver; the state
space is E × (B + 1) × 4.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from ..errors import MumoeError

ALPHA, BETA = 1.0, 1.5  # MC#'s exponents (their solver's defaults: alpha 1, beta 1.5)
BITS = (1, 2, 3)  # the widths an expert may take (MC#'s default space)


def normalised(values: Sequence[float]) -> list[float]:
    """values / their sum (φ and w as the objective uses them); a layer whose experts all have 0 is refused."""
    total = float(sum(values))
    if not total > 0 or not math.isfinite(total):
        raise MumoeError("PMQ's expert factors sum to zero (no calibration token reached this layer's experts)")
    return [float(v) / total for v in values]


def expert_costs(phi: Sequence[float], w: Sequence[float], loss: Sequence[dict[int, float]],
                 alpha: float = ALPHA, beta: float = BETA) -> list[dict[int, float]]:
    """cost[i][b] = φ_i^α · w_i^β · L_{i,b}^α from normalised φ, w and the per-width losses."""
    return [{b: (p ** alpha) * (q ** beta) * (l_b ** alpha) for b, l_b in li.items()} for p, q, li in zip(phi, w, loss)]


def layer_budget(avg_bits: float, num_experts: int) -> int:
    """A layer's bit budget B = floor(avg_bits · E)."""
    return int(avg_bits * num_experts + 1e-9)


def least_budget(num_experts: int, bits: Sequence[int] = BITS) -> int:
    """The smallest budget an allocation fits in: one expert at the highest width, one at the second highest (when
    there are two widths or more), the rest at the lowest."""
    bits = sorted(set(int(b) for b in bits))
    fixed = bits[-2:] if len(bits) > 1 else bits[-1:]
    return sum(fixed) + bits[0] * (num_experts - len(fixed))


def allocate(costs: Sequence[dict[int, float]], budget: int, bits: Sequence[int] = BITS) -> list[int]:
    """The exact minimiser: one width per expert from `bits`, Σ widths ≤ budget, at least one expert at the highest
    width and one at the second highest (when `bits` has two or more). Ties go to the allocation whose first
    differing expert takes the smaller width (what enumerating the widths in ascending order finds first)."""
    bits = sorted(set(int(b) for b in bits))
    E = len(costs)
    top = bits[-1]
    second = bits[-2] if len(bits) > 1 else None
    if budget < least_budget(E, bits):
        raise MumoeError(f"a budget of {budget} bits cannot hold {E} experts with one at {top} bits"
                         + (f" and one at {second}" if second is not None else "") + f" (the least is {bits[0]} each)")
    # memo[(i, spent, has_top, has_second)] = (least cost of experts i.., the width expert i takes there); widths are
    # tried in ascending order with a strict improvement, so the reconstructed optimum is the lexicographically
    # smallest; memory E × (budget + 1) × 4 entries
    memo: dict[tuple[int, int, bool, bool], tuple[float, int]] = {}

    def best(i: int, spent: int, has_top: bool, has_second: bool) -> float:
        if i == E:
            return 0.0 if has_top and (has_second or second is None) else math.inf
        key = (i, spent, has_top, has_second)
        if key not in memo:
            out = (math.inf, 0)
            for b in bits:
                if spent + b > budget:
                    break
                c = costs[i][b] + best(i + 1, spent + b, has_top or b == top, has_second or b == second)
                if c < out[0]:
                    out = (c, b)
            memo[key] = out
        return memo[key][0]

    if not math.isfinite(best(0, 0, False, False)):
        raise MumoeError(f"no bit allocation fits {budget} bits for {E} experts")
    widths, state = [], (0, 0, False, False)
    for _ in range(E):
        b = memo[state][1]
        widths.append(b)
        i, spent, has_top, has_second = state
        state = (i + 1, spent + b, has_top or b == top, has_second or b == second)
    return widths
