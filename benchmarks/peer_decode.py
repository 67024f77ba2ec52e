"""Per-prompt pruning against what a user would run instead: mumoe's serving path vs llama.cpp on the same CPU.

    python benchmarks/peer_decode.py [--models bundled,llama,moe] [--llama-python PY] [--work DIR]
                                     [--prompt 256] [--new 128] [--repeats 3]

Three models, each as a bf16 safetensors checkpoint with the bundled tokenizer (vocabulary 8192):
    bundled  the bundled qwen3_moe (15.5M parameters, 16 experts top-2, 4 layers)
    llama    a dense Llama, hidden 2048, intermediate 5632, 16 heads, 8 layers, untied (444M; random weights)
    moe      a qwen3_moe, hidden 1024, 64 experts × 512 top-8, 8 heads × 128 (4 KV), 8 layers (random weights)

mumoe runs what `mumoe serve` runs for one request (`serve.engine.Engine.run`: the per-prompt protocol, dense
prefill with statistics, selection, compaction, decode, undo), batch 1, greedy, end-of-text ignored so that every
request decodes --new tokens; its configurations take turns within each repeat (drifts of this VM hit all alike).
The checkpoint is loaded as `mumoe.load` does (a bf16 checkpoint is computed in fp32 on the CPU).

llama.cpp is llama-cpp-python (its own virtual environment, built from source on this machine; --llama-python
names its python, else one is made under --work: ~15 min) on GGUF f16 and Q4_K_M files made by llama.cpp's own
converter (the sdist's vendored `convert_hf_to_gguf.py`, unmodified, run as in `benchmarks/gguf_roundtrip.py`) and
`llama_model_quantize`; n_threads = the cores, the same prompt token ids, greedy, --new tokens.

Reported per configuration (medians over repeats): time to first token (TTFT: request start to the first new
token, prefill and pruning included), decode tokens/s (the tokens after the first), the per-request overhead
(statistics + selection + apply + lazy: experts compacted on first use inside the decode, + undo; from the
engine) as a share of the dense prefill (the dense configuration's TTFT in the same rounds), and the memory-bandwidth bound:
bytes of weights one decoded token reads / this machine's measured read bandwidth (`torch` sum over 1 GiB).
Writes benchmarks/results/peer_decode.json (a run of some --models updates theirs). llama.cpp's converter reads the
synthetic Llama's tokenizer only with `sentencepiece` installed beside mumoe (`pip install sentencepiece`). Not in
CI (it builds llama.cpp and runs ~20 minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from hashlib import sha256
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from gguf_roundtrip import CONVERT, chktxt, sh  # noqa: E402 - the converter shim, shared

RESULTS = ROOT / "benchmarks" / "results" / "peer_decode.json"
LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"

MODELS = {  # name -> (config kwargs or None for the bundled checkpoint, per-prompt experts K or None)
    "bundled": (None, 8),
    "llama": (dict(model_type="llama", hidden_size=2048, intermediate_size=5632, num_hidden_layers=8,
                   num_attention_heads=16, num_key_value_heads=16, vocab_size=8192, tie_word_embeddings=False,
                   max_position_embeddings=2048), None),
    "moe": (dict(model_type="qwen3_moe", hidden_size=1024, moe_intermediate_size=512, intermediate_size=2048,
                 num_experts=64, num_experts_per_tok=8, norm_topk_prob=True, num_hidden_layers=8,
                 num_attention_heads=8, num_key_value_heads=4, head_dim=128, vocab_size=8192,
                 tie_word_embeddings=False, max_position_embeddings=2048), 16),
}
RHOS = (0.3, 0.5, 0.7)

LLAMA_CHILD = r"""
import json, sys, time, statistics
import llama_cpp
import llama_cpp.llama
from llama_cpp import Llama
cfg = json.loads(sys.stdin.read())
if not cfg["extra_bufts"]:  # llama.cpp's --no-repack: weights as in the file, no CPU-specific repacked copy
    own = llama_cpp.llama_model_default_params
    def params():
        p = own()
        p.use_extra_bufts = False
        return p
    llama_cpp.llama.llama_cpp.llama_model_default_params = params
