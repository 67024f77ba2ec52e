"""The expert grain: whole routed experts removed (router rows, fused expert tensors, biases sliced together).

Budgets: uniform (round(ratio·E) per layer; the form HF configs express) or global (one normalised ranking over
all layers, each layer keeping at least top_k; per-layer counts differ, mumoe's own export form). Scoring order:
one-shot (every layer scored on the unpruned model) or progressive (layer ℓ scored on the pruned layers < ℓ).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import ClassVar

from torch import nn

from ..errors import MumoeError
from .base import Grain, LayerwiseHooks, Plan

BUDGETS = ("uniform", "global")
ORDERS = ("one-shot", "progressive")


@dataclass(frozen=True)
class ExpertPart:
    budget: str = "uniform"  # uniform: round(ratio·E) per layer; global: one normalized ranking, floor top_k
    order: str = "one-shot"  # one-shot: every layer on the unpruned model; progressive: on the pruned earlier layers


@dataclass(frozen=True)
class ExpertPlan(Plan):
    """Kept experts per MoE layer (decoder-layer index -> sorted expert indices of the model it was chosen on),
    each layer's expert count before, and the scores the choice was made from."""

    keep: dict[int, tuple[int, ...]]
    num_experts: dict[int, int]
    scores: dict[int, tuple[float, ...]]
    clusters: dict[int, list[list[int]]] = field(default_factory=dict)  # a clustering rule's (STUN): per layer

    def export_form(self) -> str:
        return "hf" if len({len(k) for k in self.keep.values()}) <= 1 else "mumoe"

    def kept(self) -> dict[int, list[int]]:
        return {j: list(k) for j, k in self.keep.items()}


def select_experts(layers, scores, ratio: float, budget: str, prune_highest: bool) -> dict[int, list[int]]:
    """Keep sets per decoder-layer index under the budget. A layer that picks experts from a fixed token table
    (`MoELayer.fixed_routing`: DeepSeek-V4's hash layers) keeps every expert and is left out of the budget."""
    from ..select import keep_global, keep_uniform

    pairs = [(layer, s) for layer, s in zip(layers, scores) if not layer.fixed_routing]
    if budget == "global":
        kept = keep_global([s for _, s in pairs], ratio, [layer.top_k for layer, _ in pairs], prune_highest) \
            if pairs else []
        chosen = {layer.index: k for (layer, _), k in zip(pairs, kept)}
    else:
        chosen = {layer.index: keep_uniform(s, ratio, layer.top_k, layer.n_group, layer.topk_group, prune_highest)
                  for layer, s in pairs}
    return {layer.index: list(range(layer.num_experts)) if layer.fixed_routing else chosen[layer.index]
            for layer in layers}


def make_plan(layers, scores, keep: dict[int, list[int]], clusters: dict | None = None) -> ExpertPlan:
    """The plan of `keep`; a rule's features (a dict per layer, STUN) are recorded as 1 for a kept expert, else 0,
    with the clusters."""
    def count(s) -> int:  # the layer's expert count before (scores [E], or features with an [E, E] distance)
        return s["distance"].shape[0] if isinstance(s, dict) else len(s)

    def record(layer, s) -> tuple[float, ...]:
        if isinstance(s, dict):
            return tuple(float(e in keep[layer.index]) for e in range(count(s)))
        return tuple(float(v) for v in s)

    return ExpertPlan(keep={layer.index: tuple(keep[layer.index]) for layer in layers},
                      num_experts={layer.index: count(s) for layer, s in zip(layers, scores)},
                      scores={layer.index: record(layer, s) for layer, s in zip(layers, scores)},
                      clusters=clusters or {})


def choose(m, layers, scores, ratio: float, budget: str) -> tuple[dict[int, list[int]], dict | None]:
    """Keep sets from scores under the budget, or from a method's own rule over all layers (STUN's clusters)."""
    if m.keep_rule is not None:
        return m.keep_rule(layers, scores, ratio)
    return select_experts(layers, scores, ratio, budget, m.prune_highest), None


def check_expert_removal(config) -> None:
    """Refused in one line where the family's experts cannot be removed or merged (`Adapter.expert_removal_gap`)."""
    from ..models.registry import ADAPTERS

    model_type = getattr(config, "model_type", None)
    if (cls := ADAPTERS.get(model_type)) is not None:
        cls.check_expert_removal(model_type)


