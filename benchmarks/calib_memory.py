"""Layer-sequential calibration of a checkpoint 3x larger than the memory the process may use.

    python benchmarks/calib_memory.py                     # 16 layers, hidden 1024, 64 experts x 512, bf16 files
    python benchmarks/calib_memory.py --cap-mb 1100 --methods reap,reap-progressive,heapr --peer /tmp/peer/bin/python
    python benchmarks/calib_memory.py --device cuda --dtype bf16 --layers 48 --cap-mb 8192   # on a GPU machine
    python benchmarks/calib_memory.py --arch gpt_oss --dir /tmp/mumoe-bench/gptoss --layers 8 --experts 32 \
        --inter 1024 --cap-mb 1400 --methods reap,heapr --tag=-gpt-oss    # MXFP4 experts, dequantized per layer
    python benchmarks/calib_memory.py --arch nemotron_h --dir /tmp/mumoe-bench/nemotron --layers 16 \
        --cap-mb 1100 --methods reap,heapr --tag=-nemotron-h              # hybrid stack, experts without a gate

1. Writes a synthetic qwen3_moe checkpoint (random bf16 weights, per-expert keys as on the hub, one shard per
   layer) to --dir, layer by layer (never the whole model in memory).
2. Baseline, no cap: the model loaded whole (`from_pretrained`, --dtype) and a plain forward of the same windows.
   Computation runs in --dtype (default fp32: this CPU has no bf16 matrix units, bf16 matmuls are ~5x slower;
   on a GPU use --dtype bf16 --device cuda); the files stay bf16, so the resident layer is --dtype sized.
3. For each method, a child process inside a cgroup-v1 memory cgroup capped at --cap-mb (memory.limit_in_bytes;
   swap capped too where the kernel offers memory.memsw) runs `mumoe.drivers.layerwise.prune_layerwise` on --device:
   layer-sequential scoring + streamed export of the pruned checkpoint. The child reports its peak RSS
   (getrusage), the RSS after imports (torch + transformers, before any work), and the bound
       1.2 x (largest decoder layer + activations + statistics)
   with its terms; the parent reads the cgroup's own peak (memory.max_usage_in_bytes, page cache included).
4. With --peer PYTHON (llm-compressor's venv): its REAP (`benchmarks/peer_reap.py`: oneshot, sequential
   pipeline) under the same cap, then without a cap — wall time, peak RSS, kept sets against mumoe's.
Needs root (the cgroup). Writes benchmarks/results/calib_memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

CG = Path("/sys/fs/cgroup/memory")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def write_shards(folder: Path, groups: dict[str, dict]) -> None:
    """One safetensors shard per group of tensors (a decoder layer's, the head's), with the index."""
    from safetensors.torch import save_file

    weight_map = {}
    for i, (j, t) in enumerate(groups.items()):
        name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file(t, folder / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in t})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def write_gpt_oss(folder: Path, a) -> None:
    """A GPT-OSS checkpoint in the released format: experts MXFP4-packed (random FP4 codes and power-of-two
    scales: <experts>.gate_up_proj_blocks / _scales ...), everything else bf16, one shard per decoder layer; the
    tensor names and shapes are those of transformers' own GPT-OSS model of the config (a meta skeleton)."""
    from transformers import AutoModelForCausalLM, GptOssConfig

    folder.mkdir(parents=True, exist_ok=True)
    cfg = GptOssConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.inter, num_local_experts=a.experts,
                       num_experts_per_tok=a.top_k, num_hidden_layers=a.layers, num_attention_heads=a.hidden // 64,
                       num_key_value_heads=4, head_dim=64, max_position_embeddings=4096, sliding_window=128,
                       dtype="bfloat16", tie_word_embeddings=False)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in AutoModelForCausalLM.from_config(cfg).state_dict().items()}
    cfg.quantization_config = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    cfg.save_pretrained(folder)
    gen = torch.Generator().manual_seed(0)
    groups: dict[str, dict] = {}
    for k, shape in shapes.items():
        j = k.split(".")[2] if k.startswith("model.layers.") else "head"
        if k.endswith(("experts.gate_up_proj", "experts.down_proj")):
            E, cin, cout = shape  # the family's [E, in, out]; packed as [E, out, in / 32, 16] + [E, out, in / 32]
            groups.setdefault(j, {})[k + "_blocks"] = torch.randint(0, 256, (E, cout, cin // 32, 16), generator=gen,
                                                                    dtype=torch.uint8)
            groups[j][k + "_scales"] = torch.randint(118, 123, (E, cout, cin // 32), generator=gen, dtype=torch.uint8)
        elif k.endswith("norm.weight"):
            groups.setdefault(j, {})[k] = torch.ones(shape, dtype=torch.bfloat16)
        else:
            groups.setdefault(j, {})[k] = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
    write_shards(folder, groups)


def write_nemotron_h(folder: Path, a) -> None:
    """A Nemotron-H checkpoint as transformers saves one (`backbone.` keys, one up_proj and down_proj per expert:
    experts without a gate), Mamba-2 and MoE blocks alternating with an attention block every fourth layer, bf16,
    one shard per decoder layer; names and shapes from transformers' own model of the config (a meta skeleton)."""
    from transformers import AutoModelForCausalLM, NemotronHConfig

    folder.mkdir(parents=True, exist_ok=True)
    kinds = [("full_attention" if j % 4 == 2 else "linear_attention") if j % 2 == 0 else "moe" for j in range(a.layers)]
    cfg = NemotronHConfig(vocab_size=a.vocab, hidden_size=a.hidden, layers_block_type=kinds,
                          num_attention_heads=a.hidden // 64, num_key_value_heads=4, head_dim=64,
                          intermediate_size=4 * a.hidden,
                          moe_intermediate_size=a.inter, moe_shared_expert_intermediate_size=2 * a.inter,
                          n_routed_experts=a.experts, num_experts_per_tok=a.top_k, n_group=1, topk_group=1,
                          mamba_num_heads=a.hidden // 32, mamba_head_dim=64, ssm_state_size=64, n_groups=4,
                          chunk_size=64, max_position_embeddings=4096, dtype="bfloat16", tie_word_embeddings=False)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in AutoModelForCausalLM.from_config(cfg).state_dict().items()}
    cfg.save_pretrained(folder)
    gen = torch.Generator().manual_seed(0)
    groups: dict[str, dict] = {}
    for k, shape in shapes.items():
        j = k.split(".")[2] if k.startswith("model.layers.") else "head"
        key = "backbone." + k[len("model."):] if k.startswith("model.") else k
        t = groups.setdefault(j, {})
        if key.endswith(("experts.up_proj", "experts.down_proj")):  # [E, out, in] -> one matrix per expert
            stem, kind = key.rsplit(".", 1)
            for e in range(shape[0]):
                t[f"{stem}.{e}.{kind}.weight"] = (torch.randn(shape[1:], generator=gen) * 0.02).to(torch.bfloat16)
        elif key.endswith(("norm.weight", ".D")):
            t[key] = torch.ones(shape, dtype=torch.bfloat16)
        else:
            t[key] = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
    write_shards(folder, groups)


def write_checkpoint(folder: Path, a) -> None:
    """One safetensors shard per decoder layer (+ one for embeddings/norm/head), per-expert keys."""
    from safetensors.torch import save_file
    from transformers import Qwen3MoeConfig

    if (folder / "model.safetensors.index.json").exists():
        return
    if a.arch == "gpt_oss":
        return write_gpt_oss(folder, a)
    if a.arch == "nemotron_h":
        return write_nemotron_h(folder, a)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = Qwen3MoeConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=4 * a.hidden,
                         moe_intermediate_size=a.inter, num_experts=a.experts, num_experts_per_tok=a.top_k,
                         num_hidden_layers=a.layers, num_attention_heads=a.hidden // 64, num_key_value_heads=4,
                         head_dim=64, max_position_embeddings=4096, norm_topk_prob=True, dtype="bfloat16",
                         tie_word_embeddings=False)
    cfg.save_pretrained(folder)
    gen = torch.Generator().manual_seed(0)
    H, I, E, D = a.hidden, a.inter, a.experts, 64

    def w(*shape):
        return (torch.randn(*shape, generator=gen) * 0.02).to(torch.bfloat16)

    weight_map = {}
    heads, kv = a.hidden // 64, 4
    for j in range(a.layers):
        p = f"model.layers.{j}."
        t = {p + "input_layernorm.weight": torch.ones(H, dtype=torch.bfloat16),
             p + "post_attention_layernorm.weight": torch.ones(H, dtype=torch.bfloat16),
             p + "self_attn.q_proj.weight": w(heads * D, H), p + "self_attn.k_proj.weight": w(kv * D, H),
             p + "self_attn.v_proj.weight": w(kv * D, H), p + "self_attn.o_proj.weight": w(H, heads * D),
             p + "self_attn.q_norm.weight": torch.ones(D, dtype=torch.bfloat16),
             p + "self_attn.k_norm.weight": torch.ones(D, dtype=torch.bfloat16),
             p + "mlp.gate.weight": w(E, H)}
        for e in range(E):
            t[p + f"mlp.experts.{e}.gate_proj.weight"] = w(I, H)
            t[p + f"mlp.experts.{e}.up_proj.weight"] = w(I, H)
            t[p + f"mlp.experts.{e}.down_proj.weight"] = w(H, I)
        name = f"model-{j + 1:05d}-of-{a.layers + 1:05d}.safetensors"
        save_file(t, folder / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in t})
        print(f"\r  wrote layer {j + 1}/{a.layers}", end="", flush=True)
    name = f"model-{a.layers + 1:05d}-of-{a.layers + 1:05d}.safetensors"
    t = {"model.embed_tokens.weight": w(a.vocab, H), "model.norm.weight": torch.ones(H, dtype=torch.bfloat16),
         "lm_head.weight": w(a.vocab, H)}
    save_file(t, folder / name, metadata={"format": "pt"})
    weight_map.update({k: name for k in t})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    print()


