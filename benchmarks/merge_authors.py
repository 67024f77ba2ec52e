"""mumoe's merge methods against their authors' own code, run in a venv of its own (never committed).

    git clone https://github.com/wazenmai/HC-SMoE /tmp/authors/HC-SMoE
    git clone https://github.com/UNITES-Lab/MC-SMoE /tmp/authors/MC-SMoE
    git clone https://github.com/zhy617/SMoE /tmp/authors/SMoE      # Sub-MoE: the official code is not public
    git clone https://github.com/SamsungSAILMontreal/ream /tmp/authors/ream
    python3.11 -m venv /tmp/authors-venv && /tmp/authors-venv/bin/pip install torch==2.13.0 transformers \
        scikit-learn numpy tqdm scipy psutil
    python benchmarks/merge_authors.py --python /tmp/authors-venv/bin/python --repos /tmp/authors

Here (our venv): the tiny qwen3_moe and mixtral models and the bundled model are calibrated once; mumoe's merge
statistics (`MergeStats`) and groups (the `merge` grain's plan at 25% and 50%) are saved with the raw material the
authors' code starts from (router logits per layer, every expert's outputs on every token, expert weights). There
(the authors' venv, their files loaded unmodified): HC-SMoE's `hierarchical_clustering(..., 'average')` on the
experts' mean outputs; MC-SMoE's `ExpertsGrouperForMixtral` (router-logit similarities, usage, the global
dominant grouping) fed a stand-in model that returns the saved logits; the Sub-MoE re-implementation's output
similarity, K-means and `svd_subspace_alignment`; REAM's own pipeline on each layer's saved inputs — its
`run_all_experts` (gated outputs, activations), `reap` saliency, `pseudo_group`, `pca_reduce` weight features and
`Merger._merge` (Hungarian alignment, saliency-weighted average) — on a stand-in MoE block holding the layer's
weights (one-shot statistics: both sides see the unmerged layer's inputs; fp32 weights on both sides). Their
per-expert random token permutation of the activation sample is replaced by the identity (see the REAM notes in
docs/methods.md). Printed: agreement per model, layer and ratio; written to benchmarks/results/merge_authors.json.
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
METHODS = ("hc-smoe", "m-smoe", "sub-moe", "ream")


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
                       "E": layers[0].num_experts, "svd": {"group": group, "w": w, "merged": merged},
                       "ream": ream_ours(layers, scores["ream"], per_layer, seen)}
    torch.save(saved, file)


def ream_ours(layers, scores, per_layer, seen) -> dict:
    """Per layer and ratio: mumoe's REAM features, groups, neuron orders and merged experts (fp32 weights); the
    layer's router and the MoE inputs the authors' pipeline starts from."""
    from mumoe.apply.merge import merge_rows
    from mumoe.criteria import merge as mf
    from mumoe.select.merge import merged_count

    out = {}
    for layer, s in zip(layers, scores):
        j = layer.index
        gate_up, down = layer.experts.gate_up_proj.detach().float(), layer.experts.down_proj.detach().float()
        res = {"router": layer.router_weight.detach().float().clone(), "hidden": torch.cat(seen[j]["hidden"]),
               "saliency": s["saliency"], "distance": s["distance"], "act_tokens": s["acts"].shape[1]}
        for r in RATIOS:
            M = merged_count(layer.num_experts, r, layer.top_k)
            gs = mf.group_by_ream(s, M, 0)
            perm = mf.align_ream(layer, s, gs)
            sal = s["merge_weights"].double()
            merged = []
            for g in gs:
                w = (sal[g] / sal[g].sum()).tolist()
                merged.append({"gate_up": merge_rows(gate_up[g], w, "aligned", None, "gate_up", perm[g]),
                               "down": merge_rows(down[g], w, "aligned", None, "cols", perm[g])})
            res[r] = {"groups": gs, "perm": perm, "merged": merged}
        res["gate_up"], res["down"] = gate_up.clone(), down.clone()
        out[j] = res
    return out


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
        ream_rows = ream_theirs(repos, d["ream"], d["top_k"])
        out[name] = {"rows": rows, "ream": ream_rows, "m_smoe_similarity_max_abs_diff": sim_err,
                     "sub_moe_similarity_max_abs_diff": float((S_t - S_o).abs().max()),
                     "sub_moe_group": group, "sub_moe_svd_rel_diff": svd_err,
                     "their_svd_three_identical_rel_err": identical_err}
    print(json.dumps(out))
    del np


def ream_theirs(repos: Path, layers: dict, top_k: int) -> list[dict]:
    """REAM's own functions on each layer: a stand-in MoE block (router Linear, a ModuleList of Qwen3-style MLPs
    holding the saved fp32 weights) run through `run_all_experts`, `reap`, `pseudo_group`, `pca_reduce` and
    `Merger._merge` exactly as `Merger.fit` calls them (one batch); compared with mumoe's groups, neuron orders and
    merged tensors."""
    import copy

    import numpy as np
    from torch import nn

    root = repos / "ream"
    sys.path.insert(0, str(root))
    sys.modules["data.calibration_data"] = types.SimpleNamespace(print_seq_stats=lambda *a, **k: None)
    import ream.moe_utils as mu
    from ream.merger import Merger
    from ream.ream import pseudo_group
    from ream.saliency import reap
    from ream.utils import normalize_rows
    from ream.weight_utils import ffn_weight_matrix, pca_reduce

    # the activation sample: the same first N tokens for every expert (theirs draws a permutation per expert)
    mu.np = types.SimpleNamespace(random=types.SimpleNamespace(permutation=np.arange))

    class Qwen3MoeMLP(nn.Module):
        def __init__(self, gate, up, down):
            super().__init__()
            self.gate_proj = nn.Linear(gate.shape[1], gate.shape[0], bias=False)
            self.up_proj = nn.Linear(up.shape[1], up.shape[0], bias=False)
            self.down_proj = nn.Linear(down.shape[1], down.shape[0], bias=False)
            self.gate_proj.weight.data, self.up_proj.weight.data = gate.clone(), up.clone()
            self.down_proj.weight.data = down.clone()
            self.act_fn = nn.SiLU()

    rows = []
    for j, d in layers.items():
        E, I = d["gate_up"].shape[0], d["down"].shape[-1]
        block = nn.Module()
        block.gate = nn.Linear(d["router"].shape[1], E, bias=False)
        block.gate.weight.data = d["router"].clone()
        block.experts = nn.ModuleList(Qwen3MoeMLP(d["gate_up"][e, :I], d["gate_up"][e, I:], d["down"][e])
                                      for e in range(E))
        with torch.no_grad():
            gate, final, act = mu.run_all_experts(block, d["hidden"][None], final_reduce=False,
                                                  act_samples=d["act_tokens"], gated_sim=True)
            saliency = reap(gate, final, top_k=top_k)
            expert_logits = final.mean(1, keepdim=True)
            zeros = saliency == 0
            if zeros.any():
                saliency[zeros] = min(0.5, saliency[saliency > 0].min().item())
            vectors = normalize_rows(torch.stack([ffn_weight_matrix(mlp) for mlp in block.experts])).flatten(0, 1)
            randomized = pca_reduce(vectors, r=64).reshape(E, -1, 64)  # theirs: torch.pca_lowrank
            xc = vectors.double() - vectors.double().mean(0, keepdim=True)  # exact PCA, to isolate that one step
            vals, vecs = torch.linalg.eigh(xc.T @ xc)
            exact = (xc @ (vecs[:, -64:].flip(1) * vals[-64:].flip(0).clamp(min=0).sqrt())).float().reshape(E, -1, 64)
        merger = Merger.__new__(Merger)
        merger.merging, merger.device = "logits+weights", "cpu"
        sal_err = float((saliency.double() - d["saliency"]).abs().max() / d["saliency"].abs().max())
        for r in RATIOS:
            ours = d[r]
            M = len(ours["groups"])
            labels, centroids = pseudo_group(saliency, expert_logits=expert_logits, k=M,
                                             gate_logits=gate.view(-1, E), group_size=16)
            groups = []
            for c in sorted(int(x) for x in centroids):  # exported order: by centroid id, the centroid first
                members = [int(i) for i in np.where(labels == labels[c])[0]]
                groups.append([c] + [i for i in members if i != c])
            same_groups = groups == [list(g) for g in ours["groups"]]
            row = {"layer": j, "ratio": r, "groups_equal": same_groups, "saliency_rel_diff": sal_err,
                   "merged_groups": sum(len(g) > 1 for g in groups) if same_groups else 0}
            for pca, weights in (("randomized", randomized), ("exact", exact)):
                equal, worst = 0, 0.0
                for g, mine in zip(groups, ours["merged"]):
                    if len(g) == 1 or not same_groups:
                        continue
                    merged = merger._merge(experts=copy.deepcopy(block.experts), group=np.asarray(g),
                                           saliency=saliency.clone(), expert_weights=weights.clone(),
                                           expert_act=act.clone())
                    theirs_gu = torch.cat([merged.gate_proj.weight, merged.up_proj.weight]).double()
                    theirs_dn = merged.down_proj.weight.double()
                    err = max(float((theirs_gu - mine["gate_up"].double()).norm() / theirs_gu.norm()),
                              float((theirs_dn - mine["down"].double()).norm() / theirs_dn.norm()))
                    worst = max(worst, err)
                    equal += err < 1e-5
                row[f"merged_equal_{pca}_pca"], row[f"max_rel_diff_{pca}_pca"] = equal, worst
            rows.append(row)
    return rows


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
        rr = r["ream"]
        n = sum(x["merged_groups"] for x in rr)
        print(f"{name}: REAM groups equal {sum(x['groups_equal'] for x in rr)}/{len(rr)} (saliency max rel. diff "
              f"{max(x['saliency_rel_diff'] for x in rr):.1e}); merged experts equal (rel. diff < 1e-5) with their "
              f"randomized PCA {sum(x['merged_equal_randomized_pca'] for x in rr)}/{n} (max rel. diff "
              f"{max(x['max_rel_diff_randomized_pca'] for x in rr):.1e}), with an exact PCA on their side "
              f"{sum(x['merged_equal_exact_pca'] for x in rr)}/{n} (max rel. diff "
              f"{max(x['max_rel_diff_exact_pca'] for x in rr):.1e})")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(res, indent=1))
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
