"""The in-memory driver: every stage of a recipe scored, selected and applied on a loaded model, in place."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ..apply.report import PruneReport
from ..errors import MumoeError
from ..grains import get_grain
from .record import combine, finish, stage_report


def apply_stage(model: nn.Module, recipe, wins, groups=None, verbose: bool = False, scores=None) -> PruneReport:
    """Score (unless `scores` are given: the method's one-shot scores from a shared pass), select and apply one
    one-stage recipe in place. The report's calibration/recipe/model source are the caller's to fill."""
    plan = get_grain(recipe.grain).prune(model, recipe, wins, groups, verbose, scores)
    return stage_report(recipe, plan)


def prune_model(model: nn.Module, recipe, windows: tuple, *, verbose: bool = False, source: str = "",
                say: Callable[[str], None] | None = None, scores=None) -> PruneReport:
    """Every stage of `recipe` in order on `model`, each on the model the stages before it left, all on the same
    calibration windows ((ids [N, L] or None, groups or None, info), `inputs.calibration`). scores: the first
    stage's one-shot scores from a shared pass (`mumoe compare`)."""
    from ..apply.experts import expert_weight_counts, removed_record

    wins, groups, info = windows
    stages = recipe.stages
    reports = []
    before = expert_weight_counts(model)
    for i, stage in enumerate(stages):
        if i and recipe.expert_params is not None:  # the rest of the combined budget, after what stage 1 removed
            stage = split_stage(stage, recipe, before, expert_weight_counts(model), say)
        get_grain(stage.grain).check_model(stage, model.config)  # (JetMoE: no expert removal)
        if i:  # the shapes the earlier stages left (an N:M block must still divide every width, ...)
            get_grain(stage.grain).check_config(stage, model.config)
            if say is not None:
                say(f"stage {i + 1} of {len(stages)}: {get_grain(stage.grain).describe(stage)}")
        r = apply_stage(model, stage, wins, groups, verbose, scores if i == 0 else None)
        reports.append(finish(r, stage, info, {"source": source, "model_type": model.config.model_type}))
    report = reports[0] if len(reports) == 1 else combine(reports, recipe)
    if before is not None:
        report.removed = removed_record(before, expert_weight_counts(model))
    return report


def split_stage(stage, recipe, before: tuple[int, int], now: tuple[int, int], say=None):
    """The weight stage of a combined budget (`recipe.expert_params`) at the sparsity that removes the rest of the
    target from the experts left, given what the expert stage actually removed (`select.split`)."""
    from dataclasses import replace

    from ..select.split import weight_ratio

    done = (before[1] - now[1]) / before[0]
    ratio = round(weight_ratio(recipe.expert_params, done), 6)
    if say is not None:
        say(f"combined budget: {recipe.expert_params:.0%} of the routed-expert weights; the expert stage removed "
            f"{done:.2%}, the weight stage removes {ratio:.2%} of what is left")
    return replace(stage, ratio=ratio)


def prune_loaded(model: nn.Module, recipe, windows: tuple, *, verbose: bool = False, source: str | None = None,
                 say: Callable[[str], None] | None = None) -> PruneReport:
    """`mumoe.prune` on a loaded model: the checks, the recipe's device, every stage, and the model's record
    (a model pruned before gets one record of every run: `PruneReport.compose`)."""
    from ..apply.report import RECORDS
    from ..observe.runner import resolve_device
    from .inputs import check_materialised, check_model_arg, check_token_ids

    check_model_arg(model)
    check_materialised(model)
    check_token_ids(model, windows[0])
    done = RECORDS.get(model)
    if done is not None and done.form == "mumoe-quant":
        raise MumoeError("this model's experts were quantized (PMQ) in this process; prune first, then quantize "
                         "(the export packs the widths of the run that quantized)")
    if recipe.device is not None:
        model.to(resolve_device(recipe.device))
    report = prune_model(model, recipe, windows, verbose=verbose,
                         source=source or getattr(model.config, "_name_or_path", ""), say=say)
    earlier = RECORDS.get(model)
    if earlier is not None:  # pruned before: one record of every stage, describing the export
        report = report.compose(earlier)
    RECORDS[model] = report
    return report
