"""Atomic-expert (neuron) application (the keep rules are in `mumoe.select.atoms`).

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

from ..models import MoELayer


def slice_atoms_uniform(layer: MoELayer, keep: torch.Tensor) -> None:
    """Keep atoms keep[e] (LongTensor [E, I']) of every expert: rows of both halves of gate_up, columns of down."""
    I = layer.intermediate_size
    gu, down = layer.experts.gate_up_proj.data, layer.experts.down_proj.data  # [E, 2I, H], [E, H, I]
    rows = torch.cat([keep, keep + I], dim=-1)  # [E, 2I']
    new_gu = torch.gather(gu, 1, rows[:, :, None].expand(-1, -1, gu.shape[-1]).to(gu.device))
    new_down = torch.gather(down, 2, keep[:, None, :].expand(-1, down.shape[1], -1).to(down.device))
    layer.experts.gate_up_proj = nn.Parameter(new_gu.contiguous(), requires_grad=layer.experts.gate_up_proj.requires_grad)
    layer.experts.down_proj = nn.Parameter(new_down.contiguous(), requires_grad=layer.experts.down_proj.requires_grad)
    bias = layer.gate_up_bias  # [E, 2I] (gate, then up) where the experts have biases
    if bias is not None:
        layer.experts.gate_up_proj_bias = nn.Parameter(torch.gather(bias.data, 1, rows.to(bias.device)),
                                                       requires_grad=bias.requires_grad)
    for attr in ("intermediate_dim", "intermediate_size"):  # the experts module's own record of its width
        if isinstance(getattr(layer.experts, attr, None), int):
            setattr(layer.experts, attr, keep.shape[-1])


def mask_atoms(layer: MoELayer, keep: torch.Tensor) -> None:
    """Zero the removed atoms (keep: bool [E, I]) — the same function as slicing each expert to its kept atoms."""
    I = layer.intermediate_size
    with torch.no_grad():
        m = keep.to(layer.experts.gate_up_proj.dtype).to(layer.experts.gate_up_proj.device)  # [E, I]
        layer.experts.gate_up_proj[:, :I] *= m[:, :, None]
        layer.experts.gate_up_proj[:, I:] *= m[:, :, None]
        layer.experts.down_proj *= m[:, None, :]


def mask_shared_atoms(layer: MoELayer, keep: torch.Tensor) -> None:
    """Zero the shared expert's removed atoms (keep: kept neuron indices [k_s]): gate and up rows (and their
    biases), down columns — the same function as the shared MLP sliced to its kept neurons."""
    gate, up, down = layer.shared_linears()
    drop = torch.ones(down.in_features, dtype=torch.bool)
    drop[keep] = False
    with torch.no_grad():
        for lin in (gate, up):
            lin.weight[drop.to(lin.weight.device)] = 0
            if lin.bias is not None:
                lin.bias[drop.to(lin.bias.device)] = 0
        down.weight[:, drop.to(down.weight.device)] = 0


def shared_atom_keys(model: nn.Module, shared: dict[int, torch.Tensor]) -> dict[str, tuple[str, torch.Tensor]]:
    """The tensors of the shared experts whose atoms `shared` keeps (decoder layer -> kept neurons [k_s]), by their
    name in `model`: gate and up rows ("rows": weight [I_s, H], bias [I_s]), down columns ("cols": [H, I_s]).
    The one map the streamed export, the in-memory export and the loader all follow."""
    if not shared:
        return {}
    from ..models import moe_adapter_for

    names = {id(m): n for n, m in model.named_modules()}
    out = {}
    for layer in moe_adapter_for(model).moe_layers():
        if layer.index in shared:
            k = shared[layer.index]
            for lin, kind in zip(layer.shared_linears(), ("rows", "rows", "cols")):
                out[f"{names[id(lin)]}.weight"] = (kind, k)
                if lin.bias is not None and kind == "rows":
                    out[f"{names[id(lin)]}.bias"] = (kind, k)
    return out


def kept_part(t: torch.Tensor, kind: str, k: torch.Tensor) -> torch.Tensor:
    """Rows k ("rows") or columns k ("cols") of t."""
    return t[k] if kind == "rows" else t[:, k]
