"""μ-MoE masks vs an independent Wanda computation on the prompt's activations."""

import math

import pytest
import torch

from conftest import ids, make
from mumoe import MumoeError
from mumoe.models import adapter_for
from mumoe.apply.masking import apply_masks, restore
from mumoe.select.weights import wanda_mask
from mumoe.testtime import prompt_masks
from mumoe.models.tiny import TINY_CONFIGS

ARCHS = ["qwen3_moe", "mixtral", "qwen2_moe", "olmoe", "deepseek_v3", "llama", "qwen2", "opt"]


def reference_norms(model, x):
    """Plain forward pre-hooks on every linear + explicit per-expert loops over routed tokens."""
    adapter = adapter_for(model)
    names = {id(m): n for n, m in model.named_modules()}
    acts, hooks = {}, []
    for lin in adapter.dense_linears():
        hooks.append(lin.module.register_forward_pre_hook(
            lambda m, a, n=lin.name: acts.setdefault(n, []).append(a[0].reshape(-1, a[0].shape[-1]))))
    for l in adapter.moe_layers():
        hooks.append(l.block.register_forward_pre_hook(
            lambda m, a, i=l.index: acts.setdefault(("moe", i), []).append(a[0].reshape(-1, a[0].shape[-1]))))
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    out = {}
    for lin in adapter.dense_linears():
        if any(lin.module is l.shared_gate for l in adapter.moe_layers()):
            continue
        out[f"{lin.name}.weight"] = torch.cat(acts[lin.name]).double().norm(dim=0)
    with torch.no_grad():
        for l in adapter.moe_layers():
            X = torch.cat(acts[("moe", l.index)])
            _, _, idx = l.router(X)
            prefix = names[id(l.experts)]
            gu, dn = [], []
            for e in range(l.num_experts):
                rows = [t for t in range(X.shape[0]) if e in idx[t].tolist()] or list(range(X.shape[0]))
                xe = X[rows]
                gu.append(xe.double().norm(dim=0))
                dn.append(l.expert_hidden(e, xe).double().norm(dim=0))
            out[f"{prefix}.gate_up_proj"], out[f"{prefix}.down_proj"] = torch.stack(gu), torch.stack(dn)
    return out


def reference_row_mask(W, norms, active):
    d_out, d_in = W.shape
    drop = math.floor((1 - active) * d_in + 1e-9)
    mask = torch.ones(d_out, d_in, dtype=torch.bool)
    for i in range(d_out):
        score = [(abs(float(W[i, j])) * float(norms[j]), j) for j in range(d_in)]
        for _, j in sorted(score)[:drop]:
            mask[i, j] = False
    return mask


@pytest.mark.parametrize("arch", ARCHS)
def test_prompt_masks_equal_independent_wanda(arch):
    model, x = make(arch), ids(1, 10, seed=6)
    masks = prompt_masks(model, x, 0.5, "row")
    ref = reference_norms(model, x)
    params = dict(model.named_parameters())
    assert set(masks) == set(ref)
    assert not any("embed" in k or "lm_head" in k for k in masks)
    for name, mask in masks.items():
        W = params[name].detach()
        if W.dim() == 3:  # fused experts: one Wanda problem per expert
            for e in range(W.shape[0]):
                assert torch.equal(mask[e], reference_row_mask(W[e], ref[name][e], 0.5)), (name, e)
        else:
            assert torch.equal(mask, reference_row_mask(W, ref[name], 0.5)), name


def test_active_one_reproduces_dense_logits_exactly():
    model, x = make("qwen3_moe"), ids(1, 10)
    with torch.no_grad():
        dense = model(x).logits
    masks = prompt_masks(model, x, 1.0, "row")
    assert all(bool(m.all()) for m in masks.values())
    saved = apply_masks(model, masks)
    with torch.no_grad():
        assert torch.equal(model(x).logits, dense)
    restore(model, saved)


