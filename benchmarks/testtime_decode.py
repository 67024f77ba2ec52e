"""μ-MoE column structure: decode speed vs dense, and the per-prompt overhead, on a dense model of realistic width.

    python benchmarks/testtime_decode.py

Synthetic Llama (random weights, fp32): hidden 2048, intermediate 5632, 4 layers, 16 heads, vocab 8192. A
512-token prompt is prefilled densely; then --new tokens are decoded one at a time at batch 1 from the
prompt's KV cache, dense and with the column-compacted weights at each rho (medians of --repeats).
Overhead = statistics (prefill with hooks − plain prefill) + mask selection + compaction, as a fraction of
the plain prefill; the weights' column norms do not depend on the prompt and are computed once per model
(reported separately). Writes benchmarks/results/testtime_decode.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mumoe.testtime.compact import compact, uncompact
from mumoe.testtime.masks import input_norms, masks_from_norms


@torch.no_grad()
def decode_tps(model, prompt: torch.Tensor, new: int) -> float:
    cache = model(prompt, use_cache=True).past_key_values
    nxt = prompt[:, -1:]
    t0 = time.perf_counter()
    for _ in range(new):
        out = model(nxt, past_key_values=cache, use_cache=True)
        cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    return new / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rhos", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=args.layers, num_attention_heads=16,
                      num_key_value_heads=16, vocab_size=8192, max_position_embeddings=2048)
    model = LlamaForCausalLM(cfg).eval()
    prompt = torch.randint(0, 8192, (1, args.prompt_len))
    with torch.no_grad():
        plain = statistics.median(_timed(lambda: model(prompt, use_cache=True)) for _ in range(args.repeats))
        with_hooks = statistics.median(_timed(lambda: input_norms(model, prompt, return_cache=True))
                                       for _ in range(args.repeats))
    norms, _ = input_norms(model, prompt, return_cache=True)
    dense = statistics.median(decode_tps(model, prompt, args.new) for _ in range(args.repeats))
    t0 = time.perf_counter()
    masks_from_norms(model, norms, 0.5, "column")  # once per model: ‖W[:, j]‖ are cached (prompt-independent)
    t_static = time.perf_counter() - t0
    rows = {"dense": {"tokens_per_s": round(dense, 2)}}
    for rho in args.rhos:
        t0 = time.perf_counter()
        masks = masks_from_norms(model, norms, rho, "column")
        t_select = time.perf_counter() - t0
        t0 = time.perf_counter()
        undo = compact(model, masks)
        t_compact = time.perf_counter() - t0
        tps = statistics.median(decode_tps(model, prompt, args.new) for _ in range(args.repeats))
        uncompact(undo)
        stats_s = max(0.0, with_hooks - plain)
        rows[f"column rho={rho}"] = {
            "tokens_per_s": round(tps, 2), "speedup_vs_dense": round(tps / dense, 3),
            "statistics_s": round(stats_s, 4), "selection_s": round(t_select, 4), "compaction_s": round(t_compact, 4),
            "overhead_fraction_of_prefill": round((stats_s + t_select + t_compact) / plain, 4)}
        print(rho, rows[f"column rho={rho}"], flush=True)
    res = {"model": "llama hidden 2048 / intermediate 5632", "layers": args.layers, "prompt_len": args.prompt_len,
           "new_tokens": args.new, "threads": torch.get_num_threads(), "plain_prefill_s": round(plain, 4),
           "once_per_model_column_norms_s": round(t_static, 4), "rows": rows}
    out = Path(__file__).parent / "results" / "testtime_decode.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))
    print("\n| decode (batch 1) | tokens/s | vs dense | per-prompt overhead / prefill |")
    print("|---|---|---|---|")
    print(f"| dense | {dense:.1f} | 1.00 | – |")
    for k, v in rows.items():
        if k != "dense":
            print(f"| {k} | {v['tokens_per_s']:.1f} | {v['speedup_vs_dense']:.2f} | {v['overhead_fraction_of_prefill']:.1%} |")


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
