"""`mumoe demo`: the tour on the bundled model — dense, expert pruning at 25/50/75% (AIMER, frequency, REAP,
PEU), HEAPr at 10/25/50% of atoms, μ-MoE vs offline Wanda under domain shift at ρ = 0.5, TAER matching — written to a
folder as JSON, a markdown report and plots."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from ..apply.export import atomic_output
from ..loading import DATA, load_default
from ..models import moe_adapter_for
from ..observe import tokenize, windows
from ..recipe import Recipe
from ..progress import bar
from .compare import compare, label
from .perplexity import perplexity_of_windows
from .report import markdown_table, write_report

EXPERT_METHODS = ("aimer", "frequency", "reap", "peu")
EXPERT_RATIOS = (0.25, 0.5, 0.75)  # of the 16 experts per layer: 4, 8, 12 dropped (4 >= top_k = 2 left)
ATOM_RATIOS = (0.1, 0.25, 0.5)
SHIFT = {"prose": "code", "code": "prose", "docs": "kernel", "kernel": "docs"}  # Wanda calibrated on the other


def run_demo(out: str | Path = "mumoe-demo", eval_windows: int = 8, calib_windows: int = 8, seqlen: int = 512,
             log=print) -> dict:
    t_start = time.perf_counter()
    model, tok = load_default()
    domains = sorted(p.parent.name for p in DATA.glob("*/eval.txt"))
    eval_ids = {d: tokenize(tok, (DATA / d / "eval.txt").read_text("utf-8")) for d in domains}
    evals = {d: windows(ids, seqlen, eval_windows) for d, ids in eval_ids.items()}
    calib = torch.cat([windows(tokenize(tok, (DATA / d / "calib.txt").read_text("utf-8")), seqlen, calib_windows)
                       for d in domains])
    log(f"mumoe demo on the bundled model: {len(domains)} domains x {eval_windows} eval windows of {seqlen} tokens, "
        f"calibration {len(calib)} windows (mixed)")
    timings: dict[str, float] = {}

    def evaluate(m, name: str) -> dict[str, float]:
        return {d: round(perplexity_of_windows(m, w, batch_size=8, progress=False)["ppl"], 3)
                for d, w in bar(evals.items(), desc=f"eval {name}", leave=False)}

    t0 = time.perf_counter()
    rows = [{"method": "dense", "grain": "-", "ratio": 0.0, "ppl": evaluate(model, "dense")}]
    timings["dense eval"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    layers = moe_adapter_for(model).moe_layers()
    # every expert criterion at each expert ratio, HEAPr (the paper's global ranking) at each atom ratio: the
    # statistics of ONE calibration pass, each recipe applied to a copy and evaluated
    recipes = [Recipe.build(name, ratio, calib="domain", nsamples=len(calib))
               for name in EXPERT_METHODS for ratio in EXPERT_RATIOS]
    recipes += [Recipe.build("heapr", ratio, calib="domain", nsamples=len(calib), form="global", batch_size=8)
                for ratio in ATOM_RATIOS]
    res = compare(model, recipes, calib, None, evals, dense=False, progress=True)
    for row, r in zip(res.rows, recipes):
        rows.append({"method": label(r), "grain": r.grain,
                     "ratio": r.ratio, "ppl": row["ppl"]})
    timings[f"{len(recipes)} pruned models: expert criteria at {'/'.join(f'{x:.0%}' for x in EXPERT_RATIOS)} of "
            f"experts, HEAPr at {'/'.join(f'{x:.0%}' for x in ATOM_RATIOS)} of atoms (one calibration pass)"] = (
        time.perf_counter() - t0)

    per_domain = {d: windows(tokenize(tok, (DATA / d / "calib.txt").read_text("utf-8")), seqlen, calib_windows)
                  for d in domains}
    t0 = time.perf_counter()
    from ..testtime import continuation_perplexity, offline_masks

    testtime = {}
    for d in bar(domains, desc="μ-MoE vs Wanda", leave=False, unit="domain"):
        w = evals[d][:4]
        shifted = offline_masks(model, per_domain[SHIFT[d]], 0.5, "row")
        testtime[d] = {
            "dense": round(continuation_perplexity(model, w, seqlen // 2, masks=None, per_prompt=False)["ppl"], 3),
            f"wanda (calibrated on {SHIFT[d]})": round(continuation_perplexity(
                model, w, seqlen // 2, 0.5, "row", shifted, per_prompt=False)["ppl"], 3),
            "μ-MoE": round(continuation_perplexity(model, w, seqlen // 2, 0.5, "row")["ppl"], 3)}
    timings["μ-MoE vs Wanda (ρ = 0.5)"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    from ..retrieval import build_library, match

    lib = build_library(model, per_domain, keep=layers[0].num_experts // 2, progress=False)
    taer = []
    for d in domains:
        ids = eval_ids[d][eval_windows * seqlen:]  # beyond the windows scored above
        for p in range(3):
            prompt = ids[p * 64:(p + 1) * 64]
            got = match(model, lib, prompt)
            taer.append({"domain": d, "matched": got.task, "distance": round(got.distance, 4),
                         "runner_up": got.runner_up, "prompt": tok.decode(prompt[:16]).replace("\n", " ")})
    timings["TAER library + matching"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start

    acc = sum(t["domain"] == t["matched"] for t in taer) / len(taer)
    taer_md = ["| true domain | matched | L2 | runner-up | prompt starts |", "|---|---|---|---|---|"]
    taer_md += [f"| {t['domain']} | {t['matched']} | {t['distance']:.3f} | {t['runner_up']} | `{t['prompt'][:40]}` |"
                for t in taer]
    tt_md = ["| domain | dense | offline Wanda, other domain's calibration | μ-MoE (per prompt) |", "|---|---|---|---|"]
    tt_md += [f"| {d} | {r['dense']:.2f} | {list(r.values())[1]:.2f} ({SHIFT[d]}) | {r['μ-MoE']:.2f} |"
              for d, r in testtime.items()]
    extra = ("## μ-MoE vs offline Wanda under domain shift (ρ = 0.5, row; 4 windows per domain, prompt "
             f"{seqlen // 2} tokens, continuation perplexity)\n\n" + "\n".join(tt_md)
             + f"\n\n## TAER matching (64-token prompts, first-layer key): {acc:.0%} correct\n\n" + "\n".join(taer_md)
             + "\n\n## Timings (s)\n\n" + "\n".join(f"- {k}: {v:.1f}" for k, v in timings.items()))
    result = {"seqlen": seqlen, "eval_windows_per_domain": eval_windows, "calib_windows": len(calib), "rows": rows,
              "testtime": testtime,
              "taer": {"accuracy": acc, "matches": taer}, "timings_s": timings}
    with atomic_output(out, overwrite=True) as tmp:
        (tmp / "results.json").write_text(json.dumps(result, indent=1))
        write_report(rows, tmp, "mumoe demo: perplexity on the bundled model", extra)
    log("\n" + markdown_table(rows))
    log("\nμ-MoE vs offline Wanda calibrated on another domain (ρ = 0.5, continuation perplexity):")
    for d, r in testtime.items():
        log(f"  {d:7s} " + "  ".join(f"{k} {v:.2f}" for k, v in r.items()))
    log(f"\nTAER matching: {acc:.0%} of {len(taer)} prompts (64 tokens) matched their domain")
    log(f"\nwrote {out}/ (report.md, ppl_vs_ratio.png, results.json) in {timings['total']:.0f}s")
    return result
