"""μ-MoE column structure: decode speed vs dense, and the per-prompt overhead, on a dense model of realistic width.

    python benchmarks/testtime_decode.py                   # KV cache grown in place, as mumoe's generate does
    python benchmarks/testtime_decode.py --cache dynamic   # HF's DynamicCache as is (torch.cat per token)
    python benchmarks/testtime_decode.py --cache static    # HF's StaticCache

Synthetic Llama (random weights, fp32): hidden 2048, intermediate 5632, 4 layers, 16 heads, vocab 8192. A
512-token prompt is prefilled densely; then --new tokens are decoded one at a time at batch 1 from the
prompt's KV cache, dense and with the column-compacted weights at each rho (medians of --repeats).
Overhead = statistics (time spent inside the hooks during the prefill, measured directly; the paired
difference hooked − plain prefill is reported too, but its noise is of the same size) + mask selection +
compaction, as a fraction of the plain prefill (compaction: median over --repeats prompts, which reuse the
buffers of the first; the first prompt's cost, which allocates them, is reported as well). Two things do not depend on the prompt and are done once per model (reported
separately): the weights' column norms, and `prepare_columns` (weights stored column-major, values
unchanged). Dense decoding is measured in both layouts; speedups are against the faster one.
Writes benchmarks/results/testtime_decode_<cache>.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, StaticCache

from mumoe.testtime.compact import compact, prepare_columns, uncompact
from mumoe.testtime.kvcache import grow_in_place
from mumoe.testtime.masks import input_norms, masks_from_norms


@torch.no_grad()
def decode_step_times(model, prompt: torch.Tensor, new: int, cache_kind: str) -> list[float]:
    """Seconds per decoded token (batch 1) after a prefill of `prompt`, greedy, from the prompt's KV cache."""
    cache = StaticCache(config=model.config, max_cache_len=prompt.shape[1] + new + 1) if cache_kind == "static" else None
    out = model(prompt, past_key_values=cache, use_cache=True)
    cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    if cache_kind == "growing":
        grow_in_place(cache)
    times = []
    for _ in range(new):
        t0 = time.perf_counter()
        out = model(nxt, past_key_values=cache, use_cache=True)
        cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=0, help="grouped-query attention: KV heads (0: as --heads)")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rhos", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    ap.add_argument("--cache", choices=["growing", "dynamic", "static"], default="growing",
                    help="KV cache for decoding: growing = HF's DynamicCache with mumoe's GrowingLayer (appends in "
                         "place; what mumoe.testtime.generate uses), dynamic = HF's DynamicCache as is (torch.cat "
                         "of the whole cache per token), static = HF's StaticCache (preallocated, full-length "
                         "attention with a mask)")
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=args.layers,
                      num_attention_heads=args.heads, num_key_value_heads=args.kv_heads or args.heads,
                      vocab_size=args.vocab, max_position_embeddings=2048)
    model = LlamaForCausalLM(cfg).eval()  # row-major weights, as loaded
    prompt = torch.randint(0, args.vocab, (1, args.prompt_len))
    plains, hooked, in_hooks = [], [], []
    with torch.no_grad():
        for _ in range(args.repeats + 2):  # alternated, so that drifts hit both alike
            plains.append(_timed(lambda: model(prompt, use_cache=True)))
            timing = {}
            hooked.append(_timed(lambda: input_norms(model, prompt, return_cache=True, timing=timing)))
            in_hooks.append(timing["hooks_s"])
    plain, with_hooks = statistics.median(plains), statistics.median(hooked)
    stats_s = statistics.median(in_hooks)  # time spent inside the statistics hooks, measured directly
    stats_paired = statistics.median(h - p for h, p in zip(hooked, plains))  # the same, as a noisy difference
    norms, _ = input_norms(model, prompt, return_cache=True)
    t0 = time.perf_counter()
    masks_from_norms(model, norms, 0.5, "column")  # once per model: ‖W[:, j]‖ are cached (prompt-independent)
    t_static = time.perf_counter() - t0
    col_model = copy.deepcopy(model)
    t0 = time.perf_counter()
    prepare_columns(col_model)  # once per model: column-major storage, same values
    t_prepare = time.perf_counter() - t0

    # every configuration is decoded once per round, rounds interleaved, so that drifts hit all alike;
    # tokens/s = 1 / median seconds per token over all rounds
    steps = {"dense (row-major weights, as loaded)": [], "dense (column-major weights)": []}
    steps.update({f"column rho={rho}": [] for rho in args.rhos})
    selects = {rho: [] for rho in args.rhos}
    compacts = {rho: [] for rho in args.rhos}
    for _ in range(args.repeats):
        steps["dense (row-major weights, as loaded)"] += decode_step_times(model, prompt, args.new, args.cache)
        steps["dense (column-major weights)"] += decode_step_times(col_model, prompt, args.new, args.cache)
        for rho in args.rhos:
            t0 = time.perf_counter()
            masks = masks_from_norms(col_model, norms, rho, "column")
            selects[rho].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            undo = compact(col_model, masks)
            compacts[rho].append(time.perf_counter() - t0)
            steps[f"column rho={rho}"] += decode_step_times(col_model, prompt, args.new, args.cache)
            uncompact(undo)
    tps = {k: 1 / statistics.median(v) for k, v in steps.items()}
    dense = max(tps["dense (row-major weights, as loaded)"], tps["dense (column-major weights)"])
    rows = {}
    for k, v in tps.items():
        rows[k] = {"tokens_per_s": round(v, 2), "speedup_vs_dense": round(v / dense, 3)}
    for rho in args.rhos:
        t_select, t_compact = statistics.median(selects[rho]), statistics.median(compacts[rho])
        rows[f"column rho={rho}"].update({
            "statistics_s": round(stats_s, 4), "selection_s": round(t_select, 4), "compaction_s": round(t_compact, 4),
            "compaction_first_prompt_s": round(compacts[rho][0], 4),  # allocates the buffers: page faults
            "overhead_fraction_of_prefill": round((stats_s + t_select + t_compact) / plain, 4)})
    res = {"model": "llama hidden 2048 / intermediate 5632", "layers": args.layers, "heads": args.heads,
           "kv_heads": cfg.num_key_value_heads, "vocab": args.vocab, "prompt_len": args.prompt_len,
           "new_tokens": args.new, "repeats": args.repeats, "cache": args.cache, "threads": torch.get_num_threads(),
           "plain_prefill_s": round(plain, 4), "prefill_with_statistics_hooks_s": round(with_hooks, 4),
           "statistics_paired_difference_s": round(stats_paired, 4),
           "once_per_model_column_norms_s": round(t_static, 4), "once_per_model_prepare_columns_s": round(t_prepare, 4),
           "rows": rows}
    tag = "" if (args.layers, args.heads, args.kv_heads, args.vocab) == (4, 16, 0, 8192) else f"_{args.layers}layers"
    out = Path(__file__).parent / "results" / f"testtime_decode_{args.cache}{tag}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))
    print(f"\n| decode (batch 1, {args.cache} KV cache) | tokens/s | vs dense | per-prompt overhead / prefill |")
    print("|---|---|---|---|")
    for k, v in rows.items():
        if k.startswith("dense"):
            print(f"| {k} | {v['tokens_per_s']:.1f} | {v['speedup_vs_dense']:.2f} | – |")
        else:
            print(f"| {k} | {v['tokens_per_s']:.1f} | {v['speedup_vs_dense']:.2f} | {v['overhead_fraction_of_prefill']:.1%} |")


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
