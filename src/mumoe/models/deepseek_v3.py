"""DeepSeek-V3: sigmoid scores, `e_score_correction_bias` for selection only, group-limited top-k
(n_group / topk_group), weights normalized and × routed_scaling_factor; shared experts; the first
`first_k_dense_replace` layers are dense MLPs."""

from .base import Adapter


class DeepseekV3Adapter(Adapter):
    model_types = ("deepseek_v3",)
    scoring = "sigmoid"

    def shared_modules(self, mlp):
        return getattr(mlp, "shared_experts", None), None

    def layer_fields(self) -> dict:
        cfg = self.config
        return {
            "norm_topk_prob": bool(cfg.norm_topk_prob),
            "routed_scaling_factor": float(cfg.routed_scaling_factor),
            "n_group": int(cfg.n_group),
            "topk_group": int(cfg.topk_group),
        }
