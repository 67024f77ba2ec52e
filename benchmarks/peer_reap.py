"""The peer: llm-compressor's REAP (`oneshot` with `REAPPruningModifier`, its sequential pipeline) on a
checkpoint, the same random-id windows as benchmarks/calib_memory.py. Runs in llm-compressor's own venv (it pins
an older transformers):

    python3 -m venv /tmp/peer && /tmp/peer/bin/pip install torch==2.13.0 llmcompressor
    /tmp/peer/bin/python benchmarks/peer_reap.py --dir CKPT --out OUT --nsamples 8 --seqlen 256 --vocab 32000

Prints one JSON line: wall time (load, oneshot, save), peak RSS, kept experts per layer.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--nsamples", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--ratio", type=float, default=0.25)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--pipeline", default="sequential", help="llm-compressor's calibration pipeline: sequential "
                   "(layer by layer, REAP pruned at each layer's end) or basic (whole-model forwards)")
    a = p.parse_args()
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning.reap import REAPPruningModifier
    from transformers import AutoModelForCausalLM

    wins = torch.randint(3, a.vocab, (a.nsamples, a.seqlen), generator=torch.Generator().manual_seed(1))
    ds = Dataset.from_dict({"input_ids": wins.tolist(), "attention_mask": torch.ones_like(wins).tolist()})
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(a.dir, dtype=getattr(torch, a.dtype))
    t_load = time.perf_counter() - t0
    report = Path(a.out) / "reap_kept.json"
    t0 = time.perf_counter()
    oneshot(model=model, dataset=ds, recipe=REAPPruningModifier(sparsity=a.ratio, report_path=str(report)),
            pipeline=a.pipeline, num_calibration_samples=a.nsamples, max_seq_length=a.seqlen, batch_size=a.batch_size,
            output_dir=None)
    t_oneshot = time.perf_counter() - t0
    t0 = time.perf_counter()
    model.save_pretrained(Path(a.out) / "model")
    t_save = time.perf_counter() - t0
    kept = json.loads(report.read_text()) if report.exists() else None
    print(json.dumps({"load_s": t_load, "oneshot_s": t_oneshot, "save_s": t_save,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "kept": kept}))


if __name__ == "__main__":
    main()
