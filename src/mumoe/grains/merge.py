"""The merge grain: groups of routed experts merged into one expert each (HC-SMoE, M-SMoE, Sub-MoE, REAM).

Per MoE layer, E experts -> M = E − round(ratio·E) merged experts (M-SMoE: one usage threshold over all layers,
M per layer differs, their mean ≤ that): the method's features are grouped by its rule (`criteria.merge`), each
group's tensors merged by the method's operator with weights f_i / Σ f (f_i: the expert's routed count on the
calibration tokens; REAM: its saliency; `apply.merge`), and — router policy "centroid" — one router row (and
bias) per merged expert, the same weighted average of the members' rows (REAM: its centroid's row): a standard
compact checkpoint every engine loads (per-layer counts that differ, or router "bound": mumoe's own form).

Scoring orders: one-shot (every layer's statistics from the unmerged model; the default but for REAM) or
progressive (layer ℓ calibrated on the merged layers < ℓ: REAM's own order). A method whose plan needs the
layer's weights (REAM's neuron alignment) makes each layer's plan while the layer is resident.

Runs on a loaded model (the in-memory driver, `mumoe compare`, any stage of a multi-stage recipe) and in the
layer-sequential sweep (statistics layer by layer, the plan per layer or at the end, a streamed export).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import ClassVar

import torch
from torch import nn

from ..apply.merge import GROUP_LIMITED, ROUTERS
from ..errors import MumoeError
from .base import Grain, LayerwiseHooks, Plan


@dataclass(frozen=True)
class MergePart:
    router: str = "centroid"  # centroid: one router row per merged expert; bound: all E rows, mapped
    rank: int | None = None  # the svd operator's rank (None: full rank, the weighted average)
    order: str | None = None  # one-shot | progressive (None: the method's own; `MergeGrain.check` fills it in)
    alpha: float | None = None  # DERN: the similarity a dropped neuron needs to its best kept match (None: 0.4)


@dataclass(frozen=True)
class MergePlan(Plan):
    """Per MoE layer (decoder-layer index): the merged experts in exported order, each the tuple of its member
    ids (in the numbering of the model it was chosen on) with their weights; each layer's expert count before;
    the aligned operator's neuron order of every source expert (perms: [E, I] per layer)."""

    groups: dict[int, tuple[tuple[int, ...], ...]]
    weights: dict[int, tuple[tuple[float, ...], ...]]
    num_experts: dict[int, int]
    router: str = "centroid"
    operator: str = "average"
    rank: int | None = None
    perms: dict[int, torch.Tensor] | None = None  # aligned: neuron orders; recombine: neuron targets [E, I]
    coefs: dict[int, torch.Tensor] | None = None  # recombine: each source expert's weight [E] (its routed count)

    def export_form(self) -> str:
        uniform = len({len(g) for g in self.groups.values()}) <= 1
        return "hf" if uniform and self.router == "centroid" else "mumoe"

    def as_lists(self) -> tuple[dict, dict]:
        return ({j: [list(g) for g in gs] for j, gs in self.groups.items()},
                {j: [list(w) for w in ws] for j, ws in self.weights.items()})


OPERATOR_NAMES = {"average": "frequency-weighted average", "svd": "joint-SVD subspace merge",
                  "aligned": "neuron-aligned saliency-weighted average (router row: the centroid's)",
                  "recombine": "DERN segment recombination, usage-weighted (router rows: the kept experts')"}
ORDERS = ("one-shot", "progressive")


def target(layer, E: int, ratio: float) -> int:
    """The merged expert count of one layer: E for a layer that picks experts from a fixed token table (kept
    whole: `MoELayer.fixed_routing`)."""
    from ..select.merge import merged_count

    return E if layer.fixed_routing else merged_count(E, ratio, layer.top_k)


