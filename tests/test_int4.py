"""Weight-only int4 decode copies (apply.int4): the group rule by hand, the kernel against the dequantized product
in float64, the routing of calls (decode steps read the copy, prefills the weight) and every family's tiny model
decoding through its int4 copies as the same model with its weights replaced by the dequantized values."""

import copy

import pytest
import torch
from torch import nn

from conftest import ids, make
from mumoe.apply import int4
from mumoe.apply.gemv import fast_decode, int4_experts, linear
from mumoe.apply.int8 import quantize_rows
from mumoe.compat import output_cache
from mumoe.models import adapter_for
from mumoe.models.tiny import TINY_CONFIGS


def test_quantize_groups_hand_worked():
    w = torch.tensor([[0.0, 1.5, 3.0, 0.75, 2.0, 2.0, 2.0, 2.0]])
    codes, scale, zero = int4.quantize_groups(w, group=4)
    # group 0: lo 0, hi 3 -> s = bf16(0.2) = 0.2001953125, z = 0 + 8 s = 1.6015625; codes round((w - z)/s) + 8:
    # 0 -> -8 + 8 = 0, 1.5 -> round(-0.507) + 8 = 7, 3 -> round(6.985) + 8 = 15, 0.75 -> round(-4.254) + 8 = 4
    # group 1: all 2.0 -> s = 1, z = 2 + 8 = 10, codes (2 - 10) / 1 + 8 = 0: exact
    assert codes.tolist() == [[0, 7, 15, 4, 0, 0, 0, 0]]
    assert scale.tolist() == [[0.2001953125, 1.0]] and zero.tolist() == [[1.6015625, 10.0]]
    back = int4.dequantize(codes, scale, zero)
    assert back[0, 4:].tolist() == [2.0] * 4
    assert (back - w).abs().max() <= 0.2001953125 / 2 + 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 5, 32])
def test_int4_weight_equals_the_dequantized_product(dtype, rows):
    g = torch.Generator().manual_seed(rows)
    w = (torch.randn(48, 96, generator=g) * 0.1).to(dtype)
    x = torch.randn(rows, 96, generator=g).to(dtype)
    q = int4.Int4Weight.of(w)
    got = q.matmul(x)
    want = x.to(torch.bfloat16).double() @ int4.dequantize(*int4.quantize_groups(w)).double().T  # [rows, 48]
    assert got.shape == (rows, 48) and got.dtype == dtype
    assert (got.double() - want).abs().max() <= 1e-2 * want.abs().max()
    plain = x.double() @ w.double().T  # the unquantized product is visibly farther: 4-bit rounding
    assert (plain - want).abs().max() > 3 * (got.double() - want).abs().max()


def test_fits_and_copies_follow_the_weight():
    assert int4.fits(32, 64) and not int4.fits(24, 64) and not int4.fits(32, 48) and not int4.fits(32, 16)
    w = nn.Parameter(torch.randn(32, 64))
    assert int4.make_copy(nn.Parameter(torch.randn(24, 64))) == 0
    assert int4.make_copy(w) == 32 * 32 + 2 * 2 * 2 * 32  # packed codes + bf16 (scale, zero) per group and row
    assert int4.int4_copy(w) is not None
    with torch.no_grad():
        w.mul_(2)  # modified in place: the copy no longer describes it
    assert int4.int4_copy(w) is None


def test_int8_rows_equal_the_dequantized_product():
    """The output head's copy: per-row int8 (K padded for the kernel), x in bf16."""
    g = torch.Generator().manual_seed(3)
    w, x = torch.randn(40, 72, generator=g), torch.randn(2, 72, generator=g)
    q, scale = quantize_rows(w)
    want = x.bfloat16().double() @ (q.double() * scale.double()[:, None]).T
    got = int4.Int8Rows.of(w).matmul(x)
    assert got.shape == (2, 40) and (got.double() - want).abs().max() <= 1e-2 * want.abs().max()
    assert int4.make_copy(w := nn.Parameter(w), bits=8) == 40 * 80 + 4 * 40  # K 72 -> 80 (a multiple of 16)


def test_linear_reads_the_copy_for_decode_steps_only():
    g = torch.Generator().manual_seed(0)
    w, b = nn.Parameter(torch.randn(32, 64, generator=g)), torch.randn(32, generator=g)
    int4.make_copy(w)
    deq = int4.dequantize(*int4.quantize_groups(w)).double()
    for rows in (1, int4.DECODE_ROWS):
        x = torch.randn(1, rows, 64, generator=g)
        want = x.bfloat16().double() @ deq.T + b.double()
        got = linear(x, w, b)
        assert got.shape == (1, rows, 32) and (got.double() - want).abs().max() <= 1e-2 * want.abs().max()
    prefill = torch.randn(int4.DECODE_ROWS + 1, 64, generator=g)
    assert torch.equal(linear(prefill, w, b), nn.functional.linear(prefill, w, b))  # the weight itself


