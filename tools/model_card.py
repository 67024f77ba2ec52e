"""Measure the bundled model's card figures and write them beside it.

    python tools/model_card.py --model src/mumoe/assets/model --data src/mumoe/assets/data

Per domain (each `data/<domain>/eval.txt`): paper-exact perplexity (seqlen = model context, non-overlapping
windows), the unigram perplexity of the same eval split (its own token frequencies: the best any unigram
model can do on it), and their ratio. Expert usage per domain per layer (share of routing slots), the mean
pairwise Jensen-Shannon divergence (log2, in [0, 1]) between domains per layer, and the smallest expert
share on the mixed eval set. Writes card.json; prints markdown tables for CARD.md.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
from pathlib import Path

import torch

import mumoe
from mumoe.eval.perplexity import perplexity_of_windows
from mumoe.models import moe_adapter_for
from mumoe.observe import MoEObserver, tokenize, windows


def unigram_ppl(ids: torch.Tensor) -> float:
    p = torch.bincount(ids).double()
    p = p[p > 0] / p.sum()
    return math.exp(float(-(p * p.log()).sum()))


def js(p: torch.Tensor, q: torch.Tensor) -> float:
    m = 0.5 * (p + q)

    def kl(a, b):
        mask = a > 0
        return float((a[mask] * (a[mask] / b[mask]).log2()).sum())

    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


@torch.no_grad()
def expert_usage(model, wins: torch.Tensor, batch: int = 8) -> torch.Tensor:
    """Routing-slot counts per MoE layer and expert. -> [layers, E]"""
    layers = moe_adapter_for(model).moe_layers()
    counts = torch.zeros(len(layers), layers[0].num_experts, dtype=torch.float64)
    pos = {layer.index: n for n, layer in enumerate(layers)}

    def on_route(ev):
        counts[pos[ev.layer.index]] += torch.bincount(ev.indices.flatten(), minlength=counts.shape[1]).double()

    with MoEObserver(model, on_route=on_route, layers=layers):
        for i in range(0, len(wins), batch):
            model(input_ids=wins[i : i + batch])
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=None, help="card.json path (default MODEL/card.json)")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    model = mumoe.load(args.model)
    tok = mumoe.load_tokenizer(args.model)
    seqlen = model.config.max_position_embeddings
    card: dict = {"seqlen": seqlen, "domains": {}, "usage": {}}
    domains = sorted(p.name for p in args.data.iterdir() if (p / "eval.txt").exists())
    for d in domains:
        ids = tokenize(tok, (args.data / d / "eval.txt").read_text("utf-8"))
        wins = windows(ids, seqlen)
        res = perplexity_of_windows(model, wins, batch_size=8, desc=d)
        uni = unigram_ppl(ids)
        card["domains"][d] = {"ppl": round(res["ppl"], 4), "unigram_ppl": round(uni, 2),
                              "ratio": round(uni / res["ppl"], 2), "tokens": res["tokens"], "windows": res["windows"]}
        card["usage"][d] = expert_usage(model, wins).tolist()
    usage = {d: torch.tensor(u) for d, u in card["usage"].items()}
    dist = {d: u / u.sum(-1, keepdim=True) for d, u in usage.items()}
    n_layers = next(iter(usage.values())).shape[0]
    card["js_mean_pairwise"] = [
        round(sum(js(dist[a][l], dist[b][l]) for a, b in itertools.combinations(domains, 2))
              / len(list(itertools.combinations(domains, 2))), 4) for l in range(n_layers)]
    mixed = sum(usage.values())
    share = mixed / mixed.sum(-1, keepdim=True)
    card["min_expert_share_mixed"] = [round(float(s.min()), 4) for s in share]
    card["max_expert_share_mixed"] = [round(float(s.max()), 4) for s in share]
    out = args.out or args.model / "card.json"
    out.write_text(json.dumps(card, indent=1))

    print(f"\n| domain | eval ppl (seqlen {seqlen}) | unigram ppl | unigram / model | predicted tokens |")
    print("|---|---|---|---|---|")
    for d, r in card["domains"].items():
        print(f"| {d} | {r['ppl']:.2f} | {r['unigram_ppl']:.1f} | {r['ratio']:.1f}x | {r['tokens']:,} |")
    print("\n| MoE layer | mean pairwise JS divergence between domains (log2) | min expert share (mixed eval) | max expert share |")
    print("|---|---|---|---|")
    for l in range(n_layers):
        print(f"| {l} | {card['js_mean_pairwise'][l]:.3f} | {100 * card['min_expert_share_mixed'][l]:.2f}% | "
              f"{100 * card['max_expert_share_mixed'][l]:.2f}% |")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
