"""Compare every expert criterion on the bundled model: per-domain eval perplexity after pruning.

    python tools/compare_criteria.py --out results/expert_criteria.json

Calibration: `mixed` = --nsamples windows from each domain's calib split (seqlen 512; one calibration source
per domain, so EASY-EP normalizes each domain's scores and averages them), and each single domain (--nsamples
windows of that domain) for the calibrated criteria. One observation pass per calibration set feeds every
criterion (`mumoe.eval.compare`, one-shot scoring); uniform per-layer budget; --ratios of experts removed.
Evaluation: the first --eval-windows windows (seqlen 512) of each domain's eval split, paper-exact ppl.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import mumoe
from mumoe.api import calibration
from mumoe.criteria import METHODS
from mumoe.eval.compare import compare
from mumoe.loading import DATA
from mumoe.observe import tokenize, windows
from mumoe.recipe import Recipe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("results/expert_criteria.json"))
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5])
    ap.add_argument("--nsamples", type=int, default=16, help="calibration windows per domain")
    ap.add_argument("--eval-windows", type=int, default=32, help="eval windows per domain")
    ap.add_argument("--seqlen", type=int, default=512)
    args = ap.parse_args()

    model, tok = mumoe.load_default()
    domains = sorted(p.name for p in DATA.iterdir() if (p / "eval.txt").exists())
    evals = {d: windows(tokenize(tok, (DATA / d / "eval.txt").read_text("utf-8")), args.seqlen, args.eval_windows)
             for d in domains}
    calibrated = [name for name, m in METHODS.items() if m.from_stats is not None]
    rows, timing = [], {}
    # data-free criteria (no calibration pass), then each calibration set: one pass feeds every criterion
    sets = [("-", None, ["random", "aimer"])] + [("mixed", ["domain"], calibrated)] + [
        (d, [f"domain:{d}"], calibrated) for d in domains]
    for label, sources, names in sets:
        n = args.nsamples * (len(domains) if sources == ["domain"] else 1)
        recipes = [Recipe.build(name, r, calib=sources, nsamples=n, seqlen=args.seqlen) for name in names
                   for r in args.ratios]
        wins, groups, _ = calibration(recipes[0], None, tok)
        t0 = time.perf_counter()
        res = compare(model, recipes, wins, groups, evals, calib_label=label, dense=not rows)
        if sources:
            timing[label] = round(res.pass_seconds, 2)
        for row in res.rows:
            row = {"method": row["method"], "calib": row["calib"], "ratio": row["ratio"], "ppl": row["ppl"]}
            rows.append(row)
            print(row, flush=True)
        print(f"  [{label}] one pass {res.pass_seconds:.1f}s, all {time.perf_counter() - t0:.1f}s", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"seqlen": args.seqlen, "nsamples_per_domain": args.nsamples,
                                    "eval_windows_per_domain": args.eval_windows, "calibration_seconds": timing,
                                    "rows": rows}, indent=1))
    print(f"\n| method | calibration | removed | " + " | ".join(domains) + " | mean |")
    print("|---|---|---|" + "---|" * (len(domains) + 1))
    for r in rows:
        mean = sum(r["ppl"].values()) / len(domains)
        print(f"| {r['method']} | {r['calib']} | {r['ratio']:.0%} | " + " | ".join(f"{r['ppl'][d]:.2f}" for d in domains)
              + f" | {mean:.2f} |")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
