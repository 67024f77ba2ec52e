"""mumoe's merge methods against their authors' own code, run in a venv of its own (never committed).

    git clone https://github.com/wazenmai/HC-SMoE /tmp/authors/HC-SMoE
    git clone https://github.com/UNITES-Lab/MC-SMoE /tmp/authors/MC-SMoE
    git clone https://github.com/zhy617/SMoE /tmp/authors/SMoE      # Sub-MoE: the official code is not public
    python3.11 -m venv /tmp/authors-venv && /tmp/authors-venv/bin/pip install torch==2.13.0 transformers \
        scikit-learn numpy tqdm
    python benchmarks/merge_authors.py --python /tmp/authors-venv/bin/python --repos /tmp/authors

Here (our venv): the tiny qwen3_moe and mixtral models and the bundled model are calibrated once; mumoe's merge
statistics (`MergeStats`) and groups (the `merge` grain's plan at 25% and 50%) are saved with the raw material the
authors' code starts from (router logits per layer, every expert's outputs on every token, expert weights). There
(the authors' venv, their files loaded unmodified): HC-SMoE's `hierarchical_clustering(..., 'average')` on the
experts' mean outputs; MC-SMoE's `ExpertsGrouperForMixtral` (router-logit similarities, usage, the global
dominant grouping) fed a stand-in model that returns the saved logits; the Sub-MoE re-implementation's output
similarity, K-means and `svd_subspace_alignment`. Printed: agreement per model, layer and ratio; written to
benchmarks/results/merge_authors.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import types
from pathlib import Path

import torch

from authors import function_from, run_beside

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "merge_authors.json"
RATIOS = (0.25, 0.5)
METHODS = ("hc-smoe", "m-smoe", "sub-moe")


# -- here: mumoe ------------------------------------------------------------------------------------------------
def models():
    import mumoe
    from mumoe.loading import DATA
    from mumoe.models.tiny import tiny_model
    from mumoe.observe import tokenize, windows

    gen = torch.Generator().manual_seed(0)
    for arch in ("qwen3_moe", "mixtral"):
        yield f"tiny {arch}", tiny_model(arch, seed=0), torch.randint(3, 128, (8, 32), generator=gen)
    model, tok = mumoe.load_default()
    wins = torch.cat([windows(tokenize(tok, (DATA / d / "calib.txt").read_text("utf-8")), 256, 4)
                      for d in ("code", "docs", "kernel", "prose")])
    yield "bundled model", model, wins


def ours(file: Path) -> None:
    from mumoe.criteria import score_methods
    from mumoe.grains.merge import make_plan
    from mumoe.models import moe_adapter_for
    from mumoe.observe.collectors import OnRoute
    from mumoe.observe.runner import run
    from mumoe.recipe import Recipe

    saved = {}
    for name, model, wins in models():
        layers = moe_adapter_for(model).moe_layers()
        seen = {layer.index: {"logits": [], "hidden": []} for layer in layers}

        def grab(ev):
            seen[ev.layer.index]["logits"].append(ev.logits.detach().float())
            seen[ev.layer.index]["hidden"].append(ev.hidden.detach().float())

        run(model, wins, [OnRoute(grab)], batch_size=4)
        scores = score_methods(model, list(METHODS), wins, batch_size=4)
        groups = {}
        for m in METHODS:
            for r in RATIOS:
                plan = make_plan(Recipe.build(m, r, calib="tensor"), layers, scores[m])
                groups[f"{m}@{r}"] = {j: [list(g) for g in gs] for j, gs in plan.groups.items()}
        per_layer = {}
        with torch.no_grad():
            for layer in layers:
                h = torch.cat(seen[layer.index]["hidden"])  # [T, H]
                per_layer[layer.index] = {
                    "logits": torch.cat(seen[layer.index]["logits"]),  # [T, E]
                    "outputs": torch.stack([layer.expert_forward(e, h) for e in range(layer.num_experts)]),  # [E,T,H]
                    "gate": torch.stack([layer.gate_proj(e) for e in range(layer.num_experts)]).clone(),
                    "up": torch.stack([layer.up_proj(e) for e in range(layer.num_experts)]).clone(),
                    "down": torch.stack([layer.down_proj(e) for e in range(layer.num_experts)]).clone(),
                    "freq": scores["hc-smoe"][layers.index(layer)]["freq"],
                    "sub_moe_distance": scores["sub-moe"][layers.index(layer)]["features"],
                    "msmoe_similarity": scores["m-smoe"][layers.index(layer)]["similarity"],
                    "hc_features": scores["hc-smoe"][layers.index(layer)]["features"],
                }
        # the subspace merge (full rank) of the first layer's largest 50% group, by mumoe's operator
        from mumoe.apply.merge import merge_rows

        first = per_layer[layers[0].index]
        group = max(groups["sub-moe@0.5"][layers[0].index], key=len)
        f = first["freq"][group].double()
        w = (f / f.sum()).tolist()
        merged = {k: merge_rows(first[k][group].double(), w, "svd", None) for k in ("gate", "up", "down")}
        saved[name] = {"layers": per_layer, "groups": groups, "top_k": layers[0].top_k,
                       "E": layers[0].num_experts, "svd": {"group": group, "w": w, "merged": merged}}
    torch.save(saved, file)


# -- there: the authors' code -----------------------------------------------------------------------------------
def load_file(path: Path, name: str, stubs: dict | None = None) -> types.ModuleType:
    for mod, attrs in (stubs or {}).items():
        m = types.ModuleType(mod)
        m.__dict__.update(attrs)
        sys.modules[mod] = m
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def partition(labels) -> list[list[int]]:
    out: dict[int, list[int]] = {}
    for i, lab in enumerate(labels):
        out.setdefault(int(lab), []).append(i)
    return sorted(out.values(), key=lambda g: g[0])


class Ids:
    """A batch entry whose .cuda() is itself (the authors' loops move every batch to the GPU)."""

    def cuda(self):
        return self


def theirs(file: Path, repos: Path) -> None:
    from typing import List

    import numpy as np

    saved = torch.load(file)
    hc = load_file(repos / "HC-SMoE" / "hcsmoe" / "merging" / "clustering.py", "hc_clustering")
    consts = load_file(repos / "MC-SMoE" / "mcsmoe" / "utils" / "constants.py", "mc_constants")
    mc = load_file(repos / "MC-SMoE" / "mcsmoe" / "merging" / "grouping_mixtral.py", "mc_grouping",
                   {"mcsmoe": {}, "mcsmoe.utils": {}, "mcsmoe.utils.constants": vars(consts)})
    smoe = repos / "SMoE" / "src" / "qwen"
    kmeans_mod = load_file(smoe / "compress" / "kmeans_cluster.py", "smoe_kmeans")
    svd_align = function_from(smoe / "compress" / "merge_experts.py", "svd_subspace_alignment",
                              {"torch": torch, "svd": torch.linalg.svd, "List": List})
    out = {}
    for name, d in saved.items():
        layers = d["layers"]
        L, E = len(layers), d["E"]
        idx = sorted(layers)
        rows = []
        # MC-SMoE: its own similarity and usage passes, fed the saved logits by a stand-in model
        config = types.SimpleNamespace(num_local_experts=E, hidden_size=1, num_hidden_layers=L)

        class Model:
            def __init__(self):
                self.config = config

            def eval(self):
                return self

            def __call__(self, output_router_logits=True, **batch):
                return types.SimpleNamespace(router_logits=tuple(layers[j]["logits"] for j in idx))

        grouper = mc.ExpertsGrouperForMixtral(config=config, similarity_base="router-logits")
        grouper.sparse_layer_indices = list(range(L))
        grouper.reset_all()
        grouper.compute_all_similarities(Model(), [{"input_ids": Ids()}])
        grouper.compute_all_usages(Model(), [{"input_ids": Ids()}])
        sim_err = max(float((grouper.get_similarity_matrix(f"model.layers.{i}.block_sparse_moe")
                             - layers[j]["msmoe_similarity"].float()).abs().max()) for i, j in enumerate(idx))
        for r in RATIOS:
            M = E - round(r * E)
            g2 = mc.ExpertsGrouperForMixtral(config=config, similarity_base="router-logits")
            g2.sparse_layer_indices = list(range(L))
            g2.reset_all()
            g2._similarity_state_dict, g2._usage_frequency_state_dict = (grouper.similarity_state_dict(),
                                                                       grouper.usage_frequency_state_dict())
            g2.group_experts_globally_from_dominant_experts(num_average_groups=M, merging_layers=list(range(L)))
            for i, j in enumerate(idx):
                ours_mc = d["groups"][f"m-smoe@{r}"][j]
                theirs_mc = partition(g2.group_state_dict()[f"model.layers.{i}.block_sparse_moe"].tolist())
                x = layers[j]["outputs"].mean(1)  # HC-SMoE: mean output over every token
                labels, _ = hc.hierarchical_clustering(x.float(), M, "average")
                ours_hc = d["groups"][f"hc-smoe@{r}"][j]
                S = 1 - layers[j]["sub_moe_distance"].float()  # ours; theirs computed below from the outputs
                labels_km, _ = kmeans_mod.cluster_experts_kmeans(S_theirs(smoe, layers[j], E), M)
                ours_km = d["groups"][f"sub-moe@{r}"][j]
                pts = (1 - S).double()
                inertia = lambda gs: sum(float(((pts[g] - pts[g].mean(0)) ** 2).sum()) for g in gs)  # noqa: E731
                rows.append({"layer": j, "ratio": r, "hc_smoe_equal": ours_hc == partition(labels.tolist()),
                             "m_smoe_equal": ours_mc == theirs_mc, "m_smoe_sizes": [len(ours_mc), len(theirs_mc)],
                             "sub_moe_kmeans_equal": ours_km == partition(labels_km.tolist()),
                             "sub_moe_inertia": [round(inertia(ours_km), 6),
                                                 round(inertia(partition(labels_km.tolist())), 6)]})
        # Sub-MoE: output similarity and the subspace merge of the largest 50% group of the first layer
        j = idx[0]
        S_t = S_theirs(smoe, layers[j], E)
        S_o = 1 - layers[j]["sub_moe_distance"].float()
        group, w = d["svd"]["group"], d["svd"]["w"]
        svd_err, identical_err = {}, {}
        for kind in ("gate", "up", "down"):
            mats = layers[j][kind][group]
            a = svd_align([m for m in mats], w).double()
            svd_err[kind] = float((a - d["svd"]["merged"][kind]).norm() / a.norm())
            same = [mats[0]] * 3
            identical_err[kind] = float((svd_align(same, [0.5, 0.3, 0.2]).double() - mats[0].double()).norm()
                                        / mats[0].double().norm())
        out[name] = {"rows": rows, "m_smoe_similarity_max_abs_diff": sim_err,
                     "sub_moe_similarity_max_abs_diff": float((S_t - S_o).abs().max()),
                     "sub_moe_group": group, "sub_moe_svd_rel_diff": svd_err,
                     "their_svd_three_identical_rel_err": identical_err}
    print(json.dumps(out))
    del np


def S_theirs(smoe: Path, layer: dict, E: int) -> torch.Tensor:
    fn = function_from(smoe / "analysis" / "direct_expert_similarity.py", "calculate_expert_similarity_matrix",
                       {"torch": torch, "CURRENT_CLUSTER_N": E})
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        return fn(layer["outputs"].float()[:, None])  # [E, 1, T, H]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--python", required=True, help="the authors' venv's python")
    ap.add_argument("--repos", type=Path, required=True, help="folder with HC-SMoE, MC-SMoE and SMoE checkouts")
    ap.add_argument("--theirs", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.theirs:
        theirs(Path(args.theirs), args.repos)
        return 0
    res = run_beside(args.python, __file__, ["--python", args.python, "--repos", str(args.repos)], ours)
    for name, r in res.items():
        rows = r["rows"]
        n = len(rows)
        print(f"{name}: HC-SMoE groups equal {sum(x['hc_smoe_equal'] for x in rows)}/{n}; M-SMoE groups equal "
              f"{sum(x['m_smoe_equal'] for x in rows)}/{n} (similarity max |Δ| {r['m_smoe_similarity_max_abs_diff']:.1e}); "
              f"Sub-MoE K-means partitions equal {sum(x['sub_moe_kmeans_equal'] for x in rows)}/{n}, "
              f"inertia ours <= theirs {sum(x['sub_moe_inertia'][0] <= x['sub_moe_inertia'][1] + 1e-9 for x in rows)}/{n} "
              f"(similarity max |Δ| {r['sub_moe_similarity_max_abs_diff']:.1e}); subspace merge rel. diff "
              + ", ".join(f"{k} {v:.1e}" for k, v in r["sub_moe_svd_rel_diff"].items())
              + "; their merge of 3 identical experts: rel. err "
              + ", ".join(f"{k} {v:.1e}" for k, v in r["their_svd_three_identical_rel_err"].items()))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(res, indent=1))
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
