"""DeepSeek-V4 (deepseek-ai/DeepSeek-V4-Flash, -Pro): manifold-constrained hyper-connections around every block,
hash-routed first MoE layers, `sqrtsoftplus` router scores, a clamped SwiGLU, compressed sparse attention.

What mumoe reads of it:
- Routing: scores s = √softplus(logits) over the E experts; learned layers pick the top-k of s + a selection-only
  correction bias; combine weights = the chosen s, renormalized, × routed_scaling_factor. Hash layers
  (`mlp_layer_types` "hash_moe", the first few) pick from a fixed token → experts table (`gate.tid2eid`
  [V, k]) and weight by the same scores: `MoELayer.fixed_routing`.
- Since a hash layer's table names experts by index and no rule says where a removed expert's tokens should go,
  expert methods and merges keep the hash layers whole (every expert; slicing one refuses) and prune the learned
  layers: their counts differ, so such exports are mumoe's own form (`mumoe.load`, or transformers with
  trust_remote_code). Per-prompt experts and TAER's task models are refused in one line; STUN (one clustering over
  all layers) too. Atoms (HEAPr's global form: the shared expert is sized by the same config key as the routed
  ones), weights (Wanda, per-prompt μ-MoE) and mixed precision work.
- The residual stream is `hc_mult` parallel streams [B, L, hc, H]; each block reads their collapse through
  `post_attention_layernorm` (the block's input norm here). The layer-by-layer sweep carries the streams as the
  decoder layers pass them, and its loss head collapses them (`hc_head`) before the final norm.
- The grouped output projection (`self_attn.o_a_proj`, a block-diagonal `nn.Linear` over head groups) is left
  dense by the weight grain: its input channels are per group, which a per-column norm over all groups would blur.
"""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from .base import DenseLinear, MoELayer
from .families import NoWidthKeyAdapter


class DeepseekV4Adapter(NoWidthKeyAdapter):
    """DeepSeek-V4 (module doc)."""

    model_types: ClassVar[tuple[str, ...]] = ("deepseek_v4",)
    scoring: ClassVar[str] = "sqrtsoftplus"
    shared_names: ClassVar[tuple[str, ...]] = ("shared_experts",)
    expert_count_key: ClassVar[str | None] = "n_routed_experts"
    expert_width_key: ClassVar[str] = "moe_intermediate_size"  # (also the shared expert's width)
    head_pre_norm: ClassVar[tuple[str, ...]] = ("hc_head",)  # collapses the hyper-connection streams
    # what `mumoe info --architectures` says of expert removal and merging here
    expert_removal_scope: ClassVar[str] = "learned layers only (hash layers kept whole: mumoe's own form)"
    # its files keep the original release's names: experts per expert as w1 / w3 / w2 (read as they are)
    checkpoint_expert_kinds: ClassVar[dict[str, str]] = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
    checkpoint_block_names: ClassVar[tuple[str, ...]] = ("ffn",)

    def moe_layers(self) -> list[MoELayer]:
        layers = super().moe_layers()
        for layer in layers:
            layer.fixed_routing = bool(getattr(layer.block, "is_hash", False))
        return layers

    def router_tensors(self, mlp: nn.Module, skip: list[nn.Module | None]) -> list:
        return [rt for rt in super().router_tensors(mlp, skip) if rt.name != "tid2eid"]  # (a table, not per expert)

    def dense_linears(self) -> list[DenseLinear]:
        """Every decoder linear but the grouped output projections (module doc)."""
        return [d for d in super().dense_linears() if type(d.module).forward is nn.Linear.forward]
