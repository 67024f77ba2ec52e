"""Llama 4: mumoe's sparse form of `Llama4TextMoe` (top-k router, experts run on the chosen tokens only, each on
its input scaled by σ(logit)) against transformers' own dense computation; the state dict keeps the family's
layout; what assumes g·f(x) refuses in one line."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from mumoe import MumoeError
from mumoe.models import moe_adapter_for
from mumoe.models.tiny import tiny_config, tiny_model


def test_sparse_form_equals_transformers_dense_moe():
    cfg = tiny_config("llama4_text")
    torch.manual_seed(0)
    plain = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=torch.float32).eval()
    before = {k: v.clone() for k, v in plain.state_dict().items()}  # transformers' layout: gate_up [E, H, 2I]
    ours = tiny_model("llama4_text")
    ours.load_state_dict(before)  # read in the family's layout, held in mumoe's
    layer = moe_adapter_for(ours).moe_layers()[0]
    E, I, H = 8, cfg.intermediate_size, cfg.hidden_size
    assert layer.input_scaled and layer.experts.gate_up_proj.shape == (E, 2 * I, H)
    after = ours.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)  # written back as is
    x = torch.randint(3, 100, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits, plain(x).logits, rtol=1e-5, atol=1e-5)
        # why the flag matters: an expert is not linear, scaling its input is not scaling its output
        assert not torch.allclose(layer.expert_forward(0, torch.ones(1, H)) * 0.5,
                                  layer.expert_forward(0, 0.5 * torch.ones(1, H)), atol=1e-6)


def test_otp_refuses_input_scaled_routers():
    from mumoe.testtime import otp

    model = tiny_model("llama4_text")
    with pytest.raises(MumoeError, match="scales the experts' inputs") as e:
        otp.train(model, torch.randint(3, 100, (2, 8)))
    assert "\n" not in str(e.value)


def test_multimodal_llama4_checkpoint(tmp_path):
    """The released Llama 4 checkpoints are multimodal (`language_model.*` beside `vision_model.*`): mumoe.load
    builds the text model, the layer-by-layer reader finds the text model under its prefix, REAP keeps what it keeps
    in memory, and the export (vision tower as it was) loads in transformers' multimodal class with every key in
    place, giving the in-memory logits."""
    import mumoe
    from mumoe.recipe import Recipe
    from transformers import Llama4Config, Llama4ForConditionalGeneration

    text = tiny_config("llama4_text")
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=8,
                  patch_size=4, projector_input_dim=16, projector_output_dim=48, vision_output_dim=16,
                  pixel_shuffle_ratio=0.5)
    torch.manual_seed(0)
    Llama4ForConditionalGeneration(Llama4Config(text_config=text.to_dict(), vision_config=vision)).save_pretrained(
        tmp_path / "src")
    model = mumoe.load(tmp_path / "src")
    assert model.config.model_type == "llama4_text"
    wins = torch.randint(3, 100, (4, 16), generator=torch.Generator().manual_seed(1))
    recipe = Recipe.build("reap", 0.25, calib="tensor", nsamples=4, seqlen=16, batch_size=2)
    streamed = mumoe.prune(str(tmp_path / "src"), recipe, calib=wins, out=tmp_path / "out", layerwise=True)
    in_memory = mumoe.prune(model, recipe, calib=wins)
    assert [e["kept"] for e in streamed.layers] == [e["kept"] for e in in_memory.layers]
    back, info = Llama4ForConditionalGeneration.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not any(info.values()), info
    x = torch.randint(3, 100, (2, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(input_ids=x).logits, model(x).logits, rtol=1e-5, atol=1e-5)
