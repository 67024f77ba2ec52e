"""Resident memory of a TAER task model (only the kept experts read) vs the full model.

    python benchmarks/taer_memory.py --synthetic /tmp/mumoe-bench-taer --keep-frac 0.25   # >= 2 GB checkpoint
    python benchmarks/taer_memory.py --keep-frac 0.5                                      # the bundled model

Each load runs in a fresh subprocess; after loading, every weight is touched (loaders may map files lazily)
and the resident set (VmRSS, which also counts mapped file pages) and its anonymous part (RssAnon: the
weights' own copies) minus those after imports are reported; the expected ratio
is (non-expert parameters + kept expert parameters) / all parameters. Writes benchmarks/results/taer_memory*.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CODE = """
import json, sys, torch
import mumoe
from mumoe.retrieval import TaskLibrary, load_task_model
def rss(field='VmRSS'):
    return int(next(l for l in open('/proc/self/status') if l.startswith(field)).split()[1]) / 1024
base, base_anon = rss(), rss('RssAnon')
if sys.argv[2] == 'full':
    m = mumoe.load(sys.argv[1], 'bf16')
else:
    m = load_task_model(sys.argv[1], TaskLibrary.load(sys.argv[3]), 'task', 'bf16')
with torch.no_grad():
    for p in m.parameters():  # weights may be lazily mapped from the file: touch every page
        p.sum()
print(json.dumps({'rss_MB': rss() - base, 'anon_MB': rss('RssAnon') - base_anon,
                  'params': sum(p.numel() for p in m.parameters())}))
"""


def make_synthetic(path: Path) -> None:
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(vocab_size=8192, hidden_size=1024, intermediate_size=2048, moe_intermediate_size=512,
                         num_hidden_layers=10, num_attention_heads=8, num_key_value_heads=4, head_dim=128,
                         num_experts=64, num_experts_per_tok=4, max_position_embeddings=512, tie_word_embeddings=True)
    with torch.no_grad():
        model = Qwen3MoeForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(path)


def make_library(model_path: Path, lib_path: Path, keep_frac: float) -> None:
    """A one-task library with a random pattern (the memory does not depend on which experts are kept)."""
    import torch

    from mumoe.retrieval import TaskLibrary
    from mumoe.retrieval.partial import checkpoint_fingerprint

    fp = checkpoint_fingerprint(model_path)
    E = fp["num_experts"][0]
    keep = max(fp["top_k"], round(keep_frac * E))
    gen = torch.Generator().manual_seed(0)
    lib = TaskLibrary(fp, keep, "tcess", "first")
    lib.tasks["task"] = {"kept": {L: sorted(torch.randperm(E, generator=gen)[:keep].tolist()) for L in fp["moe_layers"]},
                         "windows": 0}
    lib.keys["task"] = torch.zeros(E)
    lib.scores["task"] = [torch.zeros(E) for _ in fp["moe_layers"]]
    lib.save(lib_path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--synthetic", type=Path, default=None, help="write (if absent) and use a ~2 GB synthetic checkpoint")
    ap.add_argument("--keep-frac", type=float, default=0.25)
    args = ap.parse_args()
    import mumoe.loading

    path = args.synthetic or Path(mumoe.loading.resolve("default"))
    if args.synthetic and not (path / "config.json").exists():
        print(f"writing synthetic checkpoint to {path}", flush=True)
        make_synthetic(path)
    run = lambda *a: json.loads(subprocess.run([sys.executable, "-c", CODE, str(path), *a], capture_output=True,
                                               text=True, check=True).stdout.strip().splitlines()[-1])
    # the library goes to a temporary folder: never beside the model (for the bundled model that was inside the package)
    with tempfile.TemporaryDirectory(prefix="mumoe-taer-memory-") as tmp:
        lib = Path(tmp) / f"lib{args.keep_frac}"
        make_library(path, lib, args.keep_frac)
        full, part = run("full"), run("task", str(lib))
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    res = {"checkpoint": str(path), "checkpoint_GB": round(size / 1e9, 2), "keep_frac": args.keep_frac,
           "full_rss_MB": round(full["rss_MB"], 1), "task_rss_MB": round(part["rss_MB"], 1),
           "measured_ratio": round(part["rss_MB"] / full["rss_MB"], 3),
           "full_anon_MB": round(full["anon_MB"], 1), "task_anon_MB": round(part["anon_MB"], 1),
           "measured_ratio_anon": round(part["anon_MB"] / max(full["anon_MB"], 1e-9), 3),
           "expected_ratio_from_params": round(part["params"] / full["params"], 3)}
    name = "taer_memory_synthetic.json" if args.synthetic else "taer_memory_bundled.json"
    out = Path(__file__).parent / "results" / name
    out.write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
