"""Structural expert removal and export: invariants on every MoE architecture."""

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from conftest import ids, make
import mumoe
from mumoe import MumoeError
from mumoe.apply import PruneReport, remove_experts, save_pruned
from mumoe.models import moe_adapter_for
from mumoe.models.base import EXPERT_COUNT_KEYS
from mumoe.observe import MoEObserver


def logits(model, x):
    with torch.no_grad():
        return model(x).logits


def routed_experts(model, x):
    used = {}
    with torch.no_grad(), MoEObserver(model, on_route=lambda ev: used.setdefault(ev.layer.index, set()).update(
            ev.indices.flatten().tolist())):
        model(x)
    return used


def test_ratio_zero_is_bit_identical(moe_arch):
    model, x = make(moe_arch), ids()
    before = logits(model, x)
    report = mumoe.prune(model, "random", 0.0)
    assert all(len(e["kept"]) == 8 for e in report.layers)
    assert torch.equal(logits(model, x), before)


def test_dropping_unrouted_experts_changes_nothing(moe_arch):
    # OLMoE / Qwen2-MoE route with softmax over *all* E without top-k renormalization: removing any expert
    # changes the softmax denominator, so the invariant holds exactly only with norm_topk_prob=True there
    # (see test_unnormalized_router_rescales_weights for the False case).
    kw = {"norm_topk_prob": True} if moe_arch in ("olmoe", "qwen2_moe") else {}
    model, x = make(moe_arch, **kw), ids(1, 3)
    before = logits(model, x)
    used = routed_experts(model, x)
    keep = {i: sorted(used[i] | set(range(8 - len(used[i])))) for i in used}  # pad to an even group split
    if moe_arch == "deepseek_v3":  # equal kept per group: keep used, then top up per group
        keep = {}
        for i, u in used.items():
            per = max(len([e for e in u if e < 4]), len([e for e in u if e >= 4]), 2)
            keep[i] = sorted([e for g in (range(4), range(4, 8)) for e in (sorted(set(g) & u) + sorted(set(g) - u))[:per]])
    dropped = {i: set(range(8)) - set(k) for i, k in keep.items()}
    assert any(dropped.values()), "the test input must leave some experts unrouted"
    remove_experts(model, keep)
    assert torch.allclose(logits(model, x), before, rtol=0, atol=1e-6)


def test_unnormalized_router_rescales_weights():
    """norm_topk_prob=False (OLMoE, Qwen2-MoE): after dropping experts, the kept experts' weights are the
    softmax over the kept logits only, i.e. p_i / (1 - Σ_dropped p_j) — the architecture's own semantics."""
    model, x = make("olmoe"), ids(1, 3)
    used = routed_experts(model, x)
    ev_before = {}
    with torch.no_grad(), MoEObserver(model, on_route=lambda ev: ev_before.__setitem__(ev.layer.index, ev)):
        model(x)
    layer0 = moe_adapter_for(model).moe_layers()[0]
    keep0 = sorted(used[0])
    remove_experts(model, {0: keep0, 1: list(range(8))})
    after = {}
    with torch.no_grad(), MoEObserver(model, on_route=lambda ev: after.__setitem__(ev.layer.index, ev)):
        model(x)
    p = torch.softmax(ev_before[0].logits.float(), -1)  # [T, E]
    kept_mass = p[:, keep0].sum(-1, keepdim=True)
    expected = ev_before[0].weights.float() / kept_mass
    mapped = torch.tensor(keep0)[after[0].indices]
    assert torch.equal(mapped, ev_before[0].indices)
    torch.testing.assert_close(after[0].weights.float(), expected, rtol=1e-5, atol=1e-6)
    assert layer0.norm_topk_prob is False


def test_export_reloads_with_from_pretrained(moe_arch, tmp_path):
    model, x = make(moe_arch), ids()
    report = mumoe.prune(model, "random", 0.5, seed=3, source=f"tiny:{moe_arch}")
    expected = logits(model, x)
    out = save_pruned(model, tmp_path / "out", report)
    reloaded, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert (logits(reloaded.eval(), x) - expected).abs().max() <= 1e-5
    cfg = json.loads((out / "config.json").read_text())
    assert "sparsity_config" not in cfg
    counts = {k: v for k, v in cfg.items() if k in EXPERT_COUNT_KEYS}
    assert counts and set(counts.values()) == {4}
    assert AutoConfig.from_pretrained(out).num_experts_per_tok == 2  # top_k unchanged
    # pruning.json: schema and kept sets
    pj = json.loads((out / "pruning.json").read_text())
    for key in ("mumoe_version", "method", "grain", "ratio", "budget", "calibration", "model", "layers"):
        assert key in pj
    assert pj["method"] == "random" and pj["grain"] == "expert" and pj["ratio"] == 0.5 and pj["form"] == "hf"
    assert pj["model"] == {"source": f"tiny:{moe_arch}", "model_type": moe_arch, "num_experts": 8}
    layers = moe_adapter_for(make(moe_arch)).moe_layers()
    assert [e["layer"] for e in pj["layers"]] == [l.index for l in layers]
    gen = torch.Generator().manual_seed(3)
    for entry in pj["layers"]:
        assert entry["num_experts"] == 8 and len(entry["scores"]) == 8 and len(entry["kept"]) == 4
        # the kept set is the top-4 of the recorded scores (per group for DeepSeek-V3)
        s = torch.tensor(entry["scores"])
        assert torch.allclose(s, torch.rand(8, generator=gen, dtype=torch.float64).float())
        if moe_arch == "deepseek_v3":
            exp = sorted(torch.topk(s[:4], 2).indices.tolist() + (torch.topk(s[4:], 2).indices + 4).tolist())
        else:
            exp = sorted(torch.topk(s, 4).indices.tolist())
        assert entry["kept"] == exp
    # the slices are the original experts
    orig = moe_adapter_for(make(moe_arch)).moe_layers()
    new = moe_adapter_for(reloaded).moe_layers()
    for o, n, entry in zip(orig, new, pj["layers"]):
        k = torch.tensor(entry["kept"])
        assert torch.equal(n.experts.gate_up_proj, o.experts.gate_up_proj[k])
        assert torch.equal(n.experts.down_proj, o.experts.down_proj[k])
        assert torch.equal(n.router_weight, o.router_weight[k])
        if o.correction_bias is not None:
            assert torch.equal(n.correction_bias, o.correction_bias[k])


