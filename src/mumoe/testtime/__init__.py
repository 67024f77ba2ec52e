"""μ-MoE: per-prompt (test-time) activation-aware pruning. So far: statistics, masks, apply/restore."""

from .masks import apply_masks, input_norms, masks_from_norms, prompt_masks, restore, wanda_mask

__all__ = ["apply_masks", "input_norms", "masks_from_norms", "prompt_masks", "restore", "wanda_mask"]
from .compact import compact, prepare_columns, release_buffers, uncompact

__all__ += ["compact", "prepare_columns", "release_buffers", "uncompact"]
from .generate import TestTimeResult, generate

__all__ += ["TestTimeResult", "generate"]
from .evaluate import continuation_perplexity, offline_masks

__all__ += ["continuation_perplexity", "offline_masks"]