out = {}
for name, path in cfg["files"].items():
    llm = Llama(model_path=path, n_ctx=cfg["ctx"], n_threads=cfg["threads"], n_threads_batch=cfg["threads"],
                n_batch=512, n_ubatch=512, verbose=False)
    runs = []
    for _ in range(cfg["repeats"]):
        stamps = []
        llm.reset()  # no prefix of the previous repeat reused: each repeat prefills the whole prompt
        t0 = time.perf_counter()
        for tok in llm.generate(cfg["ids"], temp=0.0, reset=True):
            stamps.append(time.perf_counter())
            if len(stamps) == cfg["new"]:
                break
        runs.append({"ttft_s": stamps[0] - t0, "decode_tok_s": (len(stamps) - 1) / (stamps[-1] - stamps[0])})
    out[name] = runs
    del llm
print(json.dumps(out))
"""

QUANTIZE = r"""
import ctypes, sys
import llama_cpp
p = llama_cpp.llama_model_quantize_default_params()
p.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
p.nthread = 2
rc = llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(p))
sys.exit(rc)
"""


def bandwidth_gbs() -> float:
    """Read bandwidth of this machine as torch sees it: a sum over a 1 GiB fp32 tensor, best of 5."""
    x = torch.ones(1 << 28)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best / 1e9


def checkpoint(name: str, work: Path) -> Path:
    """The model's bf16 checkpoint folder with the bundled tokenizer (made once under work)."""
    from mumoe.loading import DEFAULT_MODEL

    spec, _ = MODELS[name]
    if spec is None:
        return Path(DEFAULT_MODEL)
    out = work / name
    if (out / "config.json").exists():
        return out
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(spec)
    cfg = AutoConfig.for_model(spec.pop("model_type"), **spec, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    tmp = Path(tempfile.mkdtemp(dir=work, prefix=f".{name}-"))
    model.save_pretrained(tmp)
    for f in Path(DEFAULT_MODEL).glob("tokenizer*"):
        shutil.copy(f, tmp / f.name)
    tmp.rename(out)
    return out


def llama_python(given: str | None, work: Path) -> str:
    if given:
        return given
    venv = work / "llvenv"
    py = venv / "bin" / "python"
    if not py.exists():
        print(f"building {LLAMA_CPP_PYTHON} in {venv} (~15 min) ...", flush=True)
        sh([sys.executable, "-m", "venv", str(venv)])
        sh([str(py), "-m", "pip", "install", "-q", LLAMA_CPP_PYTHON])
    return str(py)


def gguf_files(name: str, path: Path, work: Path, py: str) -> dict[str, Path]:
    """GGUF f16 (llama.cpp's converter) and Q4_K_M (llama_model_quantize) of the checkpoint, made once."""
    f16, q4 = work / f"{name}-f16.gguf", work / f"{name}-q4km.gguf"
    if not f16.exists() or not q4.exists():
        sdist = work / "sdist"
        if not sdist.exists():
            sh([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                LLAMA_CPP_PYTHON, "-d", str(sdist)])
            sh(["tar", "xzf", str(next(sdist.glob("*.tar.gz"))), "-C", str(sdist)])
        tree = next(sdist.glob("llama_cpp_python-*/vendor/llama.cpp"))
        from mumoe.loading import load_tokenizer

        known = sha256(str(load_tokenizer("default").encode(chktxt(tree))).encode()).hexdigest()
        convert = CONVERT.format(tree=str(tree), known=known, chktxt=chktxt(tree))
        sh([sys.executable, "-c", convert, str(path), "--outtype", "f16", "--outfile", str(f16)])
        sh([py, "-c", QUANTIZE, str(f16), str(q4)])
    return {"f16": f16, "q4km": q4}


def prompt_ids(n: int) -> list[int]:
    from mumoe.loading import DATA, load_tokenizer

    text = (DATA / "prose" / "eval.txt").read_text("utf-8")
    ids = load_tokenizer("default")(text, add_special_tokens=False)["input_ids"][:n]
    assert len(ids) == n, "the eval text is shorter than the prompt"
    return ids


def run_mumoe(path: Path, experts_k: int | None, ids: list[int], new: int, repeats: int,
              bundled: bool, dtype: str = "auto", only: set[str] | None = None) -> tuple[dict, dict]:
    """Per configuration, per repeat: TTFT, decode tokens/s and the engine's overhead breakdown. only: the
    configurations to run (None: all)."""
    from mumoe import load
    from mumoe.apply import int4
    from mumoe.loading import load_tokenizer
    from mumoe.serve.engine import Engine, Pruning, Sampling

    t0 = time.perf_counter()
    model = load(str(path), dtype)
    info = {"load_s": time.perf_counter() - t0, "dtype": str(next(model.parameters()).dtype)} | read_shape(model)
    tok = load_tokenizer(str(path))
    engine = Engine(model, tok, path.name)
    engine8 = Engine(model, tok, path.name, int8=True)  # `mumoe serve --int8`: column requests from int8 copies
    for e in (engine, engine8):
        e.eos = set()  # every request decodes `new` tokens
    configs = {"dense": (engine, Pruning())}
    for rho in RHOS:
        configs[f"column {rho}"] = (engine, Pruning(active=rho, structure="column"))
    for rho in RHOS:
        configs[f"column {rho} int8"] = (engine8, Pruning(active=rho, structure="column"))
    if bundled:
        configs["row 0.5"] = (engine, Pruning(active=0.5, structure="row"))
    if experts_k:
        configs[f"experts K={experts_k}"] = (engine, Pruning(experts=experts_k))
    # `mumoe serve --int4`: decode steps read int4 copies. The copies belong to the weights (every engine of this
    # model would read them), so the other configurations run with the row limit at 0: no call reads them.
    engine4 = Engine(model, tok, path.name, int4=True)
    engine4.eos = set()
    configs["dense int4"] = (engine4, Pruning())
    if experts_k:
        configs[f"experts K={experts_k} int4"] = (engine4, Pruning(experts=experts_k))
    configs = {c: v for c, v in configs.items() if only is None or c in only or c == "dense"}
    rows_limit = int4.DECODE_ROWS
    x = torch.tensor([ids])
    with torch.no_grad():  # warm-up, and a bare dense forward kept for reference (overhead: `dense_prefill`)
        model(input_ids=x, use_cache=True)
        plain = []
        for _ in range(3):
            t = time.perf_counter()
            model(input_ids=x, use_cache=True)
            plain.append(time.perf_counter() - t)
    info["plain_prefill_s"] = statistics.median(plain)
    sampling = Sampling(max_tokens=new, temperature=0.0)
    runs: dict[str, list[dict]] = {c: [] for c in configs}
    for r in range(repeats + 1):  # the first round warms every configuration (buffers, planned pruners)
        for cname, (engine, pruning) in configs.items():
            int4.DECODE_ROWS = rows_limit if cname.endswith("int4") else 0
            stamps: list[float] = []
            t0 = time.perf_counter()
            fin = engine.run(ids, sampling, pruning, lambda text, entries: stamps.append(time.perf_counter()))
            t_end = time.perf_counter()
            if r == 0:
                continue
            assert fin.completion_tokens == new == len(stamps), (fin, len(stamps))
            runs[cname].append({"ttft_s": stamps[0] - t0, "decode_tok_s": (new - 1) / (stamps[-1] - stamps[0]),
                                "total_s": t_end - t0, "overhead_ms": fin.applied.get("overhead_ms", 0.0),
                                "active_weights": fin.applied["active_weights"],
                                **{k: v for k, v in fin.stats.items() if isinstance(v, (int, float))}})
    int4.DECODE_ROWS = rows_limit
    if bundled:
        info["quality"] = quality(model)
    del engine, engine8, engine4, model
    return info, runs


def llama_cpp_runs(py: str, file: Path, ids: list[int], args, threads: int) -> tuple[list[dict], bool]:
    """llama.cpp's runs on one GGUF file -> (runs, repacked). llama.cpp's default first (weights repacked for this
    CPU: AVX-512 / AMX layouts); if that crashes, again with --no-repack's setting, and the table says so."""
    for extra in (True, False):
        child = json.dumps({"files": {"x": str(file)}, "ids": ids, "new": args.new, "repeats": args.repeats,
                            "threads": threads, "ctx": args.prompt + args.new + 8, "extra_bufts": extra})
        p = subprocess.run([py, "-c", LLAMA_CHILD], input=child, capture_output=True, text=True)
        if p.returncode == 0:
            return json.loads(p.stdout.strip().splitlines()[-1])["x"], extra
        print(f"llama.cpp on {file.name} {'(repacked)' if extra else '(no repack)'} failed, exit {p.returncode}",
              flush=True)
    sys.exit(f"llama.cpp failed on {file}:\n{p.stdout[-1000:]}\n{p.stderr[-3000:]}")


def quality(model, windows: int = 8) -> dict[str, float]:
    """The test-time protocol on the bundled eval texts (windows of 512 tokens, the first 256 the prompt, the rest
    scored; `windows` per domain): mean continuation perplexity of the four domains, dense and μ-MoE column (the
    bundled model is only 256 wide: column needs ρ ≈ 0.9 on it), with and without the int8 copies; column 1.0 int8
    keeps every column: the int8 copies' own effect."""
    from mumoe.loading import DATA, load_tokenizer
    from mumoe.observe.calib import tokenize, windows as make_windows
    from mumoe.testtime import continuation_perplexity

    tok = load_tokenizer("default")
    runs = {"dense": dict(masks=None, per_prompt=False), "column 0.9": dict(active=0.9, structure="column"),
            "column 0.9 int8": dict(active=0.9, structure="column", int8=True),
            "column 1.0 int8": dict(active=1.0, structure="column", int8=True)}
    out = {}
    wins = {d: make_windows(tokenize(tok, (DATA / d / "eval.txt").read_text("utf-8")), 512, windows)
            for d in ("code", "docs", "kernel", "prose")}
    for name, kw in runs.items():
        ppl = [continuation_perplexity(model, w, 256, **kw)["ppl"] for w in wins.values()]
        out[name] = sum(ppl) / len(ppl)
    from mumoe.apply import int4

    limit = int4.DECODE_ROWS
    for name, rows in (("dense, 32-token steps", 0), ("dense int4, 32-token steps", limit)):
        int4.DECODE_ROWS = rows  # 0: no call reads the int4 copies
        ppl = [stepped_perplexity(model, w, 256, limit) for w in wins.values()]
        out[name] = sum(ppl) / len(ppl)
    int4.DECODE_ROWS = limit
    return out


@torch.no_grad()
def stepped_perplexity(model, wins: torch.Tensor, prompt_len: int, step: int) -> float:
    """Continuation perplexity as a server decodes: the prompt prefilled at once, the continuation fed `step`
    tokens at a time through the cache (what reads `mumoe serve --int4`'s copies: calls of at most 32 tokens).
    wins [N, L] -> perplexity of tokens prompt_len+1 .. L-1."""
    from mumoe.compat import output_cache

    nll, count = 0.0, 0
    for w in wins:
        out = model(input_ids=w[None, :prompt_len], use_cache=True)
        cache, logits = output_cache(out), [out.logits[0, -1:]]
        for s in range(prompt_len, w.shape[0] - 1, step):
            out = model(input_ids=w[None, s : min(s + step, w.shape[0] - 1)], past_key_values=cache, use_cache=True)
            cache = output_cache(out)
            logits.append(out.logits[0])
        logp = torch.log_softmax(torch.cat(logits)[1:].double(), dim=-1)  # predicts tokens prompt_len+1 .. L-1
        target = w[prompt_len + 1 :]
        nll -= float(logp.gather(-1, target[:, None]).sum())
        count += target.numel()
    return float(torch.exp(torch.tensor(nll / count)))


def read_shape(model) -> dict:
    """What one decoded token reads: parameters, the input embedding when it is not also the output head (one row
    of it is read), the prunable weights, the routed experts' weights and the share of experts a token uses."""
    from mumoe.models import moe_adapter_for
    from mumoe.models.prunable import prunable_names

    params = dict(model.named_parameters())
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    try:
        layers = moe_adapter_for(model).moe_layers()
    except Exception:  # noqa: BLE001 - a dense model
        layers = []
    return {"params": sum(p.numel() for p in params.values()),
            "unread": emb.numel() if emb.data_ptr() != head.data_ptr() else 0,
            "prunable": sum(params[n].numel() for n in prunable_names(model)),
            "routed": sum(l.experts.gate_up_proj.numel() + l.experts.down_proj.numel() for l in layers),
            "expert_share": layers[0].top_k / layers[0].num_experts if layers else 1.0}


def per_token(info: dict, read_share: float = 1.0) -> float:
    """Weights one decoded token reads (elements): everything but the unread embedding and the experts the token
    does not use; read_share scales the prunable weights (a compacted decode reads that share of them)."""
    fixed = info["params"] - info["unread"] - info["prunable"]
    prunable = info["prunable"] - info["routed"] + info["routed"] * info["expert_share"]
    return fixed + read_share * prunable


def med(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="bundled,llama,moe", help="comma list of bundled, llama, moe")
    ap.add_argument("--llama-python", help="python of a venv with llama-cpp-python (default: built under --work)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/mumoe-peer-decode"))
    ap.add_argument("--prompt", type=int, default=256, help="prompt tokens (default 256)")
    ap.add_argument("--new", type=int, default=128, help="new tokens per request (default 128)")
    ap.add_argument("--repeats", type=int, default=3, help="repeats per configuration (default 3)")
    ap.add_argument("--dtypes", default="auto", help="mumoe load dtypes, comma list (default auto: fp32 on the CPU "
                    "for a bf16 checkpoint; bf16 keeps the checkpoint's half precision)")
    ap.add_argument("--report", action="store_true", help="print the tables of the results file, run nothing")
    ap.add_argument("--no-llama", action="store_true", help="mumoe only (no llama.cpp)")
    ap.add_argument("--configs", help="mumoe configurations to run, comma list (e.g. 'dense int4,column 0.5 int8'; "
                    "dense always runs; default all)")
    args = ap.parse_args()
    if args.report:
        saved = json.loads(RESULTS.read_text())
        for name, entry in saved["models"].items():
            report(name, entry, saved["bandwidth_gbs"])
        return
    args.work.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    bw = bandwidth_gbs()
    ids = prompt_ids(args.prompt)
    py = None if args.no_llama else llama_python(args.llama_python, args.work)
    result = {"machine": f"{os.cpu_count()} cores, torch {torch.__version__}, {threads} threads",
              "bandwidth_gbs": bw, "prompt": args.prompt, "new": args.new, "repeats": args.repeats, "models": {}}
    for name in args.models.split(","):
        path = checkpoint(name, args.work)
        print(f"== {name} ({path})", flush=True)
        entry = {"mumoe": {}}
        for dtype in args.dtypes.split(","):
            info, runs = run_mumoe(path, MODELS[name][1], ids, args.new, args.repeats, name == "bundled", dtype,
                                   None if not args.configs else set(args.configs.split(",")))
            entry["mumoe"][dtype] = info | {"runs": runs}
        if py is not None:
            files = gguf_files(name, path, args.work, py)
            entry["llama_cpp"], entry["llama_cpp_repacked"] = {}, {}
            for quant, file in files.items():
                entry["llama_cpp"][quant], entry["llama_cpp_repacked"][quant] = llama_cpp_runs(
                    py, file, ids, args, threads)
            entry["gguf_bytes"] = {k: v.stat().st_size for k, v in files.items()}
        result["models"][name] = entry
        report(name, entry, bw)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    if RESULTS.exists():  # models measured by an earlier run stay (--models runs a subset)
        earlier = json.loads(RESULTS.read_text()).get("models", {})
        result["models"] = earlier | result["models"]
    RESULTS.write_text(json.dumps(result, indent=1))
    print(f"wrote {RESULTS}")


