"""OWL (outlier-weighted layerwise sparsity) as the weight grain's budget: the outlier ratio and the allocation
against hand-worked numbers, the masks' per-layer density against an independent computation of the rule, and the
layer-sequential export against the in-memory one."""

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import mumoe
from conftest import ids, make
from mumoe import MumoeError
from mumoe.criteria.weight import outlier_ratio
from mumoe.select.weights import owl_sparsities


def test_outlier_ratio_and_allocation_hand_worked():
    # scores 1, 1, 1, 1, 10: mean 2.8, M = 2 -> threshold 5.6 -> one of five above: 20%
    assert outlier_ratio([torch.tensor([1.0, 1.0]), torch.tensor([[1.0, 1.0, 10.0]])], m=2) == pytest.approx(20.0)
    # D = 1, 2, 3; target 0.5, λ = 0.1: densities 0, 0.1, 0.2 -> centred on 0.5 -> 0.4, 0.5, 0.6
    assert owl_sparsities([1.0, 2.0, 3.0], 0.5, 0.1) == pytest.approx([0.6, 0.5, 0.4])
    assert owl_sparsities([3.0, 3.0], 0.5, 0.1) == [0.5, 0.5]  # no spread: the target everywhere
    assert owl_sparsities([0.0, 10.0], 0.95, 0.1)[0] == pytest.approx(1.05)  # the authors clamp only below 0
    assert owl_sparsities([0.0, 0.0, 10.0], 0.05, 0.08)[2] == 0.01  # density ≥ 1: sparsity 0.01, as they do


@pytest.mark.parametrize("arch", ["llama", "qwen3_moe"])
def test_owl_masks_follow_the_rule(arch):
    """Each decoder layer's masks remove floor(s_l·d_in) weights per row, s_l from OWL's rule computed here from
    the Wanda scores by hand (numpy), every layer's linears pooled; the mean of s_l is the target."""
    from mumoe.models.prunable import prunable_names
    from mumoe.observe.collectors import InputNorms
    from mumoe.observe.runner import run

    calib = ids(batch=4, length=16)
    ref = make(arch)
    norms = run(ref, calib, [InputNorms(ref)], batch_size=4)[0].result()
    params = dict(ref.named_parameters())
    by_layer: dict = {}
    for n in prunable_names(ref):
        j = int(n.split(".layers.")[1].split(".")[0])
        w = params[n].detach().abs().double().numpy()
        by_layer.setdefault(j, []).append((w * norms[n].double().numpy()[..., None, :]).ravel())
    D = []
    for j in sorted(by_layer):
        s = np.concatenate(by_layer[j])
        D.append(100.0 * (s > s.mean() * 5).sum() / s.size)
    D = np.array(D)
    dens = (D - D.min()) / (D.max() - D.min()) * 0.08 * 2
    sparsity = 1 - (dens - dens.mean() + 0.5)
    model = make(arch)
    report = mumoe.prune(model, "wanda", 0.5, calib=calib, budget="owl")
    assert report.budget == "row/owl" and abs(sparsity.mean() - 0.5) < 1e-12
    seen = set()
    for e in report.layers:
        j = int(e["param"].split(".layers.")[1].split(".")[0])
        d_in = params[e["param"]].shape[-1]
        want = 1 - np.floor(sparsity[sorted(by_layer).index(j)] * d_in + 1e-9) / d_in
        assert e["active"] == pytest.approx(want, abs=1e-6), e["param"]
        seen.add(j)
    assert seen == set(by_layer) and len(set(np.round(sparsity, 9))) > 1


def test_owl_layer_sequential_equals_in_memory(tmp_path):
    from mumoe.apply.export import save_pruned
    from mumoe.drivers.layerwise import prune_layerwise
    from safetensors.torch import load_file

    src = tmp_path / "src"
    make("qwen3_moe").save_pretrained(src)
    recipe = mumoe.Recipe.build("wanda", 0.5, calib="tensor", nsamples=6, seqlen=16, budget="owl", owl_m=3.0,
                                owl_lambda=0.1)
    wins = ids(batch=6, length=16)
    prune_layerwise(src, recipe, tmp_path / "streamed", (wins, None, {}), verbose=False)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    save_pruned(model, tmp_path / "memory", mumoe.prune(model, recipe, calib=wins))
    a, b = load_file(tmp_path / "streamed" / "model.safetensors"), load_file(tmp_path / "memory" / "model.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_owl_refusals():
    for opts, msg in (({"budget": "owl", "structure": "2:4"}, "unstructured \\(row\\) masks"),
                      ({"owl_m": 3.0}, "add --budget owl"),
                      ({"budget": "owl", "owl_lambda": 0.3}, "keep ratio \\+ 2 x lambda below 1"),
                      ({"budget": "global"}, "not a weight budget")):
        ratio = 0.5
        with pytest.raises(MumoeError, match=msg):
            mumoe.Recipe.build("wanda", ratio, calib="tensor", **opts)
    with pytest.raises(MumoeError, match="unstructured"):
        mumoe.Recipe.build("magnitude", 0.5, budget="owl")
