"""`mumoe prune` with its DEFAULT flags on a checkpoint at least 3x larger than the memory cgroup it runs in.

    python benchmarks/default_flags_memory.py                 # 3.3 GB bf16 qwen3_moe, 1100 MiB cap (needs root)
    python benchmarks/default_flags_memory.py --cap-mb 2048 --layers 24

What a user in a container or a Slurm job runs: no --layerwise, no --spill-gb, the default 1 GiB output shards:

    mumoe prune CKPT --method reap --ratio 0.5 --calib domain --nsamples 8 --seqlen 256 --out OUT

1. Writes the synthetic qwen3_moe checkpoint of `calib_memory.py` (bf16, per-expert keys, one shard per layer;
   hidden 1024, 64 experts x 512, 16 layers: 3.3 GB) plus the bundled tokenizer, to --dir.
2. Runs the command above in a fresh cgroup-v1 memory cgroup capped at --cap-mb (swap capped too where
   offered). The parent samples the child's /proc status every 20 ms: the calibration peak is the child's
   VmHWM when it prints "scored in"; the export peak the largest VmRSS after that (RSS counts the mapped torch
   libraries too, whose pages are charged to whoever read them first, so it can exceed the cap; RssAnon, what
   the process allocated itself, is printed beside it). The cgroup's own peak (memory.max_usage_in_bytes, page
   cache included) is printed too.
Pass: exit 0 (nothing OOM-killed), `--layerwise auto` chose the layer-sequential path from the cgroup's limit,
the export peak <= the calibration peak. Writes benchmarks/results/default_flags_memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from calib_memory import CG, write_checkpoint  # noqa: E402


def _status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM and RssAnon (what the process allocated itself, no mapped files or libraries) of a process in
    bytes ({} once it is gone)."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon"):
                out[key] = int(value.split()[0]) * 1024
    except (OSError, ValueError):
        pass
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default="/tmp/mumoe-bench/ckpt")
    p.add_argument("--out", default="/tmp/mumoe-bench/default-out")
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--inter", type=int, default=512)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--cap-mb", type=int, default=1100)
    p.add_argument("--method", default="reap")
    a = p.parse_args()
    ckpt = Path(a.dir)
    write_checkpoint(ckpt, a)
    from mumoe.paths import DEFAULT_MODEL

    for f in DEFAULT_MODEL.glob("tokenizer*"):  # text calibration needs a tokenizer; ids fit the vocabulary
        shutil.copy(f, ckpt / f.name)
    size = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    cap = a.cap_mb << 20
    print(f"checkpoint {size / 2**30:.2f} GiB = {size / cap:.1f}x the cgroup cap of {a.cap_mb} MiB")
    cmd = [sys.executable, "-m", "mumoe", "prune", str(ckpt), "--method", a.method, "--ratio", "0.5", "--calib",
           "domain", "--nsamples", "8", "--seqlen", "256", "--out", a.out, "--overwrite"]
    print("$ mumoe " + " ".join(cmd[3:]))
    group = CG / f"mumoe-default-{os.getpid()}"
    group.mkdir()
    lines: list[str] = []
    marks: dict[str, float] = {}
    try:
        (group / "memory.limit_in_bytes").write_text(str(cap))
        if (group / "memory.memsw.limit_in_bytes").exists():
            (group / "memory.memsw.limit_in_bytes").write_text(str(cap))
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", "MUMOE_PROGRESS_EVERY": "30"},
                                preexec_fn=lambda: (group / "cgroup.procs").write_text(str(os.getpid())))
        calib_peak = export_peak = calib_anon = export_anon = 0
        phase = ["calibration"]

        def read() -> None:
            for line in proc.stdout:
                lines.append(line.rstrip("\n"))
                print("  | " + line.rstrip("\n"), flush=True)
                if "scored in" in line:
                    marks["calib_end"] = time.perf_counter() - t0
                    phase[0] = "export"

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        while proc.poll() is None:
            st = _status(proc.pid)
            if phase[0] == "calibration":
                calib_peak = max(calib_peak, st.get("VmHWM", 0))
                calib_anon = max(calib_anon, st.get("RssAnon", 0))
            else:
                export_peak = max(export_peak, st.get("VmRSS", 0))
                export_anon = max(export_anon, st.get("RssAnon", 0))
            time.sleep(0.02)
        reader.join(5)
        total = time.perf_counter() - t0
        cgroup_peak = int((group / "memory.max_usage_in_bytes").read_text())
        fails = int((group / "memory.failcnt").read_text())
    finally:
        group.rmdir()
    auto = any("pruning layer by layer (--layerwise auto" in line for line in lines)
    ok = proc.returncode == 0 and auto and 0 < export_peak <= calib_peak and export_anon <= calib_anon
    print(f"exit {proc.returncode} in {total:.1f}s (calibration {marks.get('calib_end', float('nan')):.1f}s); "
          f"--layerwise auto chose the layer-sequential path: {auto}")
    print(f"calibration peak RSS {calib_peak / 2**20:.0f} MiB, export peak RSS {export_peak / 2**20:.0f} MiB "
          f"(export / calibration = {export_peak / max(calib_peak, 1):.2f}); cgroup peak {cgroup_peak / 2**20:.0f} "
          f"MiB of {a.cap_mb} (page cache included), limit hit {fails} times")
    print(f"anonymous memory (RSS less mapped files and libraries, sampled every 20 ms): calibration "
          f"{calib_anon / 2**20:.0f} MiB, export {export_anon / 2**20:.0f} MiB")
    print("PASS" if ok else "FAIL")
    result = {"machine": f"{platform.node()} {os.cpu_count()} cores", "checkpoint_gib": size / 2**30,
              "cap_mib": a.cap_mb, "command": "mumoe " + " ".join(cmd[3:]), "rc": proc.returncode,
              "layerwise_auto": auto, "total_s": total, "calib_s": marks.get("calib_end"),
              "calib_peak_rss_mib": calib_peak / 2**20, "export_peak_rss_mib": export_peak / 2**20,
              "calib_peak_anon_mib": calib_anon / 2**20, "export_peak_anon_mib": export_anon / 2**20,
              "cgroup_peak_mib": cgroup_peak / 2**20, "cgroup_failcnt": fails, "pass": ok, "log": lines[-30:]}
    out = Path(__file__).parent / "results" / "default_flags_memory.json"
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
