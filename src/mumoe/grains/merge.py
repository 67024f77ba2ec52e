"""The merge grain: groups of routed experts merged into one expert each (HC-SMoE, M-SMoE, Sub-MoE).

Per MoE layer, E experts -> M = E − round(ratio·E) merged experts (M-SMoE: one usage threshold over all layers,
M per layer differs, their mean ≤ that): the method's features are grouped by its rule (`criteria.merge`), each
group's tensors merged by the method's operator with weights f_i / Σ f (f_i: the expert's routed count on the
calibration tokens; `apply.merge`), and — router policy "centroid", the one so far — one router row (and bias)
per merged expert, the same weighted average of the members' rows: a standard compact checkpoint every engine
loads (per-layer counts that differ: mumoe's own form).

Runs on a loaded model (the in-memory driver, `mumoe compare`, any stage of a multi-stage recipe) and in the
layer-sequential sweep (statistics layer by layer, the plan at the end, a streamed export of the merge).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from ..apply.merge import GROUP_LIMITED, ROUTERS
from ..errors import MumoeError
from .base import Grain, Plan


@dataclass(frozen=True)
class MergePart:
    router: str = "centroid"  # centroid: one router row per merged expert; bound: all E rows, mapped
    rank: int | None = None  # the svd operator's rank (None: full rank, the weighted average)


@dataclass(frozen=True)
class MergePlan(Plan):
    """Per MoE layer (decoder-layer index): the merged experts in exported order, each the tuple of its member
    ids (in the numbering of the model it was chosen on) with their weights; each layer's expert count before."""

    groups: dict[int, tuple[tuple[int, ...], ...]]
    weights: dict[int, tuple[tuple[float, ...], ...]]
    num_experts: dict[int, int]
    router: str = "centroid"
    operator: str = "average"
    rank: int | None = None

    def export_form(self) -> str:
        uniform = len({len(g) for g in self.groups.values()}) <= 1
        return "hf" if uniform and self.router == "centroid" else "mumoe"

    def as_lists(self) -> tuple[dict, dict]:
        return ({j: [list(g) for g in gs] for j, gs in self.groups.items()},
                {j: [list(w) for w in ws] for j, ws in self.weights.items()})


OPERATOR_NAMES = {"average": "frequency-weighted average", "svd": "joint-SVD subspace merge"}


def make_plan(recipe, layers, scores) -> MergePlan:
    """Group each layer's experts by the method's rule on its features; weights from the routed counts."""
    from ..criteria import get_method
    from ..select.merge import merged_count

    m = get_method(recipe.method)
    groups, weights = {}, {}
    if m.merge_budget is not None:
        counts = m.merge_budget([s["freq"] for s in scores], recipe.ratio, [layer.top_k for layer in layers])
    else:
        counts = [merged_count(layer.num_experts, recipe.ratio, layer.top_k) for layer in layers]
    for layer, s, M in zip(layers, scores, counts):
        gs = m.group(s, M, recipe.calib.seed)
        freq = s["freq"].double()
        ws = []
        for g in gs:
            f = freq[list(g)]
            total = float(f.sum())
            ws.append(tuple(float(v) / total for v in f) if total > 0 else tuple(1.0 / len(g) for _ in g))
        groups[layer.index] = tuple(tuple(g) for g in gs)
        weights[layer.index] = tuple(ws)
    return MergePlan(groups, weights, {layer.index: layer.num_experts for layer in layers}, recipe.merge.router,
                     m.operator, recipe.merge.rank)


