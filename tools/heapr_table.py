"""HEAPr on the bundled model: per-domain perplexity vs fraction of atoms removed, and memory.

    python tools/heapr_table.py --out results/heapr.json

Rows: HEAPr global ranking (the paper's form), HEAPr uniform (the HF-exportable form), the per-token
variant, the two same-grain baselines (atom magnitude, activation-only E[h²]·‖down[:,k]‖²), and expert-grain
REAP removing the closest whole-expert count per layer (same routed-expert parameters). Calibration: --nsamples
windows per domain (seqlen 512, mixed); eval: first --eval-windows windows of each domain's eval split.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import time
from pathlib import Path

import torch

import mumoe
from mumoe.apply.atoms import mask_atoms, slice_atoms_uniform
from mumoe.select.atoms import keep_global_atoms, keep_uniform_atoms
from mumoe.apply.experts import remove_experts
from mumoe.criteria import METHODS
from mumoe.criteria.heapr import collect_atom_stats
from mumoe.criteria.stats import collect_stats
from mumoe.eval.perplexity import perplexity_of_windows
from mumoe.loading import DATA
from mumoe.models import moe_adapter_for
from mumoe.observe import tokenize, windows
from mumoe.select import keep_uniform


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("results/heapr.json"))
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.2, 0.25, 0.4, 0.5])
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--eval-windows", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    args = ap.parse_args()

    model, tok = mumoe.load_default()
    domains = sorted(p.name for p in DATA.iterdir() if (p / "eval.txt").exists())
    calib = torch.cat([windows(tokenize(tok, (DATA / d / "calib.txt").read_text("utf-8")), args.seqlen, args.nsamples)
                       for d in domains])
    evals = {d: windows(tokenize(tok, (DATA / d / "eval.txt").read_text("utf-8")), args.seqlen, args.eval_windows)
             for d in domains}

    def evaluate(m) -> dict[str, float]:
        return {d: round(perplexity_of_windows(m, w, batch_size=8, progress=False)["ppl"], 3) for d, w in evals.items()}

    layers = moe_adapter_for(model).moe_layers()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    stats = collect_atom_stats(model, layers, calib, batch_size=4, backward=True)
    t_atoms = time.perf_counter() - t0
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    state_bytes = sum(t.numel() * t.element_size() for st in stats for t in (st.count, st.h2, st.g2, st.hg2))
    E, I, H = layers[0].num_experts, layers[0].intermediate_size, layers[0].hidden_size
    scores = {m: [METHODS[m].from_atoms(l, st) for l, st in zip(layers, stats)]
              for m in ("heapr", "heapr-token", "atom-act", "atom-magnitude")}
    reap = [METHODS["reap"].from_stats(st) for st in collect_stats(model, layers, calib, progress=False)]

    rows = [{"method": "dense", "ratio": 0.0, "removed_expert_params": 0.0, "ppl": evaluate(model)}]
    print(rows[0], flush=True)
    for ratio in args.ratios:
        variants = [("heapr", "global"), ("heapr", "uniform"), ("heapr-token", "global"), ("atom-act", "global"),
                    ("atom-magnitude", "global")]
        for name, form in variants:
            m = copy.deepcopy(model)
            ls = moe_adapter_for(m).moe_layers()
            if form == "global":
                for l, mask in zip(ls, keep_global_atoms(scores[name], ratio)):
                    mask_atoms(l, mask)
                removed = ratio
            else:
                keeps = [keep_uniform_atoms(s, ratio) for s in scores[name]]
                for l, k in zip(ls, keeps):
                    slice_atoms_uniform(l, k)
                removed = 1 - keeps[0].shape[-1] / I
            rows.append({"method": f"{name} ({form})", "ratio": ratio, "removed_expert_params": round(removed, 4),
                         "ppl": evaluate(m)})
            print(rows[-1], flush=True)
        m = copy.deepcopy(model)
        keep = {l.index: keep_uniform(s, ratio, l.top_k) for l, s in zip(layers, reap)}
        remove_experts(m, keep)
        rows.append({"method": "REAP (whole experts)", "ratio": ratio,
                     "removed_expert_params": round(round(ratio * E) / E, 4), "ppl": evaluate(m)})
        print(rows[-1], flush=True)
    n_moe = len(layers)
    memory = {
        "bundled": {"layers": n_moe, "experts": E, "I": I, "H": H, "heapr_state_MB": round(state_bytes / 2**20, 3),
                    "dxd_fisher_fp64_MB": round(n_moe * E * H * H * 8 / 2**20, 1),
                    "scoring_peak_rss_increase_MB": round((rss1 - rss0) / 1024, 1), "scoring_seconds": round(t_atoms, 1)},
        # extrapolated from the formula: ours = layers·E·I·(3 vectors)·8 B; d×d = layers·E·H²·4 B (fp32)
        "DeepSeekMoE-16B (27 MoE layers, E=64, I=1408, H=2048)": {
            "heapr_state_MB": round(27 * 64 * 1408 * 3 * 8 / 2**20, 1), "dxd_fisher_fp32_GB": round(27 * 64 * 2048**2 * 4 / 2**30, 1)},
        "Qwen3-30B-A3B (48 MoE layers, E=128, I=768, H=2048)": {
            "heapr_state_MB": round(48 * 128 * 768 * 3 * 8 / 2**20, 1), "dxd_fisher_fp32_GB": round(48 * 128 * 2048**2 * 4 / 2**30, 1)},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"seqlen": args.seqlen, "nsamples_per_domain": args.nsamples,
                                    "eval_windows_per_domain": args.eval_windows, "rows": rows, "memory": memory}, indent=1))
    print(f"\n| method | atoms removed | expert params removed | " + " | ".join(domains) + " | mean |")
    print("|---|---|---|" + "---|" * (len(domains) + 1))
    for r in rows:
        mean = sum(r["ppl"].values()) / len(domains)
        print(f"| {r['method']} | {r['ratio']:.0%} | {r['removed_expert_params']:.1%} | "
              + " | ".join(f"{r['ppl'][d]:.2f}" for d in domains) + f" | {mean:.2f} |")
    print(json.dumps(memory, indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
