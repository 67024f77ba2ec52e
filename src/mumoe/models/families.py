"""The MoE families that follow transformers v5's shared layout — an `XxxExperts` module with fused
`gate_up_proj [E, 2I, H]` / `down_proj [E, H, I]` (gate rows first, SiLU-gated, no biases) behind
`@use_experts_implementation`, and a router module returning (logits, combine weights, indices) — each as a few
lines of quirks over the generic `Adapter`: where the block, router, shared experts and the block's input norm
sit; which config key holds the expert count and width; a scale the block puts on the routed sum.

The routing itself is always the model's own (the observer reads the router's output), and every per-expert
routing tensor (router rows, biases, correction biases wherever the family keeps them) is found by shape
(`Adapter.router_tensors`), so removing or merging experts needs no family code.

Families whose experts differ have an adapter module of their own (GPT-OSS: `models.gpt_oss`; Llama 4:
`models.llama4`; Nemotron-H: `models.nemotron_h`; LongCat-Flash's identity experts: `models.longcat_flash`; JetMoE:
`models.jetmoe`; DeepSeek-V4: `models.deepseek_v4`) or are refused for now (DBRX: other expert modules; `NOT_YET`):
`adapter_for` refuses them in one line naming the nearest supported family.
"""

from __future__ import annotations

from torch import nn

from ..errors import MumoeError
from .base import Adapter


