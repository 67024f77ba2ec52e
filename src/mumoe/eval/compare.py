"""`mumoe compare`: several methods scored from ONE calibration pass, each applied to a copy of the model and
(optionally) evaluated — the table people put in papers, at the cost of one observation pass. A method whose
scoring order is progressive (REAM by default; `--order progressive`) cannot share it: it calibrates each layer
on its own copy's merged layers before, in passes of its own.

    result = compare(model, [Recipe.build("reap", 0.5, calib="domain"), Recipe.build("heapr", 0.25, ...)],
                     tokenizer=tok, evals={"code": windows, ...})
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from ..criteria import get_method
from ..errors import MumoeError
from ..grains import get_grain
from ..recipe import Recipe
from ..progress import bar
from .perplexity import perplexity_of_windows


@dataclass
class CompareResult:
    rows: list[dict]  # {"method", "grain", "ratio", "calib", "ppl": {domain: value}, "kept": summary}
    scores: dict[str, object]  # method -> its raw scores (as mumoe.score returns them)
    pass_seconds: float  # the one calibration pass (every one-shot method's statistics)
    reports: dict[str, dict] = field(default_factory=dict)  # label -> pruning report dict (kept sets, scores)


def check_recipes(recipes: list[Recipe]) -> None:
    """One calibration for all: the one-shot first stages of expert, atom and merge methods share one pass;
    progressive ones, weight methods (scored and masked in one step) and later stages (scored on the model the
    stage before left) run passes of their own."""
    if not recipes:
        raise MumoeError("compare needs at least one method")
    calibs = {(c.sources, c.nsamples, c.seqlen, c.seed) for c in (r.calib for r in recipes) if c.sources}
    if len(calibs) > 1:
        raise MumoeError("compare needs one calibration for every method")


def label(recipe: Recipe) -> str:
    """The row's name: the method (and what distinguishes it); a multi-stage recipe's stages joined by '+'."""
    return "+".join(get_grain(st.grain).label(st) for st in recipe.stages)


def shares_pass(recipe: Recipe) -> bool:
    """Whether the recipe's first stage takes its scores from the one shared pass."""
    grain = get_grain(recipe.grain)
    return grain.shares_pass and grain.order(recipe.part) == "one-shot"


@torch.no_grad()
def _evaluate(model: nn.Module, evals: dict[str, torch.Tensor], batch_size: int) -> dict[str, float]:
    return {d: round(perplexity_of_windows(model, w, batch_size=batch_size, progress=False)["ppl"], 3)
            for d, w in evals.items()}


def compare(model: nn.Module, recipes: list[Recipe], wins: torch.Tensor | None, groups: torch.Tensor | None = None,
            evals: dict[str, torch.Tensor] | None = None, calib_label: str = "-", eval_batch_size: int = 8,
            progress: bool = False, log=None, dense: bool = True, tasks: list[str] | None = None,
            tokenizer=None, n_local: int = 100) -> CompareResult:
    """Score every recipe's method in one pass over `wins`, apply each to a deep copy of `model` and evaluate
    the copy on `evals` (domain -> windows [N, L]; dense=False: no dense row) and, with `tasks`, on lm-eval tasks
    ("local": the offline tasks on shipped data; their accuracy in each row's "tasks"). The model is left
    unchanged."""
    from contextlib import nullcontext

    from .harness import run_lm_eval, task_manager

    with task_manager(tasks, n_local) if tasks else nullcontext() as manager:
        def accuracy(m: nn.Module) -> dict[str, float]:
            res = run_lm_eval(m, tokenizer, tasks, batch_size=eval_batch_size, manager=manager)
            return {t: round(v["acc"], 4) for t, v in sorted(res.items()) if "acc" in v}

        return _compare(model, recipes, wins, groups, evals, calib_label, eval_batch_size, progress, log, dense,
                        accuracy if tasks else None)


