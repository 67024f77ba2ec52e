"""Nemotron-H (NVIDIA Nemotron-H MoE, Nemotron 3 Nano): a hybrid stack whose decoder blocks hold one mixer each —
Mamba-2, attention, a dense MLP or a sparse MoE block — behind one pre-norm (`block.norm`, `block.mixer`), and
whose experts are *ungated*: f_i(x) = down_i · relu(up_i x)², with a DeepSeek-V3 router (sigmoid scores, a
selection-only correction bias, group-limited top-k, routed scaling) and an ungated shared expert.

mumoe's algorithms read experts in one layout (`models.base`: gate_up_proj [E, 2I, H], down_proj [E, H, I]). The
adapter swaps in `UngatedExperts`, which holds the family's up_proj [E, I, H] as the *up half* of gate_up_proj, with
a gate half of zeros that nothing reads: its gate is h = relu(u)², computed from the up half alone (in mumoe's view
`activate(gate, up)` and in transformers' kernels `_apply_gate`), so whatever an algorithm does to the gate rows
cannot change what the model computes or what an export writes. Its state dict is the family's own (`up_proj`
[E, I, H], `down_proj` [E, H, I]), so save_pretrained, load_state_dict and every in-memory export read and write
what transformers' NemotronHExperts does. Cost: the experts take 1.5x their memory while loaded.

Refused in one line: latent MoE (`moe_latent_size`: the experts run in a projected space; Nemotron 3 Super) and
experts whose activation is not relu² (the gate form above would not hold). Layer by layer, the reader fills the
up half from the per-expert `up_proj` files and zeros the gate half (`Layout.family_names`); the streamed writers
work per expert file tensor and never see the gate half.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn
from transformers.integrations.moe import use_experts_implementation

from ..errors import MumoeError
from .base import Adapter
from .layout import OwnGate, adopt


class Layout:
    """Nemotron-H's checkpoint layout of its routed experts (`Adapter.checkpoint_layout`): the family's up_proj
    [.., I, H] is mumoe's gate_up_proj [.., 2I, H] with a zero gate half; `family_names` says under which name the
    family keeps it. down_proj is the same in both."""

    names = ("gate_up_proj",)
    family_names = {"gate_up_proj": "up_proj"}

    @staticmethod
    def to_canonical(name: str, t: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.zeros_like(t), t], dim=-2) if name == "gate_up_proj" else t

    @staticmethod
    def to_family(name: str, t: torch.Tensor) -> torch.Tensor:
        return t[..., t.shape[-2] // 2:, :].contiguous() if name == "gate_up_proj" else t


def relu_squared(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Nemotron-H's expert activation h = relu(u)², in the gated form mumoe reads (the gate is not used)."""
    return torch.square(torch.relu(up))


@use_experts_implementation
class UngatedExperts(OwnGate, nn.Module):
    """Nemotron-H's routed experts in mumoe's layout (module doc); the call of transformers' experts modules:
    (hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]. Expert index E (transformers'
    expert-parallel sentinel) computes nothing."""

    gated = False  # `MoELayer.gated`
    checkpoint_layout = Layout

    def __init__(self, config, source: nn.Module) -> None:
        super().__init__()
        self.config = config
        self.num_experts = source.num_experts
        self.hidden_dim, self.intermediate_dim = source.hidden_dim, source.intermediate_dim
        adopt(self, source, Layout)  # gate_up_proj [E, 2I, H] in memory, the family's up_proj [E, I, H] in its state
        self.down_proj = source.down_proj  # [E, H, I], the same in both

    def glu(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return relu_squared(gate, up)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:  # eager
        out = torch.zeros_like(hidden_states)  # [T, H]
        I = self.down_proj.shape[-1]
        for e in torch.unique(top_k_index).tolist():
            if e >= self.gate_up_proj.shape[0]:
                continue
            token, slot = torch.where(top_k_index == e)
            h = relu_squared(None, nn.functional.linear(hidden_states[token], self.gate_up_proj[e, I:]))  # [n, I]
            y = nn.functional.linear(h, self.down_proj[e])  # [n, H]
            out.index_add_(0, token, (y * top_k_weights[token, slot, None]).to(out.dtype))
        return out


class NemotronHAdapter(Adapter):
    """Nemotron-H: the sparse block is `block.mixer` (NemotronHMoE: `gate`, `experts`, `shared_experts`), its input
    the block's pre-norm `block.norm`; experts held as `UngatedExperts` (module doc)."""

    model_types: ClassVar[tuple[str, ...]] = ("nemotron_h",)
    scoring: ClassVar[str] = "sigmoid"
    block_names: ClassVar[tuple[str, ...]] = ("mixer",)
    shared_names: ClassVar[tuple[str, ...]] = ("shared_experts",)
    residual_norm_name: ClassVar[str | None] = "norm"
    expert_count_key: ClassVar[str | None] = "n_routed_experts"
    checkpoint_block_names: ClassVar[tuple[str, ...]] = ("mixer",)  # backbone.layers.N.mixer.experts.E.up_proj
    checkpoint_layout: ClassVar[object | None] = Layout

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        cfg = self.config
        if getattr(cfg, "moe_latent_size", None) is not None:
            raise MumoeError("nemotron_h with moe_latent_size (latent MoE: the experts run in a projected space) is "
                             "not supported yet; nearest: nemotron_h without it")
        if getattr(cfg, "mlp_hidden_act", "relu2") != "relu2":
            raise MumoeError(f"nemotron_h with mlp_hidden_act={cfg.mlp_hidden_act!r} is not supported (mumoe reads "
                             "its ungated experts as relu² only)")
        for layer in self.decoder_layers():
            mixer = getattr(layer, "mixer", None)
            experts = getattr(mixer, "experts", None)
            if experts is not None and not isinstance(experts, UngatedExperts):
                mixer.experts = UngatedExperts(cfg, experts)

    def is_sparse_block(self, mlp: nn.Module) -> bool:
        return isinstance(getattr(mlp, "experts", None), UngatedExperts) and self.router_of(mlp) is not None
