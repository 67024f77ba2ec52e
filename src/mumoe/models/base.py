"""The normalized MoE view: one `MoELayer` per sparse block, whatever the HF architecture.

Algorithms only see `MoELayer` (and `DenseLinear` for weight-grain pruning); every architecture quirk
(attribute names, router semantics, shared experts, config keys) lives in one adapter subclass of
`Adapter`, registered by `model_type` in `mumoe.models.registry`.

Shapes follow transformers v5 fused experts:
    router.weight        [E, H]
    experts.gate_up_proj [E, 2I, H]   (gate rows first, then up rows)
    experts.down_proj    [E, H, I]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar

import torch
from torch import nn

from ..errors import MumoeError

# Every key under which an HF config may hold the number of routed experts.
EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
TOP_K_KEYS = ("num_experts_per_tok", "moe_topk", "moe_k")


def config_experts(config) -> tuple[int | None, int | None]:
    """(routed experts per layer, top_k) from an HF config (its text config for multimodal ones); None where
    the config has none (a dense model)."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config

    def first(keys):
        return next((v for k in keys if isinstance(v := getattr(cfg, k, None), int) and v > 0), None)

    return first(EXPERT_COUNT_KEYS), first(TOP_K_KEYS)


@dataclass
class MoELayer:
    """One sparse MoE block of a model, normalized across architectures.

    `scoring` names how the router turns logits into combine weights:
      "softmax"      softmax over E, top-k, renormalized over the top-k iff `norm_topk_prob`
      "sigmoid"      DeepSeek-V3: sigmoid scores (+ correction bias for selection only), group-limited
                     top-k, weights = sigmoid of the chosen, normalized iff `norm_topk_prob`,
                     × `routed_scaling_factor`
    """

    index: int  # decoder-layer index (model.model.layers[index])
    block: nn.Module  # the sparse MoE block (its forward input is the normalized MoE input)
    router: nn.Module  # returns (logits [T, E], weights [T, k], indices [T, k])
    experts: nn.Module  # fused: gate_up_proj [E, 2I, H], down_proj [E, H, I]
    decoder_layer: nn.Module
    top_k: int
    scoring: str = "softmax"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    n_group: int | None = None
    topk_group: int | None = None
    shared: nn.Module | None = None  # shared expert MLP, never pruned as a routed expert
    shared_gate: nn.Module | None = None  # Qwen2-MoE sigmoid gate of the shared expert
    residual_norm: nn.Module | None = None  # post-attention norm: its input is the residual stream h_t
    act_fn: Callable[[torch.Tensor], torch.Tensor] = field(default=torch.nn.functional.silu)

    # ---- sizes -------------------------------------------------------------------------------
    @property
    def num_experts(self) -> int:
        return self.experts.gate_up_proj.shape[0]

    @property
    def intermediate_size(self) -> int:
        return self.experts.down_proj.shape[-1]

    @property
    def hidden_size(self) -> int:
        return self.experts.down_proj.shape[1]

    # ---- router tensors ----------------------------------------------------------------------
    @property
    def router_weight(self) -> torch.Tensor:  # [E, H]
        return self.router.weight

    @property
    def router_bias(self) -> torch.Tensor | None:  # [E] where the router has one
        return getattr(self.router, "bias", None)

    @property
    def correction_bias(self) -> torch.Tensor | None:  # [E] DeepSeek-V3 e_score_correction_bias
        return getattr(self.router, "e_score_correction_bias", None)

    # ---- per-expert weight views (no copies) -------------------------------------------------
    def gate_proj(self, i: int) -> torch.Tensor:  # [I, H]
        return self.experts.gate_up_proj[i, : self.intermediate_size]

    def up_proj(self, i: int) -> torch.Tensor:  # [I, H]
        return self.experts.gate_up_proj[i, self.intermediate_size :]

    def down_proj(self, i: int) -> torch.Tensor:  # [H, I]
        return self.experts.down_proj[i]

    def expert_hidden(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """h = act(gate_i x) * up_i x, the down-projection input. x [T, H] -> [T, I]."""
        gate_up = torch.nn.functional.linear(x, self.experts.gate_up_proj[i])  # [T, 2I]
        gate, up = gate_up.chunk(2, dim=-1)
        return self.act_fn(gate) * up

    def expert_forward(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """f_i(x) = down_i(act(gate_i x) * up_i x), before the combine weight. x [T, H] -> [T, H]."""
        return torch.nn.functional.linear(self.expert_hidden(i, x), self.experts.down_proj[i])


@dataclass
class DenseLinear:
    """A prunable linear of a decoder layer (attention projections, dense MLP)."""

    layer: int
    name: str  # full module name, e.g. "model.layers.0.self_attn.q_proj"
    module: nn.Linear


class Adapter:
    """Architecture adapter: finds the MoE blocks and knows the config keys of one family."""

    model_types: ClassVar[tuple[str, ...]] = ()
    scoring: ClassVar[str] = "softmax"
    is_moe: ClassVar[bool] = True
    # checkpoint spellings besides transformers v5's (`models.keys`): other names of the MoE block in the files,
    # and per-expert matrix names -> gate_proj / up_proj / down_proj
    checkpoint_block_names: ClassVar[tuple[str, ...]] = ()
    checkpoint_expert_kinds: ClassVar[dict[str, str]] = {}

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.config = model.config

    # -- structure -----------------------------------------------------------------------------
    def decoder_layers(self) -> nn.ModuleList:
        return self.model.model.layers

    def is_sparse_block(self, mlp: nn.Module) -> bool:
        return hasattr(mlp, "experts") and hasattr(mlp.experts, "gate_up_proj")

    def shared_modules(self, mlp: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
        return None, None

    def layer_fields(self) -> dict:
        cfg = self.config
        return {"norm_topk_prob": bool(getattr(cfg, "norm_topk_prob", True))}

    def moe_layers(self) -> list[MoELayer]:
        out = []
        for i, layer in enumerate(self.decoder_layers()):
            mlp = layer.mlp
            if not self.is_sparse_block(mlp):
                continue
            shared, shared_gate = self.shared_modules(mlp)
            out.append(MoELayer(
                index=i, block=mlp, router=mlp.gate, experts=mlp.experts, decoder_layer=layer,
                top_k=self.top_k, scoring=self.scoring, shared=shared, shared_gate=shared_gate,
                residual_norm=getattr(layer, "post_attention_layernorm", None),
                act_fn=mlp.experts.act_fn, **self.layer_fields(),
            ))
        return out

    def module_names(self) -> dict[int, str]:
        """id(module) -> its full name in the model."""
        return {id(m): n for n, m in self.model.named_modules()}

    def dense_linears(self) -> list[DenseLinear]:
        """Every nn.Linear inside the decoder layers (embeddings and lm_head excluded)."""
        full = self.module_names()
        return [DenseLinear(i, full[id(mod)], mod)
                for i, layer in enumerate(self.decoder_layers())
                for mod in layer.modules() if isinstance(mod, nn.Linear)]

    def mlp_chains(self) -> list[tuple[tuple[str, ...], str]]:
        """Dense MLPs whose consumer reads the producers' outputs channel by channel, by full module name:
        down(act(gate x) ⊙ up x) -> ((gate, up), down). Input channel c of the consumer depends on output row c
        of each producer only. Default: every module of a decoder layer with gate_proj/up_proj/down_proj
        linears (Llama, Qwen2, shared experts, DeepSeek dense layers)."""
        full = self.module_names()
        parts = ("gate_proj", "up_proj", "down_proj")
        return [((full[id(mod.gate_proj)], full[id(mod.up_proj)]), full[id(mod.down_proj)])
                for layer in self.decoder_layers() for mod in layer.modules()
                if all(isinstance(getattr(mod, a, None), nn.Linear) for a in parts)]

    # -- config --------------------------------------------------------------------------------
    @property
    def top_k(self) -> int:
        for key in TOP_K_KEYS:
            if getattr(self.config, key, None) is not None:
                return int(getattr(self.config, key))
        raise MumoeError(f"{self.config.model_type}: no top-k key in config")

    expert_width_key: ClassVar[str] = "moe_intermediate_size"  # config key of the routed experts' width I
    # the expert-count key the architecture's config class reads in transformers 4.x and llama.cpp's converter
    # (v5 may spell it otherwise, e.g. qwen3_moe's num_local_experts); an export carries it (`apply.packaging`)
    expert_count_key: ClassVar[str | None] = "num_experts"

    def set_expert_width(self, width: int) -> None:
        """Rewrite the config's routed-expert width (uniform atom pruning)."""
        setattr(self.config, self.expert_width_key, width)

    def set_num_experts(self, n: int) -> list[str]:
        """Rewrite every expert-count key of the config (nested text configs included)."""
        return set_expert_count(self.config, n)


def set_expert_count(config, n: int) -> list[str]:
    """Set every expert-count key present in `config` (and its nested sub-configs) to `n`."""
    changed = []
    for key in EXPERT_COUNT_KEYS:
        if key in config.to_dict() or key in getattr(config, "attribute_map", {}):
            setattr(config, key, n)
            changed.append(key)
    for sub in ("text_config", "language_config", "llm_config"):
        subcfg = getattr(config, sub, None)
        if subcfg is not None and subcfg is not config and hasattr(subcfg, "to_dict"):
            changed += [f"{sub}.{k}" for k in set_expert_count(subcfg, n)]
    return changed
