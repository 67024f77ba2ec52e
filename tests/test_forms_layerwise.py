"""mumoe's own forms (HEAPr's per-expert widths, PMQ's packed experts) written layer by layer from the checkpoint's
files, on the families whose files spell the MoE block their own way: Jamba (`feed_forward`), Mixtral (legacy
`block_sparse_moe` + `w1/w2/w3`, renamed on loading), Granite (fused `input_linear`, renamed on loading), Nemotron-H
(`backbone.` prefix, `mixer` blocks, experts without a gate), JetMoE (experts as `input_linear` / `output_linear`, a
swapped block), DeepSeek-V4 (its original release's names, hyper-connection streams, a token table in int64). Each export must load with mumoe.load and with plain
transformers (trust_remote_code) to the logits of the model pruned / quantized in memory.

(Found by this test: Jamba's layer-by-layer HEAPr global export named its experts `mlp.*`; mumoe.load failed with a
KeyError and trust_remote_code loaded random experts — NaN logits.)"""

import pytest
import torch

from conftest import assert_reloads_to, ids
import mumoe
import mumoe.api
from mumoe.apply import save_pruned
from mumoe.drivers.layerwise import prune_layerwise
from mumoe.drivers.quantize import quantize_layerwise
from mumoe.models.tiny import tiny_model
from mumoe.recipe import Recipe

FAMILIES = ["jamba", "mixtral", "granitemoe", "nemotron_h", "jetmoe", "deepseek_v4"]


def _loads_to(folder, expected, x):
    assert_reloads_to(folder, x, expected, 1e-5 * max(1.0, expected.abs().max().item()))


@pytest.mark.parametrize("family", FAMILIES)
def test_ragged_and_packed_forms_layer_by_layer_load_everywhere(family, tmp_path):
    src = tmp_path / "src"
    tiny_model(family).save_pretrained(src)
    wins, x = ids(6, 16, seed=1), ids(2, 12, seed=3)

    recipe = Recipe.build("heapr", 0.4, calib="tensor", nsamples=6, seqlen=16, form="global")
    report = prune_layerwise(src, recipe, tmp_path / "atoms", (wins, None, {"source": "tensor"}), verbose=False)
    model = mumoe.load(src, "fp32")
    ref = mumoe.api.prune(model, recipe, calib=wins)
    assert report.layers == ref.layers and report.form == "mumoe-atoms"
    save_pruned(model, tmp_path / "atoms-memory", ref)
    with torch.no_grad():
        expected = model(x).logits
    _loads_to(tmp_path / "atoms", expected, x)
    _loads_to(tmp_path / "atoms-memory", expected, x)

    quant = quantize_layerwise(str(src), str(tmp_path / "quant"), (wins, None, {}), 2.0, group=8, batch_size=2)
    fresh = mumoe.load(src, "fp32")
    mem = mumoe.quantize(fresh, 2.0, wins, group=8, batch_size=2)
    assert quant.layers == mem.layers and quant.form == "mumoe-quant"
    save_pruned(fresh, tmp_path / "quant-memory", mem)
    with torch.no_grad():
        expected = fresh(x).logits
    _loads_to(tmp_path / "quant", expected, x)
    _loads_to(tmp_path / "quant-memory", expected, x)