def test_structures_hand_worked():
    W = torch.tensor([[1.0, -4.0, 2.0, 3.0], [4.0, 1.0, -1.0, 0.5]])
    x = torch.tensor([1.0, 1.0, 1.0, 2.0])  # scores row0: 1 4 2 6; row1: 4 1 1 1 (N:M ties: lower index kept)
    assert wanda_mask(W, torch.tensor([1.0, 1.0, 1.5, 2.0]), 0.5, "row").tolist() == \
        [[False, True, False, True], [True, False, True, False]]  # row1 scores 4 1 1.5 1: drop columns 1 and 3
    assert wanda_mask(W, x, 0.5, "2:4").tolist() == [[False, True, False, True], [True, True, False, False]]
    assert wanda_mask(W, x, 0.5, "1:2").tolist() == [[False, True, False, True], [True, False, True, False]]
    # column: ‖W[:, j]‖·x_j = 4.12, 4.12, 2.24, 6.04 -> keep columns 3 and 0 (tie with 1: lower index)
    assert wanda_mask(W, x, 0.5, "column").tolist() == [[True, False, False, True]] * 2


def test_top_indices_equals_a_sort_with_ties_to_the_lower_index():
    """`top_indices` (a k-th value split, no sort) against Python's sort by (−score, index), on scores with many
    ties, every k from 0 to d, rows of a stack independently."""
    from mumoe.select.weights import top_indices

    g = torch.Generator().manual_seed(3)
    score = torch.randint(0, 4, (5, 9), generator=g).double()  # values 0..3: ties everywhere
    score[1] = 2.0  # a row of one value
    for k in range(10):
        got = top_indices(score, k)
        want = [sorted(sorted(range(9), key=lambda j: (-float(row[j]), j))[:k]) for row in score]
        assert got.shape == (5, k) and got.tolist() == want, k
    one = torch.tensor([0.5, 3.0, 3.0, 1.0])
    assert top_indices(one, 2).tolist() == [1, 2] and top_indices(one, 3).tolist() == [1, 2, 3]


def test_bad_inputs():
    W, x = torch.ones(2, 6), torch.ones(6)
    with pytest.raises(MumoeError, match=r"\(0, 1\]"):
        wanda_mask(W, x, 0.0)
    with pytest.raises(MumoeError, match="M dividing d_in=6"):
        wanda_mask(W, x, 0.5, "2:4")
    with pytest.raises(MumoeError, match="empty prompt"):
        prompt_masks(make("llama"), torch.zeros(0, dtype=torch.long), 0.5)


