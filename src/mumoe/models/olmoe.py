"""OLMoE: softmax router, top-k renormalized iff `norm_topk_prob` (False in OLMoE-1B-7B)."""

from .base import Adapter


class OlmoeAdapter(Adapter):
    model_types = ("olmoe",)
    expert_width_key = "intermediate_size"  # experts are sized by intermediate_size (no dense MLP layers)
