"""DeepSeek-V3: sigmoid scores, `e_score_correction_bias` for selection only, group-limited top-k
(n_group / topk_group), weights normalized and × routed_scaling_factor; shared experts; the first
`first_k_dense_replace` layers are dense MLPs."""

from .families import SharedWidthAdapter


class DeepseekV3Adapter(SharedWidthAdapter):
    """A uniform atom prune keeps the shared experts' width (moe_intermediate_size × n_shared_experts)."""

    model_types = ("deepseek_v3",)
    scoring = "sigmoid"
    expert_count_key = "n_routed_experts"
    shared_names = ("shared_experts",)