def test_generate_rho_one_equals_dense_generate():
    from mumoe.testtime import generate

    model, x = make("qwen3_moe"), ids(1, 8, seed=2)
    dense = model.generate(x, max_new_tokens=6, do_sample=False, pad_token_id=0)
    res = generate(model, x, 1.0, "row", max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(res.sequences, dense) and res.active_weights == res.total_weights


def test_generate_uses_dense_prompt_cache_and_masked_decoding():
    from mumoe.testtime import generate

    model, x = make("mixtral"), ids(1, 8, seed=3)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    res = generate(model, x, 0.5, "row", max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert all(torch.equal(p, params[n]) for n, p in model.named_parameters())  # weights restored
    # independent: dense forward of the prompt minus its last token, then masked greedy steps one by one
    masks = prompt_masks(model, x, 0.5, "row")
    with torch.no_grad():
        cache = model(x[:, :-1], use_cache=True).past_key_values
        saved = apply_masks(model, masks)
        seq, nxt = x, x[:, -1:]
        for _ in range(5):
            out = model(nxt, past_key_values=cache, use_cache=True)
            nxt = out.logits[:, -1:].argmax(-1)
            seq = torch.cat([seq, nxt], 1)
        restore(model, saved)
    assert torch.equal(res.sequences, seq)
    assert 0.45 < res.active_weights / res.total_weights <= 0.5


def test_offline_norms_do_not_depend_on_batch_size():
    from mumoe.observe.collectors import input_norms

    model, w = make("olmoe"), ids(4, 10, seed=8)
    a, b = input_norms(model, w, batch_size=1), input_norms(model, w, batch_size=4)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-8)  # fp32 forward rounding only


def test_offline_wanda_and_magnitude_prune(tmp_path):
    import mumoe
    from transformers import AutoModelForCausalLM
    from mumoe.observe.collectors import input_norms
    from mumoe.models.prunable import prunable_names
    from mumoe.select.weights import magnitude_mask

    calib = ids(3, 12, seed=11)
    model = make("qwen2_moe")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    norms = input_norms(make("qwen2_moe"), calib)
    report = mumoe.prune(model, "wanda", 0.5, calib=calib, structure="2:4")
    params = dict(model.named_parameters())
    for name in prunable_names(model):
        expected = wanda_mask(before[name], norms[name], 0.5, "2:4")
        assert torch.equal(params[name] != 0, expected & (before[name] != 0)), name
    untouched = [n for n in params if n not in set(prunable_names(model))]
    assert any("embed" in n for n in untouched) and any("gate.weight" in n for n in untouched)
    assert all(torch.equal(params[n], before[n]) for n in untouched)
    assert report.grain == "weight" and all(abs(e["active"] - 0.5) < 1e-9 for e in report.layers)
    out = mumoe.save_pruned(model, tmp_path / "w", report)
    again = AutoModelForCausalLM.from_pretrained(out)
    x = ids()
    with torch.no_grad():
        assert (again(x).logits - model(x).logits).abs().max() <= 1e-5
    # magnitude: one threshold per matrix, per expert for fused tensors
    W = torch.tensor([[[1.0, -3.0], [0.5, 2.0]], [[9.0, 8.0], [7.0, -0.1]]])
    assert magnitude_mask(W, 0.5).tolist() == [[[False, True], [False, True]], [[True, True], [False, False]]]
    with pytest.raises(MumoeError, match="needs calibration"):
        mumoe.prune(make("llama"), "wanda", 0.5)


def test_cli_generate_and_bad_active(capsys):
    from mumoe.cli import main

    assert main(["generate", "--prompt", "It is a truth universally acknowledged", "--active", "0.6",
                 "--max-new-tokens", "4"]) == 0
    stage, out = capsys.readouterr().out.split("\n", 1)
    assert stage.startswith("loaded default in") and "ρ=0.6 (row)" in stage
    assert out.startswith("It is a truth universally acknowledged") and "[μ-MoE]" in out and "(60.2%" in out  # floor((1 - 0.6)·256) = 102 of 256 dropped per row
    for bad in (["--active", "0"], ["--active", "1.2"]):
        assert main(["generate", "--prompt", "x", *bad]) == 2
        assert "active ratio" in capsys.readouterr().err
    assert main(["generate", "--prompt", "   "]) == 2
    assert main(["generate", "--prompt", "hello there", "--structure", "2:3"]) == 2
    assert "M dividing d_in" in capsys.readouterr().err


@pytest.mark.parametrize("skip_unused", [True, False], ids=["skip-unused-rows", "all-rows"])
@pytest.mark.parametrize("prepared", [False, True], ids=["row-major", "column-major"])
@pytest.mark.parametrize("arch", ["llama", "opt", "qwen2_moe", "qwen3_moe", "deepseek_v3", "gpt_oss", "llama4_text"])
def test_column_compacted_decode_equals_masked_dense(arch, prepared, skip_unused):
    from mumoe.apply.compact import compact, is_column_major, prepare_columns, uncompact
    from mumoe.compat import cache_kwarg, output_cache

    model, x = make(arch), ids(1, 10, seed=12)
    if prepared:  # column-major storage: same values, same shapes, fast gathers
        params = {n: p.detach().clone() for n, p in model.named_parameters()}
        with torch.no_grad():
            before = model(x).logits
        assert prepare_columns(model) > 0 and prepare_columns(model) == 0  # idempotent
        for n, p in model.named_parameters():
            assert torch.equal(p, params[n])
        assert all(is_column_major(p) for n, p in model.named_parameters() if n.endswith(("gate_up_proj", "q_proj.weight")))
        with torch.no_grad():
            torch.testing.assert_close(model(x).logits, before, rtol=0, atol=1e-5)
    masks = prompt_masks(model, x[:, :6], 0.5, "column")
    saved = apply_masks(model, masks)
    with torch.no_grad():
        masked = model(x).logits
    restore(model, saved)
    with torch.no_grad():
        dense = model(x).logits
    all_chains = adapter_for(model).mlp_chains()
    undo = compact(model, masks, skip_unused=skip_unused)
    small = {n: m for n, m in model.named_modules() if type(m).__name__ == "CompactLinear"}
    assert small and all(is_column_major(m.weight) == prepared for m in small.values())
    # shapes, from the masks alone: kept columns, and (skip_unused) only the MLP rows the masked consumer reads
    kept = {n: int(masks[f"{n}.weight"].any(0).sum()) for n in small}
    chains = [(pr, co) for pr, co in all_chains if co in small]
    assert chains or arch in ("qwen3_moe", "gpt_oss")  # every other tiny model has a dense MLP somewhere
    for producers, consumer in chains:
        for n in producers:
            rows = kept[consumer] if skip_unused else masks[f"{n}.weight"].shape[0]
            assert tuple(small[n].weight.shape) == (rows, kept[n])
        assert small[consumer].gather_input is not skip_unused
    with torch.no_grad():
        compacted = model(x).logits
        kw = cache_kwarg()  # token by token (a decode step's one-token expert path) vs the masked full forward
        cache = output_cache(model(x[:, :6], use_cache=True))
        steps = torch.stack([model(x[:, i : i + 1], **{kw: cache}, use_cache=True).logits[0, -1] for i in range(6, 10)])
    assert (compacted - masked).abs().max() <= 1e-4
    assert (steps - masked[0, 6:10]).abs().max() <= 1e-4
    assert (compacted - dense).abs().max() > 1e-3  # the masks do something
    # what decoding reads: the masked count (ρ of each matrix), minus the skipped rows
    active = sum(int(m.sum()) for m in masks.values())
    assert (undo.weights < active) if skip_unused else (undo.weights == active)
    undo.use(False)  # dense modules back, nothing released; then the same compacted ones again
    with torch.no_grad():
        assert torch.equal(model(x).logits, dense)
        undo.use(True)
        assert torch.equal(model(x).logits, compacted)
        undo.use(False)
    uncompact(undo)
    with torch.no_grad():
        assert torch.equal(model(x).logits, dense)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int8])