def _dequantized_experts(layer):
    """The layer's gate_up / down replaced by their int4 values (what the copies encode), as new Parameters."""
    ex = layer.experts
    for name in ("gate_up_proj", "down_proj"):
        t = getattr(ex, name)
        deq = torch.stack([int4.dequantize(*int4.quantize_groups(m)) for m in t]).to(t.dtype)
        setattr(ex, name, nn.Parameter(deq))


@pytest.mark.parametrize("biases", [False, True])
@pytest.mark.parametrize("tokens", [1, 5])
def test_int4_experts_equal_a_float64_loop(biases, tokens):
    """Σ_j w_j · down_e(act(gate_up_e x)) by hand in float64 from the dequantized weights; a slot whose index is E
    (the skip sentinel) adds nothing."""
    model = make("qwen3_moe", moe_intermediate_size=32).eval()
    layer = adapter_for(model).moe_layers()[0]
    ex = layer.experts
    g = torch.Generator().manual_seed(tokens)
    E, two_i, H = ex.gate_up_proj.shape
    if biases:
        ex.gate_up_proj_bias = nn.Parameter(torch.randn(E, two_i, generator=g))
        ex.down_proj_bias = nn.Parameter(torch.randn(E, H, generator=g))
    gu4 = [int4.Int4Weight.of(m) for m in ex.gate_up_proj]
    dn4 = [int4.Int4Weight.of(m) for m in ex.down_proj]
    ref_layer = copy.deepcopy(layer)
    _dequantized_experts(ref_layer)
    h = torch.randn(tokens, H, generator=g)
    idx = torch.stack([torch.randperm(E, generator=g)[:3] for _ in range(tokens)])  # [T, 3]
    idx[0, 2] = E  # a skipped slot
    w = torch.rand(tokens, 3, generator=g)
    with torch.no_grad():
        got = int4_experts(layer, gu4, dn4, h, idx, w)
        want = torch.zeros(tokens, H, dtype=torch.float64)
        for t in range(tokens):
            for j in range(3):
                e = int(idx[t, j])
                if e < E:
                    want[t] += float(w[t, j]) * ref_layer.expert_forward(e, h[t : t + 1].bfloat16().float())[0].double()
    assert got.shape == (tokens, H)
    assert (got.double() - want).abs().max() <= 2e-2 * want.abs().max(), float((got.double() - want).abs().max())


def _int4_reference(model):
    """`model` with every weight fast_decode(int4_copies=True) copies replaced by its dequantized values (the
    output head: its per-row int8 values)."""
    ref = copy.deepcopy(model)
    adapter = adapter_for(ref)
    routers = {id(m) for layer in adapter.moe_layers() for m in layer.router.modules()}
    head = ref.get_output_embeddings()
    for m in ref.modules():
        if m is head:
            q, scale = quantize_rows(m.weight)
            m.weight = nn.Parameter((q.float() * scale[:, None]).to(m.weight.dtype))
        elif type(m) is nn.Linear and id(m) not in routers and int4.fits(*m.weight.shape):
            m.weight = nn.Parameter(int4.dequantize(*int4.quantize_groups(m.weight)).to(m.weight.dtype))
    for layer in adapter.moe_layers():
        ex = layer.experts
        if (getattr(ex, "gate_up_proj", None) is not None and not getattr(ex, "is_transposed", False)
                and getattr(ex, "has_gate", True) and not getattr(ex, "has_post_expert_norm", False)
                and int4.fits(*ex.gate_up_proj.shape[-2:]) and int4.fits(*ex.down_proj.shape[-2:])):
            _dequantized_experts(layer)
    return ref


