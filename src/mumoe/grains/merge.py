"""The merge grain: groups of routed experts merged into one expert each (expert merging: HC-SMoE, ...).

Per MoE layer, E experts -> M = round((1 − ratio)·E) merged experts: the method's features are grouped by its rule
(`select.merge`), each group's tensors averaged with weights f_i / Σ f (f_i: the expert's routed count on the
calibration tokens), and — router policy "centroid", the one so far — one router row (and bias) per merged expert,
the same weighted average of the members' rows: a standard compact checkpoint every engine loads.

Runs on a loaded model (the in-memory driver, `mumoe compare`, and as any stage of a multi-stage recipe); the
layer-sequential driver and the streamed export of a merge plan are not built yet.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from ..errors import MumoeError
from .base import Grain, Plan

ROUTERS = ("centroid",)


@dataclass(frozen=True)
class MergePart:
    router: str = "centroid"  # centroid: one router row per merged expert (the weighted average of its members')


@dataclass(frozen=True)
class MergePlan(Plan):
    """Per MoE layer (decoder-layer index): the merged experts in exported order, each the tuple of its member
    ids (in the numbering of the model it was chosen on) with their weights; each layer's expert count before."""

    groups: dict[int, tuple[tuple[int, ...], ...]]
    weights: dict[int, tuple[tuple[float, ...], ...]]
    num_experts: dict[int, int]
    router: str = "centroid"


def make_plan(recipe, layers, scores) -> MergePlan:
    """Group each layer's experts by the method's rule on its features; weights from the routed counts."""
    from ..criteria import get_method
    from ..select.merge import merged_count

    m = get_method(recipe.method)
    groups, weights = {}, {}
    for layer, s in zip(layers, scores):
        M = merged_count(layer.num_experts, recipe.ratio, layer.top_k)
        gs = m.group(s["features"], M)
        freq = s["freq"].double()
        ws = []
        for g in gs:
            f = freq[list(g)]
            total = float(f.sum())
            ws.append(tuple(float(v) / total for v in f) if total > 0 else tuple(1.0 / len(g) for _ in g))
        groups[layer.index] = tuple(tuple(g) for g in gs)
        weights[layer.index] = tuple(ws)
    return MergePlan(groups, weights, {layer.index: layer.num_experts for layer in layers}, recipe.merge.router)


class MergeGrain(Grain):
    name: ClassVar[str] = "merge"
    part: ClassVar[type] = MergePart
    flags: ClassVar[tuple[str, ...]] = ("router",)
    cli: ClassVar[dict[str, dict]] = {
        "router": {"choices": list(ROUTERS), "help": "merge methods: centroid = one router row per merged expert, "
                   "the weighted average of its members' rows (a standard compact checkpoint, default)"},
    }

    def check(self, recipe) -> MergePart:
        if recipe.merge.router not in ROUTERS:
            raise MumoeError(f"unknown router policy {recipe.merge.router!r}; available: {', '.join(ROUTERS)}")
        return recipe.merge

    def describe(self, recipe) -> str:
        return f"{recipe.ratio:.0%} of experts merged away (router {recipe.merge.router}) with {recipe.method}"

    def check_config(self, recipe, config) -> None:
        from ..models.base import config_experts

        E, k = config_experts(config)
        if E is None:
            return
        cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
        if (getattr(cfg, "n_group", None) or 1) > 1:  # before any weight is read (apply.merge checks it again)
            raise MumoeError("merging is not available for group-limited routers (DeepSeek-V3 n_group) yet")
        if round(recipe.ratio * E) == 0 and recipe.ratio > 0:
            raise MumoeError(f"--ratio {recipe.ratio:g} merges nothing: round({recipe.ratio:g} x {E} experts) = 0; "
                             f"the smallest ratio that merges two is {1 / E:.3g}")
        if k is not None and E - round(recipe.ratio * E) < k:
            raise MumoeError(f"ratio {recipe.ratio} merges {E} experts into {E - round(recipe.ratio * E)}, fewer "
                             f"than top_k={k}")

    def prune(self, model: nn.Module, recipe, wins, groups, verbose: bool, scores=None) -> MergePlan:
        from ..apply.merge import merge_experts
        from ..criteria import score_methods
        from ..models import moe_adapter_for

        layers = moe_adapter_for(model).moe_layers()
        t0 = time.perf_counter()
        if scores is None:
            scores = score_methods(model, [recipe.method], wins, groups, recipe.calib.seed, recipe.calib.batch_size,
                                   verbose, layers=layers)[recipe.method]
        plan = make_plan(recipe, layers, scores)
        merge_experts(model, {j: [list(g) for g in gs] for j, gs in plan.groups.items()},
                      {j: [list(w) for w in ws] for j, ws in plan.weights.items()})
        if verbose:
            for line in self.layer_lines(self.entries(plan)):
                print(line)
            print(f"  scored, grouped and merged in {time.perf_counter() - t0:.2f}s")
        return plan

    def check_layerwise(self, recipe, layers) -> None:
        raise MumoeError(f"{recipe.method} merges experts on a loaded model only, for now: --layerwise off (the "
                         "layer-sequential merge is not built yet)")

    def entries(self, plan: MergePlan) -> list[dict]:
        return [{"layer": j, "num_experts": plan.num_experts[j], "groups": [list(g) for g in plan.groups[j]],
                 "weights": [list(w) for w in plan.weights[j]], "router": plan.router,
                 "operator": "frequency-weighted average"} for j in plan.groups]

    def report_fields(self, recipe, plan: MergePlan) -> dict:
        return {"budget": f"uniform/{plan.router}", "model": {"num_experts": next(iter(plan.num_experts.values()))}}

    def summary(self, entries: list[dict]) -> str:
        counts = sorted({len(e["groups"]) for e in entries})
        return f"{'/'.join(map(str, counts))} merged of {entries[0]['num_experts']} experts per layer"

    def layer_lines(self, entries: list[dict]) -> list[str]:
        out = []
        for e in entries:
            merged = ["+".join(map(str, g)) for g in e["groups"] if len(g) > 1]
            shown = ", ".join(merged[:8]) + (", ..." if len(merged) > 8 else "")
            out.append(f"  layer {e['layer']:3d}: {e['num_experts']} -> {len(e['groups'])} experts  merged [{shown}]")
        return out
