"""Expert criteria against a slow token-by-token reference, on every MoE architecture."""

import math

import pytest
import torch

from conftest import ids, make
import mumoe
from mumoe import MumoeError
from mumoe.criteria import METHODS
from mumoe.models import moe_adapter_for
from mumoe.select import keep_uniform

CALIBRATED = ["frequency", "gate", "ean", "reap", "easy-ep", "tcess", "peu", "man", "msan"]


def reference_scores(model, calib):
    """Explicit loops over tokens and experts; routing from calling each router on one token at a time."""
    layers = moe_adapter_for(model).moe_layers()
    inputs, residuals = {}, {}
    hooks = []
    for l in layers:
        hooks.append(l.block.register_forward_pre_hook(
            lambda m, a, i=l.index: inputs.setdefault(i, []).append(a[0].reshape(-1, a[0].shape[-1]))))
        hooks.append(l.residual_norm.register_forward_pre_hook(
            lambda m, a, i=l.index: residuals.setdefault(i, []).append(a[0].reshape(-1, a[0].shape[-1]))))
    with torch.no_grad():
        for row in calib:
            model(row[None])
    for h in hooks:
        h.remove()
    out = {}
    with torch.no_grad():
        for l in layers:
            E, k = l.num_experts, l.top_k
            X, R = torch.cat(inputs[l.index]), torch.cat(residuals[l.index])
            sc = {m: [0.0] * E for m in CALIBRATED}
            count = [0] * E
            pools = []
            for t in range(X.shape[0]):
                x = X[t]
                logits, w, idx = l.router(x[None])
                logits, w, idx = logits[0].double(), w[0].double(), idx[0].tolist()
                fs = {}
                for slot, i in enumerate(idx):
                    gate = l.experts.gate_up_proj[i, : l.intermediate_size] @ x
                    up = l.experts.gate_up_proj[i, l.intermediate_size:] @ x
                    fs[i] = (l.experts.down_proj[i] @ (torch.nn.functional.silu(gate) * up)).double()
                routed = sum(w[s] * fs[i] for s, i in enumerate(idx))
                h = R[t].double()
                shift = max(0.0, 1 - float(torch.dot(h, h + routed) / (h.norm() * (h + routed).norm())))
                for slot, i in enumerate(idx):
                    n = float(fs[i].norm())
                    count[i] += 1
                    sc["frequency"][i] += 1
                    sc["gate"][i] += float(w[slot])
                    sc["ean"][i] += n
                    sc["man"][i] += n
                    sc["msan"][i] += n * n
                    sc["reap"][i] += float(w[slot]) * n
                    sc["easy-ep"][i] += float(w[slot]) * n * shift
                top = int(logits.argmax())
                sc["tcess"][top] += float(logits[top])
                order = sorted(range(E), key=lambda e: -float(logits[e]))[:k]
                pools.append([(e, float(logits[e])) for e in order])
            N = X.shape[0]
            for m in ("reap", "man", "msan"):
                sc[m] = [sc[m][i] / count[i] if count[i] else 0.0 for i in range(E)]
            sc["tcess"] = [v / N for v in sc["tcess"]]
            ps = []
            for pool in pools:
                z = sum(math.exp(s) for _, s in pool)
                ps.append([math.exp(s) / z for _, s in pool])
            r = sum(max(p) for p in ps) / N
            peu = [0.0] * E
            for pool, p in zip(pools, ps):
                for (e, s), pe in zip(pool, p):
                    if pe >= r:
                        peu[e] += max(s, 1 / (1 + math.exp(-s)))
            sc["peu"] = [v / N for v in peu]
            out[l.index] = sc
    return out


