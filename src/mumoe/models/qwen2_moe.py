"""Qwen2-MoE: softmax router (+ optional top-k renorm), one shared expert behind a sigmoid gate."""

from .base import Adapter


class Qwen2MoeAdapter(Adapter):
    model_types = ("qwen2_moe",)
    shared_names = ("shared_expert",)
    shared_gate_name = "shared_expert_gate"
