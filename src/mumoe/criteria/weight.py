"""Weight-grain scores (pure functions): Wanda S_ij = |W_ij|·‖X_j‖₂ and magnitude |W_ij|; OWL's layer outlier ratio.

The keep rules over these scores (per row, N:M, columns, one threshold per matrix) are in
`select.weights` (`wanda_mask`, `keep_columns`, `magnitude_mask` build the masks)."""

from __future__ import annotations

import torch

from ..settings import TensorCache


def wanda(weight: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """|W|·‖X‖ per weight. weight [d_out, d_in] (or fused [E, d_out, d_in]), norms [d_in] ([E, d_in]) -> float64,
    the weight's shape."""
    return weight.detach().abs().double() * norms.double().unsqueeze(-2)


def magnitude(weight: torch.Tensor) -> torch.Tensor:
    """|W| per weight (float64)."""
    return weight.detach().abs().double()
def column_norms(weight: torch.Tensor) -> torch.Tensor:
    """‖W[:, j]‖₂ per input column ([..., d_in], float64), cached per weight tensor until it is modified:
    they do not depend on the prompt, so μ-MoE computes them once per model, not per prompt."""
    hit = _COLUMN_NORMS.get(weight)
    if hit is not None and hit[0] == weight._version:
        return hit[1]
    col = weight.detach().float().pow(2).sum(-2).double().sqrt()
    _COLUMN_NORMS.set(weight, (weight._version, col))
    return col


_COLUMN_NORMS = TensorCache()  # weight -> (its version, its column norms); dropped with the weight




def outlier_ratio(scores: list[torch.Tensor], m: float = 5.0) -> float:
    """OWL's layer outlier ratio D (in %): the share of a decoder layer's Wanda scores (all its linears' scores
    together) above m times their mean. Two passes over the tensors, no concatenated copy."""
    total = sum(float(s.double().sum()) for s in scores)
    count = sum(s.numel() for s in scores)
    threshold = total / max(count, 1) * m
    return 100.0 * sum(int((s > threshold).sum()) for s in scores) / max(count, 1)
