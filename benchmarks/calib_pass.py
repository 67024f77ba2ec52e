"""Calibration pass time vs a plain forward of the same windows, on a synthetic qwen3_moe.

    python benchmarks/calib_pass.py                       # hidden 1024, 64 experts, top-8, 2 layers
    python benchmarks/calib_pass.py --layers 4 --repeats 5

The model is built from a qwen3_moe config with random weights (fp32 by default). Each repeat runs, in turn
on the same windows: a plain forward (the model as transformers runs it, its default experts kernel, no
hooks); mumoe's REAP statistics pass (`observe.run` with the ExpertStats collector: routing + expert outputs
from the routed-token dispatch); the routing-only pass (frequency / TCESS / PEU); and, for reference, the way
mumoe gathered REAP statistics before the runner (a plain forward plus every routed expert recomputed in a
hook). With --heapr, also the forward+backward pass of HEAPr against a plain forward+backward and CAMERA-P's
forward-only atom statistics; with --merge, the
merge grain's statistics passes (HC-SMoE runs every expert on every token: E/top_k times the routed experts'
work, the floor of its ratio). Ratios are
paired per repeat (same minute, same windows); the table gives their medians. Writes
benchmarks/results/calib_pass.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from mumoe.models import moe_adapter_for
from mumoe.observe import ExpertStats, run
from mumoe.observe.collectors import AtomStats, MergeStats


def build(hidden: int, inter: int, experts: int, top_k: int, layers: int, vocab: int, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    cfg = Qwen3MoeConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden,
                         moe_intermediate_size=inter, num_experts=experts, num_experts_per_tok=top_k,
                         num_hidden_layers=layers, num_attention_heads=hidden // 128, num_key_value_heads=4,
                         head_dim=128, max_position_embeddings=4096, norm_topk_prob=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.02)
    return model


def plain(model: nn.Module, windows: torch.Tensor, batch: int, backward: bool = False) -> float:
    t0 = time.perf_counter()
    for i in range(0, len(windows), batch):
        ids = windows[i:i + batch]
        if backward:
            x = model.get_input_embeddings()(ids).detach().requires_grad_(True)
            logits = model(inputs_embeds=x, use_cache=False).logits
            nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum").backward()
        else:
            with torch.no_grad():
                model(input_ids=ids, use_cache=False)
    return time.perf_counter() - t0


def recompute_in_hooks(model: nn.Module, windows: torch.Tensor, batch: int) -> float:
    """The earlier way: the model's own forward, plus each routed expert recomputed in a hook for its norms."""
    layers = moe_adapter_for(model).moe_layers()
    route = {}
    handles = [l.router.register_forward_hook(lambda m, a, o, i=l.index: route.__setitem__(i, (a[0], o[1], o[2])))
               for l in layers]
    sums = {l.index: torch.zeros(l.num_experts, dtype=torch.float64) for l in layers}

    def hook(layer):
        def fn(module, args, output):
            x, w, idx = route.pop(layer.index)
            x = x.reshape(-1, x.shape[-1])
            for e in torch.unique(idx).tolist():
                tok, slot = torch.where(idx == e)
                y = layer.expert_forward(e, x[tok])
                sums[layer.index][e] += (w[tok, slot].double() * y.double().norm(dim=-1)).sum()
        return fn

    handles += [l.experts.register_forward_hook(hook(l)) for l in layers]
    try:
        return plain(model, windows, batch)
    finally:
        for h in handles:
            h.remove()


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--inter", type=int, default=384, help="expert width (moe_intermediate_size)")
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--heapr", action="store_true", help="also time HEAPr's forward+backward pass and CAMERA-P's "
                    "forward-only atom statistics")
    ap.add_argument("--merge", action="store_true", help="also time the merge statistics: HC-SMoE (every expert on "
                    "every token), Sub-MoE (+ pairwise output cosines), M-SMoE and DERN (routing and logit Gram "
                    "only), REAM (gated outputs, saliency, activation sample)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/calib_pass.json"))
    args = ap.parse_args()

    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    model = build(args.hidden, args.inter, args.experts, args.top_k, args.layers, args.vocab, dtype)
    layers = moe_adapter_for(model).moe_layers()
    windows = torch.randint(0, args.vocab, (args.windows, args.seqlen), generator=torch.Generator().manual_seed(1))
    params = sum(p.numel() for p in model.parameters())
    print(f"synthetic qwen3_moe: hidden {args.hidden}, {args.experts} experts (width {args.inter}), top-{args.top_k}, "
          f"{args.layers} layers, {params / 1e6:.0f}M params {args.dtype}; {args.windows} windows x {args.seqlen} "
          f"tokens, batch {args.batch}; torch threads {torch.get_num_threads()}")
    plain(model, windows[: args.batch], args.batch)  # warm-up
    run(model, windows[: args.batch], [ExpertStats(layers)], batch_size=args.batch)
    rows: dict[str, list[float]] = {k: [] for k in ("plain", "reap", "routing", "recompute", "plain_fb", "heapr",
                                                    "camera", "hc_smoe", "sub_moe", "m_smoe", "ream")}
    for rep in range(args.repeats):
        rows["plain"].append(plain(model, windows, args.batch))
        rows["reap"].append(timed(lambda: run(model, windows, [ExpertStats(layers)], batch_size=args.batch)))
        rows["routing"].append(timed(lambda: run(model, windows, [ExpertStats(layers, experts=False)],
                                                 batch_size=args.batch)))
        rows["recompute"].append(recompute_in_hooks(model, windows, args.batch))
        if args.heapr:
            rows["plain_fb"].append(plain(model, windows, args.batch, backward=True))
            rows["heapr"].append(timed(lambda: run(model, windows, [AtomStats(layers)], batch_size=args.batch)))
            rows["camera"].append(timed(lambda: run(model, windows, [AtomStats(layers, backward=False, gated=True)],
                                                    batch_size=args.batch)))
        if args.merge:
            for key, kw in (("hc_smoe", {}), ("sub_moe", {"outputs": False, "pairwise": True}),
                            ("m_smoe", {"outputs": False}), ("ream", {"outputs": False, "ream": True})):
                rows[key].append(timed(lambda: run(model, windows, [MergeStats(layers, **kw)], batch_size=args.batch)))
        print(f"  repeat {rep + 1}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in rows.items() if v))

    def ratio(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(rows[a], rows[b]))

    result = {"machine": f"{platform.machine()}, {torch.get_num_threads()} threads", "torch": torch.__version__,
              "config": vars(args) | {"out": str(args.out)}, "params": params, "seconds": rows,
              "ratios": {"reap / plain": ratio("reap", "plain"), "routing / plain": ratio("routing", "plain"),
                         "recompute-in-hooks / plain": ratio("recompute", "plain")}}
    if args.heapr:
        result["ratios"]["heapr / plain forward+backward"] = ratio("heapr", "plain_fb")
        result["ratios"]["camera-p / plain"] = ratio("camera", "plain")
    if args.merge:
        for k in ("hc_smoe", "sub_moe", "m_smoe", "ream"):
            result["ratios"][f"{k} / plain"] = ratio(k, "plain")
    print("\n| pass | median seconds | / plain forward |")
    print("|---|---|---|")
    for k, name in (("plain", "plain forward (transformers, default experts kernel)"),
                    ("reap", "REAP statistics (observe.run, ExpertStats)"),
                    ("routing", "routing statistics only (frequency, TCESS, PEU)"),
                    ("recompute", "earlier way: forward + experts recomputed in hooks")):
        print(f"| {name} | {statistics.median(rows[k]):.2f} | {ratio(k, 'plain'):.2f} |")
    if args.heapr:
        print(f"| plain forward + backward | {statistics.median(rows['plain_fb']):.2f} | – |")
        print(f"| HEAPr statistics (forward + backward) | {statistics.median(rows['heapr']):.2f} | "
              f"{ratio('heapr', 'plain_fb'):.2f} of plain forward + backward |")
        print(f"| CAMERA-P statistics (forward only: Σ and max of (g·h)² per neuron) | "
              f"{statistics.median(rows['camera']):.2f} | {ratio('camera', 'plain'):.2f} |")
    if args.merge:
        for k, name in (("hc_smoe", f"HC-SMoE statistics: all {args.experts} experts on every token (MergeStats)"),
                        ("sub_moe", "Sub-MoE statistics: + pairwise output cosines"),
                        ("m_smoe", "M-SMoE (and DERN) statistics: routing counts + router-logit Gram"),
                        ("ream", "REAM statistics: gated outputs of every expert, saliency, activation sample")):
            print(f"| {name} | {statistics.median(rows[k]):.2f} | {ratio(k, 'plain'):.2f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
