"""A KV cache that grows in place, for decoding after a long prompt.

HF's `DynamicLayer.update` appends with `torch.cat`, which copies the whole cache at every decoded token:
with a 512-token prompt that is ~8 MB per layer per token on a 2048-wide model — a fixed per-token cost
that pruning cannot shrink, so it caps the decode speedup of a pruned model. `GrowingLayer` keeps the keys
and values in a buffer with spare capacity (doubling when full) and hands attention views of its filled
part; values and semantics are unchanged (`crop`, `reset`, batch reordering keep working: any operation
that replaces the views makes the next update start a fresh buffer from them).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer


class GrowingLayer(DynamicLayer):
    """DynamicLayer whose keys / values [B, heads, n, d] are views of buffers [B, heads, capacity, d]."""

    MIN_CAPACITY = 256

    def _owns_views(self) -> bool:
        buf = getattr(self, "_key_buf", None)
        return buf is not None and self.keys.numel() > 0 and self.keys.data_ptr() == buf.data_ptr()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n, m = self.get_seq_length(), key_states.shape[-2]
        if not self._owns_views() or n + m > self._key_buf.shape[-2] or \
                self._key_buf.shape[:2] != key_states.shape[:2]:
            capacity = max(2 * (n + m), self.MIN_CAPACITY)
            key_buf = key_states.new_empty(*key_states.shape[:2], capacity, key_states.shape[-1])
            value_buf = value_states.new_empty(*value_states.shape[:2], capacity, value_states.shape[-1])
            if n:
                key_buf[..., :n, :].copy_(self.keys)
                value_buf[..., :n, :].copy_(self.values)
            self._key_buf, self._value_buf = key_buf, value_buf
        self._key_buf[..., n : n + m, :].copy_(key_states)
        self._value_buf[..., n : n + m, :].copy_(value_states)
        self.keys = self._key_buf[..., : n + m, :]
        self.values = self._value_buf[..., : n + m, :]
        return self.keys, self.values

    def reset(self) -> None:
        self._key_buf = self._value_buf = None
        super().reset()


def grow_in_place(cache) -> int:
    """Switch every plain `DynamicLayer` of an HF cache to `GrowingLayer` (same data); -> layers switched.
    Sliding-window, static and quantized layers are left as they are."""
    n = 0
    for layer in getattr(cache, "layers", []):
        if type(layer) is DynamicLayer:
            layer.__class__ = GrowingLayer
            n += 1
    return n


def refeed_cache(model):
    """The KV cache for a prefill whose last position the pruned model computes again: transformers' own cache for
    `model` with its sliding-window layers recording their past (a sliding layer past its window keeps only the last
    window − 1 positions and refuses `crop`; the refeed needs the one before them). None where no layer slides (the
    model builds its own). `ready_to_decode` crops it and switches the recording off."""
    from transformers import DynamicCache

    try:
        cache = DynamicCache(config=model.config)
    except Exception:  # noqa: BLE001 - a config the cache cannot read: the model builds its own
        return None
    sliding = [layer for layer in getattr(cache, "layers", []) if getattr(layer, "is_sliding", False)
               and hasattr(layer, "activate_past_recording")]
    for layer in sliding:
        layer.activate_past_recording()
    return cache if sliding else None


def stop_recording(cache) -> None:
    """After the refeed's crop: sliding layers keep only their window again from the next update on."""
    for layer in getattr(cache, "layers", []):
        if getattr(layer, "is_sliding", False) and getattr(layer, "record_past", False):
            layer.record_past = False


def refeed_possible(config) -> bool:
    """Whether a prompt's cache can drop its last position (`DynamicCache.crop(-1)`), as the per-prompt protocols
    that prune the decode need (the pruned model computes the last prompt token again). Not where a layer keeps a
    recurrent state (Mamba, linear attention, short convolutions): transformers' rollback of those is not exact for
    every family here (Jamba, Granite-4.0-H, Nemotron-H: off by 1e-3..5e-2 after a crop), so mumoe does not use it.
    Sliding-window layers: transformers' own (recorded during the prefill, `refeed_cache`), not subclasses that keep
    more state than keys and values (DeepSeek-V4's compressed attention: its crop leaves the compressor behind)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicSlidingWindowLayer

    try:
        from transformers.cache_utils import LinearAttentionCacheLayerMixin
    except ImportError:  # a transformers without recurrent cache layers
        LinearAttentionCacheLayerMixin = ()
    try:
        cache = DynamicCache(config=config)
    except Exception:  # a config the cache cannot read: decide at the first crop, as before
        return True
    layers = getattr(cache, "layers", [])
    return not any(isinstance(layer, LinearAttentionCacheLayerMixin) or (
        isinstance(layer, DynamicSlidingWindowLayer) and type(layer) is not DynamicSlidingWindowLayer)
        for layer in layers)


def check_refeed(model, what: str) -> None:
    """A one-line MumoeError where `what` (a per-prompt pruning of the decode) cannot run on `model`'s cache."""
    from ..errors import MumoeError

    if not refeed_possible(model.config):
        raise MumoeError(f"{what} is not available for {model.config.model_type} yet: its recurrent layers (Mamba, "
                         "linear attention, convolutions) or compressed attention keep a state that cannot drop the "
                         "last prompt token, which the pruned model computes again; use dense decoding or task models "
                         "(TAER)")


def batchable_model(model) -> bool:
    """Whether `model`'s decode cache is plain attention in every layer (what `serve.batch.DecodeBatch` can pad and
    stack): a `DynamicCache` built from its config has only `DynamicLayer`s. Sliding windows, recurrent states
    (Mamba, linear attention, convolutions) and compressed caches: no."""
    from transformers import DynamicCache

    try:
        cache = DynamicCache(config=model.config)
    except Exception:  # noqa: BLE001 - a config the cache cannot read: batch 1, as before
        return False
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)
