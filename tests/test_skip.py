"""Per-token expert skipping (MC#'s ODP, `testtime/skip.py`): the importance and the β rule on hand-worked values;
skipping nothing leaves the logits unchanged; skipping every slot but the first equals the model re-configured to
route top-1; a β calibrated on windows skips that share of the first layer's calls on them."""

import pytest
import torch

from conftest import ids, make
from mumoe import MumoeError
from mumoe.models import moe_adapter_for
from mumoe.testtime.skip import calibrate, calibrate_beta, drop_mask, importance, protected, skipping


def test_importance_and_protection_by_hand():
    # one sequence of 3, one head: query 0 sees key 0; query 1 splits 0.5/0.5; query 2 gives 0.2/0.2/0.6
    attn = torch.tensor([[[[1.0, 0, 0], [0.5, 0.5, 0], [0.2, 0.2, 0.6]]]])
    x = torch.tensor([[[1.0, -1.0], [2.0, 0.0], [0.5, 0.5]]])  # ‖x‖₁ = 2, 2, 1
    # received: key 0 (1 + 0.5 + 0.2) / 3, key 1 (0.5 + 0.2) / 2, key 2 0.6 / 1
    want = torch.tensor([[1.7 / 3 * 2, 0.7 / 2 * 2, 0.6 * 1]])
    assert torch.allclose(importance(attn, x), want)
    assert protected(want, 0.34).tolist() == [[True, False, False]]  # int(0.34 x 3) = 1 token
    assert protected(want, 0.0).tolist() == [[False, False, False]]


def test_beta_rule_by_hand():
    p = torch.tensor([[0.6, 0.3], [0.5, 0.1], [0.4, 0.35]])  # ratios 0.5, 0.2, 0.875
    assert drop_mask(p, 0.4).tolist() == [[False, False], [False, True], [False, False]]
    assert drop_mask(p, 0.6, keep=torch.tensor([False, True, False])).tolist() == \
        [[False, True], [False, False], [False, False]]
    r = torch.tensor([0.1, 0.2, 0.5, 0.9])
    beta = calibrate_beta(r, 8, 0.25)  # 2 of 8 calls: the two smallest ratios
    assert beta == pytest.approx(0.35) and int((r < beta).sum()) == 2
    assert calibrate_beta(r, 8, 0.0) == 0.0
    with pytest.raises(MumoeError, match="only 4 can be skipped"):
        calibrate_beta(r, 8, 0.6)


def test_skipping_invariants_on_a_tiny_model():
    model = make("qwen3_moe").eval()
    x = ids(batch=2, length=16, seed=1)
    layers = [j for j in range(model.config.num_hidden_layers)]
    impl = model.config._attn_implementation
    with torch.no_grad():
        ref = model(x).logits
        with skipping(model, {j: 0.0 for j in layers}, keep_share=0.0) as count:
            same = model(x).logits
        assert torch.equal(same, ref) and count.share() == 0.0
        with skipping(model, {j: 0.0 for j in layers}, keep_share=0.25):  # eager attention inside, protection on
            assert torch.allclose(model(x).logits, ref, atol=1e-5)
        assert model.config._attn_implementation == impl  # restored
        with skipping(model, {j: 2.0 for j in layers}, keep_share=0.0) as count:  # every slot but the first
            top1 = model(x).logits
        k = model.config.num_experts_per_tok
        assert count.share() == pytest.approx((k - 1) / k)
        one = make("qwen3_moe").eval()
        one.config.num_experts_per_tok = 1
        for layer in one.model.layers:
            layer.mlp.gate.top_k = 1
        assert torch.allclose(top1, one(x).logits, atol=1e-5)

    wins = ids(batch=8, length=16, seed=2)
    betas = calibrate(model, wins, 0.2, keep_share=0.1, batch_size=4)
    with torch.no_grad(), skipping(model, betas, keep_share=0.1) as count:
        for b in range(0, 8, 4):
            model(wins[b:b + 4])
    first = min(count.calls)
    assert count.skipped[first] == round(0.2 * count.calls[first])  # the first layer sees exactly its calibration
    assert abs(count.share() - 0.2) < 0.05


def test_eval_skip_reports_the_share_it_skipped(ckpt, capsys):
    import re

    from mumoe.cli import main

    base = ["eval", str(ckpt / "m"), "--ppl", str(ckpt / "c.txt"), "--seqlen", "16", "--max-windows", "8"]
    assert main([*base, "--skip", "0.2", "--calib", str(ckpt / "c.txt"), "--calib-windows", "8"]) == 0
    out = capsys.readouterr().out
    assert "experts skipped per token (ODP): 20% of expert calls" in out
    share = float(re.search(r"; ([0-9.]+)% of expert calls skipped", out).group(1))
    assert abs(share - 20) < 5  # the same text: near the calibrated share (later layers see changed inputs)
    for bad, words in ((["--skip", "1.5"], "--skip must be in [0, 1)"), (["--skip", "0.2", "--testtime"], "drop --testtime"),
                       (["--skip", "0.2", "--keep-share", "-1"], "--keep-share")):
        assert main([*base, *bad]) == 2
        err = capsys.readouterr().err
        assert words in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("impl", ["eager", "grouped_mm", "batched_mm"])
