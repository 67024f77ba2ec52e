"""PruneReport: what a pruning run did, as written to `pruning.json` (read by the export forms and the loaders)."""

from __future__ import annotations

import json
import weakref
from dataclasses import dataclass, field, fields
from typing import Any

from ..errors import MumoeDataError
from ..version import __version__


SCHEMA = 2  # pruning.json's layout: 2 adds `schema` and per-stage records in `stages`; the layers are unchanged


@dataclass
class PruneReport:
    """What a pruning run did; serializes to `pruning.json` (docs/cli.md, "What a run writes")."""

    method: str
    grain: str
    ratio: float
    budget: str = "uniform"
    scoring_order: str = "one-shot"
    calibration: dict = field(default_factory=dict)  # {source, nsamples, seqlen} or {}
    model: dict = field(default_factory=dict)  # {source, model_type, num_experts}
    layers: list[dict] = field(default_factory=list)  # {layer, num_experts, kept, scores}
    form: str = "hf"  # "hf": from_pretrained loads it; "mumoe": only mumoe.load (per-layer shapes differ)
    recipe: dict = field(default_factory=dict)  # the Recipe that replays this run (mumoe prune --recipe)
    # a model pruned in more than one stage (a multi-stage recipe, or mumoe.prune called again): every stage's
    # own record, in order ({method, grain, ratio, budget, scoring_order, form, layers, recipe})
    stages: list[dict] = field(default_factory=list)
    # routed-expert weights: {expert_params, expert_params_removed (sliced away or zeroed, all runs), share}; {}
    # where not counted (a dense model; the layer-sequential and from-files drivers)
    removed: dict = field(default_factory=dict)
    mumoe_version: str = __version__
    schema: int = SCHEMA
    # the typed plan this report was written from (`grains`: ExpertPlan, AtomPlan, WeightPlan); not serialised
    plan: Any = field(default=None, compare=False, repr=False)

    def to_dict(self) -> dict:
        d = {f.name: _plain(getattr(self, f.name)) for f in fields(self) if f.name != "plan"}
        return {"mumoe_version": d.pop("mumoe_version"), **d}

    def stage_record(self) -> dict:
        """This run as one entry of `stages`."""
        return {"method": self.method, "grain": self.grain, "ratio": self.ratio, "budget": self.budget,
                "scoring_order": self.scoring_order, "form": self.form, "layers": _plain(self.layers),
                "recipe": _plain(self.recipe)}

    def to_json(self) -> str:
        """Strict JSON (no bare NaN/Infinity: a non-finite score is an error, not a file other tools reject)."""
        try:
            return json.dumps(self.to_dict(), indent=1, allow_nan=False)
        except ValueError as e:
            raise MumoeDataError(f"pruning.json would hold non-finite values ({e}); the scores are not usable") from e

    @classmethod
    def from_dict(cls, d: dict) -> "PruneReport":
        """A pruning.json as written by any mumoe (schema 1 had no `schema` field; the layers are the same)."""
        return cls(**{"schema": 1, **{k: v for k, v in d.items() if k in cls.__dataclass_fields__ and k != "plan"}})

    def kept(self) -> dict[int, list[int]]:
        return {entry["layer"]: list(entry["kept"]) for entry in self.layers}

    def expert_slots(self) -> dict[int, list[int]]:
        """Per MoE layer, the source expert slots the export's experts occupy, in order: the kept experts, or each
        merged expert's first member (a merge writes the group's expert there). `mumoe.load` rebuilds per-layer
        expert counts by slicing to these."""
        return {e["layer"]: list(e["kept"]) if "kept" in e else [g[0] for g in e["groups"]] for e in self.layers}

    def expert_maps(self) -> dict[int, list[int]]:
        """Per MoE layer merged with a bound router: map[e] = the merged expert source expert e's router row
        routes to."""
        from .merge import expert_map

        return {e["layer"]: expert_map(e["groups"], e["num_experts"]) for e in self.layers
                if e.get("router") == "bound"}

    def moe_shapes(self) -> list[dict]:
        """Per MoE layer, what mumoe's own form records for a loader: its expert count, and a bound router's
        expert map (config.json `mumoe_layers`)."""
        maps = self.expert_maps()
        return [{"layer": j, "experts": len(slots), **({"expert_map": maps[j]} if j in maps else {})}
                for j, slots in self.expert_slots().items()]

    def compose(self, earlier: "PruneReport") -> "PruneReport":
        """This run's report on a model `earlier` had pruned, as one record of both: the source and model of the
        first run, every stage's record in `stages`; for experts after experts (entries with kept experts in
        both), kept indices in the original numbering (`kept`; or, when the counts differ per layer and mumoe.load
        rebuilds the shapes from the export's config, in the numbering of that config, with the original one in
        `kept_original`) and the ratio against the original expert count. Weights zeroed (a weight-grain run) in
        a model whose shapes only mumoe.load reads keep the earlier record on top (method, layers, form: what the
        loader rebuilds the shapes from), this run in `stages`."""
        stages = (earlier.stages or [earlier.stage_record()]) + [self.stage_record()]
        model = {**self.model, **{k: v for k, v in earlier.model.items() if k in ("source", "model_type")}}
        removed = _removed_both(earlier.removed, self.removed)
        if self.form == "hf" and earlier.form != "hf" and _zeroes_only(self.layers):
            # weights zeroed inside shapes only mumoe.load reads: the export keeps the earlier record's layers and
            # form (what the loader rebuilds), this run is in `stages`
            keep = {k: v for k, v in earlier.__dict__.items() if k not in ("recipe", "stages", "calibration")}
            return PruneReport(**{**self.__dict__, **keep, "stages": stages, "removed": removed})
        if not (_keeps_experts(self.layers) and _keeps_experts(earlier.layers)):
            return PruneReport(**{**self.__dict__, "model": model, "stages": stages, "removed": removed})
        before = earlier.kept()
        layers = []
        for entry in self.layers:
            orig = before.get(entry["layer"])
            kept = [orig[i] for i in entry["kept"]] if orig is not None else list(entry["kept"])
            n = next((e["num_experts"] for e in earlier.layers if e["layer"] == entry["layer"]),
                     entry["num_experts"])
            if self.form == "hf":
                layers.append({**entry, "kept": kept, "num_experts": n, "scores_of": "the last stage's experts"})
            else:
                layers.append({**entry, "kept_original": kept, "num_experts_original": n,
                               "scores_of": "the last stage's experts"})
        total = sum(e.get("num_experts_original", e["num_experts"]) for e in layers)
        ratio = 1 - sum(len(e["kept"]) for e in layers) / total if total else self.ratio
        model["num_experts"] = earlier.model.get("num_experts", model.get("num_experts"))
        return PruneReport(**{**self.__dict__, "model": model, "layers": layers, "ratio": round(ratio, 6),
                              "stages": stages, "removed": removed})


