"""Expert merging applied: each group of experts becomes one expert whose tensors are the weighted average of its
members' (gate/up, down and their biases), with one router row (and bias) per merged expert — the same weighted
average of the members' rows ("centroid" router: a standard compact checkpoint every engine loads)."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import MumoeError
from ..models import MoELayer, moe_adapter_for
from .experts import slice_layer

EXPERT_TENSORS = ("gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias")  # [E, ...] each
ROUTER_TENSORS = ("weight", "bias", "e_score_correction_bias")


@torch.no_grad()
def merge_layer(layer: MoELayer, groups: list[list[int]], weights: list[list[float]]) -> None:
    """Merge one MoE layer in place: group g (member ids, ascending, groups ordered by their first member) becomes
    expert g with Σ w_i W_i over its members (weights summing to 1), router rows included."""
    E = layer.num_experts
    members = sorted(i for g in groups for i in g)
    if members != list(range(E)):
        raise MumoeError(f"layer {layer.index}: merge groups must cover the {E} experts once each, got {groups}")
    if layer.n_group and layer.n_group > 1:
        raise MumoeError("merging is not available for group-limited routers (DeepSeek-V3 n_group) yet")
    for g, w in zip(groups, weights):
        if len(g) == 1:
            continue
        first = g[0]
        coef = torch.tensor(w, dtype=torch.float64)
        for module, names in ((layer.experts, EXPERT_TENSORS), (layer.router, ROUTER_TENSORS)):
            for name in names:
                t = getattr(module, name, None)
                if t is None:
                    continue
                rows = t.data[g].double()  # [n, ...]
                merged = (coef.to(rows.device).view(-1, *[1] * (rows.dim() - 1)) * rows).sum(0)
                t.data[first].copy_(merged.to(t.dtype))
    slice_layer(layer, [g[0] for g in groups])  # each group's first slot now holds its merged expert


def merge_experts(model: nn.Module, groups: dict[int, list[list[int]]], weights: dict[int, list[list[float]]]) -> None:
    """Merge every MoE layer named in `groups`; the config's expert count set when every layer ends equal."""
    adapter = moe_adapter_for(model)
    for layer in adapter.moe_layers():
        if layer.index in groups:
            merge_layer(layer, groups[layer.index], weights[layer.index])
    counts = {layer.num_experts for layer in adapter.moe_layers()}
    if len(counts) == 1:
        adapter.set_num_experts(counts.pop())
