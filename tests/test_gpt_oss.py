"""GPT-OSS: mumoe holds its experts in its own layout (`models.gpt_oss.CanonicalExperts`) while the checkpoint,
the state dict and every export keep the family's (transposed, gate/up columns interleaved, biases). Checked
against transformers' own `GptOssExperts` (the model loaded from the same files, never converted), by hand, and
through the layer-by-layer path with HEAPr's global (per-expert width) form."""

import torch
from transformers import AutoModelForCausalLM

from conftest import ids
import mumoe
from mumoe.apply import save_pruned
from mumoe.drivers.layerwise import prune_layerwise
from mumoe.models import moe_adapter_for
from mumoe.models.gpt_oss import CanonicalExperts, to_canonical, to_family
from mumoe.models.tiny import tiny_model
from mumoe.observe import MoEObserver
from mumoe.recipe import Recipe


def test_layout_by_hand_and_both_ways():
    # one expert, H = 1, I = 2: the checkpoint's columns are g0 u0 g1 u1
    fam = torch.tensor([[[1.0, 2.0, 3.0, 4.0]]])  # [E=1, H=1, 2I=4]
    assert to_canonical("gate_up_proj", fam).tolist() == [[[1.0], [3.0], [2.0], [4.0]]]  # [1, 2I, H]: g0 g1 u0 u1
    assert to_canonical("gate_up_proj_bias", fam[:, 0]).tolist() == [[1.0, 3.0, 2.0, 4.0]]
    down = torch.arange(6.0).reshape(1, 2, 3)  # [E, I, H]
    assert torch.equal(to_canonical("down_proj", down), down.transpose(1, 2))
    g = torch.Generator().manual_seed(0)
    for name, shape in (("gate_up_proj", (3, 5, 8)), ("gate_up_proj_bias", (3, 8)), ("down_proj", (3, 4, 5)),
                        ("down_proj_bias", (3, 5))):
        t = torch.randn(shape, generator=g)
        assert torch.equal(to_family(name, to_canonical(name, t)), t)


def _own(tmp_path):
    """The tiny model saved, and transformers' own GPT-OSS model of the files (experts never converted)."""
    tiny_model("gpt_oss").save_pretrained(tmp_path)
    own = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(own.model.layers[0].mlp.experts).__name__ == "GptOssExperts"
    return own


def test_state_dict_is_the_familys_and_forward_is_transformers(tmp_path):
    own = _own(tmp_path)
    x = ids(2, 12, seed=5)
    with torch.no_grad():
        want = own(x).logits
    state = {k: v.clone() for k, v in own.state_dict().items()}
    ours = mumoe.load(tmp_path, "fp32")
    assert isinstance(ours.model.layers[0].mlp.experts, CanonicalExperts)
    got_state = ours.state_dict()
    assert set(got_state) == set(state)
    for k in state:
        assert torch.equal(got_state[k], state[k]), k
    layer = moe_adapter_for(ours).moe_layers()[0]
    events = []
    with torch.no_grad(), MoEObserver(ours, on_expert=lambda ev: events.append(ev)):
        observed = ours(x).logits  # mumoe's own experts pass (the observer's), from the canonical tensors
    with torch.no_grad():
        plain = ours(x).logits  # transformers' experts dispatch (grouped_mm) over the canonical tensors
    for logits in (observed, plain):
        assert (logits - want).abs().max() <= 1e-5
    # every expert output equals transformers' own expert (its `_apply_gate`, its layout), and the clamp is reached
    fam = own.model.layers[layer.index].mlp.experts
    I, limit = layer.intermediate_size, ours.config.swiglu_limit
    mine = [ev for ev in events if ev.layer.index == layer.index]
    assert mine
    gates = []
    for ev in mine:
        e = ev.expert
        pre = ev.inputs @ fam.gate_up_proj[e] + fam.gate_up_proj_bias[e]  # [n, 2I] interleaved
        torch.testing.assert_close(ev.output, fam._apply_gate(pre) @ fam.down_proj[e] + fam.down_proj_bias[e],
                                   rtol=1e-5, atol=1e-6)
        gates.append(pre[:, 0::2])
    assert (torch.cat(gates) > limit).any() and I == 16
    # load_state_dict takes the family's layout too
    fresh = tiny_model("gpt_oss", seed=7)
    fresh.load_state_dict(state)
    with torch.no_grad():
        assert (fresh(x).logits - want).abs().max() <= 1e-5


