"""STUN's expert stage as pure functions (criteria/stun.py): the greedy clustering with its reject rule on a
hand-worked matrix, the threshold search's trajectory, the representatives against a brute-force distance to the
mean, the co-selection counts and the weight Gram against loops. The equality with the authors' script is
`benchmarks/stun_authors.py` (BENCHMARKS.md)."""

import pytest
import torch

from conftest import make
from mumoe import MumoeError
from mumoe.criteria import stun
from mumoe.models import moe_adapter_for


def sym(rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_greedy_clusters_reject_a_mixed_join():
    # 0-1 at 0.1 join; 2-3 at 0.2 join; 1-2 at 0.3 is the closest open pair, but 0 is 0.9 from 2: rejected
    # (τ = 0.5); 0-3 at 0.95 is over τ: the loop ends with {0, 1}, {2, 3}
    d = sym([[0, .1, .9, .95], [.1, 0, .3, .8], [.9, .3, 0, .2], [.95, .8, .2, 0]])
    assert stun.cluster(d, 0.5, max_removed=3) == [(0, 1), (2, 3)]
    assert stun.cluster(d, 0.15, max_removed=3) == [(0, 1), (2,), (3,)]
    assert stun.cluster(d, 0.5, max_removed=1) == [(0, 1), (2,), (3,)]  # at least E − 1 clusters left
    assert stun.cluster(d, 2.0, max_removed=3) == [(0, 1, 2, 3)]  # every cross distance under τ


def test_threshold_search_follows_the_doubling_then_halving_steps():
    """Two layers of the matrix above, target 6 of 8: from τ = 0.5 (4 kept) the step doubles while the total
    stays under the target and halves once it has turned, as a loop written here does."""
    d = sym([[0, .1, .9, .95], [.1, 0, .3, .8], [.9, .3, 0, .2], [.95, .8, .2, 0]])
    tau, clusters = stun.search([d, d], 6, [3, 3])
    assert sum(len(c) for c in clusters) == 6 and clusters == [[(0, 1), (2,), (3,)]] * 2
    # the same loop by hand
    t, step, last, turned = 0.5, 0.1, 0, False
    while True:
        n = 2 * len(stun.cluster(d, t, 3))
        if n == 6:
            break
        direction = -1 if n < 6 else 1
        turned = turned or last * direction < 0
        step = step / 2 if turned else step * 2
        t, last = t + step * direction, direction
    assert tau == t
    # totals move in steps of 2 here: 7 is never hit (their script exits); the bisection gives the smallest total
    # above it, 8 (fewer removed than asked, never more)
    tau7, clusters7 = stun.search([d, d], 7, [3, 3])
    assert sum(len(c) for c in clusters7) == 8


def test_representatives_equal_the_distance_to_the_mean():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 40, generator=g, dtype=torch.float64)
    gram = w @ w.T
    clusters = [(0, 2, 5), (1, 3, 4)]
    want = [c[int(torch.argmin((w[list(c)] - w[list(c)].mean(0)).norm(dim=1)))] for c in clusters]
    assert stun.representatives(clusters, gram) == want
    assert stun.representatives([(3, 4), (5,)], gram) == [3, 5]  # a pair ties: the lower id


def test_coselect_counts_and_gram_equal_loops():
    idx = torch.tensor([[0, 2], [2, 0], [1, 3], [0, 2], [3, 1]])
    c = torch.zeros(4, 4, dtype=torch.float64)
    for a, b in idx.tolist():
        c[a, b] += 1
        c[b, a] += 1
    assert torch.equal(stun.coselect_counts(idx, 4), c)
    d = stun.coselect_distance(c)
    assert torch.allclose(d, (-c / c.mean()).float())
    with pytest.raises(MumoeError, match="undefined"):
        stun.coselect_distance(torch.zeros(4, 4))
    layer = moe_adapter_for(make("qwen3_moe")).moe_layers()[0]
    flat = torch.stack([torch.cat([layer.experts.gate_up_proj[e].flatten(), layer.experts.down_proj[e].flatten()])
                        for e in range(layer.num_experts)]).double()
    assert torch.allclose(stun.expert_gram(layer, block_bytes=8 * 8 * 100), flat @ flat.T)  # blocks of 100 columns
    assert torch.allclose(stun.expert_gram(layer), flat @ flat.T)
    r = layer.router_weight.detach().float()
    assert torch.allclose(stun.router_distance(r), torch.cdist(r, r) / r.norm())


