"""The lean one-token decode step (apply.step): bit-identical to transformers' forward on every supported family
(fp32, bf16, with int4 copies), used only where it is exact (an intact model, a plain one-sequence cache), and the
server's decode loops running it to the same text."""

import pytest
import torch
from torch import nn
from transformers import DynamicCache

from conftest import char_tokenizer, ids, make
from mumoe.apply import int4, step
from mumoe.apply.gemv import fast_decode
from mumoe.compat import output_cache
from mumoe.models import adapter_for
from mumoe.testtime.kvcache import grow_in_place

def _model(family: str, dtype: torch.dtype, wide: bool, attention: str = "eager") -> nn.Module:
    extra = {"qwen3_moe": dict(moe_intermediate_size=32), "mixtral": dict(intermediate_size=32)}.get(family, {})
    model = make(family, **({"intermediate_size": 64, **extra} if wide else {}))
    model.set_attn_implementation(attention)
    return model.to(dtype).eval()


def _steps(model: nn.Module, x: torch.Tensor, tokens: list[int], lean: bool) -> tuple[torch.Tensor, DynamicCache]:
    """Prefill x [1, L] by the model's forward, then one step per token (the lean step, or the forward):
    -> logits [n, V], the cache."""
    with torch.no_grad():
        cache = output_cache(model(input_ids=x, use_cache=True))
        grow_in_place(cache)
        out = []
        for t in tokens:
            feed = torch.tensor([[t]])
            if lean:
                s = step.lean_step(model, cache)
                assert s is not None
                out.append(s.step(feed, cache)[0, -1])
            else:
                out.append(model(input_ids=feed, past_key_values=cache, use_cache=True).logits[0, -1])
    return torch.stack(out), cache