def layer_plan(m, recipe, layer, s: dict, M: int) -> dict:
    """One layer's share of a plan: its groups (the method's rule on its features), each group's weights
    (f_i / Σ f over the group, or the method's own `merge_weights`) and, for the aligned operator, every expert's
    neuron order (`Method.align`, reading the layer's weights); a method with its own `plan_layer` makes all of it."""
    if m.plan_layer is not None:
        return m.plan_layer(layer, s, M, recipe.merge)
    gs = m.group(s, M, recipe.calib.seed)
    by = s.get("merge_weights", s["freq"]).double()
    ws = []
    for g in gs:
        f = by[list(g)]
        total = float(f.sum())
        ws.append(tuple(float(v) / total for v in f) if total > 0 else tuple(1.0 / len(g) for _ in g))
    perm = m.align(layer, s, gs) if m.align is not None else None
    return {"groups": tuple(tuple(g) for g in gs), "weights": tuple(ws), "perm": perm}


def make_plan(recipe, layers, scores, chosen: dict[int, dict] | None = None) -> MergePlan:
    """Each layer's plan (`layer_plan`), or the one `chosen` for it already (in a sweep, while it was resident)."""
    from ..criteria import get_method
    from ..select.merge import merged_count

    m = get_method(recipe.method)
    chosen = dict(chosen or {})
    source = {layer.index: int(s["freq"].shape[0]) for layer, s in zip(layers, scores)}  # E before (layers may
    if len(chosen) < len(layers):  # have been merged already in a progressive run: their plans are chosen)
        if m.merge_budget is not None:
            counts = m.merge_budget([s["freq"] for s in scores], recipe.ratio, [layer.top_k for layer in layers])
        else:
            counts = [merged_count(source[layer.index], recipe.ratio, layer.top_k) for layer in layers]
        counts = [source[layer.index] if layer.fixed_routing else M for layer, M in zip(layers, counts)]  # (whole)
        for layer, s, M in zip(layers, scores, counts):
            if layer.index not in chosen:
                chosen[layer.index] = layer_plan(m, recipe, layer, s, M)
    perms = {j: c["perm"] for j, c in chosen.items() if c.get("perm") is not None}
    coefs = {j: c["coef"] for j, c in chosen.items() if c.get("coef") is not None}
    return MergePlan({j: chosen[j]["groups"] for j in chosen}, {j: chosen[j]["weights"] for j in chosen}, source,
                     recipe.merge.router, m.operator, recipe.merge.rank, perms or None, coefs or None)


