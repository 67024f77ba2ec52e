"""Qwen3-MoE: softmax router, top-k renormalized iff `norm_topk_prob`; no shared expert."""

from .base import Adapter


class Qwen3MoeAdapter(Adapter):
    model_types = ("qwen3_moe",)
