"""mumoe exports through a real engine: llama.cpp's own converter and llama-perplexity.

    python benchmarks/gguf_roundtrip.py [--llama-cpp DIR] [--work DIR] [--ctx 256] [--chunks 24]

Dense (the bundled model itself), REAP 25%, HEAPr 25% (uniform form) and four expert merges (HC-SMoE 25%, Sub-MoE
25% at rank 128, REAM 25%, DERN 25% at α 0.2: compact checkpoints with one router row per merged expert) are
exported by `mumoe prune`, converted
with llama.cpp's `convert_hf_to_gguf.py` to GGUF f16, quantized to Q4_K_M with `llama-quantize`, and scored by
`llama-perplexity` on the bundled eval text. The same scoring rule is computed in transformers on the mumoe export
(llama-perplexity: non-overlapping windows of --ctx tokens, BOS first when the vocabulary asks for it, only the
second half of each window scored), so the two perplexities must agree when the export is read right.

llama.cpp is built from the llama-cpp-python sdist (which vendors llama.cpp and its converter) unless --llama-cpp
names a source tree with build/bin/llama-perplexity. The converter's files are used unmodified. One thing is
supplied at run time: the bundled model's tokenizer is new to llama.cpp, whose converter recognises tokenizers by
the hash of a test string's tokens; for that hash only, the pre-tokenizer name "gpt-2" (a ByteLevel BPE with the
GPT-2 split regex, which the bundled tokenizer is) is given. Tokenizers of published models are recognised as
they are — mumoe copies them byte for byte.

Not in CI: it builds llama.cpp (~15 min on 2 cores) and runs ~10 minutes more.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "gguf_roundtrip.json"

CONVERT = r"""
import runpy, sys
from hashlib import sha256
sys.path.insert(0, {tree!r})
sys.path.insert(0, {tree!r} + "/gguf-py")
from conversion.base import TextModel
own = TextModel.get_vocab_base_pre
KNOWN = {{{known!r}: "gpt-2"}}  # the bundled mumoe tokenizer (ByteLevel BPE, GPT-2 regex)
def get_vocab_base_pre(self, tokenizer):
    try:
        return own(self, tokenizer)
    except NotImplementedError:
        chktxt = {chktxt!r}
        h = sha256(str(tokenizer.encode(chktxt)).encode()).hexdigest()
        if h in KNOWN:
            return KNOWN[h]
        raise
