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
from itertools import chain
from typing import Callable, ClassVar

import torch
from torch import nn

from ..errors import MumoeError

try:  # what transformers' experts decorator gives a class without a gate of its own
    from transformers.integrations.moe import _default_apply_gate as _DEFAULT_GATE
except ImportError:  # an older transformers: every `_apply_gate` found is the family's own
    _DEFAULT_GATE = None

# Every key under which an HF config may hold the number of routed experts.
EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
TOP_K_KEYS = ("num_experts_per_tok", "moe_topk", "moe_k", "num_experts_per_token")
# names a selection-only per-expert bias goes by (on the router, the block or ERNIE's moe_statics)
CORRECTION_BIAS_NAMES = ("e_score_correction_bias", "expert_bias")
# module attributes that hold a layer's expert count (rewritten when experts are removed)
COUNT_ATTRS = EXPERT_COUNT_KEYS + ("num_routed_experts", "n_experts")


def config_experts(config) -> tuple[int | None, int | None]:
    """(routed experts per layer, top_k) from an HF config (its text config for multimodal ones); None where
    the config has none (a dense model)."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config

    def first(keys):
        return next((v for k in keys if isinstance(v := getattr(cfg, k, None), int) and v > 0), None)

    return first(EXPERT_COUNT_KEYS), first(TOP_K_KEYS)


@dataclass
class RouterTensor:
    """One tensor of the routing path with a row (or column) per routed expert: the router's weight [E, H], its
    bias [E], a selection-only correction bias [E] (on the router, the block or a statistics module), ...
    Removing or merging experts slices all of them along `dim` together."""

    module: nn.Module
    name: str
    dim: int = 0  # the expert axis
    # entries after the routed experts' along `dim` that no removal or merge touches: LongCat-Flash's router scores
    # E routed experts, then `tail` zero-computation (identity) experts
    tail: int = 0

    @property
    def tensor(self) -> torch.Tensor:
        return getattr(self.module, self.name)

    def rows(self, keep: torch.Tensor) -> torch.Tensor:
        """The entries along `dim` that keeping routed experts `keep` [E'] (long) keeps: those, then the tail."""
        return kept_rows(keep, self.tensor.shape[self.dim], self.tail)


def kept_rows(keep: torch.Tensor, n: int, tail: int = 0) -> torch.Tensor:
    """Indices into a routing tensor's expert axis of length n = E + tail: the kept routed experts `keep` [E']
    (long), then the `tail` entries after the routed ones (identity experts), which no removal touches."""
    if not tail:
        return keep
    return torch.cat([keep.to(torch.long), torch.arange(n - tail, n, dtype=torch.long, device=keep.device)])


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
    # the experts' gate (gate, up) -> h where it is not act_fn(gate) * up (GPT-OSS's clamped SwiGLU)
    glu: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    routed_scale: float = 1.0  # the block multiplies the routed sum Σ g_i f_i by it (after the experts)
    input_scaled: bool = False  # the combine weight scales the expert's input: Σ f_i(g_i x) (Llama 4)
    # zero-computation experts the router may pick besides the E routed ones (LongCat-Flash): picks >= E add the
    # block input times their weight; mumoe never removes or merges them (`RouterTensor.tail`)
    identity_experts: int = 0
    output_bias: torch.Tensor | None = None  # [H] the block adds to every token's output (JetMoE)
    fixed_routing: bool = False  # experts picked by a fixed token table (DeepSeek-V4's hash layers): kept whole
    router_tensors: list[RouterTensor] = field(default_factory=list)  # every per-expert routing tensor

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
    def _router_tensor(self, names: tuple[str, ...], dims: int) -> torch.Tensor | None:
        """The router tensor of that name and rank, whole (identity experts' entries included)."""
        for rt in self.router_tensors:
            t = rt.tensor
            if rt.name in names and t is not None and t.dim() == dims:
                return t
        return None

    @property
    def router_weight(self) -> torch.Tensor:  # [E, H]; [E + Z, H] with Z identity experts (rows E.. theirs)
        t = self._router_tensor(("weight",), 2)
        return self.router.weight if t is None else t

    @property
    def router_bias(self) -> torch.Tensor | None:  # [E] (+ Z identity experts) where the router has one
        return self._router_tensor(("bias",), 1)

    @property
    def correction_bias(self) -> torch.Tensor | None:  # [E] (+ Z) selection-only bias (DeepSeek-V3 style)
        t = self._router_tensor(CORRECTION_BIAS_NAMES, 1)
        if t is None:
            t = self._router_tensor(CORRECTION_BIAS_NAMES, 2)  # ERNIE's moe_statics [1, E]
            t = None if t is None else t[0]
        return t

    @property
    def gated(self) -> bool:
        """False where the family's experts have no gate matrix (Nemotron-H: f = down·relu(up x)²): the gate half
        of gate_up_proj is then zeros nothing reads (`models.nemotron_h`), and criteria over an expert's matrices
        leave it out."""
        return bool(getattr(self.experts, "gated", True))

    @property
    def expert_weights(self) -> int:
        """Weights of the routed experts as the family stores them (no zero gate half where they have no gate)."""
        gate_up = self.experts.gate_up_proj.numel()
        return (gate_up if self.gated else gate_up // 2) + self.experts.down_proj.numel()

    @property
    def gate_up_bias(self) -> torch.Tensor | None:  # [E, 2I] (gate, then up) where the experts have biases
        return getattr(self.experts, "gate_up_proj_bias", None)

    @property
    def down_bias(self) -> torch.Tensor | None:  # [E, H]
        return getattr(self.experts, "down_proj_bias", None)

    # ---- per-expert weight views (no copies) -------------------------------------------------
    def gate_proj(self, i: int) -> torch.Tensor:  # [I, H]
        return self.experts.gate_up_proj[i, : self.intermediate_size]

    def up_proj(self, i: int) -> torch.Tensor:  # [I, H]
        return self.experts.gate_up_proj[i, self.intermediate_size :]

    def down_proj(self, i: int) -> torch.Tensor:  # [H, I]
        return self.experts.down_proj[i]

    def expert_input(self, x: torch.Tensor, w):
        """An expert's input and the weight its output is multiplied by, for the combine weight w (a float, or a
        tensor broadcasting against x [.., H]): (x, w); where the weight scales the expert's input (`input_scaled`,
        Llama 4: Σ_j f_e(w_j · x)) (w · x in x's dtype, 1)."""
        if not self.input_scaled:
            return x, w
        if isinstance(w, torch.Tensor):
            return x * w.to(x.dtype), torch.ones_like(w)
        return x * torch.tensor(w, dtype=x.dtype, device=x.device), 1.0

    def activate(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """The experts' gate: act(gate) * up, or the family's own (`glu`). [.., I] each -> [.., I]."""
        return self.act_fn(gate) * up if self.glu is None else self.glu(gate, up)

    def expert_hidden(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """h = act(gate_i x) * up_i x (+ the experts' biases), the down-projection input. x [T, H] -> [T, I]."""
        bias = self.gate_up_bias
        gate_up = torch.nn.functional.linear(x, self.experts.gate_up_proj[i], None if bias is None else bias[i])
        gate, up = gate_up.chunk(2, dim=-1)  # [T, I] each
        return self.activate(gate, up)

    def expert_output(self, i: int, h: torch.Tensor) -> torch.Tensor:
        """down_i h (+ the expert's output bias). h [T, I] -> [T, H]."""
        bias = self.down_bias
        return torch.nn.functional.linear(h, self.experts.down_proj[i], None if bias is None else bias[i])

    def expert_forward(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """f_i(x) = down_i(act(gate_i x) * up_i x), before the combine weight. x [T, H] -> [T, H]."""
        return self.expert_output(i, self.expert_hidden(i, x))

    # ---- the shared expert (a gated MLP beside the routed ones) -------------------------------
    def shared_linears(self) -> tuple[nn.Linear, nn.Linear, nn.Linear] | None:
        """The shared expert's gate_proj, up_proj and down_proj where it is a gated MLP of three linears (its
        neurons are atoms too); None where there is no shared expert or it is built otherwise."""
        if self.shared is None:
            return None
        parts = tuple(getattr(self.shared, n, None) for n in ("gate_proj", "up_proj", "down_proj"))
        return parts if all(isinstance(p, nn.Linear) for p in parts) else None

    def shared_hidden(self, x: torch.Tensor) -> torch.Tensor:
        """The shared expert's down-projection input act(gate x)·(up x). x [T, H] -> [T, I_s]."""
        gate, up, _ = self.shared_linears()
        act = getattr(self.shared, "act_fn", None) or getattr(self.shared, "activation_fn", None) or self.act_fn
        return act(gate(x)) * up(x)

    def shared_weight(self, x: torch.Tensor) -> torch.Tensor:
        """What the block multiplies the shared expert's output by: the sigmoid of its gate (Qwen2-MoE style) or
        1. x [T, H] -> [T, 1]."""
        if self.shared_gate is None:
            return x.new_ones(x.shape[0], 1)
        return torch.sigmoid(self.shared_gate(x))


def family_gate(experts: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None:
    """The experts' gate (gate, up) -> h where it is not act(gate) * up: the module's own `glu`, else the
    `_apply_gate` its class defines for transformers' kernels (a clamped SwiGLU, an fp32 activation ...); None
    for the default."""
    glu = getattr(experts, "glu", None)
    if glu is not None:
        return glu
    own = getattr(type(experts), "_apply_gate", None)
    if own is None or own is _DEFAULT_GATE:
        return None
    if not getattr(experts, "is_concatenated", True):  # interleaved gate/up columns
        return lambda gate, up: own(experts, torch.stack([gate, up], -1).flatten(-2))
    return lambda gate, up: own(experts, torch.cat([gate, up], -1))


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
    # how the family's checkpoints store the fused expert tensors where it differs from mumoe's layout (module doc):
    # an object with to_canonical(name, t) and to_family(name, t), name the tensor's last key part (`models.gpt_oss`)
    checkpoint_layout: ClassVar[object | None] = None
    # (regex, replacement) renames of the family's checkpoint keys onto the names its swapped modules give them in
    # memory, after transformers' own renames (`models.keys.checkpoint_renamer`; JetMoE's input_linear.weight ->
    # experts.gate_up_proj); writers keep the files' spelling
    checkpoint_renames: ClassVar[tuple[tuple[str, str], ...]] = ()
    # None: experts can be removed and merged; else why not (JetMoE: its expert-count key also sizes its attention
    # experts): refused in one line before any work (`check_expert_removal`). Layers that must keep every expert
    # while others lose some say so themselves (`MoELayer.fixed_routing`)
    expert_removal_gap: ClassVar[str | None] = None
    # modules of the decoder applied to the last layer's output before its final norm (DeepSeek-V4's `hc_head`,
    # collapsing the hyper-connection streams): the layer-by-layer sweep's loss head runs them
    head_pre_norm: ClassVar[tuple[str, ...]] = ()
    # None: checkpoints of the family can be calibrated layer by layer and exported streamed; else why not (yet)
    layerwise_gap: ClassVar[str | None] = None
    # the decoder layer returns (hidden_states, value) and the next layer takes the value as this keyword (GLM-5's
    # DSA indexer passes its top-k positions on): the layer-by-layer sweep carries it from layer to layer
    layer_carry: ClassVar[str | None] = None

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.config = model.config

    # where transformers v5 puts the parts of a sparse block; a family with other names overrides these
    block_names: ClassVar[tuple[str, ...]] = ("mlp", "feed_forward", "block_sparse_moe")  # on the decoder layer
    router_names: ClassVar[tuple[str, ...]] = ("gate", "router")  # on the block
    shared_names: ClassVar[tuple[str, ...]] = ()  # shared expert MLP(s) on the block, added to the routed sum
    shared_gate_name: ClassVar[str | None] = None  # a sigmoid gate of the shared expert (Qwen2-MoE style)
    residual_norm_name: ClassVar[str | None] = "post_attention_layernorm"  # its output is the block's input

    # -- structure -----------------------------------------------------------------------------
    def decoder_layers(self) -> nn.ModuleList:
        return self.model.model.layers

    def is_sparse_block(self, mlp: nn.Module) -> bool:
        """transformers v5 fused experts: gate_up_proj [E, 2I, H] (gate rows, then up rows), down_proj [E, H, I],
        no biases, not transposed; a router with a row per expert."""
        experts = getattr(mlp, "experts", None)
        gate_up = getattr(experts, "gate_up_proj", None)
        return (isinstance(gate_up, torch.Tensor) and gate_up.dim() == 3
                and getattr(experts, "has_gate", True) and not getattr(experts, "has_bias", False)
                and not getattr(experts, "is_transposed", False) and self.router_of(mlp) is not None)

    def block_of(self, layer: nn.Module) -> nn.Module | None:
        """The decoder layer's sparse MoE block, or None (a dense or mixer-only layer)."""
        for name in self.block_names:
            mlp = getattr(layer, name, None)
            if isinstance(mlp, nn.Module) and self.is_sparse_block(mlp):
                return mlp
        return None

    def router_of(self, mlp: nn.Module) -> nn.Module | None:
        for name in self.router_names:
            router = getattr(mlp, name, None)
            if isinstance(router, nn.Module):
                return router
        return None

    def shared_modules(self, mlp: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
        shared = next((m for n in self.shared_names if isinstance(m := getattr(mlp, n, None), nn.Module)), None)
        gate = getattr(mlp, self.shared_gate_name, None) if self.shared_gate_name else None
        return shared, gate

    def router_tensors(self, mlp: nn.Module, skip: list[nn.Module | None]) -> list[RouterTensor]:
        """Every parameter or buffer of the block outside its experts, shared experts and norms with an axis of
        one entry per routed expert: dim 0 of length E, or [1, E] (dim 1)."""
        E = mlp.experts.gate_up_proj.shape[0]
        skipped = {id(m) for s in skip if s is not None for m in s.modules()}
        out = []
        for module in mlp.modules():
            if id(module) in skipped or "Norm" in type(module).__name__:
                continue
            for name, t in chain(module._parameters.items(), module._buffers.items()):
                if t is None or t.dim() == 0:
                    continue
                if t.shape[0] == E:
                    out.append(RouterTensor(module, name, 0))
                elif t.dim() == 2 and t.shape == (1, E):
                    out.append(RouterTensor(module, name, 1))
        return out

    def layer_fields(self) -> dict:
        """Routing constants of the family's config: top-k renormalization, routed scaling, expert groups."""
        cfg = self.config
        groups = next((g for k in ("n_group", "num_expert_group") if isinstance(g := getattr(cfg, k, None), int)), None)
        grouped = (groups or 1) > 1 and getattr(cfg, "topk_method", "group_limited") != "greedy"
        return {"norm_topk_prob": bool(getattr(cfg, "norm_topk_prob", True)),
                "routed_scaling_factor": float(getattr(cfg, "routed_scaling_factor", None) or 1.0),
                "n_group": groups if grouped else None,
                "topk_group": int(cfg.topk_group) if grouped else None}

    def moe_layers(self) -> list[MoELayer]:
        out = []
        for i, layer in enumerate(self.decoder_layers()):
            mlp = self.block_of(layer)
            if mlp is None:
                continue
            shared, shared_gate = self.shared_modules(mlp)
            out.append(MoELayer(
                index=i, block=mlp, router=self.router_of(mlp), experts=mlp.experts, decoder_layer=layer,
                top_k=self.top_k, scoring=self.scoring, shared=shared, shared_gate=shared_gate,
                residual_norm=self.residual_norm_of(layer),
                act_fn=getattr(mlp.experts, "act_fn", None), glu=family_gate(mlp.experts),
                routed_scale=self.routed_scale(mlp),
                router_tensors=self.router_tensors(mlp, [mlp.experts, shared, shared_gate]), **self.layer_fields(),
            ))
        return out

    def residual_norm_of(self, layer: nn.Module) -> nn.Module | None:
        """The norm whose output is the block's input (its input: the residual stream), or None."""
        return getattr(layer, self.residual_norm_name, None) if self.residual_norm_name else None

    def routed_scale(self, mlp: nn.Module) -> float:
        """A factor the block applies to the routed sum after the experts (1: none)."""
        return 1.0

    def head_scale(self) -> float:
        """The factor the causal-LM head puts on lm_head's output (Cohere's logit_scale, Granite's
        1/logits_scaling): the layer-sequential sweep's loss must use the model's own logits."""
        return 1.0

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
        self.write_expert_width(self.config, width)

    @classmethod
    def write_expert_width(cls, config, width: int) -> None:
        """What `set_expert_width` does, on any config of the family (a copy, a checkpoint's, no model needed);
        a family whose config cannot hold the width raises a one-line MumoeError."""
        setattr(config, cls.expert_width_key, width)

    @classmethod
    def keep_layers(cls, config, n: int) -> None:
        """Make `config` build only the first n decoder layers (TAER's matcher: the model up to its first router)."""
        config.num_hidden_layers = n

    def set_num_experts(self, n: int) -> list[str]:
        """Rewrite every expert-count key of the config (nested text configs included); none where experts cannot
        be removed (`expert_removal_gap`: a removal in memory, per-prompt experts' reference, keeps the modules' own
        counts)."""
        return [] if self.expert_removal_gap else set_expert_count(self.config, n)

    @classmethod
    def check_expert_removal(cls, model_type: str) -> None:
        """A one-line MumoeError where the family's experts cannot be removed or merged (before any work)."""
        if cls.expert_removal_gap:
            raise MumoeError(f"{model_type}: removing or merging experts is not supported for it "
                             f"({cls.expert_removal_gap}); atoms, weights and per-prompt masks are")


def stored_weights(model: nn.Module) -> int:
    """The model's weights as its checkpoint holds them: every parameter, less the zero gate halves mumoe gives
    experts that have no gate (`models.nemotron_h`)."""
    total = sum(p.numel() for p in model.parameters())
    return total - sum(m.gate_up_proj.numel() // 2 for m in model.modules() if getattr(m, "gated", True) is False)


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
