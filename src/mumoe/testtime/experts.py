"""Per-prompt expert pruning: for one request's decode, keep only the K experts per MoE layer that the
request's own dense prefill routes to most, and drop every other expert.

The score is PreMoe's TCESS computed on the prompt alone: for router logits s(t) [E] of the prompt's tokens,
    TCESS_i = (1/T) Σ_t s_i(t)·1[i = argmax s(t)]
with ties (experts that are never the arg-max of any prompt token all score 0) broken by the mean softmax
probability over the prompt, then by index. The kept set is applied by slicing the router's rows
(`apply.experts.slice_layer`, the operation an offline pruned export uses, on the router alone) and mapping its
picks back to the experts' own numbering, undone on exit: inside the block the model computes what the model
pruned to those experts computes — routing renormalizes over the kept experts exactly as an exported checkpoint's
does — without copying any expert tensor per request.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..apply.experts import EXPERT_TENSOR_NAMES, count_modules, slice_layer
from ..models.base import COUNT_ATTRS
from ..errors import MumoeError
from ..models import MoELayer, moe_adapter_for


def prompt_expert_scores(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits of a prompt [T, E] -> (TCESS [E], mean softmax probability [E]), float64."""
    s = logits.double().reshape(-1, logits.shape[-1])  # [T, E]
    top = s.argmax(-1, keepdim=True)  # [T, 1]
    tcess = torch.zeros_like(s).scatter(-1, top, s.gather(-1, top)).mean(0)
    return tcess, torch.softmax(s, dim=-1).mean(0)


def top_experts(logits: torch.Tensor, k: int) -> list[int]:
    """The k experts (sorted indices) of one layer with the highest prompt TCESS; ties by mean probability,
    then lower index. logits [T, E]."""
    tcess, prob = prompt_expert_scores(logits)
    E = tcess.numel()
    order = torch.arange(E)
    order = order[torch.argsort(-prob[order], stable=True)]  # secondary key first (stable sorts)
    order = order[torch.argsort(-tcess[order], stable=True)]
    return sorted(order[:k].tolist())


def check_experts(model: nn.Module, k: int) -> int:
    """K must be a whole number between the router's top_k and the smallest layer's expert count."""
    layers = moe_adapter_for(model).moe_layers()
    if not layers:
        raise MumoeError("per-prompt expert pruning needs an MoE model; this one has no routed experts")
    top_k, E = layers[0].top_k, min(l.num_experts for l in layers)
    if isinstance(k, bool) or not isinstance(k, int) or not top_k <= k <= E:
        raise MumoeError(f"experts must be an integer between top_k={top_k} and the expert count {E}, got {k!r}")
    if any(l.n_group and l.n_group > 1 for l in layers):
        raise MumoeError("per-prompt expert pruning of group-limited routers is not supported")
    if any(l.fixed_routing for l in layers):
        raise MumoeError("per-prompt expert pruning is not supported where layers pick experts from a fixed token "
                         "table (hash routing)")
    return k


def prompt_keep(router_logits: dict[int, torch.Tensor], k: int) -> dict[int, list[int]]:
    """{layer index: prompt router logits [T, E]} -> {layer index: the k kept experts}."""
    return {i: top_experts(lg, k) for i, lg in router_logits.items()}


@contextmanager
def capture_router_logits(model: nn.Module, layers: list[MoELayer] | None = None) -> Iterator[dict[int, torch.Tensor]]:
    """Inside the block, every forward's router logits of the routed experts [T, E] land in the yielded dict (by
    layer index; a later forward replaces an earlier one's)."""
    layers = layers if layers is not None else moe_adapter_for(model).moe_layers()
    out: dict[int, torch.Tensor] = {}

    def hook(module, args, output, index, E):
        lg = output[0] if isinstance(output, tuple) else output
        out[index] = lg.detach().reshape(-1, lg.shape[-1])[:, :E]  # (identity experts' columns left out)

    handles = [l.router.register_forward_hook(lambda m, a, o, i=l.index, E=l.num_experts: hook(m, a, o, i, E))
               for l in layers]
    try:
        yield out
    finally:
        for h in handles:
            h.remove()


