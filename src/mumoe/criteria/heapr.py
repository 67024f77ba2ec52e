"""HEAPr: second-order importance of atomic experts (one neuron k of expert i).

    S_{i,k} = E_{t∈T_i}[h_{i,k}(t)²] · E_{t∈T_i}[(∂L/∂h_{i,k}(t))²]          (docs/methods.md)

h is the down-projection input of expert i on its routed tokens; the gradient comes from one backward pass
of the LM loss (labels = inputs, summed over tokens so that per-token gradients do not depend on the batch
size). Parameters stay frozen: gradients flow to activations only (the input embeddings are the one leaf).
State per expert: a few length-I vectors, never an H×H matrix — O(layers·E·I) floats.

Variants: "heapr" (the product of means above), "heapr-token" (E[h²·(∂L/∂h)²], per token), and the two
baselines at the same grain: "atom-magnitude" (‖[gate_i[k], up_i[k], down_i[:, k]]‖₂) and "atom-act"
(E[h²]·‖down_i[:, k]‖²). Experts that no calibration token routes to score −1 (pruned first).
"""

from __future__ import annotations

import torch
from torch import nn

from ..models import MoELayer
from ..observe.collectors import AtomLayerStats, AtomStats
from ..observe.runner import run

def collect_atom_stats(model: nn.Module, layers: list[MoELayer], calib: torch.Tensor, batch_size: int = 4,
                       backward: bool = True, progress: bool = True, device=None) -> list[AtomLayerStats]:
    """One forward (+ backward with the summed LM loss) pass over calib [N, L]. Parameters are not updated
    and get no .grad; the caller's requires_grad flags are restored."""
    col = AtomStats(layers, backward)
    run(model, calib, [col], backward=backward, batch_size=batch_size, progress=progress, desc="atom statistics",
        layers=layers, device=device)
    return col.result()


def _mean(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    return total / count.clamp(min=1)[:, None]


def _unrouted(s: torch.Tensor, st: AtomLayerStats) -> torch.Tensor:
    """Experts that no calibration token reached score −1 (pruned first)."""
    return torch.where(st.count[:, None] > 0, s, torch.full_like(s, -1.0))


def heapr(layer: MoELayer, st: AtomLayerStats) -> torch.Tensor:
    """HEAPr: E[h²]·E[(∂L/∂h)²] per atom, [E, I] (higher = keep)."""
    return _unrouted(_mean(st.h2, st.count) * _mean(st.g2, st.count), st)


def heapr_token(layer: MoELayer, st: AtomLayerStats) -> torch.Tensor:
    """HEAPr's per-token variant: E[h²·(∂L/∂h)²], [E, I]."""
    return _unrouted(_mean(st.hg2, st.count), st)


def atom_act(layer: MoELayer, st: AtomLayerStats) -> torch.Tensor:
    """Baseline: E[h²]·‖down[:, k]‖², [E, I]."""
    with torch.no_grad():
        s = _mean(st.h2, st.count) * layer.experts.down_proj.double().pow(2).sum(1).cpu()  # ‖down[:, k]‖²
    return _unrouted(s, st)


def atom_magnitude(layer: MoELayer, st: AtomLayerStats | None = None) -> torch.Tensor:
    """Baseline from weights alone: ‖[gate[k], up[k], down[:, k]]‖₂, [E, I]."""
    with torch.no_grad():
        I = layer.intermediate_size
        gu = layer.experts.gate_up_proj.double()  # [E, 2I, H]
        sq = gu[:, :I].pow(2).sum(-1) + gu[:, I:].pow(2).sum(-1) + layer.experts.down_proj.double().pow(2).sum(1)
    return sq.sqrt().cpu()
