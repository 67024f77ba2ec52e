"""Every family llama.cpp's converter registers, through the real engine: a tiny model of the family (its HF config
class, the bundled tokenizer's vocabulary), dense and with 25% of its experts removed by mumoe, converted by
llama.cpp's `convert_hf_to_gguf.py` to GGUF f32 and scored by `llama-perplexity`; the same scoring rule in
transformers on the same folders. The ratio llama.cpp / transformers must be 1 (to float rounding) when the export
is read right; a family whose dense model llama.cpp already cannot convert or load says so (that is llama.cpp's
gap, not the export's).

    python benchmarks/gguf_families.py [--llama-cpp DIR] [--work DIR] [--only FAMILY ...]

Weights are random (seeded), so perplexities are large; only the agreement matters. Not in CI (needs the
llama.cpp build of `benchmarks/gguf_roundtrip.py`, ~15 min once); ~10 s per family after that.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
from hashlib import sha256
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gguf_roundtrip import CONVERT, chktxt, gguf_meta, llama_cpp  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "gguf_families.json"
CTX, CHUNKS = 64, 4


def run(cmd: list[str]) -> tuple[int, str]:
    p = subprocess.run(cmd, capture_output=True, text=True)
    return p.returncode, p.stdout + p.stderr


def last_error(log: str) -> str:
    lines = [l.strip() for l in log.splitlines() if l.strip()]
    bad = [l for l in lines if re.search(r"error|Error|exception|failed|not supported|unknown", l)]
    return (bad[-1] if bad else lines[-1] if lines else "")[:200]


def hf_ppl(folder: Path, ids: list[int], add_bos: bool, bos: int) -> float:
    """llama-perplexity's rule: windows of CTX tokens, BOS first if add_bos, the second half of each scored."""
    import torch

    import mumoe

    model = mumoe.load(folder, "fp32")
    ids = ([bos] if add_bos else []) + ids
    first, nll, count = CTX // 2, 0.0, 0
    with torch.no_grad():
        for i in range(CHUNKS):
            w = torch.tensor(ids[i * CTX:(i + 1) * CTX])[None]
            if add_bos:
                w[0, 0] = bos
            logp = torch.log_softmax(model(w).logits[0].double(), -1)
            tgt = w[0, first + 1:]
            nll -= logp[first:CTX - 1].gather(-1, tgt[:, None]).sum().item()
            count += len(tgt)
    return math.exp(nll / count)


