"""Adapters: one normalized MoE view over HF transformers v5 architectures (+ dense linears)."""

from .base import Adapter, DenseLinear, MoELayer, stored_weights
from .registry import ADAPTERS, DENSE_TYPES, MOE_TYPES, adapter_for, in_mumoe_layout, moe_adapter_for

__all__ = ["Adapter", "DenseLinear", "MoELayer", "ADAPTERS", "DENSE_TYPES", "MOE_TYPES", "adapter_for",
           "in_mumoe_layout", "moe_adapter_for", "stored_weights"]
