"""DeepSeek-V3: sigmoid scores, `e_score_correction_bias` for selection only, group-limited top-k
(n_group / topk_group), weights normalized and × routed_scaling_factor; shared experts; the first
`first_k_dense_replace` layers are dense MLPs."""

from ..errors import MumoeError
from .base import Adapter


class DeepseekV3Adapter(Adapter):
    model_types = ("deepseek_v3",)
    scoring = "sigmoid"
    expert_count_key = "n_routed_experts"

    shared_names = ("shared_experts",)

    def set_expert_width(self, width: int) -> None:
        """The shared experts are sized moe_intermediate_size × n_shared_experts: keep their width."""
        cfg = self.config
        shared = cfg.moe_intermediate_size * cfg.n_shared_experts
        if shared % width:
            raise MumoeError(f"deepseek_v3: expert width {width} does not divide the shared experts' width {shared}, "
                             "so an HF config cannot hold both; use the global form (mumoe.load)")
        cfg.moe_intermediate_size, cfg.n_shared_experts = width, shared // width
