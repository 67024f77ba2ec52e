"""MC# on the bundled model: PMQ (2.5 / 3 average bits, with and without REAP 25% first) and per-token skipping
(ODP, OTP at 10 / 20 / 30% of expert calls) — perplexity, local lm-eval tasks, export size, share skipped.

    python benchmarks/mcsharp_table.py                  # writes results/mcsharp/table.md and table.json
    python benchmarks/mcsharp_table.py --limit 50       # fewer documents per local task

Every row starts from the bundled model loaded afresh. Perplexity: each domain's eval split, non-overlapping
windows of --seqlen (512) tokens, every window, mean over the four domains (`mumoe eval --ppl domain`). Local
tasks: the offline mumoe_nextline_<domain> tasks (`mumoe eval --tasks local --limit N`), mean accuracy.
PMQ rows: calibration 64 windows × 512 tokens of the bundled calib splits (`mumoe quantize --nsamples 64`);
the export is written and read back with mumoe.load, and its perplexity is measured again from the reloaded model.
REAP: `mumoe prune --method reap --ratio 0.25` on 128 windows × 512 (its defaults). Skipping rows: thresholds
calibrated on 32 windows of the calib splits (`--skip S`, the eval defaults), the top 10% tokens of each window
protected; OTP's routers trained by `mumoe train-skipper` (its defaults). Decode speed with skipping is
`benchmarks/skip_decode.py` (batch 1; quantized experts run dequantized, at dense speed).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

import mumoe
from mumoe.apply.export import save_pruned
from mumoe.drivers.inputs import calibration
from mumoe.eval.harness import run_lm_eval, task_manager
from mumoe.eval.perplexity import perplexity
from mumoe.loading import load_tokenizer, resolve
from mumoe.observe.calib import read_text
from mumoe.paths import DATA
from mumoe.recipe import CalibSpec
from mumoe.testtime import otp
from mumoe.testtime.skip import calibrate, odp_scores, skipping

ROOT = Path(__file__).resolve().parents[1]
DECODE = " Decode tokens/s at batch 1 are measured by `benchmarks/skip_decode.py` (paired with dense, token by token): on this model dense 134.6 tokens/s and ODP 0.94-0.96x of it at 10-34% skipped (the hooks cost more than the tiny experts they skip); on a qwen3_moe of Qwen3-30B-A3B's widths 1.06x / 1.20x at 19% / 43% skipped (BENCHMARKS.md). Quantized experts run dequantized in memory: dense decode speed."  # the figures of skip_decode.py, recorded in BENCHMARKS.md


def folder_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.glob("*.safetensors")) / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--shares", default="0.1,0.2,0.3")
    ap.add_argument("--out", default=str(ROOT / "results" / "mcsharp"))
    args = ap.parse_args()
    name = resolve("default")
    tok = load_tokenizer(name)
    texts = {p.parent.name: read_text(p) for p in sorted(DATA.glob("*/eval.txt"))}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []

    with task_manager(["local"]) as manager:
        def measure(label: str, model, ctx=None, **extra) -> dict:
            t0 = time.perf_counter()
            ppl, shares = {}, []
            for dom, text in texts.items():
                with ctx() if ctx else _null() as count:
                    ppl[dom] = perplexity(model, tok, text, args.seqlen, 4)["ppl"]
                if count is not None:
                    shares.append(count.share())
            with ctx() if ctx else _null():
                tasks = run_lm_eval(model, tok, ["local"], limit=args.limit, manager=manager)
            acc = {t: m.get("acc", float("nan")) for t, m in tasks.items()}
            row = {"row": label, "ppl": sum(ppl.values()) / len(ppl), "ppl_domains": ppl,
                   "local_acc": sum(acc.values()) / len(acc), "local": acc, **extra}
            if shares:
                row["skipped"] = sum(shares) / len(shares)
            rows.append(row)
            print(f"{label:32s} ppl {row['ppl']:7.2f}  local acc {row['local_acc']:.4f}"
                  + (f"  skipped {row['skipped']:.1%}" if shares else "")
                  + (f"  {extra['mb']:.1f} MB" if "mb" in extra else "") + f"  ({time.perf_counter() - t0:.0f}s)",
                  flush=True)
            return row

        with tempfile.TemporaryDirectory() as tmp:
            measure("dense", mumoe.load(name).eval(), mb=folder_mb(Path(name)))
            for first in (None, "reap"):
                for bits in (3.0, 2.5):
                    model = mumoe.load(name).eval()
                    label = f"PMQ {bits:g} bits"
                    if first:
                        mumoe.prune(model, "reap", 0.25, "domain", tokenizer=tok, source=name)
                        label = f"REAP 25% + {label}"
                    report = mumoe.quantize(model, bits, "domain", tokenizer=tok, nsamples=64)
                    where = Path(tmp) / label.replace(" ", "_").replace("%", "").replace("+", "")
                    save_pruned(model, where, report, tok)
                    measure(label, model, mb=folder_mb(where))
                    back = mumoe.load(str(where)).eval()
                    measure(label + " (reloaded export)", back, mb=folder_mb(where))
                    del model, back
            model = mumoe.load(name).eval()
            report = mumoe.prune(model, "reap", 0.25, "domain", tokenizer=tok, source=name)
            save_pruned(model, Path(tmp) / "reap", report, tok)
            measure("REAP 25%", model, mb=folder_mb(Path(tmp) / "reap"))

        model = mumoe.load(name).eval()
        wins = calibration(CalibSpec(("domain",), 32, 512, None, 4), None, tok)[0]
        twins = calibration(CalibSpec(("domain",), 64, 256, None, 8), None, tok)[0]
        t0 = time.perf_counter()
        routers, _ = otp.train(model, twins)
        print(f"OTP routers trained in {time.perf_counter() - t0:.1f}s", flush=True)
        for label, score in (("ODP", odp_scores), ("OTP", otp.otp_scores(routers))):
            for s in (float(x) for x in args.shares.split(",")):
                betas = calibrate(model, wins, s, 0.1, 4, score=score)
                measure(f"{label} skip {s:.0%}", model, lambda b=betas, sc=score: skipping(model, b, 0.1, sc),
                        target=s)

    (out / "table.json").write_text(json.dumps(rows, indent=1))
    lines = ["| row | mean ppl (4 domains) | local tasks, mean acc | expert calls skipped | safetensors MB |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['row']} | {r['ppl']:.2f} | {r['local_acc']:.4f} | "
                     f"{'' if 'skipped' not in r else format(r['skipped'], '.1%')} | "
                     f"{'' if 'mb' not in r else format(r['mb'], '.1f')} |")
    head = ["# MC# on the bundled model", "",
             "`python benchmarks/mcsharp_table.py` (2-core x86 VM, CPU, fp32). Mean perplexity over the four "
             f"domains' eval splits (seqlen {args.seqlen}, every window); local tasks: the offline "
             f"mumoe_nextline_<domain> tasks, {args.limit} documents each, mean accuracy; safetensors MB: the "
             "export's weights (dense: the bundled bf16 checkpoint). Skipping rows: the share of expert calls "
             "skipped, measured on the eval text; thresholds calibrated for 10/20/30% on 32 windows of the calib "
             "splits. Rows marked (reloaded export) are the export read back with mumoe.load." + DECODE, ""]
    (out / "table.md").write_text("\n".join(head + lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {out / 'table.md'}")


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
