"""Mixtral: softmax over the top-k logits (= softmax over E, top-k, renormalized); no shared expert."""

from .base import Adapter


class MixtralAdapter(Adapter):
    model_types = ("mixtral",)

    def layer_fields(self) -> dict:
        return {"norm_topk_prob": True}
