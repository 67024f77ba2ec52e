"""Pure scoring functions: statistics + weights -> one score tensor per MoE layer.

Each method is registered with how it is read (higher = keep, or prune the highest), its grain and whether it
needs calibration data. Calibrated expert criteria share one observation pass (`stats.collect_stats`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import MumoeError
from . import expert
from .stats import LayerStats, collect_stats


@dataclass(frozen=True)
class Method:
    name: str
    grain: str  # "expert" | "atom" | "weight"
    needs_calib: bool
    prune_highest: bool
    description: str
    from_stats: Callable[[LayerStats], torch.Tensor] | None = None  # calibrated: LayerStats -> [E]
    from_weights: Callable | None = None  # calibration-free: MoELayer -> [E]
    needs_expert_outputs: bool = False


def random_scores(layers, seed: int = 0) -> list[torch.Tensor]:
    """Seeded uniform scores, one generator per call so results do not depend on global RNG state."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.rand(layer.num_experts, generator=gen, dtype=torch.float64) for layer in layers]


METHODS: dict[str, Method] = {m.name: m for m in [
    Method("random", "expert", False, False, "seeded random expert scores (baseline)"),
    Method("aimer", "expert", False, True, "AIMER: ‖w‖₁/(√N‖w‖₂) from weights alone; prunes the highest",
           from_weights=expert.aimer),
    Method("frequency", "expert", True, False, "how often the router selects the expert", expert.frequency),
    Method("gate", "expert", True, False, "gate score: summed combine weights (soft count)", expert.gate_score),
    Method("ean", "expert", True, False, "EAN: summed output norm over routed tokens", expert.ean,
           needs_expert_outputs=True),
    Method("reap", "expert", True, False, "REAP: mean g·‖f‖ over routed tokens", expert.reap,
           needs_expert_outputs=True),
    Method("easy-ep", "expert", True, False, "EASY-EP: g·‖f‖ weighted by the residual-stream change",
           expert.easy_ep, needs_expert_outputs=True),
    Method("tcess", "expert", True, False, "PreMoe TCESS (v1): mean arg-max router logit", expert.tcess),
    Method("peu", "expert", True, False, "PreMoe PEU (v3): thresholded pool scores", expert.peu),
    Method("heapr", "atom", True, False, "HEAPr: E[h²]·E[(∂L/∂h)²] per expert neuron (forward + backward)"),
    Method("heapr-token", "atom", True, False, "HEAPr per-token variant: E[h²·(∂L/∂h)²]"),
    Method("atom-act", "atom", True, False, "atom baseline: E[h²]·‖down[:, k]‖²"),
    Method("atom-magnitude", "atom", False, False, "atom baseline: weight norm of the neuron's rows/column"),
    Method("wanda", "weight", True, False, "Wanda: |W|·‖X‖ per weight (row, N:M or column structure)"),
    Method("magnitude", "weight", False, False, "magnitude: |W| with one threshold per matrix"),
]}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise MumoeError(f"unknown method {name!r}; known: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def compute_scores(method: Method, model, layers, calib: torch.Tensor | None, seed: int = 0,
                   batch_size: int = 8, progress: bool = False) -> list[torch.Tensor]:
    """Raw criterion values per layer (one-shot: every layer observed on the unpruned model)."""
    if method.name == "random":
        return random_scores(layers, seed)
    if method.from_weights is not None:
        return [method.from_weights(layer) for layer in layers]
    if calib is None:
        raise MumoeError(f"method {method.name!r} needs calibration data (--calib PATH)")
    stats = collect_stats(model, layers, calib, batch_size, experts=method.needs_expert_outputs, progress=progress)
    return [method.from_stats(st) for st in stats]
