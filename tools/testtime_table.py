"""μ-MoE vs offline Wanda on the bundled model, per domain, under domain shift.

    python tools/testtime_table.py --out results/testtime.json

Protocol (mumoe.testtime.continuation_perplexity): windows of 512 tokens from each domain's eval split,
prompt = first 256 tokens (dense prefill, statistics, KV cache), continuation scored by the pruned model.
Methods on the same tokens: dense; offline Wanda calibrated on the same domain's calib split; offline Wanda
calibrated on another domain (domain shift: prose<->code, docs<->kernel); μ-MoE (masks from each prompt).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import mumoe
from mumoe.loading import DATA
from mumoe.observe import tokenize, windows
from mumoe.testtime import continuation_perplexity, offline_masks

SHIFT = {"prose": "code", "code": "prose", "docs": "kernel", "kernel": "docs"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("results/testtime.json"))
    ap.add_argument("--rhos", type=float, nargs="+", default=[0.3, 0.4, 0.5, 0.6, 0.7])
    ap.add_argument("--structures", nargs="+", default=["row", "column"])
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--calib-windows", type=int, default=16)
    args = ap.parse_args()

    model, tok = mumoe.load_default()
    domains = sorted(p.parent.name for p in DATA.glob("*/eval.txt"))
    wins = {d: windows(tokenize(tok, (DATA / d / "eval.txt").read_text("utf-8")), 512, args.windows) for d in domains}
    calib = {d: windows(tokenize(tok, (DATA / d / "calib.txt").read_text("utf-8")), 512, args.calib_windows)
             for d in domains}
    dense = {d: continuation_perplexity(model, w, 256, masks=None, per_prompt=False)["ppl"] for d, w in wins.items()}
    rows = []
    for structure in args.structures:
        for rho in args.rhos:
            masks = {d: offline_masks(model, calib[d], rho, structure) for d in domains}
            for d in domains:
                r = {"structure": structure, "rho": rho, "domain": d, "dense": round(dense[d], 3),
                     "wanda_same": round(continuation_perplexity(model, wins[d], 256, rho, structure, masks[d],
                                                                 per_prompt=False)["ppl"], 3),
                     "wanda_shift": round(continuation_perplexity(model, wins[d], 256, rho, structure,
                                                                  masks[SHIFT[d]], per_prompt=False)["ppl"], 3),
                     "mu_moe": round(continuation_perplexity(model, wins[d], 256, rho, structure)["ppl"], 3)}
                rows.append(r)
                print(r, flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"windows_per_domain": args.windows, "prompt_len": 256, "seqlen": 512,
                                    "shift": SHIFT, "table": rows}, indent=1))
    print("\n| structure | ρ | domain | dense | Wanda same domain | Wanda shifted (calib) | μ-MoE | μ-MoE < shifted Wanda |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['structure']} | {r['rho']} | {r['domain']} | {r['dense']:.2f} | {r['wanda_same']:.2f} | "
              f"{r['wanda_shift']:.2f} ({SHIFT[r['domain']]}) | {r['mu_moe']:.2f} | "
              f"{'yes' if r['mu_moe'] < r['wanda_shift'] else 'no'} |")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
