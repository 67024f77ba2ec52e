"""LongCat-Flash (meituan-longcat/LongCat-Flash-Chat, -Thinking): zero-computation ("identity") experts, two
attention + dense-MLP sublayers per decoder layer, and a shortcut MoE.

Its router (`mlp.router`: `classifier` [E + Z, H], `e_score_correction_bias` [E + Z]) scores E routed experts and
Z zero-computation experts together: softmax over all E + Z logits, top-k of the scores plus the correction bias,
combine weights = the chosen scores × routed_scaling_factor (never renormalized). A pick of an identity expert adds
the block input times its weight; the block hands those slots to the routed experts with weight 0. mumoe removes
and merges routed experts only: every router tensor keeps the identity experts' entries after the routed ones
(`RouterTensor.tail`), and the config's `zero_expert_num` stays. Removing an identity expert is never meaningful
(it holds no weights: dropping it would only change which tokens skip the experts), so no grain offers it.

The decoder layer: attention 0 -> `post_attention_layernorm[0]` -> the MoE block and the dense MLP `mlps[0]` read
the same normalized input; attention 1 -> `mlps[1]`; the MoE output joins the residual at the end of the layer.
The block's input norm is therefore `post_attention_layernorm[0]`.
"""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from .base import Adapter, RouterTensor


class LongcatFlashAdapter(Adapter):
    """LongCat-Flash: the v5 fused experts and a router with Z identity experts after the E routed ones."""

    model_types: ClassVar[tuple[str, ...]] = ("longcat_flash",)
    block_names: ClassVar[tuple[str, ...]] = ("mlp",)
    router_names: ClassVar[tuple[str, ...]] = ("router",)
    expert_width_key: ClassVar[str] = "expert_ffn_hidden_size"
    expert_count_key: ClassVar[str | None] = "n_routed_experts"

    @classmethod
    def keep_layers(cls, config, n: int) -> None:
        config.num_layers = n  # (its num_hidden_layers counts attention sublayers: 2 per decoder layer)

    def residual_norm_of(self, layer: nn.Module) -> nn.Module | None:
        return layer.post_attention_layernorm[0]  # the first sublayer's: the MoE block reads its output

    @property
    def identity_experts(self) -> int:
        return int(getattr(self.config, "zero_expert_num", None) or 0)

    def router_tensors(self, mlp: nn.Module, skip: list[nn.Module | None]) -> list[RouterTensor]:
        """The router's tensors with an entry per routed expert and then one per identity expert: [E + Z, ...]."""
        E, Z = mlp.experts.gate_up_proj.shape[0], self.identity_experts
        if not Z:
            return super().router_tensors(mlp, skip)
        out = []
        for module in mlp.router.modules():
            for name, t in [*module._parameters.items(), *module._buffers.items()]:
                if t is not None and t.dim() >= 1 and t.shape[0] == E + Z:
                    out.append(RouterTensor(module, name, 0, tail=Z))
        return out

    def layer_fields(self) -> dict:
        return {**super().layer_fields(), "norm_topk_prob": False, "identity_experts": self.identity_experts}
