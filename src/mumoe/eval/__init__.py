"""Evaluation: paper-exact perplexity (lm-eval adapter and reports arrive with later issues)."""

from .perplexity import perplexity, perplexity_of_windows, window_nll

__all__ = ["perplexity", "perplexity_of_windows", "window_nll"]
