"""What differs between the transformers versions pyproject allows (>= 5.0, < 6), in one place.

    cache_kwarg()     the KV-cache argument of forward/generate: `cache` from 5.24 on (`past_key_values`
                      still works there but warns, and goes in 6.0), `past_key_values` before
    output_cache(o)   a forward output's KV cache under either name, without the deprecation path
    last_logits(m)    {"logits_to_keep": 1} where the model's forward takes it (every v5 causal LM), else {}: a
                      prefill that needs only the next token's logits skips lm_head on the other positions
"""

from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=None)
def cache_kwarg() -> str:
    """'cache' or 'past_key_values', for the installed transformers (decided on first use, not at import)."""
    import transformers
    from packaging.version import Version

    return "cache" if Version(transformers.__version__).release >= (5, 24) else "past_key_values"


def output_cache(out):
    """The KV cache of a model output (`out.cache` on transformers >= 5.24, `out.past_key_values` before)."""
    if cache_kwarg() == "cache":
        return out["cache"] if "cache" in out.keys() else None
    return out.past_key_values


def last_logits(model) -> dict:
    """Forward kwargs that compute the logits of the last position only, where `model`'s forward names
    `logits_to_keep` (transformers' causal LMs); {} for any other model (all positions, as before)."""
    import inspect

    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    return {"logits_to_keep": 1} if "logits_to_keep" in params else {}