def layer_summary(entry: dict) -> str:
    """One line per layer: kept count and the dropped experts."""
    dropped = sorted(set(range(entry["num_experts"])) - set(entry["kept"]))
    shown = ", ".join(map(str, dropped[:12])) + (", ..." if len(dropped) > 12 else "")
    return f"  layer {entry['layer']:3d}: kept {len(entry['kept'])}/{entry['num_experts']}  dropped [{shown}]"


def _group_limited(layers) -> bool:
    return any(layer.n_group and layer.n_group > 1 for layer in layers)


class ExpertGrain(Grain):
    name: ClassVar[str] = "expert"
    part: ClassVar[type] = ExpertPart
    flags: ClassVar[tuple[str, ...]] = ("budget", "order")
    whole_experts: ClassVar[bool] = True
    cli: ClassVar[dict[str, dict]] = {
        "budget": {"choices": list(BUDGETS), "help": "expert methods: uniform = round(ratio*E) dropped in every layer "
                   "(a standard checkpoint every engine reads, default); global = one ranking over all layers "
                   "(scores normalized per layer, floor of top_k), exported for mumoe.load"},
        "order": {"choices": list(ORDERS), "help": "expert methods and wanda: one-shot = every layer scored on the "
                  "unpruned model (default); progressive = layer l scored after layers < l are pruned "
                  "(llm-compressor's REAP order; the Wanda authors' order, layer-sequential only)"},
    }

    def check(self, recipe) -> ExpertPart:
        from ..criteria import get_method

        part, m = recipe.expert, get_method(recipe.method)
        if part.budget not in BUDGETS:
            raise MumoeError(f"--budget {part.budget} is not an expert budget; expert methods take {', '.join(BUDGETS)}")
        if part.order not in ORDERS:
            raise MumoeError(f"unknown scoring order {part.order!r}; available: {', '.join(ORDERS)}")
        if not m.may_progress and part.order != "one-shot":  # data-free scores do not depend on earlier layers
            part = replace(part, order="one-shot")
        if m.keep_rule is not None:  # its own budget over all layers (counts differ per layer), one-shot
            if part.order != "one-shot":
                raise MumoeError(f"{m.name} chooses over all layers at once: it scores one-shot")
            part = replace(part, budget="global")
        if part.order == "progressive" and part.budget != "uniform":
            raise MumoeError("progressive scoring needs the uniform budget")
        return part

    def order(self, part) -> str:
        return part.order

    def leaves_hf(self, stage) -> bool:
        return stage.part.budget == "uniform"

    def describe(self, recipe) -> str:
        return (f"{recipe.ratio:.0%} of experts (budget {recipe.expert.budget}, scoring {recipe.expert.order}) "
                f"with {recipe.method}")

    def check_model(self, recipe, config) -> None:
        if recipe.ratio > 0:
            check_expert_removal(config)

    def check_config(self, recipe, config) -> None:
        from ..models.base import config_experts

        cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
        E, k = config_experts(config)
        if E is not None and recipe.ratio > 0:
            self.check_model(recipe, config)
            layers = getattr(cfg, "num_hidden_layers", None) if recipe.expert.budget == "global" else 1
            pool = E * (layers if isinstance(layers, int) and not isinstance(layers, bool) else 1)
            if round(recipe.ratio * pool) == 0:  # the global budget ranks every layer's experts at once
                raise MumoeError(f"--ratio {recipe.ratio:g} removes nothing: round({recipe.ratio:g} x {pool} experts) "
                                 f"= 0{'' if pool == E else ' over all layers'}; the smallest ratio that removes one "
                                 f"is {1 / pool:.3g}")
        if recipe.expert.budget == "uniform" and E is not None and k is not None and E - round(recipe.ratio * E) < k:
            raise MumoeError(f"ratio {recipe.ratio} keeps {E - round(recipe.ratio * E)} of {E} experts, fewer than "
                             f"top_k={k}")

    # -- a loaded model -------------------------------------------------------------------------------------
    def prune(self, model: nn.Module, recipe, wins, groups, verbose: bool, scores=None) -> ExpertPlan:
        from ..apply.experts import remove_experts
        from ..criteria import get_method, score_methods
        from ..models import moe_adapter_for

        m = get_method(recipe.method)
        budget, order = recipe.expert.budget, recipe.expert.order
        layers = moe_adapter_for(model).moe_layers()
        if budget == "global" and _group_limited(layers):
            raise MumoeError("global budgets are not available for group-limited routers; use --budget uniform")
        seed, bs = recipe.calib.seed, recipe.calib.batch_size
        t0 = time.perf_counter()
        if scores is not None:
            if order != "one-shot":
                raise MumoeError("precomputed scores are one-shot; progressive scoring needs its own passes")
        elif order == "progressive":
            scores, keep = [], {}
            for layer in layers:  # score this layer on the model whose earlier layers are already sliced
                s = score_methods(model, [m.name], wins, groups, seed, bs, verbose, layers=[layer])[m.name][0]
                scores.append(s)
                keep.update(select_experts([layer], [s], recipe.ratio, budget, m.prune_highest))
                remove_experts(model, {layer.index: keep[layer.index]})
        else:
            scores = score_methods(model, [m.name], wins, groups, seed, bs, verbose, layers=layers)[m.name]
        clusters = None
        if order != "progressive":
            keep, clusters = choose(m, layers, scores, recipe.ratio, budget)
            remove_experts(model, keep)
        plan = make_plan(layers, scores, keep, clusters)
        if verbose and clusters is not None:
            kept, total = sum(len(k) for k in plan.keep.values()), sum(plan.num_experts.values())
            if kept != total - round(recipe.ratio * total):
                print(f"  {m.name}: no threshold keeps exactly {total - round(recipe.ratio * total)} of {total} "
                      f"experts; kept {kept} (the nearest total above)")
        if verbose:
            for entry in self.entries(plan):
                print(layer_summary(entry))
            print(f"  scored and sliced in {time.perf_counter() - t0:.2f}s" + (
                "" if plan.export_form() == "hf" else "; per-layer expert counts differ: an HF config cannot hold "
                "them, so the export is in mumoe's own form (load it with mumoe.load)"))
        return plan

    # -- a checkpoint, layer by layer -------------------------------------------------------------------------
    def check_layerwise(self, recipe, layers) -> None:
        if recipe.expert.budget == "global" and _group_limited(layers):
            raise MumoeError("global budgets are not available for group-limited routers; use --budget uniform")

    def hooks(self, recipe, ckpt, layers: dict) -> LayerwiseHooks:
        from ..apply.experts import slice_layer
        from ..criteria import get_method

        m = get_method(recipe.method)

        def select(layer, s):
            return select_experts([layer], [s], recipe.ratio, recipe.expert.budget, m.prune_highest)[layer.index]

        def prune_layer(j: int, module, res: dict) -> bool:
            if j not in layers:
                return False
            slice_layer(layers[j], res["keep"], inplace=True)
            return True

        return LayerwiseHooks(select, prune_layer)

    def plan_layerwise(self, recipe, layers: list, res) -> ExpertPlan:
        from ..criteria import get_method

        m = get_method(recipe.method)
        scores = res.scores[m.name]
        if recipe.expert.order == "progressive":
            return make_plan(layers, scores, res.keep)
        return make_plan(layers, scores, *choose(m, layers, scores, recipe.ratio, recipe.expert.budget))

    def transform(self, plan: ExpertPlan, ckpt, recipe):
        from ..apply.stream import expert_transform
        from ..models.base import EXPERT_COUNT_KEYS
        from ..models.keys import routing_keys

        counts = {len(v) for v in plan.keep.values()}
        changes = dict.fromkeys(EXPERT_COUNT_KEYS, counts.pop()) if plan.export_form() == "hf" else {}
        return expert_transform(plan.kept(), routing_keys(ckpt.model), ckpt.rename), changes

    # -- the record -----------------------------------------------------------------------------------------
    def entries(self, plan: ExpertPlan) -> list[dict]:
        return [{"layer": j, "num_experts": plan.num_experts[j], "kept": list(plan.keep[j]),
                 "scores": list(plan.scores[j]), **({"clusters": plan.clusters[j]} if j in plan.clusters else {})}
                for j in plan.keep]

    def report_fields(self, recipe, plan: ExpertPlan) -> dict:
        return {"budget": recipe.expert.budget, "scoring_order": recipe.expert.order,
                "model": {"num_experts": next(iter(plan.num_experts.values()))}}

    def summary(self, entries: list[dict]) -> str:
        counts = sorted({len(e["kept"]) for e in entries})
        return f"{'/'.join(map(str, counts))} of {entries[0]['num_experts']} experts per layer"

    def layer_lines(self, entries: list[dict]) -> list[str]:
        return [layer_summary(e) for e in entries]