def dense_prefill(info: dict) -> float:
    """The dense prefill of the prompt as the engine runs it: the dense configuration's median time to first token
    (prefill + picking the token), measured in the same rounds as the pruned ones. (`plain_prefill_s`, a bare
    forward timed once before the rounds, is kept in the results for reference: on a drifting VM it read 2x
    the engine's on one run.)"""
    return med(info["runs"]["dense"], "ttft_s")


def report(name: str, entry: dict, bw: float) -> None:
    """One model's table: every mumoe dtype's configurations, then llama.cpp's files; ratios against the first
    dtype's dense decode and TTFT, and the goals' ratios against llama.cpp."""
    first = next(iter(entry["mumoe"].values()))
    dense_tok, dense_ttft = med(first["runs"]["dense"], "decode_tok_s"), med(first["runs"]["dense"], "ttft_s")
    print(f"\n{name}: {first['params'] / 1e6:.1f}M parameters; decode reads {per_token(first) / 1e6:.1f}M weights per "
          f"token densely ({first['unread'] / 1e6:.1f}M of embedding unread, experts {first['expert_share']:.3f} "
          f"used); read bandwidth {bw:.1f} GB/s; bound = bandwidth / bytes read per token (≈ for a compacted decode: "
          "its read share applied to every prunable weight; llama.cpp: the file's bytes scaled alike)")
    print("| configuration | decode tok/s | vs first dense | bound tok/s | TTFT s | TTFT / first dense "
          "| overhead / its dense prefill | statistics + select + apply + lazy + undo ms |")
    print("|---|---|---|---|---|---|---|---|")
    for dtype, info in entry["mumoe"].items():
        label = info["dtype"].replace("torch.", "")
        for cname, rows in info["runs"].items():
            elem = 4 if "float32" in info["dtype"] else 2
            tok = med(rows, "decode_tok_s")
            share = med(rows, "read_weights") / med(rows, "prunable_weights") if "read_weights" in rows[0] else 1.0
            fixed = per_token(info, 0.0)  # read in the model's dtype; the prunable part int8 where int8
            low = 1 if "int8" in cname else 0.625 if "int4" in cname else elem  # int4: 4 bits + bf16 pair / 32
            bound = bw * 1e9 / (fixed * elem + (per_token(info, share) - fixed) * low)
            parts = [med(rows, k) * 1000 if k in rows[0] else 0.0
                     for k in ("statistics_s", "select_s", "apply_s", "lazy_s", "undo_s")]
            over = sum(parts) / 1000 / dense_prefill(info)
            print(f"| mumoe {label} {cname} | {tok:.1f} | {tok / dense_tok:.2f} | {bound:.0f} | "
                  f"{med(rows, 'ttft_s'):.3f} | {med(rows, 'ttft_s') / dense_ttft:.2f} | {over:.1%} | "
                  f"{' + '.join(f'{x:.0f}' for x in parts)} |")
    for q, rows in entry.get("llama_cpp", {}).items():
        tok = med(rows, "decode_tok_s")
        label = q if entry["llama_cpp_repacked"][q] else f"{q} (no repack: the repacked run crashed)"
        bound = bw * 1e9 / (entry["gguf_bytes"][q] * per_token(first) / first["params"])
        print(f"| llama.cpp {label} | {tok:.1f} | {tok / dense_tok:.2f} | {bound:.0f} | {med(rows, 'ttft_s'):.3f} | "
              f"{med(rows, 'ttft_s') / dense_ttft:.2f} | – | – |")
    for info in entry["mumoe"].values():
        if "quality" in info:
            print(f"quality ({info['dtype'].replace('torch.', '')}, test-time protocol, mean continuation ppl of 4 "
                  "domains): " + ", ".join(f"{k} {v:.3f}" for k, v in info["quality"].items()))
    goals(name, entry)


