"""Llama 4 (Scout, Maverick; `llama4_text`, and the multimodal `llama4` whose text model AutoModelForCausalLM
builds): a shared expert beside routed experts chosen top-k by their router logits, each weighted by the sigmoid of
its logit — applied to the expert's *input*: the routed sum is Σ_j f_{e_j}(g_j · x), not Σ_j g_j · f_{e_j}(x).

transformers' `Llama4TextMoe` runs every expert on every token (the unchosen with input 0, whose output is 0: no
biases, f(0) = 0). mumoe swaps in, when the adapter is made, the same computation over the chosen experts only:

    router   `TopKRouter`: (logits [T, E], weights σ(top-k logits) [T, k], indices [T, k]), the weight `router.weight`
    experts  `InputScaledExperts` in mumoe's layout: gate_up_proj [E, 2I, H] (gate rows, then up), down_proj
             [E, H, I]; state dict in the family's own (gate_up_proj [E, H, 2I], down_proj [E, I, H]) both ways
    block    shared_expert(x) + experts(x, indices, weights), returning (output, logits) as the original does

`MoELayer.input_scaled` tells the observer to hand collectors f_i(g·x) with weight 1 (the expert's real input and
contribution), so every criterion reads what the block computes. The shared expert's width is the config's
`intermediate_size`, the routed experts' too: the uniform atom form cannot rewrite it (the global form can).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from .families import NoWidthKeyAdapter
from .layout import adopt

EXPERT_TENSORS = ("gate_up_proj", "down_proj")


def to_canonical(name: str, t: torch.Tensor) -> torch.Tensor:
    """A Llama 4 expert tensor -> mumoe's layout: gate_up [..., H, 2I] -> [..., 2I, H], down [..., I, H] -> [..., H, I]."""
    return t.transpose(-1, -2).contiguous() if name in EXPERT_TENSORS else t


to_family = to_canonical  # the transpose is its own inverse


class Layout:
    """Llama 4's checkpoint layout of its expert tensors (`Adapter.checkpoint_layout`)."""

    names = EXPERT_TENSORS
    to_canonical = staticmethod(to_canonical)
    to_family = staticmethod(to_family)


class TopKRouter(nn.Module):
    """Llama 4's router as a top-k router: -> (logits [T, E], σ(chosen logits) [T, k], chosen [T, k])."""

    def __init__(self, source: nn.Linear, top_k: int) -> None:
        super().__init__()
        self.weight = source.weight  # [E, H]; the same parameter, the same state-dict key
        self.top_k = top_k

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = nn.functional.linear(hidden_states.reshape(-1, self.weight.shape[1]), self.weight)  # [T, E]
        top, indices = torch.topk(logits, self.top_k, dim=-1)
        return logits, torch.sigmoid(top.float()).to(logits.dtype), indices


class InputScaledExperts(nn.Module):
    """Llama 4's routed experts in mumoe's layout (module doc); (hidden_states [T, H], top_k_index [T, k],
    top_k_weights [T, k]) -> Σ_j f_{e_j}(w_j · x) [T, H]. An index ≥ E is a skipped slot."""

    def __init__(self, source: nn.Module) -> None:
        super().__init__()
        self.num_experts = source.num_experts
        self.hidden_size, self.intermediate_size = source.hidden_size, source.intermediate_size
        self.act_fn = source.act_fn
        adopt(self, source, Layout)  # mumoe's layout in memory, the family's in the state dict

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)  # [T, H]
        for e in torch.unique(top_k_index).tolist():
            if e >= self.num_experts:
                continue
            token, slot = torch.where(top_k_index == e)
            x = hidden_states[token] * top_k_weights[token, slot, None].to(hidden_states.dtype)  # [n, H] scaled
            gate, up = nn.functional.linear(x, self.gate_up_proj[e]).chunk(2, dim=-1)  # [n, I] each
            out.index_add_(0, token, nn.functional.linear(self.act_fn(gate) * up, self.down_proj[e]).to(out.dtype))
        return out


def _block_forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`Llama4TextMoe`'s output over the chosen experts only: (shared(x) + Σ_j f_{e_j}(g_j x) [T, H], logits)."""
    x = hidden_states.reshape(-1, self.hidden_dim)  # [T, H]
    logits, weights, indices = self.router(x)
    out = self.shared_expert(x)
    out = out + self.experts(x, indices, weights)
    return out, logits


_SPARSE: dict[type, type] = {}


def _sparse_class(cls: type) -> type:
    """`Llama4TextMoe` with `_block_forward` as its forward (a subclass: instance forwards stay free for hooks)."""
    if cls not in _SPARSE:
        _SPARSE[cls] = type(f"Sparse{cls.__name__}", (cls,), {"forward": _block_forward})
    return _SPARSE[cls]


class Llama4Adapter(NoWidthKeyAdapter):
    """Llama 4: `feed_forward` blocks (MoE on the config's `moe_layers`) with `router`, `experts` and
    `shared_expert`, held in mumoe's form (module doc)."""

    model_types: ClassVar[tuple[str, ...]] = ("llama4_text", "llama4")
    scoring: ClassVar[str] = "sigmoid"
    shared_names: ClassVar[tuple[str, ...]] = ("shared_expert",)
    expert_width_key: ClassVar[str] = "intermediate_size"
    expert_count_key: ClassVar[str | None] = "num_local_experts"
    checkpoint_layout: ClassVar[object | None] = Layout

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        for layer in self.decoder_layers():
            block = getattr(layer, "feed_forward", None)
            experts = getattr(block, "experts", None)
            if experts is None or isinstance(experts, InputScaledExperts):
                continue
            block.experts = InputScaledExperts(experts)
            block.router = TopKRouter(block.router, block.top_k)
            block.__class__ = _sparse_class(type(block))

    def is_sparse_block(self, mlp: nn.Module) -> bool:
        return isinstance(getattr(mlp, "experts", None), InputScaledExperts) and self.router_of(mlp) is not None

    def layer_fields(self) -> dict:
        return {"norm_topk_prob": False, "routed_scaling_factor": 1.0, "n_group": None, "topk_group": None,
                "input_scaled": True}