class MergeGrain(Grain):
    name: ClassVar[str] = "merge"
    part: ClassVar[type] = MergePart
    flags: ClassVar[tuple[str, ...]] = ("router", "rank")
    cli: ClassVar[dict[str, dict]] = {
        "router": {"choices": list(ROUTERS), "help": "merge methods: centroid = one router row per merged expert, "
                   "the weighted average of its members' rows (a standard compact checkpoint, default); bound = all "
                   "router rows kept, each mapped to its merged expert (the papers' setting; mumoe's own form)"},
        "rank": {"type": int, "metavar": "R", "help": "sub-moe: the rank of each merged matrix (default: full rank, "
                 "which equals the frequency-weighted average)"},
    }

    def check(self, recipe) -> MergePart:
        from ..criteria import get_method

        part = recipe.merge
        if part.router not in ROUTERS:
            raise MumoeError(f"unknown router policy {part.router!r}; available: {', '.join(ROUTERS)}")
        if part.rank is not None:
            if get_method(recipe.method).operator != "svd":
                raise MumoeError(f"--rank sets the rank of a subspace merge; {recipe.method} averages its groups")
            if isinstance(part.rank, bool) or not isinstance(part.rank, int) or part.rank < 1:
                raise MumoeError(f"--rank must be a positive integer, got {part.rank!r}")
        return part

    def leaves_hf(self, stage) -> bool:
        from ..criteria import get_method

        # a global budget (per-layer counts differ) or a bound router: mumoe's own form
        return get_method(stage.method).merge_budget is None and stage.part.router == "centroid"

    def describe(self, recipe) -> str:
        rank = f", rank {recipe.merge.rank}" if recipe.merge.rank is not None else ""
        return f"{recipe.ratio:.0%} of experts merged away (router {recipe.merge.router}{rank}) with {recipe.method}"

    def label(self, recipe) -> str:
        return recipe.method + (f" r{recipe.merge.rank}" if recipe.merge.rank is not None else "") + (
            f" ({recipe.merge.router})" if recipe.merge.router != "centroid" else "")

    def check_config(self, recipe, config) -> None:
        from ..models.base import config_experts

        E, k = config_experts(config)
        if E is None:
            return
        cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
        if (getattr(cfg, "n_group", None) or 1) > 1:  # before any weight is read (apply.merge checks it again)
            raise MumoeError(GROUP_LIMITED)
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
        merge_experts(model, *plan.as_lists(), plan.operator, plan.rank, plan.router)
        if verbose:
            for line in self.layer_lines(self.entries(plan)):
                print(line)
            print(f"  scored, grouped and merged in {time.perf_counter() - t0:.2f}s")
        return plan

    # -- a checkpoint, layer by layer -------------------------------------------------------------------------
    def check_layerwise(self, recipe, layers) -> None:
        if any(layer.n_group and layer.n_group > 1 for layer in layers):
            raise MumoeError(GROUP_LIMITED)

    def plan_layerwise(self, recipe, layers: list, res) -> MergePlan:
        return make_plan(recipe, layers, res.scores[recipe.method])

    def transform(self, plan: MergePlan, ckpt, recipe):
        from ..apply.merge import merge_transform
        from ..models.base import EXPERT_COUNT_KEYS
        from ..models.keys import routing_keys

        counts = {len(g) for g in plan.groups.values()}
        changes = dict.fromkeys(EXPERT_COUNT_KEYS, counts.pop()) if plan.export_form() == "hf" else {}
        return merge_transform(*plan.as_lists(), plan.operator, plan.rank, plan.router,
                               routers=routing_keys(ckpt.model), rename=ckpt.rename), changes

    # -- the record -----------------------------------------------------------------------------------------
    def entries(self, plan: MergePlan) -> list[dict]:
        op = OPERATOR_NAMES[plan.operator] + (f" (rank {plan.rank})" if plan.rank is not None else "")
        return [{"layer": j, "num_experts": plan.num_experts[j], "groups": [list(g) for g in plan.groups[j]],
                 "weights": [list(w) for w in plan.weights[j]], "router": plan.router, "operator": op}
                for j in plan.groups]

    def report_fields(self, recipe, plan: MergePlan) -> dict:
        from ..criteria import get_method

        budget = "global" if get_method(recipe.method).merge_budget is not None else "uniform"
        return {"budget": f"{budget}/{plan.router}", "model": {"num_experts": next(iter(plan.num_experts.values()))}}

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
