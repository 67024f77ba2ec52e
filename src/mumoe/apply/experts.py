"""Structural expert removal: slice fused expert tensors, router rows, bias and correction bias together."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import MumoeError
from ..models import MoELayer, moe_adapter_for
from ..models.base import EXPERT_COUNT_KEYS

_COUNT_ATTRS = EXPERT_COUNT_KEYS  # a module attribute holding the expert count is spelt like the config key


def _slice_param(module: nn.Module, name: str, idx: torch.Tensor, inplace: bool = False) -> None:
    tensor = getattr(module, name, None)
    if tensor is None:
        return
    if inplace:  # kept rows moved to the front of the same storage (idx ascending: never overwrites a later one)
        data = tensor.data
        for new_i, old_i in enumerate(idx.tolist()):
            if new_i != old_i:
                data[new_i].copy_(data[old_i])
        new = data[: len(idx)]
    else:
        new = tensor.data.index_select(0, idx.to(tensor.device)).contiguous()
    if isinstance(tensor, nn.Parameter):
        setattr(module, name, nn.Parameter(new, requires_grad=tensor.requires_grad))
    else:  # buffer (e_score_correction_bias)
        module._buffers[name] = new


def slice_layer(layer: MoELayer, keep: list[int], inplace: bool = False, router: bool = True) -> None:
    """Keep only experts `keep` (sorted, unique) of one MoE layer, in place. inplace: move the kept experts
    within the existing tensors instead of copying them out (no second copy of the layer; the tensors become
    views of the old storage — for a layer that is about to be freed, as in the layer-sequential sweep).
    router=False: the router keeps all its rows (a bound merge maps them onto the kept experts)."""
    E = layer.num_experts
    if sorted(set(keep)) != list(keep) or not keep or keep[0] < 0 or keep[-1] >= E:
        raise MumoeError(f"layer {layer.index}: keep set must be sorted unique indices in [0, {E}), got {keep}")
    if len(keep) < layer.top_k:
        raise MumoeError(f"layer {layer.index}: keeping {len(keep)} experts, fewer than top_k={layer.top_k}")
    if layer.n_group and layer.n_group > 1:
        per_group = E // layer.n_group
        counts = torch.bincount(torch.tensor(keep) // per_group, minlength=layer.n_group)
        if not bool((counts == counts[0]).all()):
            raise MumoeError(f"layer {layer.index}: group-limited router needs the same number of kept experts "
                             f"in every group, got {counts.tolist()}")
    idx = torch.tensor(keep, dtype=torch.long)
    for name in ("gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias"):
        _slice_param(layer.experts, name, idx, inplace)
    for name in ("weight", "bias", "e_score_correction_bias") if router else ():
        _slice_param(layer.router, name, idx, inplace)
    for module in (layer.router, layer.experts) if router else (layer.experts,):
        for attr in _COUNT_ATTRS:
            if hasattr(module, attr):
                setattr(module, attr, len(keep))


def remove_experts(model: nn.Module, keep: dict[int, list[int]]) -> list[int]:
    """Slice every MoE layer named in `keep` (decoder-layer index -> kept experts), in place.

    Rewrites the config's expert-count keys when every MoE layer ends with the same count, and returns the
    per-MoE-layer counts (non-uniform counts can only be reloaded with `mumoe.load`).
    """
    adapter = moe_adapter_for(model)
    layers = adapter.moe_layers()
    unknown = set(keep) - {layer.index for layer in layers}
    if unknown:
        raise MumoeError(f"keep names decoder layers without an MoE block: {sorted(unknown)}")
    for layer in layers:
        if layer.index in keep:
            slice_layer(layer, list(keep[layer.index]))
    counts = [layer.num_experts for layer in adapter.moe_layers()]
    if len(set(counts)) == 1:
        adapter.set_num_experts(counts[0])
    return counts