def test_stun_in_the_expert_grain_equals_the_functions_by_hand(tmp_path):
    """`--method stun` at 25% on a tiny Mixtral with 16 experts: the kept sets and clusters are the search and the
    representatives applied here by hand (at least top_k left per layer); the export (per-layer counts: mumoe's
    form) reloads to the pruned model's logits."""
    from mumoe import api
    from mumoe.apply.export import save_pruned
    from mumoe.loading import load
    from mumoe.models.tiny import tiny_model
    from mumoe.recipe import Recipe

    def build():
        return tiny_model("mixtral", seed=0, num_local_experts=16, num_hidden_layers=4).eval()

    ref = moe_adapter_for(build()).moe_layers()
    target = 64 - round(0.25 * 64)
    _, clusters = stun.search([stun.router_distance(layer.router_weight) for layer in ref], target,
                              [16 - layer.top_k for layer in ref])
    model = build()
    report = api.prune(model, Recipe.build("stun", 0.25))
    assert report.form == "mumoe" and sum(len(e["kept"]) for e in report.layers) == target
    for e, layer, c in zip(report.layers, ref, clusters):
        assert e["clusters"] == [list(x) for x in c]
        assert e["kept"] == sorted(stun.representatives(c, stun.expert_gram(layer)))
        assert e["scores"] == [float(i in e["kept"]) for i in range(16)]
    save_pruned(model, tmp_path / "out", report)
    x = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(load(tmp_path / "out")(x).logits, model(x).logits, atol=1e-6, rtol=0)
    r = Recipe.build("stun-coselect", 0.25, calib="tensor", order="progressive")
    assert (r.expert.order, r.expert.budget) == ("one-shot", "global")  # its rule spans all layers at once


def test_stun_coselect_layer_sequential_equals_in_memory(tmp_path):
    from mumoe.loading import load
    from mumoe.models.tiny import tiny_model
    from mumoe.recipe import Recipe
    from test_layerwise import streamed_and_in_memory, windows

    src = tmp_path / "src"
    tiny_model("mixtral", seed=0, num_local_experts=16, num_hidden_layers=4).save_pretrained(src)
    recipe = Recipe.build("stun-coselect", 0.25, calib="tensor", nsamples=6, seqlen=16)
    wins = windows()
    report, ref, model = streamed_and_in_memory(src, recipe, tmp_path, wins)
    assert report.layers == ref.layers and len({len(e["kept"]) for e in ref.layers}) > 1
    # mumoe's form: the streamed export keeps the source's per-expert keys, the in-memory one fused tensors
    x = windows(2, 12, seed=3)
    with torch.no_grad():
        want = model(x).logits
        for folder in ("streamed", "memory"):
            assert torch.allclose(load(tmp_path / folder)(x).logits, want, atol=1e-6, rtol=0), folder


def test_stun_from_the_checkpoint_files_equals_in_memory(tmp_path):
    """`mumoe prune CHECKPOINT --method stun` reads the checkpoint one decoder layer at a time (the files driver;
    the model is never loaded whole): the same clusters and kept experts as on the loaded model, and an export
    (mumoe's form, written tensor by tensor) that reloads to the same logits. A bf16 checkpoint: the features
    are computed in float32 on both paths."""
    from mumoe import api
    from mumoe.apply.export import save_pruned
    from mumoe.drivers.choose import prune_path
    from mumoe.loading import load
    from mumoe.models.tiny import tiny_model
    from mumoe.recipe import Recipe

    src = tmp_path / "src"
    tiny_model("mixtral", seed=0, num_local_experts=16, num_hidden_layers=4).to(torch.bfloat16).save_pretrained(src)
    recipe = Recipe.build("stun", 0.3)
    report, driver = prune_path(str(src), recipe, tmp_path / "files", verbose=False)
    model = load(src)  # float32 (the in-memory compute dtype of a bf16 checkpoint)
    ref = api.prune(model, recipe)
    assert driver == "files" and report.form == "mumoe" and report.layers == ref.layers
    save_pruned(model, tmp_path / "memory", ref)
    x = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(load(tmp_path / "files")(x).logits, load(tmp_path / "memory")(x).logits)


def test_aimer_global_budget_from_the_files_equals_in_memory(tmp_path):
    """The files driver now writes mumoe's form too: AIMER with the global budget (per-layer counts) from the
    checkpoint files gives the in-memory kept sets, removed count and reloaded logits."""
    from mumoe import api
    from mumoe.apply.export import save_pruned
    from mumoe.drivers.choose import prune_path
    from mumoe.loading import load
    from mumoe.models.tiny import tiny_model
    from mumoe.recipe import Recipe

    tiny_model("qwen3_moe", seed=0, num_hidden_layers=4).to(torch.bfloat16).save_pretrained(tmp_path / "src")
    recipe = Recipe.build("aimer", 0.3, budget="global")
    report, driver = prune_path(str(tmp_path / "src"), recipe, tmp_path / "files", verbose=False)
    model = load(tmp_path / "src")
    ref = api.prune(model, recipe)
    assert driver == "files" and report.form == "mumoe" and len({len(e["kept"]) for e in report.layers}) > 1
    assert report.layers == ref.layers and report.removed == ref.removed
    save_pruned(model, tmp_path / "memory", ref)
    x = torch.randint(3, 100, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(load(tmp_path / "files")(x).logits, load(tmp_path / "memory")(x).logits)
