"""Dense decoders (Llama, Qwen2, OPT): no MoE blocks, only linears for weight-grain pruning."""

from .base import Adapter


class DenseAdapter(Adapter):
    model_types = ("llama", "qwen2")
    is_moe = False
    expert_count_key = None

    def moe_layers(self):
        return []


class OptAdapter(DenseAdapter):
    model_types = ("opt",)

    def decoder_layers(self):
        return self.model.model.decoder.layers

    def mlp_chains(self):
        """fc2(act(fc1 x)) in every decoder layer."""
        full = self.module_names()
        return [((full[id(layer.fc1)],), full[id(layer.fc2)]) for layer in self.decoder_layers()]
