"""CAMERA-P (atom grain, forward only): its statistics against a per-token loop, its score against a hand-worked
example, the progressive order against a slow loop that re-scores the pruned model layer by layer, and the
layer-sequential export against the in-memory one."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import ids, make
from mumoe import MumoeError, api
from mumoe.criteria import camera, score_methods
from mumoe.models import moe_adapter_for
from mumoe.observe.collectors import AtomStats
from mumoe.observe.runner import run
from mumoe.recipe import Recipe
from mumoe.select.atoms import keep_global_atoms
from test_layerwise import saved, streamed_and_in_memory, tensors, windows
from test_merge import capture_expert_inputs, per_token_inputs_and_logits


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral", "qwen2_moe"])
def test_gated_activation_sums_and_maxima_equal_a_per_token_loop(arch):
    """a = g·h with g the token's combine weight (softmax over all E, top-k, renormalized where the config says
    so): Σ_t a² and max_t a² per (expert, neuron), from captured expert inputs and router logits."""
    model = make(arch)
    layers = moe_adapter_for(model).moe_layers()
    x = ids(batch=3, length=10)
    col = AtomStats(layers, backward=False, gated=True)
    run(model, x, [col], batch_size=2)
    norm = getattr(model.config, "norm_topk_prob", arch == "mixtral")
    captured = per_token_inputs_and_logits(model, layers, x)
    for layer, st in zip(layers, col.result()):
        hidden, lg = captured[layer.index]  # [30, H], [30, E]
        E, I = layer.num_experts, layer.intermediate_size
        a2, amax = torch.zeros(E, I, dtype=torch.float64), torch.zeros(E, I, dtype=torch.float64)
        with torch.no_grad():
            for t in range(30):
                p = torch.softmax(lg[t].double(), -1)
                top = p.topk(layer.top_k)
                w = top.values / top.values.sum() if norm else top.values
                for e, g in zip(top.indices.tolist(), w.tolist()):
                    a = (g * layer.expert_hidden(e, hidden[t:t + 1])[0].double()) ** 2  # [I]
                    a2[e] += a
                    amax[e] = torch.maximum(amax[e], a)
        assert torch.allclose(st.a2, a2, rtol=1e-5, atol=1e-9), arch
        assert torch.allclose(st.amax, amax, rtol=1e-5, atol=1e-9), arch


def test_camera_score_hand_worked():
    # one expert, two neurons: energy 2 and 3; Σa² 4 and 1; max a² 1 and 1. λ = 0.9: 2·(0.4 + 0.9) = 2.6,
    # 3·(0.1 + 0.9) = 3.0; λ = 0: 8 and 3 (the order flips); λ = 1: 2 and 3
    parts = {"energy": torch.tensor([[2.0, 3.0]]), "l2": torch.tensor([[4.0, 1.0]]),
             "linf": torch.tensor([[1.0, 1.0]])}
    assert torch.allclose(camera.camera_score(parts), torch.tensor([[2.6, 3.0]]))
    assert torch.allclose(camera.camera_score(parts, 0.0), torch.tensor([[8.0, 3.0]]))
    assert torch.allclose(camera.camera_score(parts, 1.0), torch.tensor([[2.0, 3.0]]))


def test_progressive_equals_a_slow_loop_and_differs_from_one_shot():
    """The authors' order: score layer ℓ on the model whose layers < ℓ are pruned, remove the lowest
    round(ratio·E·I) of the layer's atoms (zeroed), go on. The reference recomputes the score from the captured
    statistics by hand (energy from the weights, λ = 0.9)."""
    model = make("qwen3_moe")
    x = ids(batch=4, length=12)
    recipe = Recipe.build("camera-p", 0.5, calib="tensor", nsamples=4, seqlen=12)
    assert (recipe.atom.form, recipe.atom.scope, recipe.atom.order, recipe.atom.lambda_max) == (
        "global", "layer", "progressive", 0.9)
    ref = make("qwen3_moe")
    layers = moe_adapter_for(ref).moe_layers()
    kept = {}
    for layer in layers:
        col = AtomStats([layer], backward=False, gated=True)
        run(ref, x, [col], batch_size=8)
        st = col.result()[0]
        energy = layer.experts.down_proj.detach().double().pow(2).sum(1)  # [E, I]
        s = energy * (0.1 * st.a2 + 0.9 * st.amax)
        mask = keep_global_atoms([s], 0.5)[0]
        assert int(mask.sum()) == s.numel() // 2
        kept[layer.index] = mask
        with torch.no_grad():
            I = layer.intermediate_size
            layer.experts.gate_up_proj[:, :I] *= mask[:, :, None]
            layer.experts.gate_up_proj[:, I:] *= mask[:, :, None]
            layer.experts.down_proj *= mask[:, None, :]
    report = api.prune(model, recipe, calib=x)
    for e in report.layers:
        got = torch.zeros_like(kept[e["layer"]])
        for x_ in e["experts"]:
            got[x_["expert"], x_["kept"]] = True
        assert torch.equal(got, kept[e["layer"]]), e["layer"]
    with torch.no_grad():
        assert torch.equal(model(x).logits, ref(x).logits)
    one = make("qwen3_moe")
    r1 = api.prune(one, Recipe.build("camera-p", 0.5, calib="tensor", nsamples=4, seqlen=12, order="one-shot"),
                   calib=x)
    assert r1.layers[0] == report.layers[0]  # layer 0 sees the same inputs either way
    assert r1.layers[1] != report.layers[1]  # layer 1 is scored on the pruned layer 0 in the progressive order


def scaled_shared(model):
    """The shared experts' down projections × 0.05: on a tiny random model their atoms would otherwise all
    outscore the routed ones (every token passes them), and none would be removed."""
    with torch.no_grad():
        for layer in moe_adapter_for(model).moe_layers():
            layer.shared.down_proj.weight *= 0.05
    return model


@pytest.mark.parametrize("arch", ["qwen2_moe", "deepseek_v3"])
def test_shared_expert_statistics_equal_a_per_token_loop(arch):
    """The shared expert's atoms on every token: a_s = g_s·h_s with g_s the sigmoid of Qwen2-MoE's shared gate
    (DeepSeek: 1), h_s its down-projection input, computed from the shared module's own linears; the helper's h_s
    through down_proj gives the shared module's output."""
    model = make(arch)
    layers = moe_adapter_for(model).moe_layers()
    x = ids(batch=3, length=10)
    col = AtomStats(layers, backward=False, gated=True)
    run(model, x, [col], batch_size=2)
    inputs, hooks = capture_expert_inputs(layers)
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    for layer, st in zip(layers, col.result()):
        hidden = torch.cat([t.reshape(-1, t.shape[-1]) for t in inputs[layer.index]]).double()  # [30, H]
        sh = layer.shared.double()
        with torch.no_grad():
            h = sh.act_fn(sh.gate_proj(hidden)) * sh.up_proj(hidden)  # [30, I_s]
            g = torch.sigmoid(layer.shared_gate.double()(hidden)) if arch == "qwen2_moe" else torch.ones(30, 1)
            assert torch.allclose(sh.down_proj(layer.shared_hidden(hidden)), sh(hidden), atol=1e-12)
        sh.float()
        a2 = (g * h) ** 2
        assert st.shared_a2.shape == (h.shape[1],)
        assert torch.allclose(st.shared_a2, a2.sum(0), rtol=1e-5, atol=1e-9), arch
        assert torch.allclose(st.shared_amax, a2.max(0).values, rtol=1e-5, atol=1e-9), arch