TextModel.get_vocab_base_pre = get_vocab_base_pre
sys.argv = ["convert_hf_to_gguf.py", *sys.argv[1:]]
runpy.run_path({tree!r} + "/convert_hf_to_gguf.py", run_name="__main__")
"""


EXPORTS = {  # name -> `mumoe prune` flags (the export's folder: the name's first word)
    "reap 25%": ["--method", "reap", "--ratio", "0.25", "--calib", "domain"],
    "heapr 25% (uniform)": ["--method", "heapr", "--ratio", "0.25", "--calib", "domain"],
    "hc-smoe 25% (merged, centroid router)": ["--method", "hc-smoe", "--ratio", "0.25", "--calib", "domain"],
    "sub-moe 25% (merged, rank 128)": ["--method", "sub-moe", "--ratio", "0.25", "--calib", "domain", "--rank", "128"],
    "ream 25% (merged, neuron-aligned)": ["--method", "ream", "--ratio", "0.25", "--calib", "domain"],
    "dern 25% (neurons recombined, alpha 0.2)": ["--method", "dern", "--ratio", "0.25", "--calib", "domain",
                                                 "--alpha", "0.2"],
}


def sh(cmd: list[str], **kw) -> str:
    p = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if p.returncode != 0:
        sys.exit(f"failed ({p.returncode}): {' '.join(map(str, cmd))}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p.stdout + p.stderr


def llama_cpp(tree: Path | None, work: Path) -> Path:
    """A llama.cpp source tree with llama-perplexity and llama-quantize built."""
    if tree is None:
        sdists = sorted(work.glob("llama_cpp_python-*.tar.gz"))
        if not sdists:
            sh([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "llama-cpp-python",
                "-d", str(work)])
            sdists = sorted(work.glob("llama_cpp_python-*.tar.gz"))
        top = work / sdists[-1].name.removesuffix(".tar.gz")
        if not top.exists():
            with tarfile.open(sdists[-1]) as t:
                t.extractall(work, filter="data")
        tree = top / "vendor" / "llama.cpp"
    if not (tree / "build" / "bin" / "llama-perplexity").exists():
        print(f"building llama.cpp in {tree} (llama-perplexity, llama-quantize) ...", flush=True)
        sh(["cmake", "-B", "build", "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
            "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_OPENSSL=OFF"], cwd=tree)
        sh(["cmake", "--build", "build", "-j", str(os.cpu_count() or 2), "--target", "llama-perplexity",
            "llama-quantize"], cwd=tree)
    return tree


def chktxt(tree: Path) -> str:
    src = (tree / "conversion" / "base.py").read_text()
    m = re.search(r"chktxt = ('(?:[^'\\]|\\.)*')", src)
    return eval(m[1])  # the converter's own test string (a Python literal)


def hf_ppl(export: Path, text: str, ctx: int, chunks: int, add_bos: bool, bos: int) -> tuple[float, int]:
    """llama-perplexity's rule in transformers: windows of ctx tokens, BOS first if add_bos, second half scored."""
    import torch

    import mumoe

    tok = mumoe.load_tokenizer(export)
    model = mumoe.load(export, "fp32")
    ids = ([bos] if add_bos else []) + tok(text, add_special_tokens=False)["input_ids"]
    n = min(chunks, len(ids) // ctx)
    first = ctx // 2
    nll, count = 0.0, 0
    with torch.no_grad():
        for i in range(n):
            w = torch.tensor(ids[i * ctx:(i + 1) * ctx])[None]
            if add_bos:
                w[0, 0] = bos
            logp = torch.log_softmax(model(w).logits[0].double(), -1)  # [ctx, V]
            tgt = w[0, first + 1:]
            nll -= logp[first:ctx - 1].gather(-1, tgt[:, None]).sum().item()
            count += len(tgt)
    return math.exp(nll / count), n


def gguf_meta(path: Path, tree: Path) -> dict:
    sys.path.insert(0, str(tree / "gguf-py"))
    from gguf import GGUFReader

    r = GGUFReader(str(path))

    def val(key):
        f = r.fields.get(key)
        return None if f is None else f.parts[f.data[0]].tolist()[0]
    return {"add_bos": bool(val("tokenizer.ggml.add_bos_token") or False), "bos": val("tokenizer.ggml.bos_token_id"),
            "experts": val("qwen3moe.expert_count"), "ff": val("qwen3moe.expert_feed_forward_length")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--llama-cpp", type=Path, help="a llama.cpp source tree (default: built from the sdist)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/mumoe-gguf"), help="where exports and GGUFs go")
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--chunks", type=int, default=24)
    ap.add_argument("--only", nargs="+", help="exports to run besides dense (first words: reap heapr hc-smoe sub-moe ream dern)")
    args = ap.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    tree = llama_cpp(args.llama_cpp, work)
    binary = tree / "build" / "bin"
    from mumoe.loading import DATA, DEFAULT_MODEL, load_tokenizer

    text = "\n\n".join((DATA / d / "eval.txt").read_text("utf-8") for d in ("code", "docs", "kernel", "prose"))
    text_file = work / "eval.txt"
    text_file.write_text(text)
    tok = load_tokenizer("default")
    from hashlib import sha256

    known = sha256(str(tok.encode(chktxt(tree))).encode()).hexdigest()
    convert = CONVERT.format(tree=str(tree), known=known, chktxt=chktxt(tree))
    exports = {"dense": DEFAULT_MODEL}
    for name, flags in EXPORTS.items():
        if args.only and name.split()[0] not in args.only:
            continue
        out = work / name.split()[0]
        if not (out / "pruning.json").exists():
            sh([sys.executable, "-m", "mumoe", "prune", *flags, "--out", str(out), "--overwrite", "--quiet"])
        exports[name] = out
    rows = []
    for name, path in exports.items():
        stem = work / name.split()[0]
        f16, q4 = Path(f"{stem}-f16.gguf"), Path(f"{stem}-q4km.gguf")
        t0 = time.perf_counter()
        sh([sys.executable, "-c", convert, str(path), "--outtype", "f16", "--outfile", str(f16)])
        log = sh([str(binary / "llama-quantize"), str(f16), str(q4), "Q4_K_M"])
        m = re.search(r"(\d+) of (\d+) tensor\(s\) required fallback", log)
        fallback = f"{m[1]}/{m[2]}" if m else "0"
        meta = gguf_meta(f16, tree)
        row = {"model": name, "safetensors_mb": sum(f.stat().st_size for f in Path(path).glob("*.safetensors")) / 1e6,
               "f16_mb": f16.stat().st_size / 1e6, "q4km_mb": q4.stat().st_size / 1e6, "q4km_fallback": fallback,
               "gguf_experts": meta["experts"], "gguf_expert_ff": meta["ff"], "add_bos": meta["add_bos"]}
        for quant, gguf in (("f16", f16), ("q4km", q4)):
            # the running estimate after the last chunk ("[24]31.8469,") is the final one. llama.cpp logs from a
            # worker thread that does not always flush into a pipe before the process exits: run again then
            for _attempt in range(5):
                out = sh([str(binary / "llama-perplexity"), "-m", str(gguf), "-f", str(text_file), "-c",
                          str(args.ctx), "-b", str(args.ctx), "--chunks", str(args.chunks), "-t",
                          str(os.cpu_count() or 2)])
                chunks = re.findall(r"\[(\d+)\]([\d.]+),", out)
                if chunks and int(chunks[-1][0]) == args.chunks:
                    break
            else:
                sys.exit(f"llama-perplexity did not report {args.chunks} chunks on {gguf}:\n{out[-2000:]}")
            row[f"llama_{quant}"] = float(chunks[-1][1])
        row["hf"], row["chunks"] = hf_ppl(Path(path), text, args.ctx, args.chunks, meta["add_bos"], meta["bos"] or 0)
        row["f16_over_hf"] = row["llama_f16"] / row["hf"]
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
        print(f"{name}: {row}", flush=True)
    print(f"\nllama.cpp ({tree}), ctx {args.ctx}, {rows[0]['chunks']} chunks, second half of each scored\n")
    print("| export | safetensors | GGUF f16 | GGUF Q4_K_M (fallback tensors) | experts / width in GGUF | "
          "ppl transformers | ppl llama.cpp f16 | f16 / transformers | ppl llama.cpp Q4_K_M |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['safetensors_mb']:.1f} MB | {r['f16_mb']:.1f} MB | {r['q4km_mb']:.1f} MB "
              f"({r['q4km_fallback']}) | {r['gguf_experts']} / {r['gguf_expert_ff']} | {r['hf']:.3f} | "
              f"{r['llama_f16']:.3f} | {r['f16_over_hf']:.5f} | {r['llama_q4km']:.3f} |")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    if args.only and RESULTS.exists():  # a partial run keeps the other exports' earlier rows
        earlier = json.loads(RESULTS.read_text())
        if (earlier.get("ctx"), earlier.get("chunks")) == (args.ctx, args.chunks):
            done = {r["model"] for r in rows}
            rows = [r for r in earlier["rows"] if r["model"] not in done] + rows
    RESULTS.write_text(json.dumps({"ctx": args.ctx, "chunks": args.chunks, "llama_cpp": str(tree), "rows": rows},
                                  indent=1))
    print(f"\nwrote {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
