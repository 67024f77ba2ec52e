"""Apply keep sets to a model (structural slicing) and export the result (in memory or streamed)."""

from .experts import remove_experts, slice_layer
from .export import PruneReport, atomic_output, save_pruned
from .stream import prune_checkpoint, stream_aimer

__all__ = ["remove_experts", "slice_layer", "PruneReport", "atomic_output", "save_pruned", "prune_checkpoint",
           "stream_aimer"]
