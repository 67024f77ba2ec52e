"""Qwen2-MoE: softmax router (+ optional top-k renorm), one shared expert behind a sigmoid gate."""

from .base import Adapter


class Qwen2MoeAdapter(Adapter):
    model_types = ("qwen2_moe",)

    def shared_modules(self, mlp):
        return getattr(mlp, "shared_expert", None), getattr(mlp, "shared_expert_gate", None)
