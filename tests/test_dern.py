"""DERN (our reading, docs/methods.md): the recombination against a hand-worked example, the segment assignment
against copies planted in a kept expert, α = 1 equal to frequency pruning, and the layer-sequential run (streamed
export) against the loaded model's."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import mumoe
from conftest import ids, make
from mumoe import MumoeError
from mumoe.apply.merge import recombine
from mumoe.criteria import dern
from mumoe.models import moe_adapter_for


def test_recombine_hand_worked():
    """Three experts of two neurons (H = 1): experts 0 and 2 kept; expert 1's neuron 0 goes to kept neuron
    (expert 2, neuron 1), its neuron 1 is discarded. Coefficients 1, 3, 2."""
    gate = torch.tensor([[[1.0], [2.0]], [[10.0], [20.0]], [[3.0], [4.0]]])  # [E, I, H]
    up = gate + 100
    gate_up = torch.cat([gate, up], 1)  # [E, 2I, H]
    down = torch.tensor([[[5.0, 6.0]], [[50.0, 60.0]], [[7.0, 8.0]]])  # [E, H, I]
    targets = torch.tensor([[0, 1], [3, -1], [2, 3]])  # flat kept neuron r·I + k
    coef = torch.tensor([1.0, 3.0, 2.0])
    gu = recombine(gate_up, targets, coef, [0, 2], "gate_up")
    dn = recombine(down, targets, coef, [0, 2], "cols")
    assert torch.equal(gu[0], gate_up[0]) and torch.equal(dn[0], down[0])  # nothing came to expert 0
    assert gu[1, 0, 0] == 3 and gu[1, 1, 0] == (2 * 4 + 3 * 10) / 5 and gu[1, 3, 0] == (2 * 104 + 3 * 110) / 5
    assert dn[1, 0, 0] == 7 and dn[1, 0, 1] == (2 * 8 + 3 * 50) / 5
    assert torch.equal(recombine(torch.arange(3.0)[:, None], targets, coef, [0, 2], "vector"),
                       torch.tensor([[0.0], [2.0]]))


def test_planted_copies_are_found_and_merge_into_themselves():
    """Dropped expert 7's neurons 0..3 are copies of kept expert 1's neurons 4..7 (cosine 1): they merge there and,
    the weighted mean of equal vectors being that vector, expert 1 is unchanged; its other neurons, of random
    similarity, are discarded at α = 0.9."""
    model = make("qwen3_moe")
    layer = moe_adapter_for(model).moe_layers()[0]
    I = layer.intermediate_size
    with torch.no_grad():
        gu, dn = layer.experts.gate_up_proj, layer.experts.down_proj
        for n in range(4):
            gu[7, n], gu[7, I + n], dn[7][:, n] = gu[1, 4 + n], gu[1, I + 4 + n], dn[1][:, 4 + n]
    kept = [0, 1, 2, 3, 4, 5]
    targets, best = dern.assign(layer.experts.gate_up_proj.detach(), layer.experts.down_proj.detach(), kept, 0.9)
    assert targets[7, :4].tolist() == [1 * I + 4 + n for n in range(4)]
    assert bool((best[7, :4] > 1 - 1e-5).all()) and bool((targets[7, 4:] == -1).all())
    assert bool((targets[6] == -1).all())  # random neurons: far below 0.9
    groups, _ = dern.record(targets, kept, torch.ones(8))
    assert groups == [[0], [1, 7], [2], [3], [4], [5]]
    out = recombine(layer.experts.gate_up_proj.detach(), targets, torch.tensor([1.0, 2, 1, 1, 1, 1, 1, 5]), kept,
                    "gate_up")
    assert torch.allclose(out[1], layer.experts.gate_up_proj[1].detach(), atol=1e-6)


def test_dern_alpha_one_equals_frequency_pruning_and_options_are_checked():
    """α = 1: no random neuron reaches it, nothing is merged — exactly the frequency method's pruned model."""
    wins = ids(batch=4, length=12)
    a, b = make("qwen3_moe"), make("qwen3_moe")
    report = mumoe.prune(a, "dern", 0.5, calib=wins, alpha=1.0)
    mumoe.prune(b, "frequency", 0.5, calib=wins)
    x = ids(batch=2, length=10, seed=2)
    with torch.no_grad():
        assert torch.equal(a(x).logits, b(x).logits)
    assert all(e["neurons"]["merged"] == 0 and e["neurons"]["discarded"] == 4 * 16 for e in report.layers)
    merged = mumoe.prune(make("qwen3_moe"), "dern", 0.5, calib=wins, alpha=-1.0)  # every dropped neuron merged
    assert all(e["neurons"] == {"merged": 64, "discarded": 0} for e in merged.layers)
    with pytest.raises(MumoeError, match="--router centroid"):
        mumoe.Recipe.build("dern", 0.5, calib="tensor", router="bound")
    with pytest.raises(MumoeError, match="does not take it"):
        mumoe.Recipe.build("hc-smoe", 0.5, calib="tensor", alpha=0.3)
    with pytest.raises(MumoeError, match=r"in \[-1, 1\]"):
        mumoe.Recipe.build("dern", 0.5, calib="tensor", alpha=2.0)