def goals(name: str, entry: dict) -> None:
    """The issue's goals as ratios of this run, per mumoe dtype."""
    peer = {q: med(rows, "decode_tok_s") for q, rows in entry.get("llama_cpp", {}).items()}
    for info in entry["mumoe"].values():
        runs, label = info["runs"], info["dtype"].replace("torch.", "")
        dense, ttft = med(runs["dense"], "decode_tok_s"), med(runs["dense"], "ttft_s")
        line = [f"{name} {label}"]
        if "f16" in peer:
            line.append(f"dense / llama.cpp f16 {dense / peer['f16']:.2f} (goal ≥ {0.5 if name == 'bundled' else 0.8})")
        for c in ("column 0.5", "column 0.5 int8", "dense int4"):
            if "q4km" in peer and c in runs:
                line.append(f"{c} / llama.cpp Q4_K_M {med(runs[c], 'decode_tok_s') / peer['q4km']:.2f} (goal > 1)")
        pruned = {c: r for c, r in runs.items() if c != "dense"}
        if pruned:
            over = {c: sum(med(r, k) for k in ("statistics_s", "select_s", "apply_s", "lazy_s", "undo_s") if k in r[0])
                    / dense_prefill(info) for c, r in pruned.items()}
            worst = max(over, key=over.get)
            line.append(f"largest overhead / prefill {over[worst]:.1%} ({worst}; goal ≤ 5%)")
            t = {c: med(r, "ttft_s") / ttft for c, r in pruned.items()}
            worst = max(t, key=t.get)
            line.append(f"largest TTFT / dense {t[worst]:.2f} ({worst}; goal ≤ 1.1)")
        print(line[0] + ": " + "; ".join(line[1:]))

if __name__ == "__main__":
    main()
