"""Multi-stage recipes (`--then METHOD:RATIO`): a two-stage run equals the two stages run as two `mumoe prune`
commands (the second on the first's export, same calibration), tensor for tensor; it replays from its
pruning.json; in memory, layer by layer and from Python it gives the same export."""

import json
import socket

import pytest
import torch
from safetensors.torch import load_file

import mumoe
from mumoe import MumoeError
from mumoe.cli import main
from mumoe.files import OWNER, owned_temp_dir
from mumoe.recipe import Recipe, parse_stage


def cli(argv, capsys):
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == 0, err
    return out


def tensors(folder):
    return load_file(folder / "model.safetensors")


def same(a, b):
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), k


def test_two_stages_equal_two_commands_replay_and_layerwise(ckpt, capsys):
    calib = ["--calib", str(ckpt / "c.txt"), "--nsamples", "4", "--seqlen", "16"]
    m = str(ckpt / "m")
    out = cli(["prune", m, "--method", "reap", "--ratio", "0.25", "--then", "wanda:0.5", *calib,
               "--layerwise", "off", "--out", str(ckpt / "both")], capsys)
    assert "then 50% of weights (row) with wanda" in out and "stage 2 of 2" in out
    cli(["prune", m, "--method", "reap", "--ratio", "0.25", *calib, "--layerwise", "off",
         "--out", str(ckpt / "first")], capsys)
    cli(["prune", str(ckpt / "first"), "--method", "wanda", "--ratio", "0.5", *calib, "--out", str(ckpt / "second")],
        capsys)
    same(ckpt / "both", ckpt / "second")
    w = tensors(ckpt / "both")["model.layers.0.self_attn.q_proj.weight"]
    assert (w == 0).float().mean() == 0.5  # the second stage really ran (half of every row)
    assert tensors(ckpt / "both")["model.layers.0.mlp.gate.weight"].shape[0] == 6  # and the first (8 -> 6 experts)

    rec = json.loads((ckpt / "both" / "pruning.json").read_text())
    first = json.loads((ckpt / "first" / "pruning.json").read_text())
    assert rec["schema"] == 2 and rec["grain"] == "weight" and rec["model"]["source"] == m
    assert [s["method"] for s in rec["stages"]] == ["reap", "wanda"]
    assert rec["stages"][0]["layers"] == first["layers"]  # the experts stage's kept sets are recorded too
    assert rec["recipe"]["then"] == [{"method": "wanda", "ratio": 0.5, "weight": {
        "structure": "row", "order": "one-shot", "budget": "uniform", "owl_m": 5.0, "owl_lambda": 0.08}}]
    cli(["prune", "--recipe", str(ckpt / "both" / "pruning.json"), "--out", str(ckpt / "replay")], capsys)
    same(ckpt / "both", ckpt / "replay")

    stale = owned_temp_dir(ckpt, ".seq.stages-")  # the earlier exports of a multi-stage run that was killed
    (stale / OWNER).write_text(json.dumps({"pid": 2**22 - 1, "host": socket.gethostname(), "start": 0}))
    out = cli(["prune", m, "--method", "reap", "--ratio", "0.25", "--then", "wanda:0.5", *calib, "--layerwise", "on",
               "--out", str(ckpt / "seq")], capsys)
    assert f"removed {stale}" in out
    assert "layer by layer" in out
    same(ckpt / "both", ckpt / "seq")
    seq = json.loads((ckpt / "seq" / "pruning.json").read_text())
    assert seq["recipe"] == rec["recipe"] and seq["stages"][0]["layers"] == rec["stages"][0]["layers"]
    assert not [p for p in ckpt.iterdir() if p.name.startswith(".")]  # the stage folder is gone

    report = mumoe.prune(m, Recipe.load(ckpt / "both"), layerwise=True, out=ckpt / "py")
    same(ckpt / "seq", ckpt / "py")
    assert report.recipe == rec["recipe"]


def test_python_prune_of_a_path_equals_the_cli(ckpt, capsys):
    """mumoe.prune(path, recipe, layerwise=True, out=...) writes what `mumoe prune --layerwise on` writes."""
    m = str(ckpt / "m")
    cli(["prune", m, "--method", "heapr", "--ratio", "0.25", "--form", "global", "--calib", str(ckpt / "c.txt"),
         "--nsamples", "4", "--seqlen", "16", "--layerwise", "on", "--out", str(ckpt / "cli")], capsys)
    recipe = Recipe.build("heapr", 0.25, calib=str(ckpt / "c.txt"), nsamples=4, seqlen=16, form="global",
                          device="cpu")
    mumoe.prune(m, recipe, layerwise=True, out=ckpt / "py")
    same(ckpt / "cli", ckpt / "py")
    a, b = (json.loads((ckpt / d / "pruning.json").read_text()) for d in ("cli", "py"))
    assert a["layers"] == b["layers"] and a["form"] == b["form"] == "mumoe-atoms"


def test_stage_parsing_and_refusals(ckpt, capsys):
    assert parse_stage("wanda:0.5:structure=2:4").part.structure == "2:4"
    assert parse_stage("heapr:0.25:form=global:width-multiple=8").part.width_multiple == 8
    for text, message in [("wanda", "METHOD:RATIO"), ("wanda:x", "not a number"), ("wanda:0.5:row", "OPTION=VALUE"),
                          ("wanda:0.5:budget=global", "not a weight budget"), ("wanda:0.5:router=bound", "router does not apply to wanda"),
                          ("nope:0.5", "unknown method"), ("heapr:0.25:width_multiple=x", "must be an integer")]:
        with pytest.raises(MumoeError, match=message):
            parse_stage(text)
    with pytest.raises(MumoeError, match="stage 1 .* only mumoe.load reads; a later atom stage"):
        Recipe.build("reap", 0.25, calib="x", budget="global").then("heapr", 0.5)
    assert Recipe.build("reap", 0.25, calib="x", budget="global").then("wanda", 0.5).later  # weights zeroed only
    with pytest.raises(MumoeError, match="needs calibration"):
        Recipe.build("aimer", 0.25).then("wanda", 0.5)
    r = Recipe.build("reap", 0.25, calib="x").then("wanda", 0.5, structure="2:4")
    assert Recipe.from_dict(json.loads(json.dumps(r.to_dict()))) == r
    assert Recipe.build("reap", 0.25, calib="x").to_dict().keys() >= {"method", "expert"}
    assert "then" not in Recipe.build("reap", 0.25, calib="x").to_dict()  # one-stage recipes are unchanged
    rc = main(["prune", str(ckpt / "m"), "--method", "reap", "--ratio", "0.25", "--then", "wanda:0.5:router=bound",
               "--calib", str(ckpt / "c.txt"), "--out", str(ckpt / "o")])
    assert rc != 0 and "router does not apply to wanda" in capsys.readouterr().err
    assert not (ckpt / "o").exists()
