"""What the input checks cost, measured against the reads they guard.

    python benchmarks/validation_overhead.py                  # 1.9 GB bf16 checkpoint (8 layers x 64 experts)
    python benchmarks/validation_overhead.py --layers 16 --dir /data/ckpt

Writes a synthetic qwen3_moe checkpoint in bf16 (fused expert tensors, one shard per layer), then in one run:
  1. headers      `checkpoint.check_files`: index, every safetensors header, sizes and dtypes (what `mumoe prune`
                  does before any weight is read)
  2. raw read     every tensor read into memory (`checkpoint.read_into` with the NaN/inf check bypassed)
  3. read+check   the same reads with the per-tensor NaN/inf check (what the streamed and layer-sequential
                  paths do)
  4. check alone  `check_finite` over the tensors already in memory (what `mumoe.load` adds after
                  from_pretrained)
Reports seconds (best of two alternated passes) and the ratios check/read. The page cache is dropped before each read pass when run as root
(echo 3 > /proc/sys/vm/drop_caches), so reads come from the disk as they would for a real checkpoint.
Writes benchmarks/results/validation_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from mumoe import checkpoint
from mumoe.checkpoint import check_files, check_finite, read_header, read_into, shard_files


def write_checkpoint(folder: Path, layers: int, hidden: int, experts: int, width: int) -> None:
    from transformers import AutoModelForCausalLM

    from mumoe.models.tiny import tiny_config

    cfg = tiny_config("qwen3_moe", hidden_size=hidden, moe_intermediate_size=width, intermediate_size=hidden,
                      num_experts=experts, num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=4,
                      head_dim=hidden // 16)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    by_file: dict[str, dict] = {}
    for name, p in skeleton.state_dict().items():  # one file per decoder layer, written when the next begins
        part = f"layer-{int(name.split('.')[2]):03d}" if ".layers." in name else "rest"
        if part not in by_file and part != "rest":
            for done in [f for f in by_file if f != "rest"]:
                save_file(by_file.pop(done), folder / f"{done}.safetensors", metadata={"format": "pt"})
        t = torch.randn(p.shape, generator=gen) * (0.5 / math.sqrt(p.shape[-1]))
        by_file.setdefault(part, {})[name] = t.to(torch.bfloat16)
    for f, tensors in by_file.items():
        save_file(tensors, folder / f"{f}.safetensors", metadata={"format": "pt"})
    wm = {k: f.name for f in sorted(folder.glob("*.safetensors")) for k in read_header(f)}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    cfg.save_pretrained(folder)


def drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def read_all(folder: Path, check: bool) -> tuple[float, list[torch.Tensor]]:
    saved = checkpoint.check_finite
    if not check:
        checkpoint.check_finite = lambda t, where: t
    try:
        t0 = time.perf_counter()
        out = []
        for f in shard_files(folder):
            for meta in read_header(f).values():
                dst = torch.empty(meta["shape"], dtype=checkpoint.DTYPES[meta["dtype"]])
                out.append(read_into(f, meta, dst))
        return time.perf_counter() - t0, out
    finally:
        checkpoint.check_finite = saved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", default="/tmp/mumoe-validation-bench")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "validation_overhead.json"))
    a = ap.parse_args()
    folder = Path(a.dir)
    if not (folder / "config.json").exists():
        write_checkpoint(folder, a.layers, a.hidden, a.experts, a.width)
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    t0 = time.perf_counter()
    check_files(folder)
    t_headers = time.perf_counter() - t0
    raw, checked = [], []
    for _ in range(2):  # alternated, best of two each: disk speed drifts between passes
        cold = drop_caches()
        raw.append(read_all(folder, check=False)[0])
        drop_caches()
        t, tensors = read_all(folder, check=True)
        checked.append(t)
        if _ == 0:
            del tensors
    t_raw, t_checked = min(raw), min(checked)
    t0 = time.perf_counter()
    for i, t in enumerate(tensors):
        check_finite(t, str(i))
    t_alone = time.perf_counter() - t0
    res = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
           "checkpoint_bytes": size, "tensors": len(tensors), "cold_cache": cold,
           "seconds": {"headers": round(t_headers, 4), "raw_read": round(t_raw, 3), "read_and_check": round(t_checked, 3),
                       "check_alone": round(t_alone, 3)},
           "ratios": {"headers_vs_read": round(t_headers / t_raw, 5), "read_and_check_vs_read": round(t_checked / t_raw, 3),
                      "check_alone_vs_read": round(t_alone / t_raw, 3)},
           "check_GBps": round(size / t_alone / 1e9, 1)}
    print(json.dumps(res, indent=1))
    Path(a.out).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
