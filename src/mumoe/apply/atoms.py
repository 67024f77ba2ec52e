"""Atomic-expert (neuron) selection and application.

An atom (i, k) is row k of gate_i and up_i plus column k of down_i. Two forms:
  uniform  every expert keeps the same number I' of its own best atoms (I' a multiple of 8): a standard HF
           checkpoint with the expert width rewritten in the config;
  global   HEAPr's single ranking over all layers/experts/neurons: widths differ per expert. In memory the
           removed atoms are zeroed (exactly the function of the sliced expert); the export stores only the
           kept rows/columns and `mumoe.load` rebuilds it.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import MumoeError
from ..models import MoELayer
from ..select import check_ratio


def uniform_width(I: int, ratio: float, multiple: int = 8) -> int:
    """Kept width for the uniform form: (1 − ratio)·I rounded to a multiple of `multiple` (at least one)."""
    check_ratio(ratio)
    step = multiple if I >= multiple else 1
    return max(step, int(round((1 - ratio) * I / step)) * step)


def _rank(scores: torch.Tensor) -> torch.Tensor:
    """Row-wise order, best first; a stable sort keeps the lower index first among ties. [E, I] -> [E, I]"""
    return torch.argsort(-scores.double(), dim=-1, stable=True)


def keep_uniform_atoms(scores: torch.Tensor, ratio: float, multiple: int = 8) -> torch.Tensor:
    """Each expert's best I' atoms, sorted. scores [E, I] -> LongTensor [E, I']"""
    width = uniform_width(scores.shape[-1], ratio, multiple)
    return torch.sort(_rank(scores)[:, :width], dim=-1).values


def keep_global_atoms(scores: list[torch.Tensor], ratio: float, scope: str = "global") -> list[torch.Tensor]:
    """Keep masks [E, I] per layer after removing the lowest `ratio` of atoms, ranked over all layers
    (scope="global", HEAPr) or within each layer (scope="layer"). Ties: lower layer/expert/neuron kept."""
    check_ratio(ratio)
    if scope == "layer":
        return [keep_global_atoms([s], ratio)[0] for s in scores]
    if scope != "global":
        raise MumoeError(f"unknown atom ranking scope {scope!r}; use global or layer")
    flat = torch.cat([s.double().flatten() for s in scores])
    n_drop = int(round(ratio * flat.numel()))
    # lowest score first; among ties the higher position goes first, so lower indices are kept
    order = torch.arange(flat.numel() - 1, -1, -1)
    order = order[torch.argsort(flat[order], stable=True)]
    keep = torch.ones(flat.numel(), dtype=torch.bool)
    keep[order[:n_drop]] = False
    out, start = [], 0
    for s in scores:
        out.append(keep[start : start + s.numel()].view(s.shape))
        start += s.numel()
    return out


def slice_atoms_uniform(layer: MoELayer, keep: torch.Tensor) -> None:
    """Keep atoms keep[e] (LongTensor [E, I']) of every expert: rows of both halves of gate_up, columns of down."""
    E, I = layer.num_experts, layer.intermediate_size
    gu, down = layer.experts.gate_up_proj.data, layer.experts.down_proj.data  # [E, 2I, H], [E, H, I]
    rows = torch.cat([keep, keep + I], dim=-1)  # [E, 2I']
    new_gu = torch.gather(gu, 1, rows[:, :, None].expand(-1, -1, gu.shape[-1]).to(gu.device))
    new_down = torch.gather(down, 2, keep[:, None, :].expand(-1, down.shape[1], -1).to(down.device))
    layer.experts.gate_up_proj = nn.Parameter(new_gu.contiguous(), requires_grad=layer.experts.gate_up_proj.requires_grad)
    layer.experts.down_proj = nn.Parameter(new_down.contiguous(), requires_grad=layer.experts.down_proj.requires_grad)
    if hasattr(layer.experts, "intermediate_dim"):
        layer.experts.intermediate_dim = keep.shape[-1]


def mask_atoms(layer: MoELayer, keep: torch.Tensor) -> None:
    """Zero the removed atoms (keep: bool [E, I]) — the same function as slicing each expert to its kept atoms."""
    I = layer.intermediate_size
    with torch.no_grad():
        m = keep.to(layer.experts.gate_up_proj.dtype).to(layer.experts.gate_up_proj.device)  # [E, I]
        layer.experts.gate_up_proj[:, :I] *= m[:, :, None]
        layer.experts.gate_up_proj[:, I:] *= m[:, :, None]
        layer.experts.down_proj *= m[:, None, :]
