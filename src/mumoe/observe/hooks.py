"""Hooks that turn a forward pass into per-layer routing events on the normalized MoE view.

The model's own router output is read (never recomputed): in transformers v5 every router module returns
(logits [T, E], combine weights [T, k], selected indices [T, k]). Per-expert outputs are not exposed by the
model, so they are recomputed from the fused weights in a hook on the experts module, for each expert's
routed tokens only. Padding tokens (attention_mask == 0) are dropped before anything is delivered.

    with MoEObserver(model, on_route=fn, on_expert=fn2) as obs:
        for batch, mask in windows:
            obs.attention_mask = mask          # [B, L] or None
            model(input_ids=batch, attention_mask=mask)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..models import MoELayer, moe_adapter_for


@dataclass
class RouteEvent:
    """One MoE layer's routing for the valid (non-padding) tokens of one forward pass."""

    layer: MoELayer
    logits: torch.Tensor  # [T, E] raw router logits
    weights: torch.Tensor  # [T, k] combine weights the model multiplies expert outputs by
    indices: torch.Tensor  # [T, k] selected experts
    hidden: torch.Tensor  # [T, H] MoE block input (after the post-attention norm)
    residual: torch.Tensor | None  # [T, H] residual stream h_t (input of the post-attention norm)
    routed_output: torch.Tensor | None = None  # [T, H] Σ_j g_j f_j over routed experts (set after the experts run)


@dataclass
class ExpertEvent:
    """Expert i's output on its routed tokens (of one forward pass, one layer)."""

    layer: MoELayer
    expert: int
    tokens: torch.Tensor  # [n] positions into the valid tokens of the RouteEvent of this pass
    slot: torch.Tensor  # [n] which of the k routing slots selected the expert
    inputs: torch.Tensor  # [n, H] MoE block input of those tokens
    output: torch.Tensor  # [n, H] f_i(x), before the combine weight
    weight: torch.Tensor  # [n] combine weight g_i(t)
    route: RouteEvent | None = None  # the layer's routing event of this pass (with routed_output)


class MoEObserver:
    """Context manager installing the routing/expert hooks on every MoE layer of `model`."""

    def __init__(
        self,
        model: nn.Module,
        on_route: Callable[[RouteEvent], None] | None = None,
        on_expert: Callable[[ExpertEvent], None] | None = None,
        layers: list[MoELayer] | None = None,
    ) -> None:
        self.model = model
        self.layers = layers if layers is not None else moe_adapter_for(model).moe_layers()
        self.on_route, self.on_expert = on_route, on_expert
        self.attention_mask: torch.Tensor | None = None
        self._handles: list = []
        self._residual: dict[int, torch.Tensor] = {}
        self._route: dict[int, tuple] = {}

    # -- helpers ------------------------------------------------------------------------------
    def _valid(self, n_tokens: int, device) -> torch.Tensor | None:
        """Flat [T] bool mask of non-padding tokens, or None when every token counts."""
        if self.attention_mask is None:
            return None
        mask = self.attention_mask.reshape(-1).to(device=device).bool()
        if mask.numel() != n_tokens:  # e.g. decoding with a cache: one new token per row
            mask = self.attention_mask[:, -(n_tokens // self.attention_mask.shape[0]):].reshape(-1).bool()
        return None if bool(mask.all()) else mask

    def _residual_hook(self, layer: MoELayer):
        def hook(module, args):
            self._residual[layer.index] = args[0].detach().reshape(-1, args[0].shape[-1])
        return hook

    def _router_hook(self, layer: MoELayer):
        def hook(module, args, output):
            logits, weights, indices = output[0], output[1], output[2]
            hidden = args[0].detach().reshape(-1, args[0].shape[-1])  # [T, H]
            valid = self._valid(hidden.shape[0], hidden.device)
            residual = self._residual.pop(layer.index, None)
            sel = (lambda t: t) if valid is None else (lambda t: t[valid])
            event = RouteEvent(
                layer=layer,
                logits=sel(logits.detach().reshape(hidden.shape[0], -1)),
                weights=sel(weights.detach().reshape(hidden.shape[0], -1)),
                indices=sel(indices.reshape(hidden.shape[0], -1)),
                hidden=sel(hidden),
                residual=None if residual is None else sel(residual),
            )
            self._route[layer.index] = event
            if self.on_route is not None:
                self.on_route(event)
        return hook

    def _experts_hook(self, layer: MoELayer):
        def hook(module, args, kwargs, output):
            event = self._route.pop(layer.index, None)
            if event is None or self.on_expert is None:
                return
            out = output.detach().reshape(-1, output.shape[-1])  # [T, H]
            valid = self._valid(out.shape[0], out.device)
            event.routed_output = out if valid is None else out[valid]
            with torch.no_grad():
                for i in torch.unique(event.indices).tolist():
                    tokens, slot = torch.where(event.indices == i)  # [n], [n]
                    x = event.hidden[tokens]
                    y = layer.expert_forward(i, x)
                    self.on_expert(ExpertEvent(layer, i, tokens, slot, x, y, event.weights[tokens, slot], event))
        return hook

    # -- context ------------------------------------------------------------------------------
    def __enter__(self) -> "MoEObserver":
        for layer in self.layers:
            if layer.residual_norm is not None:
                self._handles.append(layer.residual_norm.register_forward_pre_hook(self._residual_hook(layer)))
            self._handles.append(layer.router.register_forward_hook(self._router_hook(layer)))
            self._handles.append(layer.experts.register_forward_hook(self._experts_hook(layer), with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._residual.clear()
        self._route.clear()