def windows(a) -> torch.Tensor:
    return torch.randint(3, a.vocab, (a.nsamples, a.seqlen), generator=torch.Generator().manual_seed(1))


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child_plain(a) -> dict:
    from transformers import AutoModelForCausalLM

    base = current_rss_mb()
    t0 = time.perf_counter()
    kw = {}
    if a.arch == "gpt_oss":  # what mumoe.load does too: MXFP4 experts dequantized (else kept packed where Triton is)
        from transformers import Mxfp4Config

        kw["quantization_config"] = Mxfp4Config(dequantize=True)
    model = AutoModelForCausalLM.from_pretrained(a.dir, dtype=DTYPES[a.dtype], **kw).eval()
    t_load = time.perf_counter() - t0
    model_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    wins = windows(a)
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(wins), a.batch_size):
            model(input_ids=wins[i:i + a.batch_size], use_cache=False)
    res = {"load_s": t_load, "forward_s": time.perf_counter() - t0, "peak_rss_mb": rss_mb(), "base_rss_mb": base,
           "model_mb": model_mb}
    if "heapr" in a.methods.split(","):  # HEAPr's reference: a plain forward + backward of the summed LM loss
        for p in model.parameters():
            p.requires_grad_(False)
        t0 = time.perf_counter()
        for i in range(0, len(wins), a.batch_size):
            ids = wins[i:i + a.batch_size]
            x = model.get_input_embeddings()(ids).detach().requires_grad_(True)
            logits = model(inputs_embeds=x, use_cache=False).logits
            torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(),
                                              reduction="sum").backward()
        res["forward_backward_s"] = time.perf_counter() - t0
    return res


