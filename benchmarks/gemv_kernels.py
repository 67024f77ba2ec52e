"""One-token matrix-vector products on this CPU: F.linear vs torch.mv, row- vs column-major, fp32 vs bf16, and
the weight formats a decode step can read (fp32, bf16, int8, int4).

    python benchmarks/gemv_kernels.py [--repeats 15] [--model DIR [--new 48] [--dtype bf16|fp32] [--int4]]

Why `apply.gemv` exists: the decode step of a batch-1 request multiplies one row by each weight, and which torch
call does it decides how fast the weight is read. Each configuration runs over 12 distinct matrices per round (no
cache reuse), the configurations take turns in each round (drifts of the VM hit all alike); medians, with the
read rate (weight bytes / time). Prints the ratio that `apply.gemv` is chosen by: F.linear / torch.mv on row-major
half precision. --model DIR (a checkpoint, e.g. one `benchmarks/peer_decode.py` made under its --work): dense
requests through `mumoe serve`'s engine (256-token prompt, --new greedy tokens) with `fast_decode`'s forwards on and
off in turns, in one process; decode tokens/s medians and their ratio. --dtype bf16 (default): torch.mv linears and
the picked experts' one-token path; fp32: the experts' path only (fp32 linears are left to F.linear), against
transformers' grouped_mm. --int4 with --model: fast_decode's forwards reading int4 copies (`mumoe serve --int4`)
against the same forwards on the weights. The formats table: one row times each matrix by torch.mv (fp32, bf16),
torch's weight-only int8 kernel (per-row scales, bf16 activations: `apply.int8`) and its int4 kernel (groups of 32,
bf16 activations: `apply.int4`), read rates in bytes of the format, and a 256-row prefill's product by bf16
F.linear and by the int4 kernel. Not in CI (a measurement, ~1–4 min).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.nn import functional as F

SHAPES = [(5632, 2048), (2048, 5632), (1024, 1024), (1024, 512)]  # Llama MLP, MoE expert gate_up / down


def measure(dtype: torch.dtype, shape: tuple[int, int], repeats: int, n: int = 12) -> dict[str, float]:
    g = torch.Generator().manual_seed(0)
    rows = [torch.randn(*shape, generator=g).to(dtype) for _ in range(n)]  # row-major [N, K]
    cols = [w.t().contiguous().t() for w in rows]  # the same values, column-major
    x = torch.randn(1, shape[1], generator=g).to(dtype)
    calls = {"linear row": lambda w: F.linear(x, w), "mv row": lambda w: torch.mv(w, x[0])}
    times: dict[str, list[float]] = {}
    for _ in range(repeats):
        for name, f in list(calls.items()) + [("linear col", lambda w: F.linear(x, w))]:
            mats = cols if name.endswith("col") else rows
            t0 = time.perf_counter()
            for w in mats:
                f(w)
            times.setdefault(name, []).append((time.perf_counter() - t0) / n)
    return {k: statistics.median(v) for k, v in times.items()}


def formats(shape: tuple[int, int], repeats: int, n: int = 12) -> dict[str, tuple[float, int]]:
    """One row times each of n distinct [N, K] matrices, per weight format: -> {format: (median s, bytes read)}."""
    from mumoe.apply.int4 import Int4Weight
    from mumoe.apply.int8 import int8_linear, quantize_rows

    g = torch.Generator().manual_seed(1)
    full = [torch.randn(*shape, generator=g) * 0.02 for _ in range(n)]
    x = torch.randn(1, shape[1], generator=g)
    xb = x.bfloat16()
    fp32, bf16 = full, [w.bfloat16() for w in full]
    int8 = [quantize_rows(w) for w in full]
    int4 = [Int4Weight.of(w) for w in full]
    numel = shape[0] * shape[1]
    xs = torch.randn(256, shape[1], generator=g).bfloat16()  # a 256-token prefill's rows
    calls = {"fp32 mv": (lambda i: torch.mv(fp32[i], x[0]), 4 * numel),
             "bf16 mv": (lambda i: torch.mv(bf16[i], xb[0]), 2 * numel),
             "int8 kernel": (lambda i: int8_linear(xb, *int8[i]), numel + 4 * shape[0]),
             "int4 kernel": (lambda i: int4[i].matmul(xb), int4[0].nbytes),
             "bf16 linear 256": (lambda i: F.linear(xs, bf16[i]), 2 * numel),
             "int4 kernel 256": (lambda i: int4[i].matmul(xs), int4[0].nbytes)}
    times: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(repeats):
        for name, (f, _) in calls.items():
            t0 = time.perf_counter()
            for i in range(n):
                f(i)
            times[name].append((time.perf_counter() - t0) / n)
    return {k: (statistics.median(v), calls[k][1]) for k, v in times.items()}


def engine_ab(path: str, new: int, repeats: int, dtype: str = "bf16", int4: bool = False) -> None:
    """Dense requests through the serving engine with `apply.gemv.fast_decode` on and off, in turns; int4: on =
    fast_decode reading int4 copies, off = the same forwards on the weights."""
    from mumoe import load
    from mumoe.apply import int4 as int4_mod
    from mumoe.loading import load_tokenizer
    from mumoe.models.swap import restore_forward
    from mumoe.serve.engine import Engine, Pruning, Sampling

    model, tok = load(path, dtype), load_tokenizer(path)
    engine = Engine(model, tok, path, int4=int4)  # installs fast_decode's forwards (and the int4 copies)
    engine.eos = set()
    installed = [(m, m.__dict__["forward"]) for m in model.modules() if "forward" in m.__dict__]
    limit = int4_mod.DECODE_ROWS
    ids = torch.randint(10, 8000, (256,), generator=torch.Generator().manual_seed(0)).tolist()
    rates: dict[bool, list[float]] = {True: [], False: []}
    for r in range(repeats + 1):  # the first round warms up
        for on in (True, False):
            if int4:
                int4_mod.DECODE_ROWS = limit if on else 0
            for m, f in installed:
                if on or int4:
                    m.forward = f
                else:
                    restore_forward(m, None)
            stamps: list[float] = []
            engine.run(ids, Sampling(max_tokens=new, temperature=0.0), Pruning(),
                       lambda text, entries: stamps.append(time.perf_counter()))
            if r:
                rates[on].append((new - 1) / (stamps[-1] - stamps[0]))
    int4_mod.DECODE_ROWS = limit
    on, off = statistics.median(rates[True]), statistics.median(rates[False])
    what = ("with int4 copies", "on the weights") if int4 else ("with fast_decode", "without")
    print(f"{path}: {len(installed)} forwards; dense {dtype} decode {on:.1f} tok/s {what[0]}, {off:.1f} "
          f"{what[1]}: {on / off:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=15, help="rounds (default 15)")
    ap.add_argument("--model", help="a checkpoint: time dense decode through the engine, fast_decode on/off")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"], help="with --model: the weights' dtype "
                    "(default bf16)")
    ap.add_argument("--new", type=int, default=48, help="new tokens per request with --model (default 48)")
    ap.add_argument("--int4", action="store_true", help="with --model: int4 copies on/off (fast_decode both ways)")
    args = ap.parse_args()
    if args.model:
        engine_ab(args.model, args.new, min(args.repeats, 6), args.dtype, args.int4)
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| dtype | shape | F.linear row-major | torch.mv row-major | F.linear column-major | linear / mv |")
    print("|---|---|---|---|---|---|")
    for dtype in (torch.bfloat16, torch.float32):
        for shape in SHAPES:
            m = measure(dtype, shape, args.repeats)
            nbytes = shape[0] * shape[1] * torch.finfo(dtype).bits // 8
            cell = {k: f"{v * 1e6:.0f} µs ({nbytes / v / 1e9:.1f} GB/s)" for k, v in m.items()}
            print(f"| {str(dtype)[6:]} | {shape[0]}×{shape[1]} | {cell['linear row']} | {cell['mv row']} | "
                  f"{cell['linear col']} | {m['linear row'] / m['mv row']:.2f} |")
    print("\n| shape | fp32 mv | bf16 mv | int8 kernel | int4 kernel | bf16 mv / int4 | 256 rows: bf16 F.linear "
          "/ int4 kernel |")
    print("|---|---|---|---|---|---|---|")
    for shape in SHAPES:
        m = formats(shape, args.repeats)
        cell = {k: f"{t * 1e6:.0f} µs ({b / t / 1e9:.1f} GB/s)" for k, (t, b) in m.items()}
        print(f"| {shape[0]}×{shape[1]} | {cell['fp32 mv']} | {cell['bf16 mv']} | {cell['int8 kernel']} | "
              f"{cell['int4 kernel']} | {m['bf16 mv'][0] / m['int4 kernel'][0]:.2f} | "
              f"{m['bf16 linear 256'][0] * 1e3:.2f} / {m['int4 kernel 256'][0] * 1e3:.2f} ms |")


if __name__ == "__main__":
    main()
