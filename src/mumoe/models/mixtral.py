"""Mixtral: softmax over the top-k logits (= softmax over E, top-k, renormalized); no shared expert."""

from .base import Adapter


class MixtralAdapter(Adapter):
    model_types = ("mixtral",)
    expert_count_key = "num_local_experts"
    expert_width_key = "intermediate_size"  # experts are sized by intermediate_size (no dense MLP layers)

    def layer_fields(self) -> dict:
        return {"norm_topk_prob": True}
