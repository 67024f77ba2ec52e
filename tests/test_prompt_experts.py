"""Per-prompt expert pruning: the TCESS keep rule, reversible slicing, and the expert-grain test-time protocol."""

import copy

import pytest
import torch

from conftest import ids, make
from mumoe.apply.experts import remove_experts
from mumoe.errors import MumoeError
from mumoe.models import moe_adapter_for
from mumoe.testtime.evaluate import expert_continuation_perplexity
from mumoe.testtime.experts import capture_router_logits, check_experts, experts_kept, prompt_keep, top_experts


def test_top_experts_hand_worked():
    # 3 tokens, 5 experts. arg-max per token: 1 (2.0), 1 (1.0), 3 (0.5) -> TCESS = [0, 1.0, 0, 1/6, 0]
    logits = torch.tensor([[0.0, 2.0, 1.0, -1.0, 0.0],
                           [0.0, 1.0, 0.5, 0.0, -3.0],
                           [0.0, 0.0, 0.4, 0.5, 0.0]])
    assert top_experts(logits, 2) == [1, 3]
    # third place: a tie at TCESS 0 among 0, 2, 4, broken by mean softmax probability (expert 2 is highest)
    probs = torch.softmax(logits.double(), -1).mean(0)
    assert probs[2] > probs[0] > probs[4]
    assert top_experts(logits, 3) == [1, 2, 3]
    assert top_experts(logits, 5) == [0, 1, 2, 3, 4]


def test_experts_kept_equals_offline_pruning_and_restores(moe_arch):
    if moe_arch == "deepseek_v3":
        pytest.skip("group-limited router: per-prompt expert pruning refused (tested below)")
    model = make(moe_arch)
    x = ids(1, 10)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        dense = model(x).logits
    layers = moe_adapter_for(model).moe_layers()
    k = layers[0].top_k + 1
    keep = {l.index: sorted(torch.randperm(l.num_experts, generator=torch.Generator().manual_seed(l.index))[:k].tolist())
            for l in layers}
    offline = copy.deepcopy(model)
    remove_experts(offline, keep)
    with torch.no_grad():
        want = offline(x).logits
        with experts_kept(model, keep) as removed:
            got = model(x).logits
    assert removed > 0
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not torch.allclose(got, dense)
    after = dict(model.named_parameters())
    assert set(after) == set(before)
    for n, p in before.items():
        assert torch.equal(after[n], p), n
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, dense, rtol=0, atol=0)


def test_experts_kept_restores_on_error():
    model = make("qwen3_moe")
    x = ids(1, 8)
    with torch.no_grad():
        dense = model(x).logits
    keep = {l.index: [0, 1, 2] for l in moe_adapter_for(model).moe_layers()}
    with pytest.raises(RuntimeError):
        with experts_kept(model, keep):
            raise RuntimeError("boom")
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, dense, rtol=0, atol=0)


def test_check_experts_bounds():
    model = make("qwen3_moe")
    layers = moe_adapter_for(model).moe_layers()
    top_k, E = layers[0].top_k, layers[0].num_experts
    assert check_experts(model, top_k) == top_k and check_experts(model, E) == E
    for bad in (top_k - 1, E + 1, 2.5, True, "4"):
        with pytest.raises(MumoeError, match="experts must be"):
            check_experts(model, bad)
    with pytest.raises(MumoeError, match="group-limited"):
        check_experts(make("deepseek_v3"), 4)


def test_capture_router_logits_matches_router_output():
    model = make("mixtral")
    x = ids(1, 9)
    layers = moe_adapter_for(model).moe_layers()
    with torch.no_grad(), capture_router_logits(model) as got:
        model(x)
    assert sorted(got) == [l.index for l in layers]
    # independent: the router's own logits are a linear map of its input; recompute from a pre-hook's input
    seen = {}
    hooks = [l.router.register_forward_pre_hook(lambda m, a, i=l.index: seen.__setitem__(i, a[0].reshape(-1, a[0].shape[-1])))
             for l in layers]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    for l in layers:
        torch.testing.assert_close(got[l.index], seen[l.index] @ l.router_weight.T, rtol=1e-5, atol=1e-6)
        assert got[l.index].shape == (9, l.num_experts)


def test_expert_protocol_dense_and_all_experts_equal_plain_continuation():
    """choose -> None and choose -> every expert both give the dense continuation perplexity; K < E differs."""
    from mumoe.testtime import continuation_perplexity

    model = make("qwen3_moe")
    wins = ids(3, 16, seed=4)
    E = moe_adapter_for(model).moe_layers()[0].num_experts
    dense = continuation_perplexity(model, wins, 8, masks=None, per_prompt=False)["ppl"]
    none = expert_continuation_perplexity(model, wins, 8, lambda r, p: None)["ppl"]
    every = expert_continuation_perplexity(model, wins, 8, lambda r, p: prompt_keep(r, E))["ppl"]
    some = expert_continuation_perplexity(model, wins, 8, lambda r, p: prompt_keep(r, 2))["ppl"]
    assert none == pytest.approx(dense, rel=1e-9)
    assert every == pytest.approx(dense, rel=1e-6)
    assert abs(some - dense) > 1e-4


def test_experts_kept_copies_no_expert_tensor():
    """Per-prompt experts restrict the routing: inside the block the experts' tensors are the model's own (same
    storage, nothing copied per request) while only the kept experts receive tokens."""
    model = make("qwen3_moe")
    layers = moe_adapter_for(model).moe_layers()
    ptrs = [(l.experts.gate_up_proj.data_ptr(), l.experts.down_proj.data_ptr()) for l in layers]
    keep = {l.index: [1, 4, 6] for l in layers}
    picked: dict[int, set] = {}
    with torch.no_grad(), experts_kept(model, keep) as removed:
        assert [(l.experts.gate_up_proj.data_ptr(), l.experts.down_proj.data_ptr()) for l in layers] == ptrs
        hooks = [l.router.register_forward_hook(lambda m, a, o, i=l.index: picked.setdefault(i, set()).update(
            o[2].flatten().tolist())) for l in layers]  # after the routing restriction's own hook: what the experts get
        model(ids(1, 12))
        for h in hooks:
            h.remove()
    E, per_expert = layers[0].num_experts, sum(t[0].numel() for t in (layers[0].experts.gate_up_proj,
                                                                     layers[0].experts.down_proj))
    H = layers[0].router_weight.shape[1]
    assert removed == len(layers) * (E - 3) * (per_expert + H)  # the pruned model's missing experts and router rows
    assert all(picked[i] <= {1, 4, 6} for i in picked) and picked
