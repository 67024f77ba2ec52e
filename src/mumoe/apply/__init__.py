"""Apply keep sets to a model and export the result.

    experts   structural expert removal (router rows, bias, correction bias sliced with the experts)
    atoms     uniform-width slicing or global-form masking of expert neurons
    masking   zero masked weights in place and put them back (`masked` undoes itself)
    compact   column structure: compacted matrices and gathered inputs (μ-MoE decode)
    export    HF checkpoint + pruning.json, atomic; stream: the same, shard by shard from the source files
"""

from .experts import remove_experts, slice_layer
from .export import PruneReport, atomic_output, save_pruned
from .masking import apply_masks, masked, restore
from .stream import prune_checkpoint

__all__ = ["remove_experts", "slice_layer", "PruneReport", "atomic_output", "save_pruned", "apply_masks", "masked",
           "restore", "prune_checkpoint"]
