"""Structural expert removal: slice fused expert tensors, router rows, bias and correction bias together."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import MumoeError
from ..models import MoELayer, adapter_for, moe_adapter_for
from ..models.base import COUNT_ATTRS


EXPERT_TENSOR_NAMES = ("gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias")  # [E, ...] each


def _slice_param(module: nn.Module, name: str, idx: torch.Tensor, inplace: bool = False, dim: int = 0) -> None:
    tensor = getattr(module, name, None)
    if tensor is None:
        return
    if inplace and dim == 0:  # kept rows moved to the front of the same storage (idx ascending: never overwrites)
        data = tensor.data
        for new_i, old_i in enumerate(idx.tolist()):
            if new_i != old_i:
                data[new_i].copy_(data[old_i])
        new = data[: len(idx)]
    else:
        new = tensor.data.index_select(dim, idx.to(tensor.device)).contiguous()
    if isinstance(tensor, nn.Parameter):
        setattr(module, name, nn.Parameter(new, requires_grad=tensor.requires_grad))
    else:  # buffer (e_score_correction_bias)
        module._buffers[name] = new


def slice_layer(layer: MoELayer, keep: list[int], inplace: bool = False, router: bool = True,
                experts: bool = True) -> None:
    """Keep only experts `keep` (sorted, unique) of one MoE layer, in place. inplace: move the kept experts
    within the existing tensors instead of copying them out (no second copy of the layer; the tensors become
    views of the old storage — for a layer that is about to be freed, as in the layer-sequential sweep).
    router=False: the router keeps all its rows (a bound merge maps them onto the kept experts). experts=False:
    only the router is sliced (its counts set; per-prompt routing restriction, `testtime.experts.experts_kept`)."""
    E = layer.num_experts
    if layer.fixed_routing and list(keep) != list(range(E)):
        raise MumoeError(f"layer {layer.index} picks experts from a fixed token table (hash routing): its experts "
                         "cannot be removed or merged")
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
    for name in EXPERT_TENSOR_NAMES if experts else ():
        _slice_param(layer.experts, name, idx, inplace)
    for rt in layer.router_tensors if router else ():
        _slice_param(rt.module, rt.name, rt.rows(idx), inplace, rt.dim)  # (identity experts' entries kept)
    counted = count_modules(layer) if router else [layer.experts]
    if not experts:
        ids = {id(c) for c in counted}
        counted = [m for m in layer.router.modules() if id(m) in ids]
    Z = layer.identity_experts
    for module in counted:
        for attr in COUNT_ATTRS:
            if isinstance(n := getattr(module, attr, None), int):  # a count of routed + identity experts keeps Z
                setattr(module, attr, len(keep) + (Z if Z and n == E + Z else 0))


def count_modules(layer: MoELayer) -> list[nn.Module]:
    """The modules a slice changes: those whose attributes may hold the layer's expert count (the block, its
    router and the router's parts, the experts) and the owners of its routing tensors; shared experts excluded."""
    shared = {id(m) for s in (layer.shared, layer.shared_gate) if s is not None for m in s.modules()}
    out: dict[int, nn.Module] = {}
    for m in (layer.block, *layer.router.modules(), layer.experts, *(rt.module for rt in layer.router_tensors)):
        if id(m) not in shared:
            out.setdefault(id(m), m)
    return list(out.values())


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


@torch.no_grad()
def expert_weight_counts(model: nn.Module) -> tuple[int, int] | None:
    """(weights, nonzero weights) of the routed experts' fused tensors (gate_up_proj, down_proj) over every MoE
    layer; None for a model without routed experts. Counted one expert at a time (no whole-layer temporaries)."""
    adapter = adapter_for(model)
    layers = adapter.moe_layers() if adapter.is_moe else []
    if not layers:
        return None
    total = nonzero = 0
    for layer in layers:
        for t in (layer.experts.gate_up_proj, layer.experts.down_proj):  # [E, 2I, H], [E, H, I]
            total += t.numel()
            nonzero += sum(int(torch.count_nonzero(t[e])) for e in range(t.shape[0]))
    return total, nonzero


def removed_record(before: tuple[int, int], after: tuple[int, int]) -> dict:
    """pruning.json's `removed`: routed-expert weights before the run, how many the run removed (sliced away or
    zeroed: nonzero before minus nonzero after), and their share."""
    n = before[1] - after[1]
    return {"expert_params": before[0], "expert_params_removed": n, "share": round(n / before[0], 6)}
