"""The prepared device check: what a lent GPU should confirm, in one run of at most ~8 minutes.

    python benchmarks/gpu_check.py --device cuda                 # on a GPU machine (the device tool's one call)
    python benchmarks/gpu_check.py --device cpu --small --out D  # the CI-sized form (tests/test_gpu_check.py)

Steps, each recorded with its figures and a pass/fail (the run exits 1 if one fails; every step runs):
1. tiny: on tiny qwen3_moe / mixtral / deepseek_v3 models, the device against the CPU in float32 — dense logits
   (max |Δ|), REAP 25% kept sets, HEAPr 50% kept atoms (share equal), Wanda 50% logits, ratio 0 leaves the
   logits unchanged, PMQ's widths, ODP skipping with the sentinel equal to zeroed combine weights (the experts
   implementation the device picks: grouped_mm on CUDA), OTP's routers trained from the device's activations.
2. layerwise: a synthetic qwen3_moe checkpoint (bf16 files, per-expert keys; --small: a few MiB) pruned layer by
   layer with REAP and HEAPr in --dtype on the device (`drivers.layerwise.prune_layerwise`); kept sets against the
   in-memory run of the same checkpoint on the same device; time, peak device memory against the largest layer.
3. decode: a synthetic Llama (hidden 2048, 4 layers; --small: 256) prefilled with a 256-token prompt and decoded
   at batch 1, dense against μ-MoE column ρ = 0.5 (compacted weights), paired token by token; tokens/s each.
4. batch: the same Llama, 8 prompts of different lengths decoded together (`serve.batch`, continuous batching of
   `mumoe serve`): each row's logits against its batch-1 decode, and tokens/s of the batch against one stream.
Writes OUT/gpu_check_<device>.json (default OUT: benchmarks/results).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

ARCHS = ("qwen3_moe", "mixtral", "deepseek_v3")


def tiny_step(device: str, small: bool) -> dict:
    import mumoe
    from conftest import ids, make
    from mumoe.testtime.skip import calibrate, skipping
    import mumoe.testtime.skip as skip

    out: dict = {}
    x = ids(batch=2, length=16, seed=0)
    wins = ids(batch=8, length=16, seed=1)
    for arch in ARCHS[:2] if small else ARCHS:
        res: dict = {}
        cpu, dev = make(arch).eval(), make(arch).eval().to(device)
        with torch.no_grad():
            ref = cpu(x).logits
            res["dense_max_abs_diff"] = float((dev(x.to(device)).logits.cpu() - ref).abs().max())
        kept = {}
        for where, model in (("cpu", make(arch).eval()), (device, make(arch).eval().to(device))):
            rep = mumoe.prune(model, "reap", 0.25, wins, nsamples=8, seqlen=16, batch_size=4, device=where)
            kept[where] = [e["kept"] for e in rep.layers]
        res["reap_kept_equal"] = kept["cpu"] == kept[device]
        atoms = {}
        for where, model in (("cpu", make(arch).eval()), (device, make(arch).eval().to(device))):
            rep = mumoe.prune(model, "heapr", 0.5, wins, nsamples=8, seqlen=16, batch_size=4, device=where)
            atoms[where] = [set(map(tuple, [(x["expert"], k) for x in e["experts"] for k in x["kept"]]))
                            for e in rep.layers]
        same = sum(len(a & b) for a, b in zip(atoms["cpu"], atoms[device]))
        res["heapr_atoms_equal_share"] = same / max(1, sum(len(a) for a in atoms["cpu"]))
        logits = {}
        for where, model in (("cpu", make(arch).eval()), (device, make(arch).eval().to(device))):
            mumoe.prune(model, "wanda", 0.5, wins, nsamples=8, seqlen=16, batch_size=4, device=where)
            with torch.no_grad():
                logits[where] = model(x.to(where)).logits.cpu()
        res["wanda_max_abs_diff"] = float((logits["cpu"] - logits[device]).abs().max())
        model = make(arch).eval().to(device)
        mumoe.prune(model, "reap", 0.0, wins, nsamples=8, seqlen=16, batch_size=4, device=device)
        with torch.no_grad():
            res["ratio0_unchanged"] = bool(torch.equal(model(x.to(device)).logits.cpu(),
                                                       dev(x.to(device)).logits.cpu()))
        widths = {}
        for where, model in (("cpu", make(arch).eval()), (device, make(arch).eval().to(device))):
            rep = mumoe.quantize(model, 2.0, wins.to(where), group=16, nsamples=8, seqlen=16, batch_size=4)
            widths[where] = [[x["bits"] for x in e["experts"]] for e in rep.layers]
        res["pmq_widths_equal"] = widths["cpu"] == widths[device]
        model = make(arch).eval().to(device)
        if {layer.scoring for layer in mumoe.models.moe_adapter_for(model).moe_layers()} <= {"softmax", "sigmoid"}:
            betas = calibrate(model, wins.to(device), 0.3, 0.0, 4)
            with torch.no_grad():
                with skipping(model, betas, 0.0) as count:
                    fast = model(x.to(device)).logits.cpu()
                saved = skip.sentinel_of
                skip.sentinel_of = lambda layer: None
                try:
                    with skipping(model, betas, 0.0):
                        slow = model(x.to(device)).logits.cpu()
                finally:
                    skip.sentinel_of = saved
            res["skip_share"] = count.share()
            res["skip_sentinel_max_abs_diff"] = float((fast - slow).abs().max())
            res["experts_implementation"] = model.config._experts_implementation
            from mumoe.testtime import otp

            routers, _ = otp.train(model, wins, otp.OTPConfig(steps=20))  # windows on the CPU: moved to the model
            score = otp.otp_scores(routers)
            with torch.no_grad(), skipping(model, calibrate(model, wins, 0.3, 0.0, 4, score=score), 0.0,
                                           score) as count:
                model(x.to(device))
            res["otp_skip_share"] = count.share()
        res["ok"] = bool(res["dense_max_abs_diff"] < 1e-3 and res["reap_kept_equal"] and res["ratio0_unchanged"]
                         and res["heapr_atoms_equal_share"] > 0.95 and res["wanda_max_abs_diff"] < 1e-2
                         and res["pmq_widths_equal"] and res.get("skip_sentinel_max_abs_diff", 0) < 1e-4
                         and res.get("otp_skip_share", 1) > 0)
        out[arch] = res
    out["ok"] = all(r["ok"] for r in out.values())
    return out


def layerwise_step(device: str, small: bool, dtype: str, work: Path) -> dict:
    from calib_memory import write_checkpoint

    import mumoe
    from mumoe.drivers.layerwise import prune_layerwise
    from mumoe.observe.layerwise import LayerwiseCheckpoint
    from mumoe.recipe import Recipe

    a = argparse.Namespace(arch="qwen3_moe", layers=4 if small else 16, hidden=256 if small else 1024,
                           inter=64 if small else 512, experts=8 if small else 64, top_k=2 if small else 4,
                           vocab=512 if small else 32000)
    folder = work / "ckpt"
    write_checkpoint(folder, a)
    n, L = (4, 32) if small else (16, 256)
    wins = torch.randint(3, a.vocab, (n, L), generator=torch.Generator().manual_seed(1))
    ckpt_mb = sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2**20
    layer_mb = LayerwiseCheckpoint(folder, getattr(torch, {"bf16": "bfloat16", "fp32": "float32"}[dtype])
                                   ).layer_bytes() / 2**20
    res: dict = {"checkpoint_mb": ckpt_mb, "layer_mb": layer_mb, "dtype": dtype}
    for method, opts in (("reap", {}), ("heapr", {"form": "uniform", "width_multiple": 8 if small else 64})):
        recipe = Recipe.build(method, 0.25, calib="tensor", nsamples=n, seqlen=L, batch_size=4, dtype=dtype,
                              device=device, **opts)
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        rep = prune_layerwise(folder, recipe, work / method, (wins, None, {"source": "random ids"}),
                              overwrite=True, verbose=False)
        seconds = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None
        model = mumoe.load(str(folder), dtype=dtype).to(device)
        mem = mumoe.prune(model, recipe, calib=wins)
        key = "kept" if method == "reap" else "experts"
        same = [e[key] for e in rep.layers] == [e[key] for e in mem.layers]
        res[method] = {"seconds": seconds, "device_peak_mb": peak, "equal_to_in_memory": same}
        del model
    res["ok"] = all(res[m]["equal_to_in_memory"] for m in ("reap", "heapr"))
    return res


def _llama(device: str, small: bool):
    """The decode steps' synthetic Llama (hidden 2048, 4 layers; small: 256, 2), random weights, on `device`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    H = 256 if small else 2048
    cfg = LlamaConfig(hidden_size=H, intermediate_size=H * 11 // 4, num_hidden_layers=2 if small else 4,
                      num_attention_heads=max(4, H // 128), num_key_value_heads=max(4, H // 128),
                      vocab_size=2048 if small else 8192, max_position_embeddings=4096)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval().to(device)


def decode_step(device: str, small: bool) -> dict:
    from testtime_decode import alternate

    from mumoe.apply.compact import compact, prepare_columns
    from mumoe.observe.collectors import input_norms
    from mumoe.select.weights import masks_from_norms

    model = _llama(device, small)
    cfg = model.config
    prompt = torch.randint(0, cfg.vocab_size, (1, 64 if small else 256)).to(device)
    with torch.no_grad():
        norms = input_norms(model, prompt)
    masks = masks_from_norms(model, norms, 0.5, "column")
    prepare_columns(model)
    comp = compact(model, masks)
    times = alternate({"dense": (model, lambda on: None), "column 0.5": (model, comp.use)}, prompt,
                      8 if small else 32, 1 if small else 3, "growing")
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    res = {k.replace(" ", "_") + "_tokens_per_s": 1 / v for k, v in med.items()}
    res["speedup"] = med["dense"] / med["column 0.5"]
    res["ok"] = res["speedup"] > 0
    return res


def batch_step(device: str, small: bool) -> dict:
    """Continuous batching (`mumoe.serve.batch`, what `mumoe serve` runs for dense requests) on the device: 8
    prompts of different lengths decoded together, each row's logits against its own batch-1 decode (same tokens
    fed), and the decode tokens/s of the batch against the 8 decoded one after another."""
    from types import SimpleNamespace

    from mumoe.compat import cache_kwarg, output_cache
    from mumoe.serve.batch import DecodeBatch, Row
    from mumoe.testtime.kvcache import grow_in_place

    model = _llama(device, small)
    cfg = model.config
    new = 8 if small else 64
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, cfg.vocab_size, (1, (16 if small else 64) * (i + 1)), generator=g).to(device)
               for i in range(8)]

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    ref, feeds, caches, alone_s = [], [], [], 0.0
    with torch.no_grad():
        for x in prompts:
            out = model(input_ids=x, use_cache=True)
            cache, logits = output_cache(out), [out.logits[0, -1]]
            grow_in_place(cache)  # (as the serving engine's batch-1 loop)
            tokens = [int(out.logits[0, -1].argmax())]
            sync()
            t0 = time.perf_counter()
            for _ in range(new):
                out = model(input_ids=torch.tensor([[tokens[-1]]], device=device), **{cache_kwarg(): cache},
                            use_cache=True)
                logits.append(out.logits[0, -1])
                tokens.append(int(out.logits[0, -1].argmax()))
            sync()
            alone_s += time.perf_counter() - t0
            ref.append(torch.stack(logits).float().cpu())
            feeds.append(tokens)
            out = model(input_ids=x, use_cache=True)  # a fresh cache for the batch
            caches.append((output_cache(out), out.logits[0, -1]))
        batch = DecodeBatch(torch.device(device))
        got = [[first] for _, first in caches]
        for i, (cache, _) in enumerate(caches):
            row = Row(SimpleNamespace(token=feeds[i][0]), prompts[i].shape[1], {}, length=prompts[i].shape[1])
            batch.join(row, cache, model)
        sync()
        t0 = time.perf_counter()
        for step in range(new):
            logits = batch.step()
            for i, row in enumerate(batch.rows):
                got[i].append(logits[i])
                row.decoding.token = feeds[i][step + 1]
        sync()
        batch_s = time.perf_counter() - t0
    diff = max((torch.stack(g_).float().cpu() - r).abs().max().item() for g_, r in zip(got, ref))
    scale = max(r.abs().max().item() for r in ref)
    res = {"rows": 8, "new_tokens": new, "max_abs_diff": diff, "logit_scale": scale,
           "alone_tokens_per_s": 8 * new / alone_s, "batch_tokens_per_s": 8 * new / batch_s}
    res["batch_over_alone"] = res["batch_tokens_per_s"] / res["alone_tokens_per_s"]
    res["ok"] = diff <= 1e-3 * max(1.0, scale)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="the layer-sequential step's dtype (default bf16 on cuda, fp32 "
                    "on cpu)")
    ap.add_argument("--small", action="store_true", help="CI-sized models (seconds on a CPU)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--steps", default="tiny,layerwise,decode,batch")
    args = ap.parse_args()
    dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    result: dict = {"device": args.device, "small": args.small, "torch": torch.__version__,
                    "machine": platform.platform(),
                    "gpu": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None}
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for step in args.steps.split(","):
            t0 = time.perf_counter()
            try:
                if step == "tiny":
                    res = tiny_step(args.device, args.small)
                elif step == "layerwise":
                    res = layerwise_step(args.device, args.small, dtype, Path(tmp))
                elif step == "decode":
                    res = decode_step(args.device, args.small)
                elif step == "batch":
                    res = batch_step(args.device, args.small)
                else:
                    raise SystemExit(f"unknown step {step!r}")
            except Exception as e:  # noqa: BLE001 - one failing step must not hide the others
                res = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
            res["step_s"] = time.perf_counter() - t0
            result[step] = res
            print(f"{step:10s} {'ok' if res['ok'] else 'FAILED'} in {res['step_s']:.1f}s"
                  + (f": {res['error']}" if "error" in res else ""), flush=True)
    result["total_s"] = time.perf_counter() - t_all
    out = Path(args.out) / f"gpu_check_{args.device.replace(':', '')}{'_small' if args.small else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str))
    print(f"wrote {out} ({result['total_s']:.0f}s)")
    return 0 if all(result[s]["ok"] for s in args.steps.split(",")) else 1


if __name__ == "__main__":
    raise SystemExit(main())