@pytest.mark.parametrize("layout", ["row-major", "column-major"])
def test_gather_columns_copies_exactly_what_indexing_gives(dtype, layout):
    """`gather_columns` (row copies of Wᵀ, column gathers, staged two-index gathers, half precision moved as int16
    bits) against plain indexing W[:, keep] and W[rows][:, keep], bit for bit, into a reused buffer too."""
    from mumoe.apply.compact import column_major, gather_columns

    g = torch.Generator().manual_seed(5)
    w = (torch.randn(300, 70, generator=g) * 20).to(dtype)
    w = column_major(w) if layout == "column-major" else w
    keep = torch.randperm(70, generator=g)[:33].sort().values
    rows = torch.randperm(300, generator=g)[:101].sort().values
    buf = torch.empty(300 * 70, dtype=dtype)
    for out in (None, buf):
        assert torch.equal(gather_columns(w, keep, out), w[:, keep])
        assert torch.equal(gather_columns(w, keep, out, rows), w[rows][:, keep])


@pytest.mark.parametrize("arch", ["llama", "opt", "qwen2_moe"])
def test_column_compaction_at_rho_one_is_the_dense_model(arch):
    """ρ = 1 keeps every column, so every row is read too: the compacted model is the dense one, value for value."""
    from mumoe.apply.compact import compact, prepare_columns, uncompact

    model, x = make(arch), ids(1, 10, seed=4)
    prepare_columns(model)
    with torch.no_grad():
        dense = model(x).logits
    masks = prompt_masks(model, x[:, :6], 1.0, "column")
    undo = compact(model, masks)
    assert undo.weights == sum(m.numel() for m in masks.values())
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, dense, rtol=0, atol=1e-5)
    uncompact(undo)


@pytest.mark.parametrize("arch", ["llama", "qwen3_moe"])
def test_compaction_buffers_are_reused_across_prompts(arch):
    """The second prompt's compaction writes into the first one's buffers (no new allocation) and still gives
    its own masked logits; release_buffers frees them."""
    from mumoe.apply.compact import compact, prepare_columns, release_buffers, uncompact

    model = make(arch)
    prepare_columns(model)
    x = ids(1, 10, seed=3)
    ptrs = []
    for seed, active in ((1, 0.5), (2, 0.4)):  # second prompt: other columns, fewer of them
        masks = prompt_masks(model, ids(1, 6, seed=seed), active, "column")
        saved = apply_masks(model, masks)
        with torch.no_grad():
            masked = model(x).logits
        restore(model, saved)
        undo = compact(model, masks)
        ptrs.append(sorted(m.weight.data_ptr() for m in model.modules() if type(m).__name__ == "CompactLinear"))
        with torch.no_grad():
            assert (model(x).logits - masked).abs().max() <= 1e-4
        uncompact(undo)
    assert ptrs[0] == ptrs[1]
    assert release_buffers(model) > 0 and release_buffers(model) == 0