def child_prune(a, method: str) -> dict:
    import mumoe.drivers.layerwise as streamed
    from mumoe.observe.layerwise import LayerwiseCheckpoint
    from mumoe.recipe import Recipe

    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):  # import the modelling code (~150 MiB of Python modules) before measuring
        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(a.dir))
    base = current_rss_mb()
    from mumoe.criteria import get_method

    name = method.removesuffix("-progressive")
    grain = get_method(name).grain
    opts = ({"order": "progressive" if method.endswith("-progressive") else "one-shot"} if grain == "expert" else
            {"form": "uniform"} if grain == "atom" else {})
    recipe = Recipe.build(name, 0.25, calib="tensor", nsamples=a.nsamples, seqlen=a.seqlen,
                          batch_size=a.batch_size, dtype=a.dtype, device=a.device, **opts)
    out = Path(a.out) / method
    wins = windows(a)
    t0 = time.perf_counter()
    info: dict = {}
    report = streamed.prune_layerwise(a.dir, recipe, out, (wins, None, {"source": "random ids"}), overwrite=True,
                                      verbose=False, spill_bytes=int(a.spill_mb * 2**20),
                                      max_shard_bytes=int(a.shard_mb * 2**20), timing=info)
    total = time.perf_counter() - t0
    ckpt = LayerwiseCheckpoint(a.dir, DTYPES[a.dtype])
    layer = ckpt.layer_bytes()
    acts = a.nsamples * a.seqlen * a.hidden * DTYPES[a.dtype].itemsize  # one layer's inputs
    n_layers = len(ckpt.decoder.layers)
    kept_acts = acts * (2 if name != "heapr" else (n_layers + 2))  # in + out; HEAPr: every layer's input + grads
    T, k, E, I = a.nsamples * a.seqlen, a.top_k, a.experts, a.inter
    if grain == "atom":
        stats = E * I * 8 * 4
    elif grain == "merge":  # float64 sums [E, H] and [E, E] x 2; one chunk of outputs (pairwise: the 256 MiB budget)
        m = get_method(name)
        pairwise = "pairwise" in m.merge_stats
        stats = E * a.hidden * 8 + 2 * E * E * 8 + (256 << 20 if pairwise else min(T, 1024) * (a.hidden + a.inter * 3) * 4)
        if "ream" in m.merge_stats:  # + the activation sample, the PCA (128 MiB rows, covariance, features), a group
            D = 3 * a.hidden
            stats += (E * min(T, 2048) * I * 4 + (128 << 20) + D * D * 8 + E * I * 64 * 8
                      + min(E, 16) * 3 * I * a.hidden * 8)
        if m.operator == "recombine":  # two 64 MiB blocks of segments and their cosines; one kept expert in fp64
            block = max(1, (64 << 20) // (I * 3 * a.hidden * 4)) * I
            stats += 2 * (64 << 20) + block * block * 4 + 2 * I * a.hidden * 8 + E * 2 * I * a.hidden * 2
    else:
        stats = T * k * 16 + E * 8 * 8
    shard = a.shard_mb * 2**20
    sweep = info["sweep"]
    calib_work = (info["calib_peak_rss_mb"] - base) * 2**20
    gpu = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() and a.device != "cpu" else None
    return {"gpu_peak_mb": gpu,"total_s": total, "calib_s": info["calib_s"], "export_s": info["export_s"],
            "calib_peak_rss_mb": info["calib_peak_rss_mb"], "calib_working_mb": calib_work / 2**20,
            "export_bound_mb": 2.4 * shard / 2**20,
            "spilled_mb": sweep.spilled_bytes / 2**20, "read_s": sweep.seconds.get("read"),
            "sweep_s": sweep.seconds.get("total"), "ram_activations_peak_mb": sweep.peak_ram_activations / 2**20,
            "peak_rss_mb": rss_mb(), "base_rss_mb": base, "layer_mb": layer / 2**20,
            "activations_mb": kept_acts / 2**20, "stats_mb": stats / 2**20, "shard_buffer_mb": shard / 2**20,
            "bound_mb": 1.2 * (layer + kept_acts + stats) / 2**20,
            "kept": [e["kept"] for e in report.layers] if report.grain == "expert" else None,
            "groups": [e["groups"] for e in report.layers] if report.grain == "merge" else None}


def capped(cmd: list[str], cap: int | None, check: bool = True) -> tuple[dict | None, int]:
    """Run cmd in a fresh memory cgroup capped at `cap` bytes (None: no cap) -> (its JSON result or None when it
    failed and not check, cgroup peak bytes)."""
    group = CG / f"mumoe-bench-{os.getpid()}"
    group.mkdir()
    try:
        if cap is not None:
            (group / "memory.limit_in_bytes").write_text(str(cap))
            if (group / "memory.memsw.limit_in_bytes").exists():
                (group / "memory.memsw.limit_in_bytes").write_text(str(cap))
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                preexec_fn=lambda: (group / "cgroup.procs").write_text(str(os.getpid())))
        out, _ = proc.communicate()
        peak = int((group / "memory.max_usage_in_bytes").read_text())
        if proc.returncode != 0:
            fail = int((group / "memory.failcnt").read_text())
            if not check:
                return {"rc": proc.returncode, "failcnt": fail}, peak
            raise SystemExit(f"child failed (rc {proc.returncode}, cgroup failcnt {fail}): {cmd}")
        return json.loads(out.strip().splitlines()[-1]), peak
    finally:
        group.rmdir()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default="/tmp/mumoe-bench/ckpt")
    p.add_argument("--out", default="/tmp/mumoe-bench/out")
    p.add_argument("--arch", default="qwen3_moe", choices=["qwen3_moe", "gpt_oss", "nemotron_h"],
                   help="gpt_oss: the released format, experts MXFP4-packed (dequantized layer by layer); nemotron_h: "
                        "Mamba-2/attention/MoE blocks, experts without a gate (default qwen3_moe)")
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--inter", type=int, default=512)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--nsamples", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--cap-mb", type=int, default=1100)
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    p.add_argument("--peer", help="python of a venv with llmcompressor: run its REAP beside mumoe's")
    p.add_argument("--spill-mb", type=float, default=64)
    p.add_argument("--shard-mb", type=float, default=128)
    p.add_argument("--device", default="cpu")
    p.add_argument("--methods", default="reap,reap-progressive,heapr")
    p.add_argument("--tag", default="", help="suffix of the result file (calib_memory{tag}.json)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        res = child_plain(a) if a.child == "plain" else child_prune(a, a.child)
        print(json.dumps(res))
        return
    a.dir = Path(a.dir)
    write_checkpoint(a.dir, a)
    size = sum(f.stat().st_size for f in a.dir.glob("*.safetensors"))
    cap = a.cap_mb * 2**20
    print(f"checkpoint {size / 2**30:.2f} GiB = {size / cap:.1f}x the cap of {a.cap_mb} MiB")
    args = [f"--{k.replace('_', '-')}={v}" for k, v in vars(a).items() if k not in ("child", "peer", "tag")
            and v is not None]
    me = [sys.executable, __file__, *args]
    plain = json.loads(subprocess.run(me + ["--child", "plain"], capture_output=True, text=True,
                                      check=True).stdout.strip().splitlines()[-1])
    print(f"plain forward, whole model in RAM (no cap): load {plain['load_s']:.1f}s, forward {plain['forward_s']:.1f}s,"
          + (f" forward + backward {plain['forward_backward_s']:.1f}s," if "forward_backward_s" in plain else "")
          + f" peak RSS {plain['peak_rss_mb']:.0f} MiB (weights in {a.dtype}: {plain['model_mb']:.0f} MiB)")
    rows = []
    for method in a.methods.split(","):
        res, peak = capped(me + ["--child", method], cap)
        res.update(method=method, cgroup_peak_mb=peak / 2**20, ratio_vs_forward=res["calib_s"] / plain["forward_s"])
        res["ratio_vs_load_forward"] = res["calib_s"] / (plain["load_s"] + plain["forward_s"])
        res["compute_ratio"] = (res["sweep_s"] - res["read_s"]) / plain["forward_s"]
        if method == "heapr" and "forward_backward_s" in plain:
            res["compute_ratio_fwd_bwd"] = (res["sweep_s"] - res["read_s"]) / plain["forward_backward_s"]
            print(f"{'':17s} HEAPr's computation = {res['compute_ratio_fwd_bwd']:.2f}x a plain forward + backward")
        print(f"{method:17s} under {a.cap_mb} MiB: calibration {res['calib_s']:.1f}s = "
              f"{res['ratio_vs_forward']:.2f}x the plain forward ({res['ratio_vs_load_forward']:.2f}x load + forward;"
              f" of it reading layers {res['read_s']:.1f}s, the rest {res['compute_ratio']:.2f}x the forward), "
              f"export {res['export_s']:.1f}s")
        print(f"{'':17s} calibration peak RSS {res['calib_peak_rss_mb']:.0f} MiB = {res['base_rss_mb']:.0f} code "
              f"+ {res['calib_working_mb']:.0f} working; bound 1.2 x (layer {res['layer_mb']:.0f} + activations "
              f"{res['activations_mb']:.0f} + stats {res['stats_mb']:.1f}) = {res['bound_mb']:.0f} MiB")
        if res.get("gpu_peak_mb") is not None:
            print(f"{'':17s} GPU peak allocated {res['gpu_peak_mb']:.0f} MiB")
        print(f"{'':17s} overall peak RSS {res['peak_rss_mb']:.0f} MiB (export: shard buffer "
              f"{res['shard_buffer_mb']:.0f} MiB, bound 2.4 x shard = {res['export_bound_mb']:.0f}); "
              f"cgroup peak {res['cgroup_peak_mb']:.0f} MiB (page cache included)")
        rows.append(res)
    by = {r["method"]: r for r in rows}
    if "reap" in by and "reap-progressive" in by:
        same = sum(x == y for x, y in zip(by["reap"]["kept"], by["reap-progressive"]["kept"]))
        print(f"reap one-shot vs progressive: {same}/{len(by['reap']['kept'])} layers with the same kept set")
    peer = None
    if a.peer:
        pcmd = [a.peer, str(Path(__file__).parent / "peer_reap.py"), f"--dir={a.dir}", f"--out={a.out}/peer",
                f"--nsamples={a.nsamples}", f"--seqlen={a.seqlen}", f"--vocab={a.vocab}", f"--batch-size={a.batch_size}",
                f"--dtype={'float32' if a.dtype == 'fp32' else 'bfloat16'}"]
        under, upeak = capped(pcmd, cap, check=False)
        print(f"llm-compressor REAP under {a.cap_mb} MiB: " + ("completed" if "rc" not in under else
              f"failed (exit {under['rc']}" + (", killed: out of memory under the cap)" if under["rc"] == -9 else ")")))
        peer, ppeak = capped(pcmd, None, check=False)
        peer.update(under_cap=under if "rc" in under else "completed", cgroup_peak_mb=ppeak / 2**20)
        if "rc" in peer:
            print(f"llm-compressor REAP, no cap: failed (exit {peer['rc']}"
                  + (": killed by the OOM killer, the machine's memory was not enough)" if peer["rc"] == -9 else ")")
                  + f"; peak {ppeak / 2**30:.1f} GiB")
        else:
            kept = [peer["kept"][f"model.layers.{j}.mlp"] for j in range(a.layers)] if peer.get("kept") else None
            for name in ("reap", "reap-progressive"):
                if name in by and kept:
                    same = sum(x == y for x, y in zip(by[name]["kept"], kept))
                    print(f"  kept sets, llm-compressor vs mumoe {name}: {same}/{a.layers} layers identical")
                    peer[f"same_kept_as_{name}"] = same
            print(f"llm-compressor REAP, no cap: load {peer['load_s']:.1f}s + oneshot {peer['oneshot_s']:.1f}s + "
                  f"save {peer['save_s']:.1f}s; peak RSS {peer['peak_rss_mb']:.0f} MiB")
    result = {"machine": f"{platform.node()} {os.cpu_count()} cores", "torch": torch.__version__,
              "checkpoint_gib": size / 2**30, "cap_mib": a.cap_mb, "args": {k: str(v) for k, v in vars(a).items()},
              "plain": plain, "runs": rows, "peer": peer}
    out = Path(__file__).parent / "results" / f"calib_memory{a.tag}.json"
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