class SharedWidthAdapter(Adapter):
    """Families whose shared experts are sized `moe_intermediate_size × <count key>` (DeepSeek, GLM-4 MoE,
    ERNIE ...): a uniform atom prune rewrites the width and the count so the shared experts keep theirs."""

    shared_count_key: str = "n_shared_experts"

    @classmethod
    def write_expert_width(cls, cfg, width: int) -> None:
        n = getattr(cfg, cls.shared_count_key, None) or 0
        shared = cfg.moe_intermediate_size * n
        if shared % width:
            raise MumoeError(f"{cfg.model_type}: expert width {width} does not divide the shared experts' width "
                             f"{shared}, so an HF config cannot hold both; use the global form (mumoe.load)")
        cfg.moe_intermediate_size = width
        if n:
            setattr(cfg, cls.shared_count_key, shared // width)


class NoWidthKeyAdapter(Adapter):
    """Families whose config sizes the routed experts with the same key as other MLPs (Jamba's dense layers,
    Hunyuan's shared MLP): an HF config cannot hold a narrower expert width."""

    @classmethod
    def write_expert_width(cls, cfg, width: int) -> None:
        raise MumoeError(f"{cfg.model_type}: the config's {cls.expert_width_key} also sizes the dense "
                         "MLPs, so an HF config cannot hold a narrower expert width; use the global form "
                         "(mumoe.load)")



def family(name: str, model_types: tuple[str, ...], base: type[Adapter] = Adapter, **quirks) -> type[Adapter]:
    """An adapter class for one family: `base` with the quirks as class attributes."""
    return type(name, (base,), {"model_types": model_types, "__module__": __name__, **quirks})


class _BlockScaled(Adapter):
    """The block multiplies the routed sum by its `routed_scaling_factor` after the experts (Laguna)."""

    def routed_scale(self, mlp: nn.Module) -> float:
        return float(mlp.routed_scaling_factor)

    def layer_fields(self) -> dict:
        return {**super().layer_fields(), "routed_scaling_factor": 1.0}  # the router itself does not scale


class _LogitScaled(Adapter):
    """Cohere: logits = lm_head(h) · logit_scale."""

    def head_scale(self) -> float:
        return float(self.config.logit_scale)


class _LogitsScaling(Adapter):
    """Granite: logits = lm_head(h) / logits_scaling."""

    def head_scale(self) -> float:
        return 1.0 / float(self.config.logits_scaling)


# model_type -> adapter: softmax routers ---------------------------------------------------------------------
Cohere2Moe = family("Cohere2MoeAdapter", ("cohere2_moe",), _LogitScaled, expert_width_key="intermediate_size",
                    shared_names=("shared_experts",))
DeepseekV2 = family("DeepseekV2Adapter", ("deepseek_v2",), SharedWidthAdapter, expert_count_key="n_routed_experts",
                    shared_names=("shared_experts",))
Ernie45Moe = family("Ernie45MoeAdapter", ("ernie4_5_moe",), SharedWidthAdapter, expert_count_key="moe_num_experts",
                    shared_names=("shared_experts",), shared_count_key="moe_num_shared_experts")
FlexOlmo = family("FlexOlmoAdapter", ("flex_olmo",), expert_width_key="intermediate_size",
                  residual_norm_name=None)  # OLMo-2 post-norms: the block reads the residual stream itself
GraniteMoe = family("GraniteMoeAdapter", ("granitemoe", "granitemoeshared"), _LogitsScaling,
                    expert_width_key="intermediate_size", expert_count_key="num_local_experts")
GraniteMoeSWA = family("GraniteMoeSWAAdapter", ("granitemoe_swa",), GraniteMoe)  # per-theta rotary embeddings
# Granite 4.0-H: Mamba-2 or attention mixers, then the sparse block plus a dense `shared_mlp` on the decoder layer
# (outside the block: a dense MLP here, never a routed expert)
GraniteMoeHybrid = family("GraniteMoeHybridAdapter", ("granitemoehybrid",), GraniteMoe)
HunyuanV1Moe = family("HunyuanV1MoeAdapter", ("hunyuan_v1_moe",), NoWidthKeyAdapter,
                      expert_width_key="intermediate_size", shared_names=("shared_mlp",))
Jamba = family("JambaAdapter", ("jamba",), NoWidthKeyAdapter, expert_width_key="intermediate_size",
               residual_norm_name="pre_ff_layernorm", checkpoint_block_names=("feed_forward",))
LaraMini = family("LaraMiniAdapter", ("lara_mini",), shared_names=("shared_expert",))
Mellum = family("MellumAdapter", ("mellum",), expert_count_key="num_local_experts")
MiniMax = family("MiniMaxAdapter", ("minimax",), expert_width_key="intermediate_size",
                 expert_count_key="num_local_experts")
Phimoe = family("PhimoeAdapter", ("phimoe",), scoring="sparsemixer", expert_width_key="intermediate_size",
                expert_count_key="num_local_experts")
Qwen3Next = family("Qwen3NextAdapter", ("qwen3_next", "qwen3_5_moe_text"),
                   shared_names=("shared_expert",), shared_gate_name="shared_expert_gate")
# the multimodal Qwen3.5-MoE checkpoint: AutoModelForCausalLM builds its text model (qwen3_5_moe_text), whose
# renames map `model.language_model.` onto it; the vision tower's tensors are left as they are (an export keeps them)
Qwen35MoeVL = family("Qwen35MoeVLAdapter", ("qwen3_5_moe",), Qwen3Next)

# sigmoid routers (+ a selection-only correction bias; DeepSeek-V3-style group-limited top-k where n_group > 1) --
_SIGMOID = dict(scoring="sigmoid", shared_names=("shared_experts",))
Afmoe = family("AfmoeAdapter", ("afmoe",), SharedWidthAdapter, shared_count_key="num_shared_experts",
               residual_norm_name="pre_mlp_layernorm", **_SIGMOID)
DeepseekV32 = family("DeepseekV32Adapter", ("deepseek_v32",), SharedWidthAdapter, expert_count_key="n_routed_experts",
                     **_SIGMOID)
Dots1 = family("Dots1Adapter", ("dots1",), SharedWidthAdapter, expert_count_key="n_routed_experts", **_SIGMOID)
ExaoneMoe = family("ExaoneMoeAdapter", ("exaone_moe",), SharedWidthAdapter, shared_count_key="num_shared_experts",
                   **_SIGMOID)
Glm4Moe = family("Glm4MoeAdapter", ("glm4_moe", "glm4_moe_lite"), SharedWidthAdapter,
                 expert_count_key="n_routed_experts", **_SIGMOID)
GlmMoeDsa = family("GlmMoeDsaAdapter", ("glm_moe_dsa",), Glm4Moe, layer_carry="prev_topk_indices")
Lfm2Moe = family("Lfm2MoeAdapter", ("lfm2_moe",), scoring="sigmoid", residual_norm_name="ffn_norm")  # (+ expert_bias)
Kolibri1 = family("Kolibri1Adapter", ("kolibri1",), expert_count_key="num_local_experts", **_SIGMOID)
HYV3 = family("HYV3Adapter", ("hy_v3",), SharedWidthAdapter, shared_count_key="num_shared_experts", **_SIGMOID)
KimiLinear = family("KimiLinearAdapter", ("kimi_linear",), SharedWidthAdapter, shared_count_key="num_shared_experts",
                    **_SIGMOID)
Laguna = family("LagunaAdapter", ("laguna",), _BlockScaled, scoring="sigmoid", shared_names=("shared_experts",))
MimoV2Flash = family("MimoV2FlashAdapter", ("mimo_v2_flash",), expert_count_key="n_routed_experts",
                     scoring="sigmoid")
MiniCPM5Moe = family("MiniCPM5MoeAdapter", ("minicpm5_moe",), SharedWidthAdapter, expert_count_key="n_routed_experts",
                     **_SIGMOID)
MiniMaxM2 = family("MiniMaxM2Adapter", ("minimax_m2",), scoring="sigmoid", expert_width_key="intermediate_size",
                   expert_count_key="num_local_experts")
SolarOpen = family("SolarOpenAdapter", ("solar_open",), SharedWidthAdapter, expert_count_key="n_routed_experts",
                   **_SIGMOID)
Flint = family("FlintAdapter", ("flint",), scoring="sigmoid",
               shared_names=("shared_expert",))  # the shared expert added in full (no gate of its own)
Beam = family("BeamAdapter", ("beam",), _BlockScaled, scoring="sigmoid",
              residual_norm_name="pre_feedforward_layernorm")  # Gemma-style norms around the block
BailingHybrid = family("BailingHybridAdapter", ("bailing_hybrid",), SharedWidthAdapter,
                       shared_count_key="num_shared_experts", **_SIGMOID)  # a clamped SwiGLU (`base.family_gate`)
Kolibri1_1 = family("Kolibri1_1Adapter", ("kolibri1_1",), **_SIGMOID,
                    layerwise_gap="its layers read other layers' keys and values (KV sharing) within one forward")
AXK2 = family("AXK2Adapter", ("axk2",), SharedWidthAdapter, expert_count_key="n_routed_experts", **_SIGMOID)
# HY-V4: hyper-connection streams around every block (collapsed by `hc_head` before the final norm), the indexer's
# top-k carried from layer to layer, a clamped SwiGLU (its experts' `_apply_gate`)
HYV4 = family("HYV4Adapter", ("hy_v4",), SharedWidthAdapter, expert_count_key="n_routed_experts",
              layer_carry="prev_topk_indices", head_pre_norm=("hc_head",), **_SIGMOID)

FAMILY_ADAPTERS: tuple[type[Adapter], ...] = (
    Cohere2Moe, DeepseekV2, Ernie45Moe, FlexOlmo, GraniteMoe, GraniteMoeSWA, GraniteMoeHybrid, HunyuanV1Moe, Jamba,
    LaraMini, Mellum, MiniMax, Phimoe, Qwen3Next, Qwen35MoeVL, Afmoe, DeepseekV32, Dots1, ExaoneMoe, Glm4Moe,
    GlmMoeDsa, HYV3, KimiLinear, Kolibri1, Laguna, Lfm2Moe, MimoV2Flash, MiniCPM5Moe, MiniMaxM2, SolarOpen,
    AXK2, BailingHybrid, Beam, Flint, Kolibri1_1, HYV4,
)

# families transformers ships that mumoe does not support yet: why, and the nearest supported one
NOT_YET: dict[str, tuple[str, str]] = {
    "dbrx": ("experts outside the fused v5 layout", "mixtral"),
    "qwen4_exp": ("hyper-connections around the blocks and n-gram embeddings", "qwen3_next"),
    "gemma4": ("the router and the experts read different inputs, and the experts' sum is normalized before it "
               "joins the dense MLP's", "qwen3_moe"),
    "axk1": ("a norm after the routed and shared experts' sum, inside the block", "axk2"),
    "ergo": ("each expert's output normalized by its own norm before the weighted sum", "nemotron_h"),
    "zaya": ("a zero-computation skip expert and router states carried from layer to layer", "qwen3_moe"),
    "dots3_note": ("not tried yet: a text model inside a vision and audio model", "dots1"),
}