class MergeGrain(Grain):
    name: ClassVar[str] = "merge"
    part: ClassVar[type] = MergePart
    flags: ClassVar[tuple[str, ...]] = ("router", "rank", "order", "alpha")
    cli: ClassVar[dict[str, dict]] = {
        "router": {"choices": list(ROUTERS), "help": "merge methods: centroid = one router row per merged expert, "
                   "the weighted average of its members' rows (a standard compact checkpoint, default); bound = all "
                   "router rows kept, each mapped to its merged expert (the papers' setting; mumoe's own form)"},
        "rank": {"type": int, "metavar": "R", "help": "sub-moe: the rank of each merged matrix (default: full rank, "
                 "which equals the frequency-weighted average)"},
        "order": {"choices": list(ORDERS), "help": "merge methods: one-shot (default) or progressive (REAM's "
                  "default: layer l calibrated on the merged layers < l)"},
        "alpha": {"type": float, "metavar": "A", "help": "dern: the cosine similarity a dropped expert's neuron needs "
                  "to its most similar kept neuron to be merged into it (default 0.4; below: discarded)"},
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
        m = get_method(recipe.method)
        if part.alpha is not None:
            if m.operator != "recombine":
                raise MumoeError(f"--alpha is DERN's similarity threshold; {recipe.method} does not take it")
            if isinstance(part.alpha, bool) or not isinstance(part.alpha, (int, float)) or not -1 <= part.alpha <= 1:
                raise MumoeError(f"--alpha is a cosine similarity in [-1, 1], got {part.alpha!r}")
        if m.operator == "recombine" and part.router != "centroid":
            raise MumoeError("dern drops experts and gives their neurons to several kept ones: no merged expert to "
                             "map a dropped router row onto; use --router centroid (the kept experts' own rows)")
        order = part.order or m.default_order
        if order not in ORDERS:
            raise MumoeError(f"unknown scoring order {order!r}; available: {', '.join(ORDERS)}")
        if order == "progressive" and m.merge_budget is not None:
            raise MumoeError(f"{m.name} sets every layer's merged count from all layers' statistics (one global "
                             "threshold): it scores one-shot; drop --order progressive")
        if m.operator == "aligned":
            from ..criteria.ream import check_available

            check_available()
        return replace(part, order=order)

    def order(self, part) -> str:
        return part.order or "one-shot"

    def leaves_hf(self, stage) -> bool:
        from ..criteria import get_method

        # a global budget (per-layer counts differ) or a bound router: mumoe's own form
        return get_method(stage.method).merge_budget is None and stage.part.router == "centroid"

    def describe(self, recipe) -> str:
        rank = f", rank {recipe.merge.rank}" if recipe.merge.rank is not None else ""
        rank += f", alpha {recipe.merge.alpha:g}" if recipe.merge.alpha is not None else ""
        order = ", progressive" if recipe.merge.order == "progressive" else ""
        return (f"{recipe.ratio:.0%} of experts merged away (router {recipe.merge.router}{rank}{order}) with "
                f"{recipe.method}")

    def label(self, recipe) -> str:
        from ..criteria import get_method

        order = recipe.merge.order
        return recipe.method + (f" r{recipe.merge.rank}" if recipe.merge.rank is not None else "") + (
            f" α{recipe.merge.alpha:g}" if recipe.merge.alpha is not None else "") + (
            f" ({recipe.merge.router})" if recipe.merge.router != "centroid" else "") + (
            f" [{order}]" if order and order != get_method(recipe.method).default_order else "")

    def check_model(self, recipe, config) -> None:
        if recipe.ratio > 0:
            from .expert import check_expert_removal

            check_expert_removal(config)

    def check_config(self, recipe, config) -> None:
        from ..models.base import config_experts

        E, k = config_experts(config)
        if E is None:
            return
        self.check_model(recipe, config)
        cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
        if (getattr(cfg, "n_group", None) or 1) > 1:  # before any weight is read (apply.merge checks it again)
            raise MumoeError(GROUP_LIMITED)
        if round(recipe.ratio * E) == 0 and recipe.ratio > 0:
            raise MumoeError(f"--ratio {recipe.ratio:g} merges nothing: round({recipe.ratio:g} x {E} experts) = 0; "
                             f"the smallest ratio that merges two is {1 / E:.3g}")
        from ..criteria import get_method
        from ..criteria.ream import GROUP_SIZE

        if get_method(recipe.method).operator == "aligned" and (E - round(recipe.ratio * E)) * GROUP_SIZE < E:
            raise MumoeError(f"REAM groups at most {GROUP_SIZE} experts into one: {E} experts need at least "
                             f"{-(-E // GROUP_SIZE)} merged experts per layer, ratio {recipe.ratio} leaves "
                             f"{E - round(recipe.ratio * E)}")
        if k is not None and E - round(recipe.ratio * E) < k:
            raise MumoeError(f"ratio {recipe.ratio} merges {E} experts into {E - round(recipe.ratio * E)}, fewer "
                             f"than top_k={k}")

    def prune(self, model: nn.Module, recipe, wins, groups, verbose: bool, scores=None) -> MergePlan:
        from ..apply.merge import merge_experts, merge_layer
        from ..criteria import get_method, score_methods
        from ..models import moe_adapter_for

        m = get_method(recipe.method)
        layers = moe_adapter_for(model).moe_layers()
        seed, bs, part = recipe.calib.seed, recipe.calib.batch_size, recipe.merge
        t0 = time.perf_counter()
        if self.order(part) == "progressive":
            if scores is not None:
                raise MumoeError("precomputed scores are one-shot; progressive scoring needs its own passes")
            chosen, scores = {}, []
            for layer in layers:  # calibrated on the model whose earlier layers are merged already
                E = layer.num_experts
                s = score_methods(model, [m.name], wins, groups, seed, bs, verbose, layers=[layer])[m.name][0]
                c = chosen[layer.index] = layer_plan(m, recipe, layer, s, target(layer, E, recipe.ratio))
                s.pop("acts", None)
                scores.append(s)
                merge_layer(layer, [list(g) for g in c["groups"]], [list(w) for w in c["weights"]], m.operator,
                            part.rank, part.router, c["perm"], c.get("coef"))
            plan = make_plan(recipe, layers, scores, chosen)
            counts = {len(g) for g in plan.groups.values()}
            if len(counts) == 1 and part.router == "centroid":
                moe_adapter_for(model).set_num_experts(counts.pop())
        else:
            if scores is None:
                scores = score_methods(model, [m.name], wins, groups, seed, bs, verbose, layers=layers)[m.name]
            plan = make_plan(recipe, layers, scores)
            merge_experts(model, *plan.as_lists(), plan.operator, plan.rank, plan.router, plan.perms, plan.coefs)
        if verbose:
            for line in self.layer_lines(self.entries(plan)):
                print(line)
            print(f"  scored, grouped and merged in {time.perf_counter() - t0:.2f}s")
        return plan

    # -- a checkpoint, layer by layer -------------------------------------------------------------------------
    def check_layerwise(self, recipe, layers) -> None:
        if any(layer.n_group and layer.n_group > 1 for layer in layers):
            raise MumoeError(GROUP_LIMITED)

    def hooks(self, recipe, ckpt, layers: dict) -> LayerwiseHooks:
        from ..apply.merge import merge_layer
        from ..criteria import get_method

        m = get_method(recipe.method)
        part = recipe.merge
        progressive = self.order(part) == "progressive"
        if not progressive and m.align is None and m.plan_layer is None:
            return LayerwiseHooks()  # the plan after the sweep, from every layer's features

        def select(layer, s: dict) -> dict:
            return layer_plan(m, recipe, layer, s, target(layer, layer.num_experts, recipe.ratio))

        def prune_layer(j: int, module, res: dict) -> bool:
            if j not in layers:
                return False
            c = res["keep"]
            merge_layer(layers[j], [list(g) for g in c["groups"]], [list(w) for w in c["weights"]], m.operator,
                        part.rank, part.router, c["perm"], c.get("coef"), inplace=True)
            return True

        return LayerwiseHooks(select, prune_layer if progressive else None)

    def plan_layerwise(self, recipe, layers: list, res) -> MergePlan:
        return make_plan(recipe, layers, res.scores[recipe.method], res.keep)

    def transform(self, plan: MergePlan, ckpt, recipe):
        from ..apply.merge import merge_transform
        from ..models.base import EXPERT_COUNT_KEYS
        from ..models.keys import routing_keys

        counts = {len(g) for g in plan.groups.values()}
        changes = dict.fromkeys(EXPERT_COUNT_KEYS, counts.pop()) if plan.export_form() == "hf" else {}
        return merge_transform(*plan.as_lists(), plan.operator, plan.rank, plan.router,
                               routers=routing_keys(ckpt.model), rename=ckpt.rename, perms=plan.perms,
                               coefs=plan.coefs), changes

    # -- the record -----------------------------------------------------------------------------------------
    def entries(self, plan: MergePlan) -> list[dict]:
        op = OPERATOR_NAMES[plan.operator] + (f" (rank {plan.rank})" if plan.rank is not None else "")
        out = [{"layer": j, "num_experts": plan.num_experts[j], "groups": [list(g) for g in plan.groups[j]],
                "weights": [list(w) for w in plan.weights[j]], "router": plan.router, "operator": op}
               for j in plan.groups]
        if plan.operator == "recombine":  # how many of the dropped experts' neurons were merged, how many discarded
            for e in out:
                t = plan.perms[e["layer"]]
                dropped = [i for i in range(t.shape[0]) if i not in {g[0] for g in e["groups"]}]
                e["neurons"] = {"merged": int((t[dropped] >= 0).sum()), "discarded": int((t[dropped] < 0).sum())}
        return out

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
