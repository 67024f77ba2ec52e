"""Apply keep sets to a model (structural slicing) and export the result."""

from .experts import remove_experts, slice_layer
from .export import PruneReport, save_pruned

__all__ = ["remove_experts", "slice_layer", "PruneReport", "save_pruned"]