def _router_modules(layer: MoELayer) -> list[nn.Module] | None:
    """The modules a router-only slice changes (the router and its parts), or None when a routing tensor lives
    outside the router (then the whole layer is sliced)."""
    inside = {id(m): m for m in layer.router.modules()}
    if any(id(rt.module) not in inside for rt in layer.router_tensors):
        return None
    return list(inside.values())


def _picks_in_full_numbering(kept: torch.Tensor, E: int, Z: int = 0):
    """A router forward hook: the sliced router's (logits [T, K + Z], weights [T, k], indices [T, k] into the kept
    experts, then Z identity experts) -> (logits [T, E + Z] with the dropped experts at the dtype's lowest value,
    weights, indices into all E + Z)."""
    kept = torch.cat([kept, torch.arange(E, E + Z, dtype=kept.dtype, device=kept.device)])

    def hook(module, args, output):
        logits, weights, indices = output
        full = logits.new_full((*logits.shape[:-1], E + Z), torch.finfo(logits.dtype).min)
        return full.index_copy_(-1, kept, logits), weights, kept[indices]

    return hook


@contextmanager
def experts_kept(model: nn.Module, keep: dict[int, list[int]] | None) -> Iterator[int]:
    """The model routed to only `keep`'s experts in each named layer inside the block — equal to the model pruned
    to those experts (`apply.experts.slice_layer`): the router is sliced to the kept experts' rows (its expert
    counts set), so it scores, selects and normalises over them exactly as a pruned checkpoint's router does, and
    its picks are mapped back to the experts' own numbering. The expert tensors are not copied (only router rows
    are); a layer whose routing tensors live outside its router is sliced whole. Everything is put back on exit,
    also on error. Yields the number of weight elements the pruned model no longer has."""
    if not keep:
        yield 0
        return
    layers = {l.index: l for l in moe_adapter_for(model).moe_layers()}
    unknown = sorted(set(keep) - set(layers))
    if unknown:
        raise MumoeError(f"no MoE layer {unknown[0]} in this model")
    saved, handles = [], []
    removed = 0
    try:
        for index, kept in sorted(keep.items()):
            layer = layers[index]
            routers = _router_modules(layer)
            modules = count_modules(layer) if routers is None else routers
            before = sum(p.numel() for m in modules for p in m.parameters(recurse=False))
            state = [(m, dict(m._parameters), dict(m._buffers), {a: getattr(m, a) for a in COUNT_ATTRS if hasattr(m, a)})
                     for m in modules]
            saved.append(state)
            E = layer.num_experts
            if routers is None:
                slice_layer(layer, list(kept))
            else:
                slice_layer(layer, list(kept), experts=False)
                idx = torch.tensor(list(kept), dtype=torch.long, device=layer.router_weight.device)
                handles.append(layer.router.register_forward_hook(
                    _picks_in_full_numbering(idx, E, layer.identity_experts)))
                removed += (E - len(kept)) * sum(t[0].numel() for t in _expert_tensors(layer))
            removed += before - sum(p.numel() for m in modules for p in m.parameters(recurse=False))
        yield removed
    finally:
        for h in handles:
            h.remove()
        for state in reversed(saved):
            for module, params, buffers, counts in state:
                module._parameters.update(params)
                module._buffers.update(buffers)
                for a, v in counts.items():
                    setattr(module, a, v)


def _expert_tensors(layer: MoELayer) -> list[torch.Tensor]:
    """The routed experts' own tensors [E, ...] (weights and biases)."""
    return [t for n in EXPERT_TENSOR_NAMES if (t := getattr(layer.experts, n, None)) is not None]