def test_generate_column_compacted_equals_column_masked():
    from mumoe.testtime import generate

    model, x = make("llama"), ids(1, 8, seed=5)
    a = generate(model, x, 0.5, "column", compacted=True, max_new_tokens=6, do_sample=False, pad_token_id=0)
    b = generate(model, x, 0.5, "column", compacted=False, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(a.sequences, b.sequences)
    assert not any(type(m).__name__ == "CompactLinear" for m in model.modules())  # undone
    assert 0 < a.statistics_seconds < a.prefill_seconds  # measured inside the hooks, part of the prefill
    # decoding reads k columns of every matrix, and of gate/up only the rows whose down column is kept
    masks, expected = prompt_masks(model, x, 0.5, "column"), 0
    for name, m in masks.items():
        rows = m.shape[0]
        if name.endswith(("gate_proj.weight", "up_proj.weight")):
            down = name.replace("gate_proj", "down_proj").replace("up_proj", "down_proj")
            rows = int(masks[down].any(0).sum())
        expected += rows * int(m.any(0).sum())
    assert a.read_weights == expected < a.active_weights and b.read_weights is None


def test_continuation_protocol_dense_equals_full_forward_and_rho_one():
    from mumoe.testtime import continuation_perplexity, offline_masks

    model, wins = make("qwen3_moe"), ids(3, 16, seed=21)
    dense = continuation_perplexity(model, wins, 6, masks=None, per_prompt=False)
    # independent: one full forward per window, NLL of positions 7..15 only
    nll = 0.0
    with torch.no_grad():
        for w in wins:
            logp = torch.log_softmax(model(w[None]).logits[0].double(), -1)
            nll -= sum(float(logp[t - 1, w[t]]) for t in range(7, 16))
    assert dense["tokens"] == 27 and abs(dense["ppl"] - math.exp(nll / 27)) / dense["ppl"] < 1e-5
    mu_one = continuation_perplexity(model, wins, 6, active=1.0)
    assert abs(mu_one["ppl"] - dense["ppl"]) / dense["ppl"] < 1e-6
    mu = continuation_perplexity(model, wins, 6, active=0.4, structure="column")
    off = continuation_perplexity(model, wins, 6, 0.4, "column", offline_masks(model, ids(2, 16, seed=1), 0.4, "column"),
                                  per_prompt=False)
    assert mu["ppl"] != dense["ppl"] and off["ppl"] != dense["ppl"]
    with pytest.raises(MumoeError, match="prompt length"):
        continuation_perplexity(model, wins, 15)


def test_cli_eval_testtime(tmp_path, capsys):
    from mumoe.cli import main

    rc = main(["eval", "--ppl", "domain", "--testtime", "--active", "0.5", "--seqlen", "64", "--max-windows", "1",
               "--json", str(tmp_path / "t.json")])
    assert rc == 0
    import json as _json

    res = _json.loads((tmp_path / "t.json").read_text())
    assert res["prompt_len"] == 32 and set(res["results"]) == {"code", "docs", "kernel", "prose"}
    assert all(r["dense"] > 1 and r["mu-moe"] > 1 for r in res["results"].values())
    assert main(["eval", "--ppl", "domain", "--testtime", "--active", "0"]) == 2


@pytest.mark.parametrize("arch", ["llama", "qwen3_moe"])
def test_column_major_model_still_saves_and_reloads(arch, tmp_path):
    """prepare_columns changes only strides: a prepared model saves with save_pretrained and reloads to the
    same logits (up to BLAS summation order)."""
    from mumoe.apply.compact import prepare_columns

    model, x = make(arch), ids(1, 8, seed=1)
    prepare_columns(model)
    with torch.no_grad():
        before = model(x).logits
    model.save_pretrained(tmp_path / "m")
    reloaded = type(model).from_pretrained(tmp_path / "m")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, before, rtol=0, atol=1e-5)