def ref_keep(scores, ratio, layer):
    E = len(scores)
    drop = round(ratio * E)
    order = lambda idxs: sorted(idxs, key=lambda e: (-scores[e], e))
    if not layer.n_group:
        return sorted(order(range(E))[: E - drop])
    per = E // layer.n_group
    return sorted(e for g in range(layer.n_group) for e in order(range(g * per, (g + 1) * per))[: per - drop // layer.n_group])


def test_calibrated_criteria_match_slow_reference(moe_arch):
    model = make(moe_arch)
    calib = ids(4, 12, seed=5)
    ref = reference_scores(model, calib)
    layers = moe_adapter_for(model).moe_layers()
    for method in CALIBRATED:
        got = mumoe.score(model, method, calib=calib, batch_size=3)
        for layer, s in zip(layers, got):
            expected = torch.tensor(ref[layer.index][method], dtype=torch.float64)
            torch.testing.assert_close(s, expected, rtol=1e-5, atol=1e-9, msg=f"{method} layer {layer.index}")
            for ratio in (0.25, 0.5):
                assert keep_uniform(s, ratio, layer.top_k, layer.n_group, layer.topk_group) == \
                    ref_keep(ref[layer.index][method], ratio, layer), (method, ratio)


def test_batch_size_invariance():
    model = make("qwen3_moe")
    calib = ids(8, 16, seed=2)
    for method in CALIBRATED:
        a = mumoe.score(model, method, calib=calib, batch_size=1)
        b = mumoe.score(model, method, calib=calib, batch_size=8)
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-12)
            assert keep_uniform(x, 0.5, 2) == keep_uniform(y, 0.5, 2)


def test_aimer_hand_worked():
    model = make("qwen3_moe")
    layer = moe_adapter_for(model).moe_layers()[0]
    with torch.no_grad():
        layer.experts.gate_up_proj[0].fill_(0.3)  # constant weights: A = 1 (the maximum)
        layer.experts.down_proj[0].fill_(-0.3)
        layer.experts.gate_up_proj[1].zero_()  # a single non-zero weight: A = 1/sqrt(N) (the minimum)
        layer.experts.down_proj[1].zero_()
        layer.experts.gate_up_proj[1, 0, 0] = 2.0
    s = mumoe.score(model, "aimer")[0]
    N = 3 * layer.intermediate_size * layer.hidden_size
    assert abs(float(s[0]) - 1.0) < 1e-7 and abs(float(s[1]) - 1 / math.sqrt(N)) < 1e-9  # fp32 row sums
    w = torch.cat([layer.experts.gate_up_proj[4].flatten(), layer.experts.down_proj[4].flatten()]).detach().double()
    assert abs(float(s[4]) - float(w.abs().sum() / (math.sqrt(N) * w.norm()))) < 1e-7
    report = mumoe.prune(model, "aimer", 0.25)  # prunes the highest: expert 0 goes, expert 1 stays
    kept = report.layers[0]["kept"]
    assert 0 not in kept and 1 in kept


def test_matrix_norms_reused_workspace_leaves_weights_alone():
    """The reused fp32 buffer is reduced in place: results match float64 for any shape/dtype sequence, and the
    weights themselves (fp32 ones are not copied by `.float()`) are never modified."""
    from mumoe.criteria.expert import NormWorkspace, matrix_norms

    gen = torch.Generator().manual_seed(0)
    ws = NormWorkspace()
    for shape, dtype in [((64, 48), torch.float32), ((7, 300), torch.bfloat16), ((64, 48), torch.float16),
                         ((3, 5), torch.float32)]:  # grows, then reuses a larger buffer for smaller matrices
        w = (torch.randn(shape, generator=gen) - 0.3).to(dtype)
        before = w.clone()
        ref = (float(w.double().abs().sum()), float(w.double().pow(2).sum()))
        for got in (matrix_norms(w, ws), matrix_norms(w)):
            assert got[0] == pytest.approx(ref[0], rel=1e-6) and got[1] == pytest.approx(ref[1], rel=1e-6)
        assert torch.equal(w, before)


def test_calibration_required():
    with pytest.raises(MumoeError, match="needs calibration data"):
        mumoe.prune(make("qwen3_moe"), "reap", 0.5)
    rules = ["stun", "stun-coselect"]  # keep rules over all layers (tests/test_stun.py), not per-expert scores
    assert sorted(m for m in METHODS if METHODS[m].grain == "expert") == sorted(["random", "aimer"] + CALIBRATED +
                                                                                rules)


def test_progressive_order_scores_each_layer_after_earlier_pruning():
    calib = ids(4, 12, seed=7)
    model = make("qwen3_moe")
    report = mumoe.prune(model, "reap", 0.5, calib=calib, order="progressive")
    assert report.scoring_order == "progressive"
    # independent: layer 0 on the dense model, prune it, then layer 1 on that model
    ref = make("qwen3_moe")
    s0 = mumoe.score(ref, "reap", calib=calib)[0]
    from mumoe.apply import remove_experts

    remove_experts(ref, {0: keep_uniform(s0, 0.5, 2)})
    s1 = mumoe.score(ref, "reap", calib=calib)[1]
    torch.testing.assert_close(torch.tensor(report.layers[0]["scores"], dtype=torch.float64), s0)
    torch.testing.assert_close(torch.tensor(report.layers[1]["scores"], dtype=torch.float64), s1)
    one_shot = mumoe.score(make("qwen3_moe"), "reap", calib=calib)[1]
    assert not torch.allclose(one_shot, s1)  # the order matters
    assert report.layers[1]["kept"] == keep_uniform(s1, 0.5, 2)
    assert [len(e["kept"]) for e in report.layers] == [4, 4] and model.config.num_experts == 4
