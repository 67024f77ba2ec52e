"""AIMER scoring streamed from safetensors vs reading the same tensors with safetensors alone.

    python benchmarks/aimer_stream.py                 # writes a ~4.8 GB synthetic checkpoint to /tmp first

The checkpoint: qwen3_moe-like, legacy per-expert layout (what `save_pretrained` writes), bf16, random
weights, one shard per layer; default shapes H=2048, I=768, 128 experts per layer (Qwen3-30B-A3B's expert
shape), 4 layers. Each measurement runs in a fresh subprocess (page cache warm after a first read) and
reports its time and peak RSS; medians over --repeats. Prints a markdown row and writes
benchmarks/results/aimer_stream.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

RAW = """
import resource, sys, time
from pathlib import Path
from safetensors import safe_open
t = time.perf_counter(); n = 0
for f in sorted(Path(sys.argv[1]).glob('*.safetensors')):
    with safe_open(f, 'pt') as fh:
        for k in fh.keys():
            if '.experts.' in k:
                n += fh.get_tensor(k).numel()
print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, n)
"""
AIMER = """
import resource, sys, time
from mumoe.criteria.aimer_stream import stream_aimer
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
t = time.perf_counter()
scores = stream_aimer(sys.argv[1], progress=False)
print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, base)
"""


def write_checkpoint(path: Path, layers: int, experts: int, hidden: int, inter: int) -> int:
    path.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    total = 0
    for L in range(layers):
        tensors = {f"model.layers.{L}.mlp.gate.weight": torch.randn(experts, hidden, generator=gen).bfloat16()}
        for e in range(experts):
            pre = f"model.layers.{L}.mlp.experts.{e}"
            # heavier tails for some experts so that AIMER scores differ
            scale = 0.02 * (1 + (e % 7) / 7)
            for kind, shape in (("gate_proj", (inter, hidden)), ("up_proj", (inter, hidden)), ("down_proj", (hidden, inter))):
                w = torch.randn(shape, generator=gen) * scale
                if e % 3 == 0:
                    w = w * torch.rand(shape, generator=gen).pow(4) * 4
                tensors[f"{pre}.{kind}.weight"] = w.bfloat16()
        save_file(tensors, path / f"model-{L:05d}-of-{layers:05d}.safetensors", metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        print(f"  wrote layer {L}", flush=True)
    config = {"model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"], "hidden_size": hidden,
              "moe_intermediate_size": inter, "num_experts": experts, "num_experts_per_tok": 8,
              "num_hidden_layers": layers, "vocab_size": 151936}
    (path / "config.json").write_text(json.dumps(config))
    return total


def run(code: str, path: Path) -> list[float]:
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True)
    return [float(x) for x in out.stdout.split()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/mumoe-bench-aimer"))
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--inter", type=int, default=768)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    if not (args.dir / "config.json").exists():
        print(f"writing synthetic checkpoint to {args.dir}")
        write_checkpoint(args.dir, args.layers, args.experts, args.hidden, args.inter)
    size = sum(f.stat().st_size for f in args.dir.glob("*.safetensors"))
    largest = max(args.hidden * args.inter * 2, args.experts * args.hidden * 2)  # bytes of the largest tensor
    run(RAW, args.dir)  # warm the page cache
    raw, aimer = [], []
    for _ in range(args.repeats):
        raw.append(run(RAW, args.dir))
        aimer.append(run(AIMER, args.dir))
    t_raw = statistics.median(r[0] for r in raw)
    t_aimer = statistics.median(a[0] for a in aimer)
    rss_aimer = max(a[1] for a in aimer)
    rss_base = min(a[2] for a in aimer)
    res = {
        "checkpoint_bytes": size, "largest_tensor_bytes": largest, "threads": torch.get_num_threads(),
        "raw_read_s": round(t_raw, 3), "aimer_s": round(t_aimer, 3),
        "raw_GBps": round(size / t_raw / 1e9, 2), "aimer_GBps": round(size / t_aimer / 1e9, 2),
        "throughput_ratio_aimer_vs_raw": round(t_raw / t_aimer, 3),
        "aimer_peak_rss_MB": round(rss_aimer / 2**20, 1), "rss_after_imports_MB": round(rss_base / 2**20, 1),
        "raw_read_peak_rss_MB": round(max(r[1] for r in raw) / 2**20, 1),
        "rss_goal_MB": round((2 * largest + 300 * 2**20) / 2**20, 1),
    }
    out = Path(__file__).parent / "results" / "aimer_stream.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))
    print(f"\n| checkpoint | raw safetensors read | AIMER streamed | ratio (goal ≥ 0.7) | AIMER peak RSS (goal ≤ {res['rss_goal_MB']} MB) |")
    print("|---|---|---|---|---|")
    print(f"| {size / 1e9:.2f} GB | {t_raw:.2f} s ({res['raw_GBps']} GB/s) | {t_aimer:.2f} s ({res['aimer_GBps']} GB/s) | "
          f"{res['throughput_ratio_aimer_vs_raw']:.2f} | {res['aimer_peak_rss_MB']} MB (after imports {res['rss_after_imports_MB']} MB) |")


if __name__ == "__main__":
    main()
