"""LongCat-Flash's zero-computation ("identity") experts (`models.longcat_flash`): the router scores E routed and Z
identity experts; mumoe removes and merges routed experts only. Here: the statistics count routed picks only
(against a slow count over the router's own output), removal keeps the identity experts' router rows bit for bit,
and a global budget (per-layer counts differ: mumoe's own form) loads with mumoe.load and with plain transformers
(trust_remote_code) to the logits of the model pruned in memory. The family's other checks are in
test_families.py."""

import torch
from conftest import ids, assert_reloads_to
import mumoe
from mumoe.apply import remove_experts, save_pruned
from mumoe.models import moe_adapter_for
from mumoe.models.tiny import tiny_model
from mumoe.observe import run
from mumoe.observe.collectors import ExpertStats


def test_statistics_count_routed_picks_only():
    model, x = tiny_model("longcat_flash"), ids(4, 16, seed=2)
    layers = moe_adapter_for(model).moe_layers()
    seen = {}
    hooks = [l.router.register_forward_hook(lambda m, a, o, i=l.index: seen.__setitem__(i, o[2].reshape(-1)))
             for l in layers]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    stats = run(model, x, [ExpertStats(layers)], batch_size=4)[0]
    identity = 0
    for layer in layers:
        picks = seen[layer.index]  # [T k] every pick, identity experts' (>= 8) included
        slow = [sum(int(p) == e for p in picks) for e in range(8)]  # a count by hand, routed experts only
        identity += int((picks >= 8).sum())
        assert stats.stats[layer.index].freq.tolist() == slow
    assert identity > 0  # the tiny model's routers do pick identity experts: the check can fail


def test_removal_keeps_the_identity_experts_rows():
    model = tiny_model("longcat_flash")
    before = {l.index: [rt.tensor.detach().clone() for rt in l.router_tensors] for l in moe_adapter_for(model).moe_layers()}
    keep = {0: [0, 2, 3, 5], 1: [1, 4, 6, 7]}
    remove_experts(model, keep)
    for layer in moe_adapter_for(model).moe_layers():
        assert layer.num_experts == 4 and layer.identity_experts == 2
        for rt, old in zip(layer.router_tensors, before[layer.index]):
            want = torch.cat([old[keep[layer.index]], old[8:]])  # kept routed rows, then the 2 identity rows
            assert torch.equal(rt.tensor, want), rt.name
        assert layer.router.n_routed_experts == 6 and layer.block.num_routed_experts == 4
    assert model.config.n_routed_experts == 4 and model.config.zero_expert_num == 2


def test_global_budget_form_loads_everywhere(tmp_path):
    model, x = tiny_model("longcat_flash"), ids(2, 12, seed=3)
    report = mumoe.prune(model, "reap", 0.25, calib=ids(4, 16, seed=1), budget="global", batch_size=4)
    counts = [len(e["kept"]) for e in report.layers]
    assert len(set(counts)) > 1 and report.form == "mumoe"  # the layers keep different counts
    with torch.no_grad():
        expected = model(x).logits
    assert_reloads_to(save_pruned(model, tmp_path / "global", report), x, expected)