def test_shared_atoms_ranked_with_the_routed_ones():
    """One-shot, qwen2_moe at 40% (shared experts scaled down so that some of their atoms go): per layer the E·I
    routed and I_s shared scores pooled, the lowest
    round(0.4·(E·I + I_s)) removed — recomputed here from the statistics by hand; the removed shared neurons are
    zero in the model, the kept ones untouched."""
    model = make("qwen2_moe")
    x = ids(batch=4, length=12)
    model, ref = scaled_shared(model), scaled_shared(make("qwen2_moe"))  # ref: the same weights, left unpruned
    layers = moe_adapter_for(ref).moe_layers()
    col = AtomStats(layers, backward=False, gated=True)
    run(ref, x, [col], batch_size=8)
    before = {layer.index: layer.shared.gate_proj.weight.detach().clone() for layer in layers}
    report = api.prune(model, Recipe.build("camera-p", 0.4, calib="tensor", order="one-shot"), calib=x)
    pruned = {layer.index: layer for layer in moe_adapter_for(model).moe_layers()}
    for layer, st, e in zip(layers, col.result(), report.layers):
        routed = layer.experts.down_proj.detach().double().pow(2).sum(1) * (0.1 * st.a2 + 0.9 * st.amax)
        shared = layer.shared.down_proj.weight.detach().double().pow(2).sum(0) * (0.1 * st.shared_a2 +
                                                                                 0.9 * st.shared_amax)
        pooled = torch.cat([routed.flatten(), shared])
        n_drop = round(0.4 * pooled.numel())
        drop = set(torch.argsort(pooled)[:n_drop].tolist())
        E, I = routed.shape
        kept_shared = [k for k in range(shared.numel()) if E * I + k not in drop]
        assert e["shared"] == {"intermediate_size": shared.numel(), "kept": kept_shared}
        for ex in e["experts"]:
            assert ex["kept"] == [k for k in range(I) if ex["expert"] * I + k not in drop]
        w = pruned[layer.index].shared.gate_proj.weight.detach()
        gone = [k for k in range(shared.numel()) if k not in kept_shared]
        assert gone and (w[gone] == 0).all() and torch.equal(w[kept_shared], before[layer.index][kept_shared])


