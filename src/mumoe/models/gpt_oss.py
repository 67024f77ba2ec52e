"""GPT-OSS (gpt-oss-20b, gpt-oss-120b): routers with a bias (softmax over the top-k logits), experts with
biases, a clamped SwiGLU, and expert tensors stored transposed with the gate and up columns interleaved.

In memory mumoe holds each layer's experts in the layout every algorithm reads (`models.base`), as
`CanonicalExperts`, swapped in for transformers' `GptOssExperts` when the adapter is made:

    gate_up_proj [E, 2I, H] (gate rows, then up rows)   gate_up_proj_bias [E, 2I] (gate, then up)
    down_proj    [E, H, I]                              down_proj_bias    [E, H]

Its state dict is the family's own layout (hooks convert both ways), so save_pretrained, load_state_dict and
every export write and read the checkpoint exactly as transformers' GPT-OSS does:

    gate_up_proj [E, H, 2I] (columns g0 u0 g1 u1 …)     gate_up_proj_bias [E, 2I] (g0 u0 g1 u1 …)
    down_proj    [E, I, H]                              down_proj_bias    [E, H]

The forward is transformers' own dispatch (`use_experts_implementation`: eager, batched_mm, grouped_mm) over the
canonical tensors, with GPT-OSS's gate h = (clamp(u, ±l) + 1) · g' σ(α g'), g' = min(g, l).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn
from transformers.integrations.moe import use_experts_implementation

from .base import Adapter
from .layout import OwnGate, adopt

# ---- the two layouts (pure functions; any leading dims) ----------------------------------------------------


def to_canonical(name: str, t: torch.Tensor) -> torch.Tensor:
    """One expert tensor of a GPT-OSS checkpoint (`name`: gate_up_proj, gate_up_proj_bias, down_proj,
    down_proj_bias) -> mumoe's layout, in one new tensor (no intermediate copies: a layer's experts are large)."""
    if name == "gate_up_proj":  # [..., H, 2I] interleaved -> [..., 2I, H] gate rows, then up rows
        *lead, H, I2 = t.shape
        out = t.new_empty(*lead, I2, H)
        out[..., : I2 // 2, :] = t[..., 0::2].transpose(-1, -2)
        out[..., I2 // 2:, :] = t[..., 1::2].transpose(-1, -2)
        return out
    if name == "gate_up_proj_bias":  # [..., 2I] interleaved -> gate, then up
        return torch.cat([t[..., 0::2], t[..., 1::2]], dim=-1)
    if name == "down_proj":  # [..., I, H] -> [..., H, I]
        return t.transpose(-1, -2).contiguous()
    return t


def to_family(name: str, t: torch.Tensor) -> torch.Tensor:
    """The inverse of `to_canonical`: mumoe's layout -> the GPT-OSS checkpoint's (one new tensor)."""
    if name == "gate_up_proj":  # [..., 2I, H] -> [..., H, 2I] interleaved
        *lead, I2, H = t.shape
        out = t.new_empty(*lead, H, I2)
        out[..., 0::2] = t[..., : I2 // 2, :].transpose(-1, -2)
        out[..., 1::2] = t[..., I2 // 2:, :].transpose(-1, -2)
        return out
    if name == "gate_up_proj_bias":
        gate, up = t.chunk(2, dim=-1)
        return torch.stack([gate, up], dim=-1).flatten(-2)
    if name == "down_proj":
        return t.transpose(-1, -2).contiguous()
    return t


EXPERT_TENSORS = ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")


class Layout:
    """GPT-OSS's checkpoint layout of its expert tensors (`Adapter.checkpoint_layout`): the readers convert each
    tensor they read to mumoe's layout, the streamed writer each tensor it writes back."""

    names = EXPERT_TENSORS
    to_canonical = staticmethod(to_canonical)
    to_family = staticmethod(to_family)


def clamped_swiglu(gate: torch.Tensor, up: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """GPT-OSS's gate, in the order of its modelling code: h = (clamp(u, -l, l) + 1) · g σ(α g), g = min(g, l)."""
    gate = gate.clamp(min=None, max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


@use_experts_implementation(has_bias=True)
class CanonicalExperts(OwnGate, nn.Module):
    """GPT-OSS's routed experts in mumoe's layout (module doc); the call of transformers' experts modules:
    (hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]."""

    def __init__(self, config, source: nn.Module) -> None:
        super().__init__()
        self.num_experts = source.num_experts
        self.hidden_size = source.hidden_size
        self.intermediate_size = source.intermediate_size
        self.alpha, self.limit = float(source.alpha), float(source.limit)
        adopt(self, source, Layout)  # mumoe's layout in memory, the family's in the state dict

    def glu(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return clamped_swiglu(gate, up, self.alpha, self.limit)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:  # eager
        out = torch.zeros_like(hidden_states)  # [T, H]
        for e in torch.unique(top_k_index).tolist():
            token, slot = torch.where(top_k_index == e)
            gate_up = nn.functional.linear(hidden_states[token], self.gate_up_proj[e], self.gate_up_proj_bias[e])
            h = self._apply_gate(gate_up)  # [n, I]
            y = nn.functional.linear(h, self.down_proj[e], self.down_proj_bias[e])  # [n, H]
            out.index_add_(0, token, (y * top_k_weights[token, slot, None]).to(out.dtype))
        return out


class GptOssAdapter(Adapter):
    """GPT-OSS: `mlp.router` (weight [E, H], bias [E]; softmax over the top-k logits = the softmax over E
    renormalized over the top k) and `mlp.experts`, held as `CanonicalExperts` (module doc)."""

    model_types: ClassVar[tuple[str, ...]] = ("gpt_oss",)
    expert_width_key: ClassVar[str] = "intermediate_size"  # GPT-OSS has no dense MLP: the experts' width only
    expert_count_key: ClassVar[str | None] = "num_local_experts"
    checkpoint_layout: ClassVar[object | None] = Layout

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        for layer in self.decoder_layers():
            experts = getattr(getattr(layer, "mlp", None), "experts", None)
            if experts is not None and not isinstance(experts, CanonicalExperts):
                layer.mlp.experts = CanonicalExperts(experts.config, experts)

    def is_sparse_block(self, mlp: nn.Module) -> bool:
        return isinstance(getattr(mlp, "experts", None), CanonicalExperts) and self.router_of(mlp) is not None

    def layer_fields(self) -> dict:
        return {**super().layer_fields(), "norm_topk_prob": True}