def test_non_uniform_counts_reload_with_mumoe_load(tmp_path):
    model, x = make("qwen3_moe"), ids()
    report = PruneReport(method="manual", grain="expert", ratio=0.0, budget="global", form="mumoe",
                         layers=[{"layer": 0, "num_experts": 8, "kept": [0, 2, 5], "scores": []},
                                 {"layer": 1, "num_experts": 8, "kept": [1, 2, 3, 4, 7], "scores": []}])
    counts = remove_experts(model, report.kept())
    assert counts == [3, 5]
    assert model.config.num_experts == 8  # an HF config cannot hold per-layer counts: left as it was
    out = save_pruned(model, tmp_path / "nu", report)
    again = mumoe.load(out)
    assert [l.num_experts for l in moe_adapter_for(again).moe_layers()] == [3, 5]
    assert (logits(again, x) - logits(model, x)).abs().max() <= 1e-5  # sdpa vs eager attention only


def test_keep_below_top_k_and_bad_groups_are_refused():
    model = make("qwen3_moe")
    with pytest.raises(MumoeError, match="top_k"):
        remove_experts(model, {0: [3]})
    with pytest.raises(MumoeError, match="top_k"):
        mumoe.prune(make("qwen3_moe"), "random", 0.9)
    with pytest.raises(MumoeError, match=r"ratio must be in \[0, 1\)"):
        mumoe.prune(make("qwen3_moe"), "random", 1.0)
    with pytest.raises(MumoeError, match="same number of kept experts in every group"):
        remove_experts(make("deepseek_v3"), {1: [0, 1, 2, 4, 5]})
    with pytest.raises(MumoeError, match="not divisible by n_group"):
        mumoe.prune(make("deepseek_v3"), "random", 0.125)  # drops 1 of 8 with 2 groups
    with pytest.raises(MumoeError, match="dense model"):
        mumoe.prune(make("llama"), "random", 0.5)
    with pytest.raises(MumoeError, match="unknown method 'nope'; known: .*random"):
        mumoe.prune(make("qwen3_moe"), "nope", 0.5)


def test_pruned_twice_the_record_describes_the_export(tmp_path):
    """mumoe.prune twice on one model, then save_pruned: pruning.json keeps the original source and expert
    count, both stages' recipes, and kept indices in the original numbering — checked against the weights
    (each kept expert's tensors equal the original expert's)."""
    import json

    from conftest import make
    from mumoe.loading import load

    src = tmp_path / "src"
    make("qwen3_moe").save_pretrained(src)
    model = load(str(src))
    orig = {n: p.detach().clone() for n, p in model.named_parameters() if ".experts." in n}
    mumoe.prune(model, "aimer", 0.25)  # 8 -> 6
    report = mumoe.prune(model, "aimer", 0.5)  # 6 -> 3
    out = mumoe.save_pruned(model, tmp_path / "out", report)
    rec = json.loads((out / "pruning.json").read_text())
    assert rec["model"]["source"] == str(src) and rec["model"]["num_experts"] == 8
    assert [st["ratio"] for st in rec["stages"]] == [0.25, 0.5]
    assert abs(rec["ratio"] - 5 / 8) < 1e-9
    for entry in rec["layers"]:
        assert entry["num_experts"] == 8 and len(entry["kept"]) == 3 and len(set(entry["kept"])) == 3
        for name in ("gate_up_proj", "down_proj"):
            now = dict(model.named_parameters())[f"model.layers.{entry['layer']}.mlp.experts.{name}"]
            was = orig[f"model.layers.{entry['layer']}.mlp.experts.{name}"]
            assert torch.equal(now, was[entry["kept"]])


def test_pruned_twice_last_global_reloads(tmp_path):
    """Uniform, then a global budget (per-layer counts differ: mumoe's own form): mumoe.load rebuilds the export
    from the record — kept indices in the numbering of the export's config — to the in-memory model's logits."""
    from conftest import ids, make
    from mumoe.loading import load

    src = tmp_path / "src"
    make("qwen3_moe").save_pretrained(src)
    model = load(str(src))
    mumoe.prune(model, "aimer", 0.25)  # 8 -> 6 in every layer
    report = mumoe.prune(model, "aimer", 0.5, budget="global")  # 6 -> per-layer counts
    assert report.form == "mumoe" and all(max(e["kept"]) < 6 for e in report.layers)
    assert all(max(e["kept_original"]) < 8 and len(e["kept_original"]) == len(e["kept"]) for e in report.layers)
    out = mumoe.save_pruned(model, tmp_path / "out", report)
    x = ids(batch=2, length=10)
    with torch.no_grad():
        assert torch.equal(load(str(out)).eval()(x).logits, model.eval()(x).logits)
