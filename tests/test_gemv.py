"""One-token decode steps by torch.mv for half-precision CPU weights (`apply.gemv`): the same products as
F.linear to rounding, only one-token calls taken, and a decode through `fast_decode` as close to an fp32 reference
as transformers' own bf16 decode."""

import pytest
import torch
from torch import nn

from conftest import ids, make
from mumoe.apply.gemv import fast_decode, linear
from mumoe.compat import output_cache
from mumoe.models import adapter_for
from mumoe.models.tiny import TINY_CONFIGS


@pytest.mark.parametrize("shape", [(7,), (1, 7), (1, 1, 7)])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_is_f_linear_to_rounding(shape, bias):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(5, 7, generator=g)
    b = torch.randn(5, generator=g) if bias else None
    x = torch.randn(*shape, generator=g)
    ref = (x.double() @ w.double().T + (0 if b is None else b.double()))  # [.., 5], by hand in float64
    assert torch.equal(linear(x, w, b), nn.functional.linear(x, w, b))  # fp32: F.linear itself
    for dt in (torch.bfloat16, torch.float16):
        got = linear(x.to(dt), w.to(dt), None if b is None else b.to(dt))
        assert got.shape == ref.shape and got.dtype == dt
        base = nn.functional.linear(x.to(dt), w.to(dt), None if b is None else b.to(dt))
        assert (got.double() - ref).abs().max() <= 2 * (base.double() - ref).abs().max() + 0.02
    several = torch.randn(3, 7, generator=g).bfloat16()  # a prefill's rows: F.linear, bit for bit
    assert torch.equal(linear(several, w.bfloat16()), nn.functional.linear(several, w.bfloat16()))


def _decode_logits(model, x, tokens):
    """One-token steps after a prefill of x [1, L], fed `tokens` (the same for every model compared): the logits
    [len(tokens), V] of each step, in float64."""
    out = model(input_ids=x, use_cache=True)
    cache, rows = output_cache(out), []
    for t in tokens:
        out = model(input_ids=torch.tensor([[t]]), past_key_values=cache, use_cache=True)
        cache = output_cache(out)
        rows.append(out.logits[0, -1].double())
    return torch.stack(rows)


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3", "llama"])
def test_fast_decode_is_as_close_to_fp32_as_transformers_bf16(arch, monkeypatch):
    ref_model = make(arch).eval()
    model = make(arch).eval().to(torch.bfloat16)
    x, tokens = ids(1, 12), ids(1, 6, seed=1)[0].tolist()
    with torch.no_grad():
        plain = _decode_logits(model, x, tokens)
        linears = sum(isinstance(m, nn.Linear) for m in model.modules())
        adapter = adapter_for(model)
        layers = len(adapter.moe_layers()) if adapter.is_moe else 0
        assert fast_decode(model) == linears + layers and fast_decode(model) == 0  # idempotent
        calls = []
        real_mv = torch.mv
        monkeypatch.setattr(torch, "mv", lambda *a: calls.append(1) or real_mv(*a))
        fast = _decode_logits(model, x, tokens)
        monkeypatch.setattr(torch, "mv", real_mv)
        assert len(calls) >= len(tokens) * linears  # every step went through torch.mv
        ref = _decode_logits(ref_model, x, tokens)
    err_plain, err_fast = (plain - ref).abs().max(), (fast - ref).abs().max()
    assert err_fast <= 2 * err_plain + 1e-3, (float(err_fast), float(err_plain))  # bf16 rounding, no more


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3", "llama"])
def test_fp32_runs_only_the_picked_experts_and_leaves_linears_alone(arch, monkeypatch):
    """fp32: nn.Linear keeps F.linear; the fused experts' one-token step runs one gate_up product per picked expert
    (transformers' CPU grouped_mm runs one for every expert) and decodes as transformers' fp32 does, to rounding."""
    ref_model, model = make(arch).eval(), make(arch).eval()
    adapter = adapter_for(model)
    layers = adapter.moe_layers() if adapter.is_moe else []
    assert fast_decode(model) == len(layers)
    assert not any("forward" in m.__dict__ for m in model.modules() if isinstance(m, nn.Linear))
    x, tokens = ids(1, 12), ids(1, 6, seed=1)[0].tolist()
    with torch.no_grad():
        ref = _decode_logits(ref_model, x, tokens)
        calls = []
        real_mv = torch.mv
        monkeypatch.setattr(torch, "mv", lambda *a: calls.append(1) or real_mv(*a))
        fast = _decode_logits(model, x, tokens)
    assert len(calls) == len(tokens) * sum(layer.top_k for layer in layers)  # the picked experts, nothing else
    assert (fast - ref).abs().max() <= 1e-4 * ref.abs().max(), float((fast - ref).abs().max())