@pytest.mark.parametrize("structure", ["row", "column", "2:4", "3:8"])
@pytest.mark.parametrize("shape", [(12, 16), (3, 8, 24)])
@pytest.mark.parametrize("active", [0.3, 0.5, 0.75, 1.0])
def test_kept_count_equals_the_masks_count(structure, shape, active):
    """The per-request count comes from the rule, not from summing masks: it must equal the masks' own count."""
    from mumoe.select.weights import kept_count

    if ":" in structure:
        n, m = map(int, structure.split(":"))
        active = n / m
    g = torch.Generator().manual_seed(len(shape) * 100 + int(active * 10))
    w = torch.randn(*shape, generator=g)
    norms = torch.rand(*shape[:-2], shape[-1], generator=g)
    assert kept_count(w.shape, active, structure) == int(wanda_mask(w, norms, active, structure).sum())


@pytest.mark.parametrize("arch", ["llama", "qwen3_moe"])
def test_prompt_pruner_selects_column_indices_without_masks(arch):
    """Compacted column structure: `select` returns the kept columns themselves (ascending), equal to the masks'
    columns; compacting with them gives the logits the masks give, bit for bit; the counts match the masks'."""
    from mumoe.apply.compact import compact, uncompact
    from mumoe.testtime import PromptPruner

    model, x = make(arch), ids(1, 10, seed=7)
    pruner = PromptPruner(model, 0.5, "column")
    norms, _ = pruner.prefill(x[:, :6])
    cols = pruner.select(norms)
    masks = prompt_masks(model, x[:, :6], 0.5, "column")
    assert set(cols) == set(masks)
    with torch.no_grad():
        undo = compact(model, masks)
        by_masks = model(x).logits
        uncompact(undo)
        with pruner.applied(cols):  # (experts of deferred statistics compacted as the tokens reach them)
            assert torch.equal(model(x).logits, by_masks)
    lazy = [c for c in cols.values() if not isinstance(c, torch.Tensor)]
    assert bool(lazy) == (arch == "qwen3_moe")  # 6 tokens × top-2 leave experts of the MoE unrouted
    for name, c in cols.items():
        c = c if isinstance(c, torch.Tensor) else c.resolved()
        assert c.dtype == torch.long
        want = masks[name].any(-2)  # [..., d_in]
        got = torch.zeros_like(want).scatter(-1, c, True)
        assert torch.equal(got, want) and bool((c.diff(dim=-1) > 0).all()), name
    assert pruner.counts(cols) == (sum(int(m.sum()) for m in masks.values()), sum(m.numel() for m in masks.values()))


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3"])
def test_experts_the_decode_never_reaches_are_never_compacted(arch, monkeypatch):
    """Compacted μ-MoE on an MoE: an expert is gathered the first time a token reaches it, and the fallback
    statistics of an expert no prompt token routed to are computed only then — the experts the pruned forward
    routes to are exactly the ones made, the deferred rows left are exactly the unreached ones, and the seconds
    are counted (`lazy_s`). The resolved norms equal the prefill's own fallback (no deferral), bit for bit."""
    from mumoe.observe import collectors
    from mumoe.observe.collectors import DeferredNorms, input_norms
    from mumoe.testtime import PromptPruner

    model, x = make(arch), ids(1, 9, seed=11)
    pruner = PromptPruner(model, 0.5, "column")
    norms, _ = pruner.prefill(x[:, :5])
    deferred = {n: v for n, v in norms.items() if isinstance(v, DeferredNorms)}
    before = {n: set(v.pending) for n, v in deferred.items()}
    assert deferred and all(before.values())
    cols = pruner.select(norms)
    layers = adapter_for(model).moe_layers()
    names = {id(m): n for n, m in model.named_modules()}
    reached: dict[str, set] = {}
    hooks = [l.experts.register_forward_pre_hook(
        lambda m, a, n=f"{names[id(l.experts)]}.down_proj": reached.setdefault(n, set()).update(
            int(e) for e in a[1].unique() if int(e) < l.num_experts)) for l in layers]
    try:
        with torch.no_grad(), pruner.applied(cols) as undo:
            model(x[:, 4:6])  # two tokens through the pruned model
    finally:
        for h in hooks:
            h.remove()
    assert undo.experts_made == sum(len(r) for r in reached.values())
    assert undo.experts_made < sum(l.num_experts for l in layers) and undo.lazy_s > 0
    for n, v in deferred.items():
        assert v.pending == before[n] - reached.get(n, set()), n
    eager = input_norms(model, x[:, :5], return_cache=True)[0]
    for n, v in deferred.items():
        assert torch.equal(v.resolved(), eager[n]), n
    # a budget for one layer's hidden states: that layer deferred, the next computed in the prefill, same norms
    monkeypatch.setattr(collectors, "DEFER_BYTES", 5 * model.config.hidden_size * 4)
    capped = input_norms(model, x[:, :5], return_cache=True, defer_unrouted=True)[0]
    assert len(deferred) >= 2 and sum(isinstance(v, DeferredNorms) for v in capped.values()) == 1
    for n, v in capped.items():
        assert torch.equal(v.resolved() if isinstance(v, DeferredNorms) else v, eager[n]), n
    with pytest.raises(ValueError):
        input_norms(model, x[:, :5], defer_unrouted=True)


