"""The lean one-token decode step (`apply.step`) against transformers' forward, per model, dtype and weight format.

    python benchmarks/lean_step.py [--models bundled,DIR,...] [--dtypes fp32,bf16] [--steps 48] [--repeats 5]

For each model (the bundled one, or checkpoint folders — e.g. the ones `benchmarks/peer_decode.py` made under its
--work) loaded in each dtype, with `fast_decode`'s forwards as `mumoe serve` installs them, without and with int4
copies (`--int4`): a 256-token prompt is prefilled once per round, then --steps greedy tokens are decoded by
transformers' forward and by the lean step, in turns (drifts of the VM hit both alike), each from its own copy of
the prefill's cache. Prints the median milliseconds per step of each, their ratio, and whether the two decodes gave
the same logits bit for bit (they must: the step runs the same operators). Not in CI (a measurement, ~1–3 min).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def load(name: str, dtype: torch.dtype, int4_copies: bool):
    """The model as `mumoe serve [--int4]` holds it: -> (model, its lean step)."""
    from transformers import AutoModelForCausalLM

    from mumoe.apply.gemv import fast_decode
    from mumoe.apply.step import build
    from mumoe.paths import DEFAULT_MODEL

    path = DEFAULT_MODEL if name == "bundled" else Path(name)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    fast_decode(model, int4_copies=int4_copies)
    return model, build(model)


@torch.no_grad()
def decode(model, lean, cache, first: int, steps: int) -> tuple[list[float], torch.Tensor]:
    """Greedy steps from `cache` by the lean step (lean not None) or the forward: -> (seconds per step, logits)."""
    from mumoe.compat import cache_kwarg

    times, out, token = [], [], torch.tensor([[first]])
    for _ in range(steps):
        t0 = time.perf_counter()
        if lean is not None:
            logits = lean.step(token, cache)[0, -1]
        else:
            logits = model(input_ids=token, **{cache_kwarg(): cache}, use_cache=True).logits[0, -1]
        token = logits.argmax().view(1, 1)
        times.append(time.perf_counter() - t0)
        out.append(logits)
    return times, torch.stack(out)


def run(name: str, dtype: str, int4_copies: bool, steps: int, repeats: int) -> dict:
    from mumoe.compat import output_cache
    from mumoe.testtime.kvcache import grow_in_place

    model, lean = load(name, DTYPES[dtype], int4_copies)
    if lean is None:
        return {"model": name, "dtype": dtype, "int4": int4_copies, "lean": None}
    ids = torch.randint(3, model.config.vocab_size, (1, 256), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
    prefilled, first = output_cache(out), int(out.logits[0, -1].argmax())
    times: dict[str, list[float]] = {"forward": [], "lean": []}
    same = True
    for r in range(repeats + 1):  # (round 0 warms up)
        logits = {}
        for kind in ("forward", "lean"):
            cache = copy.deepcopy(prefilled)
            grow_in_place(cache)
            t, logits[kind] = decode(model, lean if kind == "lean" else None, cache, first, steps)
            if r:
                times[kind] += t
        same = same and torch.equal(logits["forward"], logits["lean"])
    f, s = statistics.median(times["forward"]) * 1e3, statistics.median(times["lean"]) * 1e3
    return {"model": name, "dtype": dtype, "int4": int4_copies, "forward_ms": f, "lean_ms": s, "speedup": f / s,
            "bit_identical": same}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="bundled", help="comma list: bundled and/or checkpoint folders")
    ap.add_argument("--dtypes", default="fp32,bf16", help="comma list of fp32, bf16")
    ap.add_argument("--steps", type=int, default=48, help="decode steps per round (default 48)")
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds (default 5, after one warm-up)")
    args = ap.parse_args()
    print("| model | dtype | int4 | forward ms/step | lean ms/step | forward / lean | bit-identical |")
    print("|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        for dtype in args.dtypes.split(","):
            for int4_copies in (False, True):
                r = run(name, dtype, int4_copies, args.steps, args.repeats)
                label = name if name == "bundled" else Path(name).name
                if "lean_ms" not in r:
                    print(f"| {label} | {dtype} | {int4_copies} | – | not supported | – | – |")
                    continue
                print(f"| {label} | {dtype} | {'yes' if int4_copies else 'no'} | {r['forward_ms']:.2f} | "
                      f"{r['lean_ms']:.2f} | {r['speedup']:.2f}x | {'yes' if r['bit_identical'] else 'NO'} |",
                      flush=True)


if __name__ == "__main__":
    main()
