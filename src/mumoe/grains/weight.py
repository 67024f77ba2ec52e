"""The weight grain: single weights of every decoder linear and routed expert set to zero (Wanda, magnitude).

Structures: row (each output row keeps its best (1 − ratio) weights), N:M (N of every M consecutive inputs), and
column (whole input columns, compacted for decoding). Embeddings, lm_head and routers are never pruned.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, replace
from typing import ClassVar

import torch
from torch import nn

from ..errors import MumoeError
from .base import Grain, LayerwiseHooks, Plan

ORDERS = ("one-shot", "progressive")
BUDGETS = ("uniform", "owl")
_LAYER = re.compile(r"\.layers\.(?P<layer>\d+)\.")


@dataclass(frozen=True)
class WeightPart:
    structure: str = "row"  # row | N:M | column
    order: str = "one-shot"  # Wanda: one-shot (every layer on the dense model) or progressive (the Wanda authors'
    #                          order: layer ℓ calibrated on the already-pruned layers < ℓ; layer-sequential only)
    budget: str = "uniform"  # uniform: the ratio in every layer; owl: per-layer ratios from outlier shares (OWL)
    owl_m: float = 5.0  # OWL: a score is an outlier above owl_m x its layer's mean score
    owl_lambda: float = 0.08  # OWL: per-layer sparsities within ratio ± owl_lambda


@dataclass(frozen=True)
class WeightPlan(Plan):
    """Which weights stay: in memory, a keep mask per parameter (`masks`); from a layer-sequential sweep, the
    calibration's input norms per parameter (`norms`), from which the export makes each layer's masks while it
    holds that layer (the masks of a whole model need not fit in memory)."""

    structure: str
    active: float  # the fraction of weights kept
    masks: dict[str, torch.Tensor] | None = None
    norms: dict[str, torch.Tensor] | None = None
    owl: tuple[float, float, float] | None = None  # (target sparsity, m, lambda): per-layer ratios (OWL budget)

    def params(self) -> list[str]:
        return list(self.masks) if self.masks is not None else sorted(self.norms)


def _owl(recipe) -> tuple[float, float, float] | None:
    w = recipe.weight
    return (recipe.ratio, w.owl_m, w.owl_lambda) if w.budget == "owl" else None


def layer_outliers(params: dict, norms: dict[str, torch.Tensor], m: float) -> float:
    """OWL's outlier ratio D of one decoder layer from its prunable weights' Wanda scores."""
    from ..criteria.weight import outlier_ratio, wanda

    return outlier_ratio([wanda(params[n], v) for n, v in norms.items()], m)


def owl_active(outliers: dict[int, float], target: float, lam: float) -> dict[int, float]:
    """decoder layer -> kept fraction, from the layers' outlier ratios (`select.weights.owl_sparsities`)."""
    from ..select.weights import owl_sparsities

    layers = sorted(outliers)
    return {j: 1 - s for j, s in zip(layers, owl_sparsities([outliers[j] for j in layers], target, lam))}


def owl_layer_active(params: dict, norms: dict[str, torch.Tensor], recipe) -> dict[int, float]:
    """OWL on a loaded model: every decoder layer's outlier ratio from its weights' Wanda scores, then the
    per-layer kept fractions."""
    by_layer: dict[int, dict] = {}
    for n, v in norms.items():
        mm = _LAYER.search("." + n)
        if mm is not None:
            by_layer.setdefault(int(mm["layer"]), {})[n] = v
    w = recipe.weight
    return owl_active({j: layer_outliers(params, mine, w.owl_m) for j, mine in by_layer.items()}, recipe.ratio,
                      w.owl_lambda)


