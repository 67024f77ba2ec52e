"""AIMER streamed from safetensors files, streamed export, and the global budget."""

import json

import pytest
import torch
from safetensors.torch import save_model
from transformers import AutoModelForCausalLM

from conftest import SAMPLE_TEXT, char_tokenizer, ids, make
import mumoe
from mumoe import MumoeError
from mumoe.criteria.aimer_stream import stream_aimer
from mumoe.api import prune_streamed
from mumoe.cli import main
from mumoe.select import keep_global


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3", "mixtral"])
@pytest.mark.parametrize("layout", ["legacy", "fused"])
def test_streamed_aimer_equals_in_memory(tmp_path, arch, layout):
    model = make(arch)
    if layout == "legacy":
        model.save_pretrained(tmp_path)  # transformers' default: per-expert keys
    else:
        model.config.save_pretrained(tmp_path)
        save_model(model, str(tmp_path / "model.safetensors"))  # fused [E, 2I, H] keys
    streamed = stream_aimer(tmp_path, progress=False)
    in_memory = mumoe.score(model, "aimer")
    layers = [l.index for l in mumoe.models.moe_adapter_for(model).moe_layers()]
    assert sorted(streamed) == layers
    for L, s in zip(layers, in_memory):
        assert torch.equal(streamed[L], s)


def test_streamed_export_equals_in_memory_pruning(tmp_path):
    model, x = make("deepseek_v3"), ids()
    model.save_pretrained(tmp_path / "src")
    report = prune_streamed(tmp_path / "src", 0.5, tmp_path / "out", progress=False)
    mumoe.prune(model, "aimer", 0.5)
    reloaded, info = AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    with torch.no_grad():
        assert (reloaded(x).logits - model(x).logits).abs().max() <= 1e-5
    pj = json.loads((tmp_path / "out" / "pruning.json").read_text())
    assert pj["method"] == "aimer" and [e["kept"] for e in pj["layers"]] == [e["kept"] for e in report.layers]
    assert json.loads((tmp_path / "out" / "config.json").read_text())["n_routed_experts"] == 4


def test_global_budget_hand_worked():
    # layer 0 scores sum to 10, layer 1 to 100: normalized, layer 1's 5 (0.05) is the smallest, then layer 0's 1 (0.1)
    scores = [torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([5.0, 25.0, 30.0, 40.0])]
    assert keep_global(scores, 0.25, [2, 2]) == [[1, 2, 3], [1, 2, 3]]
    # the floor: layer 0 can lose at most 2 even though its three small experts are the least worth keeping;
    # ties keep the lower index
    assert keep_global([torch.tensor([1e-3, 1e-3, 1e-3, 1.0]), torch.tensor([1.0, 1.0, 1.0, 1.0])], 0.5, [2, 2]) == \
        [[0, 3], [0, 1]]
    with pytest.raises(MumoeError, match="floor"):
        keep_global(scores, 0.75, [2, 2])


def test_global_budget_prunes_and_reloads(tmp_path):
    model, x = make("qwen3_moe"), ids()
    report = mumoe.prune(model, "frequency", 0.5, calib=ids(4, 16, seed=9), budget="global")
    counts = [len(e["kept"]) for e in report.layers]
    assert sum(counts) == 8 and min(counts) >= 2
    out = mumoe.save_pruned(model, tmp_path / "g", report)
    if report.form == "mumoe":
        again = mumoe.load(out)
        with torch.no_grad():
            assert (again(x).logits - model(x).logits).abs().max() <= 1e-5
    with pytest.raises(MumoeError, match="group-limited"):
        mumoe.prune(make("deepseek_v3"), "aimer", 0.5, budget="global")


def test_cli_calibrated_and_streamed(tmp_path, capsys):
    model, tok = make("qwen3_moe"), char_tokenizer()
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    (tmp_path / "c.txt").write_text(SAMPLE_TEXT)
    rc = main(["prune", str(tmp_path / "m"), "--method", "reap", "--ratio", "0.5", "--out", str(tmp_path / "o1")])
    out, err = capsys.readouterr()
    assert rc == 2 and "needs calibration data" in err and not (tmp_path / "o1").exists()
    rc = main(["prune", str(tmp_path / "m"), "--method", "reap", "--ratio", "0.5", "--out", str(tmp_path / "o1"),
               "--calib", str(tmp_path / "c.txt"), "--nsamples", "4", "--seqlen", "32"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    pj = json.loads((tmp_path / "o1" / "pruning.json").read_text())
    assert pj["calibration"]["nsamples"] == 4 and pj["calibration"]["seqlen"] == 32
    expected = mumoe.score(model, "reap", calib=str(tmp_path / "c.txt"), tokenizer=tok, nsamples=4, seqlen=32)
    for entry, s in zip(pj["layers"], expected):  # CLI model loads with sdpa attention, this one eager
        torch.testing.assert_close(torch.tensor(entry["scores"], dtype=torch.float64), s, rtol=1e-5, atol=1e-9)
    rc = main(["prune", str(tmp_path / "m"), "--method", "aimer", "--ratio", "0.25", "--out", str(tmp_path / "o2")])
    out, err = capsys.readouterr()
    assert rc == 0 and "streamed from the checkpoint files" in out and "model not loaded" in out
    assert (tmp_path / "o2" / "tokenizer.json").exists()