def test_row_masking_swaps_storage_and_keeps_the_weights_untouched():
    """Row structure per prompt: masked copies are swapped in (logits equal to masking in place), the original
    tensors are put back as they were — same storage, never written (version unchanged), so the cached column
    norms of the weights stay valid across a row request."""
    from mumoe.criteria.weight import column_norms
    from mumoe.testtime import PromptPruner

    model, x = make("qwen3_moe"), ids(1, 10, seed=8)
    pruner = PromptPruner(model, 0.5, "row")
    params = dict(model.named_parameters())
    norms, _ = pruner.prefill(x[:, :6])
    masks = pruner.select(norms)
    before = {n: (params[n].data_ptr(), params[n]._version, params[n].detach().clone()) for n in masks}
    name = next(iter(masks))
    cached = column_norms(params[name])
    saved = apply_masks(model, masks)
    with torch.no_grad():
        want = model(x).logits
    restore(model, saved)
    for n in masks:  # the reference above wrote in place; record the state the swap must preserve
        before[n] = (params[n].data_ptr(), params[n]._version, before[n][2])
    cached = column_norms(params[name])
    with pruner.applied(masks):
        with torch.no_grad():
            assert torch.equal(model(x).logits, want)
        assert params[name].data_ptr() != before[name][0]
    for n, (ptr, version, value) in before.items():
        assert params[n].data_ptr() == ptr and params[n]._version == version and torch.equal(params[n], value), n
    assert column_norms(params[name]) is cached


@pytest.mark.parametrize("arch", ["llama", "qwen3_moe"])
def test_half_precision_cpu_weights_stay_row_major_and_compact_exactly(arch):
    """bf16 on the CPU: `prepare_columns` leaves the weights row-major (their GEMV is slower column-major), the
    compacted matrices are row-major column gathers, and the compacted model gives the masked model's logits
    (bf16: within rounding of the different summation lengths)."""
    from mumoe.apply.compact import compact, is_column_major, prepare_columns, uncompact

    model, x = make(arch).to(torch.bfloat16), ids(1, 10, seed=9)
    assert prepare_columns(model) == 0
    masks = prompt_masks(model, x[:, :6], 0.5, "column")
    saved = apply_masks(model, masks)
    with torch.no_grad():
        masked = model(x).logits.float()
    restore(model, saved)
    undo = compact(model, masks)
    small = [m for m in model.modules() if type(m).__name__ == "CompactLinear"]
    assert small and not any(is_column_major(m.weight) for m in small)
    for m in small:  # the gathered values are the weight's own kept columns
        ref = m.original.weight.detach()
        want = ref[:, m.keep] if m.weight.shape[0] == ref.shape[0] else None
        if want is not None:
            assert torch.equal(m.weight, want)
    with torch.no_grad():
        got = model(x).logits.float()
    uncompact(undo)
    assert (got - masked).abs().max() <= 0.05 * masked.abs().max()
    assert (got - masked).abs().max() < (masked - model(x).logits.float()).abs().max()  # closer than dense is


