"""Select: scores -> keep sets. Pure functions over score tensors (no model access), one module per grain.

    experts   uniform / group-limited / global budgets -> kept expert indices per layer
    atoms     uniform width or HEAPr's global ranking -> kept neurons per expert
    weights   Wanda rows, N:M, columns (as indices), magnitude -> keep masks
"""

from .atoms import keep_global_atoms, keep_uniform_atoms, uniform_width
from .experts import check_ratio, keep_global, keep_uniform, rank
from .weights import check_active, keep_columns, magnitude_mask, masks_from_norms, wanda_mask

__all__ = ["keep_global_atoms", "keep_uniform_atoms", "uniform_width", "check_ratio", "keep_global", "keep_uniform",
           "rank", "check_active", "keep_columns", "magnitude_mask", "masks_from_norms", "wanda_mask"]