def llama_ppl(binary: Path, gguf: Path, text_file: Path) -> tuple[float | None, str]:
    for _attempt in range(5):
        rc, out = run([str(binary / "llama-perplexity"), "-m", str(gguf), "-f", str(text_file), "-c", str(CTX),
                       "-b", str(CTX), "--chunks", str(CHUNKS), "-t", str(os.cpu_count() or 2)])
        if rc != 0:
            return None, last_error(out)
        chunks = re.findall(r"\[(\d+)\]([\d.]+),", out)
        if chunks and int(chunks[-1][0]) == CHUNKS:
            return float(chunks[-1][1]), ""
    return None, "no final chunk reported"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--llama-cpp", type=Path, help="a llama.cpp source tree (default: built from the sdist)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/mumoe-gguf"), help="where models and GGUFs go")
    ap.add_argument("--only", nargs="+", help="families to run (default: every one the converter registers)")
    args = ap.parse_args()
    import torch

    import mumoe
    from mumoe import MumoeError
    from mumoe.apply import save_pruned
    from mumoe.loading import DATA, load_tokenizer
    from mumoe.models.support import support_table
    from mumoe.models.tiny import tiny_model

    work = args.work / "families"
    mark = work / ".mumoe-gguf-families"  # this script's own folder: it rewrites what is inside, nothing else
    if work.exists() and any(work.iterdir()) and not mark.exists():
        sys.exit(f"{work} holds files this benchmark did not write; choose another --work")
    work.mkdir(parents=True, exist_ok=True)
    mark.touch()
    tree = llama_cpp(args.llama_cpp, args.work)
    binary = tree / "build" / "bin"
    tok = load_tokenizer("default")
    convert = CONVERT.format(tree=str(tree), known=sha256(str(tok.encode(chktxt(tree))).encode()).hexdigest(),
                             chktxt=chktxt(tree))
    text = (DATA / "prose" / "eval.txt").read_text("utf-8")
    text_file = work / "eval.txt"
    text_file.write_text(text)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    families = [r.model_type for r in support_table() if r.gguf == "yes" and r.tiny]
    if args.only:
        families = [f for f in families if f in args.only]
    vocab = len(tok)
    rows = []
    for fam in families:
        t0 = time.perf_counter()
        row: dict = {"family": fam}
        dense, pruned = work / f"{fam}-dense", work / f"{fam}-pruned"
        model = tiny_model(fam, vocab_size=vocab, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.pad_token_id)
        model.save_pretrained(dense)
        tok.save_pretrained(dense)
        try:
            report = mumoe.prune(model, "random", 0.25 if fam not in GROUPED else 0.5, seed=0)
            row["experts"] = [len(e["kept"]) for e in report.layers][0]
        except MumoeError as e:  # a family whose experts cannot be removed (JetMoE): Wanda 50% instead
            row["method"] = f"wanda 50% ({e})"
            report = mumoe.prune(model, "wanda", 0.5, calib=torch.tensor(ids[:256]).reshape(4, 64))
        save_pruned(model, pruned, report, tokenizer=tok, overwrite=True)
        for name, folder in (("dense", dense), ("pruned", pruned)):
            gguf = work / f"{fam}-{name}-f32.gguf"
            gguf.unlink(missing_ok=True)
            rc, log = run([sys.executable, "-c", convert, str(folder), "--outtype", "f32", "--outfile", str(gguf)])
            if rc != 0:
                row[name] = {"error": "converter: " + last_error(log)}
                continue
            meta = gguf_meta(gguf, tree)
            ppl, err = llama_ppl(binary, gguf, text_file)
            if ppl is None:
                row[name] = {"error": "llama.cpp: " + err}
                continue
            hf = hf_ppl(folder, ids, meta["add_bos"], meta["bos"] or 0)
            row[name] = {"llama": ppl, "hf": hf, "ratio": ppl / hf}
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
        print(json.dumps(row), flush=True)
        del model
        torch.set_num_threads(torch.get_num_threads())
    print(f"\nllama.cpp ({tree}), GGUF f32, ctx {CTX}, {CHUNKS} chunks (second half of each scored), tiny random "
          "models with the bundled tokenizer\n")
    print("| family | dense: llama.cpp / transformers | 25% experts removed: llama.cpp / transformers |")
    print("|---|---|---|")
    for r in rows:
        cells = [f"{r[n]['ratio']:.6f}" if "ratio" in r.get(n, {}) else r.get(n, {}).get("error", "?")
                 for n in ("dense", "pruned")]
        note = " (Wanda 50%: experts cannot be removed)" if "method" in r else ""
        print(f"| `{r['family']}` | {cells[0]} | {cells[1]}{note} |")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    if args.only and RESULTS.exists():
        done = {r["family"] for r in rows}
        rows = [r for r in json.loads(RESULTS.read_text())["rows"] if r["family"] not in done] + rows
    RESULTS.write_text(json.dumps({"ctx": CTX, "chunks": CHUNKS, "llama_cpp": str(tree), "rows": rows}, indent=1))
    print(f"\nwrote {RESULTS}")
    return 0


GROUPED = {"deepseek_v3", "deepseek_v32", "dots1", "glm4_moe", "mimo_v2_flash"}  # tiny configs with n_group 2

if __name__ == "__main__":
    raise SystemExit(main())
