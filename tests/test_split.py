"""One budget over two stages (`--expert-params X`, STUN's structured-then-unstructured): the split rule by hand;
the recipe sets, records and replays the stage ratios; STUN then Wanda (per-layer expert counts, then zeros inside
them) equals the two stages run as two commands, tensor for tensor, reloads to the in-memory model's logits, and
counts what it removed as the export's own tensors do; the layer-sequential driver corrects the weight stage as
the in-memory one does, and refuses a later stage on shapes it cannot read."""

import json

import pytest
import torch

import mumoe
from conftest import SAMPLE_TEXT, char_tokenizer
from mumoe import MumoeError
from mumoe.cli import main
from mumoe.recipe import Recipe
from mumoe.select.split import expert_ratio, weight_ratio
from test_stages import cli, same, tensors


def test_the_split_rule_by_hand():
    assert expert_ratio(0.4) == pytest.approx(0.2) and expert_ratio(0.5, 0.25) == pytest.approx(0.125)
    assert weight_ratio(0.4, 0.2) == pytest.approx(0.25)  # 0.2 + 0.8 x 0.25 = 0.4
    assert weight_ratio(0.4, 0.4) == 0 and weight_ratio(0.4, 0.5) == 0  # the expert stage reached it already
    for e in (0.0, 0.1, 0.1875, 0.3):
        s = weight_ratio(0.4, e)
        assert e + (1 - e) * s == pytest.approx(0.4)


def test_the_recipe_sets_records_and_replays_the_ratios():
    r = Recipe.build("stun", 0.0, calib="domain").then("wanda", 0.0).split(0.4)
    assert (r.ratio, r.later[0].ratio, r.expert_share) == (pytest.approx(0.2), 0.25, 0.5)
    assert Recipe.from_dict(r.to_dict()) == r and r.to_dict()["expert_params"] == 0.4
    r = Recipe.build("reap", 0.0, calib="domain").then("wanda", 0.0, budget="owl").split(0.5, 0.25)
    assert r.ratio == 0.125 and r.later[0].ratio == round(0.375 / 0.875, 6)
    assert [s.ratio for s in r.stages] == [r.ratio, r.later[0].ratio]  # each stage alone carries no split
    for bad, words in ((lambda: Recipe.build("wanda", 0.0, calib="domain").then("reap", 0.0).split(0.4),
                        "an expert stage and a weight stage"),
                       (lambda: Recipe.build("stun", 0.0).split(0.4), "stages are expert"),
                       (lambda: Recipe.build("stun", 0.0, calib="domain").then("wanda", 0.0).split(1.0), "--expert-params"),
                       (lambda: Recipe.build("stun", 0.0, calib="domain").then("wanda", 0.0).split(0.4, 0), "--expert-share"),
                       (lambda: Recipe.from_dict({"method": "stun", "ratio": 0.2, "expert_share": 0.3}),
                        "give --expert-params too")):
        with pytest.raises(MumoeError, match=words):
            bad()


@pytest.fixture
def mixtral(tmp_path):
    """A tiny Mixtral with 16 experts in 4 layers (STUN's clusters differ per layer), a character tokenizer and a
    calibration text."""
    from mumoe.models.tiny import tiny_model

    tiny_model("mixtral", seed=0, num_local_experts=16, num_hidden_layers=4).save_pretrained(tmp_path / "m")
    char_tokenizer().save_pretrained(tmp_path / "m")
    (tmp_path / "c.txt").write_text(SAMPLE_TEXT * 4)
    return tmp_path