def _removed_both(earlier: dict, later: dict) -> dict:
    """The `removed` counts of a run on a model an earlier run had pruned: against the earlier run's original
    expert weights, both runs' removals summed ({} unless both were counted)."""
    if not earlier or not later:
        return {}
    n = earlier["expert_params_removed"] + later["expert_params_removed"]
    return {"expert_params": earlier["expert_params"], "expert_params_removed": n,
            "share": round(n / earlier["expert_params"], 6)}


def _zeroes_only(layers: list[dict]) -> bool:
    """Entries of the weight grain (a kept fraction per weight tensor): a run that only zeroed weights."""
    return bool(layers) and all("param" in e and "active" in e for e in layers)


def _keeps_experts(layers: list[dict]) -> bool:
    """Entries of the expert grain (one kept list of experts per layer)."""
    return bool(layers) and all("kept" in e and "num_experts" in e for e in layers)


def _plain(v):
    """A JSON-ready copy (dicts and lists copied, so the record does not share state with the caller)."""
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


# model -> the report of everything mumoe.prune did to it (composed over repeated runs); save_pruned checks the
# report it is given against it. Weak keys: a model that is dropped takes its record along.
RECORDS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def check_report_matches(model, report: PruneReport) -> None:
    """Refuse a report that does not describe `model` as it is now: not the record of its last mumoe.prune (an
    earlier stage's report, another model's), or, for the expert grain, kept counts that differ from the
    model's expert counts layer by layer — a pruning.json that contradicts its weights."""
    from ..errors import MumoeError

    record = RECORDS.get(model)
    if record is not None and report != record:
        raise MumoeError("this report does not describe the model as it is now (another model's, or an earlier "
                         "stage's: the model was pruned again after it); pass the report the last mumoe.prune "
                         "returned for this model")
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if report.model.get("model_type") not in (None, model_type):
        raise MumoeError(f"this report is of a {report.model['model_type']} model, the model is {model_type}")
    if not _keeps_experts(report.layers):
        return
    from ..models import adapter_for

    counts = {layer.index: layer.num_experts for layer in adapter_for(model).moe_layers()}
    for entry in report.layers:
        have = counts.get(entry["layer"])
        if have is not None and have != len(entry["kept"]):
            raise MumoeError(f"this report keeps {len(entry['kept'])} experts in layer {entry['layer']}, the model "
                             f"has {have}: it is another model's report")
