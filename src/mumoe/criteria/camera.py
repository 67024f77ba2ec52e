"""CAMERA-P: micro-expert (atom) importance from the forward pass alone (Xu et al., AAAI 2026; code
xuyuzhuang11/CAMERA, `mei.py`).

    a_{i,k}(t) = g_i(t)·h_{i,k}(t)          (g_i(t): the token's combine weight, 0 where i is not selected)
    S_{i,k}    = ‖W_down,i[:, k]‖² · [(1 − λ)·Σ_t a_{i,k}(t)² + λ·max_t a_{i,k}(t)²]

λ (`--lambda-max`, default 0.9: the authors' run script) trades the energy over all tokens for the largest one.
An expert no token reached scores 0 (the authors' value; it is pruned first in its layer). The atoms of a layer
are ranked together (the authors' per-layer budget: `--form global --scope layer`), layer by layer on the
pruned layers before (their order: `--order progressive`). A shared expert's neurons are atoms too, on every
token, with g the shared gate's sigmoid (Qwen2-MoE style) or 1 (DeepSeek style): in the global form they are
ranked with the routed ones; the uniform form leaves shared experts whole.
"""

from __future__ import annotations

import torch

from ..models import MoELayer
from ..observe.collectors import AtomLayerStats

LAMBDA_MAX = 0.9  # the authors' run script (--reduce_ratio 0.90)


def camera_parts(layer: MoELayer, st: AtomLayerStats) -> dict[str, torch.Tensor]:
    """The score's three parts, each [E, I] float64 on the CPU: the down column's energy ‖W_down[:, k]‖², the
    sum over tokens of a², and its maximum; `camera_score` weighs them (λ is a recipe option). A layer with a
    shared expert (a gated MLP) adds the same three for its neurons: "shared_energy", "shared_l2",
    "shared_linf", each [I_s]."""
    with torch.no_grad():
        energy = layer.experts.down_proj.double().pow(2).sum(1).cpu()  # [E, I] (down_proj [E, H, I])
        out = {"energy": energy, "l2": st.a2.cpu(), "linf": st.amax.cpu()}
        if st.shared_a2 is not None:
            down = layer.shared_linears()[2].weight  # [H, I_s]
            out |= {"shared_energy": down.double().pow(2).sum(0).cpu(), "shared_l2": st.shared_a2.cpu(),
                    "shared_linf": st.shared_amax.cpu()}
    return out


def camera_score(parts: dict[str, torch.Tensor], lam: float = LAMBDA_MAX, prefix: str = "") -> torch.Tensor:
    """S = energy·[(1 − λ)·Σa² + λ·max a²] (higher = keep): [E, I] of the routed experts, or with
    prefix="shared_" [I_s] of the shared expert's neurons."""
    p = parts
    return p[prefix + "energy"] * ((1 - lam) * p[prefix + "l2"] + lam * p[prefix + "linf"])


def weigh(parts: dict[str, torch.Tensor], part) -> torch.Tensor | dict[str, torch.Tensor]:
    """The layer's scores at the recipe's λ (`AtomPart.lambda_max`): [E, I], or {"routed": [E, I], "shared":
    [I_s]} where the layer has a shared expert (its atoms are ranked with the routed ones)."""
    lam = LAMBDA_MAX if part.lambda_max is None else part.lambda_max
    routed = camera_score(parts, lam)
    if "shared_energy" not in parts:
        return routed
    return {"routed": routed, "shared": camera_score(parts, lam, "shared_")}
