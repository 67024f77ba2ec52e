"""The atom grain: single neurons of routed experts (HEAPr's atomic experts, CAMERA-P's micro-experts) removed.

Forms: uniform (every expert keeps its best (1 − ratio)·I atoms, rounded to a multiple of `width_multiple`; a
standard HF model with a narrower expert width) or global (the lowest `ratio` of all atoms go, ranked over all
layers — scope global, HEAPr — or per layer; widths differ per expert: removed atoms are zeroed in memory and
the export, mumoe's own form, stores only the kept ones). Scoring order: one-shot (every layer on the unpruned
model) or progressive (layer ℓ scored on the pruned layers < ℓ: CAMERA-P's own; ranks within a layer).
Unset options take the method's own defaults (`Method.defaults`), else uniform / global / one-shot.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import ClassVar

import torch
from torch import nn

from ..errors import MumoeError
from ..models.keys import expert_width
from .base import Grain, LayerwiseHooks, Plan

FORMS = ("uniform", "global")
SCOPES = ("global", "layer")
ORDERS = ("one-shot", "progressive")
DEFAULTS = {"form": "uniform", "scope": "global", "order": "one-shot"}  # unless the method has its own


@dataclass(frozen=True)
class AtomPart:
    form: str | None = None  # uniform: one width for every expert (HF loadable); global: one ranking, ragged widths
    scope: str | None = None  # global form: rank over all layers (HEAPr) or per layer (CAMERA-P)
    # uniform form: kept widths are multiples of this (GPU kernels tile by 64/128; llama.cpp's k-quants need
    # 256 for the down projection's rows); recipes written before it existed used 8
    width_multiple: int = 64
    order: str | None = None  # one-shot | progressive (layer ℓ scored on the pruned layers < ℓ)
    lambda_max: float | None = None  # CAMERA-P: weight of the largest a² against the sum (None: its default 0.9)


@dataclass(frozen=True)
class AtomPlan(Plan):
    """Kept atoms of every routed expert: decoder-layer index -> one sorted index tensor per expert ([k_e]);
    the uniform form keeps the same count k in every expert. widths: each layer's expert width before.
    shared: the kept neurons of a layer's shared expert ([k_s], sorted) where they were ranked too (CAMERA-P's
    global form); shared_widths: that expert's width before."""

    uniform: bool
    keep: dict[int, tuple[torch.Tensor, ...]]
    widths: dict[int, int]
    shared: dict[int, torch.Tensor] = field(default_factory=dict)
    shared_widths: dict[int, int] = field(default_factory=dict)

    def export_form(self) -> str:
        return "hf" if self.uniform else "mumoe-atoms"

    def stacked(self) -> dict[int, torch.Tensor]:
        """The uniform form's keep sets as one [E, k] tensor per layer."""
        return {j: torch.stack(list(k)) for j, k in self.keep.items()}

    def layer(self, j: int) -> dict:
        """One layer's choice as plain containers (what a layer-sequential run keeps in its work dir)."""
        return {"experts": self.keep[j], "shared": self.shared.get(j)}


def score_width(s) -> int:
    """The expert width I of one layer's scores ([E, I], or the method's parts: a dict of [E, I] first)."""
    return (next(iter(s.values())) if isinstance(s, dict) else s).shape[-1]


def layer_scores(recipe, scores: list) -> list:
    """One [E, I] per layer — or {"routed": [E, I], "shared": [I_s]} where a shared expert's atoms are ranked
    too: a method whose scores come in parts has them weighed by the recipe's options."""
    from ..criteria import get_method

    weigh = get_method(recipe.method).weigh
    return [weigh(s, recipe.atom) for s in scores] if weigh is not None else scores


