"""One calibration pass -> per-layer expert statistics (fp64, batch-size independent).

Everything is read from the model's own routing via `MoEObserver`; expert outputs are computed for each
expert's routed tokens only. Padding never counts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..models import MoELayer
from ..observe.hooks import ExpertEvent, MoEObserver, RouteEvent


@dataclass
class LayerStats:
    """Sums over calibration tokens for one MoE layer (each [E], float64)."""

    layer: MoELayer
    n_tokens: int = 0
    freq: torch.Tensor = None  # Σ_t 1[i ∈ TopK(t)]
    soft: torch.Tensor = None  # Σ_t g_i(t)
    ean: torch.Tensor = None  # Σ_{t∈T_i} ‖f_i(t)‖
    reap_sum: torch.Tensor = None  # Σ_{t∈T_i} g_i(t)‖f_i(t)‖
    easy: torch.Tensor = None  # Σ_{t∈T_i} g_i(t)‖f_i(t)‖ · max(0, 1 − cos(h_t, h_t + Σ_j g_j f_j))
    tcess_sum: torch.Tensor = None  # Σ_t s_i(t) · 1[i = argmax_j s_j(t)]
    pool_logits: list[torch.Tensor] = field(default_factory=list)  # per batch [T, k] top-k raw logits
    pool_index: list[torch.Tensor] = field(default_factory=list)  # per batch [T, k] their expert ids

    def __post_init__(self) -> None:
        E = self.layer.num_experts
        for name in ("freq", "soft", "ean", "reap_sum", "easy", "tcess_sum"):
            setattr(self, name, torch.zeros(E, dtype=torch.float64))


class StatsCollector:
    """Callbacks for MoEObserver that fill one LayerStats per layer."""

    def __init__(self, layers: list[MoELayer], experts: bool = True) -> None:
        self.stats = {layer.index: LayerStats(layer) for layer in layers}
        self.experts = experts
        self._shift: tuple[RouteEvent | None, torch.Tensor | None] = (None, None)

    def on_route(self, ev: RouteEvent) -> None:
        st = self.stats[ev.layer.index]
        E = st.layer.num_experts
        logits = ev.logits.double()  # [T, E]
        st.n_tokens += logits.shape[0]
        flat = ev.indices.reshape(-1)
        st.freq += torch.bincount(flat, minlength=E).double()
        st.soft += torch.zeros(E, dtype=torch.float64).index_add_(0, flat, ev.weights.reshape(-1).double())
        top = logits.argmax(-1)  # [T]
        st.tcess_sum += torch.zeros(E, dtype=torch.float64).index_add_(0, top, logits.gather(-1, top[:, None])[:, 0])
        k = st.layer.top_k
        vals, idx = torch.topk(logits, k, dim=-1)  # the PEU pool: top-k_a raw logits, k_a = top_k
        st.pool_logits.append(vals)
        st.pool_index.append(idx)

    def on_expert(self, ev: ExpertEvent) -> None:
        st = self.stats[ev.layer.index]
        route = ev.route
        if route is not None and self._shift[0] is not route:  # once per layer and pass
            h = (route.residual if route.residual is not None else route.hidden).double()  # [T, H]
            cos = torch.nn.functional.cosine_similarity(h, h + route.routed_output.double(), dim=-1)
            self._shift = (route, torch.clamp(1 - cos, min=0))  # [T]
        norm = ev.output.double().norm(dim=-1)  # [n]
        g = ev.weight.double()
        i = ev.expert
        st.ean[i] += norm.sum()
        st.reap_sum[i] += (g * norm).sum()
        if route is not None:
            st.easy[i] += (g * norm * self._shift[1][ev.tokens]).sum()


@torch.no_grad()
def collect_stats(model: nn.Module, layers: list[MoELayer], calib: torch.Tensor, batch_size: int = 8,
                  experts: bool = True, progress: bool = True,
                  on_route: Callable[[RouteEvent], None] | None = None) -> list[LayerStats]:
    """Run the calibration windows [N, L] through the model once and return per-layer statistics.
    `on_route`: also called with every route event of that forward (for callers that need more than the stats)."""
    col = StatsCollector(layers, experts)

    def route(event: RouteEvent) -> None:
        col.on_route(event)
        if on_route is not None:
            on_route(event)

    with MoEObserver(model, on_route=route, on_expert=col.on_expert if experts else None, layers=layers):
        for i in tqdm(range(0, len(calib), batch_size), desc="calibration", disable=not progress, unit="batch"):
            model(input_ids=calib[i : i + batch_size].to(model.device))
    return [col.stats[layer.index] for layer in layers]
