"""Recipe: validated before anything loads, recorded in pruning.json, replayed exactly; seeds reach the windows."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import SAMPLE_TEXT
from mumoe import MumoeError
from mumoe.cli import main
from mumoe.observe.calib import spec_windows
from mumoe.recipe import CalibSpec, Recipe


def cli(argv, capsys):
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def test_seed_reaches_the_calibration_windows(tok, tmp_path):
    (tmp_path / "c.txt").write_text(SAMPLE_TEXT * 4)
    src = (str(tmp_path / "c.txt"),)
    first = spec_windows(tok, CalibSpec(src, 6, 16))[0]
    a, b, c = (spec_windows(tok, CalibSpec(src, 6, 16, seed=s))[0] for s in (1, 1, 2))
    ids = torch.tensor(tok(SAMPLE_TEXT * 4, add_special_tokens=False)["input_ids"])
    assert torch.equal(first, ids[: 6 * 16].view(6, 16))  # no seed: the first consecutive windows
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, first)
    for w in a:  # every seeded window is a real slice of the text
        assert any(torch.equal(w, ids[s:s + 16]) for s in range(len(ids) - 15))


def test_cli_seed_changes_windows_and_is_recorded(ckpt, capsys):
    base = ["prune", str(ckpt / "m"), "--method", "reap", "--ratio", "0.5", "--calib", str(ckpt / "c.txt"),
            "--nsamples", "3", "--seqlen", "16"]
    runs = {}
    for name, seed in (("a", "1"), ("b", "1"), ("c", "7")):
        rc, _, err = cli(base + ["--seed", seed, "--out", str(ckpt / name)], capsys)
        assert rc == 0, err
        runs[name] = json.loads((ckpt / name / "pruning.json").read_text())
    assert runs["a"]["calibration"]["seed"] == 1 and runs["c"]["recipe"]["calib"]["seed"] == 7
    assert runs["a"]["layers"] == runs["b"]["layers"]  # same seed: identical scores and kept sets
    assert [e["scores"] for e in runs["a"]["layers"]] != [e["scores"] for e in runs["c"]["layers"]]


@pytest.mark.parametrize("flags", [
    ["--method", "reap", "--ratio", "0.5", "--order", "progressive"],
    ["--method", "heapr", "--ratio", "0.25", "--form", "global"],
    ["--method", "wanda", "--ratio", "0.5", "--structure", "2:4"],
], ids=["expert", "atom", "weight"])
def test_recipe_replay_gives_the_same_run(ckpt, capsys, flags):
    rc, _, err = cli(["prune", str(ckpt / "m"), *flags, "--calib", str(ckpt / "c.txt"), "--nsamples", "3",
                      "--seqlen", "16", "--seed", "5", "--out", str(ckpt / "first")], capsys)
    assert rc == 0, err
    rc, out, err = cli(["prune", "--recipe", str(ckpt / "first" / "pruning.json"), "--out", str(ckpt / "again")],
                       capsys)
    assert rc == 0, err
    a, b = (json.loads((ckpt / d / "pruning.json").read_text()) for d in ("first", "again"))
    assert a["recipe"] == b["recipe"] and a["layers"] == b["layers"] and a["model"] == b["model"]
    ta, tb = (load_file(ckpt / d / "model.safetensors") for d in ("first", "again"))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_recipe_dict_round_trip_and_strictness():
    r = Recipe.build("heapr", 0.3, calib=["domain:code", "domain:prose"], nsamples=10, seed=4, form="global",
                     scope="layer")
    assert Recipe.from_dict(json.loads(json.dumps(r.to_dict()))) == r
    assert r.calib.batch_size == 4 and r.atom.scope == "layer" and r.expert is None
    assert CalibSpec(("a", "b", "c"), 10).per_source() == [4, 3, 3]
    with pytest.raises(MumoeError, match="unknown fields: colour"):
        Recipe.from_dict({**r.to_dict(), "colour": 1})
    with pytest.raises(MumoeError, match="version 9"):
        Recipe.from_dict({**r.to_dict(), "version": 9})
    with pytest.raises(MumoeError, match="atom-grain"):
        Recipe.from_dict({**r.to_dict(), "expert": {"budget": "uniform", "order": "one-shot"}})
    assert Recipe.build("aimer", 0.5, order="progressive").expert.order == "one-shot"  # data-free: order moot


@pytest.mark.parametrize("kwargs, message", [
    ({"method": "reap", "ratio": 1.0, "calib": "x"}, "ratio must be in"),
    ({"method": "reap", "ratio": "abc", "calib": "x"}, "ratio must be a number"),
    ({"method": "reap", "ratio": 0.5}, "needs calibration"),
    ({"method": "reap", "ratio": 0.5, "calib": "x", "nsamples": 0}, "nsamples must be an integer >= 1"),
    ({"method": "reap", "ratio": 0.5, "calib": "x", "nsamples": -3}, "nsamples must be an integer >= 1"),
    ({"method": "reap", "ratio": 0.5, "calib": ["a", "b", "c"], "nsamples": 2}, "fewer than the 3"),
    ({"method": "reap", "ratio": 0.5, "calib": "x", "budget": "global", "order": "progressive"}, "progressive"),
    ({"method": "wanda", "ratio": 0.3, "calib": "x", "structure": "2:4"}, "removes 50% .* says 30%"),
    ({"method": "wanda", "ratio": 0.5, "calib": "x", "structure": "4:2"}, "0 < N <= M"),
    ({"method": "magnitude", "ratio": 0.5, "structure": "column"}, "one threshold per matrix"),
    ({"method": "heapr", "ratio": 0.5, "calib": "x", "form": "ragged"}, "unknown form"),
    ({"method": "nope", "ratio": 0.5}, "unknown method"),
    ({"method": "reap", "ratio": 0.5, "calib": "x", "device": "tpu"}, "unknown device"),
])
def test_recipe_refuses_bad_values(kwargs, message):
    with pytest.raises(MumoeError, match=message):
        Recipe.build(**kwargs)


def test_cli_validates_before_loading(ckpt, capsys):
    """Errors that need only the flags, or only config.json, come before any weights are read: a model path
    that does not exist is never reached, and N:M is checked against the config's widths."""
    missing = str(ckpt / "no-such-model")
    for flags, message in ((["--method", "wanda", "--ratio", "0.3", "--structure", "2:4", "--calib", "domain"],
                            "removes 50%"),
                           (["--method", "reap", "--ratio", "0.5", "--calib", "domain", "--nsamples", "0"],
                            "nsamples"),
                           (["--method", "reap", "--ratio", "0.5", "--calib", str(ckpt / "none.txt")], "not found")):
        rc, out, err = cli(["prune", missing, *flags, "--out", str(ckpt / "o")], capsys)
        assert rc == 2 and message in err and err.count("mumoe: error:") == 1 and not (ckpt / "o").exists()
    rc, _, err = cli(["prune", str(ckpt / "m"), "--method", "wanda", "--ratio", str(1 - 3 / 7), "--structure", "3:7",
                      "--calib", str(ckpt / "c.txt"), "--out", str(ckpt / "o")], capsys)
    assert rc == 2 and "M=7 to divide every input width; this model has width(s) 16, 32" in err
    rc, _, err = cli(["prune", "--recipe", str(ckpt / "none.json"), "--out", str(ckpt / "o")], capsys)
    assert rc == 2 and "recipe not found" in err
    rc, _, err = cli(["prune", "--recipe", str(ckpt / "none.json"), "--method", "reap", "--out", str(ckpt / "o")],
                     capsys)
    assert rc == 2 and "drop --method" in err


