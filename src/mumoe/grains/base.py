"""The grain interface: what one grain of pruning (experts, atoms, weights, ...) provides to the drivers.

A grain owns its recipe options (a frozen dataclass), their validation, its typed plan (what select chose, in a
form apply and the streamed export take), how a plan is applied to a loaded model, the streamed-export
transform of a plan, and the `pruning.json` entries of a plan. The three drivers (`drivers.memory`: a loaded
model; `drivers.layerwise`: a checkpoint swept layer by layer; `drivers.files`: scores straight from the
safetensors files) are generic over it: they never ask which grain they run.

Adding a grain = one module here with a `Grain` subclass and its plan, plus one line in `grains/__init__.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
from torch import nn

# (source key, read() -> tensor) -> [(key, tensor)] written in its place; [] drops it (`apply.stream`)
Transform = Callable[[str, Callable[[], torch.Tensor]], list]


@dataclass(frozen=True)
class Plan:
    """What a selection chose, before (and independent of) applying it. Each grain's plan is a frozen dataclass
    deriving from this one; `export_form` names the export form (`apply.forms`) a model pruned by it is written in."""

    def export_form(self) -> str:
        return "hf"


@dataclass(frozen=True)
class LayerwiseHooks:
    """What a grain does inside a layer-sequential sweep when its scoring order is progressive: `select(layer,
    scores) -> keep` right after a layer is scored, `prune_layer(j, module, result) -> changed` before the
    layer's outputs feed the next one. None: nothing (one-shot)."""

    select: Callable | None = None
    prune_layer: Callable | None = None


class Grain:
    """One grain of pruning. Subclasses set the class attributes and implement the methods."""

    name: ClassVar[str]
    part: ClassVar[type]  # its recipe options (a frozen dataclass; `Recipe.<name>`)
    flags: ClassVar[tuple[str, ...]]  # the part's fields that `Recipe.build` and the CLI take as flat options
    cli: ClassVar[dict[str, dict]] = {}  # flag -> argparse kwargs for `mumoe prune` (a flag two grains share: once)
    batch_size: ClassVar[int] = 8  # the default calibration batch
    needs_experts: ClassVar[bool] = True  # it prunes routed experts (a dense model is refused)
    shares_pass: ClassVar[bool] = True  # its scores can come from a pass shared with other methods (compare)
    whole_experts: ClassVar[bool] = False  # it removes whole routed experts (the expert stage of a split budget)
    keeps_shapes: ClassVar[bool] = False  # it only zeroes weights (no tensor changes shape): it may follow a stage
    #                                       whose per-layer shapes only mumoe.load reads

    # -- the recipe ---------------------------------------------------------------------------------------
    def build_part(self, options: dict) -> Any:
        """The part from flat options (only this grain's flags; the others are ignored)."""
        return self.part(**{k: v for k, v in options.items() if k in self.flags})

    def part_from_dict(self, d: dict) -> Any:
        """The part as a recipe in pruning.json records it."""
        return self.part(**d)

    def check(self, recipe) -> Any:
        """Validate the recipe's part (the recipe's method is of this grain); -> the part, normalised."""
        return getattr(recipe, self.name)

    def order(self, part) -> str:
        """The scoring order the part asks for: "one-shot" or "progressive"."""
        return "one-shot"

    def leaves_hf(self, stage) -> bool:
        """Whether a model pruned by this stage (a one-stage recipe or `Stage`: method, ratio, part) is still a
        standard HF model (then a later stage can run on it)."""
        return True

    def describe(self, recipe) -> str:
        """What is pruned, in words: '25% of experts (...) with reap'."""
        raise NotImplementedError

    def label(self, recipe) -> str:
        """A short name of the run for tables (the method, plus what distinguishes it)."""
        return recipe.method

    def check_config(self, recipe, config) -> None:
        """The checks that need the model's config but not its weights."""

    def check_model(self, recipe, config) -> None:
        """What must hold of a model whatever its source, before any work (a loaded model too: the in-memory
        driver runs it for every stage)."""

    def notes(self, recipe, config) -> list[str]:
        """Lines worth printing before the run (what the options really mean for this model)."""
        return []

    # -- a loaded model -----------------------------------------------------------------------------------
    def prune(self, model: nn.Module, recipe, wins, groups, verbose: bool, scores=None) -> Plan:
        """Score (unless `scores`: the method's one-shot scores from a shared pass), select and apply in place."""
        raise NotImplementedError

    # -- a checkpoint, layer by layer ---------------------------------------------------------------------
    def check_layerwise(self, recipe, layers) -> None:
        """What the layer-sequential path cannot do with this recipe, before any layer is read."""

    def hooks(self, recipe, ckpt, layers: dict) -> LayerwiseHooks:
        """The progressive order's per-layer select and prune (`LayerwiseHooks`)."""
        return LayerwiseHooks()

    def plan_layerwise(self, recipe, layers: list, res) -> Plan:
        """The plan from a sweep's results (`criteria.layerwise.LayerwiseScores`)."""
        raise NotImplementedError

    def transform(self, plan: Plan, ckpt, recipe) -> tuple[Transform, dict]:
        """The streamed export of `plan`: (per-tensor transform, config.json values that change)."""
        raise NotImplementedError

    # -- the record -----------------------------------------------------------------------------------------
    def entries(self, plan: Plan) -> list[dict]:
        """The plan as `pruning.json`'s per-layer entries."""
        raise NotImplementedError

    def report_fields(self, recipe, plan: Plan) -> dict:
        """PruneReport fields besides the entries: budget, scoring_order, model."""
        return {}

    def summary(self, entries: list[dict]) -> str:
        """What was kept, in one phrase (compare's table)."""
        return "-"

    def layer_lines(self, entries: list[dict]) -> list[str]:
        """One line per layer for the CLI after a run (none for grains with too many entries to list)."""
        return []
