"""PruneReport: what a pruning run did, as written to `pruning.json` (read by the export forms and the loaders)."""

from __future__ import annotations

import json
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
