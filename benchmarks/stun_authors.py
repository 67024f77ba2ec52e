"""STUN's expert stage in mumoe (`criteria/stun.py`) against the authors' `merge_weight.py` (github:
thnkinbtfly/STUN), run unmodified as the command their README gives, in a venv of its own (never committed).

    git clone https://github.com/thnkinbtfly/STUN /tmp/authors/STUN
    pip install --target /tmp/tf457 "transformers==4.57.1" "huggingface_hub>=0.34,<1.0" "tokenizers>=0.22,<0.23"
    python benchmarks/stun_authors.py --python /tmp/authors-venv/bin/python --repo /tmp/authors/STUN \
        --old-transformers /tmp/tf457

Here: a tiny Mixtral (16 experts per layer, top-2, 4 layers, random weights) is saved as transformers writes it
(per-expert w1/w2/w3 keys: the layout their script reads) and calibrated once on random windows to count
co-selections (tokens whose top-2 holds both experts; saved as the `--load_path` file their
`assemble_logit_patterns.py` writes). mumoe's `search` / `cluster` / `representatives` choose the kept experts for
two targets (75% and 50% of all experts) with each distance: router rows (their default `--division_by_norm`)
and co-selection (`--load_path ... --divide_mean`). There: `merge_weight.py --binary_search_target N
--threshold 0.5 --top_k 15 --merge_max_clusters 0` (their README's search start; top_k: at most 15 of 16 experts
go per layer) writes a merged checkpoint; its kept experts are read back from its router rows, its threshold from
the `found` file, its clusters from their `select_expert_pairs` at that threshold. Prints per distance and target:
τ, per-layer counts, clusters and kept experts — equal or not; writes benchmarks/results/stun_authors.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from authors import write_results

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "stun_authors.json"
E, LAYERS = 16, 4
TARGETS = (0.75, 0.5)


def ours(folder: Path) -> dict:
    from mumoe.criteria import stun
    from mumoe.errors import MumoeError
    from mumoe.models import moe_adapter_for
    from mumoe.models.tiny import tiny_model

    model = tiny_model("mixtral", seed=0, num_local_experts=E, num_hidden_layers=LAYERS).eval()
    model.save_pretrained(folder / "model")
    layers = moe_adapter_for(model).moe_layers()
    counts = {layer.index: torch.zeros(E, E, dtype=torch.float64) for layer in layers}
    def count(j):
        def hook(mod, inp, out) -> None:  # out: (logits, weights, indices [T, 2])
            counts[j].add_(stun.coselect_counts(out[2].reshape(-1, 2), E))
        return hook

    hooks = [layer.router.register_forward_hook(count(layer.index)) for layer in layers]
    wins = torch.randint(3, 128, (16, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(wins)
    for h in hooks:
        h.remove()
    torch.save({j: c.float() for j, c in counts.items()}, folder / "coselect.pt")
    grams = [stun.expert_gram(layer) for layer in layers]
    out = {}
    for kind in ("router", "coselect"):
        dist = [stun.router_distance(layer.router_weight) if kind == "router" else
                stun.coselect_distance(counts[layer.index]) for layer in layers]
        for frac in TARGETS:
            target = round(frac * E * LAYERS)
            try:
                tau, clusters = stun.search(dist, target, [E - 1] * LAYERS)
            except MumoeError as e:
                out[f"{kind} {target}"] = {"failed": str(e)}
                continue
            kept = [sorted(stun.representatives(c, g)) for c, g in zip(clusters, grams)]
            out[f"{kind} {target}"] = {"threshold": tau, "clusters": [[list(x) for x in c] for c in clusters],
                                       "kept": kept, "counts": [len(c) for c in clusters]}
    return out


def theirs(folder: Path, repo: Path, python: str, ours_: dict, old_transformers: str | None) -> dict:
    import os

    from safetensors.torch import load_file

    # their script stores a per-layer list in the config: transformers 5 validates the field and refuses it
    env = {**os.environ, **({"PYTHONPATH": old_transformers} if old_transformers else {})}
    src = load_file(folder / "model" / "model.safetensors")
    out = {}
    for key in ours_:
        kind, target = key.split()
        dest = folder / f"theirs-{kind}-{target}"
        cmd = [python, "merge_weight.py", f"--model_path={folder / 'model'}", f"--output_dir={dest}",
               f"--layer_num={LAYERS}", "--threshold=0.5", f"--top_k={E - 1}", "--merge_max_clusters=0",
               f"--binary_search_target={target}"]
        if kind == "coselect":
            cmd += [f"--load_path={folder / 'coselect.pt'}", "--divide_mean=True", "--division_by_norm=False"]
        p = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, env=env)
        if not (dest / "found").exists():  # (the last step, copying a tokenizer, may fail: the model has none)
            out[key] = {"failed": (p.stdout + p.stderr)[-1500:]}
            continue
        state = torch.load(dest / "pytorch_model.bin", map_location="cpu")
        kept = []
        for j in range(LAYERS):
            gate = src[f"model.layers.{j}.block_sparse_moe.gate.weight"]
            rows = state[f"model.layers.{j}.block_sparse_moe.gate.weight"]
            kept.append(sorted(int(torch.nonzero((gate == r).all(1))[0]) for r in rows))
        tau = float((dest / "found").read_text())
        # their clusters at the threshold they found, from their own function (run in their venv)
        probe = (f"import sys, json, torch; sys.argv = ['x']; sys.path.insert(0, {str(repo)!r})\n"
                 "import merge_weight as m\n"
                 f"from safetensors.torch import load_file\nsd = load_file({str(folder / 'model' / 'model.safetensors')!r})\n"
                 f"res = [sorted(map(list, m.select_expert_pairs(sd['model.layers.%d.block_sparse_moe.gate.weight' % j], "
                 f"{E - 1}, {tau!r}, {kind == 'router'}, 'greedy_but_reject_mixed', "
                 f"{str(folder / 'coselect.pt') if kind == 'coselect' else ''!r}, j, None, {kind == 'coselect'})))"
                 f" for j in range({LAYERS})]\nprint(json.dumps(res))")
        q = subprocess.run([python, "-c", probe], cwd=repo, capture_output=True, text=True, env=env)
        clusters = json.loads(q.stdout.strip().splitlines()[-1]) if q.returncode == 0 else q.stderr[-800:]
        out[key] = {"threshold": tau, "kept": kept, "counts": [len(k) for k in kept], "clusters": clusters}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--python", required=True, help="the authors' venv's python")
    ap.add_argument("--repo", type=Path, required=True, help="a checkout of thnkinbtfly/STUN")
    ap.add_argument("--old-transformers", help="a transformers 4.x folder put first on their PYTHONPATH (pip install "
                    "--target DIR transformers==4.57.1 ...): their script writes a list into an int config field")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        mine = ours(Path(tmp))
        their = theirs(Path(tmp), args.repo, args.python, mine, args.old_transformers)
    report = {}
    for key, o in mine.items():
        t = their[key]
        if "failed" in t or "failed" in o:
            print(f"{key}: ours {'failed: ' + o['failed'] if 'failed' in o else 'found τ ' + str(o['threshold'])}; "
                  f"theirs {'failed: ' + t['failed'][-200:].strip() if 'failed' in t else 'found τ ' + str(t['threshold'])}")
            report[key] = {"ours": o, "theirs": t, "equal": {"both_failed": "failed" in t and "failed" in o}}
            continue
        same = {"threshold": abs(o["threshold"] - t["threshold"]) < 1e-9, "counts": o["counts"] == t["counts"],
                "clusters": o["clusters"] == t["clusters"]}
        if same["clusters"]:  # the kept member of each cluster of 3 or more (in one of 2, both members tie)
            picks = [(c, set(c) & set(ko), set(c) & set(kt)) for cl, ko, kt in zip(o["clusters"], o["kept"], t["kept"])
                     for c in cl]
            big = [(a, b) for c, a, b in picks if len(c) > 2]
            same["kept (clusters of 3+)"] = all(a == b for a, b in big)
            report_pairs = sum(1 for c, a, b in picks if len(c) == 2)
            same_pairs = sum(1 for c, a, b in picks if len(c) == 2 and a == b)
            o["clusters_of_3_or_more"], o["pairs_same_pick"] = len(big), f"{same_pairs}/{report_pairs}"
        report[key] = {"ours": o, "theirs": t, "equal": same}
        kind, target = key.split()
        print(f"{kind} distance, {target} of {E * LAYERS} experts kept: τ ours {o['threshold']:.6g} theirs "
              f"{t['threshold']:.6g}; per-layer counts {o['counts']} / {t['counts']}; equal: "
              + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in same.items())
              + (f" ({o['clusters_of_3_or_more']} such clusters; 2-member clusters, a tie, the same pick in "
                 f"{o['pairs_same_pick']})" if "clusters_of_3_or_more" in o else ""))
    write_results(RESULTS, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
