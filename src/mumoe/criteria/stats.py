"""Expert statistics from one calibration pass (the `ExpertStats` collector of the observation runner)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..models import MoELayer
from ..observe.collectors import ExpertStats, LayerStats, OnRoute
from ..observe.runner import RouteEvent, run

__all__ = ["LayerStats", "collect_stats"]


def collect_stats(model: nn.Module, layers: list[MoELayer], calib: torch.Tensor, batch_size: int = 8,
                  experts: bool = True, progress: bool = True,
                  on_route: Callable[[RouteEvent], None] | None = None, device=None) -> list[LayerStats]:
    """Run the calibration windows [N, L] through the model once and return per-layer statistics.
    `on_route`: also called with every route event of that forward (for callers that need more than the stats)."""
    col = ExpertStats(layers, experts)
    extra = [] if on_route is None else [OnRoute(on_route)]
    run(model, calib, [col, *extra], batch_size=batch_size, progress=progress, layers=layers, device=device)
    return col.result()
