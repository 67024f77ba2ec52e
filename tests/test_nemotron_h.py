"""Nemotron-H's experts have no gate (f = down · relu(up x)²): mumoe holds them as gate_up with a zero gate half
(`models.nemotron_h`). Checked against transformers' own NemotronHExperts, module for module and state dict for state
dict; what it cannot hold is refused in one line."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import ids
from mumoe import MumoeError
from mumoe.models import adapter_for, moe_adapter_for, stored_weights
from mumoe.models.nemotron_h import UngatedExperts
from mumoe.models.tiny import tiny_config


def _plain(**overrides):
    """transformers' own tiny Nemotron-H (no mumoe module swapped in), with random correction biases."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("nemotron_h", **overrides), attn_implementation="eager")
    for module in model.modules():
        if hasattr(module, "e_score_correction_bias"):
            module.e_score_correction_bias.data.normal_(0, 0.1)
    return model.eval()


def test_same_outputs_and_state_dict_as_transformers_experts():
    model = _plain()
    x = ids(2, 12, seed=1)
    theirs = {name: t.clone() for name, t in model.state_dict().items()}
    n_theirs = sum(p.numel() for p in model.parameters())
    sources = [layer.mixer.experts for layer in model.model.layers if hasattr(layer.mixer, "experts")]
    with torch.no_grad():
        expected = model(x).logits
        adapter_for(model)
        mine = [layer.mixer.experts for layer in model.model.layers if hasattr(layer.mixer, "experts")]
        assert all(isinstance(m, UngatedExperts) for m in mine)
        for source, experts in zip(sources, mine):  # each expert by hand: down · relu(up x)²
            h = torch.randn(5, source.hidden_dim, generator=torch.Generator().manual_seed(2))
            idx = torch.tensor([[0, 3], [7, 1], [2, 2], [5, 1], [6, 4]])
            w = torch.rand(5, 2, generator=torch.Generator().manual_seed(3))
            by_hand = torch.zeros_like(h)
            for t in range(5):
                for j in range(2):
                    e = int(idx[t, j])
                    if e < 8:
                        by_hand[t] += w[t, j] * (source.down_proj[e] @ torch.relu(source.up_proj[e] @ h[t]) ** 2)
            before = experts.config._experts_implementation
            for impl in ("eager", "batched_mm", "grouped_mm"):
                experts.config._experts_implementation = impl
                torch.testing.assert_close(experts(h, idx, w), by_hand, rtol=1e-5, atol=1e-6)
            idx[2, 0], idx[3, 1] = 8, 8  # eager skips the expert-parallel sentinel E (ODP's skipped slots)
            by_hand[2] -= w[2, 0] * (source.down_proj[2] @ torch.relu(source.up_proj[2] @ h[2]) ** 2)
            by_hand[3] -= w[3, 1] * (source.down_proj[1] @ torch.relu(source.up_proj[1] @ h[3]) ** 2)
            experts.config._experts_implementation = "eager"
            torch.testing.assert_close(experts(h, idx, w), by_hand, rtol=1e-5, atol=1e-5)
            experts.config._experts_implementation = before
            assert not experts.gate_up_proj[:, : experts.intermediate_dim].any()  # the gate half: zeros
        assert torch.equal(model(x).logits, expected)
    ours = model.state_dict()
    assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in theirs)
    layer = moe_adapter_for(model).moe_layers()[0]
    assert not layer.gated and layer.num_experts == 8 and layer.intermediate_size == 16
    assert layer.expert_weights == 8 * 2 * 16 * 32  # up [16, 32] + down [32, 16] per expert, no gate
    assert stored_weights(model) == n_theirs < sum(p.numel() for p in model.parameters())


def test_load_state_dict_in_the_family_layout():
    source, target = _plain(), _plain()
    adapter_for(target)
    target.load_state_dict(source.state_dict())
    x = ids(2, 10, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(target(x).logits, source(x).logits, rtol=0, atol=0)


@pytest.mark.parametrize("overrides, needle", [(dict(moe_latent_size=16), "moe_latent_size"),
                                               (dict(mlp_hidden_act="silu"), "relu²")])
def test_what_it_cannot_hold_is_refused_in_one_line(overrides, needle):
    with pytest.raises(MumoeError) as e:
        adapter_for(_plain(**overrides))
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_fused_up_files_are_refused_layer_by_layer(tmp_path):
    """Nemotron-H files hold one up_proj per expert (transformers' save_pretrained writes them so); files with the
    fused [E, I, H] tensor (a plain state dict saved by hand) are refused in one line before any weight is read."""
    from safetensors.torch import save_file

    from mumoe.observe.layerwise import LayerwiseCheckpoint
    from mumoe.models.tiny import tiny_model

    model = tiny_model("nemotron_h")
    model.config.save_pretrained(tmp_path)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors"))
    with pytest.raises(MumoeError) as e:
        LayerwiseCheckpoint(tmp_path, torch.float32)
    assert "experts.up_proj holds every expert's up projection" in str(e.value) and "\n" not in str(e.value)
