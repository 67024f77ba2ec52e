"""TAER on the bundled model: matching accuracy, confusion matrix, and perplexity of retrieved patterns.

    python tools/taer_eval.py --out results/taer.json

Library: one entry per domain, built on that domain's calib split (--nsamples windows of 512 tokens), plus a
`mixed` entry on all domains together (used only as the mixed-pattern baseline, never matched).
Matching: held-out prompts = consecutive chunks of 32 / 64 / 128 tokens of each domain's eval split
(--prompts per domain), each run on its own; keys from the first MoE layer and from all MoE layers, for the
paper's key (mean TCESS vector, plain L2) and mumoe's default (mean router logits, whitened L2), plus
routing probabilities (whitened).
Perplexity: each of the first --eval-windows eval windows (512 tokens) is matched on its first 64 tokens
(default key) and scored whole by the retrieved task's model; dense, oracle (true domain's pattern) and
mixed pattern on the same windows. M = 50% and 25% of the experts.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch

import mumoe
from mumoe.apply.experts import remove_experts
from mumoe.eval.perplexity import window_nll
from mumoe.loading import DATA
from mumoe.observe import tokenize, windows
from mumoe.retrieval import build_library, match

KEYS = {"paper (tcess, raw L2)": ("tcess", "raw"), "default (logit, whitened)": ("logit", "whitened"),
        "prob, whitened": ("prob", "whitened")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("results/taer.json"))
    ap.add_argument("--nsamples", type=int, default=64, help="calibration windows per task (as `taer build`)")
    ap.add_argument("--prompts", type=int, default=40)
    ap.add_argument("--eval-windows", type=int, default=24)
    args = ap.parse_args()

    model, tok = mumoe.load_default()
    E = model.config.num_experts
    domains = sorted(p.name for p in DATA.iterdir() if (p / "eval.txt").exists())
    calib = {d: windows(tokenize(tok, (DATA / d / "calib.txt").read_text("utf-8")), 512, args.nsamples) for d in domains}
    eval_ids = {d: tokenize(tok, (DATA / d / "eval.txt").read_text("utf-8")) for d in domains}
    res: dict = {"accuracy": {}, "confusion_64": {}, "ppl": {}}

    for label, (stat, space) in KEYS.items():
        for key_mode in ("first", "all"):
            lib = build_library(model, calib, keep=E // 2, key_mode=key_mode, key_stat=stat, key_space=space,
                                progress=False)
            for n in (32, 64, 128):
                conf = {d: {e: 0 for e in domains} for d in domains}
                for d in domains:
                    ids = eval_ids[d]
                    for p in range(min(args.prompts, ids.numel() // n)):
                        conf[d][match(model, lib, ids[p * n:(p + 1) * n]).task] += 1
                correct = sum(conf[d][d] for d in domains)
                total = sum(sum(row.values()) for row in conf.values())
                res["accuracy"][f"{label}|{key_mode}|{n}"] = {
                    "overall": round(correct / total, 4), **{d: round(conf[d][d] / sum(conf[d].values()), 4) for d in domains}}
                if n == 64:
                    res["confusion_64"][f"{label}|{key_mode}"] = conf
                print(label, key_mode, n, res["accuracy"][f"{label}|{key_mode}|{n}"], flush=True)

    matcher = build_library(model, calib, keep=E // 2, progress=False)  # the default key, first layer
    for keep in (E // 2, E // 4):
        lib = build_library(model, {**calib, "mixed": torch.cat(list(calib.values()))}, keep=keep, progress=False)
        pruned = {}
        for name, task in lib.tasks.items():
            pruned[name] = copy.deepcopy(model)
            remove_experts(pruned[name], task["kept"])
        table = {}
        for d in domains:
            wins = windows(eval_ids[d], 512, args.eval_windows)
            acc = {"dense": [0.0, 0], "retrieved": [0.0, 0], "oracle": [0.0, 0], "mixed": [0.0, 0]}
            for w in wins:
                chosen = match(model, matcher, w[:64]).task
                for label, m in (("dense", model), ("retrieved", pruned[chosen]), ("oracle", pruned[d]),
                                 ("mixed", pruned["mixed"])):
                    nll, cnt = window_nll(m, w[None])
                    acc[label][0] += nll
                    acc[label][1] += cnt
            table[d] = {k: round(float(torch.tensor(v[0] / v[1]).exp()), 3) for k, v in acc.items()}
            print(keep, d, table[d], flush=True)
        res["ppl"][f"M={keep}/{E}"] = table
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1))

    print("\n| key | layers | prompt tokens | overall | " + " | ".join(domains) + " |")
    print("|---|---|---|---|" + "---|" * len(domains))
    for k, v in res["accuracy"].items():
        label, mode, n = k.split("|")
        print(f"| {label} | {mode} | {n} | {v['overall']:.1%} | " + " | ".join(f"{v[d]:.0%}" for d in domains) + " |")
    for name in ("default (logit, whitened)|first", "paper (tcess, raw L2)|first"):
        print(f"\nconfusion at 64 tokens, {name.replace('|', ', ')} layer key (rows: true domain, columns: matched task)\n")
        print("| true \\ matched | " + " | ".join(domains) + " |")
        print("|---|" + "---|" * len(domains))
        for d in domains:
            print(f"| {d} | " + " | ".join(str(res["confusion_64"][name][d][e]) for e in domains) + " |")
    for m, table in res["ppl"].items():
        print(f"\nperplexity, {m} experts kept (eval windows of 512 tokens, matched on their first 64)\n")
        print("| domain | dense | retrieved | oracle | mixed pattern |")
        print("|---|---|---|---|---|")
        for d in domains:
            t = table[d]
            print(f"| {d} | {t['dense']:.2f} | {t['retrieved']:.2f} | {t['oracle']:.2f} | {t['mixed']:.2f} |")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
