"""A plan made into its `pruning.json` record, and the stages of one run made into one record."""

from __future__ import annotations

from ..apply.report import PruneReport
from ..grains import Plan, get_grain


def stage_report(recipe, plan: Plan) -> PruneReport:
    """The record of one stage (a one-stage Recipe) from its typed plan; calibration, recipe and model source
    are the driver's to fill."""
    grain = get_grain(recipe.grain)
    return PruneReport(method=recipe.method, grain=recipe.grain, ratio=recipe.ratio, form=plan.export_form(),
                       layers=grain.entries(plan), plan=plan, **grain.report_fields(recipe, plan))


def finish(report: PruneReport, recipe, calibration: dict, model: dict) -> PruneReport:
    """Fill in what the run was given: its calibration, the recipe that replays it, the model it came from."""
    report.calibration = calibration
    report.recipe = recipe.to_dict()
    report.model = {**model, **report.model}
    return report


def combine(reports: list[PruneReport], recipe) -> PruneReport:
    """The stages of one multi-stage run as one record: the last stage's layers and form (what the export
    holds), every stage in `stages`, and the whole recipe (which replays all of them)."""
    out = reports[0]
    for r in reports[1:]:
        out = r.compose(out)
    out.recipe = recipe.to_dict()
    return out
