"""μ-MoE column structure: decode speed vs dense, and the per-prompt overhead, on a dense model of realistic width.

    python benchmarks/testtime_decode.py                   # KV cache grown in place, as mumoe's generate does
    python benchmarks/testtime_decode.py --cache dynamic   # HF's DynamicCache as is (torch.cat per token)
    python benchmarks/testtime_decode.py --layers 22 --heads 32 --kv-heads 4 --vocab 32000   # TinyLlama-1.1B shape

Synthetic Llama (random weights, fp32): hidden 2048, intermediate 5632, 4 layers, 16 heads, vocab 8192 by
default. A 512-token prompt is prefilled densely; then --new tokens are decoded one at a time at batch 1 from
the prompt's KV cache, greedy, by every configuration in turn, token by token: dense, and the column-compacted
model at one ρ (switched with `Compaction.use`, no re-gathering), so that the machine's drifts (large on a
shared VM) hit both alike. Speedup = median over decoded tokens of the paired ratio dense / compacted time;
tokens/s = 1 / median time per token. --all-rows adds the compaction that keeps every MLP row (no skipping of
the rows the masked down projection never reads), alternated in the same way.

Overhead = statistics (time spent inside the hooks during the prefill, measured directly; the paired
difference hooked − plain prefill is reported too, but its noise is of the same size) + mask selection +
compaction, as a fraction of the plain prefill (compaction: median over the prompts after the first, which
reuse its buffers; the first prompt's cost, which allocates them, is reported separately). Two things do not
depend on the prompt and are done once per model (reported separately): the weights' column norms, and
`prepare_columns` (weights stored column-major, values unchanged). Dense decoding is compared in both
layouts first (row-major as loaded vs column-major, paired the same way); speedups are against the faster
one. Only one copy of the model is held during the ρ comparisons.
Writes benchmarks/results/testtime_decode_<cache>[_<N>layers].json.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, StaticCache

from mumoe.apply.compact import compact, prepare_columns, uncompact
from mumoe.testtime.kvcache import grow_in_place
from mumoe.observe.collectors import input_norms
from mumoe.select.weights import masks_from_norms


@torch.no_grad()
def alternate(configs: dict, prompt: torch.Tensor, new: int, repeats: int, cache_kind: str) -> dict[str, list[float]]:
    """Seconds per decoded token (batch 1) of each configuration, decoding token by token in turn.
    configs: name -> (model, switch) where switch() makes the model run that configuration. Per repeat, one
    configuration prefills `prompt` densely, as in μ-MoE, for its own cache."""
    times: dict[str, list[float]] = {name: [] for name in configs}

    def only(name: str | None) -> None:  # switch every configuration off, then `name` on
        for _, switch in configs.values():
            switch(False)
        if name is not None:
            configs[name][1](True)

    for _ in range(repeats):
        states = {}
        for name, (model, _) in configs.items():
            only(None)
            cache = (StaticCache(config=model.config, max_cache_len=prompt.shape[1] + new + 1)
                     if cache_kind == "static" else None)
            out = model(prompt, past_key_values=cache, use_cache=True)
            if cache_kind == "growing":
                grow_in_place(out.past_key_values)
            states[name] = [out.past_key_values, out.logits[:, -1:].argmax(-1)]
            del out
        for _ in range(new):
            for name, (model, _) in configs.items():
                only(name)
                cache, nxt = states[name]
                t0 = time.perf_counter()
                out = model(nxt, past_key_values=cache, use_cache=True)
                states[name][1] = out.logits[:, -1:].argmax(-1)
                times[name].append(time.perf_counter() - t0)
        only(None)
    return times


def paired(slow: list[float], fast: list[float]) -> float:
    """Median over tokens of slow_i / fast_i (both decoded in the same turn)."""
    return statistics.median(a / b for a, b in zip(slow, fast))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=0, help="grouped-query attention: KV heads (0: as --heads)")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--new", type=int, default=32, help="tokens decoded per configuration and repeat")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3, help="prompts (prefills) per measurement")
    ap.add_argument("--rhos", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    ap.add_argument("--all-rows", action="store_true",
                    help="also time the compaction that keeps every MLP row (the ablation of skipping unused rows)")
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

    # dense in both layouts, paired; then keep the column-major copy only
    col_model = copy.deepcopy(model)
    t0 = time.perf_counter()
    prepare_columns(col_model)  # once per model: column-major storage, same values
    t_prepare = time.perf_counter() - t0
    static = lambda on: None  # noqa: E731 - a dense configuration has nothing to switch
    layouts = alternate({"row": (model, static), "column": (col_model, static)}, prompt, args.new, args.repeats,
                        args.cache)
    col_over_row = paired(layouts["column"], layouts["row"])  # > 1: the row-major layout decodes faster
    del model, layouts
    gc.collect()
    model = col_model

    rows = {"dense (row-major weights, as loaded)": {}, "dense (column-major weights)": {}}
    dense_steps = []
    for rho in args.rhos:
        kinds = {"column": True, **({"column, all MLP rows": False} if args.all_rows else {})}  # name -> skip_unused
        selects, compacts = [], {name: [] for name in kinds}
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            masks = masks_from_norms(model, norms, rho, "column")
            selects.append(time.perf_counter() - t0)
            for name, skip in kinds.items():
                t0 = time.perf_counter()
                undo = compact(model, masks, skip_unused=skip)
                compacts[name].append(time.perf_counter() - t0)
                uncompact(undo)
        variants = {}
        for name, skip in kinds.items():  # each claims its own buffers: the earlier ones' are busy
            variants[name] = compact(model, masks, skip_unused=skip)
            variants[name].use(False)  # the dense modules back: the next compaction starts from them
        configs = {"dense": (model, static)}
        configs.update({name: (model, c.use) for name, c in variants.items()})
        steps = alternate(configs, prompt, args.new, args.repeats, args.cache)
        dense_steps += steps["dense"]
        prunable = sum(int(m.numel()) for m in masks.values())
        t_select = statistics.median(selects)
        for name, c in variants.items():
            t_compact = statistics.median(compacts[name][1:] or compacts[name])  # the first prompt allocates buffers
            speedup = paired(steps["dense"], steps[name])
            rows[f"{name} rho={rho}"] = {
                "tokens_per_s": round(1 / statistics.median(steps[name]), 2),
                "speedup_vs_dense": round(speedup / max(1.0, col_over_row), 3),
                "speedup_vs_column_major_dense": round(speedup, 3),
                "compacted_fraction_of_prunable": round(c.weights / prunable, 4),
                "statistics_s": round(stats_s, 4), "selection_s": round(t_select, 4),
                "compaction_s": round(t_compact, 4),
                "compaction_first_prompt_s": round(compacts[name][0], 4),  # allocates the buffers: page faults
                "overhead_fraction_of_prefill": round((stats_s + t_select + t_compact) / plain, 4)}
        for c in reversed(list(variants.values())):
            uncompact(c)
    dense_tps = 1 / statistics.median(dense_steps)
    rows["dense (column-major weights)"] = {"tokens_per_s": round(dense_tps, 2),
                                            "speedup_vs_dense": round(1 / max(1.0, col_over_row), 3)}
    rows["dense (row-major weights, as loaded)"] = {"tokens_per_s": round(dense_tps * col_over_row, 2),
                                                    "speedup_vs_dense": round(min(1.0, col_over_row), 3)}
    res = {"model": "llama hidden 2048 / intermediate 5632", "layers": args.layers, "heads": args.heads,
           "kv_heads": cfg.num_key_value_heads, "vocab": args.vocab, "prompt_len": args.prompt_len,
           "new_tokens": args.new, "repeats": args.repeats, "cache": args.cache, "threads": torch.get_num_threads(),
           "plain_prefill_s": round(plain, 4), "prefill_with_statistics_hooks_s": round(with_hooks, 4),
           "statistics_paired_difference_s": round(stats_paired, 4),
           "once_per_model_column_norms_s": round(t_static, 4), "once_per_model_prepare_columns_s": round(t_prepare, 4),
           "dense_column_over_row_major_time": round(col_over_row, 4), "rows": rows}
    tag = "" if (args.layers, args.heads, args.kv_heads, args.vocab) == (4, 16, 0, 8192) else f"_{args.layers}layers"
    out = Path(__file__).parent / "results" / f"testtime_decode_{args.cache}{tag}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))
    print(f"\n| decode (batch 1, {args.cache} KV cache) | tokens/s | vs dense | weights read | per-prompt overhead / prefill |")
    print("|---|---|---|---|---|")
    for k, v in rows.items():
        if k.startswith("dense"):
            print(f"| {k} | {v['tokens_per_s']:.1f} | {v['speedup_vs_dense']:.2f} | 100% | – |")
        else:
            print(f"| {k} | {v['tokens_per_s']:.1f} | {v['speedup_vs_dense']:.2f} | "
                  f"{v['compacted_fraction_of_prunable']:.1%} | {v['overhead_fraction_of_prefill']:.1%} |")


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
