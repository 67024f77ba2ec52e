"""`mumoe compare` (one calibration pass for several methods) vs one `mumoe prune` run per method.

    python benchmarks/compare_pass.py                    # reap, ean, frequency, peu, heapr at 50% on the bundled model

Both sides are the real commands, each in its own process, wall time measured around the process: the
separate runs are what a user does today to get the same five pruned models (load, calibrate, score, slice,
export, once per method); compare loads once, runs one calibration pass (forward + backward, since HEAPr is
among the methods) and applies every method to a copy. Afterwards the kept sets and the expert scores of
every method are checked to be identical on both sides (same calibration windows and batch size). Writes
benchmarks/results/compare_pass.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def timed_run(argv: list[str]) -> float:
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "mumoe", *argv], capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"failed: mumoe {' '.join(argv)}\n{res.stderr}")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--methods", default="reap,ean,frequency,peu,heapr")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/compare_pass.json"))
    args = ap.parse_args()
    methods = args.methods.split(",")
    calib = ["--calib", "domain", "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--batch-size", "8"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        separate = {}
        for m in methods:
            separate[m] = timed_run(["prune", args.model, "--method", m, "--ratio", str(args.ratio), *calib,
                                     "--out", str(tmp / m)])
            print(f"  mumoe prune --method {m}: {separate[m]:.1f}s", flush=True)
        together = timed_run(["compare", args.model, "--methods", args.methods, "--ratio", str(args.ratio), *calib,
                              "--out", str(tmp / "compare")])
        print(f"  mumoe compare --methods {args.methods}: {together:.1f}s", flush=True)
        res = json.loads((tmp / "compare" / "results.json").read_text())
        same = {}
        for m in methods:
            alone = json.loads((tmp / m / "pruning.json").read_text())["layers"]
            joint = res["reports"][f"{m}@{args.ratio:g}"]["layers"]
            same[m] = alone == joint  # kept sets (and, expert grain, every score) identical
    total = sum(separate.values())
    result = {"model": args.model, "methods": methods, "ratio": args.ratio, "calibration": calib,
              "separate_seconds": separate, "separate_total": total, "compare_seconds": together,
              "compare_pass_seconds": res["pass_seconds"], "speedup": total / together, "identical": same}
    print(f"\n| | wall time |\n|---|---|\n| {len(methods)} separate `mumoe prune` runs | {total:.1f} s |\n"
          f"| `mumoe compare` (one pass: {res['pass_seconds']:.1f} s) | {together:.1f} s |\n"
          f"| speedup | {total / together:.2f}x |")
    print("identical kept sets and scores: " + ", ".join(f"{m} {'yes' if v else 'NO'}" for m, v in same.items()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
