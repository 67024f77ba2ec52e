"""Column structure, compacted: keep the chosen input columns of each weight and gather the inputs, so the
matmuls are genuinely smaller (no sparse kernel needed).

Dense linears become `CompactLinear` (W[:, keep], x[..., keep]); fused experts get a forward that gathers
each expert's kept input columns for gate_up (of H) and down (of I). `uncompact` puts the originals back.
"""

from __future__ import annotations

import types

import torch
from torch import nn

from ..models import adapter_for


class CompactLinear(nn.Module):
    """y = W[:, keep] · x[..., keep] + b. weight [d_out, k], keep [k]."""

    def __init__(self, linear: nn.Linear, keep: torch.Tensor) -> None:
        super().__init__()
        self.original = linear
        self.register_buffer("keep", keep.to(linear.weight.device), persistent=False)
        self.weight = nn.Parameter(linear.weight.detach()[:, keep].contiguous(), requires_grad=False)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x.index_select(-1, self.keep), self.weight, self.bias)


def _compact_experts_forward(layer, keep_in: torch.Tensor, keep_mid: torch.Tensor):
    """keep_in [E, kH] input columns of gate_up per expert; keep_mid [E, kI] intermediate columns of down."""
    E = keep_in.shape[0]
    gu = torch.stack([layer.experts.gate_up_proj.detach()[e][:, keep_in[e]] for e in range(E)])  # [E, 2I, kH]
    dn = torch.stack([layer.experts.down_proj.detach()[e][:, keep_mid[e]] for e in range(E)])  # [E, H, kI]
    act = layer.act_fn

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)  # [T, H]
        for e in torch.unique(top_k_index).tolist():
            tok, slot = torch.where(top_k_index == e)
            x = hidden_states[tok].index_select(-1, keep_in[e])  # [n, kH]
            gate, up = nn.functional.linear(x, gu[e]).chunk(2, dim=-1)
            h = (act(gate) * up).index_select(-1, keep_mid[e])  # [n, kI]
            y = nn.functional.linear(h, dn[e]) * top_k_weights[tok, slot, None]
            out.index_add_(0, tok, y.to(out.dtype))
        return out

    return forward


def _columns(mask: torch.Tensor) -> torch.Tensor:
    """Kept input columns of a column-structured mask [.., d_out, d_in] -> [.., k] (same count per matrix)."""
    cols = mask.any(-2)  # [.., d_in]
    return torch.stack([c.nonzero().flatten() for c in cols.reshape(-1, cols.shape[-1])]).reshape(*cols.shape[:-1], -1)


def compact(model: nn.Module, masks: dict[str, torch.Tensor]) -> list:
    """Swap in compacted modules / expert forwards for column-structured `masks`; returns an undo list."""
    adapter = adapter_for(model)
    modules = dict(model.named_modules())
    undo = []
    for name, mask in masks.items():
        if name.endswith(".weight"):
            parent_name, _, attr = name[: -len(".weight")].rpartition(".")
            parent = modules[parent_name] if parent_name else model
            lin = getattr(parent, attr)
            setattr(parent, attr, CompactLinear(lin, _columns(mask)))
            undo.append((parent, attr, lin))
    names = {id(m): n for n, m in modules.items()}
    for layer in adapter.moe_layers():
        prefix = names[id(layer.experts)]
        if f"{prefix}.gate_up_proj" in masks:
            keep_in = _columns(masks[f"{prefix}.gate_up_proj"])  # [E, kH]
            keep_mid = _columns(masks[f"{prefix}.down_proj"])  # [E, kI]
            undo.append((layer.experts, "forward", layer.experts.__dict__.get("forward")))
            layer.experts.forward = types.MethodType(_compact_experts_forward(layer, keep_in, keep_mid), layer.experts)
    return undo


def uncompact(undo: list) -> None:
    for owner, attr, original in reversed(undo):
        if attr == "forward" and original is None:
            del owner.forward
        else:
            setattr(owner, attr, original)