@pytest.mark.parametrize("family", ["qwen3_next", "jamba", "nemotron_h"])
def test_per_prompt_decode_pruning_refused_where_the_cache_cannot_drop_a_token(family):
    """μ-MoE and per-prompt experts decode the last prompt token again with the pruned model, which needs the
    prompt's cache without it: models with recurrent layers (gated delta-net, Mamba) cannot give that exactly, so
    both are refused in one line (before: a RuntimeError traceback from transformers' crop); a model with attention
    only still can, and dense decoding of the hybrid one works."""
    from mumoe import MumoeError
    from mumoe.models.tiny import tiny_model
    from mumoe.testtime.generate import generate
    from mumoe.testtime.kvcache import refeed_possible
    from mumoe.testtime.protocol import Dense, Experts

    model = tiny_model(family)
    x = torch.randint(3, 128, (1, 12), generator=torch.Generator().manual_seed(0))
    assert not refeed_possible(model.config) and refeed_possible(tiny_model("qwen3_moe").config)
    for run in (lambda: generate(model, x, 0.5, "column", max_new_tokens=2), lambda: Experts(4).prefill(model, x)):
        with pytest.raises(MumoeError) as e:
            run()
        assert "not available for " + family in str(e.value) and "\n" not in str(e.value)
    with torch.no_grad():
        assert Dense().prefill(model, x).logits.shape[-1] == model.config.vocab_size
    from conftest import char_tokenizer
    from mumoe.serve.engine import Engine

    engine = Engine(model, char_tokenizer(), family)  # a server answers such requests 400, before queueing them
    assert engine.pruning(None).active == 1.0
    for ext in ({"active": 0.5}, {"experts": 2}):
        with pytest.raises(MumoeError):
            engine.pruning(ext)


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_every_family_decodes_column_compacted_as_column_masked(family):
    """μ-MoE column on every family's tiny model: the compacted model (kept columns gathered, experts compacted on
    first use) gives the masked dense model's logits, in a full forward and token by token from a cache (each model
    against itself decoded the same way: some families' cached decode differs from their full forward). Caught:
    Llama 4's combine weight scales the experts' input, which the compacted experts had applied to the output."""
    from mumoe.apply.compact import compact, uncompact
    from mumoe.compat import cache_kwarg, output_cache
    from mumoe.testtime.kvcache import refeed_possible

    model, x = make(family), ids(1, 10, seed=12)
    kw = cache_kwarg()

    def both() -> tuple[torch.Tensor, torch.Tensor | None]:
        full, steps = model(x).logits, None
        if refeed_possible(model.config):  # (recurrent layers: no token-by-token decode after a crop here)
            cache = output_cache(model(x[:, :6], use_cache=True))
            steps = torch.stack([model(x[:, i:i + 1], **{kw: cache}, use_cache=True).logits[0, -1] for i in range(6, 10)])
        return full, steps

    masks = prompt_masks(model, x[:, :6], 0.5, "column")
    with torch.no_grad():
        dense, _ = both()
        saved = apply_masks(model, masks)
        masked, masked_steps = both()
        restore(model, saved)
        undo = compact(model, masks)
        compacted, compacted_steps = both()
        uncompact(undo)
    assert (compacted - masked).abs().max() <= 1e-4
    if masked_steps is not None:
        assert (compacted_steps - masked_steps).abs().max() <= 1e-4
    assert (masked - dense).abs().max() > 1e-3  # the masks do something


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_every_family_decodes_int8_column_compacted(family):
    """`mumoe serve --int8`'s μ-MoE column on every family's tiny model: the compacted model built from int8 copies
    runs (a full forward and, where the cache allows, token by token) and stays within int8 rounding of the masked
    model at the typical position — the median over positions of the largest logit error ≤ 5% of the logits' scale
    (int8 noise may flip a near-tied expert choice at a position; routing is discontinuous). Caught: model code that
    casts its input to `proj.weight.dtype` (DeepSeek-V3.2's indexer) crashed on the int8 modules' missing weight."""
    from mumoe.apply.compact import compact, uncompact
    from mumoe.compat import cache_kwarg, output_cache
    from mumoe.testtime.kvcache import refeed_possible

    model, x = make(family), ids(1, 10, seed=12)
    masks = prompt_masks(model, x[:, :6], 0.5, "column")
    with torch.no_grad():
        saved = apply_masks(model, masks)
        masked = model(x).logits[0]  # [10, V]
        restore(model, saved)
        undo = compact(model, masks, int8=True)
        got = model(x).logits[0]
        if refeed_possible(model.config):
            kw = cache_kwarg()
            cache = output_cache(model(x[:, :6], use_cache=True))
            for i in range(6, 10):
                step = model(x[:, i : i + 1], **{kw: cache}, use_cache=True).logits[0, -1]
                assert torch.isfinite(step).all()
        uncompact(undo)
    per_position = (got - masked).abs().amax(-1)  # [10]
    assert per_position.median() <= 0.05 * masked.abs().max(), per_position.tolist()
