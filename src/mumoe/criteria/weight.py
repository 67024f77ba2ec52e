"""Weight-grain scores (pure functions): Wanda S_ij = |W_ij|·‖X_j‖₂ and magnitude |W_ij|.

The keep rules over these scores (per row, N:M, columns, one threshold per matrix) are in `mumoe.select`'s
weight section (`testtime.masks.wanda_mask` / `magnitude_mask` build the masks)."""

from __future__ import annotations

import torch


def wanda(weight: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """|W|·‖X‖ per weight. weight [d_out, d_in] (or fused [E, d_out, d_in]), norms [d_in] ([E, d_in]) -> float64,
    the weight's shape."""
    return weight.detach().abs().double() * norms.double().unsqueeze(-2)


def magnitude(weight: torch.Tensor) -> torch.Tensor:
    """|W| per weight (float64)."""
    return weight.detach().abs().double()
