"""Compare every expert criterion on the bundled model: per-domain eval perplexity after pruning.

    python tools/compare_criteria.py --out results/expert_criteria.json

Calibration: `mixed` = --nsamples windows from each domain's calib split (seqlen 512), and each single domain
(--nsamples windows of that domain) for the calibrated criteria. One observation pass per calibration set
feeds every criterion (one-shot scoring); uniform per-layer budget; --ratios of experts removed per layer.
Evaluation: the first --eval-windows windows (seqlen 512) of each domain's eval split, paper-exact ppl.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

import mumoe
from mumoe.apply.experts import remove_experts
from mumoe.criteria import METHODS, random_scores
from mumoe.criteria.stats import collect_stats
from mumoe.eval.perplexity import perplexity_of_windows
from mumoe.loading import DATA
from mumoe.models import moe_adapter_for
from mumoe.observe import tokenize, windows
from mumoe.select import keep_uniform


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
    calib = {d: windows(tokenize(tok, (DATA / d / "calib.txt").read_text("utf-8")), args.seqlen, args.nsamples)
             for d in domains}
    calib["mixed"] = torch.cat([calib[d] for d in domains])
    evals = {d: windows(tokenize(tok, (DATA / d / "eval.txt").read_text("utf-8")), args.seqlen, args.eval_windows)
             for d in domains}

    def evaluate(m) -> dict[str, float]:
        return {d: round(perplexity_of_windows(m, w, batch_size=8, progress=False)["ppl"], 3) for d, w in evals.items()}

    layers = moe_adapter_for(model).moe_layers()
    rows = [{"method": "dense", "calib": "-", "ratio": 0.0, "ppl": evaluate(model)}]
    print(rows[0], flush=True)
    scores: dict[tuple[str, str], list[torch.Tensor]] = {
        ("random", "-"): random_scores(layers, 0),
        ("aimer", "-"): [METHODS["aimer"].from_weights(layer) for layer in layers],
    }
    timing = {}
    for cal in ["mixed"] + domains:
        t0 = time.perf_counter()
        stats = collect_stats(model, layers, calib[cal], batch_size=8, experts=True, progress=False)
        timing[cal] = round(time.perf_counter() - t0, 2)
        for name, m in METHODS.items():
            if m.from_stats is not None:
                scores[(name, cal)] = [m.from_stats(st) for st in stats]
    for (name, cal), sc in scores.items():
        for ratio in args.ratios:
            pruned = copy.deepcopy(model)
            keep = {layer.index: keep_uniform(s, ratio, layer.top_k, prune_highest=METHODS[name].prune_highest)
                    for layer, s in zip(layers, sc)}
            remove_experts(pruned, keep)
            row = {"method": name, "calib": cal, "ratio": ratio, "ppl": evaluate(pruned)}
            rows.append(row)
            print(row, flush=True)
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