def test_cli_device_that_is_not_there(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    rc, _, err = cli(["eval", "tiny:qwen3_moe", "--ppl", "domain", "--device", "cuda"], capsys)
    assert rc == 2 and "no CUDA GPU" in err and err.count("\n") == 1


def test_heapr_says_which_form(ckpt, capsys):
    base = ["prune", str(ckpt / "m"), "--method", "heapr", "--ratio", "0.25", "--calib", str(ckpt / "c.txt"),
            "--nsamples", "2", "--seqlen", "16"]
    rc, out, _ = cli(base + ["--out", str(ckpt / "u")], capsys)
    assert rc == 0 and "the paper's method is the global ranking: --form global --scope global" in out
    rc, out, _ = cli(base + ["--form", "global", "--out", str(ckpt / "g")], capsys)
    assert rc == 0 and "the paper's form" in out


def test_cli_compare_equals_separate_prunes(ckpt, capsys):
    """`mumoe compare` on a real checkpoint: its kept sets and scores are those of `mumoe prune` per method."""
    calib = ["--calib", str(ckpt / "c.txt"), "--nsamples", "3", "--seqlen", "16", "--batch-size", "2"]
    rc, out, err = cli(["compare", str(ckpt / "m"), "--methods", "reap,peu,heapr", "--ratio", "0.5", *calib,
                        "--out", str(ckpt / "cmp")], capsys)
    assert rc == 0, err
    assert "one calibration pass for 3 methods" in out
    res = json.loads((ckpt / "cmp" / "results.json").read_text())
    for m in ("reap", "peu", "heapr"):
        rc, _, err = cli(["prune", str(ckpt / "m"), "--method", m, "--ratio", "0.5", *calib, "--out",
                          str(ckpt / m)], capsys)
        assert rc == 0, err
        assert json.loads((ckpt / m / "pruning.json").read_text())["layers"] == res["reports"][f"{m}@0.5"]["layers"]
    # a weight method and a two-stage row (passes of their own) record what `mumoe prune` records
    rc, out, err = cli(["compare", str(ckpt / "m"), "--methods", "wanda,reap+wanda:budget=owl", "--ratio", "0.4",
                        *calib, "--out", str(ckpt / "cmp2")], capsys)
    assert rc == 0, err
    assert "reap+wanda +owl, wanda: passes of their own" in out and "expert weights removed" in out
    res = json.loads((ckpt / "cmp2" / "results.json").read_text())
    for key, argv in (("wanda@0.4", ["--method", "wanda", "--ratio", "0.4"]),
                      ("reap+wanda +owl@0.4", ["--method", "reap", "--then", "wanda:budget=owl", "--expert-params",
                                               "0.4"])):
        folder = ckpt / key.split("@")[0].replace(" ", "")
        rc, _, err = cli(["prune", str(ckpt / "m"), *argv, *calib, "--out", str(folder)], capsys)
        assert rc == 0, err
        rec = json.loads((folder / "pruning.json").read_text())
        assert rec["layers"] == res["reports"][key]["layers"] and rec["removed"] == res["reports"][key]["removed"]
        assert rec.get("stages") == res["reports"][key].get("stages")
    assert [(r["ratio"], "removed" in r) for r in res["rows"]] == [(0.4, True), (0.4, True)]
    rc, _, err = cli(["compare", str(ckpt / "m"), "--methods", "wanda+reap", *calib], capsys)
    assert rc == 2 and "an expert stage and a weight stage" in err and err.count("\n") == 1
