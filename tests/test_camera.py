"""CAMERA-P (atom grain, forward only): its statistics against a per-token loop, its score against a hand-worked
example, the progressive order against a slow loop that re-scores the pruned model layer by layer, and the
layer-sequential export against the in-memory one."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import ids, make
from mumoe import MumoeError, api
from mumoe.apply.export import save_pruned
from mumoe.criteria import camera, score_methods
from mumoe.drivers.layerwise import prune_layerwise
from mumoe.models import moe_adapter_for
from mumoe.observe.collectors import AtomStats
from mumoe.observe.runner import run
from mumoe.recipe import Recipe
from mumoe.select.atoms import keep_global_atoms
from mumoe.testtime.experts import capture_router_logits
from test_layerwise import saved, tensors, windows
from test_merge import capture_expert_inputs


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral", "qwen2_moe"])
def test_gated_activation_sums_and_maxima_equal_a_per_token_loop(arch):
    """a = g·h with g the token's combine weight (softmax over all E, top-k, renormalized where the config says
    so): Σ_t a² and max_t a² per (expert, neuron), from captured expert inputs and router logits."""
    model = make(arch)
    layers = moe_adapter_for(model).moe_layers()
    x = ids(batch=3, length=10)
    col = AtomStats(layers, backward=False, gated=True)
    run(model, x, [col], batch_size=2)
    inputs, hooks = capture_expert_inputs(layers)
    norm = getattr(model.config, "norm_topk_prob", arch == "mixtral")
    with capture_router_logits(model) as logits, torch.no_grad():
        per = {layer.index: [] for layer in layers}
        for b in range(3):
            model(x[b:b + 1])
            for layer in layers:
                per[layer.index].append(logits[layer.index].reshape(-1, layer.num_experts))
    for h in hooks:
        h.remove()
    for layer, st in zip(layers, col.result()):
        hidden = torch.cat([t.reshape(-1, t.shape[-1]) for t in inputs[layer.index]])  # [30, H]
        lg = torch.cat(per[layer.index])  # [30, E]
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


@pytest.mark.parametrize("opts", [{}, {"form": "uniform", "width_multiple": 4},
                                  {"order": "one-shot", "lambda_max": 0.5}])
def test_layer_sequential_export_equals_in_memory(opts, tmp_path):
    src = tmp_path / "src"
    saved("qwen2_moe", src)
    recipe = Recipe.build("camera-p", 0.25, calib="tensor", nsamples=6, seqlen=16, **opts)
    wins = windows()
    report = prune_layerwise(src, recipe, tmp_path / "streamed", (wins, None, {"source": "tensor"}), verbose=False)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    ref = api.prune(model, recipe, calib=wins)
    save_pruned(model, tmp_path / "memory", ref)
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
