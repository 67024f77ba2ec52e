"""Which weights are prunable at the weight grain: every nn.Linear of the decoder layers (attention projections,
dense MLPs, shared experts; routers and the shared-expert gate excluded) and the fused routed experts.
Embeddings and lm_head never are."""

from __future__ import annotations

from torch import nn

from .registry import adapter_for


def prunable_linears(model: nn.Module):
    """(dense linears [DenseLinear], MoE layers) whose weights are prunable: routers and the shared-expert
    gate are excluded, embeddings and lm_head are never among them."""
    adapter = adapter_for(model)
    layers = adapter.moe_layers()
    skip = {id(m) for l in layers for part in (l.router, l.shared_gate) if part is not None for m in part.modules()}
    return [d for d in adapter.dense_linears() if id(d.module) not in skip], layers


def prunable_names(model: nn.Module) -> list[str]:
    """Parameter names of every prunable weight: dense `*.weight` and fused `*.experts.{gate_up,down}_proj`."""
    dense, layers = prunable_linears(model)
    names = {id(m): n for n, m in model.named_modules()}
    return [f"{d.name}.weight" for d in dense] + [f"{names[id(l.experts)]}.{k}" for l in layers
                                                  for k in ("gate_up_proj", "down_proj")]
