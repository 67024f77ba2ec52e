"""PMQ (`mumoe quantize`) on a checkpoint 3x larger than the memory the process may use.

    python benchmarks/pmq_memory.py                  # the synthetic checkpoint of calib_memory.py, cap 1100 MiB
    python benchmarks/pmq_memory.py --cap-mb 1500 --avg-bits 3

1. Writes (once) the synthetic qwen3_moe checkpoint of `benchmarks/calib_memory.py` (16 layers, hidden 1024,
   64 experts x 512, bf16, per-expert keys, one shard per layer) to --dir, with the bundled model's tokenizer
   beside it (its ids fit the 32000-token vocabulary), so that the command runs as a user types it.
2. Runs `mumoe quantize DIR --avg-bits B --calib domain --nsamples N --seqlen L --out OUT` — the default
   `--layerwise auto` — as a child process inside a cgroup-v1 memory cgroup capped at --cap-mb, and reads the
   cgroup's peak (memory.max_usage_in_bytes, page cache included) and the child's own peak RSS.
3. Checks the export: every MoE layer averages B bits, the packed experts take what the widths say.
Needs root (the cgroup). Writes benchmarks/results/pmq_memory.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from calib_memory import CG, write_checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dir", default="/tmp/mumoe-bench/ckpt")
    p.add_argument("--out", default="/tmp/mumoe-bench/pmq")
    p.add_argument("--cap-mb", type=int, default=1100)
    p.add_argument("--avg-bits", type=float, default=2.5)
    p.add_argument("--nsamples", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    a = p.parse_args()
    defaults = argparse.Namespace(arch="qwen3_moe", layers=16, hidden=1024, inter=512, experts=64, top_k=4,
                                  vocab=32000)
    folder = Path(a.dir)
    write_checkpoint(folder, defaults)
    from mumoe.loading import DEFAULT_MODEL

    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (DEFAULT_MODEL / f).exists() and not (folder / f).exists():
            shutil.copy(DEFAULT_MODEL / f, folder / f)
    ckpt_bytes = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    cmd = [sys.executable, "-m", "mumoe", "quantize", str(folder), "--avg-bits", str(a.avg_bits), "--calib", "domain",
           "--nsamples", str(a.nsamples), "--seqlen", str(a.seqlen), "--batch-size", str(a.batch_size),
           "--out", a.out, "--overwrite"]
    group = CG / f"mumoe-pmq-{os.getpid()}"
    group.mkdir()
    try:
        cap = a.cap_mb << 20
        (group / "memory.limit_in_bytes").write_text(str(cap))
        if (group / "memory.memsw.limit_in_bytes").exists():
            (group / "memory.memsw.limit_in_bytes").write_text(str(cap))
        t0 = time.perf_counter()
        proc = subprocess.run(["bash", "-c", f"echo $$ > {group}/cgroup.procs && exec /usr/bin/time -v "
                               + " ".join(cmd)], capture_output=True, text=True)
        wall = time.perf_counter() - t0
        peak = int((group / "memory.max_usage_in_bytes").read_text())
        fail = int((group / "memory.failcnt").read_text())
    finally:
        group.rmdir()
    print(proc.stdout)
    if proc.returncode != 0:
        print(proc.stderr[-3000:])
        raise SystemExit(f"mumoe quantize failed (rc {proc.returncode}, cgroup failcnt {fail})")
    rss = next(int(line.split()[-1]) for line in proc.stderr.splitlines() if "Maximum resident set size" in line)
    rec = json.loads((Path(a.out) / "pruning.json").read_text())
    from safetensors import safe_open

    sizes = {}
    for f in Path(a.out).glob("*.safetensors"):
        with safe_open(str(f), "pt") as fh:
            sizes.update({k: fh.get_slice(k).get_shape() for k in fh.keys()})
    H, I = defaults.hidden, defaults.inter
    for entry in rec["layers"]:
        widths = [x["bits"] for x in entry["experts"]]
        assert sum(widths) <= math.floor(a.avg_bits * len(widths)), entry["layer"]
        for x in entry["experts"]:
            key = f"model.layers.{entry['layer']}.mlp.experts.{x['expert']}"
            assert sizes[f"{key}.gate_up.q"] == [-(-2 * I * H * x["bits"] // 8)]
            assert sizes[f"{key}.down.q"] == [-(-H * I * x["bits"] // 8)]
    out_bytes = sum(f.stat().st_size for f in Path(a.out).glob("*.safetensors"))
    res = {"checkpoint_mb": ckpt_bytes / 2**20, "fp32_model_mb": 2 * ckpt_bytes / 2**20, "cap_mb": a.cap_mb,
           "cgroup_peak_mb": peak / 2**20, "child_peak_rss_mb": rss / 1024, "wall_s": wall,
           "export_mb": out_bytes / 2**20, "avg_bits": a.avg_bits, "nsamples": a.nsamples, "seqlen": a.seqlen,
           "layerwise": "PMQ layer by layer" in proc.stdout}
    for k, v in res.items():
        print(f"  {k:18s} {v:.1f}" if isinstance(v, float) else f"  {k:18s} {v}")
    out = ROOT / "benchmarks" / "results" / "pmq_memory.json"
    out.write_text(json.dumps(res, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
