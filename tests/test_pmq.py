"""MC#'s PMQ building blocks: the exact bit allocation against the authors' own allocations (their shipped Mixtral
factors and Gurobi results, tests/data/mcmoe_mixtral_factors.json: 96 of 96 layers) and against a brute force;
round-to-nearest quantization and bit packing on hand-worked values."""

import itertools
import json
import math
from pathlib import Path

import pytest
import torch

from mumoe import MumoeError
from mumoe.apply.quant import pack, rtn, unpack
from mumoe.select.bits import allocate, expert_costs, normalised

DATA = Path(__file__).parent / "data" / "mcmoe_mixtral_factors.json"


def test_allocation_equals_the_authors_solver_on_their_mixtral_factors():
    d = json.loads(DATA.read_text())
    for budget, want in d["allocations"].items():
        for layer in range(32):
            costs = expert_costs(normalised(d["frequency"][layer]), normalised(d["weight"][layer]),
                                 [dict(zip((1, 2, 3), losses)) for losses in d["loss"][layer]])
            assert allocate(costs, int(budget)) == want[layer], (budget, layer)


def test_allocation_equals_a_brute_force():
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        E = 5
        costs = [{b: float(c) for b, c in zip((1, 2, 3), torch.rand(3, generator=g).sort(descending=True).values)}
                 for _ in range(E)]
        for budget in range(1 * 3 + 2 + 3, 3 * E + 1):
            best = min((sum(costs[i][c[i]] for i in range(E)), c) for c in itertools.product((1, 2, 3), repeat=E)
                       if sum(c) <= budget and 3 in c and 2 in c)
            got = allocate(costs, budget)
            assert sum(got) <= budget and 3 in got and 2 in got
            assert math.isclose(sum(costs[i][b] for i, b in enumerate(got)), best[0], rel_tol=1e-12)
    with pytest.raises(MumoeError, match="cannot hold"):
        allocate(costs, 7)  # 3 + 2 + 1·3 = 8 is the least for 5 experts
    with pytest.raises(MumoeError, match="sum to zero"):
        normalised([0, 0])


def test_rtn_by_hand_and_within_half_a_step():
    w = torch.tensor([[0.0, 1.0, 2.0, 3.0], [-1.0, 0.0, 1.0, 2.0]])
    q = rtn(w, 2, group=4)
    assert q.q.tolist() == [[0, 1, 2, 3], [0, 1, 2, 3]] and q.zero.tolist() == [[0.0], [1.0]]
    assert torch.equal(q.dequantize(), w)
    q = rtn(torch.tensor([[5.0, 5.0, 5.0]]), 3, group=2)  # constant groups (one padded): exact
    assert torch.equal(q.dequantize(), torch.tensor([[5.0, 5.0, 5.0]]))
    x = torch.randn(16, 300, generator=torch.Generator().manual_seed(1))
    for bits in (1, 2, 3, 4, 8):
        q = rtn(x, bits, group=128)
        assert q.scale.shape == (16, 3) and int(q.q.max()) <= 2 ** bits - 1
        step = q.scale.repeat_interleave(128, 1)[:, :300]
        assert ((q.dequantize() - x).abs() <= step / 2 + 1e-6).all()


