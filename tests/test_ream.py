"""REAM (the merge grain's fourth method): its statistics against a per-token loop, its pseudo-grouping against a
hand-worked example, its neuron alignment against a permuted copy of an expert (recovered exactly), and the
layer-sequential merge (progressive order, streamed export) against the loaded model's."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import mumoe
from conftest import ids, make
from mumoe import MumoeError
from mumoe.apply.merge import merge_layer
from mumoe.criteria import ream
from mumoe.criteria import merge as merge_features
from mumoe.models import moe_adapter_for
from mumoe.observe.collectors import MergeStats
from mumoe.observe.runner import run
from test_merge import per_token_inputs_and_logits

pytest.importorskip("scipy.optimize")


def test_ream_statistics_equal_a_per_token_loop():
    """Gated output sums (every expert on every token, scaled by its softmax probability over all E), the
    saliency sums over routed tokens (p²·‖f‖) and the activation sample (the first N tokens, the same for every
    expert) equal a loop over captured inputs and logits."""
    model = make("qwen3_moe")
    layers = moe_adapter_for(model).moe_layers()
    x = ids(batch=3, length=10)
    col = MergeStats(layers, outputs=False, ream=True, chunk=7, act_tokens=13)
    run(model, x, [col], batch_size=2)
    captured = per_token_inputs_and_logits(model, layers, x)
    for layer, st in zip(layers, col.result()):
        hidden, lg = captured[layer.index]  # [30, H], [30, E]
        E = layer.num_experts
        gated = torch.zeros(E, hidden.shape[1], dtype=torch.float64)
        sal = torch.zeros(E, dtype=torch.float64)
        with torch.no_grad():
            for t in range(30):
                p = torch.softmax(lg[t].double(), -1)
                top = set(lg[t].topk(layer.top_k).indices.tolist())
                for e in range(E):
                    f = layer.expert_forward(e, hidden[t:t + 1])[0].double()
                    gated[e] += p[e] * f
                    if e in top:
                        sal[e] += p[e] ** 2 * f.norm()
            acts = torch.stack([layer.expert_hidden(e, hidden[:13]) for e in range(E)], 1)  # [13, E, I]
        assert torch.allclose(st.gated, gated, rtol=1e-5, atol=1e-7)
        assert torch.allclose(st.sal, sal, rtol=1e-5, atol=1e-8)
        assert st.activations().shape == acts.shape and st.activations().dtype == acts.dtype
        assert torch.allclose(st.activations(), acts, atol=1e-6)


def test_ream_pseudo_grouping_hand_worked():
    """Six experts, M = 2, C = 3. Saliency ranks 4 then 1 as centroids; 4 takes its two nearest unassigned
    (0 at 0.1, 5 at 0.2; 1 is nearer at 0.05 but a centroid), then 1 takes 2 and 3 (the only ones left)."""
    sal = torch.tensor([0.3, 0.8, 0.1, 0.2, 0.9, 0.4])
    d = torch.full((6, 6), 0.9)
    d.fill_diagonal_(0.0)
    for (i, j), v in {(4, 1): 0.05, (4, 0): 0.1, (4, 5): 0.2, (4, 3): 0.3, (1, 0): 0.01, (1, 2): 0.5}.items():
        d[i, j] = d[j, i] = v
    assert ream.groups(sal, d, 2, C=3) == [[1, 2, 3], [4, 0, 5]]
    assert ream.groups(sal, d, 2, C=16) == [[1], [4, 0, 2, 3, 5]]  # the first centroid takes everyone left
    with pytest.raises(MumoeError, match="at least 3 merged experts"):
        ream.groups(sal, d, 2, C=2)
    # the similarity: identical mean outputs and identical logit columns -> 1; orthogonal outputs -> ≤ 3/4
    o = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    logits = torch.tensor([[1.0, 1.0, -1.0], [2.0, 2.0, 0.5]], dtype=torch.float64)  # [T, E]
    s = ream.similarity(o, logits.T @ logits)
    assert abs(float(s[0, 1]) - 1) < 1e-9 and float(s[0, 2]) <= 0.75 + 1e-9 and torch.allclose(s, s.T)


def _permuted_copy(layer, src: int, dst: int, perm: torch.Tensor) -> None:
    """Expert dst := expert src with its neurons reordered (neuron r of dst is neuron perm[r] of src): the same
    function."""
    I = layer.intermediate_size
    with torch.no_grad():
        gu = layer.experts.gate_up_proj[src]
        layer.experts.gate_up_proj[dst].copy_(torch.cat([gu[:I][perm], gu[I:][perm]]))
        layer.experts.down_proj[dst].copy_(layer.experts.down_proj[src][:, perm])


def test_alignment_recovers_a_permuted_copy_and_merges_into_that_expert():
    """Expert 5 is expert 2 with its neurons shuffled: the Hungarian alignment (activations + weights) undoes the
    shuffle exactly, so their saliency-weighted merge IS expert 2 — where a plain average would scramble it —
    and the merged layer computes what expert 2 did."""
    model = make("qwen3_moe")
    layer = moe_adapter_for(model).moe_layers()[0]
    I = layer.intermediate_size
    shuffle = torch.randperm(I, generator=torch.Generator().manual_seed(4))
    _permuted_copy(layer, 2, 5, shuffle)
    col = MergeStats([layer], outputs=False, ream=True)
    run(model, ids(batch=4, length=12), [col], batch_size=2)
    feats = merge_features.ream(col.result()[0])
    groups = [[2, 5], [0], [1], [3], [4], [6], [7]]
    perm = merge_features.align_ream(layer, feats, groups)
    assert torch.equal(perm[5][shuffle], torch.arange(I))  # member neuron perm[r] ↔ centroid neuron r
    assert torch.equal(perm[2], torch.arange(I))
    want_gu, want_dn = layer.experts.gate_up_proj[2].detach().clone(), layer.experts.down_proj[2].detach().clone()
    order = sorted(groups, key=lambda g: g[0])
    merge_layer(layer, order, [[0.3, 0.7] if len(g) == 2 else [1.0] for g in order], "aligned", perm=perm)
    m = order.index([2, 5])
    assert torch.allclose(layer.experts.gate_up_proj[m], want_gu, atol=1e-6)
    assert torch.allclose(layer.experts.down_proj[m], want_dn, atol=1e-6)
    plain = make("qwen3_moe")
    layer2 = moe_adapter_for(plain).moe_layers()[0]
    _permuted_copy(layer2, 2, 5, shuffle)
    merge_layer(layer2, order, [[0.3, 0.7] if len(g) == 2 else [1.0] for g in order])
    assert not torch.allclose(layer2.experts.gate_up_proj[m], want_gu, atol=1e-2)


def test_ream_router_row_is_the_centroids_and_weights_are_saliency():
    model = make("qwen3_moe")
    layers = moe_adapter_for(model).moe_layers()
    rows = {layer.index: layer.router.weight.detach().clone() for layer in layers}
    report = mumoe.prune(model, "ream", 0.5, calib=ids(batch=4, length=12))
    assert report.to_dict()["recipe"]["merge"]["order"] == "progressive"
    for layer, e in zip(moe_adapter_for(model).moe_layers(), report.layers):
        assert len(e["groups"]) == 4 and e["operator"].startswith("neuron-aligned")
        assert sorted(i for g in e["groups"] for i in g) == list(range(8))
        assert [g[0] for g in e["groups"]] == sorted(g[0] for g in e["groups"])  # ordered by centroid
        for m, g in enumerate(e["groups"]):
            assert torch.equal(layer.router.weight[m], rows[layer.index][g[0]])
            assert abs(sum(e["weights"][m]) - 1) < 1e-9
    with pytest.raises(MumoeError, match="one global threshold"):
        mumoe.Recipe.build("m-smoe", 0.5, calib="tensor", order="progressive")


@pytest.mark.parametrize("arch,opts", [("qwen3_moe", {}), ("mixtral", {"order": "one-shot"}),
                                       ("gpt_oss", {}), ("qwen3_moe", {"router": "bound"})])
def test_layerwise_ream_equals_in_memory(arch, opts, tmp_path):
    """The sweep makes each layer's plan while it is resident (the alignment reads its weights) and, in the
    progressive order, merges it before its outputs feed the next layer; the streamed export (fused, per-expert
    and GPT-OSS's biased layouts) equals merging the loaded model, and reloads to its logits."""
    from mumoe.apply.export import save_pruned
    from mumoe.drivers.layerwise import prune_layerwise
    from mumoe.loading import load

    src = tmp_path / "src"
    make(arch).save_pretrained(src)
    recipe = mumoe.Recipe.build("ream", 0.25, calib="tensor", nsamples=6, seqlen=16, **opts)
    wins = ids(batch=6, length=16)
    report = prune_layerwise(src, recipe, tmp_path / "streamed", (wins, None, {}), verbose=False)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    ref = mumoe.prune(model, recipe, calib=wins)
    save_pruned(model, tmp_path / "memory", ref)
    assert [e["groups"] for e in report.layers] == [e["groups"] for e in ref.layers]
    for a, b in zip(report.layers, ref.layers):
        assert all(abs(x - y) < 1e-6 for u, v in zip(a["weights"], b["weights"]) for x, y in zip(u, v))
    x = ids(batch=2, length=12, seed=3)
    with torch.no_grad():
        want = model(x).logits
        assert torch.allclose(load(tmp_path / "streamed")(x).logits, want, atol=1e-5)
        assert torch.allclose(load(tmp_path / "memory")(x).logits, want, atol=1e-5)
    if report.form == "hf":
        cfg = json.loads((tmp_path / "streamed" / "config.json").read_text())
        assert cfg.get("num_experts", cfg.get("num_local_experts")) == 6
        plain = AutoModelForCausalLM.from_pretrained(tmp_path / "streamed", dtype=torch.float32).eval()
        with torch.no_grad():
            assert torch.allclose(plain(x).logits, want, atol=1e-5)


def test_ream_without_scipy_is_one_clear_line(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "scipy.optimize", None)  # import scipy.optimize now raises ImportError
    with pytest.raises(MumoeError, match=r"pip install 'mumoe\[merge\]'"):
        mumoe.Recipe.build("ream", 0.25, calib="tensor")


def test_progressive_plan_counts_come_from_the_source_experts():
    """Progressive: every layer is merged before the plan is assembled; the plan's counts are the source's (8 ->
    2 at 75%), not re-derived from the merged layers (2 -> 0, below top_k)."""
    report = mumoe.prune(make("qwen3_moe"), "ream", 0.75, calib=ids(batch=4, length=12))
    assert [len(e["groups"]) for e in report.layers] == [2, 2]
    assert all(e["num_experts"] == 8 for e in report.layers)
