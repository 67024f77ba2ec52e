"""Per-prompt expert pruning: for one request's decode, keep only the K experts per MoE layer that the
request's own dense prefill routes to most, and drop every other expert.

The score is PreMoe's TCESS computed on the prompt alone: for router logits s(t) [E] of the prompt's tokens,
    TCESS_i = (1/T) Σ_t s_i(t)·1[i = argmax s(t)]
with ties (experts that are never the arg-max of any prompt token all score 0) broken by the mean softmax
probability over the prompt, then by index. The kept set is applied by slicing the router rows and the fused
expert tensors (`apply.experts.slice_layer`, the same operation an offline pruned export uses), undone on exit:
inside the block the model *is* the model pruned to those experts, so routing renormalizes over the kept
experts exactly as an exported checkpoint would.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..apply.experts import count_modules, slice_layer
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
    return k


def prompt_keep(router_logits: dict[int, torch.Tensor], k: int) -> dict[int, list[int]]:
    """{layer index: prompt router logits [T, E]} -> {layer index: the k kept experts}."""
    return {i: top_experts(lg, k) for i, lg in router_logits.items()}


@contextmanager
def capture_router_logits(model: nn.Module, layers: list[MoELayer] | None = None) -> Iterator[dict[int, torch.Tensor]]:
    """Inside the block, every forward's router logits [T, E] land in the yielded dict (by layer index; a later
    forward replaces an earlier one's)."""
    layers = layers if layers is not None else moe_adapter_for(model).moe_layers()
    out: dict[int, torch.Tensor] = {}

    def hook(module, args, output, index):
        lg = output[0] if isinstance(output, tuple) else output
        out[index] = lg.detach().reshape(-1, lg.shape[-1])

    handles = [l.router.register_forward_hook(lambda m, a, o, i=l.index: hook(m, a, o, i)) for l in layers]
    try:
        yield out
    finally:
        for h in handles:
            h.remove()


@contextmanager
def experts_kept(model: nn.Module, keep: dict[int, list[int]] | None) -> Iterator[int]:
    """The model with only `keep`'s experts in each named layer inside the block (router rows and expert
    tensors sliced, expert counts set); the original tensors are put back on exit, also on error.
    Yields the number of weight elements the slicing removed."""
    if not keep:
        yield 0
        return
    layers = {l.index: l for l in moe_adapter_for(model).moe_layers()}
    unknown = sorted(set(keep) - set(layers))
    if unknown:
        raise MumoeError(f"no MoE layer {unknown[0]} in this model")
    saved = []
    removed = 0
    try:
        for index, kept in sorted(keep.items()):
            layer = layers[index]
            modules = count_modules(layer)  # the block, its router's parts, the experts: every sliced tensor's owner
            before = sum(p.numel() for m in modules for p in m.parameters(recurse=False))
            state = [(m, dict(m._parameters), dict(m._buffers), {a: getattr(m, a) for a in COUNT_ATTRS if hasattr(m, a)})
                     for m in modules]
            saved.append(state)
            slice_layer(layer, list(kept))
            removed += before - sum(p.numel() for m in modules for p in m.parameters(recurse=False))
        yield removed
    finally:
        for state in reversed(saved):
            for module, params, buffers, counts in state:
                module._parameters.update(params)
                module._buffers.update(buffers)
                for a, v in counts.items():
                    setattr(module, a, v)
