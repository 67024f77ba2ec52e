"""CAMERA-P: micro-expert (atom) importance from the forward pass alone (Xu et al., AAAI 2026; code
xuyuzhuang11/CAMERA, `mei.py`).

    a_{i,k}(t) = g_i(t)·h_{i,k}(t)          (g_i(t): the token's combine weight, 0 where i is not selected)
    S_{i,k}    = ‖W_down,i[:, k]‖² · [(1 − λ)·Σ_t a_{i,k}(t)² + λ·max_t a_{i,k}(t)²]

λ (`--lambda-max`, default 0.9: the authors' run script) trades the energy over all tokens for the largest one.
An expert no token reached scores 0 (the authors' value; it is pruned first in its layer). The atoms of a layer
are ranked together (the authors' per-layer budget: `--form global --scope layer`), layer by layer on the
pruned layers before (their order: `--order progressive`).
"""

from __future__ import annotations

import torch

from ..models import MoELayer
from ..observe.collectors import AtomLayerStats

LAMBDA_MAX = 0.9  # the authors' run script (--reduce_ratio 0.90)


def camera_parts(layer: MoELayer, st: AtomLayerStats) -> dict[str, torch.Tensor]:
    """The score's three parts, each [E, I] float64 on the CPU: the down column's energy ‖W_down[:, k]‖², the
    sum over tokens of a², and its maximum; `camera_score` weighs them (λ is a recipe option)."""
    with torch.no_grad():
        energy = layer.experts.down_proj.double().pow(2).sum(1).cpu()  # [E, I] (down_proj [E, H, I])
    return {"energy": energy, "l2": st.a2.cpu(), "linf": st.amax.cpu()}


def camera_score(parts: dict[str, torch.Tensor], lam: float = LAMBDA_MAX) -> torch.Tensor:
    """S = energy·[(1 − λ)·Σa² + λ·max a²], [E, I] (higher = keep)."""
    return parts["energy"] * ((1 - lam) * parts["l2"] + lam * parts["linf"])


def weigh(parts: dict[str, torch.Tensor], part) -> torch.Tensor:
    """The layer's scores [E, I] at the recipe's λ (`AtomPart.lambda_max`)."""
    return camera_score(parts, LAMBDA_MAX if part.lambda_max is None else part.lambda_max)
