"""mumoe's OWL layer sparsities against the OWL authors' code (github: luuyin/OWL), run in a venv of its own.

    git clone https://github.com/luuyin/OWL /tmp/authors/OWL
    python benchmarks/owl_authors.py --python /tmp/authors-venv/bin/python --repo /tmp/authors/OWL

Here: tiny Llamas (transformers' LlamaConfig, random weights; 2 and 8 decoder layers) are calibrated on random
token windows; every decoder linear's input rows are captured per window, and mumoe's per-layer OWL sparsities are
computed (`mumoe.prune(..., "wanda", budget="owl")`'s rule). There, unmodified: the authors' `WrappedGPT`
(lib/layerwrapper.py) accumulates each linear's `scaler_row` window by window as their hooks do, `W_metric =
|W|·sqrt(scaler_row)` per linear as in `prune_wanda_outlier`, their `check_outlier_mean` per layer, and their
allocation statements (lines of `prune_wanda_outlier`, executed as written). Their code runs whole models on
CUDA through transformers 4.3x; only these parts are taken (the model forwards are ours). Prints the per-layer
sparsities of both and their largest difference; writes benchmarks/results/owl_authors.json.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
import types
from pathlib import Path

import torch

from authors import run_beside, top_level_functions

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "owl_authors.json"
TARGET, M, LAMBDA = 0.7, 5.0, 0.08  # the authors' Llama setting: 70% sparsity, M = 5, λ = 0.08


def ours(file: Path) -> None:
    from mumoe.grains.weight import owl_layer_active
    from mumoe.models.prunable import prunable_names
    from mumoe.models.tiny import tiny_model
    from mumoe.observe.collectors import InputNorms
    from mumoe.observe.runner import run
    from mumoe.recipe import Recipe

    saved = {}
    gen = torch.Generator().manual_seed(0)
    for name, m, wins in (("tiny llama, 2 layers", tiny_model("llama", seed=0),
                           torch.randint(3, 128, (8, 32), generator=gen)),
                          ("tiny llama, 8 layers", tiny_model("llama", seed=1, num_hidden_layers=8),
                           torch.randint(3, 128, (8, 64), generator=gen))):
        names = prunable_names(m)
        params = dict(m.named_parameters())
        captured: dict[str, list[torch.Tensor]] = {n: [] for n in names if params[n].dim() == 2}
        mods = dict(m.named_modules())
        hooks = [mods[n.removesuffix(".weight")].register_forward_pre_hook(
            lambda mod, a, n=n: captured[n].append(a[0].detach().clone())) for n in captured]
        with torch.no_grad():
            for w in wins:  # one window at a time, as the authors' loop feeds one sample
                m(w[None])
        for h in hooks:
            h.remove()
        norms = run(m, wins, [InputNorms(m)], batch_size=4)[0].result()
        recipe = Recipe.build("wanda", TARGET, calib="tensor", budget="owl", owl_m=M, owl_lambda=LAMBDA)
        active = owl_layer_active(params, norms, recipe)
        saved[name] = {"inputs": captured, "weights": {n: params[n].detach().clone() for n in captured},
                       "ours": {j: 1 - a for j, a in active.items()},
                       "experts_skipped": sorted(set(names) - set(captured))}
    torch.save(saved, file)


def theirs(file: Path, repo: Path) -> None:
    import numpy as np

    saved = torch.load(file)
    env: dict = {"torch": torch, "nn": torch.nn}
    exec(compile((repo / "lib" / "layerwrapper.py").read_text(), "layerwrapper.py", "exec"), env)
    WrappedGPT = env["WrappedGPT"]
    funcs = top_level_functions(repo / "lib" / "prune_all.py")
    scope: dict = {"torch": torch, "np": np}
    exec(compile(ast.Module([funcs["check_outlier_mean"]], []), "prune_all.py", "exec"), scope)
    body = funcs["prune_wanda_outlier"].body
    # the allocation: the statements after the outlier loop that rewrite all_layer_ratio, as written
    alloc = [s for s in body if isinstance(s, ast.Assign) and any(
        isinstance(t, ast.Name) and t.id == "all_layer_ratio" for t in s.targets) and s.lineno > body[0].lineno
        and not (isinstance(s.value, ast.List) and not s.value.elts)]
    out = {}
    for name, d in saved.items():
        per_layer: dict[int, list[torch.Tensor]] = {}
        for n, xs in d["inputs"].items():
            w = d["weights"][n]
            wrapped = WrappedGPT(types.SimpleNamespace(weight=types.SimpleNamespace(data=w, device=w.device)))
            wrapped.layer = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)  # isinstance(.., nn.Linear)
            for x in xs:
                wrapped.add_batch(x, None)
            W_metric = torch.abs(w) * torch.sqrt(wrapped.scaler_row.reshape((1, -1)))
            per_layer.setdefault(int(n.split(".layers.")[1].split(".")[0]), []).append(W_metric)
        all_layer_ratio = []
        for j in sorted(per_layer):
            layer_wmetric = torch.cat([torch.flatten(x.cpu()) for x in per_layer[j]])
            all_layer_ratio.append(scope["check_outlier_mean"](layer_wmetric, M))
        local = {"all_layer_ratio": all_layer_ratio, "np": np,
                 "args": types.SimpleNamespace(Lamda=LAMBDA, sparsity_ratio=TARGET)}
        for stmt in alloc:
            exec(compile(ast.Module([stmt], []), "prune_all.py", "exec"), local)
        theirs_s = {j: float(1 - r) for j, r in zip(sorted(per_layer), local["all_layer_ratio"])}
        out[name] = {"theirs": theirs_s, "ours": {int(k): float(v) for k, v in d["ours"].items()},
                     "statements": len(alloc), "experts_skipped": d["experts_skipped"]}
    print(json.dumps(out))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--python", required=True, help="the authors' venv's python")
    ap.add_argument("--repo", type=Path, required=True, help="a checkout of luuyin/OWL")
    ap.add_argument("--theirs", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.theirs:
        theirs(Path(args.theirs), args.repo)
        return 0
    res = run_beside(args.python, __file__, ["--python", args.python, "--repo", str(args.repo)], ours)
    for name, r in res.items():
        diff = max(abs(r["ours"][k] - v) for k, v in r["theirs"].items())  # JSON: the same string keys
        print(f"{name}: OWL layer sparsities (target {TARGET}, M {M}, λ {LAMBDA}), max |ours − theirs| {diff:.1e}")
        print("  theirs " + ", ".join(f"{int(k)}: {v:.4f}" for k, v in r["theirs"].items()))
        print("  ours   " + ", ".join(f"{int(k)}: {v:.4f}" for k, v in r["ours"].items()))
        if r["experts_skipped"]:
            print(f"  (fused expert tensors not compared: {len(r['experts_skipped'])})")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(res, indent=1))
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
