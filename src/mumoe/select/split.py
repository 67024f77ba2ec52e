"""One budget over two stages: "remove X of all routed-expert parameters", split between a stage that removes
whole experts and a weight stage that zeroes weights inside the experts left (STUN's structured-then-unstructured).

The expert stage removes `share`·X of the experts (STUN's own run on Snowflake Arctic: 20% of the experts for a
40% target, share 0.5); the weight stage then removes what is left of the target from the remaining experts:
if the expert stage actually removed a fraction e of the expert parameters (a clustering rule may stop short of
its target), the weight stage's sparsity is (X − e) / (1 − e), so that e + (1 − e)·s = X.
"""

from __future__ import annotations

from ..errors import MumoeError

SHARE = 0.5  # the expert stage's part of the target (STUN's Arctic run: 20% of experts of 40%)


def check_target(target, share) -> tuple[float, float]:
    """A combined target X in (0, 1) and the expert stage's share of it in (0, 1]; -> (X, share) as floats."""
    for name, v, closed in (("--expert-params", target, False), ("--expert-share", share, True)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0 < v < 1 or (closed and v == 1)):
            raise MumoeError(f"{name} must be a number in (0, 1{']' if closed else ')'}, got {v!r}")
    return float(target), float(share)


def expert_ratio(target: float, share: float = SHARE) -> float:
    """The expert stage's ratio (fraction of experts removed) for a combined target."""
    return target * share


def weight_ratio(target: float, removed: float) -> float:
    """The weight stage's sparsity after an expert stage removed a fraction `removed` of the expert parameters:
    (X − e) / (1 − e); 0 when the expert stage already reached the target."""
    if removed >= target:
        return 0.0
    return (target - removed) / (1 - removed)