def make_plan(recipe, layers, scores) -> AtomPlan:
    """Keep sets chosen from `scores` (one [E, I] — or the method's parts — per MoE layer) in the recipe's form.
    Shared-expert scores join the ranking of the global form (routed atoms first among equal scores); the
    uniform form leaves shared experts whole."""
    from ..select.atoms import keep_global_atoms, keep_uniform_atoms

    part = recipe.atom
    scores = layer_scores(recipe, scores)
    routed = [s["routed"] if isinstance(s, dict) else s for s in scores]
    widths = {layer.index: layer.intermediate_size for layer in layers}
    if part.form == "uniform":
        keeps = [keep_uniform_atoms(s, recipe.ratio, part.width_multiple) for s in routed]
        keep = {layer.index: tuple(k[e].long() for e in range(k.shape[0])) for layer, k in zip(layers, keeps)}
        return AtomPlan(uniform=True, keep=keep, widths=widths)
    shared_s = [s.get("shared") if isinstance(s, dict) else None for s in scores]
    pooled = [r.flatten() if sh is None else torch.cat([r.flatten(), sh]) for r, sh in zip(routed, shared_s)]
    masks = keep_global_atoms(pooled, recipe.ratio, part.scope)  # [E·I (+ I_s)] each
    keep, shared, shared_widths = {}, {}, {}
    for layer, r, sh, mk in zip(layers, routed, shared_s, masks):
        E, I = r.shape
        keep[layer.index] = tuple(torch.nonzero(m).flatten() for m in mk[:E * I].view(E, I))
        if sh is not None:
            shared[layer.index] = torch.nonzero(mk[E * I:]).flatten()
            shared_widths[layer.index] = sh.numel()
    return AtomPlan(uniform=False, keep=keep, widths=widths, shared=shared, shared_widths=shared_widths)


def apply_plan(model: nn.Module | None, plan: AtomPlan, layers: list | None = None, set_width: bool = True) -> None:
    """Slice (uniform form: the expert width changes in the config too, unless not `set_width`) or zero (global
    form: shared-expert atoms too) the atoms of `layers` (None: the model's MoE layers)."""
    from ..apply.atoms import mask_atoms, mask_shared_atoms, slice_atoms_uniform
    from ..models import moe_adapter_for

    adapter = moe_adapter_for(model) if layers is None or (plan.uniform and set_width) else None
    for layer in layers if layers is not None else adapter.moe_layers():
        if layer.index not in plan.keep:
            continue
        keep = plan.keep[layer.index]
        if plan.uniform:
            slice_atoms_uniform(layer, torch.stack(list(keep)))
        else:
            mask = torch.zeros(layer.num_experts, layer.intermediate_size, dtype=torch.bool)
            for e, k in enumerate(keep):
                mask[e, k] = True
            mask_atoms(layer, mask)
        if layer.index in plan.shared:
            mask_shared_atoms(layer, plan.shared[layer.index])
    if plan.uniform and set_width:
        adapter.set_expert_width(len(next(iter(plan.keep.values()))[0]))


def from_layers(recipe, layers, chosen: dict[int, dict], widths: dict[int, int]) -> AtomPlan:
    """A plan from per-layer choices as `AtomPlan.layer` writes them (the progressive order); `widths`: the
    expert widths from before any layer was sliced. Shared experts are masked, never sliced: their widths are
    the layers' own."""
    shared = {j: c["shared"] for j, c in chosen.items() if c.get("shared") is not None}
    return AtomPlan(uniform=recipe.atom.form == "uniform", widths=widths,
                    keep={j: tuple(c["experts"]) for j, c in chosen.items()}, shared=shared,
                    shared_widths={layer.index: layer.shared_linears()[2].in_features for layer in layers
                                   if layer.index in shared})


