"""Mixtral: softmax over the top-k logits (= softmax over E, top-k, renormalized); no shared expert."""

from .base import Adapter


class MixtralAdapter(Adapter):
    model_types = ("mixtral",)
    expert_count_key = "num_local_experts"
    expert_width_key = "intermediate_size"  # experts are sized by intermediate_size (no dense MLP layers)
    # hub checkpoints (transformers 4.x) store the block as block_sparse_moe, experts as w1 (gate), w3 (up), w2 (down)
    checkpoint_block_names = ("block_sparse_moe",)
    checkpoint_expert_kinds = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