@pytest.mark.parametrize("arch", ["qwen2_moe", "deepseek_v3"])
def test_shared_atom_exports_reload_to_the_same_logits(arch, tmp_path):
    """Global form with shared-expert atoms: the streamed export equals the in-memory one tensor for tensor, the
    shared linears stored at their kept width; mumoe.load and transformers with trust_remote_code give the
    pruned model's logits."""
    from mumoe.loading import load

    src = tmp_path / "src"
    scaled_shared(make(arch)).save_pretrained(src)
    recipe = Recipe.build("camera-p", 0.3, calib="tensor", nsamples=6, seqlen=16)
    wins = windows()
    report, ref, model = streamed_and_in_memory(src, recipe, tmp_path, wins)
    assert report.layers == ref.layers and all("shared" in e for e in ref.layers)
    a, b = tensors(tmp_path / "streamed"), tensors(tmp_path / "memory")
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    name = "shared_expert" if arch == "qwen2_moe" else "shared_experts"
    for e in ref.layers:
        down = a[f"model.layers.{e['layer']}.mlp.{name}.down_proj.weight"]
        assert down.shape[1] == len(e["shared"]["kept"]) < e["shared"]["intermediate_size"]
    x = windows(2, 12, seed=3)
    remote = AutoModelForCausalLM.from_pretrained(tmp_path / "streamed", trust_remote_code=True,
                                                  dtype=torch.float32).eval()
    with torch.no_grad():
        want = model(x).logits
        assert torch.equal(load(tmp_path / "streamed")(x).logits, want)
        assert torch.allclose(remote(x).logits, want, atol=1e-5)


@pytest.mark.parametrize("opts", [{}, {"form": "uniform", "width_multiple": 4},
                                  {"order": "one-shot", "lambda_max": 0.5}])
def test_layer_sequential_export_equals_in_memory(opts, tmp_path):
    src = tmp_path / "src"
    saved("qwen2_moe", src)
    recipe = Recipe.build("camera-p", 0.25, calib="tensor", nsamples=6, seqlen=16, **opts)
    wins = windows()
    report, ref, model = streamed_and_in_memory(src, recipe, tmp_path, wins, {"source": "tensor"})
    assert report.layers == ref.layers
    a, b = tensors(tmp_path / "streamed"), tensors(tmp_path / "memory")
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_scores_at_ratio_zero_and_refusals():
    model = make("mixtral")
    x = ids()
    before = model(x).logits
    api.prune(model, Recipe.build("camera-p", 0.0, calib="tensor", nsamples=2, seqlen=12), calib=x)
    with torch.no_grad():
        assert torch.equal(model(x).logits, before)
    parts = score_methods(model, ["camera-p"], x)["camera-p"]
    assert set(parts[0]) == {"energy", "l2", "linf"} and all(v.dtype == torch.float64 for v in parts[0].values())
    for opts, msg in [({"lambda_max": 1.5}, "in \\[0, 1\\]"), ({"scope": "global"}, "--scope layer"),
                      ({"order": "sideways"}, "unknown scoring order")]:
        with pytest.raises(MumoeError, match=msg):
            Recipe.build("camera-p", 0.25, **opts)
    with pytest.raises(MumoeError, match="CAMERA-P's"):
        Recipe.build("heapr", 0.25, lambda_max=0.5)
    with pytest.raises(MumoeError, match="gradients"):
        Recipe.build("heapr", 0.25, order="progressive")
    with pytest.raises(MumoeError, match="weights alone"):
        Recipe.build("atom-magnitude", 0.25, order="progressive")
