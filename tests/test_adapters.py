"""The normalized MoE view and its hooks, checked against independent recomputation on every architecture."""

import pytest
import torch

from conftest import DENSE_ARCHS, MOE_ARCHS, ids, make, recompose
from mumoe import MumoeError
from mumoe.models import adapter_for, moe_adapter_for
from mumoe.observe import MoEObserver


def reference_routing(layer, x):
    """Routing from the formulas of docs/methods.md, written independently of the model code. x [T, H]."""
    logits = x.float() @ layer.router_weight.float().T  # [T, E]
    k = layer.top_k
    if layer.scoring == "softmax":
        probs = torch.softmax(logits, dim=-1)
        w, idx = torch.topk(probs, k, dim=-1)
        if layer.norm_topk_prob:
            w = w / w.sum(-1, keepdim=True)
        return logits, w, idx
    # DeepSeek-V3: sigmoid, correction bias for choice only, group-limited top-k, normalize, scale
    s = torch.sigmoid(logits)
    choice = s + layer.correction_bias
    T, E = s.shape
    G = layer.n_group
    out_w, out_i = torch.zeros(T, k), torch.zeros(T, k, dtype=torch.long)
    for t in range(T):
        group_score = [sorted(choice[t, g * E // G:(g + 1) * E // G].tolist())[-2:] for g in range(G)]
        groups = sorted(range(G), key=lambda g: -sum(group_score[g]))[: layer.topk_group]
        allowed = [e for e in range(E) if e // (E // G) in groups]
        chosen = sorted(allowed, key=lambda e: -choice[t, e].item())[:k]
        w = s[t, chosen]
        if layer.norm_topk_prob:
            w = w / w.sum()
        out_w[t] = w * layer.routed_scaling_factor
        out_i[t] = torch.tensor(chosen)
    return logits, out_w, out_i


def test_view_fields(moe_arch):
    model = make(moe_arch)
    layers = moe_adapter_for(model).moe_layers()
    cfg = model.config
    assert [l.index for l in layers] == ([1, 2] if moe_arch == "deepseek_v3" else [0, 1])
    for layer in layers:
        assert layer.num_experts == 8 and layer.top_k == 2
        assert layer.router_weight.shape == (8, cfg.hidden_size)
        assert layer.gate_proj(3).shape == (layer.intermediate_size, cfg.hidden_size)
        assert layer.down_proj(3).shape == (cfg.hidden_size, layer.intermediate_size)
        # views, not copies
        assert layer.gate_proj(3).data_ptr() == layer.experts.gate_up_proj[3].data_ptr()
        assert layer.up_proj(3).data_ptr() == layer.experts.gate_up_proj[3, layer.intermediate_size:].data_ptr()
        assert (layer.shared is not None) == (moe_arch in ("qwen2_moe", "deepseek_v3"))
        assert (layer.shared_gate is not None) == (moe_arch == "qwen2_moe")
        assert (layer.correction_bias is not None) == (moe_arch == "deepseek_v3")
        if moe_arch == "deepseek_v3":
            assert (layer.scoring, layer.n_group, layer.topk_group) == ("sigmoid", 2, 1)
            assert layer.routed_scaling_factor == 2.5


def test_hooks_match_reference_routing_and_block_output(moe_arch):
    """Router events equal the formulas; Σ_i g_i f_i(x) (+ shared) from expert events equals the block output."""
    model = make(moe_arch)
    layers = moe_adapter_for(model).moe_layers()
    routes, experts, blocks = {}, {}, {}
    hooks = [l.block.register_forward_hook(lambda m, a, o, i=l.index: blocks.__setitem__(i, o.reshape(-1, o.shape[-1])))
             for l in layers]

    def on_expert(ev):
        experts.setdefault(ev.layer.index, []).append(ev)

    with torch.no_grad(), MoEObserver(model, on_route=lambda ev: routes.__setitem__(ev.layer.index, ev),
                                      on_expert=on_expert):
        model(ids())
    for h in hooks:
        h.remove()
    for layer in layers:
        ev = routes[layer.index]
        logits, w, idx = reference_routing(layer, ev.hidden)
        torch.testing.assert_close(ev.logits.float(), logits, rtol=1e-5, atol=1e-6)
        order_ev, order_ref = ev.indices.sort(-1), idx.sort(-1)
        assert torch.equal(order_ev.values, order_ref.values)
        torch.testing.assert_close(ev.weights.gather(-1, order_ev.indices).float(),
                                   w.gather(-1, order_ref.indices), rtol=1e-5, atol=1e-6)
        # residual stream: the post-attention norm applied to it gives the MoE input
        torch.testing.assert_close(layer.residual_norm(ev.residual), ev.hidden)
        # slow recomposition of the block output, token by token, from per-expert events
        for e in experts[layer.index]:
            assert torch.equal(ev.indices[e.tokens, e.slot], torch.full_like(e.tokens, e.expert))
        total, seen = recompose(layer, ev, experts[layer.index])
        assert torch.equal(seen, torch.full((ev.hidden.shape[0],), layer.top_k))  # each token: its top-k experts
        torch.testing.assert_close(total, blocks[layer.index], rtol=1e-5, atol=1e-6)


def test_padding_tokens_are_dropped(moe_arch):
    model = make(moe_arch)
    x = ids(2, 10)
    mask = torch.ones_like(x)
    mask[1, :4] = 0  # left padding on row 1
    counts = {}
    with torch.no_grad(), MoEObserver(model, on_route=lambda ev: counts.__setitem__(ev.layer.index, ev.logits.shape[0])) as obs:
        obs.attention_mask = mask
        model(x, attention_mask=mask)
    assert set(counts.values()) == {16}


def test_dense_linears():
    for arch in DENSE_ARCHS:
        model = make(arch)
        adapter = adapter_for(model)
        assert not adapter.is_moe and adapter.moe_layers() == []
        names = [d.name for d in adapter.dense_linears()]
        per_layer = 7 if arch != "opt" else 6  # q,k,v,o,gate,up,down | q,k,v,out,fc1,fc2
        assert len(names) == 2 * per_layer
        assert not any("embed" in n or "lm_head" in n for n in names)
        params = dict(model.named_modules())
        assert all(n in params for n in names)
        with pytest.raises(MumoeError, match="dense model"):
            moe_adapter_for(model)


def test_unsupported_architecture_lists_supported():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64))
    with pytest.raises(MumoeError) as e:
        adapter_for(model)
    msg = str(e.value)
    assert "gpt2" in msg and "\n" not in msg
    for arch in MOE_ARCHS + DENSE_ARCHS:
        assert arch in msg
