"""HEAPr atom scores vs independent computations; atom slicing; export / reload."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import ids, make
import mumoe
from mumoe import MumoeError
from mumoe.apply.atoms import slice_atoms_uniform
from mumoe.select.atoms import keep_global_atoms, keep_uniform_atoms, uniform_width
from mumoe.models import moe_adapter_for


def reference_atom_stats(model, calib):
    """Per token, per routed expert: h from explicit dot products, and ∂L/∂h = g_i(t)·down[:, k]ᵀ ∂L/∂y_t,
    with ∂L/∂y_t read from the model's own eager forward (gradient of the MoE block output).
    Also the H×H Fisher form: F_i = Σ_t (∂L/∂f_i(t))(∂L/∂f_i(t))ᵀ, E[(∂L/∂h_k)²] = down[:, k]ᵀ F_i down[:, k] / n."""
    layers = moe_adapter_for(model).moe_layers()
    E, I, H = layers[0].num_experts, layers[0].intermediate_size, layers[0].hidden_size
    acc = {l.index: dict(n=torch.zeros(E), h2=torch.zeros(E, I, dtype=torch.float64),
                         g2=torch.zeros(E, I, dtype=torch.float64), hg2=torch.zeros(E, I, dtype=torch.float64),
                         F=torch.zeros(E, H, H, dtype=torch.float64)) for l in layers}
    for p in model.parameters():
        p.requires_grad_(False)
    for row in calib:
        cache = {}

        def keep(module, args, output, i):
            output.retain_grad()
            cache[i] = (args[0], output)  # returns None: the output is left as it is

        hooks = [l.block.register_forward_hook(lambda m, a, o, i=l.index: keep(m, a, o, i)) for l in layers]
        x = model.get_input_embeddings()(row[None]).detach().requires_grad_(True)
        logits = model(inputs_embeds=x).logits[0]
        loss = torch.nn.functional.cross_entropy(logits[:-1], row[1:], reduction="sum")
        loss.backward()
        for h in hooks:
            h.remove()
        with torch.no_grad():
            for l in layers:
                inp, out = cache[l.index]
                X, dY = inp[0].reshape(-1, H), out.grad[0].reshape(-1, H)
                for t in range(X.shape[0]):
                    _, w, idx = l.router(X[t][None])
                    for slot, i in enumerate(idx[0].tolist()):
                        gate = l.experts.gate_up_proj[i, :I] @ X[t]
                        up = l.experts.gate_up_proj[i, I:] @ X[t]
                        h = (torch.nn.functional.silu(gate) * up).double()
                        gf = (w[0, slot] * dY[t]).double()  # ∂L/∂f_i(t)
                        gh = l.experts.down_proj[i].double().T @ gf  # ∂L/∂h
                        a = acc[l.index]
                        a["n"][i] += 1
                        a["h2"][i] += h**2
                        a["g2"][i] += gh**2
                        a["hg2"][i] += h**2 * gh**2
                        a["F"][i] += torch.outer(gf, gf)
    out = {}
    for l in layers:
        a = acc[l.index]
        n = a["n"].clamp(min=1)[:, None].double()
        down = l.experts.down_proj.double()  # [E, H, I]
        fisher = torch.einsum("ehk,ehg,egk->ek", down, a["F"], down) / n  # down[:, k]ᵀ F down[:, k]
        routed = a["n"][:, None] > 0
        out[l.index] = {
            "heapr": torch.where(routed, a["h2"] / n * a["g2"] / n, -1.0),
            "heapr-fisher": torch.where(routed, a["h2"] / n * fisher, -1.0),
            "heapr-token": torch.where(routed, a["hg2"] / n, -1.0),
        }
    return out


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3", "mixtral"])
def test_scores_equal_autograd_and_fisher_references(arch):
    model = make(arch)
    calib = ids(3, 10, seed=4)
    ref = reference_atom_stats(make(arch), calib)
    heapr = mumoe.score(model, "heapr", calib=calib, batch_size=2)
    token = mumoe.score(model, "heapr-token", calib=calib, batch_size=2)
    assert all(p.grad is None for p in model.parameters())  # frozen: no weight gradients stored
    for l, s, st in zip(moe_adapter_for(model).moe_layers(), heapr, token):
        r = ref[l.index]
        torch.testing.assert_close(s, r["heapr"], rtol=1e-5, atol=1e-12)
        torch.testing.assert_close(s, r["heapr-fisher"], rtol=1e-5, atol=1e-12)
        torch.testing.assert_close(st, r["heapr-token"], rtol=1e-5, atol=1e-12)


def test_removing_one_atom_changes_output_by_h_times_down_column():
    model = make("qwen3_moe")
    layer = moe_adapter_for(model).moe_layers()[0]
    x = torch.randn(5, layer.hidden_size, generator=torch.Generator().manual_seed(1))
    e, k, I = 3, 6, layer.intermediate_size
    with torch.no_grad():
        before = layer.expert_forward(e, x)
        h_k = layer.expert_hidden(e, x)[:, k]  # [5]
        col = layer.down_proj(e)[:, k].clone()  # [H]
        keep = torch.tensor([[j for j in range(I) if j != k]] * layer.num_experts)
        slice_atoms_uniform(layer, keep)
        after = layer.expert_forward(e, x)
    torch.testing.assert_close(before - after, h_k[:, None] * col[None, :], rtol=1e-5, atol=1e-6)


def test_selection_rules():
    assert uniform_width(256, 0.25) == 192 and uniform_width(16, 0.5) == 8 and uniform_width(256, 0.1) == 232
    s = torch.tensor([[3.0, 1.0, 2.0, 1.0], [0.0, 5.0, 5.0, 1.0]])
    assert keep_uniform_atoms(s, 0.5, multiple=2).tolist() == [[0, 2], [1, 2]]
    a, b = torch.tensor([[1.0, -1.0], [4.0, 2.0]]), torch.tensor([[0.5, 3.0]])
    masks = keep_global_atoms([a, b], 0.5)  # 6 atoms, drop the 3 lowest: -1, 0.5, 1
    assert masks[0].tolist() == [[False, False], [True, True]] and masks[1].tolist() == [[False, True]]
    per_layer = keep_global_atoms([a, b], 0.5, scope="layer")
    assert per_layer[0].tolist() == [[False, False], [True, True]] and per_layer[1].tolist() == [[False, True]]


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral", "deepseek_v3"])
def test_uniform_form_exports_a_standard_checkpoint(tmp_path, arch):
    model, x = make(arch), ids()
    report = mumoe.prune(model, "heapr", 0.5, calib=ids(2, 12, seed=3), form="uniform")
    assert report.grain == "atom" and report.form == "hf"
    assert all(len(ex["kept"]) == 8 for e in report.layers for ex in e["experts"])
    with torch.no_grad():
        expected = model(x).logits
    out = mumoe.save_pruned(model, tmp_path / "u", report)
    again, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    with torch.no_grad():
        assert (again(x).logits - expected).abs().max() <= 1e-5


def test_global_form_masks_and_reloads_with_mumoe_load(tmp_path):
    model, x = make("qwen3_moe"), ids()
    report = mumoe.prune(model, "heapr", 0.4, calib=ids(2, 12, seed=3), form="global")
    widths = [len(ex["kept"]) for e in report.layers for ex in e["experts"]]
    assert sum(widths) == round(0.6 * 2 * 8 * 16) and len(set(widths)) > 1
    with torch.no_grad():
        expected = model(x).logits
    out = mumoe.save_pruned(model, tmp_path / "g", report)
    pj = json.loads((out / "pruning.json").read_text())
    assert pj["form"] == "mumoe-atoms" and pj["layers"][0]["experts"][0]["kept"] == report.layers[0]["experts"][0]["kept"]
    again = mumoe.load(out)
    with torch.no_grad():
        assert (again(x).logits - expected).abs().max() <= 1e-5
    # the stored experts are compact: only kept rows / columns
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", "pt") as f:
        assert f.get_slice("model.layers.0.mlp.experts.0.down").get_shape()[1] == widths[0]


def test_ratio_zero_and_bad_inputs():
    model, x = make("olmoe"), ids()
    with torch.no_grad():
        before = model(x).logits
    mumoe.prune(model, "atom-magnitude", 0.0, form="global")
    with torch.no_grad():
        assert torch.equal(model(x).logits, before)
    with pytest.raises(MumoeError, match="needs calibration"):
        mumoe.prune(make("olmoe"), "heapr", 0.25)


def test_cli_heapr_both_forms(tmp_path, capsys):
    from conftest import SAMPLE_TEXT, char_tokenizer
    from mumoe.cli import main

    model, tok = make("qwen3_moe"), char_tokenizer()
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    (tmp_path / "c.txt").write_text(SAMPLE_TEXT)
    common = ["prune", str(tmp_path / "m"), "--method", "heapr", "--ratio", "0.5", "--calib", str(tmp_path / "c.txt"),
              "--nsamples", "2", "--seqlen", "32"]
    assert main(common + ["--out", str(tmp_path / "u")]) == 0
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "u").config.moe_intermediate_size == 8
    assert main(common + ["--out", str(tmp_path / "g"), "--form", "global"]) == 0
    out = capsys.readouterr().out
    assert "atoms (global form)" in out and "mumoe.load" in out
    assert json.loads((tmp_path / "g" / "pruning.json").read_text())["form"] == "mumoe-atoms"
    mumoe.load(tmp_path / "g")
