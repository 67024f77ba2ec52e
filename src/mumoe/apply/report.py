"""PruneReport: what a pruning run did, as written to `pruning.json` (read by the export forms and the loaders)."""

from __future__ import annotations

import json
import weakref
from dataclasses import asdict, dataclass, field

from ..errors import MumoeDataError
from ..version import __version__


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
    stages: list[dict] = field(default_factory=list)  # a model pruned more than once: every run's recipe, in order
    mumoe_version: str = __version__

    def to_dict(self) -> dict:
        d = asdict(self)
        return {"mumoe_version": d.pop("mumoe_version"), **d}

    def to_json(self) -> str:
        """Strict JSON (no bare NaN/Infinity: a non-finite score is an error, not a file other tools reject)."""
        try:
            return json.dumps(self.to_dict(), indent=1, allow_nan=False)
        except ValueError as e:
            raise MumoeDataError(f"pruning.json would hold non-finite values ({e}); the scores are not usable") from e

    @classmethod
    def from_dict(cls, d: dict) -> "PruneReport":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})

    def kept(self) -> dict[int, list[int]]:
        return {entry["layer"]: list(entry["kept"]) for entry in self.layers}

    def compose(self, earlier: "PruneReport") -> "PruneReport":
        """This run's report on a model `earlier` had pruned, as one record of both: the source and model of the
        first run, every stage's recipe in `stages`; for experts after experts, kept indices in the original
        numbering and the ratio against the original expert count."""
        stages = (earlier.stages or [earlier.recipe]) + [self.recipe]
        model = {**self.model, **{k: v for k, v in earlier.model.items() if k in ("source", "model_type")}}
        if not self.grain == earlier.grain == "expert":
            return PruneReport(**{**self.__dict__, "model": model, "stages": stages})
        before = earlier.kept()
        layers = []
        for entry in self.layers:
            orig = before.get(entry["layer"])
            kept = [orig[i] for i in entry["kept"]] if orig is not None else list(entry["kept"])
            n = next((e["num_experts"] for e in earlier.layers if e["layer"] == entry["layer"]),
                     entry["num_experts"])
            layers.append({**entry, "kept": kept, "num_experts": n, "scores_of": "the last stage's experts"})
        total = sum(e["num_experts"] for e in layers)
        ratio = 1 - sum(len(e["kept"]) for e in layers) / total if total else self.ratio
        model["num_experts"] = earlier.model.get("num_experts", model.get("num_experts"))
        return PruneReport(**{**self.__dict__, "model": model, "layers": layers, "ratio": round(ratio, 6),
                              "stages": stages})


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
    if report.grain != "expert":
        return
    from ..models import adapter_for

    counts = {layer.index: layer.num_experts for layer in adapter_for(model).moe_layers()}
    for entry in report.layers:
        have = counts.get(entry["layer"])
        if have is not None and have != len(entry["kept"]):
            raise MumoeError(f"this report keeps {len(entry['kept'])} experts in layer {entry['layer']}, the model "
                             f"has {have}: it is another model's report")