def test_skipped_slots_reach_the_experts_as_the_sentinel(impl, monkeypatch):
    """A skipped slot is handed to transformers' experts as index E (not computed by eager / grouped_mm): the
    logits equal those of zeroing its combine weight, under each experts implementation, and the flag is restored."""
    import mumoe.testtime.skip as skip

    model = make("qwen3_moe").eval()
    model.set_experts_implementation(impl)
    x = ids(batch=2, length=16, seed=3)
    E = model.config.num_experts
    seen = []
    layer0 = model.model.layers[0].mlp.experts
    h = layer0.register_forward_pre_hook(lambda mod, args: seen.append(args[1].clone()))
    betas = {j: 0.5 for j in range(model.config.num_hidden_layers)}
    with torch.no_grad():
        with skipping(model, betas, keep_share=0.0) as count:
            fast = model(x).logits
        assert layer0._is_expert_parallel is False
        first = min(count.skipped)
        assert 0 < count.skipped[first] == int((seen[0] == E).sum())  # every skipped slot, and nothing else
        monkeypatch.setattr(skip, "sentinel_of", lambda layer: None)  # weight 0 only: every slot computed
        with skipping(model, betas, keep_share=0.0):
            slow = model(x).logits
    h.remove()
    assert int((seen[1] == E).sum()) == 0
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", ["deepseek_v3", "kolibri1"])
def test_skipping_on_sigmoid_routers(family):
    """Sigmoid routers (DeepSeek-V3: group-limited, normalised top-k, × 2.5; Kolibri: unnormalised): the scores
    compared are the router's combine weights. Skipping nothing leaves the logits unchanged; skipping every slot but
    the first equals the model routed top-1 (the same group and first expert; its weight renormalised to the sum
    the router gives, the scaling factor — not to 1); calibration hits its share on the first layer."""
    from mumoe.models.tiny import tiny_model

    model = tiny_model(family).eval()
    x = ids(batch=2, length=16, seed=1)
    n = model.config.num_hidden_layers
    with torch.no_grad():
        ref = model(x).logits
        with skipping(model, {j: 0.0 for j in range(n)}, keep_share=0.0) as count:
            assert torch.equal(model(x).logits, ref) and count.share() == 0.0
        with skipping(model, {j: 1e9 for j in range(n)}, keep_share=0.0) as count:
            top1 = model(x).logits
        assert count.share() == pytest.approx(0.5)
        one = tiny_model(family).eval()
        for layer in moe_adapter_for(one).moe_layers():
            layer.router.top_k = 1
        torch.testing.assert_close(top1, one(x).logits, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(top1, ref, atol=1e-3)  # skipping changed the output: the comparison can fail
    wins = ids(batch=8, length=16, seed=2)
    betas = calibrate(model, wins, 0.25, keep_share=0.0, batch_size=4)
    with torch.no_grad(), skipping(model, betas, keep_share=0.0) as count:
        for b in range(0, 8, 4):
            model(wins[b:b + 4])
    first = min(count.calls)
    assert count.skipped[first] == round(0.25 * count.calls[first])


def test_skipping_refused_where_routers_pick_identity_experts():
    """LongCat-Flash's routers also pick zero-computation experts: skipping is refused in one line that says so."""
    from mumoe.models.tiny import tiny_model

    model = tiny_model("longcat_flash")
    with pytest.raises(MumoeError) as e:
        with skipping(model, {0: 0.0, 1: 0.0}, keep_share=0.0):
            pass
    assert "identity" in str(e.value) and "\n" not in str(e.value)


def _moe_families() -> list[str]:
    from mumoe.models.registry import MOE_TYPES
    from mumoe.models.tiny import TINY_CONFIGS

    return sorted(t for t in TINY_CONFIGS if t in MOE_TYPES)


@pytest.mark.parametrize("family", _moe_families())
def test_every_family_skips_or_refuses_in_one_line(family):
    """Skipping every slot but the first, token by token after a prefill, on every MoE family: a one-line refusal
    (routers whose scores ODP cannot compare, identity experts) or a decode that skips (k-1)/k of the slots and
    gives the same logits through `fast_decode`'s one-token experts as through the family's own forward. (Caught:
    JetMoE's experts ran the skip sentinel index E as an expert: IndexError.)"""
    from mumoe.apply.gemv import fast_decode
    from mumoe.compat import cache_kwarg, output_cache

    kw = cache_kwarg()
    x, feed = ids(1, 10), ids(1, 4, seed=1)[0].tolist()
    got = []
    for fast in (False, True):
        model = make(family).eval()
        if fast:
            fast_decode(model)
        adapter = moe_adapter_for(model)
        betas = {layer.index: 2.0 for layer in adapter.moe_layers()}
        try:
            with torch.no_grad(), skipping(model, betas, keep_share=0.0) as count:
                cache, rows = output_cache(model(input_ids=x, use_cache=True)), []
                for t in feed:
                    out = model(input_ids=torch.tensor([[t]]), **{kw: cache}, use_cache=True)
                    cache = output_cache(out)
                    rows.append(out.logits[0, -1])
        except MumoeError as e:
            assert "\n" not in str(e)
            return
        k = adapter.moe_layers()[0].top_k
        assert count.share() == pytest.approx((k - 1) / k)
        got.append(torch.stack(rows))
    assert (got[1] - got[0]).abs().max() <= 1e-4 * got[0].abs().max()
