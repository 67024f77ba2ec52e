"""DeepSeek-V4 (`models.deepseek_v4`): its hash-routed layers pick experts from a fixed token table, so expert methods
and merges keep them whole and prune the learned layers (per-layer counts: mumoe's own form, which loads with
mumoe.load and with transformers' trust_remote_code to the logits of the model pruned in memory); slicing a hash
layer refuses; STUN, which clusters all layers at once, refuses in one line. The family's other checks are in
test_families.py (routing of both router kinds, recomposition, exports, layer-sequential = in memory for REAP and
Wanda) and test_forms_layerwise.py (HEAPr's global form and PMQ, layer by layer)."""

import json

import pytest
import torch
from conftest import ids, assert_reloads_to
import mumoe
from mumoe import MumoeError
from mumoe.apply import save_pruned
from mumoe.apply.experts import slice_layer
from mumoe.cli import main
from mumoe.models import moe_adapter_for
from mumoe.models.tiny import tiny_model


def test_hash_layers_are_kept_whole_and_the_export_loads(tmp_path):
    model, x = tiny_model("deepseek_v4"), ids(2, 12, seed=3)
    report = mumoe.prune(model, "frequency", 0.25, calib=ids(4, 16, seed=1), batch_size=4)
    kept = {e["layer"]: e["kept"] for e in report.layers}
    assert kept[0] == list(range(8)) and len(kept[1]) == len(kept[2]) == 6 and report.form == "mumoe"
    with torch.no_grad():
        expected = model(x).logits
    assert_reloads_to(save_pruned(model, tmp_path / "freq", report), x, expected)


def test_streamed_aimer_keeps_the_hash_layer(tmp_path, capsys):
    src, out = tmp_path / "src", tmp_path / "out"
    tiny_model("deepseek_v4").save_pretrained(src)
    assert main(["prune", str(src), "--method", "aimer", "--ratio", "0.25", "--out", str(out)]) == 0
    layers = json.loads((out / "pruning.json").read_text())["layers"]
    assert [len(e["kept"]) for e in layers] == [8, 6, 6]
    rc = main(["prune", str(src), "--method", "stun", "--ratio", "0.25", "--out", str(tmp_path / "stun")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and "hash routing" in err[-1] and not (tmp_path / "stun").exists()


def test_a_hash_layer_is_never_sliced():
    model = tiny_model("deepseek_v4")
    x = ids(2, 10)
    with torch.no_grad():
        before = model(x).logits
    hashed = [l for l in moe_adapter_for(model).moe_layers() if l.fixed_routing]
    assert [l.index for l in hashed] == [0]
    with pytest.raises(MumoeError) as e:
        slice_layer(hashed[0], [0, 1, 2, 3])
    assert "hash routing" in str(e.value)
    slice_layer(hashed[0], list(range(8)))  # keeping every expert is no change: allowed
    with torch.no_grad():
        assert torch.equal(model(x).logits, before)
