"""The merge grain (HC-SMoE, M-SMoE, Sub-MoE): statistics against slow loops, the groupings against SciPy's
average linkage / a transcription of the authors' rules / separated clusters, merged tensors against the weighted
average and the truncated SVD computed by hand, the compact export against the in-memory model, and the
layer-sequential merge (streamed export) against the in-memory one, tensor for tensor."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import mumoe
from conftest import char_tokenizer, ids, make
from mumoe import MumoeError
from mumoe.apply.merge import merge_layer, merge_rows, svd_merge
from mumoe.cli import main
from mumoe.models import moe_adapter_for
from mumoe.observe.collectors import MergeStats
from mumoe.observe.runner import run
from mumoe.criteria import merge as merge_features
from mumoe.criteria.merge import average_linkage
from mumoe.testtime.experts import capture_router_logits


def capture_expert_inputs(layers):
    """-> ({decoder layer: [experts' input per forward]}, hook handles) for the slow loops below."""
    inputs = {}
    hooks = [layer.experts.register_forward_pre_hook(
        lambda m, a, kw, j=layer.index: inputs.setdefault(j, []).append(a[0] if a else kw["hidden_states"]),
        with_kwargs=True) for layer in layers]
    return inputs, hooks


def per_token_inputs_and_logits(model, layers, x) -> dict[int, tuple]:
    """Each window of x run alone: {decoder layer: (the experts' input [T, H], the raw router logits [T, E])} over
    all T tokens in order — the material of the slow per-token loops (captured by hooks, not by the collectors)."""
    inputs, hooks = capture_expert_inputs(layers)
    with capture_router_logits(model) as logits, torch.no_grad():
        per = {layer.index: [] for layer in layers}
        for b in range(x.shape[0]):
            model(x[b:b + 1])
            for layer in layers:
                per[layer.index].append(logits[layer.index].reshape(-1, layer.num_experts))
    for h in hooks:
        h.remove()
    return {layer.index: (torch.cat([t.reshape(-1, t.shape[-1]) for t in inputs[layer.index]]),
                          torch.cat(per[layer.index])) for layer in layers}


def test_average_linkage_equals_scipy():
    hierarchy = pytest.importorskip("scipy.cluster.hierarchy")
    g = torch.Generator().manual_seed(0)
    for _ in range(40):
        E = int(torch.randint(3, 33, (1,), generator=g))
        M = int(torch.randint(1, E + 1, (1,), generator=g))
        x = torch.randn(E, 6, generator=g, dtype=torch.float64)
        labels = hierarchy.fcluster(hierarchy.linkage(x.numpy(), method="average"), t=M, criterion="maxclust")
        ref: dict = {}
        for i, lab in enumerate(labels):
            ref.setdefault(lab, []).append(i)
        assert average_linkage(x, M) == sorted(ref.values(), key=lambda c: c[0])
    assert average_linkage(torch.zeros(4, 2), 4) == [[0], [1], [2], [3]]
    with pytest.raises(MumoeError, match="cannot group"):
        average_linkage(torch.zeros(4, 2), 5)


def test_mean_outputs_equal_a_slow_loop():
    """Every expert on every token: the collector's sums equal a loop over tokens and experts; the routed counts
    equal the router's own top-k, captured separately."""
    model = make("qwen3_moe")
    layers = moe_adapter_for(model).moe_layers()
    x = ids(batch=3, length=10)
    col = MergeStats(layers, chunk=7)  # chunks that do not divide the token count
    run(model, x, [col], batch_size=2)
    inputs, hooks = capture_expert_inputs(layers)
    with capture_router_logits(model) as logits, torch.no_grad():
        counts = {layer.index: torch.zeros(layer.num_experts) for layer in layers}
        for b in range(3):
            model(x[b:b + 1])
            for layer in layers:
                top = logits[layer.index].topk(layer.top_k, dim=-1).indices
                counts[layer.index] += torch.bincount(top.flatten(), minlength=layer.num_experts)
    for h in hooks:
        h.remove()
    for layer, st in zip(layers, col.result()):
        hidden = torch.cat([t.reshape(-1, t.shape[-1]) for t in inputs[layer.index]])  # [30, H]
        assert st.n_tokens == hidden.shape[0] == 30
        with torch.no_grad():
            slow = torch.stack([sum(layer.expert_forward(e, hidden[t:t + 1])[0].double() for t in range(30)) / 30
                                for e in range(layer.num_experts)])
        assert torch.allclose(st.mean(), slow, rtol=1e-5, atol=1e-7)  # fp32 matmuls: row-chunk order
        assert torch.equal(st.freq, counts[layer.index].double())


def test_merged_tensors_are_the_weighted_average():
    model = make("qwen3_moe")
    layer = moe_adapter_for(model).moe_layers()[0]
    gu, dn, rw = (t.detach().clone().double() for t in (layer.experts.gate_up_proj, layer.experts.down_proj,
                                                        layer.router.weight))
    E = layer.num_experts
    groups = [[0, 3, 5], [1], [2, 7], [4, 6]]
    weights = [[0.5, 0.25, 0.25], [1.0], [0.1, 0.9], [0.5, 0.5]]
    merge_layer(layer, groups, weights)
    assert layer.num_experts == 4 and layer.router.weight.shape[0] == 4 and E == 8
    for m, (g, w) in enumerate(zip(groups, weights)):
        for now, was in ((layer.experts.gate_up_proj, gu), (layer.experts.down_proj, dn), (layer.router.weight, rw)):
            want = sum(wi * was[i] for wi, i in zip(w, g))
            assert torch.allclose(now[m].double(), want, rtol=1e-6, atol=1e-7)
    with pytest.raises(MumoeError, match="cover the 4 experts once"):
        merge_layer(layer, [[0, 1], [1, 2], [3]], [[0.5, 0.5], [0.5, 0.5], [1.0]])


def test_identical_experts_merge_into_that_expert():
    """Two identical experts (the same weights, so the same outputs, features and router rows) are one group;
    their merge is that expert, and the merged model routes every token to what the pair computed."""
    model = make("qwen3_moe")
    layer = moe_adapter_for(model).moe_layers()[0]
    with torch.no_grad():
        layer.experts.gate_up_proj[5].copy_(layer.experts.gate_up_proj[2])
        layer.experts.down_proj[5].copy_(layer.experts.down_proj[2])
        layer.router.weight[5].copy_(layer.router.weight[2])
    expert = layer.experts.gate_up_proj[2].detach().clone()
    report = mumoe.prune(model, "hc-smoe", 1 / 8, calib=ids(batch=4, length=12))
    groups = report.layers[0]["groups"]
    assert [2, 5] in groups and len(groups) == 7
    m = groups.index([2, 5])
    assert torch.allclose(moe_adapter_for(model).moe_layers()[0].experts.gate_up_proj[m], expert)


def test_cli_merge_export_is_compact_and_reloads_to_the_same_logits(ckpt, capsys):
    calib = ["--calib", str(ckpt / "c.txt"), "--nsamples", "4", "--seqlen", "16"]
    assert main(["prune", str(ckpt / "m"), "--method", "hc-smoe", "--ratio", "0.25", *calib,
                 "--out", str(ckpt / "o")]) == 0
    out = capsys.readouterr().out
    assert "25% of experts merged away (router centroid) with hc-smoe" in out and "8 -> 6 experts" in out
    rec = json.loads((ckpt / "o" / "pruning.json").read_text())
    assert rec["grain"] == "merge" and rec["form"] == "hf"
    for e in rec["layers"]:
        assert sorted(i for g in e["groups"] for i in g) == list(range(8)) and len(e["groups"]) == 6
        assert all(abs(sum(w) - 1) < 1e-9 for w in e["weights"])
    cfg = json.loads((ckpt / "o" / "config.json").read_text())
    assert cfg["num_experts"] == 6
    state = load_file(ckpt / "o" / "model.safetensors")
    assert state["model.layers.0.mlp.gate.weight"].shape[0] == 6  # compact: 6 router rows and 6 experts stored
    assert {k.split(".experts.")[1].split(".")[0] for k in state if "layers.0.mlp.experts." in k} == set("012345")
    # the export equals the in-memory merge, and transformers alone loads it
    model = AutoModelForCausalLM.from_pretrained(ckpt / "m", dtype=torch.float32).eval()
    recipe = mumoe.Recipe.load(ckpt / "o")
    mumoe.prune(model, recipe, tokenizer=char_tokenizer())
    reloaded = AutoModelForCausalLM.from_pretrained(ckpt / "o", dtype=torch.float32).eval()
    x = ids(batch=2, length=12)
    with torch.no_grad():
        assert torch.equal(reloaded(x).logits, model(x).logits)
    # merge then prune weights: a two-stage recipe
    assert main(["prune", str(ckpt / "m"), "--method", "hc-smoe", "--ratio", "0.25", "--then", "wanda:0.5", *calib,
                 "--out", str(ckpt / "two")]) == 0
    two = json.loads((ckpt / "two" / "pruning.json").read_text())
    assert [s["grain"] for s in two["stages"]] == ["merge", "weight"]


def test_merge_refused_before_loading_where_it_cannot_run(ckpt, capsys):
    """A group-limited router (DeepSeek-V3 n_group): one line, from the config, before any weight is read."""
    assert main(["prune", "tiny:deepseek_v3", "--method", "hc-smoe", "--ratio", "0.25", "--calib",
                 str(ckpt / "c.txt"), "--out", str(ckpt / "o")]) == 2
    err = capsys.readouterr().err
    assert err == "mumoe: error: merging is not available for group-limited routers (DeepSeek-V3 n_group) yet\n"
    assert not (ckpt / "o").exists()


# -- statistics -------------------------------------------------------------------------------------------------
def test_pairwise_cosines_and_logit_gram_equal_a_slow_loop():
    """Sub-MoE's mean output cosine (every expert on every token, row chunks under a byte budget) and M-SMoE's
    router-logit Gram equal per-token loops over captured inputs and logits."""
    model = make("qwen3_moe")
    layers = moe_adapter_for(model).moe_layers()
    x = ids(batch=3, length=10)
    col = MergeStats(layers, outputs=True, pairwise=True, budget=4 * 1024)  # a few tokens per chunk
    run(model, x, [col], batch_size=2)
    captured = per_token_inputs_and_logits(model, layers, x)
    for layer, st in zip(layers, col.result()):
        hidden, lg = captured[layer.index][0].double(), captured[layer.index][1].double()  # [30, H], [30, E]
        E = layer.num_experts
        cos = torch.zeros(E, E, dtype=torch.float64)
        with torch.no_grad():
            for t in range(30):
                outs = [layer.expert_forward(e, hidden[t:t + 1].float())[0].double() for e in range(E)]
                for i in range(E):
                    for j in range(E):
                        cos[i, j] += outs[i] @ outs[j] / (outs[i].norm() * outs[j].norm() + 1e-8)
        assert torch.allclose(st.mean_cosine(), cos / 30, atol=1e-6)
        assert torch.allclose(st.mean_cosine().diagonal(), torch.ones(E, dtype=torch.float64), atol=1e-6)
        sim = merge_features.msmoe(st)["similarity"]
        for i in range(E):
            for j in range(E):
                want = (torch.nn.functional.cosine_similarity(lg[:, i], lg[:, j], dim=0) + 1) / 2
                assert abs(float(sim[i, j]) - float(want)) < 1e-6  # fp32 logits: batch vs one window


# -- groupings --------------------------------------------------------------------------------------------------
def _mcsmoe_reference(freqs, sims, M_avg, top_k):
    """M-SMoE's global grouping as its authors' code states it (grouping_mixtral.py), written out with loops:
    normalised usage, each layer's most used set to 1 (ours: its top_k), one sorted list, threshold = entry
    number total, counts = usage above it; dominant = the most used, the rest join the most similar."""
    usage = []
    for f in freqs:
        u = [float(v) / float(sum(f)) for v in f]
        for i in sorted(range(len(u)), key=lambda i: (-u[i], i))[:top_k]:
            u[i] = 1.0
        usage.append(u)
    flat = sorted((v for u in usage for v in u), reverse=True)
    threshold = flat[M_avg * len(freqs)]
    out = []
    for f, u, sim in zip(freqs, usage, sims):
        n = sum(v > threshold for v in u)
        order = sorted(range(len(f)), key=lambda i: (-float(f[i]), i))
        cores = order[:n]
        label = {c: c for c in cores}
        for i in order[n:]:
            best = max(range(n), key=lambda c: (float(sim[i][cores[c]]), -c))
            label[i] = cores[best]
        groups = {}
        for i in range(len(f)):
            groups.setdefault(label[i], []).append(i)
        out.append(sorted(groups.values(), key=lambda g: g[0]))
    return out


def test_msmoe_groups_follow_the_authors_rule():
    g = torch.Generator().manual_seed(1)
    uneven = 0
    for trial in range(20):
        L, E, k = 4, 8, 2
        freqs = [torch.randint(0, 50, (E,), generator=g).double() + 1 for _ in range(L)]
        sims = [torch.rand(E, E, generator=g, dtype=torch.float64) for _ in range(L)]
        ratio = [0.25, 0.5][trial % 2]
        counts = merge_features.msmoe_counts(freqs, ratio, [k] * L)
        ours = [merge_features.dominant(s, f, M) for s, f, M in zip(sims, freqs, counts)]
        assert ours == _mcsmoe_reference(freqs, sims, E - round(ratio * E), k)
        assert all(M >= k for M in counts) and sum(counts) <= L * (E - round(ratio * E))
        uneven += len(set(counts)) > 1
    assert uneven >= 5  # per-layer counts differ in general


def test_kmeans_finds_separated_clusters_and_matches_sklearn():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[8.0, 0, 0], [0, 8.0, 0], [0, 0, 8.0], [-8.0, 0, 0]])
    labels = torch.randint(0, 4, (20,), generator=g)
    labels[:4] = torch.arange(4)
    x = centres[labels] + 0.1 * torch.randn(20, 3, generator=g)
    want = sorted((torch.nonzero(labels == c).flatten().tolist() for c in range(4)), key=lambda c: c[0])
    assert merge_features.kmeans(x, 4, seed=0) == want
    assert merge_features.kmeans(x, 4, seed=5) == want  # any seed: the same partition
    groups = merge_features.kmeans(torch.zeros(5, 2), 3, seed=0)  # identical points: still M non-empty groups
    assert len(groups) == 3 and sorted(i for c in groups for i in c) == list(range(5))
    cluster = pytest.importorskip("sklearn.cluster")  # where scikit-learn is installed: as good local optima
    ratios = []
    for trial in range(30):
        x = torch.randn(16, 5, generator=g, dtype=torch.float64)
        ref = cluster.KMeans(n_clusters=4, init="k-means++", n_init=10, random_state=trial).fit(x.numpy())
        ours = merge_features.kmeans(x, 4, seed=trial)
        ratios.append(sum(float(((x[c] - x[c].mean(0)) ** 2).sum()) for c in ours) / ref.inertia_)
    assert sum(ratios) / len(ratios) <= 1.02 and max(ratios) < 1.15  # measured: mean 1.003, max 1.083


# -- operators --------------------------------------------------------------------------------------------------
def test_svd_merge_full_rank_truncated_and_identical():
    g = torch.Generator().manual_seed(0)
    mats = torch.randn(3, 6, 5, generator=g, dtype=torch.float64)
    w = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    avg = (w.view(3, 1, 1) * mats).sum(0)
    assert torch.allclose(svd_merge(mats, w), avg, atol=1e-12)  # full rank = the weighted average
    # rank r: U_r Σ_r (Σ_i w_i V_iᵀ)_r by hand, with numpy's SVD of [W_1 W_2 W_3]
    import numpy as np

    U, S, Vt = np.linalg.svd(np.concatenate([m.numpy() for m in mats], axis=1), full_matrices=False)
    for r in (1, 2, 4):
        Vm = sum(float(w[i]) * Vt[:r, 5 * i:5 * (i + 1)] for i in range(3))
        assert torch.allclose(svd_merge(mats, w, rank=r), torch.from_numpy(U[:, :r] @ np.diag(S[:r]) @ Vm),
                              atol=1e-10)
    same = mats[:1].repeat(3, 1, 1)  # three identical experts merge into that expert, at any rank ≥ its own
    err = float((svd_merge(same, w, rank=5) - mats[0]).norm() / mats[0].norm())
    assert err < 1e-12
    gate_up = torch.randn(3, 8, 5, generator=g, dtype=torch.float64)  # fused: gate and up halves apart
    both = merge_rows(gate_up, w.tolist(), "svd", 2, "gate_up")
    assert torch.allclose(both, torch.cat([svd_merge(gate_up[:, :4], w, 2), svd_merge(gate_up[:, 4:], w, 2)]))


def test_sub_moe_on_a_model_records_rank_and_refuses_it_elsewhere(ckpt, capsys):
    model = make("qwen3_moe")
    report = mumoe.prune(model, "sub-moe", 0.25, calib=ids(batch=4, length=12), rank=3)
    assert report.layers[0]["operator"] == "joint-SVD subspace merge (rank 3)"
    assert all(len(e["groups"]) == 6 for e in report.layers)
    full = make("qwen3_moe")
    mumoe.prune(full, "sub-moe", 0.25, calib=ids(batch=4, length=12))
    avg = make("qwen3_moe")  # full rank = hc-smoe's operator on sub-moe's groups
    from mumoe.apply.merge import merge_experts

    ref = mumoe.prune(make("qwen3_moe"), "sub-moe", 0.25, calib=ids(batch=4, length=12))
    merge_experts(avg, {e["layer"]: e["groups"] for e in ref.layers}, {e["layer"]: e["weights"] for e in ref.layers})
    for a, b in zip(moe_adapter_for(full).moe_layers(), moe_adapter_for(avg).moe_layers()):
        assert torch.allclose(a.experts.gate_up_proj, b.experts.gate_up_proj, atol=1e-5)
    capsys.readouterr()
    assert main(["prune", str(ckpt / "m"), "--method", "hc-smoe", "--ratio", "0.25", "--rank", "2", "--calib",
                 str(ckpt / "c.txt"), "--out", str(ckpt / "o")]) == 2
    assert "--rank sets the rank of a subspace merge" in capsys.readouterr().err


# -- the layer-sequential merge ---------------------------------------------------------------------------------
@pytest.mark.parametrize("arch,method,ratio,opts,form", [
    ("qwen3_moe", "hc-smoe", 0.25, {}, "hf"), ("mixtral", "sub-moe", 0.25, {"rank": 2}, "hf"),
    ("qwen2_moe", "m-smoe", 0.5, {}, "hf"),  # here the threshold gives every layer 4
    ("qwen3_moe", "m-smoe", 0.5, {}, "mumoe"), ("mixtral", "m-smoe", 0.25, {}, "mumoe"),
    ("gpt_oss", "sub-moe", 0.25, {"rank": 2}, "hf"), ("gpt_oss", "m-smoe", 0.5, {}, "mumoe"),  # experts' biases
    ("nemotron_h", "hc-smoe", 0.25, {}, "hf"), ("nemotron_h", "sub-moe", 0.25, {"rank": 2}, "hf"),  # no gate
    ("nemotron_h", "m-smoe", 0.5, {}, "mumoe"), ("jamba", "hc-smoe", 0.25, {}, "hf")])  # own block names
def test_layerwise_merge_equals_in_memory(arch, method, ratio, opts, form, tmp_path):
    """Statistics layer by layer, the plan at the end, a streamed export (fused or per-expert source keys): the
    same groups and the same tensors as merging the loaded model; M-SMoE's per-layer counts differ (mumoe's own
    form), mumoe.load gives the in-memory model's logits."""
    from mumoe.apply.export import save_pruned
    from mumoe.drivers.layerwise import prune_layerwise
    from mumoe.loading import load

    src = tmp_path / "src"
    make(arch, **({"n_group": 1, "topk_group": 1} if arch == "nemotron_h" else {})).save_pretrained(src)  # (merges
    recipe = mumoe.Recipe.build(method, ratio, calib="tensor", nsamples=6, seqlen=16, **opts)  # refuse groups)
    wins = ids(batch=6, length=16)
    report = prune_layerwise(src, recipe, tmp_path / "streamed", (wins, None, {}), verbose=False)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    ref = mumoe.prune(model, recipe, calib=wins)
    save_pruned(model, tmp_path / "memory", ref)
    assert report.layers == ref.layers and report.form == ref.form
    assert report.form == form
    a, b = load(tmp_path / "streamed"), load(tmp_path / "memory")
    x = ids(batch=2, length=12, seed=3)
    with torch.no_grad():
        assert torch.allclose(a(x).logits, b(x).logits, atol=1e-5)
        assert torch.allclose(a(x).logits, model(x).logits, atol=1e-5)
    if form == "mumoe":  # transformers alone, with the modelling file the export ships
        remote = AutoModelForCausalLM.from_pretrained(tmp_path / "streamed", trust_remote_code=True,
                                                      dtype=torch.float32).eval()
        with torch.no_grad():
            assert torch.allclose(remote(x).logits, b(x).logits, atol=1e-5)


# -- the bound router ---------------------------------------------------------------------------------------------
def test_bound_router_merge_of_identical_experts_leaves_the_logits_unchanged():
    """Bound: every router row kept, each pick mapped to its merged expert. Merging two experts with the same
    weights (router rows different) changes nothing the model computes: logits equal the unmerged model's, also
    where a token picks both members (their gates add). A centroid router of the same merge does change them."""
    from mumoe.apply.merge import merge_experts

    model = make("qwen3_moe")
    for layer in moe_adapter_for(model).moe_layers():
        with torch.no_grad():
            layer.experts.gate_up_proj[5].copy_(layer.experts.gate_up_proj[2])
            layer.experts.down_proj[5].copy_(layer.experts.down_proj[2])
    x = ids(batch=3, length=16)
    with torch.no_grad():
        before = model(x).logits
    groups = [[0], [1], [2, 5], [3], [4], [6], [7]]
    weights = [[1.0], [1.0], [0.3, 0.7], [1.0], [1.0], [1.0], [1.0]]
    layers = [layer.index for layer in moe_adapter_for(model).moe_layers()]
    bound, centroid = make("qwen3_moe"), None
    bound.load_state_dict(model.state_dict())
    merge_experts(bound, dict.fromkeys(layers, groups), dict.fromkeys(layers, weights), router="bound")
    layer = moe_adapter_for(bound).moe_layers()[0]
    assert layer.experts.gate_up_proj.shape[0] == 7 and layer.router.weight.shape[0] == 8
    assert layer.experts.mumoe_expert_map == (0, 1, 2, 3, 4, 2, 5, 6)
    with torch.no_grad():
        assert torch.allclose(bound(x).logits, before, atol=1e-6)
    centroid = make("qwen3_moe")
    centroid.load_state_dict(model.state_dict())
    merge_experts(centroid, dict.fromkeys(layers, groups), dict.fromkeys(layers, weights))
    with torch.no_grad():
        assert not torch.allclose(centroid(x).logits, before, atol=1e-4)


@pytest.mark.parametrize("arch,method", [("qwen3_moe", "hc-smoe"), ("mixtral", "m-smoe")])
def test_bound_router_exports_reload_to_the_same_logits(arch, method, tmp_path):
    """In memory, streamed (layer-sequential), mumoe.load and transformers with trust_remote_code: one model."""
    from mumoe.apply.export import save_pruned
    from mumoe.drivers.layerwise import prune_layerwise
    from mumoe.loading import load

    src = tmp_path / "src"
    make(arch).save_pretrained(src)
    recipe = mumoe.Recipe.build(method, 0.25, calib="tensor", nsamples=6, seqlen=16, router="bound")
    wins = ids(batch=6, length=16)
    report = prune_layerwise(src, recipe, tmp_path / "streamed", (wins, None, {}), verbose=False)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    ref = mumoe.prune(model, recipe, calib=wins)
    save_pruned(model, tmp_path / "memory", ref)
    assert report.layers == ref.layers and report.form == ref.form == "mumoe"
    assert all(e["router"] == "bound" for e in report.layers)
    cfg = json.loads((tmp_path / "streamed" / "config.json").read_text())
    maps = [e["expert_map"] for e in cfg["mumoe_layers"]]
    assert all(len(m) == 8 and max(m) + 1 == e["experts"] for m, e in zip(maps, cfg["mumoe_layers"]))
    x = ids(batch=2, length=12, seed=3)
    with torch.no_grad():
        want = model(x).logits
        for folder in ("streamed", "memory"):
            assert torch.allclose(load(tmp_path / folder)(x).logits, want, atol=1e-5)
        remote = AutoModelForCausalLM.from_pretrained(tmp_path / "streamed", trust_remote_code=True,
                                                      dtype=torch.float32).eval()
        assert torch.allclose(remote(x).logits, want, atol=1e-5)
    state = load_file(tmp_path / "streamed" / "model.safetensors")
    gate = next(k for k in state if k.endswith("layers.0.mlp.gate.weight") or
                k.endswith("layers.0.block_sparse_moe.gate.weight"))
    assert state[gate].shape[0] == 8  # every router row kept
