"""OTP (MC#'s learned per-token skipping, `testtime/otp.py`): the slots' Gram against transformers' own experts
output; an untrained mask router skips exactly what ODP skips; training finds a rule ODP cannot see (a synthetic
layer whose second slot matters only for some tokens); the skipper file round-trips and is checked against the
model; `train-skipper`, `eval --skipper` and `generate --skip` on a tiny checkpoint."""

import re

import pytest
import torch

from conftest import ids, make
from mumoe import MumoeError
from mumoe.models import moe_adapter_for
from mumoe.testtime import otp
from mumoe.testtime.skip import calibrate, odp_scores, skipping


def test_gathered_gram_matches_the_models_routed_output():
    """wᵀ G w per token = ‖Σ_j w_j f_j(x)‖², the routed output transformers' experts module computes; G's diagonal
    = ‖f_e(x)‖² by a loop over tokens."""
    model = make("qwen3_moe").eval()
    x = ids(batch=2, length=10, seed=4)
    outs = []
    layer = moe_adapter_for(model).moe_layers()[0]
    h = layer.experts.register_forward_hook(lambda mod, args, out: outs.append((args[0], args[1], out)))
    data = otp.gather(model, x, batch_size=2)[layer.index]
    h.remove()
    hidden, idx, routed = outs[0]
    want = routed.float().pow(2).sum(-1)  # [T]
    got = torch.einsum("ti,tij,tj->t", data.weights, data.gram, data.weights)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    for t in (0, 7, 19):
        for j in range(idx.shape[1]):
            f = layer.expert_forward(int(idx[t, j]), hidden[t:t + 1].float())
            assert data.gram[t, j, j].item() == pytest.approx(f.pow(2).sum().item(), rel=1e-4)


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_an_untrained_mask_router_skips_what_odp_skips(family):
    """The router starts at ODP's order (a monotone map of p_j / p_1): calibrated to the same share, the same
    slots are skipped and the logits are the same (a sigmoid router's scores too)."""
    model = make(family).eval()
    layers = moe_adapter_for(model).moe_layers()
    routers = {layer.index: otp.MaskRouter(layer.hidden_size, layer.top_k) for layer in layers}
    wins, x = ids(batch=8, length=16, seed=5), ids(batch=2, length=16, seed=6)
    score = otp.otp_scores(routers)
    with torch.no_grad():
        b_odp = calibrate(model, wins, 0.25, keep_share=0.0, batch_size=4)
        b_otp = calibrate(model, wins, 0.25, keep_share=0.0, batch_size=4, score=score)
        with skipping(model, b_odp, 0.0) as c1:
            a = model(x).logits
        with skipping(model, b_otp, 0.0, score) as c2:
            b = model(x).logits
    assert c1.skipped == c2.skipped and c1.share() > 0.1
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_training_learns_a_rule_the_router_probabilities_do_not_show():
    """A synthetic layer (k = 2, equal router probabilities, combine weights not renormalised): the second slot's
    output is 0 where x[0] > 0 (dropping it changes nothing there) and as large as the first's elsewhere. ODP's score is the same for every token; the trained router keeps the second
    slot where it matters and drops it where it does not."""
    g = torch.Generator().manual_seed(0)
    T, H = 4096, 8
    x = torch.randn(T, H, generator=g)
    useful = (x[:, 0] <= 0).float()
    gram = torch.zeros(T, 2, 2)
    gram[:, 0, 0] = 1.0
    gram[:, 1, 1] = useful  # f_2 orthogonal to f_1, of norm 1 where useful, 0 elsewhere
    probs = torch.full((T, 2), 0.3)
    data = otp.LayerData(x, probs, torch.full((T, 2), 0.5), gram)
    router, stats = otp.train_layer(data, renormalise=False, cfg=otp.OTPConfig())
    with torch.no_grad():
        keep = torch.sigmoid(router(x, probs))[:, 0]
    assert keep[useful == 1].mean() > 0.8 and keep[useful == 0].mean() < 0.2
    assert torch.equal(odp_scores(None, x, probs), torch.ones(T, 1))  # ODP: one score for all tokens


def test_skipper_file_round_trip_and_checks(tmp_path):
    model = make("qwen3_moe").eval()
    layers = moe_adapter_for(model).moe_layers()
    routers = {layer.index: otp.MaskRouter(layer.hidden_size, layer.top_k) for layer in layers}
    for r in routers.values():
        torch.nn.init.normal_(r.linear.weight, generator=torch.Generator().manual_seed(1))
    path = tmp_path / "s.safetensors"
    path.write_bytes(otp.to_bytes(routers, otp.OTPConfig(), "tiny"))
    back = otp.load(path, model)
    xx, p = torch.randn(5, layers[0].hidden_size), torch.softmax(torch.randn(5, layers[0].top_k), -1)
    for j in routers:
        assert torch.equal(back[j](xx, p), routers[j](xx, p))
    other = make("qwen3_moe", hidden_size=48).eval()
    with pytest.raises(MumoeError, match="does not fit this model: MoE layer 0 needs a mask router of shape"):
        otp.load(path, other)
    (tmp_path / "junk.safetensors").write_text("not a file of tensors")
    with pytest.raises(MumoeError, match="not a skipper file"):
        otp.load(tmp_path / "junk.safetensors", model)


def test_train_skipper_then_eval_and_generate(ckpt, capsys):
    from mumoe.cli import main

    m, c = str(ckpt / "m"), str(ckpt / "c.txt")
    out = ckpt / "skipper.safetensors"
    base = ["train-skipper", m, "--calib", c, "--nsamples", "8", "--seqlen", "16", "--steps", "20"]
    assert main([*base, "--out", str(ckpt / "m" / "s.safetensors")]) == 2  # never into the model folder
    assert "inside the model folder" in capsys.readouterr().err
    assert not (ckpt / "m" / "s.safetensors").exists()
    assert main([*base, "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out and out.is_file()
    assert main([*base, "--out", str(out)]) == 2  # exists, no --overwrite
    capsys.readouterr()
    ev = ["eval", m, "--ppl", c, "--seqlen", "16", "--max-windows", "8", "--skip", "0.2", "--skipper", str(out),
          "--calib", c, "--calib-windows", "8"]
    assert main(ev) == 0
    text = capsys.readouterr().out
    assert f"experts skipped per token (OTP from {out})" in text
    share = float(re.search(r"; ([0-9.]+)% of expert calls skipped", text).group(1))
    assert abs(share - 20) < 5
    gen = ["generate", m, "--prompt", "the cat sat", "--max-new-tokens", "6", "--skip", "0.3", "--calib", c,
           "--calib-windows", "8"]
    assert main(gen) == 0
    text = capsys.readouterr().out
    assert re.search(r"\[skip\] [0-9.]+% of expert calls skipped \(\d+ of \d+\); prefill and first token "
                     r"[0-9.]+s, then 5 tokens at [0-9.]+ tokens/s", text)
    assert main(["eval", m, "--ppl", c, "--skipper", str(out)]) == 2  # --skipper without --skip
    assert "--skipper needs --skip" in capsys.readouterr().err