@pytest.mark.parametrize("arch,opts", [("qwen3_moe", {}), ("mixtral", {"order": "progressive"}), ("gpt_oss", {})])
def test_layerwise_dern_equals_in_memory(arch, opts, tmp_path):
    """Each layer's plan is made while the layer is resident (the assignment reads its weights); the streamed
    export (fused, per-expert and GPT-OSS layouts) equals recombining the loaded model and is a plain HF model."""
    from mumoe.drivers.layerwise import prune_layerwise
    from mumoe.loading import load

    src = tmp_path / "src"
    make(arch).save_pretrained(src)
    recipe = mumoe.Recipe.build("dern", 0.25, calib="tensor", nsamples=6, seqlen=16, alpha=0.1, **opts)
    wins = ids(batch=6, length=16)
    report = prune_layerwise(src, recipe, tmp_path / "streamed", (wins, None, {}), verbose=False)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    ref = mumoe.prune(model, recipe, calib=wins)
    assert report.layers == ref.layers and report.form == "hf"
    assert sum(e["neurons"]["merged"] for e in report.layers) > 0  # α = 0.1 merges some random neurons
    x = ids(batch=2, length=12, seed=3)
    with torch.no_grad():
        want = model(x).logits
        assert torch.allclose(load(tmp_path / "streamed")(x).logits, want, atol=1e-5)
        plain = AutoModelForCausalLM.from_pretrained(tmp_path / "streamed", dtype=torch.float32).eval()
        assert torch.allclose(plain(x).logits, want, atol=1e-5)


def test_assignment_in_blocks_equals_one_similarity_matrix():
    """The blocked search (one expert per block) equals the argmax of the whole [D·I, M·I] cosine matrix."""
    g = torch.Generator().manual_seed(0)
    gate_up, down = torch.randn(10, 16, 5, generator=g), torch.randn(10, 5, 8, generator=g)
    kept = [0, 2, 4, 6, 8]
    targets, _ = dern.assign(gate_up, down, kept, 0.3, budget=1)
    seg = torch.cat([gate_up[:, :8], gate_up[:, 8:], down.transpose(1, 2)], 2).double()
    seg = seg / seg.norm(dim=-1, keepdim=True)
    pool = seg[kept].reshape(-1, 15)
    for d in (1, 3, 5, 7, 9):
        v, i = (seg[d] @ pool.T).max(1)
        assert torch.equal(targets[d], torch.where(v >= 0.3, i, torch.full_like(i, -1)))
    assert torch.equal(targets[kept[2]], 2 * 8 + torch.arange(8))