def test_a_skipped_slot_is_not_run():
    """testtime.skip hands a skipped slot as index E with weight 0: the one-token path leaves it out."""
    model = make("qwen3_moe").eval().to(torch.bfloat16)
    fast_decode(model)
    layer = adapter_for(model).moe_layers()[0]
    E = layer.experts.gate_up_proj.shape[0]
    g = torch.Generator().manual_seed(1)
    h = torch.randn(1, layer.experts.gate_up_proj.shape[2], generator=g).bfloat16()  # [1, H]
    idx = torch.tensor([[3, 1]])
    w = torch.tensor([[0.6, 0.4]]).bfloat16()
    with torch.no_grad():
        base = layer.experts(h, idx, w)
        skipped = layer.experts(h, torch.tensor([[3, 1, E]]), torch.cat([w, torch.zeros(1, 1).bfloat16()], 1))
        by_hand = sum(float(w[0, j]) * layer.expert_output(int(e), layer.expert_hidden(int(e), h)).double() for j, e in enumerate(idx[0]))
    assert torch.equal(base, skipped)
    assert (base.double() - by_hand).abs().max() < 0.05 * by_hand.abs().max()


@pytest.mark.parametrize("biases", [False, True])
def test_one_token_experts_equal_a_float64_loop(biases):
    """The one-token step (gate_up by mv, down and the combine by addmv) against Σ_j w_j · down_e(act(gate_up_e x)),
    computed by hand in float64 from the same bf16 weights; with the experts' biases where a family has them."""
    model = make("qwen3_moe").eval().to(torch.bfloat16)
    layer = adapter_for(model).moe_layers()[0]
    ex = layer.experts
    g = torch.Generator().manual_seed(2)
    E, two_i, H = ex.gate_up_proj.shape
    if biases:
        ex.gate_up_proj_bias = nn.Parameter(torch.randn(E, two_i, generator=g).bfloat16())
        ex.down_proj_bias = nn.Parameter(torch.randn(E, H, generator=g).bfloat16())
    fast_decode(model)
    h = torch.randn(1, H, generator=g).bfloat16()  # [1, H]
    idx = torch.tensor([[5, 0, 2]])  # not ascending: the step sorts them
    w = torch.tensor([[0.5, 0.3, 0.2]]).bfloat16()
    with torch.no_grad():
        got = ex(h, idx, w)  # [1, H]
    ref = torch.zeros(H, dtype=torch.float64)
    x = h[0].double()
    for j, e in enumerate(idx[0].tolist()):
        gu = ex.gate_up_proj[e].double() @ x + (ex.gate_up_proj_bias[e].double() if biases else 0)
        gate, up = gu.chunk(2)
        y = ex.down_proj[e].double() @ (torch.nn.functional.silu(gate) * up)
        ref += float(w[0, j]) * (y + (ex.down_proj_bias[e].double() if biases else 0))
    assert got.shape == (1, H) and got.dtype == torch.bfloat16
    # bf16 rounding of gate_up and of the hidden h (each ≤ 2^-8 relative), nothing more
    assert (got[0].double() - ref).abs().max() <= 0.03 * ref.abs().max(), float((got[0].double() - ref).abs().max())
    assert not torch.allclose(got[0].double(), ref * 0.9, atol=0, rtol=0.02)  # (the bound can fail: a wrong weight)


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_every_family_decodes_through_fast_decode_as_without(family):
    """`mumoe serve` and `mumoe generate` install fast_decode on any model: every family's tiny model decodes
    through it as through transformers' own forwards — fp32 to 1e-4 of the logits' scale, bf16 as close to the fp32
    decode as transformers' bf16 is. (Caught: Llama 4's weights scale the experts' input, PhiMoE's router and
    DeepSeek-V4's projections are nn.Linear subclasses with forwards of their own.)"""
    x, tokens = ids(1, 10), ids(1, 4, seed=1)[0].tolist()
    with torch.no_grad():
        ref = _decode_logits(make(family).eval(), x, tokens)
        fast32 = make(family).eval()
        fast_decode(fast32)
        got32 = _decode_logits(fast32, x, tokens)
        plain16 = _decode_logits(make(family).eval().to(torch.bfloat16), x, tokens)
        fast16 = make(family).eval().to(torch.bfloat16)
        fast_decode(fast16)
        got16 = _decode_logits(fast16, x, tokens)
    scale = ref.abs().max()
    assert (got32 - ref).abs().max() <= 1e-4 * scale, float((got32 - ref).abs().max() / scale)
    err_plain, err_fast = (plain16 - ref).abs().max(), (got16 - ref).abs().max()
    assert err_fast <= 2 * err_plain + 1e-3 * scale, (float(err_fast), float(err_plain))


def test_a_deep_copy_decodes_with_its_own_experts():
    """`mumoe compare` prunes deep copies of one model: a copy made after fast_decode must run its own experts (a
    forward that closed over the original's layer ran the original's weights, one token or many)."""
    import copy

    model = make("qwen3_moe").eval()
    fast_decode(model)
    twin = copy.deepcopy(model)
    fresh = make("qwen3_moe").eval()  # the reference: the same change, no fast_decode, no copy
    with torch.no_grad():
        for m in (twin, fresh):
            for layer in adapter_for(m).moe_layers():
                layer.experts.gate_up_proj.mul_(0.5)  # (the original untouched)
        x = ids(1, 6)
        for n in (1, 6):  # the one-token path, then the general one
            want = fresh(input_ids=x[:, :n]).logits
            assert torch.allclose(twin(input_ids=x[:, :n]).logits, want, atol=1e-5)
            assert not torch.allclose(model(input_ids=x[:, :n]).logits, want, atol=1e-3)
