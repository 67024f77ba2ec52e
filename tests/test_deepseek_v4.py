"""DeepSeek-V4 (`models.deepseek_v4`): its hash-routed layers pick experts from a fixed token table, so removing or
merging experts is refused in one line before any work (the CLI: exit 2, nothing written) and slicing such a layer
refuses too; the layer-by-layer sweep carries the hyper-connection streams. The family's other checks are in
test_families.py (routing of both router kinds, recomposition, exports, layer-sequential = in memory for Wanda) and
test_forms_layerwise.py (HEAPr's global form and PMQ, layer by layer, loading with plain transformers)."""

import pytest
import torch

from conftest import ids
from mumoe import MumoeError
from mumoe.apply.experts import slice_layer
from mumoe.cli import main
from mumoe.models import moe_adapter_for
from mumoe.models.tiny import tiny_model


def test_expert_removal_refused_before_any_work(tmp_path, capsys):
    src, out = tmp_path / "src", tmp_path / "out"
    tiny_model("deepseek_v4").save_pretrained(src)
    capsys.readouterr()  # (save_pretrained's progress bar)
    for argv in (["--method", "aimer"], ["--method", "reap", "--calib", "tensor"], ["--method", "hc-smoe",
                                                                                    "--calib", "tensor"]):
        rc = main(["prune", str(src), *argv, "--ratio", "0.25", "--out", str(out)])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1, err
        assert "hash-routed layers" in err[0] and "removing or merging experts is not supported" in err[0]
        assert not out.exists()


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
