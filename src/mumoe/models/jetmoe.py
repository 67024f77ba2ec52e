"""JetMoE (jetmoe/jetmoe-8b): a sparse MLP block outside transformers v5's expert conventions, and a mixture of
attention heads (MoA) that mumoe leaves as it is.

transformers' `JetMoeMoE` keeps its experts as two `JetMoeParallelExperts` modules — `input_linear.weight`
[E, 2I, H] (gate rows, then up rows: the output is chunked gate | up) and `output_linear.weight` [E, H, I] — behind
a `JetMoeTopKGating` router (`router.layer` [E, H]: top-k of the fp32 logits, softmax over those k) that returns the
sorted dispatch rather than (logits, weights, indices), and adds a bias [H] to every token's output. Those are
mumoe's layout already, so the adapter swaps in `SparseBlock`: the same tensors as a v5 experts module
(`experts.gate_up_proj`, `experts.down_proj`, run by transformers' kernels), a router returning what v5 routers
return, and the bias. Its state dict is the family's own (`input_linear.weight`, `output_linear.weight`), so
save_pretrained and every export write what transformers' JetMoE reads; the layer-by-layer reader renames the files'
keys onto the swapped names (`Adapter.checkpoint_renames`), the streamed writers keep the files' spelling.

The attention experts (`self_attention.experts`, JetMoeMoA: per-expert query and output projections with a router
of their own) are attention, not MLP experts: no grain removes or merges them, and the weight grain leaves their
fused tensors dense (its linears: the routers').
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.integrations.moe import use_experts_implementation

from .base import Adapter, MoELayer

# the block's tensors under the family's names <- mumoe's (relative to the block)
FAMILY_NAMES = {"experts.gate_up_proj": "input_linear.weight", "experts.down_proj": "output_linear.weight"}


class TopKRouter(nn.Module):
    """JetMoE's gating as transformers v5 routers return it: hidden [T, H] -> (logits [T, E] fp32, weights [T, k]
    = softmax over the top-k logits, indices [T, k])."""

    def __init__(self, source: nn.Module) -> None:
        super().__init__()
        self.layer = source.layer  # Linear, weight [E, H]
        self.top_k, self.num_experts = source.top_k, source.num_experts

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = self.layer(hidden_states).float()  # [T, E]
        top, indices = logits.topk(self.top_k, dim=1)
        return logits, torch.softmax(top, dim=1).type_as(hidden_states), indices


@use_experts_implementation
class FusedExperts(nn.Module):
    """JetMoE's routed experts as a v5 experts module: (hidden [T, H], top_k_index [T, k], top_k_weights [T, k])
    -> [T, H]; gate_up_proj [E, 2I, H] (gate rows, then up), down_proj [E, H, I]. An index ≥ E is a skipped slot."""

    def __init__(self, config, block: nn.Module) -> None:
        super().__init__()
        self.gate_up_proj = block.input_linear.weight
        self.down_proj = block.output_linear.weight
        self.num_experts = self.gate_up_proj.shape[0]
        self.act_fn = ACT2FN[config.activation_function]

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:  # eager
        out = torch.zeros_like(hidden_states)  # [T, H]
        for e in torch.unique(top_k_index).tolist():
            if e >= self.num_experts:  # a skipped slot (`testtime.skip`'s sentinel index E): not computed
                continue
            token, slot = torch.where(top_k_index == e)
            gate, up = nn.functional.linear(hidden_states[token], self.gate_up_proj[e]).chunk(2, dim=-1)
            y = nn.functional.linear(self.act_fn(gate) * up, self.down_proj[e])  # [n, H]
            out.index_add_(0, token, (y * top_k_weights[token, slot, None]).to(out.dtype))
        return out


class SparseBlock(nn.Module):
    """JetMoE's sparse MLP in mumoe's view (module doc): x [B, L, H] -> Σ_j g_j f_j(x) + bias, [B, L, H]."""

    def __init__(self, config, source: nn.Module) -> None:
        super().__init__()
        self.router = TopKRouter(source.router)
        self.experts = FusedExperts(config, source)
        self.bias = source.bias  # [H], added to every token's output
        self._register_state_dict_hook(_family_state)
        self.register_load_state_dict_pre_hook(_mumoe_state)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        B, L, H = hidden_states.shape
        flat = hidden_states.reshape(-1, H)
        _, weights, indices = self.router(flat)
        return self.experts(flat, indices, weights).view(B, L, H) + self.bias


def _family_state(module, state: dict, prefix: str, local_metadata) -> None:
    for ours, theirs in FAMILY_NAMES.items():
        if prefix + ours in state:
            state[prefix + theirs] = state.pop(prefix + ours)


def _mumoe_state(module, state: dict, prefix: str, *args) -> None:
    for ours, theirs in FAMILY_NAMES.items():
        if prefix + theirs in state:
            state[prefix + ours] = state.pop(prefix + theirs)


class JetMoeAdapter(Adapter):
    """JetMoE: `mlp` swapped for `SparseBlock` (module doc); routers softmax over the top-k logits."""

    model_types: ClassVar[tuple[str, ...]] = ("jetmoe",)
    router_names: ClassVar[tuple[str, ...]] = ("router",)
    expert_width_key: ClassVar[str] = "intermediate_size"  # JetMoE has no dense MLP: the experts' width only
    expert_count_key: ClassVar[str | None] = "num_local_experts"
    expert_removal_gap: ClassVar[str | None] = ("num_local_experts also sizes its attention experts (MoA), so a config "
                                                "cannot hold fewer MLP experts")
    # the files' keys -> the swapped block's names (the layer-by-layer reader; writers keep the files' spelling)
    checkpoint_renames: ClassVar[tuple[tuple[str, str], ...]] = (
        (r"\.mlp\.input_linear\.weight$", ".mlp.experts.gate_up_proj"),
        (r"\.mlp\.output_linear\.weight$", ".mlp.experts.down_proj"),
    )

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        for layer in self.decoder_layers():
            mlp = getattr(layer, "mlp", None)
            if mlp is not None and not isinstance(mlp, SparseBlock):
                layer.mlp = SparseBlock(self.config, mlp)

    def is_sparse_block(self, mlp: nn.Module) -> bool:
        return isinstance(mlp, SparseBlock)

    def router_tensors(self, mlp: nn.Module, skip: list[nn.Module | None]) -> list:
        return [rt for rt in super().router_tensors(mlp, skip) if rt.module is not mlp]  # (the bias is [H])

    def dense_linears(self) -> list:
        """Every decoder linear but the attention experts' routers (routers are never weight-pruned)."""
        skip = {id(m) for layer in self.decoder_layers() for m in layer.self_attention.experts.router.modules()}
        return [d for d in super().dense_linears() if id(d.module) not in skip]

    def moe_layers(self) -> list[MoELayer]:
        layers = super().moe_layers()
        for layer in layers:
            layer.output_bias = layer.block.bias
        return layers

    def layer_fields(self) -> dict:
        return {**super().layer_fields(), "norm_topk_prob": True}