def test_pack_by_hand_and_round_trip():
    # 1 = 01, 2 = 10, 3 = 11, low bit first: bits 1,0, 0,1, 1,1 -> 0b00111001 = 57
    assert pack(torch.tensor([1, 2, 3]), 2).tolist() == [57]
    g = torch.Generator().manual_seed(2)
    for bits in range(1, 9):
        q = torch.randint(0, 2 ** bits, (7, 13), generator=g)
        data = pack(q, bits)
        assert data.numel() == -(-7 * 13 * bits // 8)
        assert torch.equal(unpack(data, bits, (7, 13)), q.to(torch.uint8))
    with pytest.raises(MumoeError, match="does not fit"):
        pack(torch.tensor([4]), 2)


def test_pmq_statistics_equal_the_block_run_with_one_expert_quantized():
    """PMQ's L_{i,b} from the one observation pass equals, batch by batch, ‖Y − Y_{i@b}‖_F with Y the MoE block's
    own output and Y_{i@b} the same block with expert i's weights replaced by their RTN values; φ and w equal the
    router's top-k counts and softmax sums recomputed from the block inputs; quantize_layer writes exactly RTN's
    values at the allocated widths."""
    import copy

    from conftest import ids, make
    from mumoe.criteria.pmq import PMQStats, allocate_layer, quantize_layer
    from mumoe.models import moe_adapter_for
    from mumoe.observe.runner import run

    model = make("qwen3_moe").eval()
    layers = moe_adapter_for(model).moe_layers()
    wins = ids(batch=4, length=16, seed=3)
    stats = run(model, wins, [PMQStats(layers, group=16)], batch_size=2)[0].result()
    inputs = {layer.index: [] for layer in layers}
    hooks = [layer.block.register_forward_hook(lambda m, a, o, j=layer.index: inputs[j].append(a[0].detach()))
             for layer in layers]
    with torch.no_grad():
        for b in range(0, 4, 2):
            model(wins[b:b + 2])
    for h in hooks:
        h.remove()

    def out(block, x):
        y = block(x)
        return (y[0] if isinstance(y, tuple) else y).reshape(-1, x.shape[-1])

    for layer, st in zip(layers, stats):
        E, k = layer.num_experts, layer.top_k
        loss = torch.zeros(E, 3, dtype=torch.float64)
        phi = torch.zeros(E, dtype=torch.float64)
        w = torch.zeros(E, dtype=torch.float64)
        for x in inputs[layer.index]:
            flat = x.reshape(-1, x.shape[-1])
            probs = torch.softmax(flat.double() @ layer.router_weight.double().T, -1)
            top = probs.topk(k, -1).indices
            phi += torch.bincount(top.reshape(-1), minlength=E).double()
            w.index_add_(0, top.reshape(-1), probs.gather(-1, top).reshape(-1))
            with torch.no_grad():
                y = out(layer.block, x)
                for i in range(E):
                    for j, bits in enumerate((1, 2, 3)):
                        q = copy.deepcopy(layer.block)
                        ex = [m for m in q.modules() if hasattr(m, "gate_up_proj")][0]
                        ex.gate_up_proj[i] = rtn(layer.experts.gate_up_proj[i], bits, 16).dequantize()
                        ex.down_proj[i] = rtn(layer.experts.down_proj[i], bits, 16).dequantize()
                        loss[i, j] += float((y - out(q, x)).double().norm())
        assert torch.equal(st.phi, phi) and torch.allclose(st.w, w, rtol=1e-5)  # logits in float32 there
        assert torch.allclose(st.loss, loss, rtol=1e-4, atol=1e-7)
        assert (st.loss[:, 0] > st.loss[:, 2]).all()  # 1 bit hurts more than 3 where an expert was routed

        widths = allocate_layer(st, 2.0)
        assert sum(widths) <= 2 * E and 3 in widths and 2 in widths
        before = [(layer.experts.gate_up_proj[i].clone(), layer.experts.down_proj[i].clone()) for i in range(E)]
        quantize_layer(layer, widths, group=16)
        for i, b in enumerate(widths):
            assert torch.equal(layer.experts.gate_up_proj[i], rtn(before[i][0], b, 16).dequantize())
            assert torch.equal(layer.experts.down_proj[i], rtn(before[i][1], b, 16).dequantize())


def test_quantize_exports_packed_experts_that_reload_to_rtn_of_the_source(ckpt, capsys):
    """`mumoe quantize`: the allocation averages --avg-bits per layer; the export's experts dequantize to RTN of
    the source's weights at the recorded widths, bit for bit; the packed integers take ceil(n·b/8) bytes per
    matrix; the reloaded model gives the logits of the model quantized in memory; bad options fail before
    loading, with one line."""
    import json

    from safetensors import safe_open

    import mumoe
    from mumoe.cli import main
    from mumoe.models import moe_adapter_for

    m, out = str(ckpt / "m"), ckpt / "q"
    argv = ["quantize", m, "--avg-bits", "2", "--group", "16", "--calib", str(ckpt / "c.txt"), "--nsamples", "4",
            "--seqlen", "16", "--batch-size", "2"]
    assert main([*argv, "--out", str(out)]) == 0
    assert "bits (2.00 on average)" in capsys.readouterr().out
    rec = json.loads((out / "pruning.json").read_text())
    assert rec["form"] == "mumoe-quant" and rec["recipe"]["group"] == 16
    src = mumoe.load(m)
    layers = moe_adapter_for(src).moe_layers()
    q = mumoe.load(out)
    qlayers = moe_adapter_for(q).moe_layers()
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        sizes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    for entry, layer, ql in zip(rec["layers"], layers, qlayers):
        widths = [ex["bits"] for ex in entry["experts"]]
        assert sum(widths) == 2 * len(widths) and 3 in widths and 2 in widths
        assert abs(sum(ex["phi"] for ex in entry["experts"]) - 1) < 1e-6
        for e, b in enumerate(widths):
            for name, full, got in (("gate_up", layer.experts.gate_up_proj[e], ql.experts.gate_up_proj[e]),
                                    ("down", layer.experts.down_proj[e], ql.experts.down_proj[e])):
                assert torch.equal(got, rtn(full, b, 16).dequantize()), (entry["layer"], e, name)
                key = f"model.layers.{entry['layer']}.mlp.experts.{e}.{name}.q"
                assert sizes[key] == [-(-full.numel() * b // 8)]
    assert not any(k.endswith("experts.gate_up_proj") for k in sizes)  # no full-precision copy of the experts

    # the same run in memory from Python: the reloaded export gives its logits
    model = mumoe.load(m)
    report = mumoe.quantize(model, 2.0, str(ckpt / "c.txt"), tokenizer=mumoe.load_tokenizer(m), group=16,
                            nsamples=4, seqlen=16, batch_size=2)
    assert report.layers == rec["layers"]
    x = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(x).logits, q(x).logits)

    # transformers alone (the shipped modelling code dequantizes each expert when it runs): the same experts
    from transformers import AutoModelForCausalLM

    remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    assert type(remote).__name__ == "MumoeForCausalLM"
    r_layers = [layer.mlp.experts for layer in remote.model.layers]
    for entry, ql in zip(rec["layers"], qlayers):
        ex = r_layers[entry["layer"]]
        for e in (0, len(entry["experts"]) - 1):
            assert torch.equal(getattr(ex, str(e)).gate_up.weight(torch.float32), ql.experts.gate_up_proj[e])
            assert torch.equal(getattr(ex, str(e)).down.weight(torch.float32), ql.experts.down_proj[e])
    with torch.no_grad():
        torch.testing.assert_close(remote(x).logits, q(x).logits, rtol=1e-5, atol=1e-5)
    capsys.readouterr()  # transformers' loading bar

    for bad, words in ((["--avg-bits", "4"], "between the lowest and highest"), (["--bits", "1,9"], "1..8"),
                       (["--avg-bits", "1.1"], "cannot hold one expert at 3 bits"), (["--group", "0"], "--group")):
        assert main([*argv, *bad, "--out", str(ckpt / "bad")]) == 2
        err = capsys.readouterr().err
        assert words in err and len(err.strip().splitlines()) == 1, err
    assert not (ckpt / "bad").exists()
    assert main(["quantize", str(out), *argv[2:], "--out", str(ckpt / "bad")]) == 2  # an export with its own shapes
    assert "per-layer shapes (mumoe-quant form)" in capsys.readouterr().err


def test_reap_then_pmq_in_one_process(ckpt, tmp_path):
    """REAP then PMQ on one loaded model: one record of both stages, the export reloads to the logits in memory;
    pruning or quantizing again after PMQ is refused (the export packs the widths of the run that quantized)."""
    import json

    import mumoe
    from mumoe.apply.export import save_pruned

    m, c = str(ckpt / "m"), str(ckpt / "c.txt")
    tok = mumoe.load_tokenizer(m)
    model = mumoe.load(m)
    mumoe.prune(model, "reap", 0.25, c, tokenizer=tok, nsamples=4, seqlen=16, batch_size=2)
    E = model.config.num_experts
    report = mumoe.quantize(model, 2.0, c, tokenizer=tok, group=16, nsamples=4, seqlen=16, batch_size=2)
    assert [s["method"] for s in report.stages] == ["reap", "pmq"]
    assert all(len(e["experts"]) == E for e in report.layers)
    save_pruned(model, tmp_path / "rq", report, tok)
    rec = json.loads((tmp_path / "rq" / "pruning.json").read_text())
    assert rec["form"] == "mumoe-quant" and [s["method"] for s in rec["stages"]] == ["reap", "pmq"]
    back = mumoe.load(tmp_path / "rq")
    x = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(back(x).logits, model(x).logits)
    with pytest.raises(mumoe.MumoeError, match="quantized .*prune first, then quantize"):
        mumoe.prune(model, "reap", 0.25, c, tokenizer=tok, nsamples=4, seqlen=16, batch_size=2)
    with pytest.raises(mumoe.MumoeError, match="quantized already"):
        mumoe.quantize(model, 2.0, c, tokenizer=tok, group=16, nsamples=4, seqlen=16, batch_size=2)


@pytest.mark.parametrize("arch,kept", [("qwen3_moe", True), ("mixtral", True), ("qwen3_moe", False)])
def test_layer_by_layer_equals_in_memory(tmp_path, arch, kept, capsys, monkeypatch):
    """`mumoe quantize --layerwise on` (one decoder layer resident, the export written tensor by tensor from the
    checkpoint's per-expert tensors): the same widths, statistics and packed bytes as in memory; the same logits —
    with each layer's quantized integers kept for its batches, and (a tight memory cap) made again per batch."""
    import mumoe.drivers.quantize as dq

    monkeypatch.setattr(dq, "_cache_fits", lambda layers, bits: kept)
    import json

    from safetensors.torch import load_file

    import mumoe
    from conftest import SAMPLE_TEXT, char_tokenizer, make
    from mumoe.cli import main

    model, tok = make(arch), char_tokenizer()
    model.save_pretrained(tmp_path / "m")  # transformers' own layout: one tensor per expert and projection
    tok.save_pretrained(tmp_path / "m")
    (tmp_path / "c.txt").write_text(SAMPLE_TEXT * 4)
    argv = ["quantize", str(tmp_path / "m"), "--avg-bits", "2", "--group", "16", "--calib", str(tmp_path / "c.txt"),
            "--nsamples", "4", "--seqlen", "16", "--batch-size", "2"]
    assert main([*argv, "--layerwise", "off", "--out", str(tmp_path / "a")]) == 0
    assert main([*argv, "--layerwise", "on", "--out", str(tmp_path / "b")]) == 0
    assert "PMQ layer by layer" in capsys.readouterr().out
    ra, rb = (json.loads((tmp_path / d / "pruning.json").read_text()) for d in "ab")
    assert ra["layers"] == rb["layers"] and rb["form"] == "mumoe-quant"
    from mumoe.models.keys import checkpoint_renamer

    rename = checkpoint_renamer(model.config.model_type)  # the streamed export keeps the source's spelling
    A, B = ({rename(k): v for f in (tmp_path / d).glob("*.safetensors") for k, v in load_file(f).items()}
            for d in "ab")
    packed = [k for k in A if k.endswith((".q", ".scale", ".zero"))]
    assert packed and set(packed) <= set(B) and all(torch.equal(A[k], B[k]) for k in packed)
    x = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(mumoe.load(tmp_path / "a")(x).logits, mumoe.load(tmp_path / "b")(x).logits)


def test_prune_then_pmq_in_one_command(ckpt, capsys):
    """`mumoe prune --method reap --ratio 0.25 --then pmq:2` equals `mumoe prune` then `mumoe quantize` on its
    export (same calibration): the same widths and packed bytes, one record of both stages; layer by layer the
    same again; pmq anywhere but last is refused before any work."""
    import json

    from safetensors.torch import load_file

    from mumoe.cli import main

    m, c = str(ckpt / "m"), str(ckpt / "c.txt")
    calib = ["--calib", c, "--nsamples", "4", "--seqlen", "16", "--batch-size", "2"]
    assert main(["prune", m, "--method", "reap", "--ratio", "0.25", *calib, "--out", str(ckpt / "r")]) == 0
    assert main(["quantize", str(ckpt / "r"), "--avg-bits", "2", "--group", "16", *calib, "--out",
                 str(ckpt / "two")]) == 0
    one = ["prune", m, "--method", "reap", "--ratio", "0.25", *calib, "--then", "pmq:2:group=16"]
    assert main([*one, "--layerwise", "off", "--out", str(ckpt / "one")]) == 0
    assert main([*one, "--layerwise", "on", "--out", str(ckpt / "lw")]) == 0
    capsys.readouterr()
    recs = {d: json.loads((ckpt / d / "pruning.json").read_text()) for d in ("two", "one", "lw")}
    assert recs["one"]["layers"] == recs["two"]["layers"] == recs["lw"]["layers"]
    assert [s["method"] for s in recs["one"]["stages"]] == ["reap", "pmq"] == [s["method"] for s in recs["lw"]["stages"]]
    assert recs["one"]["model"]["source"] == m
    tensors = {d: {k: v for f in (ckpt / d).glob("*.safetensors") for k, v in load_file(f).items()}
               for d in ("two", "one", "lw")}
    packed = [k for k in tensors["two"] if k.endswith(".q")]
    assert packed and all(torch.equal(tensors["two"][k], tensors[d][k]) for d in ("one", "lw") for k in packed)
    assert not list(ckpt.glob(".lw.stages-*"))  # the layer-by-layer stage folder is gone
    assert main(["prune", m, "--method", "reap", "--ratio", "0.25", *calib, "--then", "pmq:2", "--then",
                 "wanda:0.5", "--out", str(ckpt / "bad")]) == 2
    assert "as the last stage" in capsys.readouterr().err
    assert main(["prune", m, "--method", "reap", "--ratio", "0.25", *calib, "--then", "pmq", "--out",
                 str(ckpt / "bad")]) == 2
    assert "give the average bits" in capsys.readouterr().err and not (ckpt / "bad").exists()