def test_heapr_global_form_layerwise_equals_in_memory_and_loads_with_transformers(tmp_path):
    """Per-expert widths with the experts' biases: the streamed ragged export (from the files, layer by layer)
    equals the in-memory one tensor for tensor, and mumoe.load and transformers' trust_remote_code give the pruned
    model's logits."""
    src = tmp_path / "src"
    tiny_model("gpt_oss").save_pretrained(src)
    wins, x = ids(6, 16, seed=1), ids(2, 12, seed=3)
    recipe = Recipe.build("heapr", 0.4, calib="tensor", nsamples=6, seqlen=16, form="global")
    report = prune_layerwise(src, recipe, tmp_path / "streamed", (wins, None, {"source": "tensor"}), verbose=False)
    model = mumoe.load(src, "fp32")
    ref = mumoe.api.prune(model, recipe, calib=wins)
    save_pruned(model, tmp_path / "memory", ref)
    assert report.layers == ref.layers and report.form == ref.form == "mumoe-atoms"
    from conftest import safetensors_of

    a, b = safetensors_of(tmp_path / "streamed"), safetensors_of(tmp_path / "memory")
    assert set(a) == set(b) and any(k.endswith(".gate_up_bias") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    with torch.no_grad():
        expected = model(x).logits
        for loaded in (mumoe.load(tmp_path / "streamed", "fp32"),
                       AutoModelForCausalLM.from_pretrained(tmp_path / "streamed", trust_remote_code=True,
                                                            dtype=torch.float32).eval()):
            assert (loaded(x).logits - expected).abs().max() <= 1e-5


def mxfp4_checkpoint(folder):
    """A GPT-OSS checkpoint in the released format: experts MXFP4-packed (`<experts>.gate_up_proj_blocks`
    [E, 2I, H/32, 16] uint8, `_scales` [E, 2I, H/32] uint8; down likewise), quantization_config in config.json."""
    import json

    from safetensors.torch import load_file, save_file

    plain = folder / "plain"
    tiny_model("gpt_oss", intermediate_size=32).save_pretrained(plain)  # 32: whole MXFP4 blocks
    state = load_file(plain / "model.safetensors")
    g = torch.Generator().manual_seed(0)
    for k in [k for k in state if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        E, cin, cout = state.pop(k).shape  # the family's [E, in, out]
        state[k + "_blocks"] = torch.randint(0, 256, (E, cout, cin // 32, 16), generator=g, dtype=torch.uint8)
        state[k + "_scales"] = torch.randint(121, 126, (E, cout, cin // 32), generator=g, dtype=torch.uint8)
    out = folder / "mxfp4"
    out.mkdir()
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((plain / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def test_mxfp4_checkpoint_in_memory_layer_by_layer_and_streamed(tmp_path):
    """The released gpt-oss format: mumoe.load dequantizes as transformers does; the layer-by-layer reader and
    streamed AIMER dequantize the same values from the files; a layer-sequential prune with its streamed export
    equals the in-memory one tensor for tensor, both written unquantized (no quantization_config) and loading with
    plain transformers."""
    import json

    from transformers import Mxfp4Config

    from conftest import safetensors_of
    from mumoe.criteria import score_methods
    from mumoe.criteria.aimer_stream import stream_aimer
    from mumoe.observe.layerwise import LayerwiseCheckpoint

    src = mxfp4_checkpoint(tmp_path)
    own = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32,
                                               quantization_config=Mxfp4Config(dequantize=True)).eval()
    model = mumoe.load(src, "fp32")
    want, got = own.state_dict(), model.state_dict()
    assert set(want) == set(got) and all(torch.equal(want[k], got[k]) for k in want)
    assert want["model.layers.0.mlp.experts.gate_up_proj"].abs().max() > 0
    ckpt = LayerwiseCheckpoint(src, torch.float32)
    with ckpt.part("model.layers.1") as layer:
        assert torch.equal(layer.mlp.experts.gate_up_proj, model.model.layers[1].mlp.experts.gate_up_proj)
        assert torch.equal(layer.mlp.experts.down_proj, model.model.layers[1].mlp.experts.down_proj)
    ref = score_methods(model, ["aimer"], None)["aimer"]
    for a, b in zip(stream_aimer(src, progress=False).values(), ref):
        assert torch.equal(a.double(), b.double())
    wins, x = ids(6, 16, seed=1), ids(2, 12, seed=3)
    recipe = Recipe.build("reap", 0.5, calib="tensor", nsamples=6, seqlen=16)
    report = prune_layerwise(src, recipe, tmp_path / "streamed", (wins, None, {"source": "tensor"}), verbose=False)
    memory = mumoe.api.prune(model, recipe, calib=wins)
    save_pruned(model, tmp_path / "memory", memory)
    assert report.layers == memory.layers
    a, b = safetensors_of(tmp_path / "streamed"), safetensors_of(tmp_path / "memory")
    assert set(a) == set(b) and "model.layers.0.mlp.experts.gate_up_proj" in a
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    for out in ("streamed", "memory"):
        assert "quantization_config" not in json.loads((tmp_path / out / "config.json").read_text())
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / out, dtype=torch.float32).eval()
        with torch.no_grad():
            assert (reloaded(x).logits - model(x).logits).abs().max() <= 1e-5
