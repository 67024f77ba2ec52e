"""μ-MoE: per-prompt (test-time) activation-aware pruning — the per-prompt loop only.

Statistics come from `observe` (InputNorms), keep rules from `select.weights`, masking and compaction from
`apply`; a `PromptPruner` plans once per model and prunes each prompt for its own decode."""

from .evaluate import continuation_perplexity, offline_masks
from .generate import TestTimeResult, generate
from .prompt import PromptPruner, prompt_masks

__all__ = ["continuation_perplexity", "offline_masks", "TestTimeResult", "generate", "PromptPruner", "prompt_masks"]