WIDE = {"qwen3_moe": dict(moe_intermediate_size=32), "mixtral": dict(intermediate_size=32),
        "llama4_text": dict(intermediate_size=32, hidden_size=64), "qwen2_moe": dict(moe_intermediate_size=32),
        "deepseek_v3": dict(moe_intermediate_size=32), "llama": {}}


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS) + [f"{f}+wide" for f in sorted(WIDE)])
def test_every_family_decodes_from_its_int4_copies(family, monkeypatch):
    """A prompt prefilled from the weights, then one decode step from the int4 copies (every call of the step: some
    families run a linear over the whole cache — MLA latents — so the row limit is lifted for the step): the same
    logits as the model whose copied weights are replaced by their dequantized values, stepped from the same cache,
    up to bf16 activations — and visibly not the original model's ("+wide": experts wide enough for the kernel,
    which the default tiny experts, 16 inputs to down, are not)."""
    name, wide = family.removesuffix("+wide"), family.endswith("+wide")
    model = make(name, **(WIDE[name] if wide else {})).eval()
    x, tokens = ids(1, int4.DECODE_ROWS + 3), ids(1, 3, seed=1)[0].tolist()
    with torch.no_grad():
        caches = [[output_cache(model(input_ids=x, use_cache=True)) for _ in range(3)] for _ in tokens]
        ref = _int4_reference(model)
        fast_decode(model, int4_copies=True)
        monkeypatch.setattr(int4, "DECODE_ROWS", 10**9)
        steps = [[m(input_ids=torch.tensor([[t]]), past_key_values=c).logits[0, -1].double()
                  for m, c in zip((model, ref), cs[:2])] for t, cs in zip(tokens, caches)]
        got, want = torch.stack([s[0] for s in steps]), torch.stack([s[1] for s in steps])
        monkeypatch.setattr(int4, "DECODE_ROWS", 0)  # every call on the weights: the original model
        plain = torch.stack([model(input_ids=torch.tensor([[t]]), past_key_values=cs[2]).logits[0, -1].double()
                             for t, cs in zip(tokens, caches)])
    scale = want.abs().max()
    assert (got - want).abs().max() <= 2e-2 * scale, float((got - want).abs().max() / scale)
    assert sum(int4.int4_copy(p) is not None for p in model.parameters()) > 0
    head = model.get_output_embeddings()
    assert isinstance(int4.int4_copy(head.weight)[0], int4.Int8Rows)
    if wide:
        experts = [l.experts for l in adapter_for(model).moe_layers()]
        assert all(int4.int4_copy(e.gate_up_proj) is not None for e in experts)
    assert (plain - got).abs().max() > (got - want).abs().max()  # the copies' rounding, not the kernel's, shows


def test_a_prefill_reads_the_experts_weights():
    """More than DECODE_ROWS tokens: the experts' own forward on the original weights, bit for bit."""
    model = make("qwen3_moe", moe_intermediate_size=32).eval()
    x = ids(1, int4.DECODE_ROWS + 1)
    with torch.no_grad():
        before = model(input_ids=x).logits
        fast_decode(model, int4_copies=True)
        assert int4.int4_copy(adapter_for(model).moe_layers()[0].experts.gate_up_proj) is not None
        after = model(input_ids=x).logits
        step = model(input_ids=x[:, :1]).logits  # one token: from the copies
    assert torch.equal(before, after)
    assert not torch.allclose(step[0, 0], before[0, 0], atol=1e-4)


def test_a_swapped_storage_hides_the_copy():
    """μ-MoE's row masking swaps a masked copy in as the weight's `.data` (the version unchanged): the int4 copy no
    longer describes the weight and is not read; with the original storage back, it is again."""
    from mumoe.apply.masking import swap_masked, unswap

    w = nn.Parameter(torch.randn(32, 64, generator=torch.Generator().manual_seed(5)))
    int4.make_copy(w)
    mask = (torch.arange(64) % 2).float().expand(32, 64)
    saved = swap_masked({"w": w}, {"w": mask})
    assert w._version == 0 and int4.int4_copy(w) is None
    x = torch.randn(1, 64)
    assert torch.equal(linear(x, w), torch.nn.functional.linear(x, w))  # the masked weight, not the copy
    unswap({"w": w}, saved)
    assert int4.int4_copy(w) is not None


def test_int4_row_requests_decode_their_masks():
    """`mumoe serve --int4` with a μ-MoE row request: the decode reads the masked weights (before the fix it read
    the int4 copies of the unmasked ones and answered the dense text)."""
    from conftest import char_tokenizer
    from mumoe.serve.engine import Engine, Pruning, Sampling

    model = make("qwen3_moe", moe_intermediate_size=32).eval()
    engine = Engine(model, char_tokenizer(), "tiny", int4=True)
    ids_ = engine.encode("row masks and int4 copies")
    sampling = Sampling(max_tokens=16, temperature=0.0, logprobs=0)
    outs = {}
    for name, pruning in (("dense", Pruning()), ("row", Pruning(active=0.2, structure="row"))):
        got = []
        engine.run(ids_, sampling, pruning, lambda text, entries: got.append(entries))
        outs[name] = [e["logprob"] for es in got for e in es]
    assert outs["dense"] != outs["row"]
    protocol = engine.protocol(Pruning(active=0.2, structure="row"))
    prefilled = protocol.prefill(model, torch.tensor([ids_]))
    q = model.model.layers[0].self_attn.q_proj.weight
    assert int4.int4_copy(q) is not None
    with prefilled.applied():
        assert int4.int4_copy(q) is None
    assert int4.int4_copy(q) is not None
