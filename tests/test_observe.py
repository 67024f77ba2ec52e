"""The observation runner: one pass feeds every method exactly as separate passes do; the model is untouched."""


import pytest
import torch

from conftest import SAMPLE_TEXT, ids, make
import mumoe
from mumoe import MumoeError
from mumoe.criteria import score_methods
from mumoe.models import moe_adapter_for
from mumoe.observe import ExpertStats, Observation, Routed, run
from mumoe.observe.collectors import Collector

METHODS = ["reap", "ean", "frequency", "peu", "easy-ep", "heapr", "heapr-token", "atom-act"]


def test_one_pass_equals_separate_passes_and_runs_once(moe_arch):
    model = make(moe_arch)
    calib = ids(6, 12)
    calls = []
    h = model.get_input_embeddings().register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    together = score_methods(model, METHODS, calib, batch_size=4)
    assert calls == [4, 2]  # ONE pass: each window through the model once (forward + backward for HEAPr)
    calls.clear()
    for name in METHODS:
        alone = score_methods(model, [name], calib, batch_size=4)[name]
        assert all(torch.equal(a, b) for a, b in zip(alone, together[name])), name
    h.remove()
    assert len(calls) == 2 * len(METHODS)


def test_observation_leaves_the_model_as_it_was(moe_arch):
    """The observing experts forward computes what the model computes; on exit the model is unchanged."""
    model = make(moe_arch)
    x = ids(2, 10)
    with torch.no_grad():
        plain = model(x).logits
    seen = []

    class Grab(Collector):
        needs_experts = True

        def on_routed(self, r: Routed) -> None:
            seen.append(r)

    with torch.no_grad(), Observation(model, [Grab()]):
        observed = model(x).logits
    torch.testing.assert_close(observed, plain, rtol=1e-5, atol=1e-6)
    layers = moe_adapter_for(model).moe_layers()
    assert all("forward" not in layer.experts.__dict__ for layer in layers)
    for r in seen:  # the dispatch: sorted by expert, every (token, slot) once, outputs = the expert function
        T, k = r.route.indices.shape
        assert len(r.expert) == T * k and torch.equal(r.expert, r.expert.sort().values)
        assert torch.equal(r.route.indices[r.token, r.slot], r.expert)
        for e, a, b in r.segments():
            torch.testing.assert_close(r.f[a:b], r.layer.expert_forward(e, r.route.hidden[r.token[a:b]]))


def test_padding_never_reaches_the_collectors(moe_arch):
    model = make(moe_arch)
    x = ids(2, 10)
    mask = torch.ones_like(x)
    mask[1, :4] = 0
    counts = []

    class Count(Collector):
        needs_experts = True

        def on_routed(self, r):
            counts.append((len(r.route.hidden), len(r.expert), r.layer.top_k))

    run(model, x, [Count()], attention_mask=mask)
    assert counts and all(t == 16 and s == 16 * k for t, s, k in counts)


def test_easy_ep_normalizes_each_source_then_averages(moe_arch):
    """Several calibration sources: each source's EASY-EP scores divided by their sum, averaged over sources
    (as the EASY-EP authors mix domains) — equal to scoring each source alone and mixing by hand."""
    model = make(moe_arch)
    a, b = ids(3, 12, seed=1), ids(2, 12, seed=2, vocab=40)
    layers = moe_adapter_for(model).moe_layers()
    groups = torch.tensor([0, 0, 0, 1, 1])
    mixed = score_methods(model, ["easy-ep"], torch.cat([a, b]), groups, batch_size=2)["easy-ep"]
    alone = [score_methods(model, ["easy-ep"], w)["easy-ep"] for w in (a, b)]
    for i in range(len(layers)):
        want = sum(s[i] / s[i].sum() for s in alone) / 2
        torch.testing.assert_close(mixed[i], want, rtol=1e-6, atol=1e-9)  # batches differ: float rounding
    pooled = score_methods(model, ["easy-ep"], torch.cat([a, b]))["easy-ep"]  # one source: the raw sums
    assert not torch.allclose(pooled[0], mixed[0])


def test_score_of_weight_methods():
    """mumoe.score for wanda / magnitude: |W|·‖X‖ and |W| per prunable weight (an independent computation)."""
    model = make("llama")
    calib = ids(2, 8)
    wanda = mumoe.score(model, "wanda", calib)
    xs = []
    q = model.model.layers[0].self_attn.q_proj
    h = q.register_forward_pre_hook(lambda m, a: xs.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        model(calib)
    h.remove()
    norm = torch.cat(xs).double().pow(2).sum(0).sqrt()
    torch.testing.assert_close(wanda["model.layers.0.self_attn.q_proj.weight"], q.weight.double().abs() * norm,
                               rtol=1e-6, atol=1e-9)
    mag = mumoe.score(model, "magnitude")
    assert torch.equal(mag["model.layers.0.mlp.down_proj.weight"], model.model.layers[0].mlp.down_proj.weight.double().abs())
    with pytest.raises(MumoeError, match="dense model"):
        mumoe.score(model, "reap", calib)


def test_empty_calibration_is_refused():
    model = make("qwen3_moe")
    with pytest.raises(MumoeError, match="no tokens"):
        mumoe.prune(model, "reap", 0.5, calib=torch.zeros(0, 8, dtype=torch.long))
    with pytest.raises(MumoeError, match="no calibration tokens"):
        run(model, torch.zeros(0, 8, dtype=torch.long), [ExpertStats(moe_adapter_for(model).moe_layers())])


def test_prune_accepts_a_recipe_and_records_it(tok):
    model = make("qwen3_moe")
    recipe = mumoe.Recipe.build("reap", 0.5, calib="text", nsamples=2, seqlen=16)  # as the API records raw text
    with pytest.raises(MumoeError, match="pass them again"):
        mumoe.prune(model, recipe, tokenizer=tok)
    r1 = mumoe.prune(make("qwen3_moe"), "reap", 0.5, calib=SAMPLE_TEXT, tokenizer=tok, nsamples=2, seqlen=16)
    r2 = mumoe.prune(make("qwen3_moe"), mumoe.Recipe.from_dict(r1.recipe), calib=SAMPLE_TEXT, tokenizer=tok)
    assert r1.layers == r2.layers and r1.recipe["calib"]["sources"] == ["text"]
    with pytest.raises(MumoeError, match="either a Recipe"):
        mumoe.prune(model, recipe, 0.5)


def test_masked_context_undoes_itself():
    from mumoe.apply import masked

    model = make("llama")
    name = "model.layers.0.mlp.up_proj.weight"
    before = dict(model.named_parameters())[name].detach().clone()
    mask = torch.rand(before.shape, generator=torch.Generator().manual_seed(0)) > 0.5
    with pytest.raises(RuntimeError, match="boom"):
        with masked(model, {name: mask}):
            assert torch.equal(dict(model.named_parameters())[name], before * mask)
            raise RuntimeError("boom")
    assert torch.equal(dict(model.named_parameters())[name], before)