class WeightGrain(Grain):
    name: ClassVar[str] = "weight"
    part: ClassVar[type] = WeightPart
    flags: ClassVar[tuple[str, ...]] = ("structure", "order", "budget", "owl_m", "owl_lambda")
    cli: ClassVar[dict[str, dict]] = {
        "structure": {"help": "weight methods (wanda): row (unstructured per row, default), N:M (e.g. 2:4, then "
                      "--ratio is 1 - N/M) or column"},
        "order": {"choices": list(ORDERS), "help": "see the expert methods' --order"},
        "budget": {"choices": list(BUDGETS), "help": "wanda: uniform = --ratio in every layer (default); owl = "
                   "per-layer ratios from each layer's share of outlier scores (OWL), averaging --ratio"},
        "owl_m": {"type": float, "metavar": "M", "help": "--budget owl: outliers are scores above M x their layer's "
                  "mean (default 5)"},
        "owl_lambda": {"type": float, "metavar": "L", "help": "--budget owl: layer sparsities within --ratio ± L "
                       "(default 0.08)"},
    }
    needs_experts: ClassVar[bool] = False
    shares_pass: ClassVar[bool] = False  # scored and masked in one step
    keeps_shapes: ClassVar[bool] = True

    def check(self, recipe) -> WeightPart:
        from ..criteria import get_method, methods_of
        from ..select.weights import parse_structure

        part, m = recipe.weight, get_method(recipe.method)
        nm = parse_structure(part.structure)
        if part.order not in ORDERS:
            raise MumoeError(f"unknown scoring order {part.order!r}; available: {', '.join(ORDERS)}")
        if not m.may_progress and part.order != "one-shot":
            part = replace(part, order="one-shot")
        if m.structures is not None and part.structure not in m.structures:
            raise MumoeError(f"{m.name} pruning has one threshold per matrix; --structure applies to "
                             f"{', '.join(n for n in methods_of(self.name) if get_method(n).structures is None)}")
        if part.budget not in BUDGETS:
            raise MumoeError(f"--budget {part.budget} is not a weight budget; weight methods take "
                             f"{', '.join(BUDGETS)}")
        if part.budget == "owl":
            if m.from_norms is None or part.structure != "row":
                raise MumoeError("--budget owl sets per-layer sparsities for Wanda's unstructured (row) masks: "
                                 "--method wanda --structure row")
            if part.order != "one-shot":
                raise MumoeError("--budget owl with --order progressive is not built: OWL's ratios come from a "
                                 "sweep of the dense model before the pruning sweep")
            if not (isinstance(part.owl_m, (int, float)) and part.owl_m > 0):
                raise MumoeError(f"--owl-m must be positive, got {part.owl_m!r}")
            if not (isinstance(part.owl_lambda, (int, float)) and part.owl_lambda >= 0):
                raise MumoeError(f"--owl-lambda must be >= 0, got {part.owl_lambda!r}")
            if recipe.ratio + 2 * part.owl_lambda >= 1:
                raise MumoeError(f"--ratio {recipe.ratio:g} with --owl-lambda {part.owl_lambda:g} can ask a layer "
                                 f"for sparsity up to {recipe.ratio + 2 * part.owl_lambda:g}: keep ratio + 2 x "
                                 "lambda below 1")
        elif (part.owl_m, part.owl_lambda) != (5.0, 0.08):
            raise MumoeError("--owl-m and --owl-lambda set the OWL budget: add --budget owl")
        if nm is not None and not math.isclose(recipe.ratio, 1 - nm[0] / nm[1], abs_tol=1e-9):
            raise MumoeError(f"--structure {part.structure} removes {1 - nm[0] / nm[1]:.0%} of the weights, but "
                             f"--ratio says {recipe.ratio:.0%}; pass --ratio {1 - nm[0] / nm[1]:g}")
        return part

    def order(self, part) -> str:
        return part.order

    def describe(self, recipe) -> str:
        w = recipe.weight
        owl = f", OWL layer ratios M={w.owl_m:g} λ={w.owl_lambda:g}" if w.budget == "owl" else ""
        return (f"{recipe.ratio:.0%} of weights ({w.structure}{owl}" + (", progressive order)" if w.order ==
                                                                        "progressive" else ")") + f" with {recipe.method}")

    def label(self, recipe) -> str:
        return recipe.method + (" +owl" if recipe.weight.budget == "owl" else "")

    def check_config(self, recipe, config) -> None:
        from ..models.keys import input_widths
        from ..select.weights import parse_structure

        nm = parse_structure(recipe.weight.structure)
        if nm is None:
            return
        widths = input_widths(config)
        bad = sorted(w for w in widths if w % nm[1])
        if bad:
            raise MumoeError(f"N:M structure {recipe.weight.structure} needs M={nm[1]} to divide every input "
                             f"width; this model has width(s) {', '.join(map(str, bad))}")

    # -- a loaded model -------------------------------------------------------------------------------------
    def prune(self, model: nn.Module, recipe, wins, groups, verbose: bool, scores=None) -> WeightPlan:
        """Wanda (|W|·‖X‖ from calibration windows; structures row, N:M, column) or magnitude (one threshold
        per matrix) on every linear of the decoder layers and every routed expert (per expert, from its routed
        tokens); embeddings, lm_head, routers untouched. ratio = sparsity."""
        from ..apply.masking import apply_masks
        from ..criteria import get_method
        from ..models import adapter_for
        from ..models.prunable import prunable_names
        from ..observe.collectors import InputNorms
        from ..observe.runner import run
        from ..select.weights import magnitude_mask, masks_from_norms

        if scores is not None:
            raise MumoeError("weight-grain methods are scored and masked in one step; no precomputed scores")
        adapter_for(model)
        recipe.check_config(model.config)
        if recipe.weight.order == "progressive":
            raise MumoeError("Wanda's progressive order calibrates one layer at a time: it runs on the "
                             "layer-sequential path (mumoe prune CHECKPOINT --layerwise)")
        m = get_method(recipe.method)
        ratio, structure = recipe.ratio, recipe.weight.structure
        t0 = time.perf_counter()
        if m.from_norms is not None:
            bs = recipe.calib.batch_size
            if verbose:  # a stage line each (bars only on a terminal): the pass takes seconds to minutes
                print(f"  statistics: input norms of every prunable weight over {wins.shape[0]} windows "
                      f"({-(-wins.shape[0] // bs)} forwards of {bs})", flush=True)
            norms = run(model, wins, [InputNorms(model)], batch_size=bs, progress=verbose)[0].result()
            if verbose:
                print(f"  statistics done in {time.perf_counter() - t0:.1f}s; selecting {structure} masks", flush=True)
            layer_active = None
            if recipe.weight.budget == "owl":
                layer_active = owl_layer_active(dict(model.named_parameters()), norms, recipe)
                if verbose:
                    print("  OWL layer sparsities: " + ", ".join(f"{j}: {1 - a:.3f}" for j, a in layer_active.items()))
            masks = masks_from_norms(model, norms, 1 - ratio, structure, layer_active=layer_active)
        else:
            params = dict(model.named_parameters())
            masks = {n: magnitude_mask(params[n], ratio) for n in prunable_names(model)}
        apply_masks(model, masks)
        plan = WeightPlan(structure=structure, active=1 - ratio, masks=masks, owl=_owl(recipe))
        if verbose:
            total = sum(x.numel() for x in masks.values())
            kept = sum(int(x.sum()) for x in masks.values())
            print(f"  {len(masks)} weight tensors, {kept:,}/{total:,} weights kept ({kept / total:.1%}) in "
                  f"{time.perf_counter() - t0:.2f}s")
        return plan

    # -- a checkpoint, layer by layer -------------------------------------------------------------------------
    def hooks(self, recipe, ckpt, layers: dict) -> LayerwiseHooks:
        from ..apply.masking import apply_masks
        from ..select.weights import masks_from_norms

        def prune_layer(j: int, module, res: dict) -> bool:
            params = dict(ckpt.model.named_parameters())
            apply_masks(ckpt.model, masks_from_norms(ckpt.model, res["norms"], 1 - recipe.ratio,
                                                     recipe.weight.structure, params=params))
            return True

        return LayerwiseHooks(prune_layer=prune_layer)

    def plan_layerwise(self, recipe, layers: list, res) -> WeightPlan:
        return WeightPlan(structure=recipe.weight.structure, active=1 - recipe.ratio, norms=dict(res.norms),
                          owl=_owl(recipe))

    def transform(self, plan: WeightPlan, ckpt, recipe):
        """Per source tensor: its decoder layer is materialised (once per run of consecutive keys), masked with
        the masks made from the calibration norms, and the tensor cut back out in the source's layout and dtype."""
        from ..apply.masking import apply_masks
        from ..checkpoint import DTYPES
        from ..observe.layerwise import _target
        from ..select.weights import masks_from_norms

        norms = plan.norms
        current: dict = {"layer": None}
        has_bs = ckpt.block_sparse
        dtypes = {s.key: DTYPES[s.meta["dtype"]] for srcs in ckpt.sources.values() for s in srcs
                  if s.meta["dtype"] in DTYPES}  # source dtypes of the float tensors (the ones masks apply to)
        names = ckpt.layer_names()
        layer_active = None
        if plan.owl is not None:  # OWL's ratios need every layer's outlier share first: one read of each layer
            outliers = {}
            for j, name in enumerate(names):
                mine = {k: v for k, v in norms.items() if k.startswith(name + ".")}
                if not mine:
                    continue
                ckpt.materialise(name)
                params = dict(ckpt.model.named_parameters())
                outliers[j] = layer_outliers(params, mine, plan.owl[1])
                ckpt.release(name)
            layer_active = owl_active(outliers, plan.owl[0], plan.owl[2])

        def load(j: int) -> dict:
            if current["layer"] != j:
                if current["layer"] is not None:
                    ckpt.release(names[current["layer"]])
                ckpt.materialise(names[j])
                params = dict(ckpt.model.named_parameters())
                mine = {k: v for k, v in norms.items() if k.startswith(names[j] + ".")}
                active = plan.active if layer_active is None else layer_active[j]
                apply_masks(ckpt.model, masks_from_norms(ckpt.model, mine, active, plan.structure, params=params))
                current.update(layer=j, params=params)
            return current["params"]

        def transform(key: str, read):
            mm = _LAYER.search(key)
            pieces = ckpt.split_targets(key, has_bs)  # a fused file tensor transformers splits on loading
            if mm is not None and pieces and any(n in norms for n, _ in pieces):
                params = load(int(mm["layer"]))
                dim = pieces[0][1][3]
                t = torch.cat([params[n].detach() for n, _ in pieces], dim=dim)  # the masked parts, fused again
                return [(key, t.to(device="cpu", dtype=dtypes[key]).clone())]
            name, index = _target(ckpt.rename(key), has_bs)
            if mm is None or name not in norms:  # not a Wanda-pruned weight: as it is
                return [(key, read())]
            t = load(int(mm["layer"]))[name]  # the masked weight; the source tensor itself is not read again
            if len(index) == 1:
                t = t[index[0]]
            elif len(index) == 2:
                half = t.shape[1] // 2
                t = t[index[0], :half] if index[1] == "gate_proj" else t[index[0], half:]
            return [(key, t.detach().to(device="cpu", dtype=dtypes[key]).clone())]

        return transform, {}

    # -- the record -----------------------------------------------------------------------------------------
    def entries(self, plan: WeightPlan) -> list[dict]:
        if plan.masks is None:
            return [{"param": n, "active": None} for n in plan.params()]
        return [{"param": n, "active": round(float(m.float().mean()), 6)} for n, m in plan.masks.items()]

    def report_fields(self, recipe, plan: WeightPlan) -> dict:
        budget = recipe.weight.structure + ("/owl" if recipe.weight.budget == "owl" else "")
        fields = {"budget": budget, "model": {"num_experts": None}}
        if plan.norms is not None:  # the layer-sequential path records the order it ran in
            fields["scoring_order"] = recipe.weight.order
        return fields

    def summary(self, entries: list[dict]) -> str:
        return f"{len(entries)} weight tensors"