@pytest.mark.parametrize("int4_copies", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3_moe", "mixtral"])
def test_the_lean_step_equals_the_forward_bit_for_bit(family, attention, dtype, int4_copies):
    """Five decode steps after a 9-token prefill: the same logits and the same cache, bit for bit, as transformers'
    forward of the same model (its attention eager or SDPA; int4: the experts and attention wide enough for the
    kernel, q/k/v fused)."""
    model = _model(family, dtype, wide=int4_copies, attention=attention)
    fast_decode(model, int4_copies=int4_copies)
    lean = step.build(model)
    assert lean is not None
    if int4_copies:
        assert all(layer.qkv4 is not None for layer in lean.layers)
        if family in ("llama", "qwen2"):
            assert all(layer.gate_up4 is not None for layer in lean.layers)
    x, tokens = ids(1, 9), ids(1, 5, seed=1)[0].tolist()
    want, cache_want = _steps(model, x, tokens, lean=False)
    got, cache_got = _steps(model, x, tokens, lean=True)
    assert got.dtype == dtype and got.shape == (5, 128)
    assert torch.equal(got, want)
    for a, b in zip(cache_got.layers, cache_want.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


def test_fused_copies_are_the_separate_ones():
    """q, k, v's int4 copies stacked: the stacked product's rows are each copy's product, and each weight's copy
    is now a view of the stacked codes that multiplies as before; a modified weight has no copy to fuse."""
    g = torch.Generator().manual_seed(0)
    ws = [nn.Parameter(torch.randn(n, 64, generator=g)) for n in (32, 16, 16)]
    for w in ws:
        int4.make_copy(w)
    x = torch.randn(1, 64, generator=g).bfloat16()
    before = [int4.int4_copy(w)[0].matmul(x) for w in ws]
    fused = int4.fuse(ws)
    assert fused.n_out == 64 and fused.packed.shape[0] == 64
    assert torch.equal(fused.matmul(x), torch.cat(before, dim=-1))
    for w, b in zip(ws, before):
        assert torch.equal(int4.int4_copy(w)[0].matmul(x), b)
    big = [nn.Parameter(torch.randn(n, 64, generator=g)) for n in (128, 64, 64)]  # rows in whole blocks of 64
    for w in big:
        int4.make_copy(w)
    fused = int4.fuse(big)
    for w in big:  # each copy now a view of the stacked codes
        assert int4.int4_copy(w)[0].packed.untyped_storage().data_ptr() == fused.packed.untyped_storage().data_ptr()
    assert torch.equal(fused.matmul(x), torch.cat([int4.int4_copy(w)[0].matmul(x) for w in big], dim=-1))
    with torch.no_grad():
        ws[1].add_(1)
    assert int4.fuse(ws) is None
    assert int4.fuse([ws[0], nn.Parameter(torch.randn(16, 96, generator=g))]) is None  # no copy / other inputs


def test_unsupported_families_keep_the_forward():
    """Families outside the Llama layout (shared experts, other norms or attention) get no lean step."""
    for family in ("qwen2_moe", "olmoe", "deepseek_v3", "gpt_oss"):
        model = make(family).eval()
        fast_decode(model)
        assert step.build(model) is None
    qwen2 = make("qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=0).eval()
    assert qwen2.model.layers[0].self_attn.sliding_window == 4  # a sliding window: the step would attend too far
    assert step.build(qwen2) is None
    flex = make("llama").eval()
    flex.config._attn_implementation = "flex_attention"  # an attention function the step does not call
    assert step.build(flex) is None


def test_the_step_runs_only_on_an_intact_model_and_a_plain_cache():
    """A hook on a module the step bypasses, a swapped forward or a replaced submodule there, another weight, a
    weight changed in place, a batch of two or a cache layer of another kind: no lean step (transformers' forward
    instead); undone, the step is back. A projection replaced, swapped or hooked is called as a module instead of
    read (μ-MoE's compaction), with the same logits as the forward."""
    model = make("qwen3_moe").eval()
    fast_decode(model)
    lean = step.build(model)
    x, tokens = ids(1, 6), ids(1, 3, seed=4)[0].tolist()
    with torch.no_grad():
        cache = output_cache(model(input_ids=x, use_cache=True))
        two = output_cache(model(input_ids=ids(2, 6), use_cache=True))
    assert step.lean_step(model, cache) is lean
    assert step.lean_step(model, two) is None
    attn = model.model.layers[1].self_attn
    handle = attn.register_forward_hook(lambda *a: None)
    assert step.lean_step(model, cache) is None
    handle.remove()
    assert step.lean_step(model, cache) is lean
    attn.forward = attn.forward  # an instance forward on the attention: bypassing it would skip it
    assert step.lean_step(model, cache) is None
    del attn.forward
    norm = attn.q_norm
    attn.q_norm = type(norm)(norm.weight.shape[0])  # a submodule put in a bypassed module's place
    assert step.lean_step(model, cache) is None
    attn.q_norm = norm
    saved = model.model.norm.weight
    model.model.norm.weight = nn.Parameter(saved.detach().clone())
    assert step.lean_step(model, cache) is None
    model.model.norm.weight = saved
    assert step.lean_step(model, cache) is lean
    with torch.no_grad():
        model.model.norm.weight.mul_(1.0)  # in place, even to the same values: the step no longer trusts it
    assert step.lean_step(model, cache) is None

    model = make("qwen3_moe").eval()  # projections: called as modules where they are not as recorded
    fast_decode(model)
    lean = step.build(model)
    attn = model.model.layers[1].self_attn
    proj = attn.k_proj
    attn.k_proj = nn.Linear(proj.in_features, proj.out_features, bias=False)
    attn.o_proj.forward = lambda h: nn.functional.linear(h, attn.o_proj.weight) * 2
    hooked = []
    handle = attn.v_proj.register_forward_hook(lambda *a: hooked.append(1))
    want, _ = _steps(model, x, tokens, lean=False)
    got, _ = _steps(model, x, tokens, lean=True)
    assert torch.equal(got, want) and len(hooked) == 2 * (1 + len(tokens))  # (a prefill and the steps, twice)
    layer = lean.layers[1]
    assert not layer.direct["k_proj"] and not layer.direct["o_proj"] and not layer.direct["v_proj"]
    assert layer.direct["q_proj"] and lean.layers[0].direct["k_proj"]
    handle.remove()

    other = make("qwen3_moe").eval()
    fast_decode(other)
    step.build(other)
    from transformers.cache_utils import DynamicSlidingWindowLayer

    with torch.no_grad():
        c2 = output_cache(other(input_ids=ids(1, 6), use_cache=True))
    c2.layers[0].__class__ = DynamicSlidingWindowLayer
    assert step.lean_step(other, c2) is None


def test_router_hooks_still_act_under_the_lean_step():
    """The MoE block's router and experts are called as modules: a per-prompt expert slice (router rows and a
    hook mapping its picks back) decodes the same through the lean step as through the forward."""
    from mumoe.testtime.experts import experts_kept

    model = _model("qwen3_moe", torch.float32, wide=False)
    fast_decode(model)
    step.build(model)
    x, tokens = ids(1, 9), ids(1, 4, seed=2)[0].tolist()
    keep = {layer.index: [0, 2, 5, 7] for layer in adapter_for(model).moe_layers()}
    with experts_kept(model, keep):
        want, _ = _steps(model, x, tokens, lean=False)
        got, _ = _steps(model, x, tokens, lean=True)
    free, _ = _steps(model, x, tokens, lean=False)
    assert torch.equal(got, want)
    assert not torch.equal(got, free)  # the slice acted


def _engine(int4_copies: bool = False):
    from mumoe.serve.engine import Engine

    model = make("qwen3_moe", moe_intermediate_size=32).eval()
    return Engine(model, char_tokenizer(), "tiny", int4=int4_copies)


@pytest.mark.parametrize("int4_copies", [False, True])
def test_the_engine_decodes_with_the_lean_step_to_the_same_text(int4_copies, monkeypatch):
    """Engine.run (batch 1) and a one-row DecodeBatch: greedy text and per-token logprobs equal with and without the
    lean step, which ran (counted) — and a two-row batch keeps the forward."""
    from mumoe.serve.batch import DecodeBatch, begin
    from mumoe.serve.engine import Pruning, Sampling

    engine = _engine(int4_copies)
    calls = []
    real = step.LeanStep.step

    def counted(self, token, cache):
        calls.append(1)
        return real(self, token, cache)

    sampling = Sampling(max_tokens=12, temperature=0.0, logprobs=0)
    ids_ = engine.encode("hello lean step")

    def run_alone():
        texts = []
        engine.run(ids_, sampling, Pruning(), lambda text, entries: texts.append((text, entries)))
        return texts

    def run_batch(n):
        batch, texts = DecodeBatch(engine.device), [[] for _ in range(n)]
        for i in range(n):
            row, cache, model = begin(engine, ids_, sampling, Pruning(), lambda t, e, i=i: texts[i].append((t, e)),
                                      lambda: None)
            batch.join(row, cache, model)
        while len(batch):
            batch.advance()
        return texts

    monkeypatch.setattr(step.LeanStep, "step", counted)
    lean_alone, lean_batch = run_alone(), run_batch(1)
    assert len(calls) >= 2 * 10
    calls.clear()
    pair = run_batch(2)
    assert not calls
    step._STEPS.pop(engine.model)
    plain_alone, plain_batch = run_alone(), run_batch(1)
    assert lean_alone == plain_alone and lean_batch == plain_batch
    assert "".join(t for t, _ in lean_alone) == "".join(t for t, _ in pair[0])  # (greedy: the same text)
    assert not calls


def test_a_later_fast_decode_rebuilds_the_step(monkeypatch):
    """One model served first without and then with int4 copies (as benchmarks/peer_decode.py's engines share it):
    the second build replaces the kept step (the forwards changed, the copies are there to fuse), and with the
    copies switched off (`int4.DECODE_ROWS = 0`) the step reads the weights, as the forward then does."""
    model = _model("llama", torch.float32, wide=True)
    fast_decode(model)
    first = step.build(model)
    assert first.fused is False and step.build(model) is first
    fast_decode(model, int4_copies=True)
    second = step.build(model)
    assert second is not first and second.fused and step.build(model) is second
    x, tokens = ids(1, 9), ids(1, 3, seed=1)[0].tolist()
    for rows in (int4.DECODE_ROWS, 0):
        monkeypatch.setattr(int4, "DECODE_ROWS", rows)
        want, _ = _steps(model, x, tokens, lean=False)
        got, _ = _steps(model, x, tokens, lean=True)
        assert torch.equal(got, want)
    monkeypatch.undo()
    assert not torch.equal(_steps(model, x, tokens, lean=True)[0], got)  # the copies were read before


@pytest.mark.parametrize("family", ["qwen3_moe", "llama"])
@pytest.mark.parametrize("int4_copies", [False, True])
def test_mu_moe_requests_decode_through_the_step_bit_for_bit(family, int4_copies):
    """μ-MoE requests (row masks swapped in as the weights' data; columns compacted into `CompactLinear`s, the
    experts compacted as tokens reach them; int8 columns) decode through the lean step: inside each request's
    applied state the step's logits equal the forward's bit for bit, the compacted projections are called as
    modules and the masked ones read without their int4 copies; the engine's greedy text and logprobs are the same
    with and without the step."""
    from mumoe.serve.engine import Engine, Pruning, Sampling

    model = _model(family, torch.float32, wide=True)
    engine = Engine(model, char_tokenizer(), "tiny", int4=int4_copies)
    lean = step._STEPS.get(model)
    assert lean is not None
    prompt = engine.encode("per-prompt pruning, decoded lean")
    tokens = ids(1, 4, seed=3)[0].tolist()
    for structure in ("row", "column"):
        prefilled = engine.protocol(Pruning(active=0.5, structure=structure)).prefill(model, torch.tensor([prompt]))
        with prefilled.applied():
            x = torch.tensor([prompt])
            want, _ = _steps(model, x, tokens, lean=False)
            got, _ = _steps(model, x, tokens, lean=True)
            assert torch.equal(got, want), structure
            layer = lean.layers[0]
            compacted = type(layer.attn.q_proj).__name__ == "CompactLinear"
            assert compacted == (structure == "column") and layer.direct["q_proj"] == (not compacted)
            assert not layer.fused_qkv  # (row: the masked weights; column: the compacted modules)
    sampling = Sampling(max_tokens=10, temperature=0.0, logprobs=0)
    requests = [Pruning(active=0.5, structure="row"), Pruning(active=0.5, structure="column")]

    def answers():
        out = []
        for pruning in requests:
            got = []
            engine.run(prompt, sampling, pruning, lambda text, entries: got.append((text, entries)))
            out.append(got)
        return out

    with_step = answers()
    step._STEPS.pop(model)
    assert with_step == answers()
    assert with_step[0] != with_step[1]


def test_after_a_pruned_request_the_step_is_as_built():
    """Once a μ-MoE request is undone, every projection is the recorded module again and the step runs."""
    from mumoe.serve.engine import Pruning, Sampling

    engine = _engine(int4_copies=True)
    model = engine.model
    lean = step._STEPS.get(model)
    prompt = engine.encode("undone")
    for structure in ("row", "column"):
        engine.run(prompt, Sampling(max_tokens=3, temperature=0.0), Pruning(active=0.5, structure=structure),
                   lambda t, e: None)
        assert lean.intact() and lean.as_built()
        with torch.no_grad():
            cache = output_cache(model(input_ids=torch.tensor([prompt]), use_cache=True))
        assert step.lean_step(model, cache) is lean
        assert all(layer.fused_qkv for layer in lean.layers)