class AtomGrain(Grain):
    name: ClassVar[str] = "atom"
    part: ClassVar[type] = AtomPart
    flags: ClassVar[tuple[str, ...]] = ("form", "scope", "width_multiple", "order", "lambda_max")
    cli: ClassVar[dict[str, dict]] = {
        "form": {"choices": list(FORMS), "help": "atom methods: uniform = same width for every expert (a standard "
                 "checkpoint; HEAPr's default); global = one ranking, per-expert widths (mumoe.load, or transformers "
                 "with trust_remote_code=True; CAMERA-P's default, shared-expert neurons ranked too)"},
        "scope": {"choices": list(SCOPES),
                  "help": "atom methods with --form global: rank over all layers (HEAPr's default) or per layer "
                  "(CAMERA-P's)"},
        "width_multiple": {"type": int, "metavar": "N", "help": "atom methods, uniform form: kept expert widths are "
                           "multiples of N (default 64, what GPU kernels tile by; 256 for llama.cpp's "
                           "Q4_K/Q5_K/Q6_K, whose blocks span 256 values of a row)"},
        "order": {"choices": list(ORDERS), "help": "atom methods: one-shot (HEAPr's, the only order of methods "
                  "that need gradients) or progressive (CAMERA-P's default)"},
        "lambda_max": {"type": float, "metavar": "L", "help": "camera-p: weight of each neuron's largest gated "
                       "activation against the sum over tokens, in [0, 1] (default 0.9, the authors')"},
    }
    batch_size: ClassVar[int] = 4

    def part_from_dict(self, d: dict) -> AtomPart:
        return AtomPart(**{"width_multiple": 8, **d})  # what a recipe without the field ran with

    def check(self, recipe) -> AtomPart:
        from ..criteria import get_method
        from ..criteria.camera import LAMBDA_MAX

        part, m = recipe.atom, get_method(recipe.method)
        wm = part.width_multiple
        if not isinstance(wm, int) or isinstance(wm, bool) or wm < 1:
            raise MumoeError(f"width_multiple must be a positive integer, got {wm!r}")
        own = {**DEFAULTS, **m.defaults}
        form, scope, order = part.form or own["form"], part.scope or own["scope"], part.order or own["order"]
        if form not in FORMS:
            raise MumoeError(f"unknown form {form!r}; use uniform or global")
        if scope not in SCOPES:
            raise MumoeError(f"unknown scope {scope!r}; use global or layer")
        if order not in ORDERS:
            raise MumoeError(f"unknown scoring order {order!r}; available: {', '.join(ORDERS)}")
        if order == "progressive":
            if not m.may_progress or m.needs_backward:
                why = "its gradients need the whole model" if m.needs_backward else "it reads the weights alone"
                raise MumoeError(f"{m.name} scores one-shot ({why}); drop --order progressive")
            if form == "global" and scope == "global":
                raise MumoeError("the progressive order ranks each layer when it is pruned: use --scope layer "
                                 "(or --form uniform), not one ranking over all layers")
        lam = part.lambda_max
        if m.weigh is None:
            if lam is not None:
                raise MumoeError(f"--lambda-max is CAMERA-P's; {m.name} does not take it")
        else:
            lam = LAMBDA_MAX if lam is None else lam
            if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not 0 <= lam <= 1:
                raise MumoeError(f"--lambda-max is a weight in [0, 1], got {lam!r}")
        return replace(part, form=form, scope=scope, order=order, lambda_max=lam)

    def order(self, part) -> str:
        return part.order or "one-shot"

    def leaves_hf(self, stage) -> bool:
        return stage.part.form == "uniform"

    def describe(self, recipe) -> str:
        a = recipe.atom
        what = f"atoms ({a.form} form)" + ("" if a.form == "uniform" else " ranked over all layers"
                                           if a.scope == "global" else " ranked per layer")
        how = (", progressive" if a.order == "progressive" else "") + (
            f", lambda {a.lambda_max:g}" if a.lambda_max is not None else "")
        return f"{recipe.ratio:.0%} of {what}{how} with {recipe.method}"

    def label(self, recipe) -> str:
        """The method, plus the options that differ from its own defaults: "heapr (global)", "camera-p (one-shot)"."""
        from ..criteria import get_method
        from ..criteria.camera import LAMBDA_MAX

        a, own = recipe.atom, {**DEFAULTS, **get_method(recipe.method).defaults}
        extra = [v for k, v in (("form", a.form), ("scope", a.scope), ("order", a.order))
                 if v != own[k] and (k != "scope" or a.form != "uniform")]
        if a.lambda_max is not None and a.lambda_max != LAMBDA_MAX:
            extra.append(f"λ{a.lambda_max:g}")
        return recipe.method + (f" ({', '.join(extra)})" if extra else "")

    def check_config(self, recipe, config) -> None:
        from ..select.atoms import uniform_width

        if recipe.atom.form != "uniform":
            return
        width = expert_width(config)
        if not width:
            return
        ratio, multiple = recipe.ratio, recipe.atom.width_multiple
        step = multiple if width >= multiple else 1
        if round((1 - ratio) * width / step) == 0:
            kept = uniform_width(width, ratio, multiple)
            raise MumoeError(f"--ratio {ratio:g} would keep {(1 - ratio) * width:.1f} of {width} atoms per expert; "
                             f"the uniform form keeps a multiple of {step} (at most {1 - kept / width:.1%} removed): "
                             "lower --ratio, a smaller --width-multiple, or --form global")
        if ratio > 0 and uniform_width(width, ratio, multiple) == width:
            raise MumoeError(f"--ratio {ratio:g} removes nothing from experts {width} wide when widths are multiples "
                             f"of {step}: raise --ratio or lower --width-multiple")
        from ..models.registry import ADAPTERS

        cls = ADAPTERS.get(getattr(config, "model_type", None))
        if cls is not None and cls.is_moe and ratio > 0:  # the family's config must hold the width (before loading)
            width_changes(cls, config, uniform_width(width, ratio, multiple))

    def notes(self, recipe, config) -> list[str]:
        from ..criteria import get_method
        from ..select.atoms import uniform_width

        out = []
        note = get_method(recipe.method).notes.get(recipe.atom.form)
        if note:
            out.append(f"  {recipe.method}: {note}")
        width = expert_width(config) if config is not None and recipe.atom.form == "uniform" else None
        if width:
            kept = uniform_width(width, recipe.ratio, recipe.atom.width_multiple)
            real = 1 - kept / width
            if abs(real - recipe.ratio) >= 5e-4:
                out.append(f"  uniform widths are multiples of {recipe.atom.width_multiple}: {kept} of {width} atoms "
                           f"kept per expert, {real:.1%} removed (--ratio {recipe.ratio:g})")
        return out

    # -- a loaded model -------------------------------------------------------------------------------------
    def prune(self, model: nn.Module, recipe, wins, groups, verbose: bool, scores=None) -> AtomPlan:
        from ..criteria import score_methods
        from ..models import moe_adapter_for

        layers = moe_adapter_for(model).moe_layers()
        seed, bs = recipe.calib.seed, recipe.calib.batch_size
        t0 = time.perf_counter()
        if recipe.atom.order == "progressive":
            if scores is not None:
                raise MumoeError("precomputed scores are one-shot; progressive scoring needs its own passes")
            chosen = {}
            widths = {layer.index: layer.intermediate_size for layer in layers}  # before any is sliced
            for layer in layers:  # scored on the model whose earlier layers are pruned already
                s = score_methods(model, [recipe.method], wins, None, seed, bs, verbose, layers=[layer])[recipe.method]
                one = make_plan(recipe, [layer], s)
                apply_plan(model, one, layers=[layer], set_width=False)
                chosen[layer.index] = one.layer(layer.index)
            plan = from_layers(recipe, layers, chosen, widths)
            if plan.uniform:  # every layer sliced: the config's width follows once
                moe_adapter_for(model).set_expert_width(len(next(iter(plan.keep.values()))[0]))
        else:
            if scores is None:
                scores = score_methods(model, [recipe.method], wins, None, seed, bs, verbose,
                                       layers=layers)[recipe.method]  # [E, I] each (or the method's parts)
            plan = make_plan(recipe, layers, scores)
            apply_plan(model, plan)
        if verbose:
            for e in self.entries(plan):
                widths = [len(x["kept"]) for x in e["experts"]]
                sh = e.get("shared")
                print(f"  layer {e['layer']:3d}: kept atoms per expert {min(widths)}..{max(widths)} of "
                      f"{e['intermediate_size']} (total {sum(widths)}/{e['intermediate_size'] * len(widths)})"
                      + (f"; shared expert {len(sh['kept'])}/{sh['intermediate_size']}" if sh else ""))
            print(f"  scored and applied in {time.perf_counter() - t0:.2f}s")
        return plan

    # -- a checkpoint, layer by layer -------------------------------------------------------------------------
    def hooks(self, recipe, ckpt, layers: dict) -> LayerwiseHooks:
        if recipe.atom.order != "progressive":
            return LayerwiseHooks()

        def select(layer, s) -> dict:
            return make_plan(recipe, [layer], [s]).layer(layer.index)

        def prune_layer(j: int, module, res: dict) -> bool:
            if j not in layers:
                return False
            apply_plan(None, from_layers(recipe, [], {j: res["keep"]}, {}), layers=[layers[j]], set_width=False)
            return True

        return LayerwiseHooks(select, prune_layer)

    def plan_layerwise(self, recipe, layers: list, res) -> AtomPlan:
        if recipe.atom.order == "progressive":  # the layers were sliced in the sweep: widths from the scores
            widths = {layer.index: score_width(s) for layer, s in zip(layers, res.scores[recipe.method])}
            return from_layers(recipe, layers, {layer.index: res.keep[layer.index] for layer in layers}, widths)
        return make_plan(recipe, layers, res.scores[recipe.method])

    def transform(self, plan: AtomPlan, ckpt, recipe):
        from ..apply.stream import atom_ragged_transform, atom_transform
        from ..models import adapter_for

        if plan.uniform:
            keep = plan.stacked()
            width = next(iter(keep.values())).shape[-1]
            return atom_transform(keep, ckpt.rename), width_changes(type(adapter_for(ckpt.model)), ckpt.config, width)
        from ..apply.atoms import shared_atom_keys

        gated = all(layer.gated for layer in adapter_for(ckpt.model).moe_layers())
        return atom_ragged_transform({j: list(k) for j, k in plan.keep.items()}, ckpt.rename,
                                     shared_atom_keys(ckpt.model, plan.shared), gated), {}

    # -- the record -----------------------------------------------------------------------------------------
    def entries(self, plan: AtomPlan) -> list[dict]:
        out = []
        for j, keep in plan.keep.items():
            e = {"layer": j, "num_experts": len(keep), "intermediate_size": plan.widths[j]}
            if plan.uniform:
                e["kept_width"] = len(keep[0])
            e["experts"] = [{"expert": i, "kept": k.tolist()} for i, k in enumerate(keep)]
            if j in plan.shared:
                e["shared"] = {"intermediate_size": plan.shared_widths[j], "kept": plan.shared[j].tolist()}
            out.append(e)
        return out

    def report_fields(self, recipe, plan: AtomPlan) -> dict:
        a = recipe.atom
        return {"budget": a.form + ("" if a.form == "uniform" else f"/{a.scope}"),
                "model": {"num_experts": len(next(iter(plan.keep.values())))}}

    def summary(self, entries: list[dict]) -> str:
        widths = [len(x["kept"]) for e in entries for x in e["experts"]]
        total = sum(e["intermediate_size"] * e["num_experts"] for e in entries)
        shared = [e["shared"] for e in entries if "shared" in e]
        tail = "" if not shared else (f"; shared experts {sum(len(x['kept']) for x in shared):,} of "
                                      f"{sum(x['intermediate_size'] for x in shared):,}")
        return f"{sum(widths):,} of {total:,} atoms (per expert {min(widths)}..{max(widths)}){tail}"


def width_changes(adapter_cls, config, width: int) -> dict:
    """The config values a uniform expert width changes, as the family's adapter sets them on a loaded model
    (the width key; DeepSeek-style shared experts also their count, so they keep their width): applied to a
    copy of `config`, read back as {key: new value}. A family whose config cannot hold the width refuses here."""
    import copy

    config = copy.deepcopy(config)
    before = config.to_dict()
    adapter_cls.write_expert_width(config, width)
    after = config.to_dict()
    return {k: v for k, v in after.items() if before.get(k) != v}
