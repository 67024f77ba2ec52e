"""JetMoE (`models.jetmoe`): its sparse MLP swapped for a block in transformers v5's expert conventions computes what
transformers' JetMoeMoE computes, its state dict stays the family's own, and since `num_local_experts` also sizes
the attention experts, removing or merging experts is refused in one line before any work (the CLI: exit 2, nothing
written). The family's other checks are in test_families.py and test_forms_layerwise.py."""

import torch

from conftest import ids
from mumoe.cli import main
from mumoe.models import moe_adapter_for
from mumoe.models.jetmoe import SparseBlock
from mumoe.models.tiny import tiny_model


def test_swapped_block_computes_what_transformers_does():
    model = tiny_model("jetmoe")
    original = model.model.layers[0].mlp  # transformers' JetMoeMoE
    with torch.no_grad():
        original.bias.normal_()  # (initialised to zero: a non-zero bias must be added too)
    x = torch.randn(2, 7, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = original(x)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        layer = moe_adapter_for(model).moe_layers()[0]
        assert isinstance(model.model.layers[0].mlp, SparseBlock) and layer.block is model.model.layers[0].mlp
        got = layer.block(x)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(want, want - original.bias)  # the bias mattered
    after = model.state_dict()  # the family's own names and tensors, unchanged by the swap
    assert set(state) == set(after)
    assert all(torch.equal(state[k], after[k]) for k in state)
    assert "model.layers.0.mlp.input_linear.weight" in after and not any(".mlp.experts." in k for k in after)


def test_expert_removal_refused_before_any_work(tmp_path, capsys):
    src, out = tmp_path / "src", tmp_path / "out"
    tiny_model("jetmoe").save_pretrained(src)
    capsys.readouterr()  # (save_pretrained's progress bar)
    for method in ("aimer", "frequency"):
        extra = [] if method == "aimer" else ["--calib", "tensor"]
        rc = main(["prune", str(src), "--method", method, "--ratio", "0.25", "--out", str(out), *extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1, err
        assert "attention experts" in err[0] and "removing or merging experts is not supported" in err[0]
        assert not out.exists()
    x = ids(2, 10)
    model = tiny_model("jetmoe")
    with torch.no_grad():
        dense = model(x).logits
    import mumoe
    report = mumoe.prune(model, "heapr", 0.5, calib=ids(4, 16, seed=1), batch_size=4)  # atoms: the config holds them
    assert report.grain == "atom" and model.config.intermediate_size == 8
    with torch.no_grad():
        assert not torch.allclose(model(x).logits, dense)


def test_task_library_refused_before_the_model_is_read(tmp_path, capsys):
    """A PreMoe task model holds fewer experts: `mumoe taer build` refuses JetMoE in one line, nothing written."""
    src, out = tmp_path / "src", tmp_path / "lib"
    tiny_model("jetmoe").save_pretrained(src)
    capsys.readouterr()
    rc = main(["taer", "build", str(src), "--task", "domain", "--keep", "4", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "attention experts" in err[0], err
    assert not out.exists()
