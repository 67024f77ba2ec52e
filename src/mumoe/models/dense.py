"""Dense decoders (Llama, Qwen2, OPT): no MoE blocks, only linears for weight-grain pruning."""

from .base import Adapter


class DenseAdapter(Adapter):
    model_types = ("llama", "qwen2")
    is_moe = False

    def moe_layers(self):
        return []


class OptAdapter(DenseAdapter):
    model_types = ("opt",)

    def decoder_layers(self):
        return self.model.model.decoder.layers
