"""Time to first token: a prefill that computes the next token's logits only (`logits_to_keep=1`, what mumoe's
serving and per-prompt prefills pass since this change) vs the logits of every prompt position (before).

    python benchmarks/prefill_logits.py [--prompt 256] [--repeats 5] [--vocab 8192,151936]

Per vocabulary size: a Llama with hidden 2048, intermediate 6144, 4 layers, random weights, fp32 on the CPU
(vocabulary 151,936 is Qwen's; the lm_head then holds 311M of the model's weights). Reported: the median dense
prefill and μ-MoE statistics prefill (`observe.collectors.input_norms`, column structure's statistics) in ms,
both ways, measured in one run, alternating. Prints a table; not in CI.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM

import mumoe.observe.collectors as collectors
from mumoe.compat import last_logits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt", type=int, default=256, help="prompt tokens (default 256)")
    ap.add_argument("--repeats", type=int, default=5, help="timed prefills per configuration (default 5)")
    ap.add_argument("--vocab", default="8192,151936", help="vocabulary sizes, comma-separated (default 8192,151936)")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(f"{'vocab':>7} {'prefill':<22} {'all positions ms':>16} {'last only ms':>13} {'ratio':>6}")
    for vocab in (int(v) for v in args.vocab.split(",")):
        cfg = AutoConfig.for_model("llama", hidden_size=2048, intermediate_size=6144, num_hidden_layers=4,
                                   num_attention_heads=16, num_key_value_heads=8, vocab_size=vocab,
                                   tie_word_embeddings=True, max_position_embeddings=4096)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
        x = torch.randint(3, min(vocab, 8000), (1, args.prompt))
        times: dict[tuple[str, str], list[float]] = {}
        runs = {
            "dense": lambda kw: model(input_ids=x, use_cache=True, **kw),
            "mu-moe statistics": lambda kw: _statistics(model, x, kw),
        }
        with torch.no_grad():
            for name, fn in runs.items():
                fn({})  # warm-up
            for _ in range(args.repeats):
                for name, fn in runs.items():
                    for mode, kw in (("all", {}), ("last", last_logits(model))):
                        t0 = time.perf_counter()
                        fn(kw)
                        times.setdefault((name, mode), []).append(time.perf_counter() - t0)
        for name in runs:
            a, b = (statistics.median(times[(name, m)]) * 1000 for m in ("all", "last"))
            print(f"{vocab:>7} {name:<22} {a:>16.1f} {b:>13.1f} {b / a:>6.2f}")
        del model


def _statistics(model, x, kw):
    """μ-MoE's statistics prefill with the given logits kwargs (monkeypatched for the comparison)."""
    saved = collectors.last_logits
    collectors.last_logits = lambda m: kw
    try:
        return collectors.input_norms(model, x, return_cache=True)
    finally:
        collectors.last_logits = saved


if __name__ == "__main__":
    main()