def test_stun_then_wanda_equals_two_commands_and_counts_what_it_removed(mixtral, capsys):
    m, calib = str(mixtral / "m"), ["--calib", str(mixtral / "c.txt"), "--nsamples", "4", "--seqlen", "16"]
    out = cli(["prune", m, "--method", "stun", "--then", "wanda", "--expert-params", "0.4", *calib,
               "--out", str(mixtral / "both")], capsys)
    assert "combined budget: 40% of the routed-expert weights" in out and "routed-expert weights removed" in out
    rec = json.loads((mixtral / "both" / "pruning.json").read_text())
    assert rec["form"] == "mumoe" and rec["method"] == "stun" and [s["method"] for s in rec["stages"]] == \
        ["stun", "wanda"]
    kept = {e["layer"]: len(e["kept"]) for e in rec["layers"]}
    assert len(set(kept.values())) > 1  # per-layer counts: only mumoe.load (or remote code) reads the shapes
    done = 1 - sum(kept.values()) / 64
    assert rec["stages"][1]["ratio"] == round(weight_ratio(0.4, done), 6)  # corrected for what STUN removed

    # the same two stages as two commands, the second on the first's export
    cli(["prune", m, "--method", "stun", "--ratio", "0.2", "--out", str(mixtral / "first")], capsys)
    cli(["prune", str(mixtral / "first"), "--method", "wanda", "--ratio", str(rec["stages"][1]["ratio"]), *calib,
         "--out", str(mixtral / "second")], capsys)
    same(mixtral / "both", mixtral / "second")
    second = json.loads((mixtral / "second" / "pruning.json").read_text())
    assert second["form"] == "mumoe" and second["layers"] == rec["layers"] and second["removed"] == rec["removed"]

    # what was removed, counted from the export's tensors as mumoe.load reads them (fused; the files keep the
    # family's own per-expert layout): the dropped experts whole, zeros in the kept ones
    t = dict(mumoe.load(mixtral / "both").named_parameters())
    per_expert = t["model.layers.0.mlp.experts.gate_up_proj"][0].numel() + \
        t["model.layers.0.mlp.experts.down_proj"][0].numel()
    zeros = sum(int((t[f"model.layers.{j}.mlp.experts.{n}"] == 0).sum()) for j in range(4)
                for n in ("gate_up_proj", "down_proj"))
    removed = sum(16 - k for k in kept.values()) * per_expert + zeros
    assert rec["removed"] == {"expert_params": 64 * per_expert, "expert_params_removed": removed,
                              "share": round(removed / (64 * per_expert), 6)}
    # never more than asked; short of it by Wanda's floor(s·d_in) per row, under 1/d_in (d_in 16 for down_proj here)
    assert 0.4 - 1 / 16 < rec["removed"]["share"] <= 0.4

    # replayed in memory from its record: the export reloads to that model's logits
    model = mumoe.load(m)
    mumoe.prune(model, Recipe.load(mixtral / "both"), tokenizer=char_tokenizer())
    x = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(mumoe.load(mixtral / "both")(x).logits, model(x).logits, atol=1e-6, rtol=0)


def test_layer_sequential_splits_as_in_memory_and_refuses_unreadable_shapes(ckpt, capsys):
    m, calib = str(ckpt / "m"), ["--calib", str(ckpt / "c.txt"), "--nsamples", "4", "--seqlen", "16"]
    for how in ("off", "on"):
        cli(["prune", m, "--method", "reap", "--then", "wanda", "--expert-params", "0.4", *calib,
             "--layerwise", how, "--out", str(ckpt / how)], capsys)
    same(ckpt / "off", ckpt / "on")
    for how in ("off", "on"):  # 8 experts: 0.2 x 8 rounds to 2 dropped (25%), so the weights take 0.15 / 0.75
        rec = json.loads((ckpt / how / "pruning.json").read_text())
        assert rec["stages"][1]["ratio"] == pytest.approx(0.2)
    q = tensors(ckpt / "on")["model.layers.0.self_attn.q_proj.weight"]  # floor(0.2 x 32) = 6 of every row's 32
    assert ((q == 0).sum(1) == 6).all()

    rc = main(["prune", m, "--method", "stun-coselect", "--ratio", "0.25", "--then", "wanda:0.3", *calib,
               "--layerwise", "on", "--out", str(ckpt / "x")])
    err = capsys.readouterr().err
    assert rc != 0 and "--layerwise off" in err and len(err.strip().splitlines()) == 1
    for argv, words in ((["--ratio", "0.2", "--then", "wanda"], "drop --ratio"),
                        (["--then", "wanda:0.3"], "sets the stage's ratio"),
                        (["--then", "wanda", "--expert-share", "0.5"], "give --expert-params too")):
        extra = [] if "--expert-share" in argv else ["--expert-params", "0.4"]
        rc = main(["prune", m, "--method", "reap", *argv, *extra, *calib, "--out", str(ckpt / "y")])
        err = capsys.readouterr().err
        assert rc != 0 and words in err, err
    assert not (ckpt / "x").exists() and not (ckpt / "y").exists()