def _compare(model, recipes, wins, groups, evals, calib_label, eval_batch_size, progress, log, dense,
             accuracy) -> CompareResult:
    from ..criteria import score_methods
    from ..drivers.memory import prune_model

    check_recipes(recipes)
    cal = next((r.calib for r in recipes if r.calib.sources), recipes[0].calib)
    t0 = time.perf_counter()
    shared = [r for r in recipes if shares_pass(r)]
    names = list(dict.fromkeys(r.method for r in shared))
    scores = score_methods(model, names, wins, groups, seed=cal.seed, batch_size=cal.batch_size,
                           progress=progress) if names else {}
    pass_seconds = time.perf_counter() - t0
    rows, reports = [], {}
    if evals and dense:
        rows.append({"method": "dense", "grain": "-", "ratio": 0.0, "calib": "-", "ppl": _evaluate(model, evals,
                                                                                                   eval_batch_size)})
    if accuracy is not None and dense:
        if not rows:
            rows.append({"method": "dense", "grain": "-", "ratio": 0.0, "calib": "-"})
        rows[-1]["tasks"] = accuracy(model)
    if rows and log:
        log(f"  dense: {rows[-1].get('ppl', rows[-1].get('tasks'))}")
    for r in bar(recipes, desc="apply + evaluate", enabled=progress, unit="method"):
        pruned = copy.deepcopy(model)
        if r not in shared and log:
            log(f"  {label(r)} {r.ratio:.0%}: calibrated in passes of its own")
        report = prune_model(pruned, r, (wins, groups, {}), scores=scores[r.method] if r in shared else None)
        ratio = r.expert_params if r.expert_params is not None else r.ratio
        row = {"method": label(r), "grain": "+".join(st.grain for st in r.stages), "ratio": ratio,
               "calib": calib_label if any(get_method(st.method).needs_calib for st in r.stages) else "-",
               "kept": "; ".join(get_grain(st["grain"]).summary(st["layers"]) for st in report.stages)
               if report.stages else get_grain(report.grain).summary(report.layers)}
        if report.removed:
            row["removed"] = report.removed["share"]
        if evals:
            row["ppl"] = _evaluate(pruned, evals, eval_batch_size)
        if accuracy is not None:
            row["tasks"] = accuracy(pruned)
        rows.append(row)
        reports[f"{label(r)}@{ratio:g}"] = report.to_dict()
        if log:
            log(f"  {row['method']} {ratio:.0%}: {row.get('ppl', row['kept'])}")
        del pruned
    return CompareResult(rows, scores, pass_seconds, reports)


def markdown(result: CompareResult) -> str:
    """The comparison as a markdown table (perplexity columns when evaluated, then task accuracies)."""
    domains = sorted({d for r in result.rows for d in r.get("ppl", {})})
    tasks = sorted({t for r in result.rows for t in r.get("tasks", {})})
    # the routed-expert weights each row removed, shown when a row has a weight stage (its ratio covers the
    # attention linears too, or is split with an expert stage)
    counted = any("removed" in r and any(get_grain(g).keeps_shapes for g in r["grain"].split("+"))
                  for r in result.rows)
    head = "| method | removed | kept |" + (" expert weights removed |" if counted else "") + "".join(f" {d} |" for d in domains) + (" mean |" if domains else "") + \
        "".join(f" {t} acc |" for t in tasks) + (" mean acc |" if tasks else "")
    lines = [head, "|---|---|---|" + "---|" * (counted + len(domains) + (1 if domains else 0) + len(tasks)
                                                 + (1 if tasks else 0))]
    for r in result.rows:
        vals = [r["ppl"][d] for d in domains] if domains else []
        cells = "".join(f" {v:.2f} |" for v in vals) + (f" {sum(vals) / len(vals):.2f} |" if vals else "")
        accs = [r.get("tasks", {}).get(t) for t in tasks]
        cells += "".join(" - |" if a is None else f" {a:.3f} |" for a in accs)
        if tasks:
            got = [a for a in accs if a is not None]
            cells += f" {sum(got) / len(got):.3f} |" if got else " - |"
        share = (f" {r['removed']:.1%} |" if "removed" in r else " - |") if counted else ""
        lines.append(f"| {r['method']} | {r['ratio']:.0%} | {r.get('kept', '-')} |{share}{cells}")
    return "\n".join(lines)
