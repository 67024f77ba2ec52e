"""Per-token expert skipping (ODP): decode speed at batch 1 vs dense, on a qwen3_moe of realistic width and on the
bundled model.

    python benchmarks/skip_decode.py                       # synthetic Qwen3-30B-A3B widths, 4 layers, fp32
    python benchmarks/skip_decode.py --model default       # the bundled model
    python benchmarks/skip_decode.py --experts-impl eager  # transformers' eager experts loop instead of grouped_mm

Synthetic: hidden 2048, 128 experts × moe_intermediate 768, top-8, 32 heads / 4 KV heads × 128, vocab 32000,
--layers 4 (random weights, router rows scaled so that routing is spread as in a trained model). ODP's β per layer
is calibrated on --calib-windows random windows (the bundled model: its calib splits) for each target share;
then a --prompt-len prompt is prefilled densely and --new tokens are decoded greedily from its cache by every
configuration in turn, token by token (dense = no hooks; skip S = ODP's hooks with the skipped slots handed to the
experts as transformers' sentinel), so that the machine's drifts hit all alike. Speedup = median over decoded
tokens of the paired ratio dense / skipping; tokens/s = 1 / median seconds per token; the share skipped is
counted on the decoded tokens. Writes benchmarks/results/skip_decode_<model>_<impl>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from contextlib import ExitStack
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from testtime_decode import alternate  # noqa: E402  (the paired token-by-token decode loop)

from mumoe.testtime.skip import calibrate, skipping  # noqa: E402


def synthetic(layers: int):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(hidden_size=2048, moe_intermediate_size=768, intermediate_size=6144, num_experts=128,
                         num_experts_per_tok=8, num_hidden_layers=layers, num_attention_heads=32,
                         num_key_value_heads=4, head_dim=128, vocab_size=32000, norm_topk_prob=True,
                         max_position_embeddings=4096)
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0, 0.5 / cfg.hidden_size ** 0.5 * 8)
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="synthetic", help="synthetic (default) or default (the bundled model)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts-impl", default=None, help="eager, grouped_mm or batched_mm (default: transformers')")
    ap.add_argument("--shares", default="0.1,0.2,0.3")
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--calib-windows", type=int, default=16)
    args = ap.parse_args()

    if args.model == "synthetic":
        model = synthetic(args.layers)
        vocab = model.config.vocab_size
        gen = torch.Generator().manual_seed(1)
        wins = torch.randint(0, vocab, (args.calib_windows, 256), generator=gen)
    else:
        import mumoe
        from mumoe.drivers.inputs import calibration
        from mumoe.loading import load_tokenizer, resolve
        from mumoe.recipe import CalibSpec

        name = resolve(args.model)
        model = mumoe.load(name).eval()
        vocab = model.config.vocab_size
        gen = torch.Generator().manual_seed(1)
        wins = calibration(CalibSpec(("domain",), args.calib_windows, 256, None, 8), None, load_tokenizer(name))[0]
    if args.experts_impl:
        model.set_experts_implementation(args.experts_impl)
    impl = model.config._experts_implementation
    prompt = torch.randint(0, vocab, (1, args.prompt_len), generator=gen)
    shares = [float(s) for s in args.shares.split(",")]
    betas = {s: calibrate(model, wins, s, 0.1, 4) for s in shares}
    seen: dict[float, list[int]] = {s: [0, 0] for s in shares}  # skipped, calls over every decoded token

    def switch_for(share: float):
        stack = ExitStack()
        live = []

        def switch(on: bool) -> None:  # ODP's hooks on; off: removed, their count added up
            nonlocal stack
            if on and not live:
                live.append(stack.enter_context(skipping(model, betas[share], 0.1)))
            elif not on and live:
                c = live.pop()
                stack.close()
                stack = ExitStack()
                seen[share][0] += sum(c.skipped.values())
                seen[share][1] += sum(c.calls.values())
        return switch

    configs = {"dense": (model, lambda on: None)}
    for s in shares:
        configs[f"skip {s:g}"] = (model, switch_for(s))
    times = alternate(configs, prompt, args.new, args.repeats, "growing")
    dense = times["dense"]
    rows = {}
    for name, t in times.items():
        ratio = statistics.median(d / x for d, x in zip(dense, t))
        row = {"tokens_per_s": 1 / statistics.median(t), "speedup": ratio}
        if name != "dense":
            s = float(name.split()[1])
            row["skipped_share"] = seen[s][0] / max(seen[s][1], 1)
            row["betas"] = betas[s]
        rows[name] = row
        extra = f", {row['skipped_share']:.1%} of expert calls skipped" if "skipped_share" in row else ""
        print(f"{name:10s} {row['tokens_per_s']:7.1f} tokens/s  {ratio:5.2f}x dense{extra}")
    out = Path(__file__).parent / "results" / f"skip_decode_{args.model}_{impl}.json"
    out.write_text(json.dumps({"model": args.model, "layers": args.layers, "experts_impl": impl,
                               "prompt_len": args.prompt_len, "new": args.new, "repeats": args.repeats,
                               "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
