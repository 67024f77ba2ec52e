"""The merge grain (HC-SMoE, its first method): features against a slow loop, the clustering against SciPy's
average linkage, merged tensors against the weighted average computed by hand, and the compact export against
the in-memory model."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import mumoe
from conftest import char_tokenizer, ids, make
from mumoe import MumoeError
from mumoe.apply.merge import merge_layer
from mumoe.cli import main
from mumoe.models import moe_adapter_for
from mumoe.observe.collectors import ExpertMeans
from mumoe.observe.runner import run
from mumoe.criteria.merge import average_linkage
from mumoe.testtime.experts import capture_router_logits


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
    col = ExpertMeans(layers, chunk=7)  # chunks that do not divide the token count
    run(model, x, [col], batch_size=2)
    inputs = {}
    hooks = [layer.experts.register_forward_pre_hook(
        lambda m, a, kw, j=layer.index: inputs.setdefault(j, []).append(a[0] if a else kw["hidden_states"]),
        with_kwargs=True) for layer in layers]
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
    # merge then prune weights: a two-stage recipe; the layer-sequential driver is refused in one line
    assert main(["prune", str(ckpt / "m"), "--method", "hc-smoe", "--ratio", "0.25", "--then", "wanda:0.5", *calib,
                 "--out", str(ckpt / "two")]) == 0
    two = json.loads((ckpt / "two" / "pruning.json").read_text())
    assert [s["grain"] for s in two["stages"]] == ["merge", "weight"]
    capsys.readouterr()
    assert main(["prune", str(ckpt / "m"), "--method", "hc-smoe", "--ratio", "0.25", *calib, "--layerwise", "on",
                 "--out", str(ckpt / "lw")]) == 2
    assert "loaded model only" in capsys.readouterr().err


def test_merge_refused_before_loading_where_it_cannot_run(ckpt, capsys):
    """A group-limited router (DeepSeek-V3 n_group): one line, from the config, before any weight is read."""
    assert main(["prune", "tiny:deepseek_v3", "--method", "hc-smoe", "--ratio", "0.25", "--calib",
                 str(ckpt / "c.txt"), "--out", str(ckpt / "o")]) == 2
    err = capsys.readouterr().err
    assert err == "mumoe: error: merging is not available for group-limited routers (DeepSeek-V3 n_group) yet\n"
    assert not (ckpt / "o").exists()
